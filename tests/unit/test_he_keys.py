"""Key service and worker split: the worker cannot decrypt, ciphertexts are authenticated, keys rotate."""

from __future__ import annotations

import dataclasses
import stat
from pathlib import Path

import numpy as np
import pytest

from msgate.errors import KeyNotFound, TamperedData
from msgate.model import he
from msgate.model.he_keys import EncryptedPack, EncryptedResult, HeKeys
from msgate.model.he_worker import HeWorker
from msgate.storage import keyring


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[HeKeys, HeWorker, he.HeModel, str]:
    home = tmp_path_factory.mktemp("he-home")
    ring = keyring.init(home / "keys" / "keyring.json")
    keys = HeKeys(home, ring)
    key_id = keys.generate(he.HeParams())
    _, model = he.random_model(members=3)
    return keys, HeWorker.for_home(model, home), model, key_id


def _inputs(model: he.HeModel, n: int) -> tuple[np.ndarray, np.ndarray]:
    return he.synthetic_inputs(n, model, seed=7)


def _encrypt(keys: HeKeys, model: he.HeModel, u: np.ndarray, ids: list[str]) -> EncryptedPack:
    [pack] = keys.encrypt(u, ids, widths=model.widths)
    return pack


def test_worker_context_is_public_and_cannot_decrypt(setup: tuple[HeKeys, HeWorker, he.HeModel, str]) -> None:
    import tenseal as ts

    keys, worker, model, key_id = setup
    ctx, _, _ = worker.keys.get(key_id)
    assert ctx.is_private() is False and ctx.has_secret_key() is False
    u, z = _inputs(model, 2)
    pack = _encrypt(keys, model, u, ["a", "b"])
    with pytest.raises(ValueError, match="secret"):
        ts.ckks_vector_from(ctx, pack.ciphertexts[0]).decrypt()
    res = worker.evaluate(pack, z)
    with pytest.raises(ValueError, match="secret"):
        ts.ckks_vector_from(ctx, res.ciphertexts[0]).decrypt()
    assert worker.keys.load_seconds[key_id] > 0


def test_round_trip_matches_plaintext(setup: tuple[HeKeys, HeWorker, he.HeModel, str]) -> None:
    keys, worker, model, _ = setup
    u, z = _inputs(model, 5)
    pack = EncryptedPack.from_wire(_encrypt(keys, model, u, [f"c{i}" for i in range(5)]).to_wire())
    res = EncryptedResult.from_wire(worker.evaluate_wire(pack.to_wire(), z.tolist()))
    got = keys.open_result(res)
    np.testing.assert_allclose(got, model.plain_logits(u, z), atol=1e-4)
    out = keys.finalize(res, t_edss=1.3, t_ms=0.8)
    assert [o["case_id"] for o in out] == [f"c{i}" for i in range(5)]
    assert all(abs(sum(o["edss_probabilities"]) - 1) <= 1e-3 for o in out)  # rounded to 4 decimals
    assert all(p == round(p, 4) for o in out for p in o["edss_probabilities"])


def _flip(b: bytes, at: int) -> bytes:
    return b[:at] + bytes([b[at] ^ 1]) + b[at + 1:]


