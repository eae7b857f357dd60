"""Results over TLS: C-STORE of a result SR to DCMTK ``storescp +tls`` through the outbox and the real
sender, and ORU^R01 through the real MLLP client to an engine that speaks MLLP over TLS.

Each failure the hospital side can cause (a CA that does not sign the peer, a host name the certificate
does not carry, a peer that does not speak TLS, a client certificate the peer requires) is a retryable
attempt whose recorded detail names the TLS problem, and nothing arrives.
"""

from __future__ import annotations

import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from pydicom import dcmread
from sqlmodel import select
from test_listener_tls import _cert

from msgate.config import Hl7Destination
from msgate.errors import Transient
from msgate.hl7 import mllp
from msgate.hl7.client import MllpClient
from msgate.hl7.msh import read_msh
from msgate.results import outbox, outbox_ops
from msgate.results.hl7_out import OrderNumbers, render_oru
from msgate.results.publish import RenderOptions, render
from msgate.results.sources import sort_slices
from msgate.storage.models import Job, OutboxEntry, Study
from msgate.storage.store import Store, open_store
from tests.conftest import make_settings
from tests.integration.pacs_peers import (
    PEER_ENV,
    StoreScp,
    flair_series,
    free_port,
    model_result,
    start_mllp_receiver,
    start_storescp,
    wait_port,
)

pytestmark = [pytest.mark.integration, pytest.mark.peer]
FAST = outbox.Policy(base_delay=0.2, max_delay=1.0, lease=3.0, poll=0.1, dimse_timeout=10.0)


@dataclass(frozen=True)
class Pki:
    """A test CA with a server certificate (localhost, 127.0.0.1) and a client certificate; ``other_ca``
    signs neither."""

    ca: Path
    server: tuple[Path, Path]
    client: tuple[Path, Path]
    other_ca: Path


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    folder = tmp_path_factory.mktemp("pki")
    ca_crt, _, ca, ca_key = _cert(folder, "ca", ca=True)
    srv_crt, srv_key, _, _ = _cert(folder, "server", issuer=(ca, ca_key))
    cli_crt, cli_key, _, _ = _cert(folder, "client", issuer=(ca, ca_key))
    other, _, _, _ = _cert(folder, "other-ca", ca=True)
    return Pki(ca_crt, (srv_crt, srv_key), (cli_crt, cli_key), other)


# --- DICOM: storescp +tls as the PACS ----------------------------------------------------------------


