"""Synthetic cohort files: DICOM readable (pydicom, dcmdump), HL7 parsable, reproducible."""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

import pydicom
import pytest
from hl7apy.parser import parse_message
from pydicom import config

from msgate.model.synth.cohort import generate_cohort


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synth")
    generate_cohort(out, 3, seed=7, resolution=2, mix={"ms": 0.5, "csvd": 0.5})
    return out


@pytest.fixture(autouse=True)
def strict_pydicom():
    old = config.settings.reading_validation_mode
    config.settings.reading_validation_mode = config.RAISE
    yield
    config.settings.reading_validation_mode = old


def _digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_layout_and_labels(cohort: Path) -> None:
    records = [json.loads(line) for line in (cohort / "labels.jsonl").read_text().splitlines()]
    assert [r["subject"] for r in records] == ["SYN0000001", "SYN0000002", "SYN0000003"]
    for r in records:
        assert (cohort / r["mask"]).exists()
        assert {s["role"] for s in r["series"]} == {"FLAIR", "T1", "QSM"}
        assert r["edss"] in [0.0] + [1.0 + 0.5 * i for i in range(18)]
        for les in r["lesions"]:
            assert les["location"] in {"periventricular", "juxtacortical", "infratentorial", "deep_wm"}


def test_dicom_reads_with_pydicom(cohort: Path) -> None:
    rec = json.loads((cohort / "labels.jsonl").read_text().splitlines()[0])
    for s in rec["series"]:
        files = sorted((cohort / s["dir"]).glob("*.dcm"))
        ds = pydicom.dcmread(files[len(files) // 2])
        assert ds.SOPClassUID == pydicom.uid.MRImageStorage
        assert ds.AccessionNumber == rec["accession"]
        assert ds.StudyInstanceUID == rec["study_uid"]
        assert str(ds.PatientName).startswith("SYNTH^PATIENT")
        assert ds.pixel_array.shape == (ds.Rows, ds.Columns)


def test_dcmdump_reads_without_errors(cohort: Path) -> None:
    files = sorted((cohort / "dicom" / "SYN0000001").rglob("*.dcm"))[::20]
    proc = subprocess.run(["dcmdump", "-q", *map(str, files)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "E:" not in proc.stderr and "W:" not in proc.stderr


def test_hl7_parses_with_hl7apy(cohort: Path) -> None:
    rec = json.loads((cohort / "labels.jsonl").read_text().splitlines()[0])
    msgs = {}
    for rel in rec["hl7"]:
        text = (cohort / rel).read_bytes().decode("ascii")
        msg = parse_message(text, find_groups=False)
        msgs[msg.msh.msh_9.to_er7()] = msg
    assert set(msgs) == {"ADT^A04^ADT_A01", "ORM^O01^ORM_O01", "ORU^R01^ORU_R01"}
    orm = msgs["ORM^O01^ORM_O01"]
    assert orm.obr.obr_18.to_er7() == rec["accession"]
    assert orm.orc.orc_2.to_er7() == orm.obr.obr_2.to_er7()
    assert orm.orc.orc_3.to_er7() == orm.obr.obr_3.to_er7()
    oru = msgs["ORU^R01^ORU_R01"]
    for obx in oru.obx:
        assert obx.obx_14.to_er7() < rec["study_date"] + "9999"
        assert obx.obx_14.to_er7()[:8] < rec["study_date"]


@pytest.mark.parametrize("ts", ["j2k", "rle"])
def test_compressed_transfer_syntaxes_decode(tmp_path: Path, ts: str) -> None:
    generate_cohort(tmp_path, 1, seed=3, ts=ts, resolution=2, protocol="2d")
    files = sorted((tmp_path / "dicom").rglob("*.dcm"))
    ref = {"j2k": pydicom.uid.JPEG2000Lossless, "rle": pydicom.uid.RLELossless}[ts]
    for f in files[::15]:
        ds = pydicom.dcmread(f)
        assert ds.file_meta.TransferSyntaxUID == ref
        assert ds.pixel_array.shape == (ds.Rows, ds.Columns)


def test_same_seed_same_bytes(tmp_path: Path) -> None:
    generate_cohort(tmp_path / "a", 2, seed=11, resolution=2, protocol="2d")
    generate_cohort(tmp_path / "b", 2, seed=11, resolution=2, protocol="2d", workers=2)
    da, db = _digest(tmp_path / "a"), _digest(tmp_path / "b")
    assert da and da == db
    generate_cohort(tmp_path / "c", 2, seed=12, resolution=2, protocol="2d")
    assert _digest(tmp_path / "c")["labels.jsonl"] != da["labels.jsonl"]


def test_enhanced_multiframe_is_readable_and_reproducible(tmp_path: Path) -> None:
    for name in ("a", "b"):
        generate_cohort(tmp_path / name, 1, seed=5, resolution=2, protocol="2d", enhanced=True)
    files = sorted((tmp_path / "a" / "dicom").rglob("*.dcm"))
    assert len(files) == 3
    ds = pydicom.dcmread(files[0])
    assert ds.SOPClassUID == pydicom.uid.LegacyConvertedEnhancedMRImageStorage
    assert ds.pixel_array.shape == (int(ds.NumberOfFrames), ds.Rows, ds.Columns)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
