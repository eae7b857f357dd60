"""``python -m msgate.model.he evaluate``: the equivalence run without the CLI (same as ``msgate evaluate --he``)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from msgate.model.he.equivalence import compare, passed


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m msgate.model.he",
                                description="HE equivalence run: plaintext ensemble vs CKKS on synthetic cases")
    sub = p.add_subparsers(dest="cmd", required=True)
    ev = sub.add_parser("evaluate")
    ev.add_argument("--cases", type=int, default=None, help="cases (default: 200 generated; with --data the whole cache)")
    ev.add_argument("--batch", type=int, default=16)
    ev.add_argument("--checkpoint", default=None, help="patient checkpoint (default: the shipped one)")
    ev.add_argument("--data", type=Path, default=None, help="held-out cohort cache (.npz from build_cache)")
    ev.add_argument("--inputs", choices=("generator", "random"), default="generator")
    args = p.parse_args(argv)
    report = compare(checkpoint=args.checkpoint, n=args.cases, batch=args.batch, data=args.data, inputs=args.inputs)
    sys.stdout.write(json.dumps(report, indent=2) + "\n")
    return 0 if passed(report) else 1


if __name__ == "__main__":
    raise SystemExit(main())
