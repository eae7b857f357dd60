"""`msgate keys he list|rotate|retire` as an operator runs them (the real `msgate` process, so exit codes are
``main()``'s) beside a running key service and worker (in this process, holding their HeKeys and public-key
cache from before the rotation), on the embedded SQLite and on the machine's PostgreSQL.

The CKKS keys had no CLI: made by the keys role at start, rotated only by changing the HE parameters,
never listed or retired."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sqlmodel import select

from msgate.config import Settings
from msgate.errors import KeyFilePermissions
from msgate.model import he
from msgate.model.he_keys import HeKeys
from msgate.storage import audit, keyring
from msgate.storage.models import AuditEvent, Job

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def run(home: Path, *args: str, python: str | None = None, **env: str) -> subprocess.CompletedProcess[str]:
    full = {**os.environ, "MSGATE_HOME": str(home), "MSGATE_STORAGE__MIN_FREE_BYTES": "0", "COLUMNS": "250", **env}
    head = ["-c", python] if python else ["-m", "msgate"]
    return subprocess.run([sys.executable, *head, *args], capture_output=True, text=True, env=full, timeout=180)


def _env(settings: Settings) -> dict[str, str]:
    """The CLI's environment for the store of ``settings`` with homomorphic mode on."""
    env = {"MSGATE_HE__ENABLED": "1"}
    if settings.storage.blob_backend == "postgres":
        env |= {"MSGATE_DATABASE_URL": settings.resolved_database_url, "MSGATE_STORAGE__BLOB_BACKEND": "postgres"}
    return env


def _listed(home: Path, env: dict[str, str]) -> dict[str, Any]:
    out = run(home, "keys", "he", "list", "--json", **env)
    assert out.returncode == 0, out.stderr
    doc: dict[str, Any] = json.loads(out.stdout)
    return doc


def _events(store: Any, kind: str) -> list[AuditEvent]:
    with store.db.session() as session:
        return list(session.exec(select(AuditEvent).where(AuditEvent.kind == kind).order_by(AuditEvent.seq)).all())


