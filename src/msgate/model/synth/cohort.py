"""Synthetic MS / cSVD cohort: DICOM studies, HL7 files, lesion masks and labels.jsonl.

Output layout under ``out_dir``::

    dicom/SYN0000001/S001/0001.dcm ...   one study per subject, one folder per series
    hl7/SYN0000001_1_ADT_A04.hl7         ADT^A04, ORM^O01, ORU^R01 (ER7, CR-separated)
    masks/SYN0000001_lesions.nii.gz      lesion label map (ids as in labels.jsonl)
    labels.jsonl                         one line per subject

Every random draw comes from ``SeedSequence([seed, subject index])``, UIDs
are hashes of the seed and index, and dates are derived from the seed, so
the same arguments give byte-identical files, whatever the number of workers.
"""

from __future__ import annotations

import gzip
import json
import multiprocessing
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from pathlib import Path

import nibabel as nib
import numpy as np
from numpy.typing import NDArray

from msgate.model.synth.anatomy import Anatomy, WarpParams, load_template, make_anatomy
from msgate.model.synth.contrasts import Series, acquire, tissue_images
from msgate.model.synth.dicom_writer import TRANSFER_SYNTAXES, SeriesInfo, StudyInfo, uid, write_series
from msgate.model.synth.ehr import Observation, sample_ehr
from msgate.model.synth.hl7_writer import Hl7Context, adt_a04, orm_o01, oru_r01
from msgate.model.synth.latent import Diagnosis, Latent, sample_latent
from msgate.model.synth.lesions import LesionMaps, place_lesions, sample_specs
from msgate.model.synth.protocols import VENDORS, SeriesPlan, plan_series


@dataclass(frozen=True)
class CohortConfig:
    """Arguments of a cohort run (see ``generate_cohort``)."""

    out_dir: Path
    seed: int = 0
    mix: dict[str, float] = field(default_factory=lambda: {"ms": 0.7, "csvd": 0.3})
    ts: str = "explicit"
    missing_rate: float = 0.1
    protocol: str = "mixed"
    resolution: int = 1
    enhanced: bool = False


def subject_rng(seed: int, index: int) -> np.random.Generator:
    """Independent, reproducible stream for one subject."""
    return np.random.default_rng(np.random.SeedSequence([seed, index]))


def _diagnosis(mix: dict[str, float], rng: np.random.Generator) -> Diagnosis:
    keys = sorted(mix)
    p = np.array([mix[k] for k in keys], dtype=np.float64)
    choice = keys[int(rng.choice(len(keys), p=p / p.sum()))]
    if choice not in ("ms", "csvd"):
        raise ValueError(f'Argument "mix" has unknown diagnosis "{choice}".')
    return "ms" if choice == "ms" else "csvd"


def _study_info(cfg: CohortConfig, index: int, age: float, sex: str, rng: np.random.Generator) -> StudyInfo:
    base = date(2025, 1, 6) + timedelta(days=int(cfg.seed % 365))
    when = datetime.combine(base + timedelta(days=int(rng.integers(0, 365))), datetime.min.time())
    when += timedelta(minutes=int(rng.integers(7 * 60, 19 * 60)))
    birth = when.date() - timedelta(days=int(age * 365.25))
    vendor = sorted(VENDORS)[int(rng.integers(len(VENDORS)))]
    model, field_t, _ = VENDORS[vendor]
    return StudyInfo(
        patient_name=f"SYNTH^PATIENT{index:04d}", patient_id=f"SYN{index:07d}",
        birth_date=birth.strftime("%Y%m%d"), sex=sex, age=f"{int(age):03d}Y",
        study_uid=uid("study", cfg.seed, index), frame_uid=uid("frame", cfg.seed, index),
        study_date=when.strftime("%Y%m%d"), study_time=when.strftime("%H%M%S"),
        accession=f"SA{cfg.seed % 1000:03d}{index:07d}", study_id=f"{index % 10**8}",
        manufacturer=vendor, model=model, field_strength=field_t,
    )


def _write_mask(maps: LesionMaps, affine: NDArray[np.float64], path: Path) -> None:
    """Lesion label map as NIfTI; gzip with mtime 0 so the bytes are reproducible."""
    img = nib.Nifti1Image(maps.labels, affine)
    img.header.set_data_dtype(np.uint16)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(img.to_bytes(), compresslevel=6, mtime=0))


def _write_hl7(cfg: CohortConfig, st: StudyInfo, obs: list[Observation], edss: float, rng: np.random.Generator) -> list[str]:
    scan = datetime.strptime(st.study_date + st.study_time, "%Y%m%d%H%M%S")
    family, given = st.patient_name.split("^")
    ctx = Hl7Context(st.patient_id, family, given, st.birth_date, st.sex, st.accession,
                     f"PL{st.patient_id[3:]}", f"FI{st.patient_id[3:]}", scan)
    edss_day = scan.date() - timedelta(days=int(rng.integers(1, 60)))
    msgs = [("1_ADT_A04", adt_a04(ctx, scan - timedelta(days=21))),
            ("2_ORM_O01", orm_o01(ctx, scan - timedelta(days=14))),
            ("3_ORU_R01", oru_r01(ctx, obs, (edss, edss_day), scan - timedelta(days=1)))]
    out = []
    for name, text in msgs:
        path = cfg.out_dir / "hl7" / f"{st.patient_id}_{name}.hl7"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(text.encode("ascii"))
        out.append(str(path.relative_to(cfg.out_dir)))
    return out


