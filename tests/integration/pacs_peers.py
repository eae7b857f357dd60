"""Result peers for tests: DCMTK storescp and Orthanc on free ports with their own config and storage,
a pynetdicom SCP that can answer 0xA700 first, an MLLP receiver built on python-hl7, and a synthetic
FLAIR series with a ModelResult in its grid (lesion mask + heatmap)."""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

from msgate.model.types import LesionFinding, ModelResult

PEER_ENV = {**os.environ, "TCP_NODELAY": "1"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# --- synthetic case ---------------------------------------------------------------------------------


def flair_series(n: int = 12, rows: int = 40, cols: int = 48, *, seed: int = 0, shuffle: bool = True,
                 study_uid: str | None = None) -> list[Dataset]:
    """An oblique-free axial FLAIR series (LPS, slices along +z), returned in a shuffled order."""
    rng = np.random.default_rng(seed)
    study_uid, series_uid, frame_uid = study_uid or generate_uid(), generate_uid(), generate_uid()
    out = []
    for k in range(n):
        ds = Dataset()
        ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, generate_uid()
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study_uid, series_uid, frame_uid
        ds.PatientName, ds.PatientID, ds.IssuerOfPatientID = "RESULTS^TEST", "MRN-R-1", "HOSP"
        ds.PatientBirthDate, ds.PatientSex, ds.PatientAge = "19800202", "F", "046Y"
        ds.StudyDate, ds.StudyTime, ds.StudyID = "20261120", "101500", "S1"
        ds.AccessionNumber, ds.ReferringPhysicianName, ds.StudyDescription = "ACC-R-1", "REF^DOC", "MRI HEAD"
        ds.Modality, ds.SeriesDescription, ds.SeriesNumber, ds.InstanceNumber = "MR", "AX FLAIR", 3, k + 1
        ds.Manufacturer, ds.SeriesDate, ds.SeriesTime = "SYNTH", "20261120", "102000"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "ND"]
        ds.ImagePositionPatient = [-24.0, -30.0, -20.0 + 3.0 * k]
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        ds.PixelSpacing, ds.SliceThickness, ds.SpacingBetweenSlices = [1.25, 1.0], 3.0, 3.0
        ds.Rows, ds.Columns = rows, cols
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.ScanningSequence, ds.SequenceVariant, ds.ScanOptions, ds.MRAcquisitionType = "IR", "SK", "", "2D"
        ds.EchoTime, ds.RepetitionTime, ds.InversionTime = 120.0, 9000.0, 2500.0
        img = (rng.normal(800, 60, (rows, cols)).clip(0, 4095)).astype(np.uint16)
        ds.PixelData = img.tobytes()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        out.append(ds)
    if shuffle:
        order = rng.permutation(n)
        out = [out[i] for i in order]
    return out


