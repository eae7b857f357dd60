"""In-memory synthetic subjects (no DICOM round trip) and the cached training arrays.

Draws follow ``msgate.model.synth.cohort`` exactly (same ``SeedSequence([seed, index])`` stream and
order), so subject ``i`` of seed ``s`` here is subject ``i`` of ``msgate synth --seed s``. Each
acquired series becomes a contract :class:`Volume` (``data[k, r, c]``, LPS affine over ``(c, r, k)``).
"""

from __future__ import annotations

import copy
import multiprocessing
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from msgate.model.patient.ehr import ehr_vector, raw_columns
from msgate.model.patient.lesionsrc import LesionSource, lesion_features, load_lesion_source, source_kind
from msgate.model.patient.preprocess import LPS_TO_RAS, prepare
from msgate.model.patient.presets import Preset, get_preset
from msgate.model.synth import cohort
from msgate.model.synth.anatomy import WarpParams, load_template, make_anatomy
from msgate.model.synth.contrasts import acquire, tissue_images
from msgate.model.synth.ehr import sample_ehr, true_values
from msgate.model.synth.latent import sample_latent
from msgate.model.synth.lesions import place_lesions, sample_specs
from msgate.model.synth.protocols import plan_series
from msgate.model.types import Case, Volume, edss_class


@dataclass(frozen=True)
class Truth:
    """Labels and generator truth of one subject (the reference baseline uses the latter)."""

    edss: float
    edss_class: int
    ms: int
    n_rim: int
    true_lesion_load_ml: float
    true_lesion_count: int
    true_ehr: dict[str, object]


def _volume(pixels: NDArray[np.number], slope: float, intercept: float, affine_ras: NDArray[np.float64],
            role: str) -> Volume:
    data = (pixels.astype(np.float32) * np.float32(slope) + np.float32(intercept)).transpose(2, 1, 0)
    return Volume(np.ascontiguousarray(data), LPS_TO_RAS @ affine_ras, role)  # type: ignore[arg-type]


def synth_case(seed: int, index: int, missing_rate: float = 0.1,
               mix: dict[str, float] | None = None) -> tuple[Case, Truth]:
    """Simulate subject ``index`` of cohort ``seed`` at 2 mm, as a ``Case`` plus its truth."""
    cfg = cohort.CohortConfig(Path("."), seed, dict(mix or {"ms": 0.7, "csvd": 0.3}), resolution=2,
                              missing_rate=missing_rate)
    rng = cohort.subject_rng(seed, index)
    lat = sample_latent(cohort._diagnosis(cfg.mix, rng), rng)
    st = cohort._study_info(cfg, index, lat.age, lat.sex, rng)
    an = make_anatomy(load_template(2), WarpParams.sample(rng), lat.atrophy, rng)
    maps = place_lesions(sample_specs(lat, rng), an, rng)
    images = tissue_images(an, maps, rng)
    plans = plan_series(st.manufacturer, cfg.protocol, rng)
    series = [acquire(images[p.role], p.acq, an.affine, rng) for p in plans]
    true_ehr = true_values(lat, copy.deepcopy(rng))
    obs = sample_ehr(lat, datetime.strptime(st.study_date, "%Y%m%d").date(), missing_rate, rng)
    vols = {p.role: _volume(s.pixels, s.slope, s.intercept, s.affine, p.role) for p, s in zip(plans, series)}
    case = Case(f"syn-{seed}-{index}", vols, ehr_vector({o.name: o.value for o in obs}))
    truth = Truth(lat.edss, edss_class(lat.edss), int(lat.diagnosis == "ms"), sum(les.rim for les in maps.lesions),
                  sum(les.volume_mm3 for les in maps.lesions) / 1000.0, len(maps.lesions), dict(true_ehr))
    return case, truth


def case_arrays(case: Case, preset: Preset, source: LesionSource) -> dict[str, NDArray[np.float32]]:
    """Everything training needs from one case: model-grid image, masks, EHR and lesion features."""
    les = source(case.volumes)
    mi = prepare(case.volumes, les.labels, preset)
    x, m = raw_columns(case.ehr)
    qsm = "QSM" in case.volumes
    return {"image": mi.image.astype(np.float16), "present": mi.present, "ehr_x": x, "ehr_m": m,
            "lesion": lesion_features(les.findings, qsm)}


def _one(args: tuple[int, int, str, float, str]) -> dict[str, object]:
    seed, index, preset_name, missing_rate, lesion_kind = args
    case, truth = synth_case(seed, index, missing_rate)
    arrs: dict[str, object] = dict(case_arrays(case, get_preset(preset_name), load_lesion_source(lesion_kind)))
    arrs.update(edss=truth.edss, edss_class=truth.edss_class, ms=truth.ms, n_rim=truth.n_rim,
                true_load=truth.true_lesion_load_ml, true_count=truth.true_lesion_count,
                true_ehr=raw_columns(ehr_vector(truth.true_ehr))[0], index=index)
    return arrs


def build_cache(path: Path, seed: int, n: int, preset: str, missing_rate: float = 0.1, workers: int = 1,
                start: int = 1, lesion_kind: str = "heuristic") -> Path:
    """Simulate ``n`` subjects of ``seed`` and save their arrays as one ``.npz``."""
    kind = source_kind(load_lesion_source(lesion_kind))
    jobs = [(seed, i, preset, missing_rate, kind) for i in range(start, start + n)]
    load_template(2)
    if workers > 1:
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            rows = list(pool.imap(_one, jobs, chunksize=4))
    else:
        rows = [_one(j) for j in jobs]
    out = {k: np.stack([np.asarray(r[k]) for r in rows]) for k in rows[0]}
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, seed=np.asarray(seed), lesion_source=np.asarray(kind), **out)
    return path
