"""Rim+ classifiers on lesion-centred QSM + FLAIR patches.

:class:`AsymmetricRimNet` follows the asymmetric QSM-FLAIR design (arXiv 2606.16756): QSM is the
primary stream; a lighter FLAIR stream produces, at every scale, a spatial FiLM (per-voxel,
per-channel ``gamma``, ``beta``) that modulates the QSM features. FLAIR says *where* the lesion and
its border are; QSM says whether the border is paramagnetic. With ``bounded=True`` (the design in use
since 0.2.0) the scale is ``1 + tanh(gamma)``, in (0, 2): FLAIR can gate QSM features on or off
locally but cannot amplify QSM noise without limit, as the first version's ``1 + gamma`` could.
:class:`StackedRimNet` is the ablation baseline: both modalities stacked as input channels.

Both return ``(logit, embedding)``; ``embed_modalities`` gives the unconditioned QSM and FLAIR
embeddings for cross-modal contrastive pretraining.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv3d(cin, cout, 3, padding=1), nn.BatchNorm3d(cout))


class AsymmetricRimNet(nn.Module):
    """QSM encoder conditioned on FLAIR through spatial FiLM at each of three scales.

    The defaults are the design; the other options (FLAIR context in the head, FiLM init, FLAIR width,
    FiLM before the batch norm, cross-attention at the last scale, FLAIR-guided attention pooling) are the
    validation sweep's variants."""

    def __init__(self, widths: tuple[int, int, int] = (16, 32, 48), proj_dim: int = 32, bounded: bool = False,
                 context: bool = False, film_zero: bool = True, flair_scale: float = 0.5,
                 pre_norm: bool = False, xattn_tokens: int = 0, attn_pool: bool = False) -> None:
        super().__init__()
        self.bounded, self.context, self.pre_norm = bounded, context, pre_norm
        fw = tuple(max(4, int(w * flair_scale)) for w in widths)
        emb_dim = 2 * widths[-1] + (2 * fw[-1] if context else 0)
        self.q_blocks = nn.ModuleList(_block(a, b) for a, b in zip((1,) + widths[:-1], widths))
        self.f_blocks = nn.ModuleList(_block(a, b) for a, b in zip((1,) + fw[:-1], fw))
        self.films = nn.ModuleList(nn.Conv3d(f, 2 * w, 1) for f, w in zip(fw, widths))
        for film in self.films if film_zero else ():
            nn.init.zeros_(film.weight)
            nn.init.zeros_(film.bias)
        self.attn: nn.Module | None = None
        if attn_pool:  # FLAIR says where to look: a spatial softmax over the last scale replaces QSM's mean pool
            self.attn = nn.Conv3d(fw[-1], 1, 1)
            nn.init.zeros_(self.attn.weight)  # starts as the mean pool, i.e. as the design
            nn.init.zeros_(self.attn.bias)
        self.xattn: nn.Module | None = None
        if xattn_tokens:  # QSM tokens of the last scale attend to FLAIR tokens (MONAI CrossAttentionBlock)
            from monai.networks.blocks import CrossAttentionBlock

            self.pos = nn.Parameter(torch.zeros(1, xattn_tokens, widths[-1]))
            self.pos_f = nn.Parameter(torch.zeros(1, xattn_tokens, fw[-1]))
            nn.init.normal_(self.pos, std=0.02)
            nn.init.normal_(self.pos_f, std=0.02)
            self.norm_q = nn.LayerNorm(widths[-1])
            self.xattn = CrossAttentionBlock(widths[-1], num_heads=4, context_input_size=fw[-1], qkv_bias=True)
            nn.init.zeros_(self.xattn.out_proj.weight)  # starts as the FiLM-only net
            nn.init.zeros_(self.xattn.out_proj.bias)
        self.head = nn.Sequential(nn.Linear(emb_dim, 32), nn.ReLU(), nn.Dropout(0.2), nn.Linear(32, 1))
        self.proj_q = nn.Sequential(nn.Linear(2 * widths[-1], 64), nn.ReLU(), nn.Linear(64, proj_dim))
        self.proj_f = nn.Sequential(nn.Linear(2 * fw[-1], 64), nn.ReLU(), nn.Linear(64, proj_dim))
        self.proj_sup = nn.Sequential(nn.Linear(emb_dim, 64), nn.ReLU(), nn.Linear(64, proj_dim))

    @staticmethod
    def _pool(h: torch.Tensor) -> torch.Tensor:
        return torch.cat([h.mean(dim=(2, 3, 4)), h.amax(dim=(2, 3, 4))], dim=1)

    def _streams(self, x: torch.Tensor, film: bool) -> tuple[torch.Tensor, torch.Tensor]:
        q, f = x[:, :1], x[:, 1:2]
        for i, (qb, fb, fm) in enumerate(zip(self.q_blocks, self.f_blocks, self.films)):
            if i:
                q, f = F.max_pool3d(q, 2), F.max_pool3d(f, 2)
            f = F.leaky_relu(fb(f), 0.1)
            q = qb[0](q) if self.pre_norm else qb(q)
            if film:
                gamma, beta = fm(f).chunk(2, dim=1)
                q = q * (1.0 + (torch.tanh(gamma) if self.bounded else gamma)) + beta
            if self.pre_norm:
                q = qb[1](q)
            q = F.leaky_relu(q, 0.1)
        if film and self.xattn is not None:
            if q[0, 0].numel() != self.pos.shape[1]:
                raise ValueError(f"cross-attention variant built for {self.pos.shape[1]} tokens, got {q[0, 0].numel()}")
            tq = q.flatten(2).transpose(1, 2) + self.pos
            tf = f.flatten(2).transpose(1, 2) + self.pos_f
            tq = tq + self.xattn(self.norm_q(tq), context=tf)
            q = tq.transpose(1, 2).reshape(q.shape)
        if film and self.attn is not None:
            w = torch.softmax(self.attn(f).flatten(2), dim=2)  # (n, 1, voxels)
            pooled = torch.cat([(q.flatten(2) * w).sum(2), q.amax(dim=(2, 3, 4))], dim=1)
            return pooled, self._pool(f)
        return self._pool(q), self._pool(f)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        emb, ctx = self._streams(x, film=True)
        if self.context:
            emb = torch.cat([emb, ctx], dim=1)
        return self.head(emb).squeeze(1), emb

    def embed_modalities(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Projected QSM (unconditioned) and FLAIR embeddings, for cross-modal pretraining."""
        q, f = self._streams(x, film=False)
        return self.proj_q(q), self.proj_f(f)


class StackedRimNet(nn.Module):
    """Ablation baseline: QSM and FLAIR as two input channels of one encoder."""

    def __init__(self, widths: tuple[int, int, int] = (16, 32, 48), proj_dim: int = 32) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(_block(a, b) for a, b in zip((2,) + widths[:-1], widths))
        self.head = nn.Sequential(nn.Linear(2 * widths[-1], 32), nn.ReLU(), nn.Dropout(0.2), nn.Linear(32, 1))
        self.proj_sup = nn.Sequential(nn.Linear(2 * widths[-1], 64), nn.ReLU(), nn.Linear(64, proj_dim))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = x
        for i, blk in enumerate(self.blocks):
            if i:
                h = F.max_pool3d(h, 2)
            h = F.leaky_relu(blk(h), 0.1)
        emb = AsymmetricRimNet._pool(h)
        return self.head(emb).squeeze(1), emb


_ASYMMETRIC: dict[str, dict[str, object]] = {  # architecture name: AsymmetricRimNet options
    "asymmetric_bounded": {"bounded": True},  # the design in use (training code 0.2.0)
    "asymmetric": {},  # first version (0.1.0): unbounded FiLM
    # Conditioning variants of the validation sweep (bench/RESULTS.md, "Conditioning variants"): none beat
    # channel stacking there, none is used by a checkpoint; kept so that the sweep can be rerun.
    "asymmetric_context": {"bounded": True, "context": True},  # + pooled FLAIR stream in the head
    "asymmetric_film_init": {"bounded": True, "film_zero": False},  # FiLM starts at PyTorch's default init
    "asymmetric_wide_flair": {"bounded": True, "flair_scale": 1.0},  # FLAIR stream as wide as the QSM one
    "asymmetric_pre_norm": {"bounded": True, "pre_norm": True},  # FiLM before the QSM batch norm
    "asymmetric_xattn": {"bounded": True, "xattn_tokens": 4 ** 3},  # + cross-attention (16^3 patches only)
    # 2026-12-07 sweep (larger validation cohort): full-width FLAIR stream whose last scale also chooses where
    # the QSM features are pooled (attention pooling, zero-initialised: starts as the mean pool)
    "asymmetric_attn_pool": {"bounded": True, "flair_scale": 1.0, "attn_pool": True},
}
ARCHS = (*_ASYMMETRIC, "stacked")


def build_rim_net(arch: str, widths: tuple[int, int, int]) -> nn.Module:
    """``asymmetric_bounded`` (in use), ``asymmetric`` (first version, unbounded FiLM), ``stacked`` (ablation)
    or one of the sweep's variants."""
    if arch in _ASYMMETRIC:
        return AsymmetricRimNet(widths, **_ASYMMETRIC[arch])  # type: ignore[arg-type]
    if arch == "stacked":
        return StackedRimNet(widths)
    raise ValueError(f'Argument "arch" must be one of {ARCHS}, got "{arch}".')


def supcon_loss(z: torch.Tensor, labels: torch.Tensor, temperature: float = 0.2) -> torch.Tensor:
    """Supervised contrastive loss (Khosla et al. 2020) on L2-normalised projections."""
    z = F.normalize(z, dim=1)
    sim = z @ z.T / temperature
    n = z.shape[0]
    eye = torch.eye(n, dtype=torch.bool, device=z.device)
    sim = sim.masked_fill(eye, -1e9)
    pos = (labels[:, None] == labels[None, :]) & ~eye
    log_prob = sim - torch.logsumexp(sim, dim=1, keepdim=True)
    n_pos = pos.sum(1)
    keep = n_pos > 0
    if not keep.any():
        return z.sum() * 0.0
    per = -(log_prob * pos).sum(1)[keep] / n_pos[keep]
    return per.mean()
