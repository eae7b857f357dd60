"""The key service's small RPC over msgate's broker (the embedded SQLite transport or Redis).

Requests go to the queue ``msgate.he-keys``; each carries a correlation id and its own reply queue.
Two operations, both answered by the trusted side only:

- ``encrypt_jobs``: job ids (and the worker's model fingerprint) -> MACed CKKS packs. The key service
  builds each job's EHR input from storage itself; a worker never sends, receives or holds EHR values.
- ``finalize``: an encrypted result -> verified, decrypted, calibrated and rounded outcomes.

There is deliberately no operation that takes plaintext EHR values from a worker.

Each request carries its deadline (``expires_at``: sent time + the client's timeout, wall clock). The
key service drops a request that waited past it and a clock-skew allowance (``clock_skew_seconds``; the
keys role was away) unserved and unanswered: the
worker has given up on it and retried the job. An ``encrypt_jobs`` request also names the attempt of
each job it was made for (:func:`for_attempts`); the key service refuses one whose attempt is not the
job's current one (``he_stale``). Before both, such a request was served when the keys role came back,
used up the retried attempt's single encryption, and the request the worker waited on was refused
``he_replay``: the job failed for good.
"""

from __future__ import annotations

import contextvars
import logging
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from msgate.errors import MsgateError, Rejected, TamperedData, Transient
from msgate.model.he_keys import EncryptedPack, EncryptedResult, HeKeys

if TYPE_CHECKING:
    from msgate.model.he_service import JobSource

log = logging.getLogger(__name__)
REQUEST_QUEUE = "msgate.he-keys"
"""Broker queue of the key service (replies go to the ``reply_to`` queue of each request)."""


TRANSIENT_CODES = frozenset({"transient", "db_unavailable", "he_timeout", "he_broker", "he_checkpoint"})
"""Reply codes a retry can cure (also the replies of a key service older than the ``transient`` flag)."""
TAMPER_CODES = ("he_request_mac", "he_result_mac", "he_parse", "tampered")
PAUSE_S = (0.5, 30.0)
"""First and longest pause of the keys role before it connects to the broker again."""
_ATTEMPTS: contextvars.ContextVar[Mapping[str, int] | None] = contextvars.ContextVar("msgate_he_attempts",
                                                                                     default=None)


@contextmanager
def for_attempts(attempts: Mapping[str, int]) -> Iterator[None]:
    """Bind the ``encrypt_jobs`` requests made inside to these job attempts (job id -> the ``attempts``
    of the worker's claim): the key service encrypts a job's inputs only for its current attempt."""
    token = _ATTEMPTS.set({str(k): int(v) for k, v in attempts.items()})
    try:
        yield
    finally:
        _ATTEMPTS.reset(token)


def bound_attempts() -> dict[str, int]:
    """The attempts :func:`for_attempts` bound here ({} outside it)."""
    return dict(_ATTEMPTS.get() or {})


def expired_by(req: Mapping[str, Any], now: float | None = None, *, skew: float = 0.0) -> float | None:
    """Seconds a request is past its deadline and ``skew``, the clock-skew allowance; None while in time,
    or when it has none (an older worker's).

    The deadline is the worker's wall clock. A request of an earlier attempt is refused ``he_stale``
    however late it is, so the allowance (``MSGATE_HE__CLOCK_SKEW_SECONDS``, 300) costs at most some work
    for a request nobody waits on; without it a keys host a minute ahead of a worker dropped every request
    of that worker, and every HE job failed."""
    deadline = req.get("expires_at")
    if not isinstance(deadline, int | float) or isinstance(deadline, bool):
        return None
    late = (time.time() if now is None else now) - float(deadline) - skew
    return late if late > 0 else None


def broker_errors() -> tuple[type[BaseException], ...]:
    """What the broker's clients raise when it is down or restarting: kombu's wrapper, redis-py's own
    errors (the Redis transport passes them through), sockets, and SQLAlchemy's (the embedded broker)."""
    import kombu.exceptions
    import sqlalchemy.exc

    errors: list[type[BaseException]] = [kombu.exceptions.OperationalError, kombu.exceptions.ConnectionError,
                                         OSError, sqlalchemy.exc.OperationalError]
    try:
        import redis.exceptions
    except ImportError:  # pragma: no cover - redis is a dependency
        pass
    else:
        errors += [redis.exceptions.ConnectionError, redis.exceptions.TimeoutError]
    return tuple(errors)


