"""In-memory synthetic subjects (no DICOM round trip) and the cached training arrays.

Subjects are simulated by ``msgate.model.synth.cohort.simulate_subject`` itself (same
``SeedSequence([seed, index])`` stream and order), so subject ``i`` of seed ``s`` here is subject ``i``
of ``msgate synth --seed s --resolution 2``. Each
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
from msgate.model.synth.anatomy import load_template
from msgate.model.synth.ehr import sample_ehr, true_values
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
    severity: float = 0.0
    atrophy: float = 0.0


def _volume(pixels: NDArray[np.number], slope: float, intercept: float, affine_ras: NDArray[np.float64],
            role: str) -> Volume:
    data = (pixels.astype(np.float32) * np.float32(slope) + np.float32(intercept)).transpose(2, 1, 0)
    return Volume(np.ascontiguousarray(data), LPS_TO_RAS @ affine_ras, role)  # type: ignore[arg-type]


def synth_case(seed: int, index: int, missing_rate: float = 0.1,
               mix: dict[str, float] | None = None) -> tuple[Case, Truth]:
    """Simulate subject ``index`` of cohort ``seed`` at 2 mm, as a ``Case`` plus its truth.

    The images come from ``cohort.simulate_subject`` itself (the code that ``msgate synth`` writes to
    DICOM), so the in-memory training data and a study sent through the listener are the same
    arrays (QSM brain-masked as acquired there)."""
    cfg = cohort.CohortConfig(Path("."), seed, dict(mix or {"ms": 0.7, "csvd": 0.3}), resolution=2,
                              missing_rate=missing_rate)
    sub = cohort.simulate_subject(cfg, index)
    lat, rng, maps = sub.latent, sub.rng, sub.lesions
    true_ehr = true_values(lat, copy.deepcopy(rng))
    obs = sample_ehr(lat, datetime.strptime(sub.study.study_date, "%Y%m%d").date(), missing_rate, rng)
    vols = {p.role: _volume(s.pixels, s.slope, s.intercept, s.affine, p.role) for p, s in zip(sub.plans, sub.series)}
    case = Case(f"syn-{seed}-{index}", vols, ehr_vector({o.name: o.value for o in obs}))
    truth = Truth(lat.edss, edss_class(lat.edss), int(lat.diagnosis == "ms"), sum(les.rim for les in maps.lesions),
                  sum(les.volume_mm3 for les in maps.lesions) / 1000.0, len(maps.lesions), dict(true_ehr),
                  lat.severity, lat.atrophy)
    return case, truth


def case_arrays(case: Case, preset: Preset, source: LesionSource) -> dict[str, NDArray[np.float32]]:
    """Everything training needs from one case: model-grid image, masks, EHR and lesion features
    (plus ``rim_patches``, the Rim+ classifier's inputs, when the source is the lesion model)."""
    with_patches = getattr(source, "with_patches", None)
    les, patches = with_patches(case.volumes) if with_patches else (source(case.volumes), None)
    mi = prepare(case.volumes, les.labels, preset)
    x, m = raw_columns(case.ehr)
    qsm = "QSM" in case.volumes
    out = {"image": mi.image.astype(np.float16), "present": mi.present, "ehr_x": x, "ehr_m": m,
           "lesion": lesion_features(les.findings, qsm)}
    if patches is not None:
        out["rim_patches"] = patches.astype(np.float16)
    return out


_SOURCES: dict[str, LesionSource] = {}


def generator_id() -> str:
    """First 12 hex digits of the SHA-256 over the synthetic generator's sources (``msgate.model.synth``):
    caches made by different generator versions must not be mixed."""
    import hashlib

    folder = Path(cohort.__file__).resolve().parent
    digest = hashlib.sha256()
    for f in sorted(folder.glob("*.py")):
        digest.update(f.read_bytes())
    return digest.hexdigest()[:12]


def _source(kind: str) -> LesionSource:
    """One lesion source per process (the checkpoint is loaded once, not per subject)."""
    if kind not in _SOURCES:
        _SOURCES[kind] = load_lesion_source(kind)
    return _SOURCES[kind]


def _one(args: tuple[int, int, str, float, str]) -> dict[str, object]:
    seed, index, preset_name, missing_rate, lesion_kind = args
    case, truth = synth_case(seed, index, missing_rate)
    arrs: dict[str, object] = dict(case_arrays(case, get_preset(preset_name), _source(lesion_kind)))
    arrs.update(edss=truth.edss, edss_class=truth.edss_class, ms=truth.ms, n_rim=truth.n_rim,
                true_load=truth.true_lesion_load_ml, true_count=truth.true_lesion_count,
                true_severity=truth.severity, true_atrophy=truth.atrophy,
                true_ehr=raw_columns(ehr_vector(truth.true_ehr))[0], index=index)
    return arrs


def stack_rows(rows: list[dict[str, object]]) -> dict[str, NDArray[np.generic]]:
    """Per-subject rows -> arrays; Rim+ patches are concatenated with their subject index (``rim_row``)."""
    out = {k: np.stack([np.asarray(r[k]) for r in rows]) for k in rows[0] if k != "rim_patches"}
    if "rim_patches" in rows[0]:
        pats = [np.asarray(r["rim_patches"]) for r in rows]
        out["rim_patches"] = np.concatenate(pats)
        out["rim_row"] = np.concatenate([np.full(len(p), int(r["index"])) for p, r in zip(pats, rows)])  # type: ignore[call-overload]
    return out


def build_cache(path: Path, seed: int, n: int, preset: str, missing_rate: float = 0.1, workers: int = 1,
                start: int = 1, lesion_kind: str = "heuristic") -> Path:
    """Simulate subjects ``start .. start + n - 1`` of ``seed`` and save their arrays as one ``.npz``
    (with the lesion source kind and, for the lesion model, its checkpoint id)."""
    src = load_lesion_source(lesion_kind)
    kind = source_kind(src)
    _SOURCES[kind] = src
    jobs = [(seed, i, preset, missing_rate, kind) for i in range(start, start + n)]
    load_template(2)
    if workers > 1:  # forked workers run torch on one thread: an OpenMP pool inherited across fork deadlocks
        import torch

        with multiprocessing.get_context("fork").Pool(workers, initializer=torch.set_num_threads,
                                                      initargs=(1,)) as pool:
            rows = list(pool.imap(_one, jobs, chunksize=2))
    else:
        rows = [_one(j) for j in jobs]
    out = stack_rows(rows)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".part.npz")
    np.savez(tmp, seed=np.asarray(seed), lesion_source=np.asarray(kind), generator=np.asarray(generator_id()),
             lesion_checkpoint=np.asarray(str(getattr(src, "checkpoint", ""))), **out)
    tmp.replace(path)
    return path


