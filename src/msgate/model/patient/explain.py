"""Explanations: MONAI Grad-CAM for the EDSS and diagnosis heads, exact EHR contributions.

EHR contributions. Given the image, every output is ``A(z) + W (g(z) * e(u))`` where ``u`` is the EHR
input ``[standardised values, mask]`` and ``e`` is a degree-2 polynomial of ``u``; so each output is a
quadratic function ``f`` of ``u``. For a quadratic, the path integral of integrated gradients from the
baseline ``u0 = 0`` (every feature missing) is exactly ``u * grad f(u / 2)`` (midpoint rule is exact
for linear integrands), and the per-column terms sum to ``f(u) - f(0)`` without approximation. A
feature's contribution is the sum over its value and mask columns (and its one-hot columns).
"""

from __future__ import annotations

import numpy as np
import torch
from monai.visualize import GradCAM
from numpy.typing import NDArray
from torch import nn

from msgate.model.features import FEATURES
from msgate.model.patient.ehr import columns
from msgate.model.patient.network import PatientNet


class _Head(nn.Module):
    """Image -> logits of one head, with the other inputs fixed (what GradCAM differentiates)."""

    def __init__(self, net: PatientNet, present: torch.Tensor, lesion: torch.Tensor, ehr: torch.Tensor,
                 head: str) -> None:
        super().__init__()
        self.net, self.head = net, head
        self.present, self.lesion, self.ehr = present, lesion, ehr

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        out = self.net(image, self.present, self.lesion, self.ehr)
        if self.head == "edss":
            return out["edss_logits"]
        ms = out["ms_logit"][:, None]
        return torch.cat([-ms, ms], dim=1)


def gradcam(net: PatientNet, image: torch.Tensor, present: torch.Tensor, lesion: torch.Tensor,
            ehr: torch.Tensor, head: str, layer: str, class_idx: int | None = None) -> NDArray[np.float32]:
    """Grad-CAM map ``[B, *grid]`` in [0, 1] for ``head`` ("edss" or "diagnosis") on the model grid."""
    out = []
    for i in range(image.shape[0]):  # one at a time: MONAI's normaliser scales over the whole batch
        wrapper = _Head(net, present[i:i + 1], lesion[i:i + 1], ehr[i:i + 1], head).eval()
        cam = GradCAM(nn_module=wrapper, target_layers=f"net.{layer}")
        with torch.enable_grad():
            maps = cam(x=image[i:i + 1].clone().requires_grad_(True), class_idx=class_idx)
        out.append(np.asarray(maps[0, 0].detach().cpu().numpy(), np.float32))
    return np.stack(out)


def _groups() -> list[tuple[str, list[int]]]:
    cols = columns()
    n = len(cols)
    return [(f.name, [j for j, (name, _) in enumerate(cols) if name == f.name]
             + [n + j for j, (name, _) in enumerate(cols) if name == f.name]) for f in FEATURES]


def ehr_contributions(net: PatientNet, z: torch.Tensor, ehr: torch.Tensor, target: str = "edss",
                      index: int = 0) -> list[dict[str, float]]:
    """Per-feature exact contributions to ``target`` ("edss", "edss_logits" or "ms_logit") per row.

    ``z`` is the image embedding (``PatientNet.image_embedding``), ``ehr`` the model EHR input.
    """
    def f(u: torch.Tensor) -> torch.Tensor:
        out = net.fusion(z, net.ehr_embedding(u))
        from msgate.model.patient.network import N_EDSS

        if target == "edss":
            return out[:, N_EDSS]
        if target == "ms_logit":
            return out[:, N_EDSS + 1]
        return out[:, index]

    with torch.enable_grad():
        mid = (ehr.detach() / 2.0).requires_grad_(True)
        grad, = torch.autograd.grad(f(mid).sum(), mid)
    contrib = (ehr.detach() * grad).cpu().numpy()
    return [{name: float(row[idx].sum()) for name, idx in _groups()} for row in contrib]
