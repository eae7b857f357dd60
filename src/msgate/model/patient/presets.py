"""Model sizes. ``tiny`` trains on a 2-core CPU; ``full`` is the GPU configuration."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Preset:
    """Grid, widths and training schedule of one model size."""

    name: str
    grid: tuple[int, int, int]  # model grid (RAS voxel order i, j, k)
    spacing_mm: float  # isotropic spacing of the model grid
    block_inplanes: tuple[int, int, int, int]
    layers: tuple[int, int, int, int]
    hidden: int  # image-side hidden width
    ehr_hidden: int  # EHR branch: 2 * n_inputs -> ehr_hidden -> ehr_embed
    ehr_embed: int
    dropout: float
    epochs: int
    batch_size: int
    lr: float
    patience: int
    gradcam_layer: str
    stem_stride: int = 1  # 1: 3x3x3 stem conv + max-pool (checkpoints before 0.2); 2: strided stem conv, no pool

    def to_dict(self) -> dict[str, object]:
        """JSON-ready dict."""
        return asdict(self)


PRESETS: dict[str, Preset] = {
    "tiny": Preset("tiny", (32, 40, 32), 6.0, (8, 16, 32, 48), (1, 1, 1, 1), 64, 32, 16, 0.2,
                   40, 16, 3e-3, 8, "encoder.layer3", stem_stride=2),
    "full": Preset("full", (96, 112, 96), 2.0, (32, 64, 128, 256), (2, 2, 2, 2), 128, 32, 16, 0.3,
                   120, 8, 1e-3, 15, "encoder.layer3"),
}


def get_preset(name: str) -> Preset:
    """The preset called ``name``; raises ``ValueError`` naming the choices."""
    if name not in PRESETS:
        raise ValueError(f'Argument "preset" must be one of {sorted(PRESETS)}, not "{name}".')
    return PRESETS[name]
