"""A 2D FLAIR and a 3D double inversion recovery (DIR) of one study, sent by DCMTK storescu to a real
``msgate serve --role dicom``: the DIR is recorded as role DIR, and the scheduler plans the job on the
FLAIR. The DIR (SE\\IR, TI 3000 ms, 176 slices) was a FLAIR by the long-TI rule and, with more frames,
became the model's FLAIR input."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import pytest
from dicom_helpers import ListenerProc, listener_env, opened_store, storescu, write_series
from pydicom import dcmread
from sqlmodel import col, select
from typer.testing import CliRunner

from msgate.storage.models import Series, Study
from msgate.workers.scheduler import plan

pytestmark = [pytest.mark.integration, pytest.mark.peer]

PORTS = range(47300, 47400)


def _port() -> int:
    for port in PORTS:
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port in 47300-47399")


def test_a_3d_dir_is_not_the_flair_the_model_gets(tmp_path: Path) -> None:
    flair = write_series(tmp_path / "flair", count=40, description="t2_tirm_tra_dark-fluid",
                         inversion_time=2500.0)
    study_uid = str(dcmread(flair[0]).StudyInstanceUID)
    dir_ = write_series(tmp_path / "dir", count=176, description="t2_spc_dir_sag_p2", study_uid=study_uid,
                        number=2, inversion_time=3000.0)
    home, port = tmp_path / "home", _port()
    listener = ListenerProc(home, port, listener_env(home, port, MSGATE_DICOM__QUIET_SECONDS="30")).start()
    try:
        done = storescu(port, [*dir_, *flair])
        assert done.returncode == 0, done.stderr
        deadline, states = time.monotonic() + 20, []
        while time.monotonic() < deadline:
            with opened_store(home) as store, store.db.session() as session:
                states = [s.state for s in session.exec(select(Study)).all()]
            if states == ["ready"]:
                break
            time.sleep(0.05)
        assert states == ["ready"], listener.log()[-4000:]
    finally:
        listener.stop()
    with opened_store(home) as store, store.db.session() as session:
        rows = list(session.exec(select(Series).order_by(col(Series.series_number))).all())
        assert [(r.role, r.frame_count) for r in rows] == [("FLAIR", 40), ("DIR", 176)]
        study = session.exec(select(Study)).one()
        planned = plan(session, store, study, model_version="test")
        assert planned is not None and planned.series == {"FLAIR": rows[0].id}

    from msgate.cli import rules_cmd
    from msgate.cli.app import app

    if "rules" not in {group.name for group in app.registered_groups}:
        app.add_typer(rules_cmd.app, name="rules")
    env = {"MSGATE_HOME": str(home), "MSGATE_STORAGE__MIN_FREE_BYTES": "0"}
    decided = CliRunner().invoke(app, ["rules", "test", "--json", str(dir_[0]), str(flair[0])], env=env)
    assert decided.exit_code == 0, decided.output
    assert [(d["role"], d["role_rule"]) for d in json.loads(decided.output)] == [
        ("DIR", "double inversion recovery by name"), ("FLAIR", "FLAIR by name")]
    assert [d["inversion_time"] for d in json.loads(decided.output)] == [3000.0, 2500.0]  # what the rules read
    assert [rules_cmd._sequence(d) for d in json.loads(decided.output)] == ["SE\\IR, TI 3000 ms", "SE\\IR, TI 2500 ms"]
