"""Homomorphic EHR branch of the whole ensemble: CKKS cost per case, unbatched and packed, against plaintext.

Model: the shipped patient checkpoint, every member (``--random N``: a randomly initialised ensemble of
N members of the same shapes). Measured in one run, interleaved pack by pack (plaintext, HE,
plaintext, ...), medians over ``--runs``:

- *HE EHR branch alone*: the worker's part (parse the input ciphertexts with the cached public
  context, evaluate every member's ``M y + c M y^2`` plus the offset, serialize the result), per case;
- *end to end*: key service encrypt + MAC -> worker -> key service verify + decrypt + softmax and
  temperature, per case (the image model is not included: it is the same with HE on or off);
- *plaintext EHR branch*: torch ``ehr_embedding`` + ``fusion`` of every member on the same cases (CPU,
  1 thread), averaged as ``predict`` does;
- bytes per case on the wire (raw ciphertexts, and the JSON/base64 form the broker carries);
- public context size, cold load time and the cached lookup; key generation; the load average.

``--all-widths`` also measures every lane-group width the packing could use (not only the one the cost
model picks), which checks :data:`msgate.model.he.COST_MS`.

    python bench/he.py [--runs 7] [--batches 1,4,8,16] [--all-widths] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from msgate.model import he
from msgate.model.he_keys import HeKeys
from msgate.model.he_worker import HeWorker
from msgate.storage import keyring


def _ms(t0: float) -> float:
    return (time.perf_counter() - t0) * 1000.0


def _plain(nets: list[Any], u: np.ndarray, z: np.ndarray) -> float:
    ut = torch.as_tensor(u, dtype=torch.float32)
    zs = [torch.as_tensor(zm, dtype=torch.float32) for zm in z]
    t0 = time.perf_counter()
    with torch.no_grad():
        torch.stack([n.fusion(zm, n.ehr_embedding(ut)) for n, zm in zip(nets, zs, strict=True)]).mean(0)
    return _ms(t0)


def bench_batch(keys: HeKeys, worker: HeWorker, nets: list[Any], batch: int, runs: int,
                width: int | None = None) -> dict[str, Any]:
    model = worker.model
    rows: dict[str, list[float]] = {k: [] for k in ("plain", "encrypt", "worker", "decrypt", "e2e")}
    wire_raw = wire_json = 0
    for r in range(runs + 1):  # the first round warms caches (weight plaintexts per layout) and is dropped
        u, z = he.synthetic_inputs(batch, model, seed=100 + r)
        ids = [f"c{i}" for i in range(batch)]
        plain_ms = _plain(nets, u, z)
        t0 = time.perf_counter()
        [pack] = keys.encrypt(u, ids, widths=model.widths, width=width)
        enc_ms = _ms(t0)
        t1 = time.perf_counter()
        res = worker.evaluate(pack, z)
        work_ms = _ms(t1)
        t2 = time.perf_counter()
        keys.finalize(res)
        dec_ms = _ms(t2)
        if r == 0:
            wire_raw = pack.nbytes + res.nbytes
            wire_json = len(json.dumps(pack.to_wire())) + len(json.dumps(res.to_wire()))
            continue
        for k, v in zip(rows, (plain_ms, enc_ms, work_ms, dec_ms, enc_ms + work_ms + dec_ms), strict=True):
            rows[k].append(v)
    med = {k: statistics.median(v) for k, v in rows.items()}
    lay = pack.layout
    return {"batch": batch, "width": lay.hidden, "groups": len(he.lane_groups(model.widths, lay.hidden)),
            "ciphertexts_in": lay.n_ciphertexts, "blocks": lay.blocks, "rotations_per_group": lay.rotations,
            "ciphertexts_out": len(res.ciphertexts), "chosen": width is None,
            "he_branch_ms_per_case": med["worker"] / batch, "e2e_ms_per_case": med["e2e"] / batch,
            "encrypt_ms_per_case": med["encrypt"] / batch, "decrypt_ms_per_case": med["decrypt"] / batch,
            "plain_ms_per_case": med["plain"] / batch,
            "ratio_he_branch_vs_plain": med["worker"] / med["plain"], "ratio_e2e_vs_plain": med["e2e"] / med["plain"],
            "bytes_per_case_raw": wire_raw / batch, "bytes_per_case_json": wire_json / batch,
            "pack_ms_median": med, "runs": runs, "loadavg_1min": os.getloadavg()[0]}


def _model(random_members: int) -> tuple[list[Any], str]:
    if random_members:
        nets, _ = he.random_model(seed=5, members=random_members)
        return nets, f"random init PatientNet tiny x{random_members}"
    from msgate.model.patient import checkpoint

    ck = checkpoint.load()
    return ck.nets, f"shipped checkpoint {checkpoint.DEFAULT_PATH.name}, {len(ck.nets)} members"


def _context(keys: HeKeys, model: he.HeModel, home: Path) -> tuple[HeWorker, dict[str, Any]]:
    t0 = time.perf_counter()
    key_id = keys.generate(he.HeParams())
    keygen_ms = _ms(t0)
    loads = []
    for _ in range(3):
        w = HeWorker.for_home(model, home)
        w.keys.get(key_id)
        loads.append(w.keys.load_seconds[key_id] * 1000)
    worker = HeWorker.for_home(model, home)
    worker.keys.get(key_id)
    t1 = time.perf_counter()
    for _ in range(1000):
        worker.keys.get(key_id)
    return worker, {"keygen_ms": keygen_ms, "public_context_bytes": (keys.public_dir / f"{key_id}.ctx").stat().st_size,
                    "public_context_load_ms_cold_median": statistics.median(loads),
                    "public_context_cached_lookup_us": _ms(t1)}  # 1000 lookups in ms == µs per lookup


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--all-widths", action="store_true", help="also every lane-group width, not only the chosen one")
    ap.add_argument("--random", type=int, default=0, help="random-init ensemble of N members instead of the checkpoint")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    nets, what = _model(args.random)
    model = he.export(nets)
    load_before = os.getloadavg()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp)
        keys = HeKeys(home, keyring.init(home / "keys" / "keyring.json"))
        worker, ctx = _context(keys, model, home)
        for b in (int(x) for x in args.batches.split(",")):
            results.append(bench_batch(keys, worker, nets, b, args.runs))
            if args.all_widths:
                ws = {sum(model.widths[:k]) for k in range(1, model.n_members + 1)} - {results[-1]["width"]}
                results += [bench_batch(keys, worker, nets, b, args.runs, w) for w in sorted(ws)
                            if b <= he.max_pack(w, he.HeParams().slots)]
    report = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cpus": os.cpu_count(),
              "loadavg_before": load_before, "loadavg_after": os.getloadavg(), "params": he.HeParams().to_dict(),
              "model": what, "members": model.n_members, "widths": model.widths, **ctx, "batches": results}
    text = json.dumps(report, indent=2)
    sys.stdout.write(text + "\n")
    if args.json:
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
