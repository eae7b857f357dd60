"""Training one patient network on cached arrays (``synthdata.build_chunks`` / ``workers.training``).

Fixed seeds; cross-entropy with class weights (inverse frequency by default) for the EDSS bins, optionally
through the ordinal parametrisation of ``fusion.OrdinalGatedFusion``; smooth-L1 EDSS regression; BCE for
MS vs cSVD; Poisson NLL for the Rim+ count (QSM-present studies only); NaN labels (store data) drop their
term; modality dropout (QSM 25 %, T1 25 %, single EHR features 10 %, the whole EHR 15 %); left-right
flips; early stopping on the validation loss; AMP on CUDA; rich progress bars. Ensembles, folds and
calibration: ``ensemble.py``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray
from rich.progress import Progress
from torch.nn import functional as F

from msgate.model.features import FEATURES
from msgate.model.patient.ehr import EhrScaler, columns
from msgate.model.patient.fusion import OrdinalGatedFusion
from msgate.model.patient.network import Mode, PatientNet
from msgate.model.patient.presets import Preset

log = logging.getLogger(__name__)
RIM_FEATURE = 6  # index of "rim_log" in LESION_FEATURES


@dataclass
class Data:
    """Arrays of one split (numpy, CPU)."""

    image: NDArray[np.float16]
    present: NDArray[np.float32]
    lesion: NDArray[np.float32]
    ehr_x: NDArray[np.float32]
    ehr_m: NDArray[np.float32]
    edss: NDArray[np.float32]
    edss_class: NDArray[np.int64]
    ms: NDArray[np.float32]
    n_rim: NDArray[np.float32]
    index: NDArray[np.int64]
    group: NDArray[np.int64]  # patient (split unit): the subject index in a synthetic cache

    def __len__(self) -> int:
        return int(self.edss.shape[0])

    def subset(self, idx: NDArray[np.int64]) -> Data:
        """Rows ``idx`` of every array."""
        return Data(**{k: v[idx] for k, v in self.__dict__.items()})


def cache_files(path: Path) -> list[Path]:
    """``path`` itself, or the sorted ``*.npz`` files of a directory / glob pattern."""
    if path.is_file():
        return [path]
    files = sorted(path.glob("*.npz")) if path.is_dir() else sorted(path.parent.glob(path.name))
    if not files:
        raise FileNotFoundError(f"no cache files (*.npz) at {path}")
    return files


SCALAR_KEYS = ("seed", "lesion_source", "lesion_checkpoint", "generator")
LESION_ONLY_KEYS = ("rim_patches", "rim_row", "rim_prob")  # per lesion, not per patient: not loaded


def load_data(path: Path) -> tuple[Data, dict[str, NDArray[Any]]]:
    """Cache file(s) as :class:`Data` plus the raw arrays (truth for the reference baseline)."""
    parts = []
    for p in cache_files(path):
        with np.load(p) as f:
            parts.append({k: f[k] for k in f.files if k not in LESION_ONLY_KEYS})
    z = {k: np.concatenate([p[k] for p in parts]) for k in parts[0] if k not in SCALAR_KEYS}
    z["lesion_source"] = np.asarray(str(parts[0].get("lesion_source", "heuristic")))
    cks = sorted({str(p.get("lesion_checkpoint", "")) for p in parts})
    if len(cks) > 1:
        raise ValueError(f"cache files at {path} come from different lesion checkpoints {cks}; rebuild or refresh them")
    z["lesion_checkpoint"] = np.asarray(cks[0])
    gens = sorted({str(p["generator"]) for p in parts if "generator" in p})
    if len(gens) > 1:
        raise ValueError(f"cache files at {path} come from different synthetic generator versions {gens}")
    z["generator"] = np.asarray(gens[0] if gens else "")
    z["seeds"] = np.unique([int(p["seed"]) for p in parts])
    return data_from_arrays(z), z


def split(n: int, val_fraction: float, seed: int, groups: NDArray[np.int64] | None = None
          ) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
    """Patient-level split: whole groups (patients) go to validation; without ``groups`` every row is
    its own patient (the synthetic cache), which reproduces the earlier row-level permutation."""
    if groups is None:
        perm = np.random.default_rng(seed).permutation(n)
        n_val = max(1, int(round(n * val_fraction)))
        return np.sort(perm[n_val:]), np.sort(perm[:n_val])
    uniq = np.unique(groups)
    perm = np.random.default_rng(seed).permutation(len(uniq))
    val_groups = uniq[perm[:max(1, int(round(len(uniq) * val_fraction)))]]
    is_val = np.isin(groups, val_groups)
    return np.flatnonzero(~is_val), np.flatnonzero(is_val)


def _feature_groups() -> list[NDArray[np.int64]]:
    cols = columns()
    return [np.asarray([j for j, (name, _) in enumerate(cols) if name == f.name]) for f in FEATURES]


def batch_tensors(d: Data, idx: NDArray[np.int64], scaler: EhrScaler, device: torch.device,
                  rng: np.random.Generator | None = None) -> dict[str, torch.Tensor]:
    """Model inputs and targets of rows ``idx``; with ``rng``: modality dropout and flips."""
    img = d.image[idx].astype(np.float32)
    present = d.present[idx].copy()
    lesion = d.lesion[idx].copy()
    m = d.ehr_m[idx].copy()
    if rng is not None:
        n = len(idx)
        drop_q = rng.random(n) < 0.25
        drop_t = rng.random(n) < 0.25
        img[drop_q, 1] = 0.0
        present[drop_q, 0] = 0.0
        lesion[drop_q, RIM_FEATURE] = 0.0
        img[drop_t, 2] = 0.0
        present[drop_t, 1] = 0.0
        for g in _feature_groups():
            m[np.ix_(rng.random(n) < 0.1, g)] = 0.0
        m[rng.random(n) < 0.15] = 0.0
        flip = rng.random(n) < 0.5
        img[flip] = img[flip][:, :, ::-1]
    ehr = scaler.transform(d.ehr_x[idx], m)
    t = {"image": img, "present": present, "lesion": lesion, "ehr": ehr, "edss": d.edss[idx],
         "edss_class": d.edss_class[idx], "ms": d.ms[idx], "n_rim": d.n_rim[idx]}
    return {k: torch.as_tensor(np.ascontiguousarray(v)).to(device) for k, v in t.items()}


def _masked_mean(v: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return (v * w).sum() / w.sum().clamp(min=1.0)


def loss_fn(out: dict[str, torch.Tensor], b: dict[str, torch.Tensor], class_w: torch.Tensor) -> torch.Tensor:
    """Weighted CE + 0.3 smooth-L1 (EDSS) + 0.5 BCE (MS) + 0.2 Poisson (Rim+, QSM present).
    A NaN MS or Rim+ label (studies from the store carry neither) drops that term for the row."""
    ce = F.cross_entropy(out["edss_logits"].float(), b["edss_class"], weight=class_w)
    reg = F.smooth_l1_loss(out["edss"].float(), b["edss"])
    has_ms = torch.isfinite(b["ms"]).float()
    bce = _masked_mean(F.binary_cross_entropy_with_logits(
        out["ms_logit"].float(), torch.nan_to_num(b["ms"]), reduction="none"), has_ms)
    has_rim = b["present"][:, 0] * torch.isfinite(b["n_rim"]).float()
    pois = F.poisson_nll_loss(out["rim_log_rate"].float(), torch.nan_to_num(b["n_rim"]), log_input=True,
                              reduction="none")
    return ce + 0.3 * reg + 0.5 * bce + 0.2 * _masked_mean(pois, has_rim)


@torch.no_grad()
def infer(net: PatientNet, d: Data, scaler: EhrScaler, device: torch.device, batch: int = 32,
          modality: dict[str, bool] | None = None) -> dict[str, NDArray[np.float32]]:
    """Raw outputs on a split in eval mode; ``modality`` can blank QSM / T1 / EHR (ablation)."""
    net.eval()
    keep = {"qsm": True, "t1": True, "ehr": True, **(modality or {})}
    outs: dict[str, list[NDArray[np.float32]]] = {}
    for s in range(0, len(d), batch):
        idx = np.arange(s, min(s + batch, len(d)))
        b = batch_tensors(d, idx, scaler, device)
        if not keep["qsm"]:
            b["image"][:, 1] = 0
            b["present"][:, 0] = 0
            b["lesion"][:, RIM_FEATURE] = 0
        if not keep["t1"]:
            b["image"][:, 2] = 0
            b["present"][:, 1] = 0
        if not keep["ehr"]:
            b["ehr"] = torch.as_tensor(scaler.transform(d.ehr_x[idx], np.zeros_like(d.ehr_m[idx]))).to(device)
        out = net(b["image"], b["present"], b["lesion"], b["ehr"])
        for k in ("edss_logits", "edss", "ms_logit", "rim_log_rate"):
            outs.setdefault(k, []).append(out[k].float().cpu().numpy())
    return {k: np.concatenate(v) for k, v in outs.items()}


def infer_ensemble(nets: list[PatientNet], d: Data, scaler: EhrScaler,
                   modality: dict[str, bool] | None = None) -> dict[str, NDArray[np.float32]]:
    """Member outputs averaged (logits, EDSS estimate, Rim+ log-rate), as ``predict`` does."""
    outs = [infer(n, d, scaler, torch.device("cpu"), modality=modality) for n in nets]
    return {k: np.mean([o[k] for o in outs], axis=0) for k in outs[0]}


def _class_weights(y: NDArray[np.int64], k: int, kind: str = "balanced") -> torch.Tensor:
    """Per-bin loss weights: ``balanced`` (inverse frequency, as the random-forest baseline), ``sqrt``
    (its square root) or ``none``."""
    cnt = np.bincount(y, minlength=k).astype(np.float64) + 1.0
    w = {"balanced": cnt.sum() / cnt, "sqrt": np.sqrt(cnt.sum() / cnt), "none": np.ones(k)}[kind]
    return torch.as_tensor(w / w.mean(), dtype=torch.float32)


def fit(preset: Preset, train: Data, val: Data, scaler: EhrScaler, mode: Mode = "multimodal",
        seed: int = 0, device: torch.device | None = None, label: str = "",
        init: dict[str, torch.Tensor] | None = None, head: str = "free",
        class_weight: str = "balanced") -> tuple[PatientNet, dict[str, Any]]:
    """Train one network with early stopping (from ``init`` weights when given); returns the best
    network and a history dict. ``head`` ``ordinal`` / ``quadratic`` trains the EDSS bins through
    :class:`OrdinalGatedFusion` and folds it back into the plain fusion at the end (same outputs)."""
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    net = PatientNet(preset, mode)
    if init is not None:
        net.load_state_dict(init)
    elif head != "free":
        net.fusion = OrdinalGatedFusion(preset.hidden, preset.ehr_embed, quadratic=head == "quadratic")  # type: ignore[assignment]
    net = net.to(device)
    opt = torch.optim.AdamW(net.parameters(), lr=preset.lr, weight_decay=1e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=preset.epochs)
    class_w = _class_weights(train.edss_class, 4, class_weight).to(device)
    scaler_amp = torch.amp.GradScaler("cuda", enabled=device.type == "cuda")
    best, best_state, bad, hist = float("inf"), None, 0, []
    t0 = time.time()
    with Progress(transient=False) as prog:
        task = prog.add_task(f"train {label or mode}", total=preset.epochs)
        for epoch in range(preset.epochs):
            net.train()
            perm = rng.permutation(len(train))
            for s in range(0, len(perm) - 1, preset.batch_size):
                b = batch_tensors(train, perm[s:s + preset.batch_size], scaler, device, rng)
                with torch.autocast(device.type, enabled=device.type == "cuda"):
                    out = net(b["image"], b["present"], b["lesion"], b["ehr"])
                    loss = loss_fn(out, b, class_w)
                opt.zero_grad(set_to_none=True)
                scaler_amp.scale(loss).backward()
                scaler_amp.step(opt)
                scaler_amp.update()
            sched.step()
            vl = _val_loss(net, val, scaler, device, class_w)
            hist.append({"epoch": epoch, "val_loss": vl, "seconds": round(time.time() - t0, 1)})
            prog.update(task, advance=1, description=f"train {label or mode} val {vl:.3f}")
            if vl < best - 1e-4:
                best, bad = vl, 0
                best_state = {k: v.detach().clone() for k, v in net.state_dict().items()}
            else:
                bad += 1
                if bad >= preset.patience:
                    break
    if best_state is not None:
        net.load_state_dict(best_state)
    if isinstance(net.fusion, OrdinalGatedFusion):
        net.fusion = net.fusion.materialize()  # type: ignore[assignment]
    net.eval()
    return net, {"history": hist, "best_val_loss": best, "train_seconds": round(time.time() - t0, 1)}


@torch.no_grad()
def _val_loss(net: PatientNet, val: Data, scaler: EhrScaler, device: torch.device, class_w: torch.Tensor) -> float:
    net.eval()
    total = 0.0
    for s in range(0, len(val), 64):
        idx = np.arange(s, min(s + 64, len(val)))
        b = batch_tensors(val, idx, scaler, device)
        total += float(loss_fn(net(b["image"], b["present"], b["lesion"], b["ehr"]), b, class_w)) * len(idx)
    return total / len(val)


def data_from_arrays(z: dict[str, NDArray[Any]]) -> Data:
    """:class:`Data` from cache-layout arrays (``synthdata.stack_rows`` / one loaded cache)."""
    return Data(z["image"], z["present"].astype(np.float32), z["lesion"].astype(np.float32),
                z["ehr_x"].astype(np.float32), z["ehr_m"].astype(np.float32), z["edss"].astype(np.float32),
                z["edss_class"].astype(np.int64), z["ms"].astype(np.float32), z["n_rim"].astype(np.float32),
                z["index"].astype(np.int64), np.asarray(z.get("group", z["index"])).astype(np.int64))


def synthetic_note(raw: dict[str, NDArray[Any]], n: int, n_train: int, n_val: int) -> str:
    """The checkpoint's training-data description for a synthetic cache."""
    return (f"synthetic cohort (msgate.model.synth {raw.get('generator', '')}, 2 mm, missing_rate 0.1) seed(s) "
            f"{raw['seeds'].tolist()}, {n} patients split by patient into {n_train} train / {n_val} validation; "
            f"lesion source {raw['lesion_source']} {raw.get('lesion_checkpoint', '')}".replace("  ", " "))
