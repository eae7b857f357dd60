"""The timing of scheduled retention (msgate.storage.retention_schedule), on a fake clock: a full purge
every ``purge_interval_s``, a free-space check every ``min(purge_interval_s, 60)`` s that purges at once
under ``purge_free_bytes``, and a failing purge that is logged and tried again at the next interval."""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path

import pytest

from msgate.config import load_settings
from msgate.errors import ConfigError
from msgate.log import SafeFormatter
from msgate.storage import retention_schedule
from msgate.storage.retention import PurgeReport
from msgate.storage.retention_schedule import RetentionSchedule


class Purges:
    """A stand-in for ``retention.purge``: records when it ran; raises while ``failing``."""

    def __init__(self) -> None:
        self.at: list[float] = []
        self.now = 0.0
        self.failing = False
        self.report = PurgeReport(dry_run=False)

    def __call__(self) -> PurgeReport:
        self.at.append(self.now)
        if self.failing:
            raise RuntimeError("database gone")
        return self.report


def _drive(sched: RetentionSchedule, purges: Purges, until: float, start: float = 0.0) -> list[float]:
    """Run ``step`` as the loop does (sleeping what it returns) from ``start`` to ``until``; the times it woke."""
    now, woke = start, []
    while now <= until:
        purges.now = now
        woke.append(now)
        wait = sched.step(now)
        assert wait > 0
        now += wait
    return woke


def test_a_full_purge_runs_every_interval() -> None:
    purges = Purges()
    sched = RetentionSchedule(interval=600, purge=purges, start=0.0)
    assert sched.check_every == 60
    _drive(sched, purges, until=2000)
    assert purges.at == [60, 660, 1260, 1860]  # the first one a check period after the start


def test_a_short_interval_is_its_own_check_period() -> None:
    purges = Purges()
    sched = RetentionSchedule(interval=5, purge=purges, start=0.0)
    assert sched.check_every == 5
    _drive(sched, purges, until=21)
    assert purges.at == [5, 10, 15, 20]


def test_free_space_is_checked_every_minute_and_purges_at_once_under_the_floor() -> None:
    purges = Purges()
    free = {"bytes": 10_000}
    checks: list[float] = []

    def measure() -> int:
        checks.append(purges.now)
        return free["bytes"]

    sched = RetentionSchedule(interval=3600, purge=purges, free=measure, floor=5_000, start=0.0)
    woke = _drive(sched, purges, until=299)
    assert woke == [0, 60, 120, 180, 240]
    assert purges.at == [60]  # the first full purge; free space is above the floor
    assert checks == [120, 180, 240]
    free["bytes"] = 4_000  # under the floor: purge at the next check, not an hour later
    _drive(sched, purges, until=300, start=300)
    assert purges.at == [60, 300]
    free["bytes"] = 6_000
    _drive(sched, purges, until=4000, start=360)
    assert purges.at == [60, 300, 3900]  # then the interval again (each purge restarts it)


def test_no_free_space_check_without_a_measure_or_a_floor() -> None:
    purges = Purges()
    calls: list[int] = []
    sched = RetentionSchedule(interval=3600, purge=purges, free=lambda: calls.append(1) or 0, floor=0, start=0.0)
    assert _drive(sched, purges, until=4000) == [0, 60, 3660]
    assert calls == [] and purges.at == [60, 3660]


def test_a_failing_purge_is_logged_and_tried_again_at_the_next_interval(caplog: pytest.LogCaptureFixture) -> None:
    purges = Purges()
    purges.failing = True
    sched = RetentionSchedule(interval=600, purge=purges, start=0.0)
    with caplog.at_level(logging.INFO, logger="msgate.storage.retention_schedule"):
        _drive(sched, purges, until=700)
        assert purges.at == [60, 660]
        purges.failing = False
        _drive(sched, purges, until=1300, start=701)
    assert purges.at == [60, 660, 1260]
    failures = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(failures) == 2 and all(r.exc_info for r in failures)
    line = json.loads(SafeFormatter().format(failures[0]))
    assert line["error_type"] == "RuntimeError" and "database gone" not in json.dumps(line)


def test_a_failing_free_space_check_does_not_stop_the_schedule(caplog: pytest.LogCaptureFixture) -> None:
    purges = Purges()

    def broken() -> int:
        raise OSError("blob folder unreadable")

    sched = RetentionSchedule(interval=600, purge=purges, free=broken, floor=1, start=0.0)
    with caplog.at_level(logging.INFO, logger="msgate.storage.retention_schedule"):
        _drive(sched, purges, until=700)
    assert purges.at == [60, 660]
    assert len([r for r in caplog.records if r.levelno == logging.ERROR]) == 9  # 120..600: each check


def test_a_run_that_purged_logs_one_line_of_counts(caplog: pytest.LogCaptureFixture) -> None:
    purges = Purges()
    sched = RetentionSchedule(interval=600, purge=purges, start=0.0)
    with caplog.at_level(logging.INFO, logger="msgate.storage.retention_schedule"):
        sched.step(60)  # nothing to purge: no line
        assert [r for r in caplog.records if r.levelno >= logging.INFO] == []
        purges.report = PurgeReport(dry_run=False, studies=[4, 9], blobs=30, bytes=1_500_000, by_age=1, by_space=1,
                                    engine_texts=2)
        sched.step(660)
        purges.report = PurgeReport(dry_run=False, skipped=True)  # another process purges: nothing to say
        sched.step(1260)
    [record] = [r for r in caplog.records if r.levelno >= logging.INFO]
    line = json.loads(SafeFormatter().format(record))
    assert line["msg"] == "retention.purged"
    assert {k: line[k] for k in ("studies", "blobs", "bytes", "by_age", "by_space", "engine_texts")} == {
        "studies": 2, "blobs": 30, "bytes": 1_500_000, "by_age": 1, "by_space": 1, "engine_texts": 2}


def test_the_setting_defaults_to_an_hour_and_zero_turns_it_off(tmp_path: Path) -> None:
    settings = load_settings(home=tmp_path)
    assert settings.storage.purge_interval_s == 3600
    off = load_settings(home=tmp_path, storage={"purge_interval_s": 0})
    assert retention_schedule.start(type("S", (), {"settings": off})(), threading.Event()) is None  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="MSGATE_STORAGE__PURGE_INTERVAL_S"):
        load_settings(home=tmp_path, storage={"purge_interval_s": -1})
