"""Role inputs from where an Enhanced MR or Legacy Converted Enhanced MR header keeps them.

MR Image Storage has ScanningSequence, SequenceName and InversionTime at the top level. An Enhanced MR
Image (PS3.3 C.8.13) has none of them there: its MR Pulse Sequence module gives EchoPulseSequence (SPIN,
GRADIENT, BOTH) and the MR Modifier Sequence (0018,9115) of the shared or per-frame functional groups gives
InversionRecovery (YES/NO) and InversionTimes (0018,9079). A Legacy Converted Enhanced MR Image keeps the
classic attributes in the Unassigned Shared (or Per-Frame) Converted Attributes Sequence of the functional
groups. Reading the top level only, a Siemens 3D FLAIR sent as Enhanced MR had no inversion time and no
``IR``, and was ``T2`` by its name ``t2_spc_da-fl_sag_p2_iso``.

Every reader here tries the top level first, then the shared functional group, then the first per-frame
one; a damaged or absent sequence is skipped, never an error (pydicom decodes lazily and raises many types).
"""

from __future__ import annotations

from typing import Any

from msgate.storage.index_dicom import text as _text

_GROUPS = ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence")
_CONVERTED = ("UnassignedSharedConvertedAttributesSequence", "UnassignedPerFrameConvertedAttributesSequence")
_MODIFIER = ("MRModifierSequence",)
_ECHO_PULSE = {"SPIN": "SE", "GRADIENT": "GR", "BOTH": "SE\\GR"}


def _first_item(ds: Any, keyword: str) -> Any | None:
    try:
        items = ds.get(keyword)
        return items[0] if items else None
    except Exception:  # noqa: BLE001 - a damaged sequence is no item
        return None


def _places(ds: Any, macros: tuple[str, ...]) -> list[Any]:
    """The top level, then the first item of each ``macros`` sequence in the shared, then in the first
    per-frame functional group."""
    places = [ds]
    for group in _GROUPS:
        item = _first_item(ds, group)
        if item is not None:
            places.extend(found for found in (_first_item(item, m) for m in macros) if found is not None)
    return places


def _get(place: Any, keyword: str) -> Any:
    try:
        value = place.get(keyword)
    except Exception:  # noqa: BLE001 - an undecodable value is no value
        return None
    return None if value is None or value == "" else value


def _values(value: Any) -> list[Any]:
    many = isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue"
    return list(value) if many else [value]


def _number(value: Any) -> float | None:
    try:
        first = _values(value)[0] if value is not None else None
        return float(first) if first not in (None, "") else None
    except (TypeError, ValueError, IndexError):
        return None


def converted_text(ds: Any, keyword: str) -> str:
    """A classic attribute as text (multi-values joined with ``\\``): the top level, else the Legacy
    Converted attributes."""
    for place in _places(ds, _CONVERTED):
        value = _get(place, keyword)
        joined = "\\".join(str(v) for v in _values(value)) if value is not None else ""
        if joined:
            return joined
    return ""


def inversion_time(ds: Any) -> float | None:
    """The inversion time in ms: InversionTime (0018,0082) at the top level or in the Legacy Converted
    attributes, else the first InversionTimes (0018,9079) value at the top level or in the MR Modifier
    Sequence (for a double IR the first, long inversion)."""
    for keyword, macros in (("InversionTime", _CONVERTED), ("InversionTimes", _MODIFIER)):
        for place in _places(ds, macros):
            value = _number(_get(place, keyword))
            if value is not None:
                return value
    return None


def inversion_count(ds: Any) -> int:
    """How many inversion times the header lists: InversionTimes at the top level or in the MR Modifier
    Sequence of the shared or first per-frame functional group. A double inversion recovery lists two; MR
    Image Storage has InversionTime only (0 here)."""
    count = 0
    for place in _places(ds, _MODIFIER):
        value = _get(place, "InversionTimes")
        if value is not None:
            count = max(count, len(_values(value)))
    return count


def inversion_recovery(ds: Any) -> bool:
    """InversionRecovery (0018,9009) is YES at the top level or in the MR Modifier Sequence."""
    for place in _places(ds, _MODIFIER):
        value = _get(place, "InversionRecovery")
        if value is not None:
            return str(value).strip().upper() == "YES"
    return False


def scanning_sequence(ds: Any) -> str:
    """ScanningSequence (top level, else Legacy Converted attributes); an Enhanced MR header has none, its
    EchoPulseSequence stands in as SE, GR or SE\\GR, so that a rule can tell a gradient echo (an MP2RAGE)
    from a DIR or a FLAIR. ``IR`` is added when InversionRecovery is YES and the sequence does not say it."""
    sequence = converted_text(ds, "ScanningSequence") or _ECHO_PULSE.get(
        _text(ds, "EchoPulseSequence").strip().upper(), "")
    if inversion_recovery(ds) and "IR" not in {part.strip().upper() for part in sequence.split("\\")}:
        sequence = f"{sequence}\\IR" if sequence else "IR"
    return sequence
