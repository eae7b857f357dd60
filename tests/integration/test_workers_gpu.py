"""Batched inference on CUDA (marked ``gpu``; skipped where no CUDA device is present).

The model module is the real ``msgate.model.predict`` when its ``load_model`` takes ``device=`` and a
checkpoint is packaged; otherwise this file's own CUDA test double (``load_model``/``predict`` below:
a small 3D conv net, NOT the model) so the worker's device handling and dynamic batching still run
on the GPU.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import test_workers_double as double
import torch  # noqa: E402  (the package depends on torch; what may be missing is CUDA)
from conftest import make_settings

from msgate.model.types import EDSS_BINS, Case, ModelResult

pytestmark = [pytest.mark.gpu, pytest.mark.integration,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

_NET: dict[str, Any] = {}
CALLS: list[tuple[int, str]] = []


def load_model(device: str = "cpu") -> None:
    _NET["net"] = torch.nn.Sequential(torch.nn.Conv3d(1, 4, 3, padding=1), torch.nn.AdaptiveAvgPool3d(1),
                                      torch.nn.Flatten(), torch.nn.Linear(4, 1)).to(device).eval()
    _NET["device"] = device


def predict(cases: Sequence[Case]) -> list[ModelResult]:
    net, device = _NET["net"], _NET["device"]
    x = torch.as_tensor(np.stack([c.flair.data for c in cases]))[:, None].to(device)
    with torch.no_grad():
        p = torch.sigmoid(net(x)).squeeze(1).cpu().numpy()
    CALLS.append((len(cases), str(x.device)))
    return [ModelResult(case_id=c.case_id, model_name="cuda-double", model_version="cuda-double-1",
                        edss_probabilities=tuple([1.0 / len(EDSS_BINS)] * len(EDSS_BINS)), edss_estimate=2.0,
                        confidence=0.25, uncertainty=0.5, p_ms=float(p[i]), lesions=(),
                        lesion_mask=np.zeros(c.flair.data.shape, np.int16), heatmap=None) for i, c in enumerate(cases)]


def _module() -> str:
    """The real model when it takes a device and its checkpoint is packaged (it is: a failure to load it
    on CUDA fails the test instead of falling back to the double)."""
    from msgate.model import predict as real
    from msgate.model.patient import checkpoint

    if "device" in inspect.signature(real.load_model).parameters and checkpoint.DEFAULT_PATH.exists():
        real.load_model(device="cuda")
        return "msgate.model.predict"
    return "test_workers_gpu"


def test_batched_inference_on_cuda(tmp_path: Path) -> None:
    from msgate.storage.store import open_store
    from msgate.workers import inference, jobs, runtime
    from msgate.workers.celery_app import build_app
    from msgate.workers.scheduler import Scheduler

    module = _module()
    assert module == "msgate.model.predict"  # the packaged model takes a device: it, not the double, runs here
    settings = make_settings(tmp_path / "home", "sqlite", workers={
        "model_module": module, "ehr_deadline_seconds": 0, "required_ehr_fields": [], "batch_size": 4,
        "batch_wait_seconds": 0.5, "device": "auto"})
    store = open_store(settings)
    try:
        for seed in range(4):
            double.make_study(store, seed=seed, slices=16, rle=True)
        ids = Scheduler(store, build_app(settings)).scan()
        rt = runtime.Runtime(settings, store)
        assert rt.device == "cuda"
        assert inference.run(rt, ids[0], task_id="gpu-test", handoff=lambda _: None) == "batch of 4"
        states = [jobs.state_of(store.db, i) for i in ids]
        assert all(j is not None and j.state == "done" and j.stages["batch"] == 4 for j in states)
        if module == "test_workers_gpu":
            assert CALLS[-1][0] == 4 and CALLS[-1][1].startswith("cuda")
    finally:
        store.close()