def _start_tls_storescp(folder: Path, pki: Pki, *, require_client_cert: bool) -> StoreScp:
    """storescp over TLS (BCP 195 profile, DCMTK's default), trusting the test CA; ``-rc`` requires a
    client certificate, ``-ic`` takes none."""
    port = free_port()
    folder.mkdir(parents=True, exist_ok=True)
    cmd = ["storescp", "-aet", "TLSPACS", "+xa", "-uf", "-od", str(folder),
           "+tls", str(pki.server[1]), str(pki.server[0]), "+cf", str(pki.ca),
           "-rc" if require_client_cert else "-ic", str(port)]
    proc = subprocess.Popen(cmd, env=PEER_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_port(port)
    return StoreScp(port, "TLSPACS", folder, proc)


@pytest.fixture()
def tls_scp(tmp_path: Path, pki: Pki) -> Iterator[StoreScp]:
    scp = _start_tls_storescp(tmp_path / "tls-scp", pki, require_client_cert=False)
    yield scp
    scp.stop()


@pytest.fixture()
def mutual_scp(tmp_path: Path, pki: Pki) -> Iterator[StoreScp]:
    scp = _start_tls_storescp(tmp_path / "mutual-scp", pki, require_client_cert=True)
    yield scp
    scp.stop()


@pytest.fixture(scope="module")
def sr() -> tuple[bytes, str]:
    """A result SR as publish renders it (SEG, map and key images off)."""
    sources = sort_slices(flair_series(n=12, rows=40, cols=48, seed=7))
    objects, sr_uid = render(model_result((12, 40, 48)), sources,
                             options=RenderOptions(key_images=0, parametric_map=False, seg=False))
    assert [o.kind for o in objects] == ["out.sr"]
    return objects[0].data, sr_uid


def _send_sr(tmp: Path, sr: tuple[bytes, str], port: int,
             tls: dict[str, object]) -> tuple[OutboxEntry, list[tuple[str, str, str]]]:
    """Queue the SR for one PACS with these TLS settings, run one outbox round; the entry and its attempts."""
    pacs = [{"name": "pacs", "host": "127.0.0.1", "port": port, "ae_title": "TLSPACS", "tls": tls}]
    store = open_store(make_settings(tmp / "home", "sqlite", pacs=pacs))
    try:
        _queue(store, [outbox.Rendered("out.sr", sr[0])])
        assert outbox.run_once(store, FAST) == 1
        with store.db.session() as session:
            entry = session.exec(select(OutboxEntry)).one()
            attempts = [(a.outcome, a.peer_status, a.detail) for a in outbox_ops.attempts_of(session, entry.id)]
        return entry, attempts
    finally:
        store.close()


def _queue(store: Store, objects: list[outbox.Rendered]) -> None:
    with store.db.session() as session:
        study = Study(study_uid_index=f"s-{time.monotonic_ns()}")
        session.add(study)
        session.flush()
        job = Job(study_id=study.id, idem_key=f"j-{time.monotonic_ns()}", state="done")  # type: ignore[arg-type]
        session.add(job)
        session.flush()
        outbox.enqueue(store, session, job_id=job.id, objects=objects)


def _received_uids(scp: StoreScp) -> list[str]:
    return [str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in scp.files()]


def test_sr_reaches_a_tls_pacs(tmp_path: Path, pki: Pki, tls_scp: StoreScp, sr: tuple[bytes, str]) -> None:
    """The certificate names 127.0.0.1: checked against the configured host (an IP address)."""
    entry, attempts = _send_sr(tmp_path, sr, tls_scp.port, {"enabled": True, "ca_file": str(pki.ca)})
    assert entry.state == "delivered", attempts
    assert _received_uids(tls_scp) == [sr[1]]


def test_server_name_is_what_the_certificate_is_checked_against(tmp_path: Path, pki: Pki, tls_scp: StoreScp,
                                                                sr: tuple[bytes, str]) -> None:
    entry, attempts = _send_sr(tmp_path / "ok", sr, tls_scp.port,
                               {"enabled": True, "ca_file": str(pki.ca), "server_name": "localhost"})
    assert entry.state == "delivered", attempts
    entry, attempts = _send_sr(tmp_path / "mismatch", sr, tls_scp.port,
                               {"enabled": True, "ca_file": str(pki.ca), "server_name": "pacs.example"})
    assert entry.state == "pending" and entry.attempts == 1
    assert attempts[-1][:2] == ("retry", "tls")
    assert attempts[-1][2].startswith("TLS: certificate verify failed (Hostname mismatch")
    assert _received_uids(tls_scp) == [sr[1]]  # only the first


def test_a_pacs_certificate_from_another_ca_is_a_retry_that_says_so(tmp_path: Path, pki: Pki, tls_scp: StoreScp,
                                                                     sr: tuple[bytes, str]) -> None:
    entry, attempts = _send_sr(tmp_path, sr, tls_scp.port, {"enabled": True, "ca_file": str(pki.other_ca)})
    assert entry.state == "pending" and entry.last_error is not None
    assert attempts == [("retry", "tls", entry.last_error)]
    assert entry.last_error.startswith("TLS: certificate verify failed (")
    assert tls_scp.files() == []


def test_a_plaintext_pacs_is_a_retry_that_says_it_does_not_speak_tls(tmp_path: Path, pki: Pki,
                                                                      sr: tuple[bytes, str]) -> None:
    scp = start_storescp(tmp_path / "plain-scp", ae_title="TLSPACS")
    try:
        started = time.monotonic()
        entry, attempts = _send_sr(tmp_path, sr, scp.port, {"enabled": True, "ca_file": str(pki.ca)})
        assert time.monotonic() - started < 20
        assert entry.state == "pending" and attempts[-1][:2] == ("retry", "tls")
        assert "does it speak TLS" in attempts[-1][2] or "does not speak TLS" in attempts[-1][2]
        assert scp.files() == []
    finally:
        scp.stop()


def test_mutual_tls_needs_the_client_certificate(tmp_path: Path, pki: Pki, mutual_scp: StoreScp,
                                                 sr: tuple[bytes, str]) -> None:
    entry, attempts = _send_sr(tmp_path / "anonymous", sr, mutual_scp.port, {"enabled": True, "ca_file": str(pki.ca)})
    assert entry.state == "pending" and attempts[-1][:2] == ("retry", "tls")
    assert attempts[-1][2].startswith("TLS: ") and "certificate" in attempts[-1][2]
    assert mutual_scp.files() == []
    entry, attempts = _send_sr(tmp_path / "client-cert", sr, mutual_scp.port,
                               {"enabled": True, "ca_file": str(pki.ca), "cert_file": str(pki.client[0]),
                                "key_file": str(pki.client[1])})
    assert entry.state == "delivered", attempts
    assert _received_uids(mutual_scp) == [sr[1]]


# --- MLLP over TLS: an engine stand-in ---------------------------------------------------------------


@dataclass
class TlsEngine:
    """An MLLP listener behind TLS that answers every message AA (MSA-2 = its MSH-10); optionally closes
    after each ACK, or requires a client certificate. Keeps the control ids received per connection."""

    context: ssl.SSLContext
    close_after_ack: bool = False
    sock: socket.socket = field(default_factory=socket.socket)
    connections: list[list[str]] = field(default_factory=list)
    versions: list[str] = field(default_factory=list)
    handshake_errors: list[str] = field(default_factory=list)
    closed: threading.Semaphore = field(default_factory=lambda: threading.Semaphore(0))

    @property
    def port(self) -> int:
        return int(self.sock.getsockname()[1])

    @property
    def received(self) -> list[str]:
        return [cid for conn in self.connections for cid in conn]

    def start(self) -> TlsEngine:
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen()
        threading.Thread(target=self._accept, daemon=True).start()
        return self

    def _accept(self) -> None:
        while True:
            try:
                raw, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(raw,), daemon=True).start()

    def _serve(self, raw: socket.socket) -> None:
        raw.settimeout(10)
        try:
            conn = self.context.wrap_socket(raw, server_side=True)
        except (OSError, ssl.SSLError) as exc:
            self.handshake_errors.append(type(exc).__name__)
            raw.close()
            return
        self.versions.append(str(conn.version()))
        ids: list[str] = []
        self.connections.append(ids)
        deframer = mllp.Deframer(1 << 20)
        try:
            while True:
                data = conn.recv(65536)
                if not data:
                    return
                for event in deframer.feed(data):
                    if event.kind != "frame":
                        continue
                    cid = read_msh(event.payload).control_id
                    ids.append(cid)
                    ack = (f"MSH|^~\\&|ENGINE|HOSP|MSGATE|MSGATE|20261201120000||ACK^R01^ACK|A{cid}|P|2.5.1\r"
                           f"MSA|AA|{cid}\r")
                    conn.sendall(mllp.frame(ack.encode()))
                    if self.close_after_ack:
                        return
        except OSError:
            return
        finally:
            conn.close()
            self.closed.release()

    def stop(self) -> None:
        self.sock.close()