def broker_connection(settings: Any) -> Any:
    """A kombu connection to msgate's broker (the embedded SQLite transport or Redis)."""
    from kombu import Connection

    from msgate.workers.celery_app import broker_options

    url, transport, options = broker_options(settings)
    return Connection(url, transport=transport, transport_options=options)


class BrokerKeyClient:
    """The worker's side of the RPC: the worker process never holds the CKKS secret key or EHR values."""

    def __init__(self, settings: Any, *, timeout: float | None = None) -> None:
        self.settings = settings
        if timeout is None:  # MSGATE_HE__RPC_TIMEOUT_SECONDS
            timeout = getattr(getattr(settings, "he", None), "rpc_timeout_seconds", 60.0)
        self.timeout = float(timeout)
        self.reply_to = f"msgate.he-reply.{uuid.uuid4().hex}"  # one reply queue per client (process)
        self._lock = threading.Lock()

    def _call(self, req: dict[str, Any]) -> dict[str, Any]:
        try:
            body = self._round_trip(req)
        except broker_errors() as exc:  # the broker is down (Redis restarting): was neither Transient nor
            # Rejected, so the worker failed the batch's jobs for good; now they are re-queued
            raise Transient(f"HE key service: the broker is unavailable ({type(exc).__name__}) (he_broker)",
                            code="he_broker") from None
        if "error" in body:
            code, text = str(body.get("code")), str(body["error"])
            if code.startswith(TAMPER_CODES):
                raise TamperedData(text, code=code)
            if body.get("transient") or code in TRANSIENT_CODES:  # a database blip on the key service
                raise Transient(f"HE key service: {text} ({code})", code=code)
            raise Rejected(text, code=code)
        return body

    def _round_trip(self, req: dict[str, Any]) -> dict[str, Any]:
        corr = uuid.uuid4().hex
        deadline = time.monotonic() + self.timeout
        with self._lock, broker_connection(self.settings) as conn, conn.SimpleQueue(self.reply_to) as replies:
            with conn.SimpleQueue(REQUEST_QUEUE) as q:
                q.put({**req, "corr": corr, "reply_to": self.reply_to,  # wall clock: the keys role's host
                       "expires_at": time.time() + self.timeout})
            while True:  # a late answer to an earlier, timed-out call is dropped
                try:
                    msg = replies.get(block=True, timeout=max(0.1, deadline - time.monotonic()))
                except replies.Empty:
                    raise Transient(f"the HE key service did not answer within {self.timeout:.0f} s",
                                    code="he_timeout") from None
                msg.ack()
                body: dict[str, Any] = msg.payload
                if body.get("corr") == corr:
                    return body

    def encrypt_jobs(self, job_ids: list[str], *, model: str, max_batch: int | None = None) -> list[EncryptedPack]:
        """Packs built by the key service from storage: the worker sends job ids, never EHR values."""
        req: dict[str, Any] = {"op": "encrypt_jobs", "job_ids": list(job_ids), "model": model,
                               "max_batch": max_batch}
        bound = _ATTEMPTS.get() or {}
        attempts = {str(j): bound[str(j)] for j in job_ids if str(j) in bound}
        if attempts:  # the attempts this worker holds: one left from an earlier attempt is refused (he_stale)
            req["attempts"] = attempts
        body = self._call(req)
        return [EncryptedPack.from_wire(p) for p in body["packs"]]

    def finalize(self, res: EncryptedResult, *, t_edss: float = 1.0, t_ms: float = 1.0) -> list[dict[str, Any]]:
        body = self._call({"op": "finalize", "result": res.to_wire(), "t_edss": t_edss, "t_ms": t_ms})
        return list(body["outcomes"])


