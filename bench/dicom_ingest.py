"""C-STORE ingest benchmark: DCMTK storescp, Orthanc, a bare pynetdicom SCP and msgate, side by side.

Each repetition runs every receiver once, interleaved, on the same synthetic MR studies (176 x
256x256 uint16 slices, explicit VR LE, 132 KB each), sent by DCMTK ``storescu`` with one association
per study: 4 studies one after another ("1 lane") and 4 at once ("4 lanes"). TCP_NODELAY=1 is set
for DCMTK and Orthanc (they honour it); pynetdicom sends every PDU in one ``send()``.

Reported: inst/s and MB/s (median of the repetitions), same-repetition ratios, msgate's time from
association release to ``ready``, and msgate's RSS after 200 and after 2,000 instances.

    .venv/bin/python bench/dicom_ingest.py --reps 3 [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.request
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
ENV = {**os.environ, "TCP_NODELAY": "1"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def make_study(folder: Path, seed: int, slices: int = 176, size: int = 256, description: str = "AX FLAIR") -> list[Path]:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    head = (((yy - size / 2) / (size * 0.42)) ** 2 + ((xx - size / 2) / (size * 0.36)) ** 2) < 1
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(slices):
        ds = Dataset()
        ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, generate_uid()
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.PatientName, ds.PatientID, ds.AccessionNumber = f"BENCH^{seed}", f"MRN{seed:06d}", f"ACC{seed:06d}"
        ds.PatientBirthDate, ds.PatientSex, ds.StudyDate, ds.StudyTime = "19800101", "F", "20261101", "101010"
        ds.StudyDescription, ds.BodyPartExamined, ds.Modality = "MRI BRAIN", "BRAIN", "MR"
        ds.SeriesDescription = ds.ProtocolName = description
        ds.SeriesNumber, ds.InstanceNumber = 1, index + 1
        ds.ScanningSequence, ds.SequenceVariant, ds.InversionTime = ["SE", "IR"], ["SK"], 2500.0
        ds.RepetitionTime, ds.EchoTime = 9000.0, 81.0
        ds.ImagePositionPatient, ds.ImageOrientationPatient = [0.0, 0.0, float(index)], [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing, ds.SliceThickness = [0.9, 0.9], 1.0
        ds.Rows = ds.Columns = size
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        img = head * 800 + rng.normal(0, 30, (size, size))
        ds.PixelData = np.clip(img, 0, 4095).astype(np.uint16).tobytes()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = MRImageStorage, ds.SOPInstanceUID
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        path = folder / f"{index:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"receiver exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"port {port} never opened")


def rss_kb(pid: int) -> int:
    total = 0
    for child in [pid, *_children(pid)]:
        try:
            for line in Path(f"/proc/{child}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total


def _children(pid: int) -> list[int]:
    """Every descendant (msgate's indexer process is started from a thread, so scan parent pids)."""
    kids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int(entry.joinpath("stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    kids.append(int(entry.name))
            except (OSError, ValueError, IndexError):
                continue
    return kids + [g for k in kids for g in _children(k)]


PYND_SCP = textwrap.dedent("""
    import os, sys, socket
    from pydicom.uid import AllTransferSyntaxes
    from pynetdicom import AE, evt, AllStoragePresentationContexts
    from pynetdicom.sop_class import Verification
    out, port = sys.argv[1], int(sys.argv[2])
    def store(event):
        name = os.path.join(out, event.request.AffectedSOPInstanceUID)
        with open(name, "wb") as fh:
            fh.write(event.encoded_dataset())
        return 0x0000
    ae = AE("PYND")
    ts = [str(t) for t in AllTransferSyntaxes]
    ae.add_supported_context(Verification, ts)
    for cx in AllStoragePresentationContexts:
        ae.add_supported_context(cx.abstract_syntax, ts)
    ae.maximum_associations = 32
    ae.start_server(("127.0.0.1", port), evt_handlers=[(evt.EVT_C_STORE, store)])
""")


class Receiver:
    name = ""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        raise NotImplementedError

    def count(self) -> int:
        raise NotImplementedError

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class StoreScp(Receiver):
    name, aet = "storescp", "STORESCP"

    def start(self) -> None:
        self.out = self.work / "out"
        self.out.mkdir(parents=True)
        self.proc = subprocess.Popen(["storescp", "--fork", "+xa", "-od", str(self.out), str(self.port)], env=ENV,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        wait_port(self.port, self.proc)

    def count(self) -> int:
        return sum(1 for _ in self.out.iterdir())

    def stop(self) -> None:
        if self.proc:
            os.killpg(self.proc.pid, 15)
            self.proc.wait()


class Orthanc(Receiver):
    name, aet = "orthanc", "ORTHANC"

    def start(self) -> None:
        self.http = free_port()
        config = {"Name": "bench", "StorageDirectory": str(self.work / "storage"),
                  "IndexDirectory": str(self.work / "index"), "DicomAet": "ORTHANC", "DicomPort": self.port,
                  "HttpPort": self.http, "RemoteAccessAllowed": False, "AuthenticationEnabled": False,
                  "DicomCheckCalledAet": False, "Plugins": [], "DicomAlwaysAllowStore": True}
        path = self.work / "orthanc.json"
        self.work.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(config))
        self.proc = subprocess.Popen(["Orthanc", str(path)], env=ENV, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        wait_port(self.port, self.proc)
        wait_port(self.http, self.proc)

    def count(self) -> int:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http}/statistics", timeout=10) as rsp:
            return int(json.load(rsp)["CountInstances"])


class PyndRaw(Receiver):
    name, aet = "pynd-raw", "PYND"

    def start(self) -> None:
        self.out = self.work / "out"
        self.out.mkdir(parents=True)
        script = self.work / "scp.py"
        script.write_text(PYND_SCP)
        self.proc = subprocess.Popen([PY, str(script), str(self.out), str(self.port)], env=ENV,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port(self.port, self.proc)

    def count(self) -> int:
        return sum(1 for _ in self.out.iterdir())


class Msgate(Receiver):
    name, aet = "msgate", "MSGATE"

    def __init__(self, work: Path, quiet: float = 10.0) -> None:
        super().__init__(work)
        self.quiet = quiet

    def start(self) -> None:
        self.home = self.work / "home"
        self.home.mkdir(parents=True)
        env = {k: v for k, v in ENV.items() if not k.startswith("MSGATE_")}
        env.update({"MSGATE_HOME": str(self.home), "MSGATE_DICOM__PORT": str(self.port),
                    "MSGATE_STORAGE__MIN_FREE_BYTES": "0", "MSGATE_METRICS__ENABLED": "false",
                    "MSGATE_LOG_LEVEL": "WARNING", "MSGATE_DICOM__QUIET_SECONDS": str(self.quiet)})
        self.proc = subprocess.Popen([PY, "-m", "msgate", "serve", "--role", "dicom"], env=env, cwd=self.home,
                                     stdout=subprocess.DEVNULL, stderr=(self.work / "log").open("wb"))
        wait_port(self.port, self.proc)

    def query(self, sql: str) -> list[tuple[object, ...]]:
        with sqlite3.connect(self.home / "msgate.db", timeout=30) as conn:
            return list(conn.execute(sql).fetchall())

    def count(self) -> int:
        return int(self.query("select count(*) from instance")[0][0])


def send(receiver: Receiver, studies: list[list[Path]], lanes: int) -> float:
    cmd = ["storescu", "-aec", receiver.aet, "127.0.0.1", str(receiver.port)]
    started = time.perf_counter()
    if lanes == 1:
        for files in studies:
            subprocess.run([*cmd, *map(str, files)], env=ENV, check=True, capture_output=True)
    else:
        procs = [subprocess.Popen([*cmd, *map(str, files)], env=ENV, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.PIPE) for files in studies]
        for proc in procs:
            if proc.wait() != 0:
                raise RuntimeError(f"storescu failed: {proc.stderr.read()[-500:] if proc.stderr else ''}")
    return time.perf_counter() - started


RECEIVERS = {"storescp": StoreScp, "orthanc": Orthanc, "pynd-raw": PyndRaw, "msgate": Msgate}


def run_matrix(data: Path, work: Path, reps: int, names: list[str]) -> dict[str, object]:
    studies = [make_study(data / f"study{i}", seed=i + 1) for i in range(4)]
    n = sum(len(s) for s in studies)
    mb = sum(p.stat().st_size for s in studies for p in s) / 1e6
    runs: list[dict[str, object]] = []
    for rep in range(reps):
        for lanes in (1, 4):
            for name in names:
                receiver = RECEIVERS[name](work / f"r{rep}-{lanes}-{name}")
                receiver.start()
                subprocess.run(["sync"], check=False)
                try:
                    wall = send(receiver, studies, lanes)
                    time.sleep(0.2)
                    got = receiver.count()
                finally:
                    receiver.stop()
                    shutil.rmtree(receiver.work, ignore_errors=True)
                runs.append({"rep": rep, "lanes": lanes, "receiver": name, "wall_s": wall, "instances": got,
                             "inst_s": n / wall, "mb_s": mb / wall, "complete": got == n})
                print(f"rep {rep} lanes {lanes} {name:9s} {n / wall:7.1f} inst/s {mb / wall:6.1f} MB/s "
                      f"({got}/{n})", flush=True)
    return {"instances": n, "mb": mb, "runs": runs}


def summarise(result: dict[str, object], names: list[str]) -> dict[str, object]:
    runs: list[dict[str, object]] = result["runs"]  # type: ignore[assignment]
    table: dict[str, object] = {}
    for lanes in (1, 4):
        for name in names:
            mine = [r for r in runs if r["lanes"] == lanes and r["receiver"] == name]
            table[f"{name}@{lanes}"] = {"inst_s": statistics.median(r["inst_s"] for r in mine),  # type: ignore[misc]
                                        "mb_s": statistics.median(r["mb_s"] for r in mine),  # type: ignore[misc]
                                        "complete": all(r["complete"] for r in mine)}
        for ref in ("orthanc", "storescp", "pynd-raw"):
            if ref in names and "msgate" in names:
                ratios = []
                for rep in {r["rep"] for r in runs}:
                    by = {r["receiver"]: r["inst_s"] for r in runs if r["lanes"] == lanes and r["rep"] == rep}
                    ratios.append(by["msgate"] / by[ref])  # type: ignore[operator]
                table[f"msgate/{ref}@{lanes}"] = {"median": statistics.median(ratios), "reps": ratios}
    return table


def time_to_ready(data: Path, work: Path, tries: int = 3) -> list[float]:
    """Seconds from storescu's exit (association released) to the study's ``ready`` state."""
    out = []
    for attempt in range(tries):
        files = make_study(data / f"ready{attempt}", seed=100 + attempt, slices=176, size=64)
        receiver = Msgate(work / f"ready{attempt}", quiet=30.0)
        receiver.start()
        try:
            subprocess.run(["storescu", "-aec", "MSGATE", "127.0.0.1", str(receiver.port), *map(str, files)],
                           env=ENV, check=True, capture_output=True)
            released = time.perf_counter()
            while not receiver.query("select 1 from study where state = 'ready'"):
                if time.perf_counter() - released > 60:
                    raise TimeoutError("never ready")
                time.sleep(0.005)
            out.append(time.perf_counter() - released)
        finally:
            receiver.stop()
    return out


def rss_growth(data: Path, work: Path) -> dict[str, int]:
    studies = [make_study(data / f"rss{i}", seed=200 + i, slices=200, size=256) for i in range(10)]
    receiver = Msgate(work / "rss")
    receiver.start()
    try:
        cmd = ["storescu", "-aec", "MSGATE", "127.0.0.1", str(receiver.port)]
        subprocess.run([*cmd, *map(str, studies[0])], env=ENV, check=True, capture_output=True)
        after_200 = rss_kb(receiver.proc.pid)  # type: ignore[union-attr]
        for files in studies[1:]:
            subprocess.run([*cmd, *map(str, files)], env=ENV, check=True, capture_output=True)
        after_2000 = rss_kb(receiver.proc.pid)  # type: ignore[union-attr]
        count = receiver.count()
    finally:
        receiver.stop()
    return {"rss_kb_after_200": after_200, "rss_kb_after_2000": after_2000, "instances": count}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--receivers", default="storescp,orthanc,pynd-raw,msgate")
    parser.add_argument("--skip-extras", action="store_true", help="no time-to-ready / RSS runs")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    names = args.receivers.split(",")
    with tempfile.TemporaryDirectory(prefix="msgate-bench-") as tmp:
        data, work = Path(tmp) / "data", Path(tmp) / "work"
        result = run_matrix(data, work, args.reps, names)
        summary = summarise(result, names)
        extras: dict[str, object] = {}
        if not args.skip_extras and "msgate" in names:
            extras["time_to_ready_s"] = time_to_ready(data, work)
            extras["rss"] = rss_growth(data, work)
    report = {"summary": summary, "extras": extras, "raw": result}
    print(json.dumps({"summary": summary, "extras": extras}, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