def _engine_context(pki: Pki, *, require_client_cert: bool = False) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(str(pki.server[0]), str(pki.server[1]))
    if require_client_cert:
        context.load_verify_locations(str(pki.ca))
        context.verify_mode = ssl.CERT_REQUIRED
    return context


@pytest.fixture()
def engine(pki: Pki) -> Iterator[TlsEngine]:
    eng = TlsEngine(_engine_context(pki), close_after_ack=True).start()
    yield eng
    eng.stop()


def _oru(n: int) -> list[str]:
    src = flair_series(n=1, rows=8, cols=8)[0]
    settings = make_settings(Path("/nonexistent"), "sqlite", hl7_out={"port": 1})
    out = []
    for i in range(n):
        er7 = render_oru(model_result((12, 40, 48)), source=src, numbers=OrderNumbers("P1", "F1", "A1"),
                         sr_uid="1.2.3", correction=False, settings=settings)
        out.append(er7.replace(read_msh(er7.encode()).control_id, f"TLSORU{i}", 1))
    return out


def _dest(port: int, **tls: object) -> Hl7Destination:
    return Hl7Destination(host="127.0.0.1", port=port, tls={"enabled": True, **tls})  # type: ignore[arg-type]


def test_oru_reaches_a_tls_engine_that_closes_after_each_ack(pki: Pki, engine: TlsEngine) -> None:
    """Over TLS too, an engine that closes after its ACK is noticed before the next send and reconnected
    to: every ORU is acknowledged, each on its own TLS connection."""
    messages = _oru(3)
    with MllpClient.for_destination(_dest(engine.port, ca_file=str(pki.ca)), timeout=5, connect_timeout=5) as client:
        for message in messages:
            ack = client.send(message)
            assert ack.code == "AA"
            assert engine.closed.acquire(timeout=5)  # the engine has closed before the next send
    assert engine.connections == [["TLSORU0"], ["TLSORU1"], ["TLSORU2"]]
    assert engine.versions and all(v in ("TLSv1.2", "TLSv1.3") for v in engine.versions)


