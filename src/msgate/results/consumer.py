"""The ``publish`` role's Celery consumer: a solo worker on queue ``publish`` (task ``msgate.publish``).

It runs in the publish role next to the outbox sender and uses the role's store. Rendering needs no
model or GPU, so the solo pool in a thread is enough; ``acks_late`` redelivers a task whose process
died, and :func:`msgate.results.publish.publish_job` is idempotent by job id.
"""

from __future__ import annotations

import logging
import os
import socket
from typing import Any

from msgate.storage.store import Store

log = logging.getLogger(__name__)


class PublishConsumer:
    def __init__(self, store: Store) -> None:
        from msgate.results import tasks
        from msgate.workers import celery_app

        tasks.use_store(store)
        self.app = celery_app.consumer_app(store.settings, celery_app.PUBLISH_QUEUE)
        self.app.set_default()
        self.controller: Any = celery_app.work_controller(
            self.app, queues=[celery_app.PUBLISH_QUEUE], hostname=f"publish{os.getpid()}@{socket.gethostname()}",
            loglevel=store.settings.log_level)
        self.thread = celery_app.consumer_thread(self.controller, "publish-consumer")

    def start(self) -> PublishConsumer:
        self.thread.start()
        log.info("publish consumer started", extra={"queue": "publish"})
        return self

    def alive(self) -> bool:
        return self.thread.is_alive()

    def stop(self) -> None:
        try:
            self.controller.stop(in_sighandler=False)
        finally:
            self.thread.join(timeout=30)
