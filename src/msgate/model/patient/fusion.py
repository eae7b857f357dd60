"""Image-conditioned gated fusion whose outputs are linear in the EHR embedding.

``out = A(z) + W (g(z) * e)`` with ``g(z) = 2 sigmoid(G z)``: given the image embedding ``z`` the map
``e -> out`` is linear, so an encrypted ``e`` needs only plaintext-ciphertext products, and the EHR
term ``W (g * e)`` is an exact additive contribution to every logit.
"""

from __future__ import annotations

import torch
from torch import nn


class GatedLinearFusion(nn.Module):
    """``A(z) + W (g(z) * e)``; ``ehr_term`` returns the second summand alone."""

    def __init__(self, img_dim: int, ehr_dim: int, n_out: int) -> None:
        super().__init__()
        self.gate = nn.Linear(img_dim, ehr_dim)
        self.image_head = nn.Linear(img_dim, n_out)
        self.ehr_head = nn.Linear(ehr_dim, n_out, bias=False)

    def gates(self, z: torch.Tensor) -> torch.Tensor:
        """Per-dimension gate in (0, 2) computed from the image embedding."""
        return 2.0 * torch.sigmoid(self.gate(z))

    def ehr_term(self, z: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        """``W (g(z) * e)``: the EHR part of each output."""
        return self.ehr_head(self.gates(z) * e)  # type: ignore[no-any-return]

    def forward(self, z: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        return self.image_head(z) + self.ehr_term(z, e)  # type: ignore[no-any-return]