def test_altered_or_swapped_ciphertexts_are_detected(setup: tuple[HeKeys, HeWorker, he.HeModel, str]) -> None:
    keys, worker, model, _ = setup
    u, z = _inputs(model, 4)
    p1 = _encrypt(keys, model, u[:2], ["a", "b"])
    p2 = _encrypt(keys, model, u[2:], ["c", "d"])
    # 1. a byte of an input ciphertext altered on the way to the worker (it may or may not still parse)
    bad = dataclasses.replace(p1, ciphertexts=(_flip(p1.ciphertexts[0], len(p1.ciphertexts[0]) // 2),
                                               *p1.ciphertexts[1:]))
    with pytest.raises(TamperedData):
        keys.open_result(worker.evaluate(bad, z[:, :2]))
    # 2. ciphertexts of another request swapped in
    swapped = dataclasses.replace(p1, ciphertexts=p2.ciphertexts)
    with pytest.raises(TamperedData, match="did not send"):
        keys.open_result(worker.evaluate(swapped, z[:, :2]))
    # 3. the case list reordered (the results would land on the wrong patients)
    reordered = dataclasses.replace(p1, case_ids=("b", "a"))
    with pytest.raises(TamperedData, match="did not send"):
        keys.open_result(worker.evaluate(reordered, z[:, :2]))
    # 4. the encrypted result altered, or another request's result substituted
    res1, res2 = worker.evaluate(p1, z[:, :2]), worker.evaluate(p2, z[:, 2:])
    with pytest.raises(TamperedData, match="MAC"):
        keys.open_result(dataclasses.replace(res1, ciphertexts=(_flip(res1.ciphertexts[0], 100),
                                                                *res1.ciphertexts[1:])))
    with pytest.raises(TamperedData, match="MAC"):
        keys.open_result(dataclasses.replace(res1, ciphertexts=res2.ciphertexts))
    with pytest.raises(TamperedData, match="MAC"):  # two outputs swapped (EDSS logit <-> MS logit)
        c = res1.ciphertexts
        keys.open_result(dataclasses.replace(res1, ciphertexts=(c[5], *c[1:5], c[0])))
    assert keys.open_result(res1).shape == (2, 6)


def test_secret_key_file_is_private_and_wrapped(setup: tuple[HeKeys, HeWorker, he.HeModel, str]) -> None:
    import json

    import tenseal as ts

    keys, _, _, key_id = setup
    path = keys.dir / f"{key_id}.secret"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(keys.dir.stat().st_mode) == 0o700
    doc = json.loads(path.read_text())
    assert doc["kek_id"] == keys.ring.active_id if keys.ring else False
    import base64

    with pytest.raises(Exception):  # the body is AES-GCM ciphertext, not a TenSEAL context
        ts.context_from(base64.b64decode(doc["body"]))
    # the public files never carry the secret key
    pub = ts.context_from((keys.public_dir / f"{key_id}.ctx").read_bytes())
    assert not pub.is_private()


def test_rotation_keeps_in_flight_results_readable(tmp_path: Path) -> None:
    ring = keyring.init(tmp_path / "keys" / "keyring.json")
    keys = HeKeys(tmp_path, ring)
    old = keys.ensure(he.HeParams())
    assert keys.ensure(he.HeParams()) == old  # same parameters: no rotation
    _, model = he.random_model()
    worker = HeWorker.for_home(model, tmp_path)
    u, z = _inputs(model, 1)
    in_flight = worker.evaluate(_encrypt(keys, model, u, ["x"]), z)
    new = keys.rotate(he.HeParams())
    assert new != old and keys.active_id() == new
    fresh = _encrypt(keys, model, u, ["x"])
    assert fresh.key_id == new
    np.testing.assert_allclose(keys.open_result(in_flight), keys.open_result(worker.evaluate(fresh, z)), atol=1e-4)
    # a restarted key service reads the wrapped secret back from disk
    again = HeKeys(tmp_path, keyring.load(tmp_path / "keys" / "keyring.json"))
    assert again.open_result(in_flight).shape == (1, 6)
    keys.retire(old)
    with pytest.raises(KeyNotFound):
        HeKeys(tmp_path, ring).open_result(in_flight)


def test_keys_role_makes_a_key_and_rotates_on_a_parameter_change(tmp_path: Path) -> None:
    import threading

    from msgate.config import load_settings
    from msgate.model.he_service import run
    from msgate.storage.store import open_store

    home = tmp_path / "home"
    settings = load_settings(home=home, storage={"min_free_bytes": 0, "purge_free_bytes": 0}, he={"enabled": True})
    store = open_store(settings)
    try:
        stop = threading.Event()
        stop.set()  # run() makes sure of the key, then returns at once
        run(store, stop)
        keys = HeKeys(home, store.ring)
        first = keys.active_id()
        assert first is not None and keys.params_of(first) == he.HeParams()
        run(store, stop)
        assert keys.active_id() == first  # same parameters: same key
        bigger = load_settings(home=home, storage={"min_free_bytes": 0, "purge_free_bytes": 0},
                               he={"enabled": True, "coeff_mod_bit_sizes": [40, 32, 32, 32, 32, 50]})
        store.settings = bigger
        run(store, stop)
        assert keys.active_id() != first and first in keys.key_ids()
    finally:
        store.close()


def test_kek_rotation_rewraps_the_ckks_secret_and_retire_sees_it(tmp_path: Path) -> None:
    """`keys rotate` re-wraps the CKKS secret key file under the new KEK, and until then the old KEK
    counts as in use (`keys retire` used to drop it, and the HE key was lost)."""
    from msgate.config import load_settings
    from msgate.storage import rotation
    from msgate.storage.store import open_store

    home = tmp_path / "home"
    store = open_store(load_settings(home=home, storage={"min_free_bytes": 0, "purge_free_bytes": 0}))
    try:
        old = store.ring.active_id
        key_id = HeKeys(home, store.ring).generate(he.HeParams())
        with store.db.session() as session:
            before = rotation.key_usage(session, home)
        assert before.get(old, 0) >= 1 and HeKeys(home).kek_usage() == {old: 1}
        store.ring = store.ring.with_new_kek()
        report = rotation.rotate(store)
        assert old not in report.remaining and HeKeys(home).kek_usage() == {store.ring.active_id: 1}
        keys = HeKeys(home, store.ring.without(old))  # the old KEK retired
        assert keys._secret(key_id).mac_key
    finally:
        store.close()
