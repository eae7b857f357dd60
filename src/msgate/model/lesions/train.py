"""Training of the lesion model from the synthetic cohort, from scratch, one command.

1. Segmenter: UNet on random patches (2/3 centred on lesion voxels), Dice + focal loss.
2. Location MLP on anatomical features of the ground-truth lesions.
3. Rim+: cross-modal contrastive pretraining (QSM view vs FLAIR view of the same lesion, MONAI
   ``ContrastiveLoss``) on unlabelled lesion patches, then supervised fine-tuning with focal loss
   + a supervised contrastive term. Ablations trained with the same recipe: no pretraining, and
   channel stacking. All variants ship in the checkpoint; ``asymmetric`` is the one used.
   This is the Rim+ recipe of training code 0.1.0 (the shipped checkpoint) and stays the default;
   ``rim_recipe="0.2.0"`` trains the Rim+ part with ``rimfit`` / ``rimtrain`` instead.

Every step is seeded; metrics go to a JSONL log (one object per line, ``stage`` + numbers).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.losses import ContrastiveLoss, DiceFocalLoss, FocalLoss
from numpy.typing import NDArray
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from scipy import ndimage

from msgate.model.lesions.data import SynthCase, load_synth_folder, synth_case
from msgate.model.lesions.grid import WorkGrid
from msgate.model.lesions.location import anatomy_maps, fit_location, lesion_features
from msgate.model.lesions.model import LesionModel, build_model
from msgate.model.lesions.patches import crop, lesion_patches
from msgate.model.lesions.presets import Preset, with_rim_recipe
from msgate.model.lesions.rims import AsymmetricRimNet, build_rim_net, supcon_loss
from msgate.model.lesions.segment import prepare
from msgate.model.types import LESION_LOCATIONS

VERSION = "0.1.0"
VARIANTS = ("asymmetric", "asymmetric_nopretrain", "stacked")


def work_truth(case: SynthCase, grid: WorkGrid) -> NDArray[np.int32]:
    """Ground-truth label map moved onto the working grid (c, r, k), nearest neighbour."""
    from msgate.model.lesions.grid import _resample

    arr = np.ascontiguousarray(case.labels.transpose(2, 1, 0)).astype(np.int32)
    src = grid.src_affine if case.labels_affine is None else case.labels_affine
    return _resample(arr, src, grid.affine, grid.shape, order=0).astype(np.int32)


class Logger:
    """JSONL metrics log plus a rich progress display."""

    def __init__(self, path: Path | None, quiet: bool = False) -> None:
        self.path, self.t0 = path, time.time()
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("")
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                                 TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                                 disable=quiet)

    def log(self, stage: str, **values: Any) -> None:
        if self.path is not None:
            rec = {"stage": stage, "t_s": round(time.time() - self.t0, 2), **values}
            with open(self.path, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(rec, sort_keys=True) + "\n")

    def track(self, it: Iterator[Any] | range, total: int, desc: str) -> Iterator[tuple[Any, Callable[[str], None]]]:
        task = self.progress.add_task(desc, total=total, info="")
        for x in it:
            yield x, (lambda s, t=task: self.progress.update(t, info=s))
            self.progress.advance(task)


@dataclass
class Cohort:
    """Prepared arrays of a synthetic cohort on the working grid."""

    x: list[NDArray[np.float16]]  # (3, c, r, k): FLAIR, T1, QSM
    y: list[NDArray[np.int32]]
    cases: list[SynthCase]
    grids: list[WorkGrid]


def make_cohort(preset: Preset, seed: int, n: int, log: Logger, desc: str, rim_enrich: float | None = None,
                mix: dict[str, float] | None = None, protocol: str = "3d", data: Path | None = None) -> Cohort:
    """Simulate ``n`` subjects of cohort ``seed`` (or read the first ``n`` of a ``msgate synth`` folder) and prepare them."""
    co = Cohort([], [], [], [])
    source = load_synth_folder(data, n) if data is not None else None
    for i, _ in log.track(range(1, n + 1), n, desc):
        if source is not None:
            case = next(source, None)
            if case is None:
                break
        else:
            case = synth_case(seed, i, resolution=preset.synth_resolution, protocol=protocol, mix=mix,
                              rim_enrich=rim_enrich)
        grid, arr = prepare(case.volumes, preset)
        stack = [arr["FLAIR"], arr.get("T1", np.zeros_like(arr["FLAIR"])), arr.get("QSM", np.zeros_like(arr["FLAIR"]))]
        co.x.append(np.stack(stack).astype(np.float16))
        co.y.append(work_truth(case, grid))
        co.cases.append(case)
        co.grids.append(grid)
    return co


def _seg_batch(co: Cohort, preset: Preset, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    p = preset.seg_patch
    xs, ys = [], []
    for _ in range(preset.seg_batch):
        j = int(rng.integers(len(co.x)))
        x, y = co.x[j], co.y[j]
        fg = np.argwhere(y > 0) if rng.random() < 0.67 else np.empty((0, 3))
        if fg.size:
            c = fg[int(rng.integers(len(fg)))] + rng.integers(-p // 4, p // 4 + 1, size=3)
        else:
            c = np.array([rng.integers(p // 2, max(p // 2 + 1, s - p // 2)) for s in y.shape])
        xp = np.stack([crop(x[ch].astype(np.float32), c, p) for ch in range(2)])
        yp = crop((y > 0).astype(np.float32), c, p)[None]
        if rng.random() < 0.3:
            xp[1] = 0.0  # T1 absent
        xp *= np.float32(rng.uniform(0.9, 1.1))
        if rng.random() < 0.5:
            xp, yp = xp[:, ::-1], yp[:, ::-1]
        xs.append(np.ascontiguousarray(xp))
        ys.append(np.ascontiguousarray(yp))
    return torch.from_numpy(np.stack(xs)), torch.from_numpy(np.stack(ys))


def train_segmenter(model: LesionModel, co: Cohort, seed: int, log: Logger) -> None:
    """Dice + focal loss on random patches; Adam with cosine decay."""
    preset, net = model.preset, model.seg
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    net.train()
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, preset.seg_steps)
    loss_fn = DiceFocalLoss(sigmoid=True, batch=True, gamma=2.0, lambda_dice=1.0, lambda_focal=1.0)
    run = 0.0
    for step, info in log.track(range(preset.seg_steps), preset.seg_steps, "segmenter"):
        x, y = _seg_batch(co, preset, rng)
        opt.zero_grad()
        loss = loss_fn(net(x.to(model.device)), y.to(model.device))
        loss.backward()
        opt.step()
        sched.step()
        run = 0.95 * run + 0.05 * loss.item() if step else loss.item()
        if step % 50 == 0 or step == preset.seg_steps - 1:
            info(f"loss {run:.3f}")
            log.log("segmenter", step=step, loss=round(run, 5), lr=sched.get_last_lr()[0])
    net.eval()


def lesion_table(co: Cohort) -> tuple[NDArray[np.float32], NDArray[np.int64], list[tuple[int, int]]]:
    """Location features of every ground-truth lesion (on the working grid) and their classes."""
    feats, ys, where = [], [], []
    for j, (x, y, case, grid) in enumerate(zip(co.x, co.y, co.cases, co.grids)):
        flair = x[0].astype(np.float32)
        maps = anatomy_maps(flair, grid.affine)
        for les in case.lesions:
            comp = y == les.id
            if comp.any():
                feats.append(lesion_features(comp, flair, maps, grid.affine))
                ys.append(LESION_LOCATIONS.index(les.location))
                where.append((j, les.id))
    return np.stack(feats), np.asarray(ys, np.int64), where


def rim_set(co: Cohort, size: int) -> tuple[NDArray[np.float32], NDArray[np.float32], NDArray[np.int64]]:
    """Ground-truth lesion patches (N, 2, s, s, s), Rim+ labels, subject index."""
    xs, ys, subj = [], [], []
    for j, (x, y, case) in enumerate(zip(co.x, co.y, co.cases)):
        ids = [les.id for les in case.lesions if (y == les.id).any()]
        if not ids:
            continue
        cents = ndimage.center_of_mass(np.ones(y.shape), y, index=ids)
        xs.append(lesion_patches(x[2].astype(np.float32), x[0].astype(np.float32), [np.asarray(c) for c in cents], size))
        rim = {les.id: les.rim for les in case.lesions}
        ys += [float(rim[i]) for i in ids]
        subj += [j] * len(ids)
    return np.concatenate(xs), np.asarray(ys, np.float32), np.asarray(subj, np.int64)


def augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random flips (per batch), +-1 voxel shifts and a small intensity jitter."""
    for d in (2, 3, 4):
        if torch.rand(1, generator=g) < 0.5:
            x = x.flip(d)
    s = [int(v) for v in torch.randint(-1, 2, (3,), generator=g)]
    x = torch.roll(x, shifts=s, dims=(2, 3, 4))
    return x * (1.0 + 0.1 * (torch.rand(x.shape[0], 2, 1, 1, 1, generator=g) - 0.5))


