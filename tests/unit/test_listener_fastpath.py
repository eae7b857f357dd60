"""The pynetdicom fast path keeps pynetdicom's data: context copies equal deep copies; other threads sleep."""

from __future__ import annotations

import copy
import time

from msgate.config import DicomSettings
from msgate.listener import fastpath
from msgate.listener.server import build_ae


def test_flat_context_copy_equals_deepcopy_and_is_independent() -> None:
    contexts = build_ae(DicomSettings()).supported_contexts
    flat, deep = fastpath._copy_contexts(contexts), copy.deepcopy(contexts)
    assert [vars(a) for a in flat] == [vars(b) for b in deep]
    flat[1].transfer_syntax.append("1.2.3")
    assert "1.2.3" not in contexts[1].transfer_syntax
    assert fastpath._copy_contexts({"a": [1]}) == {"a": [1]}


def test_threads_without_wake_signals_sleep_as_before() -> None:
    """Each wait on its own (a DUL thread that returned at once would spin the CPU)."""
    for sleep, seconds in ((fastpath._reactor_sleep, 0.001), (fastpath._dul_sleep, 0.001),
                           (fastpath._reactor_sleep, 0.02), (fastpath._dul_sleep, 0.02)):
        started = time.perf_counter()
        sleep(seconds)
        assert time.perf_counter() - started >= seconds, (sleep.__name__, seconds)
