"""Training recipe of the Rim+ classifiers: one recipe for every variant, so the ablation is fair.

1. **Self-supervised pretraining** on unlabelled lesion patches (the labelled set's patches, labels unused,
   plus a larger unlabelled pool). Asymmetric nets: cross-modal NT-Xent between the QSM view
   (unconditioned QSM stream) and the FLAIR view of the same lesion, plus an intra-QSM NT-Xent between
   two augmented QSM views (so the QSM stream keeps what only QSM shows, such as a rim). Stacked nets:
   NT-Xent between two augmented views of the stacked input (SimCLR), through a throw-away projector.
2. **Supervised fine-tuning**: focal loss (gamma 2, alpha 0.75) + 0.2 x supervised contrastive loss,
   class-balanced batches, AdamW with cosine decay. A pretrained encoder may be fine-tuned at
   ``encoder_lr_scale`` x the head's learning rate (default 1: the same).

Augmentations keep the B0 axis (z) in place, because QSM streaks are oriented along it: flips on every
axis, x/y transposition, +-1 voxel shifts, intensity scaling and a little extra QSM noise.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from monai.losses import ContrastiveLoss, FocalLoss
from torch import nn

from msgate.model.lesions.presets import Preset
from msgate.model.lesions.rims import build_rim_net, supcon_loss

VARIANTS: dict[str, tuple[str, bool]] = {  # name: (architecture, pretrained)
    "asymmetric": ("asymmetric_bounded", True),  # the design: asymmetric + pretraining
    "asymmetric_nopretrain": ("asymmetric_bounded", False),
    "stacked": ("stacked", False),
    "stacked_pretrain": ("stacked", True),
    "asymmetric_v1_nopretrain": ("asymmetric", False),  # first version: unbounded FiLM
}
SWEEP: dict[str, tuple[str, bool]] = {  # conditioning variants compared on the validation split only
    **{f"{arch}_nopretrain": (arch, False)
       for arch in ("asymmetric_context", "asymmetric_film_init", "asymmetric_wide_flair", "asymmetric_pre_norm",
                    "asymmetric_xattn", "asymmetric_attn_pool")},
    "asymmetric_wide_flair": ("asymmetric_wide_flair", True),  # the closest of them, with pretraining
    "asymmetric_attn_pool": ("asymmetric_attn_pool", True),  # 2026-12-07: wide FLAIR + FLAIR-guided pooling
}
ALL_VARIANTS = {**VARIANTS, **SWEEP}

Log = Callable[[str, int, float], None]


@dataclass(frozen=True)
class RimRecipe:
    """Knobs of the recipe (the same for every variant)."""

    pretrain_epochs: int = 6
    finetune_epochs: int = 16
    batch: int = 64
    lr: float = 2e-3
    pretrain_lr: float = 2e-3
    encoder_lr_scale: float = 1.0  # 0.3 fine-tuned worse on validation (PR-AUC 0.53 vs 0.70)
    intra_weight: float = 1.0
    qsm_noise: float = 0.06  # max SD of extra QSM noise in augmentation (working units, ppm x 20)
    temperature: float = 0.2


def augment(x: torch.Tensor, g: torch.Generator, qsm_noise: float) -> torch.Tensor:
    """Per-sample flips and x/y transposition, a +-1 voxel shift, intensity scaling, extra QSM noise."""
    n = x.shape[0]
    for d in (2, 3, 4):
        m = (torch.rand(n, generator=g) < 0.5).view(n, 1, 1, 1, 1)
        x = torch.where(m, x.flip(d), x)
    m = (torch.rand(n, generator=g) < 0.5).view(n, 1, 1, 1, 1)
    x = torch.where(m, x.transpose(2, 3), x)
    s = [int(v) for v in torch.randint(-1, 2, (3,), generator=g)]
    x = torch.roll(x, shifts=s, dims=(2, 3, 4))
    x = x * (1.0 + 0.2 * (torch.rand(n, 2, 1, 1, 1, generator=g) - 0.5))
    sd = qsm_noise * torch.rand(n, 1, 1, 1, 1, generator=g)
    noise = torch.randn(x[:, :1].shape, generator=g) * sd
    return torch.cat([x[:, :1] + noise, x[:, 1:]], 1)


def pretrain(net: nn.Module, patches: np.ndarray, recipe: RimRecipe, seed: int, log: Log | None = None) -> None:
    """Self-supervised pretraining (see module doc); ``patches`` (N, 2, s, s, s), labels never seen."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    nt_xent = ContrastiveLoss(temperature=recipe.temperature)
    asym = hasattr(net, "embed_modalities")
    proj = None if asym else nn.Sequential(nn.Linear(net.head[0].in_features, 64), nn.ReLU(), nn.Linear(64, 32))
    params = list(net.parameters()) + ([] if proj is None else list(proj.parameters()))
    opt = torch.optim.Adam(params, lr=recipe.pretrain_lr)
    n_batches = len(patches) // recipe.batch
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, recipe.pretrain_epochs * n_batches))
    net.train()
    for ep in range(recipe.pretrain_epochs):
        perm, tot = torch.randperm(len(patches), generator=g), 0.0
        for b in range(n_batches):
            x = torch.from_numpy(patches[perm[b * recipe.batch:(b + 1) * recipe.batch].numpy()].astype(np.float32))
            v1, v2 = augment(x, g, recipe.qsm_noise), augment(x, g, recipe.qsm_noise)
            if asym:
                zq1, zf = net.embed_modalities(v1)  # type: ignore[operator]
                zq2, _ = net.embed_modalities(v2)  # type: ignore[operator]
                loss = nt_xent(zq1, zf) + recipe.intra_weight * nt_xent(zq1, zq2)
            else:
                assert proj is not None
                loss = nt_xent(proj(net(v1)[1]), proj(net(v2)[1]))
            tot += _step(opt, sched, loss)
        if log is not None:
            log("pretrain", ep, tot / max(n_batches, 1))


