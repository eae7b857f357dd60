"""The inference runner behind the ``msgate.infer`` task (the task itself is only the Celery shell).

``run`` claims the job of the message, then batches: it claims other queued jobs (up to
``batch_size``, waiting at most ``batch_wait_seconds``), loads every case, runs ``predict`` once for
the batch (one by one if the batch fails), stores each result encrypted (upserted by job id) and
hands each finished job to ``msgate.publish``. A job that failed for a permanent reason (an unusable
series, a broken blob) fails alone, with a readable reason; the others in its batch go on.

A job whose earlier attempt did not finish (its worker was lost, or it was released) runs alone and
gathers no batch: if it is the case that kills or hangs the worker, only its own attempts are used up.
A job planned for another model version than this worker's is handed back, unrun and uncounted.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from msgate.errors import CryptoError, MsgateError, Rejected, Transient
from msgate.model.types import Case, ModelResult
from msgate.workers import case as case_mod
from msgate.workers import jobs
from msgate.workers.results_io import store_result
from msgate.workers.runtime import Runtime

log = logging.getLogger(__name__)
Handoff = Callable[[str], None]


@dataclass
class Item:
    claim: jobs.Claim
    case: Case | None = None
    flags: list[str] = field(default_factory=list)
    stages: dict[str, Any] = field(default_factory=dict)
    flair_instances: list[int | None] = field(default_factory=list)
    flair_frames: list[int | None] = field(default_factory=list)
    result: ModelResult | None = None


def _ms(start: float) -> float:
    return round((time.perf_counter() - start) * 1000, 1)


def run(rt: Runtime, job_id: str, *, task_id: str | None, handoff: Handoff,
        held: list[str] | None = None) -> str:
    """Run the job of one message (and any batch it gathers); returns a short outcome for the log.
    ``held`` gets the id of every job this run claims (the task's time-limit watchdog releases them)."""
    wk = rt.settings.workers
    try:
        rt.model()  # loaded once per process, before the job is claimed
    except Exception as exc:  # a worker without a usable model must not hold (or fail) the job
        log.exception("model unavailable", extra={"job_id": job_id})
        raise Transient(f"model unavailable on this worker ({type(exc).__name__})", code="no_model") from None
    primary = jobs.claim(rt.store.db, job_id, owner=rt.owner, lease_seconds=wk.lease_seconds, via="message",
                         task_id=task_id)
    if primary is None:
        return _not_claimed(rt, job_id, handoff)
    if primary.model_version != rt.version[:64]:
        log.warning("job planned for another model version; handed back",
                    extra={"job_id": job_id, "model_version": rt.version, "reason": "model_version"})
        reason = f"model version mismatch: planned for {primary.model_version}, worker has {rt.version}"
        jobs.hand_back(rt.store.db, job_id, owner=rt.owner, error=reason)
        return "handed back (model version)"
    if held is not None:
        held.append(job_id)
    mates = _gather(rt, exclude={job_id}, held=held) if primary.attempts <= 1 else []
    items = [Item(primary)] + [Item(c) for c in mates]
    try:
        _load_all(rt, items)
        _predict(rt, items)
        _store_and_finish(rt, items, handoff)
    except Exception as exc:
        # A transient failure, or one nobody foresaw: every job of the batch not finished yet goes back
        # to the queue now (not left running until its lease ends), up to the retry limit.
        reason = f"transient: {exc}" if isinstance(exc, Transient) else f"unexpected error ({type(exc).__name__})"
        if not isinstance(exc, Transient):
            log.exception("batch failed unexpectedly; its jobs are re-queued", extra={"job_id": job_id})
        for item in items:
            jobs.release(rt.store.db, item.claim.job_id, owner=rt.owner, error=reason,
                         max_attempts=wk.max_retries + 1)
        raise
    return f"batch of {len(items)}"


def _not_claimed(rt: Runtime, job_id: str, handoff: Handoff) -> str:
    job = jobs.state_of(rt.store.db, job_id)
    if job is None:
        return "no such job"
    if job.state == "done" and "handoff_at" not in job.flags:
        handoff(job_id)  # stored, but the hand-off was lost (e.g. the broker was down)
        jobs.mark_handed_off(rt.store.db, job_id)
        return "handed off"
    return f"skipped ({job.state})"


def _gather(rt: Runtime, *, exclude: set[str], held: list[str] | None) -> list[jobs.Claim]:
    """Dynamic batching: claim fresh queued jobs of this worker's model version until the batch is
    full or the wait is over."""
    wk = rt.settings.workers
    claims: list[jobs.Claim] = []
    deadline = time.monotonic() + wk.batch_wait_seconds
    while len(claims) + 1 < wk.batch_size:
        for jid in jobs.queued_ids(rt.store.db, exclude=list(exclude), limit=wk.batch_size - 1 - len(claims),
                                   model_version=rt.version[:64]):
            exclude.add(jid)
            claim = jobs.claim(rt.store.db, jid, owner=rt.owner, lease_seconds=wk.lease_seconds, via="batch")
            if claim is not None:
                claims.append(claim)
                if held is not None:
                    held.append(jid)
        if time.monotonic() >= deadline or len(claims) + 1 >= wk.batch_size:
            break
        time.sleep(0.02)
    return claims


def _fail(rt: Runtime, item: Item, reason: str) -> None:
    log.warning("job failed", extra={"job_id": item.claim.job_id, "reason": reason})
    jobs.finish(rt.store.db, item.claim.job_id, owner=rt.owner, state="failed", stages=item.stages, error=reason)


def _load_all(rt: Runtime, items: list[Item]) -> None:
    pre, with_ehr = rt.preprocess(), rt.reads_ehr()
    for item in items:
        flags = item.claim.flags
        try:
            loaded = case_mod.load(rt.store, job_id=item.claim.job_id, study_id=item.claim.study_id,
                                   series={k: int(v) for k, v in flags.get("series", {}).items()}, actor=rt.owner,
                                   with_ehr=with_ehr)
            item.case, item.flags, item.flair_instances = loaded.case, loaded.flags, loaded.flair_instances
            item.flair_frames = loaded.flair_frames
            item.stages.update(loaded.stages)
            t0 = time.perf_counter()
            if pre is not None:
                item.case = pre(item.case)
            item.stages["transforms_ms"] = _ms(t0)
        except Rejected as exc:
            _fail(rt, item, str(exc))
        except CryptoError as exc:
            _fail(rt, item, f"stored data cannot be decrypted ({exc.code})")
        except Transient:
            raise
        except Exception as exc:  # a case nobody foresaw (a header value that does not parse): it alone fails
            log.exception("case could not be loaded", extra={"job_id": item.claim.job_id})
            _fail(rt, item, f"the case could not be loaded ({type(exc).__name__}; see the worker log)")


def _predict(rt: Runtime, items: list[Item]) -> None:
    ready = [i for i in items if i.case is not None]
    if not ready:
        return
    t0 = time.perf_counter()
    try:
        with _attempts_bound(rt, ready):
            results = rt.predict([i.case for i in ready])  # type: ignore[misc]
    except Transient:
        raise  # e.g. the HE key service did not answer: the batch is released and retried, not failed
    except Exception as exc:
        he_mode = rt.settings.he.enabled
        code = exc.code if isinstance(exc, MsgateError) else type(exc).__name__
        if len(ready) == 1:
            log.exception("inference failed", extra={"job_id": ready[0].claim.job_id, "code": code})
            _fail(rt, ready[0], f"inference failed (HE, {code}; see worker log)" if he_mode
                  else "inference failed (model error; see worker log)")
            ready[0].case = None
            return
        if he_mode:
            # The key service encrypts a job's inputs once per attempt, so the one-by-one retry below was
            # refused (he_replay) and every job of the batch failed for good. Re-queued instead: each
            # runs alone on its next attempt (no batch after a failed attempt), with fresh inputs.
            log.exception("HE batch inference failed; its jobs are re-queued to run alone",
                          extra={"batch": len(ready), "code": code})
            raise Transient(f"HE batch of {len(ready)} failed ({code}); each job runs alone next",
                            code="he_batch") from None
        log.warning("batch inference failed; running the cases one by one", extra={"batch": len(ready)})
        for item in ready:
            _predict(rt, [item])
        return
    elapsed = _ms(t0)
    for item, result in zip(ready, results, strict=True):
        item.result = result
        item.stages["inference_ms"] = elapsed
        item.stages["batch"] = len(ready)


def _attempts_bound(rt: Runtime, items: list[Item]) -> contextlib.AbstractContextManager[None]:
    """HE mode: the key service encrypts a job's inputs only for the attempt this worker's claim holds, so
    a request left in its queue from an earlier attempt cannot use up this one's (``he_stale``)."""
    if not rt.settings.he.enabled:
        return contextlib.nullcontext()
    from msgate.model.he_rpc import for_attempts

    return for_attempts({i.claim.job_id: i.claim.attempts for i in items})


def _store_and_finish(rt: Runtime, items: list[Item], handoff: Handoff) -> None:
    for item in items:
        if item.result is None:
            continue
        job_id = item.claim.job_id
        flags = list(dict.fromkeys([*item.result.flags, *item.claim.flags.get("result_flags", []), *item.flags]))
        result = dataclasses.replace(item.result, case_id=job_id, flags=tuple(flags))
        t0 = time.perf_counter()
        store_result(rt.store, job_id=job_id, result=result)
        item.stages["store_ms"] = _ms(t0)
        ready_at = item.claim.flags.get("ready_ts")
        if ready_at:
            item.stages["ready_to_result_ms"] = round((time.time() - float(ready_at)) * 1000, 1)
        extra = {"model_version": result.model_version, "flair_instances": item.flair_instances,
                 "flair_frames": item.flair_frames}
        if jobs.finish(rt.store.db, job_id, owner=rt.owner, state="done", stages=item.stages, flags=extra):
            _handoff(rt, job_id, handoff)
        log.info("job done", extra={"job_id": job_id, "batch": item.stages.get("batch"),
                                    "duration_ms": item.stages.get("inference_ms")})


def _handoff(rt: Runtime, job_id: str, handoff: Handoff) -> None:
    try:
        handoff(job_id)
    except Exception:  # the reconciler hands it off later; the result is stored
        log.warning("hand-off to publish failed; the reconciler retries", extra={"job_id": job_id})
        return
    jobs.mark_handed_off(rt.store.db, job_id)