def encode(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def model_result(shape: tuple[int, int, int], *, qsm: bool = True, version: str = "0.3.1",
                 edss: float = 3.5) -> ModelResult:
    """Three lesions (one Rim+) as blocks in the (k, r, c) grid, and a Gaussian heatmap."""
    mask = np.zeros(shape, dtype=np.int16)
    mask[2:4, 5:9, 6:11] = 1
    mask[5:8, 20:24, 30:34] = 2
    mask[9, 30:33, 10:12] = 3
    k, r, c = np.indices(shape)
    heat = np.exp(-(((k - 6) / 3) ** 2 + ((r - 22) / 8) ** 2 + ((c - 32) / 8) ** 2)).astype(np.float32)
    voxel_ml = 1.25 * 1.0 * 3.0 / 1000
    lesions = tuple(
        LesionFinding(label=label, volume_ml=float((mask == label).sum() * voxel_ml), centroid_lps=(0.0, 0.0, 0.0),
                      location=loc, rim_probability=(p if qsm else None))
        for label, loc, p in ((1, "periventricular", 0.12), (2, "juxtacortical", 0.91), (3, "deep_wm", 0.33))
    )
    return ModelResult(
        case_id="case-1", model_name="msgate-ms", model_version=version,
        edss_probabilities=(0.1, 0.6, 0.2, 0.1), edss_estimate=edss, confidence=0.6, uncertainty=0.35,
        p_ms=0.87, lesions=lesions, lesion_mask=mask, heatmap=heat,
        flags=() if qsm else ("qsm_absent",),
    )


# --- DCMTK storescp ---------------------------------------------------------------------------------


@dataclass
class StoreScp:
    port: int
    ae_title: str
    folder: Path
    proc: subprocess.Popen[bytes]

    def files(self) -> list[Path]:
        return sorted(p for p in self.folder.rglob("*") if p.is_file())

    def datasets(self) -> list[Dataset]:
        return [dcmread(p) for p in self.files()]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def wait_port(port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {port}")


def start_storescp(folder: Path, *, port: int | None = None, ae_title: str = "STORESCP") -> StoreScp:
    """storescp accepting every storage SOP class (+xa), one file per instance (-uf: named by SOP UID)."""
    port = port or free_port()
    folder.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(["storescp", "-aet", ae_title, "+xa", "-uf", "-od", str(folder), str(port)],
                            env=PEER_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_port(port)
    return StoreScp(port, ae_title, folder, proc)


# --- Orthanc ----------------------------------------------------------------------------------------


@dataclass
class Orthanc:
    dicom_port: int
    http_port: int
    ae_title: str
    folder: Path
    proc: subprocess.Popen[bytes]

    def get(self, path: str) -> object:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}{path}", timeout=10) as rsp:
            return json.loads(rsp.read())

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def start_orthanc(folder: Path, *, ae_title: str = "ORTHANC") -> Orthanc:
    if shutil.which("Orthanc") is None:
        raise FileNotFoundError("Orthanc")
    folder.mkdir(parents=True, exist_ok=True)
    dicom_port, http_port = free_port(), free_port()
    config = {
        "Name": "msgate-test", "StorageDirectory": str(folder / "storage"), "IndexDirectory": str(folder / "index"),
        "DicomAet": ae_title, "DicomPort": dicom_port, "HttpPort": http_port, "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False, "DicomCheckCalledAet": False, "Plugins": [],
        "UnknownSopClassAccepted": True, "DicomAlwaysAllowStore": True, "StableAge": 1,
    }
    path = folder / "orthanc.json"
    path.write_text(json.dumps(config))
    log = (folder / "orthanc.log").open("wb")
    proc = subprocess.Popen(["Orthanc", str(path)], env=PEER_ENV, stdout=log, stderr=subprocess.STDOUT)
    wait_port(http_port, 30)
    wait_port(dicom_port, 30)
    return Orthanc(dicom_port, http_port, ae_title, folder, proc)


# --- pynetdicom SCP answering a scripted status -----------------------------------------------------


@dataclass
class ScriptedScp:
    """A storage SCP that answers ``statuses`` in turn (then 0x0000) and records what it kept."""

    port: int
    statuses: list[int]
    received: list[Dataset] = field(default_factory=list)
    answered: list[int] = field(default_factory=list)
    delay: float = 0.0
    server: object = None

    def stop(self) -> None:
        self.server.shutdown()  # type: ignore[attr-defined]


def start_scripted_scp(statuses: list[int], *, delay: float = 0.0, ae_title: str = "SCRIPTED",
                       require_called_aet: bool = False) -> ScriptedScp:
    from pynetdicom import AE, AllStoragePresentationContexts, evt
    from pynetdicom.sop_class import Verification

    scp = ScriptedScp(free_port(), list(statuses), delay=delay)
    lock = threading.Lock()

    def on_store(event: evt.Event) -> int:
        if scp.delay:
            time.sleep(scp.delay)
        with lock:
            status = scp.statuses.pop(0) if scp.statuses else 0x0000
            scp.answered.append(status)
            if status in (0x0000, 0xB000, 0xB007, 0xB006):
                ds = event.dataset
                ds.file_meta = event.file_meta
                scp.received.append(ds)
        return status

    ae = AE(ae_title=ae_title)
    ae.require_called_aet = require_called_aet
    ae.supported_contexts = AllStoragePresentationContexts
    ae.add_supported_context(Verification)
    scp.server = ae.start_server(("127.0.0.1", scp.port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])
    return scp


# --- MLLP receiver (python-hl7) ---------------------------------------------------------------------


@dataclass
class MllpReceiver:
    """Answers each message with the next code of ``codes`` (then AA); keeps the raw messages."""

    port: int
    codes: list[str]
    messages: list[str] = field(default_factory=list)
    answered: list[str] = field(default_factory=list)
    thread: threading.Thread | None = None
    loop: object = None
    server: object = None

    def stop(self) -> None:
        import asyncio

        loop = self.loop
        assert isinstance(loop, asyncio.AbstractEventLoop)

        async def _close() -> None:
            self.server.close()  # type: ignore[attr-defined]

        asyncio.run_coroutine_threadsafe(_close(), loop).result(5)
        loop.call_soon_threadsafe(loop.stop)
        if self.thread:
            self.thread.join(5)


def start_mllp_receiver(codes: list[str] | None = None) -> MllpReceiver:
    import asyncio

    from hl7.mllp import start_hl7_server

    rx = MllpReceiver(free_port(), list(codes or []))
    ready = threading.Event()

    async def handle(reader: object, writer: object) -> None:
        try:
            while not writer.is_closing():  # type: ignore[attr-defined]
                message = await reader.readmessage()  # type: ignore[attr-defined]  # parsed by python-hl7
                code = rx.codes.pop(0) if rx.codes else "AA"
                rx.messages.append(str(message))
                rx.answered.append(code)
                writer.writemessage(message.create_ack(ack_code=code))  # type: ignore[attr-defined]
                await writer.drain()  # type: ignore[attr-defined]
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()  # type: ignore[attr-defined]

    def main() -> None:
        loop = asyncio.new_event_loop()
        rx.loop = loop
        asyncio.set_event_loop(loop)

        async def serve() -> None:
            rx.server = await start_hl7_server(handle, host="127.0.0.1", port=rx.port)
            ready.set()

        loop.run_until_complete(serve())
        loop.run_forever()

    rx.thread = threading.Thread(target=main, daemon=True)
    rx.thread.start()
    ready.wait(10)
    return rx


def iter_wait(predicate: object, timeout: float = 30.0, step: float = 0.1) -> Iterator[None]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return
        yield None
        time.sleep(step)
    raise TimeoutError("condition not met")


def wait_until(predicate: object, timeout: float = 30.0, step: float = 0.1) -> None:
    for _ in iter_wait(predicate, timeout, step):
        pass
