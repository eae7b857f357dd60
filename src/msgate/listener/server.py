"""The DICOM listener role: ``run(store, stop)`` serves C-ECHO and C-STORE until ``stop`` is set.

Presentation contexts: Verification, plus every storage SOP class pynetdicom knows (Enhanced MR and
the other multi-frame classes included) × every transfer syntax pydicom knows (implicit/explicit
little endian, explicit big endian, deflated, JPEG baseline/extended/lossless, JPEG-LS, JPEG 2000,
HTJ2K, RLE, MPEG/HEVC). Instances are stored as received, never transcoded. Of the syntaxes a context
proposes, the first in :data:`SYNTAX_PREFERENCE` is accepted: Explicit VR Little Endian, the other
uncompressed ones, lossless compression, lossy compression last.

An A-ASSOCIATE-RQ whose application context name is not the DICOM one gets A-ASSOCIATE-RJ
(rejected-permanent, service user, application context name not supported; PS3.8 §7.1.1.2).
``max_pdu = 0`` announces the largest P-DATA-TF the data phase accepts
(:data:`~msgate.listener.dataphase.UNLIMITED_PDATA_MAX`, 64 MiB), not "no maximum".

Access control (``[dicom]`` settings): ``allowed_aets`` and ``allowed_networks`` are checked during
association negotiation; a caller outside them gets A-ASSOCIATE-RJ (rejected-permanent, service
user, calling AE title not recognised / no reason given). Both empty is an open listener, which is
logged as a warning at start. ``tls.enabled`` wraps the listener in TLS (``cert_file``/``key_file``);
with ``ca_file`` set, client certificates are required and verified.

Timeouts: a TLS handshake runs in the connection's own thread and must complete within ``acse_timeout``
(else the connection is closed and logged with its peer address), so a silent connection holds up no
other sender. Every connection's socket has ``network_timeout`` as its timeout: a peer silent that long
in the middle of a PDU is aborted and its association slot freed.
"""

from __future__ import annotations

import gc
import ipaddress
import logging
import socket
import ssl
import threading
import time
import warnings
from typing import Any

from pydicom.uid import AllTransferSyntaxes
from pynetdicom import AE, AllStoragePresentationContexts
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import RequestHandler, ThreadedAssociationServer

from msgate.childproc import settle_heap
from msgate.config import DicomSettings
from msgate.errors import ConfigError
from msgate.listener import dataphase, fastpath
from msgate.listener.dataphase import ReleaseFn, StoreFn
from msgate.listener.handlers import Listener
from msgate.listener.indexer import Indexer
from msgate.listener.intake import Intake
from msgate.listener.tracking import ReadyHook, Tracker
from msgate.log import quiet_pynetdicom
from msgate.storage.journal import Journal
from msgate.storage.store import Store

log = logging.getLogger(__name__)


DICOM_APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"  # PS3.7 A.2.1: the one DICOM application context name

# pynetdicom accepts, for each proposed context, the first of the acceptor's syntaxes the requestor also
# proposed. In pydicom's list order Implicit VR came before Explicit VR (private elements then stored as
# UN, not as sent) and JPEG Baseline before every lossless syntax (a sender's lossless J2K taken lossy).
# Implicit VR stays ahead of Deflated and Big Endian, as before: DCMTK proposes [Explicit VR LE] and
# [Big Endian, Implicit VR] as two contexts, and sends an Implicit VR file unchanged only if Implicit
# is taken.
SYNTAX_PREFERENCE = (
    "1.2.840.10008.1.2.1",  # Explicit VR Little Endian
    "1.2.840.10008.1.2",  # Implicit VR Little Endian
    "1.2.840.10008.1.2.1.99",  # Deflated Explicit VR Little Endian
    "1.2.840.10008.1.2.2",  # Explicit VR Big Endian (retired)
    "1.2.840.10008.1.2.4.70",  # JPEG Lossless, first-order prediction (process 14, SV1)
    "1.2.840.10008.1.2.4.57",  # JPEG Lossless (process 14)
    "1.2.840.10008.1.2.4.80",  # JPEG-LS lossless
    "1.2.840.10008.1.2.4.90",  # JPEG 2000 lossless
    "1.2.840.10008.1.2.4.92",  # JPEG 2000 Part 2 multi-component lossless
    "1.2.840.10008.1.2.4.201",  # HTJ2K lossless
    "1.2.840.10008.1.2.4.202",  # HTJ2K RPCL lossless
    "1.2.840.10008.1.2.5",  # RLE lossless
    "1.2.840.10008.1.2.7.1",  # SMPTE ST 2110-20 uncompressed progressive video
    "1.2.840.10008.1.2.7.2",  # SMPTE ST 2110-20 uncompressed interlaced video
    "1.2.840.10008.1.2.7.3",  # SMPTE ST 2110-30 PCM audio
    # lossy, or lossless only at the sender's choice
    "1.2.840.10008.1.2.4.91",  # JPEG 2000
    "1.2.840.10008.1.2.4.93",  # JPEG 2000 Part 2 multi-component
    "1.2.840.10008.1.2.4.203",  # HTJ2K
    "1.2.840.10008.1.2.4.81",  # JPEG-LS near-lossless
    "1.2.840.10008.1.2.4.51",  # JPEG Extended
    "1.2.840.10008.1.2.4.50",  # JPEG Baseline
)  # then every other syntax pydicom knows (MPEG-2, H.264, HEVC, JPIP references), in its order