def build_chunks(folder: Path, seed: int, n: int, preset: str, *, chunk: int = 100, start: int = 1,
                 workers: int = 1, lesion_kind: str = "heuristic", missing_rate: float = 0.1) -> Path:
    """Subjects ``start .. start + n - 1`` of ``seed`` as ``chunk``-subject files in ``folder``; files
    already there from the same lesion checkpoint and generator are kept (an interrupted run resumes)."""
    want = (_current_checkpoint(lesion_kind), generator_id())
    for s in range(start, start + n, chunk):
        m = min(chunk, start + n - s)
        path = folder / f"s{seed}-{s:05d}-{s + m - 1:05d}.npz"
        if path.is_file():
            with np.load(path) as f:
                if (str(f["lesion_checkpoint"]), str(f["generator"]) if "generator" in f.files else "") == want:
                    continue
        build_cache(path, seed, m, preset, missing_rate, workers, s, lesion_kind)
    return folder


def _current_checkpoint(lesion_kind: str) -> str:
    if source_kind(_source(lesion_kind)) == "heuristic":
        return ""
    from msgate.model.patient.lesionmodel import checkpoint_id

    return checkpoint_id()


def refresh_rims(path: Path, source: LesionSource) -> bool:
    """Recompute the Rim+ count feature of a cache file with ``source``'s Rim+ classifier (segmentation
    must be unchanged: only the stored Rim+ patches are re-scored). Returns True when the file changed."""
    from msgate.model.patient.train import RIM_FEATURE

    z = dict(np.load(path))
    ck = str(getattr(source, "checkpoint", ""))
    if "rim_patches" not in z or str(z["lesion_checkpoint"]) == ck:
        return False
    probs = source.rim_probabilities(z["rim_patches"])  # type: ignore[attr-defined]
    counts = {int(i): 0 for i in z["index"]}
    for row, p in zip(z["rim_row"], probs):
        counts[int(row)] += int(p >= 0.5)
    qsm = z["present"][:, 0] > 0
    z["lesion"][:, RIM_FEATURE] = np.where(qsm, np.log1p([counts[int(i)] for i in z["index"]]), 0.0)
    z["lesion_checkpoint"] = np.asarray(ck)
    tmp = path.with_name(path.stem + ".part.npz")
    np.savez(tmp, **z)
    tmp.replace(path)
    return True
