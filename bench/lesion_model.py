"""Time lesion segmentation + Rim+ classification for one case, and report peak RSS.

    .venv/bin/python bench/lesion_model.py                       # CPU, tiny preset, shipped checkpoint
    .venv/bin/python bench/lesion_model.py --device cuda --preset full   # GPU variant (untrained full-size nets)

The case is synthetic subject 1 of cohort 4242 (3D protocol, FLAIR + T1 + QSM) at the preset's
template resolution. The first call (warm-up) is reported apart; then the median of ``--repeat``
runs. Peak RSS is the process maximum (``ru_maxrss``), including Python, torch and MONAI.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import time

import torch

from msgate.model.lesions.data import synth_case
from msgate.model.lesions.model import build_model, load_lesion_model
from msgate.model.lesions.presets import get_preset


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", default=None, help="checkpoint (default: shipped tiny; full: untrained)")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    preset = get_preset(args.preset)
    if args.model or args.preset == "tiny":
        model = load_lesion_model(args.model, device=args.device)
    else:
        model = build_model(preset, {"version": "untrained"}, ("asymmetric",), args.device)
    case = synth_case(4242, 1, resolution=preset.synth_resolution)
    times: list[dict[str, float]] = []
    for _ in range(args.repeat + 1):
        _sync(args.device)
        t0 = time.perf_counter()
        lesions = model.segment(case.volumes)
        _sync(args.device)
        t1 = time.perf_counter()
        model.classify_rims(case.volumes, lesions)
        _sync(args.device)
        t2 = time.perf_counter()
        times.append({"segment_s": t1 - t0, "rim_s": t2 - t1, "total_s": t2 - t0})
    warm, runs = times[0], times[1:]
    out = {
        "preset": preset.name, "device": args.device, "threads": args.threads,
        "volume_shape": list(case.volumes["FLAIR"].data.shape), "lesions": len(lesions.findings),
        "warmup_total_s": round(warm["total_s"], 3),
        **{f"median_{k}": round(statistics.median(r[k] for r in runs), 3) for k in runs[0]},
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
    if args.device.startswith("cuda"):
        out["peak_cuda_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