def transfer_syntaxes() -> list[str]:
    """Every syntax pydicom knows (all accepted, as before), in :data:`SYNTAX_PREFERENCE` order."""
    known = [str(uid) for uid in AllTransferSyntaxes]
    preferred = [uid for uid in SYNTAX_PREFERENCE if uid in known]
    return preferred + [uid for uid in known if uid not in preferred]


def build_ae(cfg: DicomSettings) -> AE:
    """The acceptor AE with every storage context × every transfer syntax, and the configured limits."""
    ae = AE(ae_title=cfg.ae_title)
    syntaxes = transfer_syntaxes()
    ae.add_supported_context(Verification, syntaxes)
    for context in AllStoragePresentationContexts:
        ae.add_supported_context(context.abstract_syntax, syntaxes)
    # 0 on the wire is "no maximum" (PS3.8 D.1), and a sender then put a whole 66 MiB instance in one
    # P-DATA-TF, which the data phase refused over its own bound: aborted, never stored, re-sent forever.
    # Announcing that bound instead makes a conforming sender split.
    ae.maximum_pdu_size = cfg.max_pdu or dataphase.UNLIMITED_PDATA_MAX
    ae.acse_timeout, ae.dimse_timeout, ae.network_timeout = cfg.acse_timeout, cfg.dimse_timeout, cfg.network_timeout
    ae.maximum_associations = cfg.max_associations
    ae.require_calling_aet = [aet.strip() for aet in cfg.allowed_aets]
    return ae


def tls_context(cfg: DicomSettings) -> ssl.SSLContext | None:
    if not cfg.tls.enabled:
        return None
    if cfg.tls.cert_file is None or cfg.tls.key_file is None:
        raise ConfigError("MSGATE_DICOM__TLS__CERT_FILE and MSGATE_DICOM__TLS__KEY_FILE are needed for TLS")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(str(cfg.tls.cert_file), str(cfg.tls.key_file))
    if cfg.tls.ca_file is not None:
        context.load_verify_locations(str(cfg.tls.ca_file))
        context.verify_mode = ssl.CERT_REQUIRED
    return context


class _AccessControlledHandler(RequestHandler):
    """Per connection: wake signals for the fast path, and the checks at negotiation (source network,
    application context name)."""

    networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
    store: StoreFn | None = None
    before_release: ReleaseFn | None = None

    def _create_association(self) -> Any:
        assoc = super()._create_association()
        fastpath.arm(assoc, type(self).store, type(self).before_release)
        _reject_at_negotiation(assoc, address_allowed=self._address_allowed())
        return assoc

    def _address_allowed(self) -> bool:
        if not self.networks:
            return True
        host = ipaddress.ip_address(self.client_address[0])
        if isinstance(host, ipaddress.IPv6Address) and host.ipv4_mapped is not None:
            host = host.ipv4_mapped  # an IPv4 peer of a dual-stack ("::") listener: ::ffff:a.b.c.d
        return any(host in net for net in self.networks)


