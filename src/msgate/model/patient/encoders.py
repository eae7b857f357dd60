"""Study encoder (MONAI 3D ResNet + squeeze-excitation + attention pooling) and the EHR encoder.

The EHR encoder is HE-compatible by construction: only ``nn.Linear`` layers and the degree-2
polynomial :class:`PolyAct`, so CKKS can evaluate it unchanged (fold each hidden bias into its weight
matrix by appending a constant 1 to the input; see reference/domain.md section 4).
"""

from __future__ import annotations

import torch
from monai.networks.blocks import ChannelSELayer
from monai.networks.nets import ResNet
from torch import nn

from msgate.model.patient.presets import Preset


class AttentionPool(nn.Module):
    """Softmax attention over voxels (1x1x1 conv scores), concatenated with the global mean."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.score = nn.Conv3d(channels, 1, kernel_size=1)

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        w = torch.softmax(self.score(f).flatten(2), dim=-1)  # [B, 1, V]
        flat = f.flatten(2)
        return torch.cat([(flat * w).sum(-1), flat.mean(-1)], dim=1)


class StudyEncoder(nn.Module):
    """FLAIR/QSM/T1/lesion-fraction channels -> image embedding (``2 * block_inplanes[-1]``)."""

    def __init__(self, preset: Preset, in_channels: int = 4) -> None:
        super().__init__()
        strided = preset.stem_stride > 1
        r = ResNet(block="basic", layers=list(preset.layers), block_inplanes=list(preset.block_inplanes),
                   spatial_dims=3, n_input_channels=in_channels, conv1_t_size=3, conv1_t_stride=preset.stem_stride,
                   feed_forward=False, no_max_pool=strided)
        # the strided stem reaches the same grid as conv + max-pool at about a third of the CPU time
        self.stem = nn.Sequential(r.conv1, r.bn1, r.act) if strided else nn.Sequential(r.conv1, r.bn1, r.act, r.maxpool)
        self.layer1, self.layer2, self.layer3, self.layer4 = r.layer1, r.layer2, r.layer3, r.layer4
        width = preset.block_inplanes[-1]
        self.se = ChannelSELayer(spatial_dims=3, in_channels=width, r=4)
        self.pool = AttentionPool(width)
        self.out_dim = 2 * width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.layer4(self.layer3(self.layer2(self.layer1(self.stem(x)))))
        return self.pool(self.se(f))


class PolyAct(nn.Module):
    """Degree-2 polynomial activation ``x + c x^2`` (no ReLU, no exp: CKKS-friendly)."""

    def __init__(self, c: float = 0.25) -> None:
        super().__init__()
        self.c = c

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.c * x * x


class EhrEncoder(nn.Module):
    """``[values, mask]`` (2 * n_columns) -> Linear -> PolyAct -> Linear -> EHR embedding."""

    def __init__(self, n_inputs: int, hidden: int, embed: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(n_inputs, hidden), PolyAct(), nn.Linear(hidden, embed))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)  # type: ignore[no-any-return]
