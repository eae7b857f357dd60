"""The lesion model: checkpoint I/O and the inference API.

``load_lesion_model()`` loads the checkpoint shipped in ``msgate/model/checkpoints`` (or a path);
``model.segment(volumes)`` returns :class:`Lesions`; ``model.classify_rims(volumes, lesions)``
returns :class:`RimScores`: one probability per lesion, or None for every lesion when QSM is
absent (not assessable, never a guess). Both run in eval mode, batched, without disk or network.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import ndimage

from msgate.model.lesions.location import LocationNet
from msgate.model.lesions.patches import lesion_patches
from msgate.model.lesions.presets import Preset, preset_from_dict
from msgate.model.lesions.rims import build_rim_net
from msgate.model.lesions.segment import Lesions, build_seg_net, prepare, segment_arrays
from msgate.model.types import LesionFinding, Volume

FORMAT = "msgate-lesions/1"
MODEL_NAME = "msgate-lesions"
DEFAULT_CHECKPOINT = Path(__file__).resolve().parent.parent / "checkpoints" / "lesions-tiny.pt"


@dataclass(frozen=True)
class RimScores:
    """Per-lesion Rim+ probabilities keyed by lesion label; ``assessable`` False when QSM is absent."""

    probabilities: dict[int, float | None]
    assessable: bool

    def apply(self, lesions: Lesions) -> tuple[LesionFinding, ...]:
        """The findings with ``rim_probability`` filled in."""
        return tuple(replace(f, rim_probability=self.probabilities.get(f.label)) for f in lesions.findings)


class LesionModel:
    """Segmenter + location MLP + Rim+ classifier (plus ablation variants when trained with them)."""

    def __init__(self, preset: Preset, seg: torch.nn.Module, loc: LocationNet, rim: dict[str, torch.nn.Module],
                 meta: dict[str, Any], device: str = "cpu") -> None:
        self.preset, self.seg, self.loc, self.rim, self.meta, self.device = preset, seg, loc, rim, meta, device
        for m in (seg, loc, *rim.values()):
            m.eval().to(device)

    @property
    def version(self) -> str:
        return str(self.meta.get("version", "0"))

    def segment(self, volumes: dict[str, Volume]) -> Lesions:
        """Label map in the FLAIR grid and findings without rim probability."""
        grid, arrays = prepare(volumes, self.preset)
        return segment_arrays(self.seg, self.loc, self.preset, grid, arrays, self.device)

    @torch.no_grad()
    def rim_logits(self, patches: np.ndarray, variant: str = "asymmetric") -> np.ndarray:
        """Raw logits of a batch of (N, 2, s, s, s) patches."""
        net = self.rim[variant]
        net.eval()
        if len(patches) == 0:
            return np.zeros(0, np.float32)
        logit, _ = net(torch.from_numpy(patches).to(self.device))
        return logit.float().cpu().numpy()

    def classify_rims(self, volumes: dict[str, Volume], lesions: Lesions, variant: str = "asymmetric") -> RimScores:
        """Rim+ probability per lesion; all None (not assessable) without a QSM volume."""
        if "QSM" not in volumes:
            return RimScores({f.label: None for f in lesions.findings}, assessable=False)
        _, arrays = prepare(volumes, self.preset)
        return self.classify_arrays(arrays, lesions, variant)

    def classify_arrays(self, arrays: dict[str, np.ndarray], lesions: Lesions, variant: str = "asymmetric") -> RimScores:
        """:meth:`classify_rims` on arrays already prepared on the working grid."""
        labels = [f.label for f in lesions.findings]
        if "QSM" not in arrays:
            return RimScores({lab: None for lab in labels}, assessable=False)
        work = lesions.work_labels
        cents = ndimage.center_of_mass(np.ones(work.shape), work, index=labels) if labels else []
        patches = lesion_patches(arrays["QSM"], arrays["FLAIR"], [np.asarray(c) for c in cents], self.preset.rim_patch)
        probs = 1.0 / (1.0 + np.exp(-self.rim_logits(patches, variant)))
        return RimScores({lab: round(float(p), 6) for lab, p in zip(labels, probs)}, assessable=True)

    def state(self) -> dict[str, Any]:
        """Checkpoint dict: tensors, numbers and strings only (``torch.load(weights_only=True)``)."""
        return {"format": FORMAT, "meta": self.meta, "preset": self.preset.to_dict(),
                "seg": self.seg.state_dict(), "loc": self.loc.state_dict(),
                "rim": {k: v.state_dict() for k, v in self.rim.items()}}


def rim_arch(variant: str, meta: dict[str, Any]) -> str:
    """Architecture of a Rim+ variant: as recorded in the checkpoint (``meta["rim_archs"]``), else the
    first release's mapping (``stacked*`` -> stacked, everything else -> the FiLM-only asymmetric net)."""
    archs = meta.get("rim_archs") or {}
    if variant in archs:
        return str(archs[variant])
    return "stacked" if variant.startswith("stacked") else "asymmetric"


