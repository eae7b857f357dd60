"""The DICOM listener role: ``run(store, stop)`` serves C-ECHO and C-STORE until ``stop`` is set.

Presentation contexts: Verification, plus every storage SOP class pynetdicom knows (Enhanced MR and
the other multi-frame classes included) × every transfer syntax pydicom knows (implicit/explicit
little endian, explicit big endian, deflated, JPEG baseline/extended/lossless, JPEG-LS, JPEG 2000,
HTJ2K, RLE, MPEG/HEVC). Instances are stored as received, never transcoded.

Access control (``[dicom]`` settings): ``allowed_aets`` and ``allowed_networks`` are checked during
association negotiation; a caller outside them gets A-ASSOCIATE-RJ (rejected-permanent, service
user, calling AE title not recognised / no reason given). Both empty is an open listener, which is
logged as a warning at start. ``tls.enabled`` wraps the listener in TLS (``cert_file``/``key_file``);
with ``ca_file`` set, client certificates are required and verified.
"""

from __future__ import annotations

import gc
import ipaddress
import logging
import ssl
import threading
import warnings
from typing import Any

from pydicom.uid import AllTransferSyntaxes
from pynetdicom import AE, AllStoragePresentationContexts
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import RequestHandler, ThreadedAssociationServer

from msgate.childproc import settle_heap
from msgate.config import DicomSettings
from msgate.errors import ConfigError
from msgate.listener import fastpath
from msgate.listener.dataphase import ReleaseFn, StoreFn
from msgate.listener.handlers import Listener
from msgate.listener.indexer import Indexer
from msgate.listener.intake import Intake
from msgate.listener.tracking import ReadyHook, Tracker
from msgate.log import quiet_pynetdicom
from msgate.storage.journal import Journal
from msgate.storage.store import Store

log = logging.getLogger(__name__)


def transfer_syntaxes() -> list[str]:
    return [str(uid) for uid in AllTransferSyntaxes]


def build_ae(cfg: DicomSettings) -> AE:
    """The acceptor AE with every storage context × every transfer syntax, and the configured limits."""
    ae = AE(ae_title=cfg.ae_title)
    syntaxes = transfer_syntaxes()
    ae.add_supported_context(Verification, syntaxes)
    for context in AllStoragePresentationContexts:
        ae.add_supported_context(context.abstract_syntax, syntaxes)
    ae.maximum_pdu_size = cfg.max_pdu
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
    """Per connection: wake signals for the fast path, and the source-network check at negotiation."""

    networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
    store: StoreFn | None = None
    before_release: ReleaseFn | None = None

    def _create_association(self) -> Any:
        assoc = super()._create_association()
        fastpath.arm(assoc, type(self).store, type(self).before_release)
        if self.networks:
            host = ipaddress.ip_address(self.client_address[0])
            if isinstance(host, ipaddress.IPv6Address) and host.ipv4_mapped is not None:
                host = host.ipv4_mapped  # an IPv4 peer of a dual-stack ("::") listener: ::ffff:a.b.c.d
            if not any(host in net for net in self.networks):
                _reject_at_negotiation(assoc)
        return assoc


def _reject_at_negotiation(assoc: Any) -> None:
    """Answer the A-ASSOCIATE-RQ with A-ASSOCIATE-RJ (permanent, service user, no reason given)."""
    from pynetdicom import evt

    acse = assoc.acse

    def negotiate() -> None:
        acse.requestor.ae_title = acse.requestor.primitive.calling_ae_title
        acse.send_reject(0x01, 0x01, 0x01)
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
    """pynetdicom's server, without its full ``gc.collect()`` in the middle of transfers.

    pynetdicom runs a full collection every 60 turns of its accept loop, to reap the cycles that ended
    associations leave. In the listener a full collection holds the GIL for tens of milliseconds (106-121 ms
    measured during 4-association transfers), and every association waits for it. Here it runs only once no
    association is active; the interpreter's own generational collections still run as usual.
    """

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
