"""Readable notes for a result's flags, carried in the SR (text items) and the ORU (NTE segments).

A reader of either must see that a result was flagged for review, or computed without an input
(QSM, T1, an EHR field), and not only the numbers.
"""

from __future__ import annotations

from msgate.model.types import ModelResult

_TEXT = {
    "review": "Flagged for review: low calibrated confidence, high uncertainty, or an input problem named in "
              "these notes.",
    "qsm_absent": "QSM absent: paramagnetic rim lesions not assessable.",
    "t1_absent": "T1 absent: computed from FLAIR (and QSM) only.",
    "ehr_deadline": "Required EHR data did not arrive before the deadline: computed with it masked.",
    "qsm_partial_coverage": "QSM does not cover every lesion: those lesions were not assessed for a "
                            "paramagnetic rim, and the Rim+ count covers the assessed lesions only.",
    "qsm_scale_suspect": "QSM values are far outside the ppm range of brain tissue (another unit, or a missing "
                         "rescale): paramagnetic rim results are unreliable.",
    "partial_coverage": "The FLAIR does not cover the whole brain head to foot: lesion results may be wrong.",
}
_SERIES = {  # what volume assembly flags, per series (``flair_missing_slices``, ``qsm_nonfinite_pixels``)
    "missing_slices": "missing slices, completed by interpolation",
    "gantry_tilt": "gantry tilt",
    "mixed_orientation": "mixed slice orientations (the main stack was used)",
    "duplicate_positions": "duplicate slice positions (the latest instance was used)",
    "nonfinite_pixels": "NaN or infinite pixel values, set to 0",
}
_ROLES = {"flair": "FLAIR", "qsm": "QSM", "t1": "T1"}


def flag_notes(result: ModelResult) -> tuple[str, ...]:
    """One sentence per flag that changes how the result should be read, in a stable order."""
    out = [_TEXT[flag] for flag in _TEXT if flag in result.flags]
    out += [f"{name} series: {text}." for role, name in _ROLES.items() for flag, text in _SERIES.items()
            if f"{role}_{flag}" in result.flags]
    missing = sorted(flag.split(":", 1)[1] for flag in result.flags if flag.startswith("ehr_missing:"))
    if missing:
        out.append(f"EHR values absent (masked): {', '.join(missing)}.")
    return tuple(out)