def test_oru_over_one_kept_tls_connection_with_server_name(pki: Pki) -> None:
    eng = TlsEngine(_engine_context(pki)).start()
    try:
        dest = _dest(eng.port, ca_file=str(pki.ca), server_name="localhost")
        with MllpClient.for_destination(dest, timeout=5) as client:
            assert [client.send(m).code for m in _oru(2)] == ["AA", "AA"]
        assert eng.connections == [["TLSORU0", "TLSORU1"]]
    finally:
        eng.stop()


def test_an_engine_certificate_from_another_ca_fails_clearly(pki: Pki, engine: TlsEngine) -> None:
    with MllpClient.for_destination(_dest(engine.port, ca_file=str(pki.other_ca)), timeout=5) as client:
        with pytest.raises(Transient) as err:
            client.send(_oru(1)[0])
    assert err.value.code == "tls"
    assert str(err.value).startswith("TLS: certificate verify failed (")
    assert engine.received == []


def test_an_engine_certificate_for_another_name_fails_clearly(pki: Pki, engine: TlsEngine) -> None:
    dest = _dest(engine.port, ca_file=str(pki.ca), server_name="engine.example")
    with MllpClient.for_destination(dest, timeout=5) as client, pytest.raises(Transient) as err:
        client.send(_oru(1)[0])
    assert err.value.code == "tls" and "Hostname mismatch" in str(err.value)
    assert engine.received == []


def test_a_plaintext_engine_fails_clearly_within_the_connect_timeout(pki: Pki) -> None:
    """python-hl7's MLLP server waits for a start block that our ClientHello does not carry: the
    handshake is bounded by the connect timeout, and the failure says the peer may not speak TLS."""
    plain = start_mllp_receiver()
    try:
        started = time.monotonic()
        with MllpClient.for_destination(_dest(plain.port, ca_file=str(pki.ca)), timeout=30,
                                        connect_timeout=2) as client, pytest.raises(Transient) as err:
            client.send(_oru(1)[0])
        assert time.monotonic() - started < 6
        assert err.value.code == "tls" and "speak TLS" in str(err.value)
        assert plain.messages == []
    finally:
        plain.stop()


def test_an_engine_that_requires_a_client_certificate(pki: Pki) -> None:
    eng = TlsEngine(_engine_context(pki, require_client_cert=True)).start()
    try:
        with MllpClient.for_destination(_dest(eng.port, ca_file=str(pki.ca)), timeout=5) as client:
            with pytest.raises(Transient) as err:
                client.send(_oru(1)[0])
        assert err.value.code == "tls" and str(err.value).startswith("TLS: ") and "certificate" in str(err.value)
        dest = _dest(eng.port, ca_file=str(pki.ca), cert_file=str(pki.client[0]), key_file=str(pki.client[1]))
        with MllpClient.for_destination(dest, timeout=5) as client:
            assert client.send(_oru(1)[0]).code == "AA"
        assert eng.received == ["TLSORU0"]
    finally:
        eng.stop()


def _run_lane(tmp: Path, port: int, tls: dict[str, object]) -> tuple[OutboxEntry, list[tuple[str, str, str]]]:
    store = open_store(make_settings(tmp / "home", "sqlite", hl7_out={"host": "127.0.0.1", "port": port, "tls": tls}))
    try:
        _queue(store, [outbox.Rendered("out.oru", _oru(1)[0].encode())])
        assert outbox.run_once(store, FAST) == 1
        with store.db.session() as session:
            entry = session.exec(select(OutboxEntry)).one()
            return entry, [(a.outcome, a.peer_status, a.detail) for a in outbox_ops.attempts_of(session, entry.id)]
    finally:
        store.close()


def test_the_hl7_lane_sends_over_tls_and_records_a_tls_failure(tmp_path: Path, pki: Pki) -> None:
    eng = TlsEngine(_engine_context(pki)).start()
    try:
        entry, attempts = _run_lane(tmp_path / "ok", eng.port, {"enabled": True, "ca_file": str(pki.ca)})
        assert entry.state == "delivered", attempts
        assert len(eng.received) == 1 and eng.versions
        entry, attempts = _run_lane(tmp_path / "bad", eng.port, {"enabled": True, "ca_file": str(pki.other_ca)})
        assert entry.state == "pending" and attempts[-1][:2] == ("retry", "tls")
        assert "TLS: certificate verify failed (" in attempts[-1][2]
        assert len(eng.received) == 1
    finally:
        eng.stop()