def build_model(preset: Preset, meta: dict[str, Any] | None = None, variants: tuple[str, ...] = ("asymmetric",),
                device: str = "cpu") -> LesionModel:
    """Untrained model of a preset (tests, training); Rim+ architectures from ``meta`` (see :func:`rim_arch`)."""
    meta = dict(meta or {})
    rim = {v: build_rim_net(rim_arch(v, meta), preset.rim_widths) for v in variants}
    return LesionModel(preset, build_seg_net(preset), LocationNet(), rim, meta, device)


def save_lesion_model(model: LesionModel, path: Path) -> None:
    """Write the checkpoint and a JSON sidecar (``<path>.json``) with its metadata."""
    path.parent.mkdir(parents=True, exist_ok=True)
    state = model.state()
    state["seg"] = {k: v.cpu() for k, v in state["seg"].items()}
    state["rim"] = {n: {k: v.cpu() for k, v in sd.items()} for n, sd in state["rim"].items()}
    torch.save(state, path)
    sidecar = {"format": FORMAT, **model.meta, "preset_config": model.preset.to_dict(),
               "variants": sorted(model.rim), "bytes": path.stat().st_size}
    path.with_suffix(".json").write_text(json.dumps(sidecar, indent=2, sort_keys=True) + "\n")


def load_lesion_model(path: Path | str | None = None, device: str = "cpu") -> LesionModel:
    """Load a checkpoint (default: the shipped ``lesions-tiny.pt``); ValueError on a foreign file."""
    p = Path(path) if path is not None else DEFAULT_CHECKPOINT
    state = torch.load(p, map_location=device, weights_only=True)
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f'Argument "path" is not a {FORMAT} checkpoint.')
    preset = preset_from_dict(state["preset"])
    model = build_model(preset, state["meta"], tuple(state["rim"]), device)
    model.seg.load_state_dict(state["seg"])
    model.loc.load_state_dict(state["loc"])
    for name, sd in state["rim"].items():
        model.rim[name].load_state_dict(sd)
    for m in (model.seg, model.loc, *model.rim.values()):
        m.eval()
    return model


_DEFAULT: LesionModel | None = None


def _default() -> LesionModel:
    global _DEFAULT
    if _DEFAULT is None:
        _DEFAULT = load_lesion_model()
    return _DEFAULT


def segment(volumes: dict[str, Volume], model: LesionModel | None = None) -> Lesions:
    """Segment with ``model`` (default: the shipped checkpoint)."""
    return (model or _default()).segment(volumes)


def classify_rims(volumes: dict[str, Volume], lesions: Lesions, model: LesionModel | None = None) -> RimScores:
    """Rim+ probabilities with ``model`` (default: the shipped checkpoint)."""
    return (model or _default()).classify_rims(volumes, lesions)
