"""Encrypted, fsynced blob write vs a plain fsynced file write of the same bytes, in the same run.

Both sides use the same durable protocol (temp file, write, fsync, rename, fsync of the folder), so the
ratio isolates what envelope encryption costs. The encrypted side is ``Blobs.write_record`` (what the
ingest paths call: fresh data key, wrapped, chunked AES-GCM, durable write; the index row it returns is
a plain record, as the batch indexer inserts it). Sizes 0.5 MB and 50 MB; repetitions are interleaved
write by write (plain, encrypted, plain, ...). Each run reports each side's median MB/s over its writes and,
as its ratio, the median of the per-pair ratios (plain time / encrypted time); the report gives the median of
the runs.

    python bench/storage.py [--runs 5] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

from msgate.storage import keyring
from msgate.storage.blobs import Blobs, LocalBodies, fsync_dir
from msgate.storage.db import Database

SIZES = {"0.5MB": 512 * 1024, "50MB": 50 * 1024 * 1024}
WRITES = {"0.5MB": 200, "50MB": 6}


def plain_write(root: Path, name: str, data: bytes) -> None:
    folder = root / name[:2]
    folder.mkdir(exist_ok=True)
    tmp, target = folder / f".{name}.tmp", folder / name
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    view = memoryview(data)
    while view:  # 1 MiB writes, as the blob store writes its chunks
        view = view[os.write(fd, view[: 1 << 20]):]
    os.fsync(fd)
    os.close(fd)
    os.replace(tmp, target)
    fsync_dir(folder)


def one_run(size_name: str, work: Path, blobs: Blobs) -> tuple[float, float, float]:
    """One run: each side's median MB/s over its writes, and the median of the per-pair ratios.

    Writes alternate plain/encrypted in pairs, in alternating order, so both writes of a pair see the same
    period of disk latency; the fsync latency on this VM jumps between a fast and a slow mode from write
    to write, and a pair ratio compares like with like far more often than two separate medians do."""
    data = os.urandom(SIZES[size_name])
    plain_root = work / "plain"
    plain_root.mkdir(exist_ok=True)
    plain_s: list[float] = []
    enc_s: list[float] = []
    for i in range(WRITES[size_name]):
        for side in ((0, 1) if i % 2 == 0 else (1, 0)):
            start = time.perf_counter()
            if side == 0:
                plain_write(plain_root, f"{os.urandom(8).hex()}", data)
                plain_s.append(time.perf_counter() - start)
            else:
                blobs.write_record(None, kind="dicom", source=data)  # type: ignore[arg-type]
                enc_s.append(time.perf_counter() - start)
    mb = len(data) / 1e6
    pair_ratio = statistics.median(p / e for p, e in zip(plain_s, enc_s, strict=True))
    return mb / statistics.median(plain_s), mb / statistics.median(enc_s), pair_ratio


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    results: dict[str, dict[str, object]] = {}
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR")) as tmp:
        work = Path(tmp)
        blobs = Blobs(db=Database(f"sqlite:///{work}/idx.db"), ring=keyring.generate(),
                      bodies=LocalBodies(work / "blobs"))
        for size_name in SIZES:
            plain, enc, ratios = [], [], []
            for _ in range(args.runs):
                p, e, r = one_run(size_name, work, blobs)
                plain.append(p)
                enc.append(e)
                ratios.append(r)
            results[size_name] = {
                "plain_MBps": round(statistics.median(plain), 1), "encrypted_MBps": round(statistics.median(enc), 1),
                "ratio_median": round(statistics.median(ratios), 3), "ratios": [round(r, 3) for r in ratios],
            }
            print(f"{size_name:>6}: plain {results[size_name]['plain_MBps']:>8} MB/s  encrypted "
                  f"{results[size_name]['encrypted_MBps']:>8} MB/s  ratio {results[size_name]['ratio_median']} "
                  f"(per run {results[size_name]['ratios']})")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
