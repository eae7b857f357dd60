"""PostgreSQL connection arguments: msgate's timeouts are defaults, never overrides of the URL's own."""

from __future__ import annotations

from typing import Any

import psycopg
import pytest

from msgate.storage import db


def _connect_kwargs(url: str, statement_timeout_ms: int | None, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    seen: list[dict[str, Any]] = []

    def refuse(*args: Any, **kwargs: Any) -> Any:
        seen.append(kwargs)
        raise psycopg.OperationalError("no server here")

    monkeypatch.setattr(psycopg, "connect", refuse)
    engine = db._postgres_engine(url, 3, statement_timeout_ms)
    with pytest.raises(Exception):
        engine.connect()
    return seen[0]


def test_the_urls_own_parameters_win_and_options_are_extended(monkeypatch: pytest.MonkeyPatch) -> None:
    """A deployment that sets its schema in ``options`` had it replaced by the status check's statement
    timeout (status then found no schema: down), and its connect_timeout replaced by msgate's."""
    url = "postgresql+psycopg://u:p@h/d?connect_timeout=30&options=-csearch_path%3Dmsgate"
    service = _connect_kwargs(url, None, monkeypatch)
    assert service["connect_timeout"] == "30" and service["options"] == "-csearch_path=msgate"
    assert service["keepalives"] == 1
    status = _connect_kwargs(url, 5000, monkeypatch)
    assert status["options"] == "-csearch_path=msgate -c statement_timeout=5000"
    plain = _connect_kwargs("postgresql+psycopg://u:p@h/d", 5000, monkeypatch)
    assert plain["connect_timeout"] == 3 and plain["options"] == "-c statement_timeout=5000"
