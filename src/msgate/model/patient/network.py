"""The patient network: study encoder + lesion features -> image embedding; EHR encoder; fusion heads.

Outputs (``forward`` returns a dict): ``edss_logits`` [B, 4] (``EDSS_BINS``), ``edss`` [B] (regression,
EDSS points), ``ms_logit`` [B] (MS vs cSVD), ``rim_log_rate`` [B] (log of the expected study-level
Rim+ count, Poisson), plus ``z`` (image embedding) and ``e`` (EHR embedding).
``mode`` selects the variant: ``multimodal``, ``image`` (EHR embedding forced to 0) or ``ehr`` (no
image, no lesion features: the image embedding comes from a constant input).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from msgate.model.patient.ehr import N_COLUMNS
from msgate.model.patient.encoders import EhrEncoder, StudyEncoder
from msgate.model.patient.fusion import GatedLinearFusion
from msgate.model.patient.lesionsrc import LESION_FEATURES
from msgate.model.patient.presets import Preset
from msgate.model.types import EDSS_BINS

Mode = Literal["multimodal", "image", "ehr"]
N_EDSS = len(EDSS_BINS)
N_OUT = N_EDSS + 2  # EDSS logits, EDSS regression, MS logit


class PatientNet(nn.Module):
    """See module docstring."""

    def __init__(self, preset: Preset, mode: Mode = "multimodal") -> None:
        super().__init__()
        self.mode = mode
        self.encoder = StudyEncoder(preset)
        side = self.encoder.out_dim + len(LESION_FEATURES) + 2
        self.image_mlp = nn.Sequential(nn.Linear(side, preset.hidden), nn.ReLU(), nn.Dropout(preset.dropout))
        self.ehr = EhrEncoder(2 * N_COLUMNS, preset.ehr_hidden, preset.ehr_embed)
        self.fusion = GatedLinearFusion(preset.hidden, preset.ehr_embed, N_OUT)
        self.rim_head = nn.Linear(preset.hidden, 1)
        self.drop = nn.Dropout(preset.dropout)

    def image_embedding(self, image: torch.Tensor, present: torch.Tensor, lesion: torch.Tensor) -> torch.Tensor:
        """``z`` before the last dropout (the part of the network GradCAM explains)."""
        if self.mode == "ehr":
            side = torch.zeros(image.shape[0], self.image_mlp[0].in_features, device=image.device)
        else:
            side = torch.cat([self.encoder(image), lesion, present], dim=1)
        return self.image_mlp(side)  # type: ignore[no-any-return]

    def ehr_embedding(self, ehr: torch.Tensor) -> torch.Tensor:
        """``e`` from ``[values, mask]``; zeros in the image-only variant."""
        e = self.ehr(ehr)
        return torch.zeros_like(e) if self.mode == "image" else e

    def heads(self, z: torch.Tensor, e: torch.Tensor) -> dict[str, torch.Tensor]:
        """Fusion heads from the two embeddings."""
        z = self.drop(z)
        out = self.fusion(z, e)
        return {"edss_logits": out[:, :N_EDSS], "edss": out[:, N_EDSS], "ms_logit": out[:, N_EDSS + 1],
                "rim_log_rate": self.rim_head(z)[:, 0], "z": z, "e": e}

    def forward(self, image: torch.Tensor, present: torch.Tensor, lesion: torch.Tensor,
                ehr: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.heads(self.image_embedding(image, present, lesion), self.ehr_embedding(ehr))
