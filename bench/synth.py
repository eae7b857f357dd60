"""Time the synthetic cohort generator: one subject at 1 mm 3D and one 2D protocol, on one core.

    OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 taskset -c 0 .venv/bin/python bench/synth.py [--repeat 3]

Prints seconds per stage (template load is one-off per process and reported apart).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from msgate.model.synth import cohort
from msgate.model.synth.anatomy import load_template


def _time_subject(protocol: str, index: int, ts: str) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        cfg = cohort.CohortConfig(Path(tmp), seed=1, protocol=protocol, resolution=1, ts=ts)
        t0 = time.perf_counter()
        sub = cohort.simulate_subject(cfg, index)
        t1 = time.perf_counter()
        cohort.generate_subject(cfg, index)
        t2 = time.perf_counter()
    return {"simulate_s": t1 - t0, "simulate_and_write_s": t2 - t1, "slices": sum(s.pixels.shape[2] for s in sub.series)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--ts", default="explicit")
    args = parser.parse_args()
    t = time.perf_counter()
    load_template(1)
    print(f"template load (once per process): {time.perf_counter() - t:.2f} s")
    for protocol in ("3d", "2d"):
        runs = [_time_subject(protocol, i + 1, args.ts) for i in range(args.repeat)]
        sim = statistics.median(r["simulate_s"] for r in runs)
        totals = [r["simulate_and_write_s"] for r in runs]
        each = ", ".join(f"{v:.2f}" for v in totals)
        print(f"{protocol}: simulate {sim:.2f} s, simulate+write {statistics.median(totals):.2f} s, median of "
              f"{args.repeat} subjects ({runs[0]['slices']:.0f} slices, ts={args.ts}; per subject {each})")

if __name__ == "__main__":
    main()
