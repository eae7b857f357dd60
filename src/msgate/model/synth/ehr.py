"""EHR features drawn from the latent variables, with documented noise and missingness.

Only the fields of ``msgate.model.features.FEATURES`` are produced (Kurtzke
functional-system scores never are: EDSS is computed from them). Each value
depends on the latent severity ``s`` (not on the EDSS label) plus noise:

* t25fw  = 4.5 exp(1.8 s^1.5 + N(0, 0.15)) + 0.02 (age-40) s, capped at 180
* nhpt   = 18.5 exp(0.9 s + N(0, 0.12)) + 0.05 (age-40) s
* sdmt   = 62 - 28 s - 0.25 (age-40) + N(0, 7), 0..110, integer
* nfl    = exp(ln 6 + 0.02 (age-40) + 0.9 s + 0.3 relapses + N(0, 0.35)) pg/mL (+35 % in cSVD)
* ocb    = POS with p 0.9 (MS) / 0.05 (cSVD); igg_index log-normal, median 0.85 (MS+OCB) else 0.5
* relapses_2y ~ Poisson(0.9 exp(-duration/8)) RRMS, 0.15 SPMS, 0.02 PPMS, 0 cSVD
* dmt: by phenotype and severity (high-efficacy drugs above s = 0.45)

Missingness: each feature is missing with p = min(0.95, missing_rate * weight)
(weights below: CSF tests and NfL are often not done), age and sex never; a
subject with s > 0.9 cannot walk 25 feet, so t25fw is then missing (informative).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, timedelta

import numpy as np

from msgate.model.features import FEATURES
from msgate.model.synth.latent import Latent

MISSING_WEIGHT: dict[str, float] = {
    "age": 0.0, "sex": 0.0, "disease_duration": 0.5, "t25fw": 1.0, "nhpt": 1.5, "sdmt": 1.5,
    "nfl": 2.0, "ocb": 2.5, "igg_index": 2.5, "relapses_2y": 0.5, "dmt": 0.3,
}
Value = float | int | str


@dataclass(frozen=True)
class Observation:
    """One EHR value with the date it was observed."""

    name: str
    value: Value
    when: date


def _dmt(lat: Latent, rng: np.random.Generator) -> str:
    if lat.diagnosis != "ms" or rng.random() < 0.12:
        return "none"
    if lat.phenotype == "PPMS":
        return "ocrelizumab" if rng.random() < 0.6 else "none"
    if lat.severity > 0.45 or lat.phenotype == "SPMS":
        return str(rng.choice(["natalizumab", "ocrelizumab", "ofatumumab", "cladribine"]))
    return str(rng.choice(["interferon_beta", "glatiramer", "teriflunomide", "dimethyl_fumarate", "fingolimod"]))


def _relapses(lat: Latent, rng: np.random.Generator) -> int:
    lam = {"RRMS": 0.9 * np.exp(-lat.disease_duration / 8.0), "SPMS": 0.15, "PPMS": 0.02}.get(lat.phenotype, 0.0)
    return int(rng.poisson(lam))


def true_values(lat: Latent, rng: np.random.Generator) -> dict[str, Value]:
    """Complete (nothing missing) EHR values for one subject."""
    s, age, ms = lat.severity, lat.age, lat.diagnosis == "ms"
    rel = _relapses(lat, rng)
    ocb = rng.random() < (0.9 if ms else 0.05)
    igg = rng.lognormal(np.log(0.85 if (ms and ocb) else 0.5), 0.25 if ms else 0.12)
    nfl = np.exp(np.log(6.0) + 0.02 * (age - 40) + 0.9 * s + 0.3 * rel + rng.normal(0, 0.35))
    return {
        "age": round(age, 1),
        "sex": lat.sex,
        "disease_duration": round(max(lat.disease_duration + rng.normal(0, 0.3), 0.0), 1),
        "t25fw": round(min(4.5 * np.exp(1.8 * s**1.5 + rng.normal(0, 0.15)) + 0.02 * (age - 40) * s, 180.0), 1),
        "nhpt": round(18.5 * np.exp(0.9 * s + rng.normal(0, 0.12)) + 0.05 * (age - 40) * s, 1),
        "sdmt": int(np.clip(round(62 - 28 * s - 0.25 * (age - 40) + rng.normal(0, 7)), 0, 110)),
        "nfl": round(float(nfl * (1.0 if ms else 1.35)), 1),
        "ocb": "POS" if ocb else "NEG",
        "igg_index": round(float(igg), 2),
        "relapses_2y": rel,
        "dmt": _dmt(lat, rng),
    }


def _observed_on(name: str, lat: Latent, scan: date, rng: np.random.Generator) -> date:
    """Observation date before the scan: CSF at diagnosis, the rest within the validity window."""
    if name in ("ocb", "igg_index"):
        return scan - timedelta(days=int(lat.disease_duration * 365.25) + int(rng.integers(1, 60)))
    validity = next(f.validity_days for f in FEATURES if f.name == name)
    return scan - timedelta(days=int(rng.integers(1, min(validity, 120))))


def sample_ehr(lat: Latent, scan: date, missing_rate: float, rng: np.random.Generator) -> list[Observation]:
    """Observed EHR values (missing ones left out), dated before the scan date."""
    values = true_values(lat, rng)
    obs = []
    for spec in FEATURES:
        p_miss = min(0.95, missing_rate * MISSING_WEIGHT[spec.name])
        dropped = rng.random() < p_miss
        if spec.name == "t25fw" and lat.severity > 0.9:
            dropped = True
        when = _observed_on(spec.name, lat, scan, rng)
        if not dropped:
            obs.append(Observation(spec.name, values[spec.name], when))
    return obs