@dataclass
class Subject:
    """Everything simulated for one subject, before anything is written."""

    latent: Latent
    study: StudyInfo
    anatomy: Anatomy
    lesions: LesionMaps
    plans: list[SeriesPlan]
    series: list[Series]
    rng: np.random.Generator


def simulate_subject(cfg: CohortConfig, index: int) -> Subject:
    """Draw latent, anatomy, lesions and the acquired series of one subject (no I/O)."""
    rng = subject_rng(cfg.seed, index)
    lat = sample_latent(_diagnosis(cfg.mix, rng), rng)
    st = _study_info(cfg, index, lat.age, lat.sex, rng)
    an = make_anatomy(load_template(cfg.resolution), WarpParams.sample(rng), lat.atrophy, rng)
    maps = place_lesions(sample_specs(lat, rng), an, rng)
    images = tissue_images(an, maps, rng)
    plans = plan_series(st.manufacturer, cfg.protocol, rng)
    series = [acquire(images[p.role], p.acq, an.affine, rng, an) for p in plans]
    return Subject(lat, st, an, maps, plans, series, rng)


def _write_dicom(cfg: CohortConfig, sub: Subject, index: int) -> list[dict[str, object]]:
    out = []
    for number, (plan, s) in enumerate(zip(sub.plans, sub.series), start=1):
        se = SeriesInfo(uid("series", cfg.seed, index, number), number, plan.description, plan.protocol_name)
        folder = cfg.out_dir / "dicom" / sub.study.patient_id / f"S{number:03d}"
        write_series(s, sub.study, se, folder, cfg.ts, cfg.enhanced)
        out.append({"role": plan.role, "series_uid": se.uid, "description": plan.description,
                    "protocol_name": plan.protocol_name, "mode": plan.acq.mode,
                    "slice_thickness_mm": float(s.affine[2, 2]), "dir": str(folder.relative_to(cfg.out_dir))})
    return out


def generate_subject(cfg: CohortConfig, index: int) -> dict[str, object]:
    """Generate and write one subject; returns its labels.jsonl record."""
    sub = simulate_subject(cfg, index)
    lat, st, maps, rng = sub.latent, sub.study, sub.lesions, sub.rng
    series = _write_dicom(cfg, sub, index)
    mask = cfg.out_dir / "masks" / f"{st.patient_id}_lesions.nii.gz"
    _write_mask(maps, sub.anatomy.affine, mask)
    obs = sample_ehr(lat, datetime.strptime(st.study_date, "%Y%m%d").date(), cfg.missing_rate, rng)
    hl7 = _write_hl7(cfg, st, obs, lat.edss, rng)
    return {
        "subject": st.patient_id, "accession": st.accession, "study_uid": st.study_uid,
        "study_date": st.study_date, "edss": lat.edss, "diagnosis": lat.diagnosis,
        "latent": lat.to_dict(), "ehr": {o.name: o.value for o in obs}, "series": series,
        "lesions": [les.to_dict() for les in maps.lesions],
        "lesion_load_mm3": round(sum(les.volume_mm3 for les in maps.lesions), 1),
        "n_rim": sum(les.rim for les in maps.lesions),
        "mask": str(mask.relative_to(cfg.out_dir)), "hl7": hl7,
    }


def _work(args: tuple[CohortConfig, int]) -> dict[str, object]:
    return generate_subject(*args)


def _tick(record: dict[str, object], progress: Callable[[], None] | None) -> dict[str, object]:
    if progress is not None:
        progress()
    return record


def generate_cohort(out_dir: Path | str, patients: int, seed: int = 0,
                    mix: dict[str, float] | None = None, ts: str = "explicit", missing_rate: float = 0.1,
                    protocol: str = "mixed", resolution: int = 1, enhanced: bool = False,
                    workers: int = 1, progress: Callable[[], None] | None = None) -> list[dict[str, object]]:
    """Write ``patients`` subjects under ``out_dir`` and ``labels.jsonl``; returns the records.

    ``progress`` is called once per finished subject (the CLI drives a progress bar with it).
    """
    if ts not in TRANSFER_SYNTAXES:
        raise ValueError(f'Argument "ts" must be one of {sorted(TRANSFER_SYNTAXES)}.')
    if resolution not in (1, 2):
        raise ValueError('Argument "resolution" must be 1 or 2.')
    cfg = CohortConfig(Path(out_dir), seed, dict(mix or {"ms": 0.7, "csvd": 0.3}), ts, missing_rate,
                       protocol, resolution, enhanced)
    cfg.out_dir.mkdir(parents=True, exist_ok=True)
    jobs = [(cfg, i) for i in range(1, patients + 1)]
    if workers > 1:
        load_template(resolution)  # forked workers inherit the cached template
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            records = [_tick(r, progress) for r in pool.imap(_work, jobs)]
    else:
        records = [_tick(_work(j), progress) for j in jobs]
    with open(cfg.out_dir / "labels.jsonl", "w", encoding="utf-8") as fh:
        for rec in records:
            fh.write(json.dumps(rec, sort_keys=True) + "\n")
    return records
