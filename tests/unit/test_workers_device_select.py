"""``MSGATE_WORKERS__DEVICE=cuda:N`` selects GPU N (no CUDA needed: the device count is monkeypatched and
the worker processes are recorded instead of spawned).

A per-GPU child sees only its own GPU (``CUDA_VISIBLE_DEVICES``), as ``cuda``: it used to be given the
setting unchanged, so ``cuda:1`` asked for an ordinal that did not exist in the child (invalid device
ordinal) and the role restarted in a loop. In compose the reserved host GPU is ``cuda:0`` in the container.
"""

from __future__ import annotations

import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from conftest import make_settings

from msgate import log as msgate_log
from msgate.errors import ConfigError
from msgate.storage import heartbeat
from msgate.workers import runtime, worker

Served = list[tuple[str | None, str]]  # (CUDA_VISIBLE_DEVICES, workers.device) as each worker saw them
FACTS: dict[str, dict[str, Any]] = {}  # heartbeat facts the role set (status shows them)


class Recorder:
    """multiprocessing's spawn context, recording each Process; ``start`` runs the target in this process
    (its ``serve_one`` is replaced too), so what the worker itself sees is recorded."""

    def __init__(self) -> None:
        self.started: list[str] = []

    def Process(self, *, target: Any, args: tuple[Any, ...], name: str) -> Any:
        recorder = self

        class Proc:
            def start(self) -> None:
                recorder.started.append(name)
                target(*args)

            def is_alive(self) -> bool:
                return False

            def terminate(self) -> None:
                pass

            def join(self, timeout: float | None = None) -> None:
                pass

        return Proc()


@pytest.fixture
def served(monkeypatch: pytest.MonkeyPatch) -> Served:
    """(CUDA_VISIBLE_DEVICES, workers.device) as each started worker saw them; two GPUs visible."""
    seen: Served = []
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)  # restored after the test (children set it)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(worker, "open_store", lambda settings, **_: SimpleNamespace(settings=settings))
    monkeypatch.setattr(msgate_log, "setup_logging", lambda *a, **k: None)
    monkeypatch.setattr("signal.signal", lambda *a: None)

    def serve_one(store: Any, stop: threading.Event) -> None:
        import os

        seen.append((os.environ.get("CUDA_VISIBLE_DEVICES"), store.settings.workers.device))

    monkeypatch.setattr(worker, "serve_one", serve_one)
    monkeypatch.setattr(heartbeat, "set_info", lambda role, **facts: FACTS.update({role: facts}))
    FACTS.clear()
    return seen


@pytest.fixture
def recorder(monkeypatch: pytest.MonkeyPatch) -> Recorder:
    rec = Recorder()
    monkeypatch.setattr(worker.multiprocessing, "get_context", lambda method: rec)
    return rec


def _run(tmp_path: Path, device: str) -> None:
    settings = make_settings(tmp_path / "home", "sqlite", workers={"device": device})
    stop = threading.Event()
    stop.set()  # the children are "started"; the role returns at once instead of supervising them
    worker.run(SimpleNamespace(settings=settings), stop)  # type: ignore[arg-type]


def test_cuda_n_runs_one_worker_on_gpu_n_as_cuda(tmp_path: Path, served: Served,
                                                  recorder: Recorder) -> None:
    _run(tmp_path, "cuda:1")
    assert len(recorder.started) == 1
    assert served == [("1", "cuda")]
    assert FACTS["worker"]["cuda_visible_devices"] == "1" and FACTS["worker"]["device"] == "cuda"


def test_each_per_gpu_child_uses_cuda(tmp_path: Path, served: Served,
                                      recorder: Recorder) -> None:
    _run(tmp_path, "cuda")
    assert served == [("0", "cuda"), ("1", "cuda")]


def test_auto_on_two_gpus_gives_each_child_cuda(tmp_path: Path, served: Served,
                                                recorder: Recorder, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runtime, "resolve_device", lambda wanted: "cuda")
    _run(tmp_path, "auto")
    assert served == [("0", "cuda"), ("1", "cuda")]


def test_cuda_n_counts_among_the_devices_this_process_sees(tmp_path: Path, served: Served,
                                                           recorder: Recorder,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """CUDA_VISIBLE_DEVICES=2,3 already narrows the host's GPUs: cuda:1 is host GPU 3, not host GPU 1."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    _run(tmp_path, "cuda:1")
    assert served == [("3", "cuda")]


def test_cuda_0_on_a_one_gpu_host_runs_in_this_process(tmp_path: Path, served: Served, recorder: Recorder,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """One GPU (the compose worker): cuda:0 is that GPU, served in the role's own process as before."""
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    _run(tmp_path, "cuda:0")
    assert recorder.started == [] and served == [(None, "cuda:0")]


@pytest.mark.parametrize(("device", "count"), [("cuda:2", 2), ("cuda:1", 1), ("cuda:0", 0)])
def test_cuda_n_beyond_the_visible_devices_is_refused_at_start(
        tmp_path: Path, served: Served, recorder: Recorder, monkeypatch: pytest.MonkeyPatch, device: str,
        count: int) -> None:
    """``cuda:1`` in the compose worker (one reserved GPU, cuda:0 in the container) is the (…, 1) case."""
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    with pytest.raises(ConfigError) as caught:
        _run(tmp_path, device)
    assert "MSGATE_WORKERS__DEVICE" in str(caught.value) and device in str(caught.value)
    assert caught.value.code == "config"
    assert recorder.started == [] and served == []
