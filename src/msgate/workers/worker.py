"""The ``worker`` role: a Celery worker on queue ``gpu`` with the solo pool, one process per GPU.

The solo pool runs tasks in the worker's own process: CUDA is initialised once, never in a forked
child (pytorch/pytorch#40403). The model is loaded and warmed up before the first message is taken.
With several GPUs the role starts one child process per device (``spawn``, ``CUDA_VISIBLE_DEVICES``);
``MSGATE_WORKERS__DEVICE=cuda:N`` starts one child, on the N-th device this process sees (with one device
visible, ``cuda:0`` is served in this process). A child sees only its own GPU, so its device is always
``cuda`` (``cuda:N`` there would name an ordinal it does not have).
``cuda:N`` with N at or past the visible device count is refused at start (:class:`ConfigError`); in a
container that reserves one host GPU (compose's ``MSGATE_WORKER_GPU``) that GPU is ``cuda:0``.
Embedded mode (no ``MSGATE_BROKER_URL``) runs the same worker on the durable SQLite transport.

Time limits: the solo pool applies neither of Celery's limits. The watchdog in :mod:`msgate.workers.tasks`
does: past the soft limit it logs; past the hard limit it releases the task's jobs (an attempt counted)
and ends the process (exit 70) for the supervisor to restart it; with ``serve --role all`` that restarts
every role of the process. The job lease (``jobs.expire_leases``) covers a worker that dies outright.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import socket
import threading
from typing import Any

from msgate.config import Settings
from msgate.errors import ConfigError
from msgate.storage.store import Store, open_store
from msgate.workers import celery_app, runtime

log = logging.getLogger(__name__)


def gpu_count(settings: Settings) -> int:
    if not runtime.resolve_device(settings.workers.device).startswith("cuda"):
        return 0
    import torch

    return int(torch.cuda.device_count())


def cuda_ordinal(device: str) -> int | None:
    """N of ``cuda:N``; None for ``auto``, ``cpu`` and a bare ``cuda``."""
    kind, sep, ordinal = device.partition(":")
    return int(ordinal) if kind == "cuda" and sep else None


def visible_id(ordinal: int) -> str:
    """The ``CUDA_VISIBLE_DEVICES`` that shows a child only the ``ordinal``-th device this process sees:
    the ordinal, or this process's own entry for it when ``CUDA_VISIBLE_DEVICES`` already narrows the
    host's devices (``2,3``: ordinal 1 is host GPU 3)."""
    inherited = [e.strip() for e in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if e.strip()]
    return inherited[ordinal] if ordinal < len(inherited) else str(ordinal)


def child_devices(settings: Settings) -> list[str] | None:
    """The ``CUDA_VISIBLE_DEVICES`` of each per-GPU child, or None for one worker in this process (CPU, or
    one GPU, which ``cuda:0`` names as well). Raises :class:`ConfigError` for a ``cuda:N`` this process
    cannot see."""
    wanted = settings.workers.device
    count = gpu_count(settings)
    ordinal = cuda_ordinal(wanted)
    if ordinal is None:
        return [visible_id(i) for i in range(count)] if count > 1 else None
    if ordinal >= count:
        log.error("MSGATE_WORKERS__DEVICE names a GPU this process cannot see", extra={"device": wanted,
                                                                                       "count": count})
        seen = f"cuda:0 to cuda:{count - 1}" if count else "none"
        raise ConfigError(f"MSGATE_WORKERS__DEVICE={wanted} names a GPU this process cannot see: {count} "
                          f"CUDA device(s) visible ({seen}). In a container that reserves one GPU "
                          "(compose: MSGATE_WORKER_GPU picks the host GPU) it is cuda:0; use auto, cuda or "
                          "cuda:0 there")
    return None if count == 1 else [visible_id(ordinal)]


def _on_own_gpu(settings: Settings) -> Settings:
    """A per-GPU child's settings: its only device is ``cuda`` (never the parent's ``cuda:N`` or ``auto``)."""
    workers = settings.workers.model_copy(update={"device": "cuda"})
    return settings.model_copy(update={"workers": workers})


def start_controller(store: Store, *, queues: tuple[str, ...] = (celery_app.GPU_QUEUE,),
                     hostname: str | None = None) -> Any:
    """Build the app, load the model (warm-up) and return a started-later WorkController."""
    settings = store.settings
    app = celery_app.consumer_app(settings, queues[0])
    app.set_default()
    rt = runtime.Runtime(settings, store)
    runtime.install(rt)
    rt.model()
    _advertise(rt)
    log.info("worker ready", extra={"device": rt.device, "model_version": rt.version, "worker": rt.owner,
                                    "queue": ",".join(queues)})
    return celery_app.work_controller(app, queues=list(queues),
                                      hostname=hostname or f"gpu{os.getpid()}@{socket.gethostname()}",
                                      loglevel=settings.log_level)


def _advertise(rt: runtime.Runtime) -> None:
    """Device and model version on this process's heartbeat (shown by ``msgate status``)."""
    facts: dict[str, Any] = {"device": rt.device, "model_version": rt.version, "pool": "solo"}
    if rt.device.startswith("cuda"):
        import torch

        facts["gpu"] = torch.cuda.get_device_name(0)
        facts["gpu_memory_mb"] = round(torch.cuda.get_device_properties(0).total_memory / 2**20)
    from msgate.storage import heartbeat

    heartbeat.set_info("worker", **facts)


def serve_one(store: Store, stop: threading.Event) -> None:
    controller = start_controller(store)
    if stop.is_set():  # stopped while the model loaded: never start a consumer only to tear it down
        return
    thread = celery_app.consumer_thread(controller, "celery-worker")
    thread.start()
    try:
        while not stop.is_set() and thread.is_alive():
            stop.wait(0.5)
    finally:
        controller.stop(in_sighandler=False)
        thread.join(timeout=30)
    if not stop.is_set():  # the consumer died on its own: fail the role so its supervisor restarts it
        raise RuntimeError("the worker's Celery consumer stopped")


def _child(settings: Settings, visible: str) -> None:
    """One per-GPU worker process: ``visible`` is its ``CUDA_VISIBLE_DEVICES`` (set before CUDA starts)."""
    os.environ["CUDA_VISIBLE_DEVICES"] = visible
    settings = _on_own_gpu(settings)
    from msgate.log import setup_logging

    setup_logging(settings.log_level, settings.log_format)
    store = open_store(settings, migrate=False, create_keys=False)
    stop = threading.Event()
    import signal

    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    serve_one(store, stop)


def run(store: Store, stop: threading.Event) -> None:
    """One solo worker in this process, or one child per GPU when there are several, or one child on
    the GPU that ``cuda:N`` names."""
    devices = child_devices(store.settings)
    if devices is None:
        serve_one(store, stop)
        return
    ctx = multiprocessing.get_context("spawn")
    children = [ctx.Process(target=_child, args=(store.settings, visible), name=f"gpu-worker-{visible}")
                for visible in devices]
    for child in children:
        child.start()
    from msgate.storage import heartbeat

    heartbeat.set_info("worker", device="cuda", pool="solo", cuda_visible_devices=",".join(devices))
    log.info("GPU workers started", extra={"count": len(devices), "device": store.settings.workers.device})
    while not stop.is_set() and all(c.is_alive() for c in children):
        stop.wait(1.0)
    for child in children:
        child.terminate()
    for child in children:
        child.join(timeout=30)
    if not stop.is_set():
        raise RuntimeError("a GPU worker process stopped")
