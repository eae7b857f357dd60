"""Fixtures and helpers for the DICOM listener tests: a real ``msgate serve --role dicom`` subprocess,
synthetic studies written with pydicom, DCMTK and pynetdicom senders, and read-back from the store."""

from __future__ import annotations

import io
import os
import signal
import socket
import subprocess
import sys
import time
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from msgate.config import load_settings
from msgate.listener.dataset import _dataset_start
from msgate.results.dicom_send import c_store
from msgate.storage.store import Store, open_store

REPO = Path(__file__).resolve().parents[2]
SHARED = REPO.parent / "shared"
CONFORMANCE = SHARED / "conformance" / "dicom"
ENHANCED_MR = "1.2.840.10008.5.1.4.1.1.4.1"
HTJ2K_LOSSLESS = "1.2.840.10008.1.2.4.201"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _save(ds: Dataset, path: Path, ts: str = ExplicitVRLittleEndian) -> Path:
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ts
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def _base(study_uid: str, series_uid: str, description: str, sop_class: str, number: int) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study_uid, series_uid, generate_uid()
    ds.PatientName, ds.PatientID, ds.AccessionNumber = "SYNTH^LISTENER", "MRN-SYN-1", "ACC-SYN-1"
    ds.PatientBirthDate, ds.PatientSex, ds.StudyDate, ds.StudyTime = "19800101", "F", "20261101", "101010"
    ds.StudyDescription, ds.BodyPartExamined = "MRI BRAIN MS PROTOCOL", "BRAIN"
    ds.Modality, ds.SeriesDescription, ds.ProtocolName, ds.SeriesNumber = "MR", description, description, number
    return ds


def _pixels(ds: Dataset, rows: int, cols: int, seed: int) -> np.ndarray:
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    return np.random.default_rng(seed).integers(0, 4000, (rows, cols), dtype=np.uint16)


def write_series(folder: Path, *, count: int, description: str = "AX FLAIR", study_uid: str | None = None,
                 number: int = 1, size: int = 64, scanning: tuple[str, ...] = ("SE", "IR"),
                 inversion_time: float = 2500.0) -> list[Path]:
    """A synthetic MR series (MR Image Storage, explicit VR LE), one file per slice."""
    study_uid = study_uid or generate_uid()
    series_uid = generate_uid()
    paths = []
    for index in range(count):
        ds = _base(study_uid, series_uid, description, "1.2.840.10008.5.1.4.1.1.4", number)
        ds.InstanceNumber, ds.ImagePositionPatient = index + 1, [0.0, 0.0, float(index)]
        ds.ImageOrientationPatient, ds.PixelSpacing, ds.SliceThickness = [1, 0, 0, 0, 1, 0], [1.0, 1.0], 1.0
        ds.ScanningSequence, ds.SequenceName = list(scanning), "*tir2d1_16"
        ds.InversionTime, ds.ImageType = inversion_time, ["ORIGINAL", "PRIMARY", "M", "ND"]
        ds.PixelData = _pixels(ds, size, size, number * 1000 + index).tobytes()
        paths.append(_save(ds, folder / f"s{number:02d}_{index:04d}.dcm"))
    return paths


def write_enhanced_mr(path: Path, *, frames: int = 8, study_uid: str | None = None) -> Path:
    """An Enhanced MR Image Storage multi-frame object (header reduced to what storage needs)."""
    ds = _base(study_uid or generate_uid(), generate_uid(), "3D FLAIR", ENHANCED_MR, 7)
    ds.InstanceNumber, ds.NumberOfFrames, ds.ImageType = 1, frames, ["ORIGINAL", "PRIMARY", "M", "NONE"]
    arr = np.stack([_pixels(ds, 32, 32, f) for f in range(frames)])
    ds.PixelData = arr.tobytes()
    return _save(ds, path)


def write_htj2k(path: Path, *, study_uid: str | None = None) -> Path:
    """An MR slice labelled HTJ2K lossless; the fragment is opaque to the listener (stored as received)."""
    ds = _base(study_uid or generate_uid(), generate_uid(), "AX FLAIR HTJ2K", "1.2.840.10008.5.1.4.1.1.4", 8)
    ds.InstanceNumber = 1
    _pixels(ds, 16, 16, 3)
    ds.PixelData = encapsulate([b"\xff\x4f\xff\x51" + os.urandom(301)])
    ds["PixelData"].VR = "OB"
    return _save(ds, path, HTJ2K_LOSSLESS)


def dataset_part(data: bytes) -> bytes:
    """The bytes after the Part-10 preamble and file meta (what travels in a C-STORE)."""
    return data[_dataset_start(data):]


