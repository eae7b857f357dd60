"""Serialisation of a :class:`~msgate.model.types.ModelResult` for the encrypted ``result`` blob.

Format: a compressed ``.npz`` (numpy arrays only, no pickle) with the arrays ``lesion_mask`` and, when
present, ``heatmap``, plus ``meta``: the scalar fields as UTF-8 JSON. ``load_result`` refuses pickles,
so a tampered blob cannot execute code (it would fail AEAD anyway).
"""

from __future__ import annotations

import io
import json
from dataclasses import asdict
from typing import Any

import numpy as np

from msgate.errors import Rejected
from msgate.model.types import LesionFinding, ModelResult

FORMAT = "msgate.result/1"


def dump_result(result: ModelResult) -> bytes:
    meta: dict[str, Any] = {
        "format": FORMAT, "case_id": result.case_id, "model_name": result.model_name,
        "model_version": result.model_version, "edss_probabilities": list(result.edss_probabilities),
        "edss_estimate": result.edss_estimate, "confidence": result.confidence,
        "uncertainty": result.uncertainty, "p_ms": result.p_ms,
        "lesions": [asdict(lesion) for lesion in result.lesions],
        "ehr_contributions": result.ehr_contributions, "flags": list(result.flags),
    }
    arrays: dict[str, np.ndarray] = {
        "meta": np.frombuffer(json.dumps(meta, sort_keys=True).encode(), dtype=np.uint8),
        "lesion_mask": np.asarray(result.lesion_mask, dtype=np.int16),
    }
    if result.heatmap is not None:
        arrays["heatmap"] = np.asarray(result.heatmap, dtype=np.float32)
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)  # type: ignore[arg-type]  # numpy's stub wants positional arrays
    return buf.getvalue()


def load_result(data: bytes) -> ModelResult:
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            meta = json.loads(bytes(npz["meta"]).decode())
            mask = npz["lesion_mask"]
            heatmap = npz["heatmap"] if "heatmap" in npz.files else None
    except (ValueError, KeyError, OSError) as exc:
        raise Rejected(f"unreadable result payload ({type(exc).__name__})", code="bad_result") from None
    if meta.get("format") != FORMAT:
        raise Rejected("unknown result payload format", code="bad_result")
    lesions = tuple(LesionFinding(label=int(d["label"]), volume_ml=float(d["volume_ml"]),
                                  centroid_lps=tuple(d["centroid_lps"]), location=str(d["location"]),
                                  rim_probability=d.get("rim_probability")) for d in meta["lesions"])
    return ModelResult(
        case_id=meta["case_id"], model_name=meta["model_name"], model_version=meta["model_version"],
        edss_probabilities=tuple(meta["edss_probabilities"]), edss_estimate=float(meta["edss_estimate"]),
        confidence=float(meta["confidence"]), uncertainty=float(meta["uncertainty"]), p_ms=float(meta["p_ms"]),
        lesions=lesions, lesion_mask=mask, heatmap=heatmap, ehr_contributions=dict(meta["ehr_contributions"]),
        flags=tuple(meta["flags"]),
    )
