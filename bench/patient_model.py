"""Patient model benchmark: whole ``predict`` for one case (lesion source + MONAI preprocessing +
network + MC dropout + Grad-CAM + EHR contributions) on CPU with the ``tiny`` checkpoint, with peak RSS;
and a GPU ``full``-preset latency/throughput run (random weights: no ``full`` checkpoint is trained).

    .venv/bin/python bench/patient_model.py                      # CPU tiny, one synthetic 2 mm case
    .venv/bin/python bench/patient_model.py --device cuda --preset full --batch 1 2 4 8 16
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import time

import numpy as np
import torch


def cpu_tiny(repeats: int, threads: int) -> dict[str, object]:
    from msgate.model.patient.synthdata import synth_case
    from msgate.model.predict import load_model, predict

    torch.set_num_threads(threads)
    case, _ = synth_case(303, 1)
    t0 = time.perf_counter()
    model = load_model()
    load_s = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        predict([case], model)
        times.append(time.perf_counter() - t)
    return {"device": "cpu", "preset": model.ckpt.meta["preset"], "threads": threads, "load_s": round(load_s, 3),
            "first_s": round(times[0], 3), "median_s": round(statistics.median(times), 3),
            "flair_shape": list(case.flair.data.shape), "lesion_source": model.lesions.name,
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


def gpu_full(batches: list[int], repeats: int) -> dict[str, object]:
    from msgate.model.patient.ehr import N_COLUMNS
    from msgate.model.patient.network import PatientNet
    from msgate.model.patient.presets import get_preset

    if not torch.cuda.is_available():
        raise SystemExit("CUDA is not available on this machine")
    p = get_preset("full")
    net = PatientNet(p).cuda().eval()
    rows = []
    for b in batches:
        x = torch.rand(b, 4, *p.grid, device="cuda")
        args = (x, torch.ones(b, 2, device="cuda"), torch.rand(b, 8, device="cuda"), torch.rand(b, 2 * N_COLUMNS, device="cuda"))
        with torch.no_grad(), torch.autocast("cuda"):
            net(*args)
            torch.cuda.synchronize()
            ts = []
            for _ in range(repeats):
                t = time.perf_counter()
                net(*args)
                torch.cuda.synchronize()
                ts.append(time.perf_counter() - t)
        med = statistics.median(ts)
        rows.append({"batch": b, "latency_ms": round(med * 1000, 2), "cases_per_s": round(b / med, 1)})
    return {"device": torch.cuda.get_device_name(), "preset": "full", "network_only": rows,
            "peak_gpu_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", type=int, nargs="*", default=[1, 2, 4, 8, 16])
    a = ap.parse_args()
    np.random.seed(0)
    out = cpu_tiny(a.repeats, a.threads) if a.device == "cpu" else gpu_full(a.batch, a.repeats)
    print(json.dumps(out, indent=2))  # noqa: T201


if __name__ == "__main__":
    main()
