"""In-memory synthetic cases for training and evaluation (no DICOM round trip).

Uses the synthetic cohort's own simulation (``msgate.model.synth``): the same subject as
``msgate synth`` writes for ``(seed, index)``, converted to the model contract's :class:`Volume`
geometry. ``rim_enrich`` redraws the Rim+ flag of MS lesions with a higher probability, which is
only used for the classifier's *training* cohort (Rim+ is 6-13 % of lesions otherwise).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
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
    labels: NDArray[np.uint16]  # [k, r, c], lesion ids, on the subject grid of ``labels_affine``
    lesions: tuple[TruthLesion, ...]
    labels_affine: NDArray[np.float64] | None = None  # LPS on (c, r, k); None: the FLAIR grid


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
    vols = {p.role: series_to_volume(acquire(images[p.role], p.acq, an.affine, rng, an), p.role) for p in plans}
    truth = tuple(TruthLesion(les.id, les.location, les.rim, les.kind, les.volume_mm3) for les in maps.lesions)
    labels = np.ascontiguousarray(maps.labels.transpose(2, 1, 0))
    return SynthCase(st.patient_id, lat.diagnosis, vols, labels, truth, _LPS @ np.asarray(an.affine, np.float64))


def _read_series(folder: Path, role: str) -> Volume:
    """One classic (single-frame) DICOM series folder -> Volume, sorted along the slice normal."""
    import pydicom

    dss = [pydicom.dcmread(f) for f in sorted(folder.iterdir()) if f.is_file()]
    iop = np.asarray(dss[0].ImageOrientationPatient, np.float64)
    normal = np.cross(iop[:3], iop[3:])
    dss.sort(key=lambda d: float(np.dot(normal, np.asarray(d.ImagePositionPatient, np.float64))))
    data = np.stack([d.pixel_array.astype(np.float32) * float(getattr(d, "RescaleSlope", 1.0))
                     + float(getattr(d, "RescaleIntercept", 0.0)) for d in dss])
    row_sp, col_sp = (float(v) for v in dss[0].PixelSpacing)
    p0 = np.asarray(dss[0].ImagePositionPatient, np.float64)
    step = ((np.asarray(dss[-1].ImagePositionPatient, np.float64) - p0) / (len(dss) - 1) if len(dss) > 1
            else normal * float(getattr(dss[0], "SliceThickness", 1.0)))
    aff = np.eye(4)
    aff[:3, 0], aff[:3, 1], aff[:3, 2], aff[:3, 3] = iop[:3] * col_sp, iop[3:] * row_sp, step, p0
    return Volume(data, aff, role)  # type: ignore[arg-type]


def load_synth_folder(folder: Path | str, limit: int | None = None) -> Iterator[SynthCase]:
    """Cases of a ``msgate synth`` output folder: DICOM series, NIfTI lesion masks, labels.jsonl."""
    import json

    import nibabel as nib

    root = Path(folder)
    with open(root / "labels.jsonl", encoding="utf-8") as fh:
        records = [json.loads(line) for line in fh if line.strip()]
    for rec in records[:limit]:
        vols = {str(s["role"]): _read_series(root / str(s["dir"]), str(s["role"])) for s in rec["series"]}
        img = nib.load(root / rec["mask"])
        labels = np.ascontiguousarray(np.asarray(img.dataobj).astype(np.uint16).transpose(2, 1, 0))
        truth = tuple(TruthLesion(int(les["id"]), str(les["location"]), bool(les["rim"]), str(les["kind"]),
                                  float(les["volume_mm3"])) for les in rec["lesions"])
        yield SynthCase(str(rec["subject"]), str(rec["diagnosis"]), vols, labels, truth,
                        _LPS @ np.asarray(img.affine, np.float64))
