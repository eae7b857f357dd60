"""Adapter from ``msgate.model.lesions`` (segment + classify_rims) to the patient model's LesionSource.

The working-grid arrays are prepared once per case and shared by segmentation and the Rim+
classifier (``segment`` and ``classify_rims`` would each prepare them; the result is identical).
:meth:`RealLesions.with_patches` also returns the lesion-centred QSM + FLAIR patches the Rim+
classifier saw, so a training cache can recompute its Rim+ counts when only the Rim+ classifier of
the lesion checkpoint changes (``synthdata.refresh_rims``), without simulating the cohort again.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage

from msgate.model.patient.lesionsrc import LesionOutput
from msgate.model.types import Volume


def checkpoint_id(path: Path | str | None = None) -> str:
    """First 12 hex digits of the SHA-256 of the lesion checkpoint file (which lesion model made a cache)."""
    from msgate.model.lesions.model import DEFAULT_CHECKPOINT

    return hashlib.sha256(Path(path or DEFAULT_CHECKPOINT).read_bytes()).hexdigest()[:12]


class RealLesions:
    """The lesion model of issue 6: UNet segmentation, location classes, Rim+ from QSM + FLAIR."""

    name = "msgate-lesions"

    def __init__(self, path: Path | str | None = None, device: str = "cpu") -> None:
        from msgate.model.lesions import load_lesion_model

        self.model = load_lesion_model(path, device=device)
        self.name = f"msgate-lesions-{self.model.version}"
        self.checkpoint = checkpoint_id(path)

    def with_patches(self, volumes: dict[str, Volume]) -> tuple[LesionOutput, NDArray[np.float32]]:
        """Lesions with Rim+ probabilities, plus the (N, 2, s, s, s) Rim+ patches (N = 0 without QSM)."""
        from msgate.model.lesions.grid import coverage, covered
        from msgate.model.lesions.model import RimScores
        from msgate.model.lesions.patches import lesion_patches
        from msgate.model.lesions.segment import prepare, segment_arrays

        m = self.model
        grid, arrays = prepare(volumes, m.preset)
        lesions = segment_arrays(m.seg, m.loc, m.preset, grid, arrays, m.device)
        labels = [f.label for f in lesions.findings]
        size = m.preset.rim_patch
        if "QSM" not in arrays or not labels:
            probs: dict[int, float | None] = {lab: None for lab in labels}
            out = LesionOutput(lesions.label_map.astype(np.int16), RimScores(probs, "QSM" in arrays).apply(lesions))
            return out, np.zeros((0, 2, size, size, size), np.float32)
        # a lesion whose surroundings the QSM does not cover (a slab) is not assessable: None, not Rim-
        cov = coverage(volumes["QSM"], grid)
        boxes = ndimage.find_objects(lesions.work_labels)
        inside = [lab for lab in labels if lab - 1 < len(boxes) and covered(cov, boxes[lab - 1])]
        cents = ndimage.center_of_mass(np.ones(lesions.work_labels.shape), lesions.work_labels, index=inside) \
            if inside else []
        patches = lesion_patches(arrays["QSM"], arrays["FLAIR"], [np.asarray(c) for c in cents], size)
        p = 1.0 / (1.0 + np.exp(-m.rim_logits(patches))) if inside else np.zeros(0)
        probs = {lab: None for lab in labels}
        probs.update({lab: round(float(v), 6) for lab, v in zip(inside, p)})
        scores = RimScores(probs, assessable=True)
        return LesionOutput(lesions.label_map.astype(np.int16), scores.apply(lesions)), patches

    def rim_probabilities(self, patches: NDArray[np.floating]) -> NDArray[np.float64]:
        """Rim+ probability of each patch with this checkpoint's classifier."""
        logits = self.model.rim_logits(np.ascontiguousarray(patches, np.float32))
        return 1.0 / (1.0 + np.exp(-logits.astype(np.float64)))  # type: ignore[no-any-return]

    def __call__(self, volumes: dict[str, Volume]) -> LesionOutput:
        return self.with_patches(volumes)[0]