def _reject_at_negotiation(assoc: Any, *, address_allowed: bool) -> None:
    """Checks made before pynetdicom's own negotiation, each answered with A-ASSOCIATE-RJ (permanent,
    service user): a source address outside ``allowed_networks`` (no reason given), and an application
    context name other than DICOM's (reason 2, PS3.8 §7.1.1.2; pynetdicom accepted any name)."""
    from pynetdicom import evt

    acse = assoc.acse
    negotiate_as_acceptor = acse._negotiate_as_acceptor

    def negotiate() -> None:
        request = acse.requestor.primitive
        if not address_allowed:
            reason = 0x01
        elif str(request.application_context_name or "").rstrip("\0 ") != DICOM_APPLICATION_CONTEXT:
            reason = 0x02
            log.info("association rejected: application context name not supported",
                     extra={"reason": "application-context-name-not-supported"})
        else:
            negotiate_as_acceptor()
            return
        acse.requestor.ae_title = request.calling_ae_title
        acse.send_reject(0x01, 0x01, reason)
        evt.trigger(assoc, evt.EVT_REJECTED, {})
        assoc.kill()

    acse._negotiate_as_acceptor = negotiate


def _silence_dataset_warnings() -> None:
    """pydicom's reading warnings may quote element values (UIDs, names) of what a sender pushed; they
    would bypass the PHI-safe formatter as raw ``warnings`` on stderr. Only the status code is logged."""
    warnings.filterwarnings("ignore", module=r"pydicom(\..*)?$")
    logging.getLogger("pydicom").setLevel(logging.ERROR)


JOURNAL_SEGMENT_BYTES = 64 * 1024 * 1024
_READY_HOOKS: list[ReadyHook] = []


def add_ready_hook(hook: ReadyHook) -> None:
    """Register a scheduler hook for listeners started afterwards in this process (``serve --role all``
    wires the scheduler here); it gets each :class:`~msgate.listener.tracking.ReadyStudy` after commit."""
    _READY_HOOKS.append(hook)


class _Server(ThreadedAssociationServer):
    """pynetdicom's server, with the TLS handshake off the accept thread, a timeout on every connection,
    and without its full ``gc.collect()`` in the middle of transfers.

    pynetdicom wraps each accepted socket in TLS inside its single accept thread, with a blocking
    handshake: one TCP connection that never sent its ClientHello (a port scanner, a probe that holds
    the connection, a flow a firewall dropped) held up every later association, with no timeout and no
    log. Here the accept thread only accepts; the handshake runs in the connection's own thread (the one
    pynetdicom starts for each request anyway) within the ACSE timeout, and a connection that does not
    complete it is closed and logged with its peer address. The ACSE timeout, not the network timeout:
    it is the time an acceptor gives a new connection to open its association (PS3.8 ARTIM, which
    pynetdicom sets to it), and the handshake is the first part of that. Access control is unchanged:
    client certificates are verified in the handshake, AE titles and source networks at negotiation.

    Every connection then gets the network timeout as its socket timeout, set once: a peer silent for that
    long inside a PDU (pynetdicom checks its own network timeout only between PDUs) ends the association
    instead of holding its thread and one of ``max_associations`` for good (:mod:`.dataphase`).

    pynetdicom runs a full collection every 60 turns of its accept loop, to reap the cycles that ended
    associations leave. In the listener a full collection holds the GIL for tens of milliseconds (106-121 ms
    measured during 4-association transfers), and every association waits for it. Here it runs only once no
    association is active; the interpreter's own generational collections still run as usual.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._handshakes: set[ssl.SSLSocket] = set()  # handshakes in progress, cut short at server_close
        self._handshakes_lock = threading.Lock()
        self._closing = False
        super().__init__(*args, **kwargs)

    def get_request(self) -> tuple[socket.socket, Any]:
        """Accept, and with TLS only wrap: the handshake waits for the connection's thread."""
        client, address = self.socket.accept()
        if self.ssl_context:
            client = self.ssl_context.wrap_socket(client, server_side=True, do_handshake_on_connect=False)
        return client, address

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        if isinstance(request, ssl.SSLSocket) and not self._handshake(request, client_address):
            return
        request.settimeout(self.ae.network_timeout)
        super().process_request_thread(request, client_address)

    def _handshake(self, sock: ssl.SSLSocket, address: Any) -> bool:
        """The TLS handshake within the ACSE timeout; False (connection closed, logged) when it fails."""
        timeout = self.ae.acse_timeout
        with self._handshakes_lock:
            if self._closing:
                self.shutdown_request(sock)
                return False
            self._handshakes.add(sock)
        started = time.monotonic()
        try:
            sock.settimeout(timeout)
            sock.do_handshake()
            return True
        except TimeoutError:
            level, reason = logging.WARNING, f"timed out after {timeout:g} s"
        except (ssl.SSLEOFError, ssl.SSLZeroReturnError, ConnectionError):
            level, reason = logging.DEBUG, "closed by the peer"  # e.g. a TCP port probe (msgate status)
        except ssl.SSLError as exc:
            level, reason = logging.WARNING, str(exc.reason or type(exc).__name__)  # OpenSSL's code only
        except (OSError, ValueError) as exc:
            level, reason = logging.WARNING, type(exc).__name__
        finally:
            with self._handshakes_lock:
                self._handshakes.discard(sock)
        if not self._closing:
            log.log(level, "TLS handshake not completed: connection closed",
                    extra={"peer": str(address[0]), "reason": reason,
                           "elapsed_s": round(time.monotonic() - started, 1)})
        self.shutdown_request(sock)
        return False

    def server_close(self) -> None:
        """Cut short the handshakes still waiting, then close (pynetdicom joins the connection threads)."""
        with self._handshakes_lock:
            self._closing = True
            waiting = list(self._handshakes)
        for sock in waiting:
            try:
                socket.socket.shutdown(sock, socket.SHUT_RDWR)  # wakes the handshake (TLS layer bypassed)
            except OSError:
                pass
        super().server_close()

    def service_actions(self) -> None:
        self._gc[0] += 1
        if self._gc[0] >= self._gc[1] and not self.ae.active_associations:
            gc.collect()
            self._gc[0] = 0


