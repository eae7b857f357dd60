"""In-memory synthetic cases for training and evaluation (no DICOM round trip).

Uses the synthetic cohort's own simulation (``msgate.model.synth``): the same subject as
``msgate synth`` writes for ``(seed, index)``, converted to the model contract's :class:`Volume`
geometry. ``rim_enrich`` redraws the Rim+ flag of MS lesions with a higher probability, which is
only used for the classifier's *training* cohort (Rim+ is 6-13 % of lesions otherwise).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from msgate.model.synth.anatomy import WarpParams, load_template, make_anatomy
from msgate.model.synth.cohort import CohortConfig, _diagnosis, _study_info, subject_rng
from msgate.model.synth.contrasts import Series, acquire, tissue_images
from msgate.model.synth.latent import sample_latent
from msgate.model.synth.lesions import place_lesions, sample_specs
from msgate.model.synth.protocols import plan_series
from msgate.model.types import Volume

_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclass(frozen=True)
class TruthLesion:
    """Ground truth of one synthetic lesion (id as in ``labels``)."""

    id: int
    location: str
    rim: bool
    kind: str
    volume_mm3: float


@dataclass(frozen=True)
class SynthCase:
    """Volumes in the contract's geometry plus the ground-truth label map in the FLAIR grid."""

    subject: str
    diagnosis: str
    volumes: dict[str, Volume]
    labels: NDArray[np.uint16]  # [k, r, c], FLAIR grid, lesion ids
    lesions: tuple[TruthLesion, ...]


def series_to_volume(s: Series, role: str) -> Volume:
    """Synth series (RAS grid, ``pixels[i, j, k]``) -> contract Volume (``data[k, r, c]``, LPS)."""
    data = (s.pixels.astype(np.float32) * np.float32(s.slope) + np.float32(s.intercept)).transpose(2, 1, 0)
    return Volume(np.ascontiguousarray(data), _LPS @ np.asarray(s.affine, np.float64), role)  # type: ignore[arg-type]


def synth_case(seed: int, index: int, *, resolution: int = 2, protocol: str = "3d",
               mix: dict[str, float] | None = None, rim_enrich: float | None = None) -> SynthCase:
    """Simulate subject ``index`` of cohort ``seed`` (same draws as ``msgate synth`` when not enriched)."""
    cfg = CohortConfig(Path("."), seed, dict(mix or {"ms": 0.7, "csvd": 0.3}), protocol=protocol,
                       resolution=resolution)
    rng = subject_rng(cfg.seed, index)
    lat = sample_latent(_diagnosis(cfg.mix, rng), rng)
    st = _study_info(cfg, index, lat.age, lat.sex, rng)
    an = make_anatomy(load_template(resolution), WarpParams.sample(rng), lat.atrophy, rng)
    specs = sample_specs(lat, rng)
    if rim_enrich is not None and lat.diagnosis == "ms":
        erng = np.random.default_rng(np.random.SeedSequence([seed, index, 7]))
        specs = [dataclasses.replace(s, rim=bool(erng.random() < rim_enrich)) for s in specs]
    maps = place_lesions(specs, an, rng)
    images = tissue_images(an, maps, rng)
    plans = plan_series(st.manufacturer, cfg.protocol, rng)
    vols = {p.role: series_to_volume(acquire(images[p.role], p.acq, an.affine, rng), p.role) for p in plans}
    truth = tuple(TruthLesion(les.id, les.location, les.rim, les.kind, les.volume_mm3) for les in maps.lesions)
    labels = np.ascontiguousarray(maps.labels.transpose(2, 1, 0))
    return SynthCase(st.patient_id, lat.diagnosis, vols, labels, truth)
