"""The Celery app, built from Settings (never at import time of other modules).

Reliability settings (celery docs: tasks.rst, optimizing.rst, backends-and-brokers/redis.rst):

- JSON only; tasks take ids and re-fetch (the job row is the source of truth);
- ``task_acks_late`` + ``task_reject_on_worker_lost``: a task whose worker dies is delivered again;
  every task is idempotent (results upserted by job id), so a second run is harmless;
- ``worker_prefetch_multiplier = 1``: a GPU worker holds one case at a time;
- Redis ``visibility_timeout`` > hard time limit (enforced by :class:`~msgate.config.WorkerSettings`),
  so a slow task is not delivered to a second worker while the first still runs it;
- no Celery time limits: the solo pool never applies them; ``tasks.Watchdog`` enforces the limits;
- queues ``gpu`` (``msgate.infer``) and ``publish`` (``msgate.publish``), routed by task name.

Without ``MSGATE_BROKER_URL`` the broker is kombu's SQLAlchemy transport on ``MSGATE_HOME/queue.db``
(durable: queued messages survive a restart), via :class:`EmbeddedTransport`, which adds WAL and a
busy timeout and a short polling interval.

``celery -A msgate.workers.celery_app worker`` works too: the module attribute ``app`` is built
lazily from the environment on first access.
"""

from __future__ import annotations

import importlib
import logging
import threading
from typing import Any

from celery import Celery
from kombu import Exchange, Queue
from kombu.transport import sqlalchemy as kombu_sqla
from sqlalchemy import create_engine, event

from msgate.config import Settings, load_settings

log = logging.getLogger(__name__)

INFER_TASK = "msgate.infer"
PUBLISH_TASK = "msgate.publish"
GPU_QUEUE = "gpu"
PUBLISH_QUEUE = "publish"
EMBEDDED_POLL_SECONDS = 0.1
RESULTS_TASKS_MODULE = "msgate.results.tasks"


