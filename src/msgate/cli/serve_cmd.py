"""``msgate serve [--role ...]``: run one role, or every role in one process group (``all``).

A role is a function ``run(store: Store, stop: threading.Event) -> None`` that blocks until ``stop``
is set. Roles are imported lazily, so the light roles never import torch. A role that raises stops the
whole process group; after the clean shutdown ``serve`` exits with status 1, so a supervisor restarts it.
"""

from __future__ import annotations

import errno
import importlib
import logging
import signal
import threading
import time
from enum import Enum
from typing import Annotated, Any

import typer

from msgate.cli.common import state
from msgate.errors import ConfigError, HomeInUse

log = logging.getLogger(__name__)


class Role(str, Enum):
    all = "all"
    dicom = "dicom"
    hl7 = "hl7"
    scheduler = "scheduler"
    worker = "worker"
    publish = "publish"
    keys = "keys"


BIND_ERRNOS = frozenset({errno.EADDRINUSE, errno.EADDRNOTAVAIL, errno.EACCES})

ROLE_RUNNERS: dict[str, str] = {
    "dicom": "msgate.listener.server:run",
    "hl7": "msgate.hl7.server:run",
    "scheduler": "msgate.workers.scheduler:run",
    "worker": "msgate.workers.worker:run",
    "publish": "msgate.results.outbox:run",
    "keys": "msgate.model.he_service:run",
}


def runner(role: str) -> Any:
    module_name, func = ROLE_RUNNERS[role].split(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name):
            return None
        raise
    return getattr(module, func, None)


def available_roles() -> list[str]:
    return [role for role in ROLE_RUNNERS if runner(role) is not None]


def serve(
    ctx: typer.Context,
    role: Annotated[Role, typer.Option("--role", "-r", help="which role to run")] = Role.all,
) -> None:
    """Run msgate's services until SIGINT/SIGTERM."""
    st = state(ctx)
    store = st.store(migrate=True, create_keys=True)
    roles = available_roles() if role is Role.all else [role.value]
    runners = {name: runner(name) for name in roles}
    missing = [name for name, fn in runners.items() if fn is None]
    if missing:
        raise ConfigError(f"role {', '.join(missing)} is not available in this build")
    stop = threading.Event()
    crashed: list[str] = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    threads = [threading.Thread(target=_guard, args=(name, fn, store, stop, crashed), name=f"role-{name}",
                                daemon=True)
               for name, fn in runners.items()]
    metrics_server = None
    if st.settings.metrics.enabled:
        from msgate import metrics

        metrics_server = metrics.serve(store.db, st.settings.metrics.host, st.settings.metrics.port)
    for thread in threads:
        thread.start()
    beats = threading.Thread(target=_heartbeats, args=(store, roles, threads, stop), name="heartbeat", daemon=True)
    beats.start()
    log.info("msgate started", extra={"role": ",".join(roles) or "none", "count": len(roles)})
    while not stop.is_set() and (not threads or any(t.is_alive() for t in threads)):
        stop.wait(0.5)
    stop.set()
    for thread in threads:
        thread.join(timeout=15)
    beats.join(timeout=5)
    if metrics_server is not None:
        metrics_server.shutdown()
    store.close()
    log.info("msgate stopped", extra={"role": ",".join(roles)})
    if crashed:
        log.error("exiting with status 1: a role crashed", extra={"role": ",".join(crashed)})
        raise typer.Exit(1)


def _heartbeats(store: Any, roles: list[str], threads: list[threading.Thread], stop: threading.Event) -> None:
    """Record every live role every few seconds; remove this process's rows on the way out."""
    from msgate.storage import heartbeat
    from msgate.storage.models import utcnow

    started = utcnow()
    while not stop.is_set():
        alive = [role for role, thread in zip(roles, threads, strict=True) if thread.is_alive()]
        try:
            heartbeat.beat(store.db, alive, started)
        except Exception:
            log.warning("heartbeat failed", extra={"reason": "database"})
        stop.wait(heartbeat.INTERVAL_S)
    try:
        heartbeat.clear(store.db, roles)
    except Exception:
        log.warning("heartbeat cleanup failed", extra={"reason": "database"})


def _guard(name: str, fn: Any, store: Any, stop: threading.Event, crashed: list[str]) -> None:
    """Run one role; a crash is recorded in ``crashed`` and stops the whole process group (``serve``
    then exits non-zero, so a supervisor restarts it)."""
    started = time.monotonic()
    try:
        fn(store, stop)
    except Exception as exc:
        log.exception("role crashed", extra={"role": name, "elapsed_s": round(time.monotonic() - started, 1),
                                             **_os_error_fields(exc, name, store.settings)})
        crashed.append(name)
        stop.set()


def _os_error_fields(exc: Exception, role: str, settings: Any) -> dict[str, Any]:
    """errno and the OS's words for an OSError (a port in use, a folder that cannot be written), and the
    role's address when the error is about binding it. The log shows no exception text (it may quote
    PHI), so a port conflict read only "OSError" and compose restarted the role forever without a reason."""
    if isinstance(exc, HomeInUse):
        return {"code": exc.code, "reason": "another msgate process holds this home's journal: each DICOM "
                                            "listener and HL7 feed needs its own MSGATE_HOME"}
    if not isinstance(exc, OSError) or exc.errno is None:
        return {}
    fields: dict[str, Any] = {"code": errno.errorcode.get(exc.errno, str(exc.errno)), "reason": exc.strerror}
    section = {"dicom": settings.dicom, "hl7": settings.hl7}.get(role)
    if section is not None and exc.errno in BIND_ERRNOS:
        fields.update(host=section.host, port=section.port)
    return fields
