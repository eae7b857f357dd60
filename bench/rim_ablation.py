"""Rim+ ablation: asymmetric vs channel stacking, pretrained vs not, several training seeds, paired intervals.

    .venv/bin/python bench/rim_ablation.py data --out var/rim-ablation            # simulate + cache patch sets
    .venv/bin/python bench/rim_ablation.py run --out var/rim-ablation --seeds 0 1 2 --split test
    .venv/bin/python bench/rim_ablation.py report --out var/rim-ablation --split test
    .venv/bin/python bench/rim_ablation.py shipped --out var/rim-ablation --split test   # the 0.1.0 checkpoint

Every variant is trained with the Rim+ recipe of training code 0.2.0 (``presets.with_rim_recipe``,
``rimtrain``), whatever the shipped checkpoint's version is.
``data`` writes train / pool / val / test patch sets (see ``msgate.model.lesions.ablation``).
``run`` trains every variant of ``VARIANTS`` (or ``--variants``, which may also name the conditioning variants
of ``SWEEP``: compare those on ``--split val`` only) with each seed on the same data (the seed
sets network initialisation, batch order and augmentation; the training cohort is fixed by ``data``),
scores the chosen split and appends the logits to ``scores-<split>-<tag>.npz`` (one file per process;
``report`` reads them all), the weights to ``nets/<variant>#<seed>.pt`` and the wall time of each
training to ``times-<tag>.json``. ``report`` prints and writes ``results-<split>.json``:
per seed, and averaged over the seeds (``seed_mean_ci``: each variant's metric is the mean over its seeds,
differences are differences of those means), ROC/PR-AUC and differences with 95 % intervals (bootstrap over
subjects, paired: all variants and seeds share each resample); ``ensemble`` scores the seed-averaged
standardised logits as one model.
Run it under ``nice`` with one torch thread on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from msgate.model.lesions.ablation import PatchSet, paired_bootstrap, seed_mean_bootstrap, simulate_set
from msgate.model.lesions.presets import Preset, get_preset, with_rim_recipe

SETS = {  # name: (seed offset from the training seed or absolute test seed, first subject, n, enrich, mix)
    "train": (1, 1, 120, 0.35, {"ms": 0.85, "csvd": 0.15}),
    "val": (3, 1, 100, None, None),
    "val2": (5, 1, 300, None, None),  # a larger validation cohort (2026-12-07): val resolves only about +-0.04 PR-AUC
    "test": (1000, 1, 200, None, None),
    "pool": (1, 121, 360, None, {"ms": 0.85, "csvd": 0.15}),
}


def _preset(name: str) -> Preset:
    """The preset with the Rim+ settings of training code 0.2.0 (the recipe this bench compares variants under)."""
    return with_rim_recipe(get_preset(name), "0.2.0")


def _progress(name: str) -> object:
    t0 = time.time()

    def tick(i: int, n: int) -> None:
        if i % 20 == 0 or i == n:
            print(f"{name}: {i}/{n} subjects, {time.time() - t0:.0f} s", flush=True)
    return tick


def cmd_data(args: argparse.Namespace) -> None:
    preset = _preset(args.preset)
    for name in args.sets:
        off, first, n, enrich, mix = SETS[name]
        seed = off if name == "test" else args.train_seed + off
        path = args.out / f"{name}.npz"
        if path.exists():
            print(f"{name}: exists, skipped")
            continue
        ps = simulate_set(preset, seed, first, n, rim_enrich=enrich, mix=mix, progress=_progress(name))
        ps.save(path)
        print(f"{name}: seed {seed}, subjects {first}-{first + n - 1}: {len(ps.y)} lesions, {int(ps.y.sum())} Rim+",
              flush=True)


def cmd_run(args: argparse.Namespace) -> None:
    from msgate.model.lesions.rimtrain import ALL_VARIANTS, VARIANTS, train_variant

    torch.set_num_threads(args.threads)
    preset = _preset(args.preset)
    names = args.variants or list(VARIANTS)
    train = PatchSet.load(args.out / "train.npz")
    pool = None  # only the pretrained variants read the unlabelled pool; the others run without simulating it
    if any(ALL_VARIANTS[name][1] for name in names):
        pool = PatchSet.load(args.out / "pool.npz")
    ev = PatchSet.load(args.out / f"{args.split}.npz")
    path = args.out / f"scores-{args.split}-{args.tag}.npz"
    store = dict(np.load(path)) if path.exists() else {}
    nets = args.out / "nets"
    nets.mkdir(parents=True, exist_ok=True)
    times_path = args.out / f"times-{args.tag}.json"
    times = json.loads(times_path.read_text()) if times_path.exists() else {}
    for seed in args.seeds:
        for name in names:
            key = f"{name}#{seed}"
            if key in store and not args.force:
                continue
            t0 = time.time()
            net = train_variant(name, preset, train, pool, seed)
            torch.save(net.state_dict(), nets / f"{name}#{seed}.pt")
            store[key] = _logits(net, ev.x)
            np.savez(path, **store)
            times[key] = round(time.time() - t0, 1)
            times_path.write_text(json.dumps(times, indent=1) + "\n")
            print(f"{key}: {times[key]:.0f} s", flush=True)


@torch.no_grad()
def _logits(net: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    net.eval()
    out = [net(torch.from_numpy(x[i:i + 256].astype(np.float32)))[0] for i in range(0, len(x), 256)]
    return torch.cat(out).numpy()


def cmd_report(args: argparse.Namespace) -> None:
    ev = PatchSet.load(args.out / f"{args.split}.npz")
    store: dict[str, np.ndarray] = {}
    for f in sorted(args.out.glob(f"scores-{args.split}-*.npz")):
        store.update(dict(np.load(f)))
    names = sorted({k.split("#")[0] for k in store} & set(args.variants or {k.split("#")[0] for k in store}))
    seeds = sorted({int(k.split("#")[1]) for k in store})
    complete = [s for s in seeds if all(f"{n}#{s}" in store for n in names)]
    y = ev.y.astype(np.int64)
    pairs = [(a, b) for a, b in args.pairs if a in names and b in names]
    # seed ensemble = mean of standardised logits over the complete seeds (one score per variant)
    mean = {n: np.mean([_z(store[f"{n}#{s}"]) for s in complete], axis=0) for n in names}
    out = {"split": args.split, "lesions": len(y), "rim_positive": int(y.sum()),
           "subjects": len(np.unique(ev.subject)), "seeds": complete,
           "per_seed": {s: paired_bootstrap(y, ev.subject, {n: store[f"{n}#{s}"] for n in names}, pairs,
                                            args.boot, s) for s in complete},
           "seed_mean": _seed_mean(y, store, names, complete),
           "seed_mean_ci": seed_mean_bootstrap(y, ev.subject, {n: [store[f"{n}#{s}"] for s in complete] for n in names},
                                               pairs, args.boot, 2),
           "ensemble": paired_bootstrap(y, ev.subject, mean, pairs, args.boot, 1)}
    (args.out / f"results-{args.split}.json").write_text(json.dumps(out, indent=1, default=str) + "\n")
    json.dump({k: v for k, v in out.items() if k != "per_seed"}, sys.stdout, indent=1, default=str)
    print()


def cmd_shipped(args: argparse.Namespace) -> None:
    """Score the Rim+ variants of a trained checkpoint (default: the shipped one) on a split, paired intervals."""
    from msgate.model.lesions.model import load_lesion_model

    torch.set_num_threads(1)
    model = load_lesion_model(args.checkpoint)
    ev = PatchSet.load(args.out / f"{args.split}.npz")
    y = ev.y.astype(np.int64)
    scores = {n: _logits(net, ev.x) for n, net in model.rim.items()}
    pairs = [(a, b) for a, b in [("asymmetric", "stacked"), ("asymmetric", "asymmetric_nopretrain"),
                                 ("asymmetric_nopretrain", "stacked")] if a in scores and b in scores]
    out = {"checkpoint": str(args.checkpoint or "shipped"), "version": model.version, "split": args.split,
           "lesions": len(y), "rim_positive": int(y.sum()),
           "metrics": paired_bootstrap(y, ev.subject, scores, pairs, args.boot, 1)}
    (args.out / f"results-shipped-{args.split}.json").write_text(json.dumps(out, indent=1) + "\n")
    json.dump(out, sys.stdout, indent=1)
    print()


def _z(v: np.ndarray) -> np.ndarray:
    return (v - v.mean()) / max(float(v.std()), 1e-9)


def _seed_mean(y: np.ndarray, store: dict[str, np.ndarray], names: list[str], seeds: list[int]) -> dict[str, object]:
    from msgate.model.lesions.ablation import pr_roc

    res: dict[str, object] = {}
    for n in names:
        vals = np.array([pr_roc(y, store[f"{n}#{s}"]) for s in seeds])
        res[n] = {"roc_auc": [round(float(v), 4) for v in vals[:, 0]], "pr_auc": [round(float(v), 4) for v in vals[:, 1]],
                  "pr_auc_mean": round(float(vals[:, 1].mean()), 4), "pr_auc_sd": round(float(vals[:, 1].std(ddof=1)), 4)
                  if len(seeds) > 1 else None}
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("data", "run", "report", "shipped"):
        p = sub.add_parser(name)
        p.add_argument("--out", type=Path, default=Path("var/rim-ablation"))
        p.add_argument("--preset", default="tiny")
    sub.choices["data"].add_argument("--sets", nargs="+", default=list(SETS))
    sub.choices["data"].add_argument("--train-seed", type=int, default=0)
    sub.choices["run"].add_argument("--seeds", type=int, nargs="+", default=[0])
    sub.choices["run"].add_argument("--variants", nargs="*", default=None)
    sub.choices["run"].add_argument("--split", default="val")
    sub.choices["run"].add_argument("--threads", type=int, default=1)
    sub.choices["run"].add_argument("--force", action="store_true")
    sub.choices["run"].add_argument("--tag", default="0", help="scores file suffix (one per parallel process)")
    sub.choices["report"].add_argument("--split", default="val")
    sub.choices["report"].add_argument("--boot", type=int, default=1000)
    sub.choices["report"].add_argument("--variants", nargs="*", default=None, help="only these (default: all scored)")
    sub.choices["report"].add_argument("--pairs", nargs=2, action="append", metavar=("A", "B"), default=[
        ["asymmetric", "stacked"], ["asymmetric", "asymmetric_nopretrain"], ["asymmetric_nopretrain", "stacked"],
        ["asymmetric", "stacked_pretrain"],
        ["stacked_pretrain", "stacked"], ["asymmetric_nopretrain", "asymmetric_v1_nopretrain"]])
    sub.choices["shipped"].add_argument("--split", default="test")
    sub.choices["shipped"].add_argument("--boot", type=int, default=1000)
    sub.choices["shipped"].add_argument("--checkpoint", type=Path, default=None, help="default: the shipped one")
    args = ap.parse_args()
    {"data": cmd_data, "run": cmd_run, "report": cmd_report, "shipped": cmd_shipped}[args.cmd](args)


if __name__ == "__main__":
    main()
