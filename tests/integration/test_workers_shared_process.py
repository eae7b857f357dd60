"""``serve`` runs the worker and the publish consumer as two Celery controllers in one process (real Redis).

Regressions:
- Celery's Hub bootstep reused kombu's process-global event loop, so the second controller polled the
  first one's epoll set; the two threads read each other's BRPOP sockets and a consumer died on
  ``Unrecoverable error: ValueError`` with nothing to restart it;
- a WorkController selects its queues on its app, so two controllers sharing one app both consumed
  whichever queue was selected last.
"""

from __future__ import annotations

import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from conftest import REDIS_URL, make_settings

from msgate.workers import celery_app

pytestmark = [pytest.mark.integration, pytest.mark.redis]

TASKS = 40


def _settings(tmp_path: Path) -> Any:
    return make_settings(tmp_path / "home", "sqlite", broker_url=REDIS_URL,
                         workers={"queue_prefix": f"msgate-test-{uuid.uuid4().hex[:8]}:"})


def _controller(settings: Any, queue: str) -> Any:
    """As ``serve`` builds them: the queue's own app, a solo controller on that queue."""
    return celery_app.work_controller(celery_app.consumer_app(settings, queue), queues=[queue],
                                      hostname=f"{queue}-{uuid.uuid4().hex[:6]}@test")


def _start(controller: Any, name: str) -> threading.Thread:
    thread = celery_app.consumer_thread(controller, name)
    thread.start()
    return thread


def test_two_controllers_in_one_process_have_their_own_loop_and_queue(tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    made: dict[str, Any] = {}
    builders = [threading.Thread(target=lambda q=q: made.__setitem__(q, _controller(settings, q)))
                for q in (celery_app.GPU_QUEUE, celery_app.PUBLISH_QUEUE)]
    for b in builders:
        b.start()
    for b in builders:
        b.join()
    gpu, pub = made[celery_app.GPU_QUEUE], made[celery_app.PUBLISH_QUEUE]
    assert gpu.hub is not None and pub.hub is not None
    assert gpu.hub is not pub.hub
    assert set(gpu.app.amqp.queues.consume_from) == {celery_app.GPU_QUEUE}
    assert set(pub.app.amqp.queues.consume_from) == {celery_app.PUBLISH_QUEUE}


def test_both_consumers_keep_running_under_interleaved_tasks(tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    done: dict[str, list[int]] = {"gpu": [], "publish": []}
    lock = threading.Lock()
    # both controllers are built before either starts, as when the model loads fast
    gpu = _controller(settings, celery_app.GPU_QUEUE)
    pub = _controller(settings, celery_app.PUBLISH_QUEUE)
    for controller, queue in ((gpu, "gpu"), (pub, "publish")):
        @controller.app.task(name=f"msgate.{'infer' if queue == 'gpu' else 'publish'}_probe")
        def probe(i: int, queue: str = queue) -> None:
            time.sleep(0.02)
            with lock:
                done[queue].append(i)

    producer = celery_app.build_app(settings)  # the scheduler's app sends, by task name and route
    threads = [_start(gpu, "gpu"), _start(pub, "publish")]
    try:
        for i in range(TASKS):
            producer.send_task("msgate.infer_probe", args=[i])
            producer.send_task("msgate.publish_probe", args=[i])
            time.sleep(0.05)  # consumers idle in BRPOP between tasks, as in production
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with lock:
                if len(done["gpu"]) == TASKS and len(done["publish"]) == TASKS:
                    break
            assert all(t.is_alive() for t in threads), "a Celery consumer thread died"
            time.sleep(0.1)
        assert sorted(done["gpu"]) == list(range(TASKS))
        assert sorted(done["publish"]) == list(range(TASKS))
        assert all(t.is_alive() for t in threads)
    finally:
        for controller in (gpu, pub):
            controller.stop(in_sighandler=False)
        for t in threads:
            t.join(timeout=30)


class _DeadController:
    """A controller whose consumer returns at once, as after an unrecoverable error."""

    stopped = False
    app = type("NoApp", (), {"set_current": lambda self: None})()

    def start(self) -> None:
        return None

    def stop(self, in_sighandler: bool = False) -> None:
        self.stopped = True


def test_worker_role_fails_when_its_consumer_dies(monkeypatch: pytest.MonkeyPatch) -> None:
    from msgate.workers import worker

    dead = _DeadController()
    monkeypatch.setattr(worker, "start_controller", lambda store: dead)
    with pytest.raises(RuntimeError, match="Celery consumer stopped"):
        worker.serve_one(object(), threading.Event())  # type: ignore[arg-type]
    assert dead.stopped
    stop = threading.Event()
    stop.set()
    worker.serve_one(object(), stop)  # type: ignore[arg-type]  # a requested stop is not a failure
