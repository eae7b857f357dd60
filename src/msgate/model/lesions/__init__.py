"""MS lesion model: segmentation from FLAIR (+T1), location classes, Rim+ from QSM conditioned on FLAIR.

Public API: :func:`load_lesion_model`, :func:`segment`, :func:`classify_rims`, :class:`Lesions`,
:class:`RimScores`, presets ``tiny`` / ``full``. See docs/lesion-model.md.
"""

from msgate.model.lesions.model import (
    LesionModel,
    RimScores,
    classify_rims,
    load_lesion_model,
    save_lesion_model,
    segment,
)
from msgate.model.lesions.presets import PRESETS, Preset, get_preset
from msgate.model.lesions.segment import Lesions

__all__ = ["PRESETS", "LesionModel", "Lesions", "Preset", "RimScores", "classify_rims", "get_preset",
           "load_lesion_model", "save_lesion_model", "segment"]
