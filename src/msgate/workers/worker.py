"""The ``worker`` role: a Celery worker on queue ``gpu`` with the solo pool, one process per GPU.

The solo pool runs tasks in the worker's own process: CUDA is initialised once, never in a forked
child (pytorch/pytorch#40403). The model is loaded and warmed up before the first message is taken.
With several GPUs the role starts one child process per device (``spawn``, ``CUDA_VISIBLE_DEVICES``).
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
from msgate.storage.store import Store, open_store
from msgate.workers import celery_app, runtime

log = logging.getLogger(__name__)


def gpu_count(settings: Settings) -> int:
    if not runtime.resolve_device(settings.workers.device).startswith("cuda"):
        return 0
    import torch

    return int(torch.cuda.device_count())


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


def _child(settings: Settings, device_index: int) -> None:
    os.environ["CUDA_VISIBLE_DEVICES"] = str(device_index)
    from msgate.log import setup_logging

    setup_logging(settings.log_level, settings.log_format)
    store = open_store(settings, migrate=False, create_keys=False)
    stop = threading.Event()
    import signal

    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    serve_one(store, stop)


def run(store: Store, stop: threading.Event) -> None:
    """One solo worker in this process, or one child per GPU when there are several."""
    n = gpu_count(store.settings)
    if n <= 1:
        serve_one(store, stop)
        return
    ctx = multiprocessing.get_context("spawn")
    children = [ctx.Process(target=_child, args=(store.settings, i), name=f"gpu-worker-{i}") for i in range(n)]
    for child in children:
        child.start()
    log.info("GPU workers started", extra={"count": n})
    while not stop.is_set() and all(c.is_alive() for c in children):
        stop.wait(1.0)
    for child in children:
        child.terminate()
    for child in children:
        child.join(timeout=30)
    if not stop.is_set():
        raise RuntimeError("a GPU worker process stopped")
