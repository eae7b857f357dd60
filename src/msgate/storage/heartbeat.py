"""Role heartbeats: ``msgate serve`` records each running role every few seconds; ``status`` reads them.

A role may publish a few non-PHI facts about itself (device, GPU memory, bound port) with
:func:`set_info`; they travel with the next beat.
"""

from __future__ import annotations

import os
import socket
import threading
from datetime import datetime
from typing import Any

from sqlmodel import select

from msgate.storage.db import Database
from msgate.storage.models import Heartbeat, utcnow

INTERVAL_S = 5.0
_info: dict[str, dict[str, Any]] = {}
_lock = threading.Lock()


def instance_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"[:96]


def set_info(role: str, **facts: Any) -> None:
    """Attach facts (no PHI) to this process's heartbeat for ``role``."""
    with _lock:
        _info.setdefault(role, {}).update(facts)


def beat(db: Database, roles: list[str], started: datetime) -> None:
    now = utcnow()
    with db.session() as session:
        for role in roles:
            row = session.get(Heartbeat, (role, instance_name()))
            with _lock:
                info = dict(_info.get(role, {}))
            if row is None:
                row = Heartbeat(role=role, instance=instance_name(), started_at=started, beat_at=now, info=info)
            else:
                row.beat_at, row.info = now, info
            session.add(row)


def read(db: Database) -> list[Heartbeat]:
    with db.session() as session:
        return list(session.exec(select(Heartbeat)).all())


def clear(db: Database, roles: list[str]) -> None:
    with db.session() as session:
        for role in roles:
            row = session.get(Heartbeat, (role, instance_name()))
            if row is not None:
                session.delete(row)