def start(store: Store, *, tracker: Tracker | None = None) -> tuple[AE, ThreadedAssociationServer, Tracker]:
    """Start the listener (non-blocking); returns the AE, its server and the readiness tracker.

    Journal segments a crash left are indexed first, so the port opens only when every instance that
    was ever acknowledged is in the index. ``ae.shutdown()`` also drains and stops the indexer."""
    settings = store.settings
    cfg = settings.dicom
    quiet_pynetdicom()
    _silence_dataset_warnings()
    fastpath.install()
    tracker = tracker or Tracker(store, quiet_seconds=cfg.quiet_seconds, rules=settings.rules)
    for hook in _READY_HOOKS:
        tracker.add_hook(hook)
    journal = Journal(settings.home / "dicom-journal", store.ring, rotate_bytes=JOURNAL_SEGMENT_BYTES,
                      preallocate=True)
    indexer = Indexer(store, journal, tracker, max_backlog_bytes=cfg.index_backlog_mb * 1024 * 1024)
    indexer.recover()
    journal.start()  # the first segment and its spare, before the port opens
    indexer.start()
    listener = Listener(store=store, intake=Intake(journal, indexer), indexer=indexer)
    ae = build_ae(cfg)
    handler = type("MsgateRequestHandler", (_AccessControlledHandler,),
                   {"networks": [ipaddress.ip_network(n, strict=False) for n in cfg.allowed_networks],
                    "store": staticmethod(listener.store_encoded),
                    "before_release": staticmethod(listener.before_release)})
    server = ae.make_server((cfg.host, cfg.port), ssl_context=tls_context(cfg), evt_handlers=listener.handlers(),
                            server_class=_Server, request_handler=handler)
    ae._servers.append(server)
    _stop_indexer_on_shutdown(ae, indexer, journal)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2}, name="dicom-acceptor",
                     daemon=True).start()
    if not cfg.allowed_aets and not cfg.allowed_networks:
        log.warning("DICOM listener is open to any calling AE and address; set MSGATE_DICOM__ALLOWED_AETS "
                    "and/or MSGATE_DICOM__ALLOWED_NETWORKS", extra={"port": server.server_address[1]})
    log.info("DICOM listener started", extra={"host": cfg.host, "port": server.server_address[1],
                                              "calling_aet": cfg.ae_title})
    return ae, server, tracker


def _stop_indexer_on_shutdown(ae: AE, indexer: Indexer, journal: Journal) -> None:
    shutdown = ae.shutdown

    def shutdown_and_drain() -> None:
        shutdown()
        indexer.close()
        journal.close()

    ae.shutdown = shutdown_and_drain  # type: ignore[method-assign]


def run(store: Store, stop: threading.Event) -> None:
    """The ``dicom`` role: serve until ``stop`` is set, with readiness tracking on this thread."""
    ae, server, tracker = start(store)
    tracker.load_open()
    settle_heap()
    try:
        tracker.run(stop)
    finally:
        ae.shutdown()
        log.info("DICOM listener stopped", extra={"port": server.server_address[1]})
