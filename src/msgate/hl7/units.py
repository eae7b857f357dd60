"""Unit conversion into the feature schema's UCUM units (``model/features.py``).

Only conversions that are exact are listed; anything else is reported as a validation finding and the
value is not used as a model feature.
"""

from __future__ import annotations

# (from unit, to unit) -> factor; units compared case-sensitively after normalisation.
FACTORS: dict[tuple[str, str], float] = {
    ("ng/L", "pg/mL"): 1.0, ("pg/mL", "pg/mL"): 1.0, ("ng/mL", "pg/mL"): 1000.0,
    ("s", "s"): 1.0, ("sec", "s"): 1.0, ("ms", "s"): 0.001, ("min", "s"): 60.0,
    ("a", "a"): 1.0, ("y", "a"): 1.0, ("yr", "a"): 1.0, ("year", "a"): 1.0, ("years", "a"): 1.0, ("mo", "a"): 1 / 12,
}
UNITLESS = {"", "1", "{ratio}", "{score}", "{count}", "{#}", "#", "ratio", "score", "count", "{index}"}
ALIASES = {"PG/ML": "pg/mL", "NG/L": "ng/L", "NG/ML": "ng/mL", "SEC": "s", "SECONDS": "s", "S": "s",
           "MIN": "min", "YEARS": "a", "YRS": "a", "Y": "a", "A": "a"}


def normalise(unit: str) -> str:
    unit = unit.strip()
    return ALIASES.get(unit.upper(), unit)


def convert(value: float, unit: str, target: str) -> float | None:
    """``value`` in ``unit`` expressed in ``target``; None when no exact conversion is known."""
    src, dst = normalise(unit), normalise(target)
    if src == dst:
        return value
    if dst in UNITLESS and src in UNITLESS:
        return value
    factor = FACTORS.get((src, dst))
    return value * factor if factor else None