def pretrain(net: AsymmetricRimNet, patches: NDArray[np.float32], preset: Preset, seed: int, log: Logger) -> None:
    """Cross-modal contrastive pretraining: QSM and FLAIR views of one lesion are the positive pair."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    loss_fn = ContrastiveLoss(temperature=0.2)
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    data = torch.from_numpy(patches)
    dev = next(net.parameters()).device
    net.train()
    for ep, info in log.track(range(preset.pretrain_epochs), preset.pretrain_epochs, "rim pretrain"):
        perm, tot, nb = torch.randperm(len(data), generator=g), 0.0, 0
        for b in range(0, len(data) - 1, preset.rim_batch):
            idx = perm[b:b + preset.rim_batch]
            if len(idx) < 2:
                continue
            zq, zf = net.embed_modalities(augment(data[idx], g).to(dev))
            loss = loss_fn(zq, zf)
            opt.zero_grad()
            loss.backward()
            opt.step()
            tot, nb = tot + loss.item(), nb + 1
        info(f"loss {tot / max(nb, 1):.3f}")
        log.log("rim_pretrain", epoch=ep, loss=round(tot / max(nb, 1), 5))


def finetune(net: torch.nn.Module, x: NDArray[np.float32], y: NDArray[np.float32], preset: Preset, seed: int,
             log: Logger, name: str) -> None:
    """Focal loss + 0.2 x supervised contrastive, class-balanced batches (Rim+ oversampled to 1/3)."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    focal = FocalLoss(gamma=2.0, alpha=0.75, use_softmax=False)
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, preset.finetune_epochs)
    data, lab = torch.from_numpy(x), torch.from_numpy(y)
    w = torch.where(lab > 0.5, 0.5 / max(float(lab.sum()), 1.0), 0.5 / max(float((1 - lab).sum()), 1.0))
    n_batches = max(1, len(data) // preset.rim_batch)
    dev = next(net.parameters()).device
    for ep, info in log.track(range(preset.finetune_epochs), preset.finetune_epochs, f"rim {name}"):
        net.train()
        tot = 0.0
        for _ in range(n_batches):
            idx = torch.multinomial(w, preset.rim_batch, replacement=True, generator=g)
            logit, emb = net(augment(data[idx], g).to(dev))
            yb = lab[idx].to(dev)
            loss = focal(logit[:, None], yb[:, None]) + 0.2 * supcon_loss(net.proj_sup(emb), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
            tot += loss.item()
        sched.step()
        info(f"loss {tot / n_batches:.3f}")
        log.log(f"rim_{name}", epoch=ep, loss=round(tot / n_batches, 5))
    net.eval()


def fit_seg_and_location(model: LesionModel, seed: int, log: Logger, data: Path | None) -> float:
    """Train the segmenter and the location model on cohort ``seed`` (or ``data``); location train accuracy."""
    preset = model.preset
    seg_co = make_cohort(preset, seed, preset.seg_subjects, log, "simulate (seg)", data=data)
    train_segmenter(model, seg_co, seed, log)
    fx, fy, _ = lesion_table(seg_co)
    model.loc = fit_location(fx, fy, preset.loc_epochs, seed)
    with torch.no_grad():
        acc = float((model.loc(torch.from_numpy(fx)).argmax(1).numpy() == fy).mean())
    log.log("location", train_accuracy=round(acc, 4), n=len(fy))
    return acc


def train_lesion_model(preset: Preset, seed: int, log_path: Path | None = None, quiet: bool = False,
                       device: str = "cpu", data: Path | None = None, rim_recipe: str = VERSION) -> LesionModel:
    """Train every part from scratch on in-memory synthetic cohorts ``seed`` (segmentation) and ``seed + 1`` (Rim+).

    With ``data`` (a ``msgate synth`` folder), both parts train on its subjects instead (natural Rim+ prevalence).
    ``rim_recipe`` picks the Rim+ training code: ``"0.1.0"`` (default, the shipped checkpoint's recipe, unchanged)
    or ``"0.2.0"`` (``rimfit.train_rims``; Rim+ settings from :func:`presets.with_rim_recipe`).
    """
    if rim_recipe != VERSION:
        from msgate.model.lesions.rimfit import train_lesion_model_020

        return train_lesion_model_020(with_rim_recipe(preset, rim_recipe), seed, log_path, quiet, device, data)
    log = Logger(log_path, quiet)
    t0 = time.time()
    data_desc = (f"msgate synth folder {data.name}: first {preset.seg_subjects} subjects (segmenter), first "
                 f"{preset.rim_subjects} (Rim+)" if data is not None else
                 (f"synthetic cohort (msgate.model.synth), {preset.synth_resolution} mm template, 3D protocol: "
                 f"segmenter/location seed {seed}, subjects 1-{preset.seg_subjects}, mix ms=0.7 csvd=0.3; "
                 f"Rim+ seed {seed + 1}, subjects 1-{preset.rim_subjects}, mix ms=0.85 csvd=0.15, "
                 f"MS Rim+ probability enriched to {preset.rim_enrich}"))
    model = build_model(preset, {"version": VERSION, "preset": preset.name, "seed": seed, "training_data": data_desc,
                                 "intended_use": "research and integration testing only; not for clinical use"},
                        VARIANTS, device)
    with log.progress:
        acc = fit_seg_and_location(model, seed, log, data)
        rim_co = make_cohort(preset, seed + 1, preset.rim_subjects, log, "simulate (rim)",
                             rim_enrich=preset.rim_enrich, mix={"ms": 0.85, "csvd": 0.15}, data=data)
        rx, ry, _ = rim_set(rim_co, preset.rim_patch)
        del rim_co
        log.log("rim_data", n=len(ry), n_pos=int(ry.sum()))
        pre = model.rim["asymmetric"]
        assert isinstance(pre, AsymmetricRimNet)
        pretrain(pre, rx, preset, seed, log)
        finetune(pre, rx, ry, preset, seed, log, "asymmetric")
        for name in VARIANTS[1:]:
            net = build_rim_net("stacked" if name == "stacked" else "asymmetric", preset.rim_widths).to(device)
            finetune(net, rx, ry, preset, seed, log, name)
            model.rim[name] = net.eval()
    model.meta["train_seconds"] = round(time.time() - t0, 1)
    model.meta["location_train_accuracy"] = round(acc, 4)
    model.meta["rim_train_lesions"] = {"n": len(ry), "rim_positive": int(ry.sum())}
    log.log("done", seconds=model.meta["train_seconds"])
    for m in (model.seg, model.loc, *model.rim.values()):
        m.eval()
    return model
