"""The listener's association server: pynetdicom's periodic full garbage collection only while idle."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from msgate.listener import server


def test_no_full_collection_while_an_association_is_active(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[object, ...]] = []
    monkeypatch.setattr(server.gc, "collect", lambda *args: calls.append(args))
    srv = object.__new__(server._Server)  # the accept loop's hook alone, without a socket
    srv._gc = [0, 59]
    srv.ae = SimpleNamespace(active_associations=[object()])
    for _ in range(300):  # pynetdicom's own hook collects every 60 turns, busy or not
        srv.service_actions()
    assert calls == []
    srv.ae.active_associations = []
    srv.service_actions()  # idle after the interval: the deferred collection runs at once
    assert calls == [()]
    for _ in range(58):
        srv.service_actions()
    assert calls == [()]  # and then again only after another 60 turns