def as_sent(data: bytes) -> bytes:
    """What a sender puts on the wire for a file: its dataset without Data Set Trailing Padding
    (FFFC,FFFC), which PS3.10 §7.2 keeps out of a C-STORE, a deflated dataset inflated (DCMTK
    re-deflates when it sends, with its own compression level), and encapsulated Pixel Data with
    the VR OB that PS3.5 §A.4 requires (DCMTK corrects pydicom's non-conformant OW test files)."""
    part = dataset_part(data).replace(b"\xe0\x7f\x10\x00OW\x00\x00\xff\xff\xff\xff",
                                      b"\xe0\x7f\x10\x00OB\x00\x00\xff\xff\xff\xff")
    ts = str(dcmread(io.BytesIO(data), stop_before_pixels=True, force=True).file_meta.TransferSyntaxUID)
    if ts == "1.2.840.10008.1.2.1.99":
        return zlib.decompress(part, -zlib.MAX_WBITS)
    for pad in (b"\xfc\xff\xfc\xffOB\x00\x00", b"\xff\xfc\xff\xfcOB\x00\x00", b"\xfc\xff\xfc\xff"):
        at = part.rfind(pad)
        if at >= 0 and at > len(part) - 65536:
            return part[:at]
    return part


@dataclass
class ListenerProc:
    home: Path
    port: int
    env: dict[str, str]
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path = field(init=False)

    def __post_init__(self) -> None:
        self.log_path = self.home / "listener.log"

    def start(self, timeout: float = 30.0) -> ListenerProc:
        self.home.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "msgate", "serve", "--role", "dicom"], env=self.env,
                                     stdout=log, stderr=subprocess.STDOUT, cwd=self.home)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"listener exited: {self.log_path.read_text(errors='replace')[-2000:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return self
            except OSError:
                time.sleep(0.05)
        raise TimeoutError("listener did not open its port")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def listener_env(home: Path, port: int, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MSGATE_")}
    env.update({"MSGATE_HOME": str(home), "MSGATE_DICOM__PORT": str(port), "MSGATE_STORAGE__MIN_FREE_BYTES": "0",
                "MSGATE_METRICS__ENABLED": "false", "MSGATE_LOG_LEVEL": "INFO", "TCP_NODELAY": "1", **extra})
    return env


@contextmanager
def running_listener(tmp: Path, **extra: str) -> Iterator[ListenerProc]:
    port = free_port()
    proc = ListenerProc(tmp / "home", port, listener_env(tmp / "home", port, **extra)).start()
    try:
        yield proc
    finally:
        proc.stop()


@contextmanager
def opened_store(home: Path) -> Iterator[Store]:
    store = open_store(load_settings(home=home, storage={"min_free_bytes": 0}), migrate=False, create_keys=False)
    try:
        yield store
    finally:
        store.close()


def storescu(port: int, files: list[Path], *extra: str, aet: str = "STORESCU", timeout: float = 120) -> \
        subprocess.CompletedProcess[str]:
    cmd = ["storescu", "-R", "-aet", aet, "-aec", "MSGATE", *extra, "127.0.0.1", str(port), *map(str, files)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env={**os.environ, "TCP_NODELAY": "1"})


def stored_bytes(store: Store) -> dict[str, list[bytes]]:
    """SOP Instance UID -> decrypted stored bytes of every version, oldest first."""
    from sqlmodel import col, select

    from msgate.storage.models import Instance

    out: dict[str, list[bytes]] = {}
    with store.db.session() as session:
        for inst in session.exec(select(Instance).order_by(col(Instance.version))).all():
            uid = store.cipher.decrypt(inst.sop_uid_enc, column="instance.sop_uid") or ""
            out.setdefault(uid, []).append(store.blobs.read(session, inst.blob_id))
    return out


def sop_uid(path: Path) -> str:
    return str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def pynd_send(port: int, items: list[Any], *, aet: str = "PYNDSCU", chunked: bool = False) -> list[int | None]:
    """Send datasets or paths with a pynetdicom SCU on one association; the status of each (None: no answer)."""
    from pynetdicom import AE, StoragePresentationContexts, _config
    from pynetdicom.presentation import build_context

    ae = AE(ae_title=aet)
    syntaxes = set()
    for item in items:
        ds = item if isinstance(item, Dataset) else dcmread(item, stop_before_pixels=True, force=True)
        syntaxes.add((str(ds.file_meta.MediaStorageSOPClassUID if "MediaStorageSOPClassUID" in ds.file_meta
                          else ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID)))
    contexts = [build_context(cls, ts) for cls, ts in sorted(syntaxes)] or StoragePresentationContexts[:1]
    ae.requested_contexts = contexts
    ae.dimse_timeout = ae.acse_timeout = 30
    old = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = chunked
    try:
        assoc = ae.associate("127.0.0.1", port, ae_title="MSGATE")
        if not assoc.is_established:
            return [None] * len(items)
        statuses: list[int | None] = []
        for item in items:
            status = c_store(assoc, item)
            statuses.append(int(status.Status) if status else None)
        assoc.release()
        return statuses
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = old


def raw_file(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def bytes_of(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()
