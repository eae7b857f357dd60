"""Presets of the lesion model: one code path, two sizes.

``tiny`` runs on a CPU (2 mm grid, small patches, a few minutes of training);
``full`` is the GPU configuration (1 mm grid, larger patches and networks).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace


@dataclass(frozen=True)
class Preset:
    """Every size knob of segmentation, Rim+ classification and their training."""

    name: str
    spacing_mm: float  # working grid (isotropic)
    synth_resolution: int  # template grid of the synthetic training cohort (1 or 2 mm)
    seg_channels: tuple[int, ...]
    seg_strides: tuple[int, ...]
    seg_patch: int  # training patch edge (voxels)
    seg_roi: int  # sliding-window edge at inference (voxels)
    seg_batch: int
    seg_steps: int
    seg_subjects: int
    rim_patch: int  # lesion-centred patch edge (voxels)
    rim_widths: tuple[int, int, int]
    rim_subjects: int
    rim_enrich: float  # Rim+ probability of MS lesions in the classifier's training cohort
    rim_batch: int
    pretrain_epochs: int
    finetune_epochs: int
    loc_epochs: int
    min_lesion_voxels: int  # smaller connected components are dropped
    threshold: float = 0.5
    rim_pool_subjects: int = 0  # further subjects whose lesions are unlabelled Rim+ pretraining data (0.2.0)

    def to_dict(self) -> dict[str, object]:
        """JSON-ready dict (tuples become lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


PRESETS: dict[str, Preset] = {
    "tiny": Preset(
        name="tiny", spacing_mm=2.0, synth_resolution=2,
        seg_channels=(8, 16, 32, 64), seg_strides=(2, 2, 2), seg_patch=48, seg_roi=64, seg_batch=4,
        seg_steps=1200, seg_subjects=48,
        rim_patch=16, rim_widths=(12, 24, 32), rim_subjects=120, rim_enrich=0.35, rim_batch=64,
        pretrain_epochs=10, finetune_epochs=16, loc_epochs=300, min_lesion_voxels=2,
    ),
    "full": Preset(
        name="full", spacing_mm=1.0, synth_resolution=1,
        seg_channels=(16, 32, 64, 128, 256), seg_strides=(2, 2, 2, 2), seg_patch=96, seg_roi=128, seg_batch=4,
        seg_steps=20000, seg_subjects=400,
        rim_patch=32, rim_widths=(32, 64, 128), rim_subjects=800, rim_enrich=0.35, rim_batch=128,
        pretrain_epochs=100, finetune_epochs=100, loc_epochs=500, min_lesion_voxels=8,
    ),
}


RIM_RECIPES = ("0.1.0", "0.2.0")
_RIM_020: dict[str, dict[str, object]] = {  # Rim+ settings of training code 0.2.0 that differ from a preset's own
    "tiny": {"rim_widths": (16, 32, 48), "pretrain_epochs": 6, "rim_pool_subjects": 360},
    "full": {"rim_pool_subjects": 2400},
}


def with_rim_recipe(preset: Preset, recipe: str) -> Preset:
    """``preset`` with the Rim+ settings of training code ``recipe``.

    ``"0.1.0"`` (the shipped checkpoint's recipe) is the preset as it stands; ``"0.2.0"`` widens the tiny
    Rim+ nets, shortens pretraining and adds the unlabelled pretraining pool (see ``rimtrain``).
    """
    if recipe not in RIM_RECIPES:
        raise ValueError(f'Argument "recipe" must be one of {RIM_RECIPES}, got "{recipe}".')
    if recipe == "0.1.0":
        return preset
    return replace(preset, **_RIM_020.get(preset.name, {}))  # type: ignore[arg-type]


def get_preset(name: str) -> Preset:
    """The preset called ``name``; ValueError naming the choices otherwise."""
    if name not in PRESETS:
        raise ValueError(f'Argument "preset" must be one of {sorted(PRESETS)}, got "{name}".')
    return PRESETS[name]


def preset_from_dict(d: dict[str, object]) -> Preset:
    """Inverse of :meth:`Preset.to_dict` (as stored in a checkpoint)."""
    return Preset(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})  # type: ignore[arg-type]
