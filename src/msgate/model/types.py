"""The model contract: what the workers hand to ``predict`` and what it gives back.

Everything here is plain numpy + dataclasses (no torch), so the workers, the results renderers and
the tests share one vocabulary without importing the model. The model sees pseudonymous ids only.

Geometry convention (so SEG and heatmaps overlay correctly on the source series):
``Volume.data[k, r, c]`` is slice ``k`` (source instances sorted along the slice normal), row ``r``,
column ``c``; ``Volume.affine_lps`` maps ``(c, r, k, 1)`` to patient LPS millimetres, the DICOM
convention. Output masks and heatmaps in :class:`ModelResult` use the FLAIR volume's grid.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np

Role = Literal["FLAIR", "QSM", "T1"]
EDSS_BINS: tuple[str, ...] = ("0-2.5", "3-4.5", "5-6.5", ">=7")
"""EDSS classes: [0, 2.5], [3, 4.5], [5, 6.5], [7, 9.5] (documented in docs/model-card.md)."""
LESION_LOCATIONS: tuple[str, ...] = ("periventricular", "juxtacortical", "infratentorial", "deep_wm")


def edss_class(edss: float) -> int:
    """The EDSS bin index of a score (0.5 steps from 0 to 9.5)."""
    return 0 if edss <= 2.5 else 1 if edss <= 4.5 else 2 if edss <= 6.5 else 3


@dataclass(frozen=True)
class Volume:
    """One series as a 3D float32 array in its native slice order (see module docstring)."""

    data: np.ndarray
    affine_lps: np.ndarray
    role: Role

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm along (c, r, k)."""
        return tuple(float(np.linalg.norm(self.affine_lps[:3, i])) for i in range(3))  # type: ignore[return-value]


@dataclass(frozen=True)
class EhrVector:
    """The feature schema's vector (``model.features.FEATURES`` order) with its missingness mask."""

    values: np.ndarray  # float32 [n_features], 0 where missing
    present: np.ndarray  # bool [n_features]
    names: tuple[str, ...]


@dataclass(frozen=True)
class Case:
    """One study ready for inference. ``case_id`` is pseudonymous (a job id). ``ehr`` is None when the
    EHR is withheld from this process (HE mode: only the key service reads it, and the model gets it as
    CKKS ciphertext by job id)."""

    case_id: str
    volumes: dict[str, Volume]
    ehr: EhrVector | None

    @property
    def flair(self) -> Volume:
        return self.volumes["FLAIR"]


@dataclass(frozen=True)
class LesionFinding:
    """One lesion candidate in the FLAIR grid. ``rim_probability`` is None when QSM is absent."""

    label: int
    volume_ml: float
    centroid_lps: tuple[float, float, float]
    location: str
    rim_probability: float | None = None

    @property
    def rim_positive(self) -> bool:
        return self.rim_probability is not None and self.rim_probability >= 0.5


@dataclass(frozen=True)
class ModelResult:
    """Everything the SR, SEG, heatmaps and ORU render; one per case."""

    case_id: str
    model_name: str
    model_version: str
    edss_probabilities: tuple[float, ...]  # calibrated, len(EDSS_BINS)
    edss_estimate: float
    confidence: float  # calibrated max probability
    uncertainty: float  # e.g. MC-dropout predictive entropy, 0..1
    p_ms: float  # P(MS) against cSVD
    lesions: tuple[LesionFinding, ...]
    lesion_mask: np.ndarray  # int16 label map in the FLAIR grid, 0 = background
    heatmap: np.ndarray | None  # float32 in [0, 1], FLAIR grid
    ehr_contributions: dict[str, float] = field(default_factory=dict)
    flags: tuple[str, ...] = ()  # e.g. "qsm_absent", "t1_absent", "ehr_missing:nfl", "review", "he"

    @property
    def edss_class(self) -> int:
        return int(np.argmax(self.edss_probabilities))

    @property
    def edss_label(self) -> str:
        return EDSS_BINS[self.edss_class]

    @property
    def diagnosis(self) -> str:
        return "MS" if self.p_ms >= 0.5 else "cSVD"

    @property
    def rim_assessable(self) -> bool:
        return "qsm_absent" not in self.flags

    @property
    def rim_count(self) -> int | None:
        return sum(1 for lesion in self.lesions if lesion.rim_positive) if self.rim_assessable else None

    @property
    def lesion_volume_ml(self) -> float:
        return float(sum(lesion.volume_ml for lesion in self.lesions))

    @property
    def review(self) -> bool:
        return "review" in self.flags