def _step(opt: torch.optim.Optimizer, sched: torch.optim.lr_scheduler.LRScheduler, loss: torch.Tensor) -> float:
    """One optimisation step (gradients, parameters, learning-rate schedule); the loss as a float."""
    opt.zero_grad()
    loss.backward()
    opt.step()
    sched.step()
    return float(loss.item())


def _param_groups(net: nn.Module, recipe: RimRecipe, pretrained: bool) -> list[dict[str, object]]:
    head = [p for n, p in net.named_parameters() if n.startswith(("head.", "proj_sup."))]
    ids = {id(p) for p in head}
    enc = [p for p in net.parameters() if id(p) not in ids]
    scale = recipe.encoder_lr_scale if pretrained else 1.0
    return [{"params": enc, "lr": recipe.lr * scale}, {"params": head, "lr": recipe.lr}]


def finetune(net: nn.Module, x: np.ndarray, y: np.ndarray, recipe: RimRecipe, seed: int, pretrained: bool,
             log: Log | None = None) -> None:
    """Focal + 0.2 x supervised contrastive loss, class-balanced batches (Rim+ drawn half of the time)."""
    g = torch.Generator().manual_seed(seed + 1)
    torch.manual_seed(seed + 1)
    focal = FocalLoss(gamma=2.0, alpha=0.75, use_softmax=False)
    opt = torch.optim.AdamW(_param_groups(net, recipe, pretrained), weight_decay=1e-4)
    lab = torch.from_numpy(y.astype(np.float32))
    w = torch.where(lab > 0.5, 0.5 / max(float(lab.sum()), 1.0), 0.5 / max(float((1 - lab).sum()), 1.0))
    n_batches = max(1, len(x) // recipe.batch)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, recipe.finetune_epochs * n_batches)
    for ep in range(recipe.finetune_epochs):
        net.train()
        tot = 0.0
        for _ in range(n_batches):
            idx = torch.multinomial(w, recipe.batch, replacement=True, generator=g)
            xb = augment(torch.from_numpy(x[idx.numpy()].astype(np.float32)), g, recipe.qsm_noise)
            logit, emb = net(xb)
            yb = lab[idx]
            loss = focal(logit[:, None], yb[:, None]) + 0.2 * supcon_loss(net.proj_sup(emb), yb)
            tot += _step(opt, sched, loss)
        if log is not None:
            log("finetune", ep, tot / n_batches)
    net.eval()


def train_variant(name: str, preset: Preset, labelled: object, pool: object | None, seed: int,
                  recipe: RimRecipe | None = None, log: Log | None = None) -> nn.Module:
    """Train variant ``name`` of :data:`VARIANTS` or :data:`SWEEP` from scratch; ``labelled``/``pool`` are
    ``PatchSet``-like."""
    arch, pre = ALL_VARIANTS[name]
    recipe = recipe or RimRecipe(pretrain_epochs=preset.pretrain_epochs, finetune_epochs=preset.finetune_epochs,
                                 batch=preset.rim_batch)
    torch.manual_seed(seed)
    net = build_rim_net(arch, preset.rim_widths)
    x, y = labelled.x, labelled.y  # type: ignore[attr-defined]
    if pre:
        unl = x if pool is None else np.concatenate([x, pool.x])  # type: ignore[attr-defined]
        pretrain(net, unl, recipe, seed, log)
    finetune(net, x, y, recipe, seed, pre, log)
    return net
