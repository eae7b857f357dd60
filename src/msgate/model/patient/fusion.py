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


class OrdinalGatedFusion(nn.Module):
    """Training-time parametrisation of :class:`GatedLinearFusion` for ordered EDSS bins.

    A core fusion gives a disability score ``s`` (and, with ``quadratic``, a spread term ``q``), the EDSS
    regression and the MS logit; the bin logits are ``k * s - k^2 * q + c_k`` (k = 0..3, ``c`` learnt):
    the adjacent-category ordinal logit (``quadratic``: a discretised Gaussian over the bins whose
    centre and width both depend on the inputs). Every output is a fixed linear map of the core
    outputs, so :meth:`materialize` folds it into a plain :class:`GatedLinearFusion` with the same
    numbers: checkpoints, ``predict``, the explanations and the HE export see the usual form.
    """

    def __init__(self, img_dim: int, ehr_dim: int, n_bins: int = 4, quadratic: bool = True) -> None:
        super().__init__()
        rows = ["s", "q", "edss", "ms"] if quadratic else ["s", "edss", "ms"]
        self.core = GatedLinearFusion(img_dim, ehr_dim, len(rows))
        self.cut = nn.Parameter(torch.zeros(n_bins))
        k = torch.arange(n_bins, dtype=torch.float32)
        expand = torch.zeros(n_bins + 2, len(rows))
        expand[:n_bins, rows.index("s")] = k
        if quadratic:
            expand[:n_bins, rows.index("q")] = -k * k
        expand[n_bins, rows.index("edss")] = 1.0
        expand[n_bins + 1, rows.index("ms")] = 1.0
        self.register_buffer("expand", expand)
        self.n_bins = n_bins

    @property
    def gate(self) -> nn.Linear:
        return self.core.gate

    def _offset(self) -> torch.Tensor:
        return torch.cat([self.cut, self.cut.new_zeros(self.expand.shape[0] - self.n_bins)])

    def gates(self, z: torch.Tensor) -> torch.Tensor:
        return self.core.gates(z)

    def ehr_term(self, z: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        return self.core.ehr_term(z, e) @ self.expand.T  # type: ignore[no-any-return]

    def forward(self, z: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        return self.core(z, e) @ self.expand.T + self._offset()  # type: ignore[no-any-return]

    @torch.no_grad()
    def materialize(self) -> GatedLinearFusion:
        """The equivalent plain fusion (same outputs for every ``z``, ``e``)."""
        c = self.core
        out = GatedLinearFusion(c.gate.in_features, c.gate.out_features, self.expand.shape[0])
        out.gate.load_state_dict(c.gate.state_dict())
        out.image_head.weight.copy_(self.expand @ c.image_head.weight)
        out.image_head.bias.copy_(self.expand @ c.image_head.bias + self._offset())
        out.ehr_head.weight.copy_(self.expand @ c.ehr_head.weight)
        return out.to(self.cut.device)