class _EmbeddedChannel(kombu_sqla.Channel):
    """kombu's SQLAlchemy channel with SQLite in WAL mode and a busy timeout (several processes share it)."""

    def _engine_from_config(self) -> Any:
        url = self.connection.client.hostname
        if not str(url).startswith("sqlite"):
            return super()._engine_from_config()
        engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})

        @event.listens_for(engine, "connect")
        def _on_connect(dbapi_conn: Any, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=FULL")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()

        return engine


class EmbeddedTransport(kombu_sqla.Transport):
    """The durable embedded broker (``sqla+sqlite:///MSGATE_HOME/queue.db``)."""

    Channel = _EmbeddedChannel
    polling_interval = EMBEDDED_POLL_SECONDS


def broker_options(settings: Settings) -> tuple[str, str | None, dict[str, Any]]:
    """(broker URL, transport class or None, transport options) for the configured broker."""
    url = settings.resolved_broker_url
    if url.startswith("sqla+"):
        settings.home.mkdir(parents=True, exist_ok=True)
        return url.removeprefix("sqla+"), f"{__name__}:EmbeddedTransport", {}
    options: dict[str, Any] = {}
    if url.startswith(("redis://", "rediss://", "sentinel://")):
        options = {"visibility_timeout": int(settings.workers.visibility_timeout),
                   "socket_connect_timeout": 3, "socket_timeout": 10}
        if settings.workers.queue_prefix:
            options["global_keyprefix"] = settings.workers.queue_prefix
    return url, None, options


def build_app(settings: Settings, *, main: str = "msgate") -> Celery:
    """A configured Celery app with the msgate tasks registered (one per Settings object, name and
    process: producers such as the scheduler share the plain one; each consumer has its own, see
    :func:`consumer_app`)."""
    key = (id(settings), main)
    with _apps_lock:
        cached = _apps.get(key)
        if cached is not None and cached[0] is settings:
            return cached[1]
        app = _build(settings, main=main)
        _apps[key] = (settings, app)
        return app


def consumer_app(settings: Settings, queue: str) -> Celery:
    """The app of the consumer of one queue. A WorkController selects its queues on its app
    (``app.amqp.queues.select``), so two consumers in one process (``serve all``) sharing an app
    would both consume whichever queue was selected last."""
    return build_app(settings, main=f"msgate-{queue}")


_apps: dict[tuple[int, str], tuple[Settings, Celery]] = {}
_apps_lock = threading.RLock()


def _build(settings: Settings, *, main: str) -> Celery:
    url, transport, options = broker_options(settings)
    app = Celery(main, broker=url, set_as_current=False)
    app.conf.update(
        broker_transport=transport,
        broker_transport_options=options,
        broker_connection_retry_on_startup=True,
        broker_connection_timeout=3,
        task_serializer="json",
        accept_content=["json"],
        result_serializer="json",
        task_ignore_result=True,
        result_backend=None,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_acks_on_failure_or_timeout=True,
        worker_prefetch_multiplier=1,
        worker_hijack_root_logger=False,
        worker_redirect_stdouts=False,
        worker_send_task_events=False,
        task_default_queue=GPU_QUEUE,
        task_queues=(Queue(GPU_QUEUE, Exchange(GPU_QUEUE), routing_key=GPU_QUEUE),
                     Queue(PUBLISH_QUEUE, Exchange(PUBLISH_QUEUE), routing_key=PUBLISH_QUEUE)),
        task_routes={"msgate.infer*": {"queue": GPU_QUEUE, "routing_key": GPU_QUEUE},
                     "msgate.publish*": {"queue": PUBLISH_QUEUE, "routing_key": PUBLISH_QUEUE}},
        task_publish_retry=True,
        task_publish_retry_policy={"max_retries": 2, "interval_start": 0.2, "interval_step": 0.5,
                                   "interval_max": 1.0},
        enable_utc=True,
    )
    app.msgate_settings = settings  # type: ignore[attr-defined]
    from msgate.workers import tasks

    tasks.register(app)
    _register_results_tasks(app)
    return app


def _register_results_tasks(app: Celery) -> None:
    """The results side registers ``msgate.publish`` with ``register(app)`` when it is installed."""
    try:
        module = importlib.import_module(RESULTS_TASKS_MODULE)
    except ModuleNotFoundError as exc:
        if exc.name and RESULTS_TASKS_MODULE.startswith(exc.name):
            return
        raise
    register = getattr(module, "register", None)
    if callable(register):
        register(app)


_controller_lock = threading.Lock()


def work_controller(app: Celery, **options: Any) -> Any:
    """A solo WorkController with an event loop of its own.

    Celery's ``Hub`` bootstep reuses kombu's process-global event loop (``kombu.asynchronous.hub``)
    when one is set. ``serve`` runs the worker and the publish consumer as two controllers in one
    process, so without this the second controller adopted the first one's hub: two threads polled
    one epoll set holding both Redis BRPOP sockets, one thread read the other's socket while that one
    disconnected it, and the consumer died on ``Unrecoverable error: ValueError`` (no restart, no
    results). Each controller is therefore built with no global loop set, and none is left behind.
    """
    from kombu.asynchronous import set_event_loop

    with _controller_lock:
        set_event_loop(None)
        try:
            return app.WorkController(app=app, pool_cls="solo", concurrency=1, without_mingle=True,
                                      without_gossip=True, without_heartbeat=True, prefetch_multiplier=1,
                                      **options)
        finally:
            set_event_loop(None)


def consumer_thread(controller: Any, name: str) -> threading.Thread:
    """A daemon thread (not started) that runs ``controller``; the solo pool traces tasks through the
    current app, which is per thread, so the thread makes the controller's app current first."""

    def run() -> None:
        controller.app.set_current()
        controller.start()

    return threading.Thread(target=run, name=name, daemon=True)


_lazy: Celery | None = None


def __getattr__(name: str) -> Any:
    """``app`` for the celery CLI, built from MSGATE_* on first access."""
    global _lazy
    if name == "app":
        if _lazy is None:
            from msgate.log import setup_logging

            settings = load_settings()
            setup_logging(settings.log_level, settings.log_format)
            _lazy = build_app(settings)
        return _lazy
    raise AttributeError(name)