def handle(keys: HeKeys, req: dict[str, Any], jobs: JobSource | None = None) -> dict[str, Any]:
    """One request; errors come back as ``{"error", "code", "transient"}`` (no EHR values, no PHI);
    ``transient`` marks what a retry can cure (a database blip), which the worker re-queues."""
    try:
        if req.get("op") == "encrypt_jobs":
            if jobs is None:
                return {"error": "this key service has no store for encrypt_jobs", "code": "he_no_store"}
            attempts = req.get("attempts")
            packs = jobs.encrypt(keys, [str(j) for j in req["job_ids"]], model=str(req.get("model")),
                                 max_batch=req.get("max_batch"),
                                 attempts={str(k): int(v) for k, v in attempts.items()} if attempts else None)
            return {"packs": [p.to_wire() for p in packs]}
        if req.get("op") == "finalize":
            res = EncryptedResult.from_wire(req["result"])
            if jobs is not None:  # the temperatures of the checkpoint the inputs were encrypted for
                spec = jobs.spec_for_request(res.request_id) or jobs.spec()  # (or installed now: restarted)
                return {"outcomes": keys.finalize(res, t_edss=spec.t_edss, t_ms=spec.t_ms)}
            return {"outcomes": keys.finalize(res, t_edss=float(req.get("t_edss", 1.0)),
                                              t_ms=float(req.get("t_ms", 1.0)))}
        return {"error": f"unknown op {req.get('op')!r}", "code": "he_op"}
    except MsgateError as exc:  # msgate's messages carry ids, never PHI
        log.warning("HE request refused", extra={"status": req.get("op"), "code": exc.code, "reason": str(exc)})
        return {"error": str(exc), "code": exc.code, "transient": isinstance(exc, Transient)}
    except (ValueError, KeyError, TypeError, FileNotFoundError) as exc:
        return {"error": f"bad request ({type(exc).__name__})", "code": "he_request"}
    except Exception as exc:  # unforeseen: answered, so the serving loop (the keys role) goes on
        log.exception("HE request failed", extra={"status": req.get("op")})
        return {"error": f"key service error ({type(exc).__name__}; see the keys role's log)", "code": "he_internal"}


def serve(keys: HeKeys, settings: Any, stop: threading.Event, *, ready: threading.Event | None = None,
          jobs: JobSource | None = None, pause: tuple[float, float] = PAUSE_S) -> None:
    """Answer requests from :data:`REQUEST_QUEUE` until ``stop`` is set. A lost broker (Redis restarting)
    ended this loop, and with it the keys role and every role of its ``serve`` process; now it connects
    again after a pause that grows from ``pause[0]`` to ``pause[1]`` seconds."""
    errors, wait = broker_errors(), pause[0]
    skew = getattr(getattr(settings, "he", None), "clock_skew_seconds", 300.0)  # HeSettings' default
    while not stop.is_set():
        try:
            with broker_connection(settings) as conn:
                requests = conn.SimpleQueue(REQUEST_QUEUE)
                try:
                    if ready is not None:
                        ready.set()
                    while not stop.is_set():
                        try:
                            msg = requests.get(block=True, timeout=0.5)
                        except requests.Empty:
                            wait = pause[0]
                            continue
                        wait = pause[0]
                        _answer(conn, keys, msg, jobs, skew=skew)
                finally:
                    try:
                        requests.close()
                    except errors:
                        pass
            return
        except errors as exc:
            log.warning("HE key service lost the broker; connecting again",
                        extra={"role": "keys", "error_type": type(exc).__name__, "elapsed_s": wait})
            stop.wait(wait)
            wait = min(wait * 2, pause[1])


def _answer(conn: Any, keys: HeKeys, msg: Any, jobs: JobSource | None, *, skew: float = 0.0) -> None:
    req = msg.payload
    late = expired_by(req, skew=skew)
    if late is not None:  # the worker gave up on it (and retried its jobs): nothing is read, used or answered
        msg.ack()
        job_ids = req.get("job_ids")
        log.warning("HE request expired in the queue; dropped unserved",
                    extra={"status": req.get("op"), "code": "he_expired", "elapsed_s": round(late, 1),
                           "count": len(job_ids) if isinstance(job_ids, list) else None})
        return
    t0 = time.perf_counter()
    reply = handle(keys, req, jobs)
    with conn.SimpleQueue(str(req.get("reply_to", ""))) as out:
        out.put({"corr": req.get("corr"), **reply})
    msg.ack()
    log.info("HE request served", extra={"status": req.get("op"), "reason": reply.get("code"),
                                         "duration_ms": round((time.perf_counter() - t0) * 1000, 1)})
