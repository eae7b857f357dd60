"""``MSGATE_WORKERS__DEVICE=cuda:1`` on a machine with two GPUs (marked ``gpu``; skipped with fewer): the
worker role's child, spawned as the role spawns it, runs on host GPU 1 and sees it as ``cuda``.

The CUDA-free checks (device counts monkeypatched, processes recorded) are
``tests/unit/test_workers_device_select.py``; this one needs the real driver's CUDA_VISIBLE_DEVICES."""

from __future__ import annotations

import multiprocessing
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import make_settings

from msgate.config import Settings
from msgate.workers import runtime, worker

pytestmark = [pytest.mark.gpu, pytest.mark.integration,
              pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")]


def _probe(settings: Settings, visible: str, out: Any) -> None:
    """What ``worker._child`` does before serving (CUDA_VISIBLE_DEVICES, then the child's settings), and
    where a tensor on the Runtime's device lands."""
    os.environ["CUDA_VISIBLE_DEVICES"] = visible
    device = runtime.Runtime(worker._on_own_gpu(settings)).device
    x = torch.ones(4, device=device)
    out.put((device, torch.cuda.device_count(), str(torch.cuda.get_device_properties(x.device).uuid),
             float(x.sum())))


def test_cuda_1_runs_on_host_gpu_1(tmp_path: Path) -> None:
    settings = make_settings(tmp_path / "home", "sqlite", workers={"device": "cuda:1"})
    devices = worker.child_devices(settings)
    assert devices == [worker.visible_id(1)]
    ctx = multiprocessing.get_context("spawn")
    out = ctx.SimpleQueue()
    child = ctx.Process(target=_probe, args=(settings, devices[0], out))
    child.start()
    child.join(120)
    assert child.exitcode == 0
    device, count, uuid, total = out.get()
    assert (device, count, total) == ("cuda", 1, 4.0)
    assert uuid == str(torch.cuda.get_device_properties(1).uuid)
