"""Latent subject variables: diagnosis, phenotype, severity, age, atrophy, EDSS.

Everything observable (images, lesions, EHR) is drawn from these, so the
image and tabular channels share signal only through the latent severity,
never through a copy of the label.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np

Diagnosis = Literal["ms", "csvd"]

EDSS_STEPS: tuple[float, ...] = (0.0,) + tuple(1.0 + 0.5 * i for i in range(18))  # 0, 1.0 .. 9.5


@dataclass(frozen=True)
class Latent:
    """Hidden truth of one synthetic subject."""

    diagnosis: Diagnosis
    phenotype: str  # RRMS / SPMS / PPMS for MS, cSVD otherwise
    severity: float  # 0 (mild) .. 1 (severe)
    age: float
    sex: str  # "F" / "M"
    disease_duration: float  # years since diagnosis
    atrophy: float  # 0 .. 1
    hypertension: bool
    diabetes: bool
    smoker: bool
    edss: float  # label, 0 or 1.0-9.5 in 0.5 steps

    def to_dict(self) -> dict[str, object]:
        """JSON-ready dict."""
        return asdict(self)


def edss_from_raw(raw: float) -> float:
    """Snap a continuous disability value to the nearest valid EDSS step (no 0.5)."""
    steps = np.asarray(EDSS_STEPS)
    return float(steps[int(np.argmin(np.abs(steps - raw)))])


def _sample_ms(rng: np.random.Generator) -> tuple[str, float, float, float]:
    """Phenotype, severity, onset age and duration for MS."""
    phenotype = str(rng.choice(["RRMS", "SPMS", "PPMS"], p=[0.7, 0.2, 0.1]))
    beta = {"RRMS": (2.0, 5.0), "SPMS": (5.0, 2.5), "PPMS": (4.0, 3.0)}[phenotype]
    severity = float(rng.beta(*beta))
    onset = float(np.clip(rng.normal(42.0 if phenotype == "PPMS" else 30.0, 8.0), 16.0, 60.0))
    mean_dur = {"RRMS": 2.0 + 10.0 * severity, "SPMS": 10.0 + 12.0 * severity,
                "PPMS": 2.0 + 8.0 * severity}[phenotype]
    duration = float(rng.gamma(4.0, mean_dur / 4.0))
    return phenotype, severity, onset, duration


def sample_latent(diagnosis: Diagnosis, rng: np.random.Generator) -> Latent:
    """Draw one subject's latent variables for the given diagnosis."""
    if diagnosis == "ms":
        phenotype, severity, onset, duration = _sample_ms(rng)
        age = min(onset + duration, 85.0)
        sex = "F" if rng.random() < 0.7 else "M"
        vasc = (0.12, 0.04, 0.25)
        raw = 9.0 * severity**1.1 + rng.normal(0.0, 0.6)
    else:
        phenotype, severity = "cSVD", float(rng.beta(2.0, 4.0))
        age = float(np.clip(rng.normal(68.0 + 6.0 * severity, 8.0), 50.0, 92.0))
        duration = float(rng.gamma(2.0, 1.5))
        sex = "F" if rng.random() < 0.45 else "M"
        vasc = (0.75, 0.3, 0.4)
        raw = 1.0 + 6.0 * severity + 0.03 * (age - 65.0) + rng.normal(0.0, 0.8)
    atrophy = float(np.clip(0.6 * severity + 0.012 * (age - 40.0) + rng.normal(0.0, 0.08), 0.0, 1.0))
    return Latent(
        diagnosis=diagnosis, phenotype=phenotype, severity=round(severity, 4), age=round(age, 2),
        sex=sex, disease_duration=round(duration, 2), atrophy=round(atrophy, 4),
        hypertension=bool(rng.random() < vasc[0]), diabetes=bool(rng.random() < vasc[1]),
        smoker=bool(rng.random() < vasc[2]), edss=edss_from_raw(raw),
    )
