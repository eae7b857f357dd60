"""Event-driven wake-ups for pynetdicom's acceptor threads, instead of its 1 ms polling sleeps.

pynetdicom 3.0 runs two threads per association. The DUL thread sleeps ``_run_loop_delay`` (1 ms)
whenever it has nothing to do, and the association reactor sleeps 1 ms on *every* loop
(``dul.py:403``, ``association.py:714``). At one association that dead time dominates a C-STORE, and
the wake-ups cost half the CPU (see reference/peer-baselines.md).

Here each acceptor association gets wake signals, installed before its threads start:

- the DUL thread waits in ``select()`` on its socket plus a wake pipe, which is written whenever a
  primitive is queued for it (the C-STORE response); data from the peer wakes it directly;
- the reactor waits on an :class:`threading.Event` set whenever a DIMSE message is complete or an
  ACSE primitive (release, abort) reaches the user queue.

The per-association deep copy of the presentation contexts is replaced by an equivalent flat copy
(:func:`_copy_contexts`).

Both waits keep a bounded timeout (:data:`MAX_WAIT`), so timers (ARTIM, network timeout) and a dead
peer are still noticed as before. Only the sleeps change: the order in which the threads handle
events, every status code, and persist-then-acknowledge stay pynetdicom's own. Threads without the
signals (requestor associations, anything else in the process) sleep exactly as before.
"""

from __future__ import annotations

import copy
import os
import queue
import select
import ssl
import threading
import time as _time
import types
import weakref
from collections.abc import Callable
from typing import Any

from pynetdicom import association as _association
from pynetdicom import dul as _dul
from pynetdicom import transport as _transport
from pynetdicom.presentation import PresentationContext

from msgate.listener.dataphase import DataPhase, ReleaseFn, StoreFn

MAX_WAIT = 0.02  # seconds; the longest a woken-by-event thread sleeps before re-checking its timers

_real_sleep = _time.sleep
_installed = False


class _NotifyingQueue(queue.Queue):  # type: ignore[type-arg]
    """A Queue that calls ``notify`` after every put (Queue is what pynetdicom's threads read)."""

    def __init__(self, notify: Callable[[], None]) -> None:
        super().__init__()
        self._notify = notify

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        super().put(item, block, timeout)
        self._notify()


def _dul_sleep(seconds: float) -> None:
    thread = threading.current_thread()
    wake_r = getattr(thread, "_msgate_wake_r", None)
    if wake_r is None or seconds > 0.002:
        _real_sleep(seconds)
        return
    sock = getattr(getattr(thread, "socket", None), "socket", None)
    if isinstance(sock, ssl.SSLSocket) and sock.pending():
        return
    watch = [wake_r] if sock is None else [sock, wake_r]
    try:
        readable, _, _ = select.select(watch, [], [], MAX_WAIT)
    except (OSError, ValueError):  # socket closed under us: let pynetdicom notice on its next check
        _real_sleep(seconds)
        return
    if wake_r in readable:
        try:
            os.read(wake_r, 4096)
        except BlockingIOError:
            pass


def _reactor_sleep(seconds: float) -> None:
    thread = threading.current_thread()
    wake: threading.Event | None = getattr(thread, "_msgate_wake", None)
    if wake is None or seconds != 0.001:
        _real_sleep(seconds)
        return
    wake.clear()
    dimse = getattr(thread, "dimse", None)
    dul = getattr(thread, "dul", None)
    if (dimse is not None and not dimse.msg_queue.empty()) or (dul is not None and not dul.to_user_queue.empty()):
        return
    wake.wait(MAX_WAIT)


def install() -> None:
    """Route the two modules' ``time.sleep`` through the event-aware waits (idempotent)."""
    global _installed
    if _installed:
        return
    _dul.time = types.SimpleNamespace(**{**{k: getattr(_time, k) for k in dir(_time) if not k.startswith("__")},
                                         "sleep": _dul_sleep})  # type: ignore[assignment]
    _association.time = types.SimpleNamespace(  # type: ignore[assignment]
        **{**{k: getattr(_time, k) for k in dir(_time) if not k.startswith("__")}, "sleep": _reactor_sleep})
    _transport.deepcopy = _copy_contexts  # type: ignore[attr-defined]
    _installed = True


def _copy_contexts(value: Any, memo: Any = None) -> Any:
    """``transport.py`` deep-copies the AE's presentation contexts for every association (171 contexts
    x 39 transfer syntaxes here: ~100 ms). The same independent copy, made flat: every attribute of a
    context is immutable (ints, bools, UID strings) except its transfer-syntax list, which is copied."""
    if isinstance(value, list) and value and all(isinstance(cx, PresentationContext) for cx in value):
        out = []
        for cx in value:
            clone = copy.copy(cx)
            clone._transfer_syntax = list(cx._transfer_syntax)
            out.append(clone)
        return out
    return copy.deepcopy(value, memo)


def arm(assoc: Any, store: StoreFn | None = None, before_release: ReleaseFn | None = None) -> None:
    """Give one acceptor association (before its threads start) its wake signals, and with ``store``
    the direct C-STORE data phase (:mod:`msgate.listener.dataphase`).

    The wake pipe is closed when the DUL object is collected, i.e. after its thread has ended, so a
    thread can never wait on a descriptor that was closed and reused elsewhere.
    """
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_r, False)
    os.set_blocking(wake_w, False)
    dul = assoc.dul
    reactor_wake = threading.Event()

    def wake_dul() -> None:
        try:
            os.write(wake_w, b"x")
        except OSError:  # pipe full (a wake is already pending) or closed
            pass

    dul.to_provider_queue = _NotifyingQueue(wake_dul)
    dul.to_user_queue = _NotifyingQueue(reactor_wake.set)
    assoc.dimse.msg_queue = _NotifyingQueue(reactor_wake.set)
    dul._msgate_wake_r = wake_r
    assoc._msgate_wake = reactor_wake
    weakref.finalize(dul, _close_fds, wake_r, wake_w)
    if store is not None:
        dul._read_pdu_data = DataPhase(dul, store, before_release).read_pdu_data


def _close_fds(*fds: int) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass
