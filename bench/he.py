"""Homomorphic EHR branch: CKKS cost per case, unbatched and packed, against the plaintext branch.

Measured in one run, interleaved pack by pack (plaintext, HE, plaintext, ...), medians over ``--runs``:

- *HE EHR branch alone*: the worker's part (parse the input ciphertexts with the cached public
  context, evaluate ``M y + c M y^2 + o``, serialize the result), per case;
- *end to end*: key service encrypt + MAC -> worker -> key service verify + decrypt + softmax and
  temperature, per case (the image model is not included: it is the same with HE on or off);
- *plaintext EHR branch*: torch ``PatientNet.ehr_embedding`` + ``fusion`` on the same cases (CPU);
- bytes per case on the wire (raw ciphertexts, and the JSON/base64 form the broker carries);
- public context size, cold load time and the cached lookup; key generation.

    python bench/he.py [--runs 7] [--batches 1,16] [--json OUT]
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


def _plain(net: Any, u: np.ndarray, z: np.ndarray) -> float:
    ut, zt = torch.as_tensor(u, dtype=torch.float32), torch.as_tensor(z, dtype=torch.float32)
    t0 = time.perf_counter()
    with torch.no_grad():
        net.fusion(zt, net.ehr_embedding(ut))
    return _ms(t0)


def bench_batch(keys: HeKeys, worker: HeWorker, net: Any, model: he.HeModel, batch: int, runs: int) -> dict[str, Any]:
    rows: dict[str, list[float]] = {k: [] for k in ("plain", "encrypt", "worker", "decrypt", "e2e")}
    wire_raw = wire_json = 0
    for r in range(runs + 1):  # the first round warms caches (weight plaintexts per layout) and is dropped
        u, z = he.synthetic_inputs(batch, (model.n_features - 1) // 2, model.gate_w.shape[1], seed=100 + r)
        ids = [f"c{i}" for i in range(batch)]
        plain_ms = _plain(net, u, z)
        t0 = time.perf_counter()
        pack = keys.encrypt(u, ids)[0]
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
    return {"batch": batch, "ciphertexts_in": lay.n_ciphertexts, "blocks": lay.blocks,
            "rotations": lay.rotations, "ciphertexts_out": len(res.ciphertexts),
            "he_branch_ms_per_case": med["worker"] / batch, "e2e_ms_per_case": med["e2e"] / batch,
            "encrypt_ms_per_case": med["encrypt"] / batch, "decrypt_ms_per_case": med["decrypt"] / batch,
            "plain_ms_per_case": med["plain"] / batch,
            "ratio_he_branch_vs_plain": med["worker"] / med["plain"], "ratio_e2e_vs_plain": med["e2e"] / med["plain"],
            "bytes_per_case_raw": wire_raw / batch, "bytes_per_case_json": wire_json / batch,
            "pack_ms_median": med, "runs": runs}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    net, model = he.random_model(seed=5)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp)
        keys = HeKeys(home, keyring.init(home / "keys" / "keyring.json"))
        t0 = time.perf_counter()
        key_id = keys.generate(he.HeParams())
        keygen_ms = _ms(t0)
        pub = (keys.public_dir / f"{key_id}.ctx").stat().st_size
        worker = HeWorker.for_home(model, home)
        loads = []
        for _ in range(3):
            w = HeWorker.for_home(model, home)
            w.keys.get(key_id)
            loads.append(w.keys.load_seconds[key_id] * 1000)
        t1 = time.perf_counter()
        for _ in range(1000):
            worker.keys.get(key_id) if worker.keys.load_seconds else worker.keys.get(key_id)
        cached_us = _ms(t1)  # 1000 lookups in ms == microseconds per lookup
        results = [bench_batch(keys, worker, net, model, int(b), args.runs) for b in args.batches.split(",")]
    report = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cpus": os.cpu_count(),
              "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
              "params": he.HeParams().to_dict(), "model": "random init PatientNet tiny (HE math; same shapes as trained)",
              "keygen_ms": keygen_ms, "public_context_bytes": pub, "public_context_load_ms_cold_median": statistics.median(loads),
              "public_context_cached_lookup_us": cached_us, "batches": results}
    text = json.dumps(report, indent=2)
    sys.stdout.write(text + "\n")
    if args.json:
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