def _set_state(store: Any, job_id: str, state: str) -> None:
    with store.db.session() as session:
        job = session.get(Job, job_id)
        assert job is not None
        job.state = state


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def test_list_rotate_retire_beside_a_running_key_service(tmp_path: Path, backend: str, request: pytest.FixtureRequest,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    import test_workers_double as double  # tests/integration helpers (real store, real study rows)
    from conftest import make_settings

    from msgate.model.he_service import JobSource, ModelSpec
    from msgate.model.he_worker import HeWorker
    from msgate.model.patient.ehr import N_COLUMNS
    from msgate.storage.store import open_store

    home = tmp_path / "home"
    keyring.init(home / "keys" / "keyring.json")
    pg = request.getfixturevalue("pg_url") if backend == "postgres" else None
    settings = make_settings(home, backend, pg, he={"enabled": True})
    env = _env(settings)
    store = open_store(settings)
    try:
        # the keys role as it starts (HeKeys.ensure + open_secret), and a worker with its public-key cache
        service = HeKeys(home, store.ring)
        k0 = service.ensure(settings.he.params())
        service.open_secret(k0)
        _, model = he.random_model(seed=4, members=3)
        worker = HeWorker.for_home(model, home)
        spec = ModelSpec((0.0,) * N_COLUMNS, (1.0,) * N_COLUMNS, model.widths)
        source = JobSource(store, _spec=spec, actor="keys-test")
        study_id, _ = double.make_study(store, seed=7)
        double.add_patient(store, mrn="MRN00007", nfl=9.0)
        with store.db.session() as session:  # two claimed jobs (running, first attempt)
            session.add_all([Job(id=j, study_id=study_id, idem_key=j, state="running", attempts=1)
                             for j in ("jobA", "jobB")])
        z = np.abs(np.random.default_rng(4).normal(size=(3, 1, model.z_dim)))
        (pack_a,) = source.encrypt(service, ["jobA"], model=spec.fingerprint)  # jobA in flight under k0
        result_a = worker.evaluate(pack_a, z)
        assert pack_a.key_id == k0

        listed = _listed(home, env)
        [row] = listed["keys"]
        assert listed["active"] == k0 and listed["enabled"] is True and listed["active_params_differ"] is False
        assert row["key_id"] == k0 and row["active"] is True and row["unfinished_jobs"] == 1
        assert row["params"] == {"poly_modulus_degree": 8192, "coeff_mod_bit_sizes": [42, 32, 32, 32, 32, 48],
                                 "global_scale_bits": 32} == listed["configured_params"]
        assert row["kek_id"] == store.ring.active_id and row["wrapped"] is True
        ctx_bytes = (home / "keys" / "he" / "public" / f"{k0}.ctx").read_bytes()
        assert row["public_sha256"] == hashlib.sha256(ctx_bytes).hexdigest() and row["created"]
        # no secret material: not the secret envelope, not the result MAC key of the public metadata
        secret_doc = json.loads((home / "keys" / "he" / f"{k0}.secret").read_bytes())
        meta = json.loads((home / "keys" / "he" / "public" / f"{k0}.json").read_text())
        table = run(home, "keys", "he", "list", **env)
        assert table.returncode == 0 and k0 in table.stdout and "2^32" in table.stdout, table.stderr
        for out in (json.dumps(listed), table.stdout):
            assert meta["result_key"] not in out and secret_doc["body"][:40] not in out
            assert secret_doc["wrapped_dek"] not in out and "mac_key" not in out and "result_key" not in out

        rotated = run(home, "keys", "he", "rotate", **env)
        assert rotated.returncode == 0, rotated.stderr
        k1 = (home / "keys" / "he" / "active").read_text().strip()
        assert k1 != k0 and f"new active CKKS key {k1} (was {k0})" in " ".join(rotated.stdout.split())
        assert "no restart needed" in rotated.stdout
        [event] = _events(store, "he_key.rotated")
        assert (event.actor, event.subject) == (audit.operator(), f"he_key:{k1}")
        assert event.detail["previous"] == k0 and event.detail["poly_modulus_degree"] == 8192

        # the running key service encrypts the next job under the new key, without a restart; the worker
        # loads its public context; the result of jobA (in flight under k0) still decrypts
        with caplog.at_level(logging.INFO, logger="msgate.model.he_keys"):
            (pack_b,) = source.encrypt(service, ["jobB"], model=spec.fingerprint)
        assert pack_b.key_id == k1
        assert any(r.getMessage() == "CKKS active key changed; new requests use it" and getattr(r, "key_id", "") == k1
                   for r in caplog.records)
        result_b = worker.evaluate(pack_b, z)
        assert service.finalize(result_a)[0]["key_id"] == k0 and service.finalize(result_b)[0]["key_id"] == k1
        keys_now = {k["key_id"]: k for k in _listed(home, env)["keys"]}
        assert set(keys_now) == {k0, k1} and keys_now[k1]["active"] and not keys_now[k0]["active"]
        assert (keys_now[k0]["unfinished_jobs"], keys_now[k1]["unfinished_jobs"]) == (1, 1)

        refused = run(home, "keys", "he", "retire", k1, **env)
        assert refused.returncode == 2 and "is the active CKKS key" in refused.stderr, refused.stderr
        refused = run(home, "keys", "he", "retire", k0, **env)
        assert refused.returncode == 2 and "1 jobs that are not finished (jobA)" in refused.stderr, refused.stderr
        assert (home / "keys" / "he" / f"{k0}.secret").exists()
        _set_state(store, "jobA", "done")
        retired = run(home, "keys", "he", "retire", k0, **env)
        assert retired.returncode == 0 and f"retired CKKS key {k0}" in retired.stdout, retired.stderr
        assert not any((home / "keys" / "he").rglob(f"{k0}.*"))
        [event] = _events(store, "he_key.retired")
        assert (event.actor, event.subject, event.detail) == (audit.operator(), f"he_key:{k0}",
                                                              {"forced": False, "unfinished_jobs": 0})

        assert run(home, "keys", "he", "rotate", **env).returncode == 0  # k2; jobB (under k1) still running
        refused = run(home, "keys", "he", "retire", k1, **env)
        assert refused.returncode == 2 and "(jobB)" in refused.stderr, refused.stderr
        forced = run(home, "keys", "he", "retire", k1, "--force", **env)
        assert forced.returncode == 0 and "although 1 unfinished jobs used it" in forced.stdout, forced.stderr
        assert _events(store, "he_key.retired")[-1].detail == {"forced": True, "unfinished_jobs": 1}
        [last] = _listed(home, env)["keys"]
        assert last["active"] and last["key_id"] not in (k0, k1) and last["unfinished_jobs"] == 0
        assert run(home, "audit", "verify", **env).returncode == 0
    finally:
        store.close()


def test_retire_names_only_key_files(tmp_path: Path) -> None:
    """A key id is checked before it names a file: `retire ../keyring` must not delete the key ring."""
    home = tmp_path / "home"
    assert run(home, "keys", "init").returncode == 0
    assert run(home, "db", "upgrade").returncode == 0
    (home / "keys" / "he").mkdir(mode=0o700)
    (home / "keys" / "he" / "keyring.secret").write_text("{}")  # a file that is no key of msgate's
    for bad in ("../keyring", "keyring", "he-20990101000000-deadbeef"):
        refused = run(home, "keys", "he", "retire", bad)
        assert refused.returncode == 2 and "no CKKS key" in refused.stderr, refused.stderr
    assert (home / "keys" / "keyring.json").exists() and (home / "keys" / "he" / "keyring.secret").exists()


def test_rotate_is_refused_when_he_is_off_or_the_schema_is_not_current(tmp_path: Path) -> None:
    home = tmp_path / "home"
    assert run(home, "keys", "init").returncode == 0
    off = run(home, "keys", "he", "rotate")
    assert off.returncode == 2 and "homomorphic mode is off (MSGATE_HE__ENABLED" in off.stderr, off.stderr
    no_db = run(home, "keys", "he", "rotate", MSGATE_HE__ENABLED="1")
    assert no_db.returncode == 2 and "msgate db upgrade" in no_db.stderr, no_db.stderr
    assert run(home, "db", "upgrade", "--revision", "0003").returncode == 0
    older = run(home, "keys", "he", "rotate", MSGATE_HE__ENABLED="1")
    assert older.returncode == 2 and "schema revision 0003" in older.stderr, older.stderr
    assert not (home / "keys" / "he").exists()  # refused before a key was made
    assert run(home, "db", "current").stdout.strip() == "0003"  # and nothing migrated


def test_rotate_is_refused_for_another_account_than_the_key_folders_owner(tmp_path: Path) -> None:
    """Run as root beside a keys role running as `msgate`, the new secret (0600, root's) would be unreadable
    to the role and fail every HE job. The command runs with its effective uid set to another number."""
    home = tmp_path / "home"
    assert run(home, "keys", "init").returncode == 0
    assert run(home, "db", "upgrade").returncode == 0
    other = os.geteuid() + 4242
    as_other = (f"import os, sys; os.geteuid = lambda: {other}; sys.argv[0] = 'msgate'; "
                "from msgate.cli.app import main; main()")
    refused = run(home, "keys", "he", "rotate", python=as_other, MSGATE_HE__ENABLED="1")
    assert refused.returncode == 2, refused.stderr
    text = " ".join(refused.stderr.split())
    assert f"belongs to uid {os.geteuid()}, this command runs as uid {other}" in text
    assert "run it as that account" in text
    assert not (home / "keys" / "he").exists()


def test_the_key_service_logs_a_new_active_key_it_cannot_open(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A running key service meets a rotated key at its next request: a secret it cannot open is logged by
    name there (and the request refused), and once fixed the next request uses the new key."""
    ring = keyring.init(tmp_path / "keys" / "keyring.json")
    service = HeKeys(tmp_path, ring)
    k0 = service.ensure(he.HeParams())
    _, model = he.random_model(seed=3, members=2)
    u, _ = he.synthetic_inputs(1, model, seed=3)
    assert service.encrypt(u, ["c0"], widths=model.widths)[0].key_id == k0
    k1 = HeKeys(tmp_path, ring).rotate(he.HeParams())  # `keys he rotate` in another process
    secret = tmp_path / "keys" / "he" / f"{k1}.secret"
    secret.chmod(0o644)  # as a careless restore leaves it
    with caplog.at_level(logging.INFO, logger="msgate.model.he_keys"), pytest.raises(KeyFilePermissions):
        service.encrypt(u, ["c1"], widths=model.widths)
    [err] = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert err.getMessage() == "CKKS secret key of the new active key cannot be opened"
    assert getattr(err, "key_id", None) == k1 and str(secret) in getattr(err, "reason", "")
    secret.chmod(0o600)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="msgate.model.he_keys"):
        assert service.encrypt(u, ["c2"], widths=model.widths)[0].key_id == k1
        assert service.encrypt(u, ["c3"], widths=model.widths)[0].key_id == k1
    changed = [r for r in caplog.records if r.getMessage() == "CKKS active key changed; new requests use it"]
    assert len(changed) == 1  # once per change, not per request
