"""The keyed audit chain on both backends (embedded SQLite and the machine's PostgreSQL).

Before, ``hash_n = sha256(hash_{n-1} | event)`` with no key: someone with write access to the database
edited a record, recomputed every later hash and the head, and verify passed. Each attack here is what
such a writer can do without the key ring: recompute SHA-256, recompute with a key of their own, remove
the keyed part and rehash the chain unkeyed.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
from collections.abc import Callable, Iterator

import pytest
from alembic.script import ScriptDirectory
from sqlalchemy import event
from sqlmodel import col, func, select

from msgate.config import Settings
from msgate.errors import ConfigError
from msgate.storage import audit, keyring
from msgate.storage.db import MIGRATIONS, Database
from msgate.storage.models import AuditEvent, AuditHead
from msgate.storage.store import Store, open_store

GENESIS = "0" * 64


def _sha(prev: str, body: bytes) -> str:
    """The attacker's SHA-256 chain step (written here, not taken from msgate)."""
    return hashlib.sha256(prev.encode() + b"|" + body).hexdigest()


def _hmac_with(key: bytes) -> Callable[[str, bytes], str]:
    return lambda prev, body: hmac.new(key, prev.encode() + b"|" + body, hashlib.sha256).hexdigest()


def _body(row: AuditEvent) -> bytes:
    return audit.canonical(seq=row.seq, ts=row.ts, kind=row.kind, actor=row.actor, subject=row.subject,
                           detail=row.detail)


def _rehash(db: Database, from_seq: int, step: Callable[[str, bytes], str], *, start: str | None = None,
            edit: Callable[[AuditEvent], None] = lambda row: None) -> None:
    """A database writer's rewrite: edit record ``from_seq``, recompute it and every later hash, move the
    head. ``start`` replaces what record ``from_seq`` links to (default: what it links to now)."""
    with db.session() as s:
        rows = s.exec(select(AuditEvent).where(AuditEvent.seq >= from_seq).order_by(col(AuditEvent.seq))).all()
        prev = start if start is not None else rows[0].prev_hash
        for row in rows:
            if row.seq == from_seq:
                edit(row)
            row.prev_hash, row.hash = prev, step(prev, _body(row))
            prev = row.hash
            s.add(row)
        head = s.get(AuditHead, 1)
        assert head is not None
        head.seq, head.hash = rows[-1].seq, prev
        s.add(head)


def _events(store: Store, n: int) -> None:
    with store.db.session() as s:
        for i in range(n):
            audit.append(s, kind="test.event", actor="t", subject=f"x:{i}", detail={"i": i})


def _verify(store: Store) -> audit.Verification:
    with store.db.session() as s:
        return audit.verify(s)


def _previous_revision() -> str:
    """The revision before the keying one (0007), whatever revisions came after it."""
    script = ScriptDirectory(str(MIGRATIONS))
    down = script.get_revision("0007").down_revision
    assert isinstance(down, str)
    return down


def _old_database(settings: Settings, n: int) -> None:
    """A database the release before keying wrote: the schema before revision 0007, ``n`` SHA-256 records
    appended by a process whose engine has no audit key."""
    if not settings.keyring_path.exists():
        keyring.init(settings.keyring_path)
    db = Database(settings.resolved_database_url)
    try:
        db.upgrade(_previous_revision())
        with db.session() as s:
            for i in range(n):
                audit.append(s, kind="test.old", actor="t", subject=f"old:{i}")
        with db.session() as s:
            assert s.exec(select(AuditEvent.prev_hash).where(AuditEvent.seq == 1)).one() == GENESIS
    finally:
        db.dispose()


@pytest.fixture
def old_store(settings: Settings) -> Iterator[Store]:
    """Three records from before the chain was keyed, then migrated as ``msgate serve`` does."""
    _old_database(settings, 3)
    st = open_store(settings)
    yield st
    st.close()


def test_a_rewrite_with_recomputed_sha256_hashes_fails(store: Store) -> None:
    """The attack of docs/security.md: edit record 3, recompute every later hash and the head."""
    _events(store, 5)
    assert _verify(store).ok
    _rehash(store.db, 3, _sha, edit=lambda row: setattr(row, "actor", "mallory"))
    result = _verify(store)
    assert not result.ok and result.first_bad_seq == 3 and "altered" in result.reason, result


def test_a_rewrite_recomputed_with_another_key_fails(store: Store) -> None:
    _events(store, 5)
    wrong = secrets.token_bytes(32)
    _rehash(store.db, 2, _hmac_with(wrong), edit=lambda row: setattr(row, "subject", "x:forged"))
    result = _verify(store)
    assert not result.ok and result.first_bad_seq == 2, result
    # the whole chain, from a keyed start made with that key too: named at record 1
    _rehash(store.db, 1, _hmac_with(wrong), start=hmac.new(wrong, b"genesis", hashlib.sha256).hexdigest())
    result = _verify(store)
    assert not result.ok and result.first_bad_seq == 1 and "another key ring" in result.reason, result


def test_a_chain_created_keyed_rehashed_unkeyed_fails(store: Store) -> None:
    """Record 1 linked to the zeros again and every hash recomputed as SHA-256: an unkeyed chain that
    this database never had."""
    _events(store, 4)
    _rehash(store.db, 1, _sha, start=GENESIS)
    result = _verify(store)
    assert not result.ok and result.first_bad_seq is None and result.keyed_from is None, result
    assert "none of the 4 records is keyed" in result.reason


def test_an_old_database_is_keyed_once_from_its_next_record(settings: Settings, old_store: Store) -> None:
    with old_store.db.session() as s:
        marker = s.exec(select(AuditEvent).where(AuditEvent.kind == audit.MARKER)).one()
    assert marker.seq == 4 and marker.detail == {"scheme": "hmac-sha256/v1", "from_seq": 4}
    _events(old_store, 2)
    result = _verify(old_store)
    assert result.ok and result.checked == 6 and result.keyed_from == 4, result
    again = open_store(settings)  # the next start migrates again: no second record
    try:
        with again.db.session() as s:
            assert s.exec(select(func.count()).select_from(AuditEvent)
                          .where(AuditEvent.kind == audit.MARKER)).one() == 1
            assert audit.current_head(s) == audit.Head(6, s.get(AuditHead, 1).hash, 4)  # type: ignore[union-attr]
            assert audit.current_head(s, 4) == audit.Head(4, marker.hash, 4)
            assert audit.current_head(s, 7) is None
    finally:
        again.close()


def test_the_keying_revision_refuses_to_run_without_the_key(settings: Settings) -> None:
    """Migration 0007 keys the chain in the upgrade's transaction; without the key ring it would leave the
    database at that revision with an unkeyed chain (then no later start keys it), so it refuses."""
    _old_database(settings, 2)
    db = Database(settings.resolved_database_url)
    try:
        with pytest.raises(ConfigError, match="keys the audit chain and needs the key ring"):
            db.upgrade()
        assert db.current_revision() == _previous_revision()  # nothing of the failed upgrade stays
    finally:
        db.dispose()


def test_a_chain_stripped_of_its_keyed_part_is_not_keyed_again_at_the_next_start(old_store: Store) -> None:
    """The keyed part removed and the chain rehashed unkeyed: a later serve start (migrate) used to key it
    again from a later seq, and verify passed after it."""
    _events(old_store, 1)
    settings = old_store.settings
    with old_store.db.session() as s:
        marker = s.exec(select(AuditEvent).where(AuditEvent.kind == audit.MARKER)).one()
        marker.kind, marker.detail = "test.old", {}
        s.add(marker)
    _rehash(old_store.db, marker.seq, _sha)
    assert not _verify(old_store).ok
    again = open_store(settings)  # serve's next start
    try:
        result = _verify(again)
        assert not result.ok and result.keyed_from is None, result
    finally:
        again.close()


def test_a_process_started_before_serve_keys_the_chain_appends_keyed_after(settings: Settings) -> None:
    """A role or CLI command opened before the upgrade appends (SHA-256: the chain is not keyed yet), serve
    starts and keys it; the next append of that same process must be keyed, not SHA-256 on top of the
    keyed record."""
    _old_database(settings, 2)
    early = open_store(settings, migrate=False)
    try:
        _events(early, 1)
        open_store(settings).close()  # serve's start: audit.keyed is record 4
        _events(early, 1)
        result = _verify(early)
        assert result.ok and result.checked == 5 and result.keyed_from == 4, result
    finally:
        early.close()


def test_records_before_the_keyed_start_are_protected_by_it(old_store: Store) -> None:
    """Record 2 is SHA-256, but the keyed record after it covers its hash: recomputing to the head fails."""
    _events(old_store, 1)
    _rehash(old_store.db, 2, _sha, edit=lambda row: setattr(row, "actor", "mallory"))
    result = _verify(old_store)
    assert not result.ok and result.first_bad_seq == 4, result  # the audit.keyed record no longer verifies


def test_deleting_the_keyed_record_and_rehashing_unkeyed_fails(old_store: Store) -> None:
    _events(old_store, 2)
    with old_store.db.session() as s:  # delete record 4 (audit.keyed), renumber the later ones down
        later = s.exec(select(AuditEvent).where(AuditEvent.seq >= 4).order_by(col(AuditEvent.seq))).all()
        kept = [dict(r.model_dump(), seq=r.seq - 1) for r in later if r.kind != audit.MARKER]
        for row in later:
            s.delete(row)
        s.flush()
        for doc in kept:
            s.add(AuditEvent(**doc))
    with old_store.db.session() as s:
        assert s.exec(select(AuditEvent.kind).where(AuditEvent.kind == audit.MARKER)).first() is None
        third = s.exec(select(AuditEvent.hash).where(AuditEvent.seq == 3)).one()
    _rehash(old_store.db, 4, _sha, start=third)
    result = _verify(old_store)
    assert not result.ok and result.keyed_from is None and "none of the 5 records is keyed" in result.reason, result


def test_an_append_without_the_key_to_a_keyed_chain_is_refused(store: Store) -> None:
    _events(store, 1)
    bare = Database(store.settings.resolved_database_url)  # an engine open_store did not key
    try:
        with pytest.raises(audit.AuditKeyMissing, match="keyed from seq 1"), bare.session() as s:
            audit.append(s, kind="test.unkeyed", actor="t")
        with bare.session() as s:
            assert s.exec(select(func.count()).select_from(AuditEvent)).one() == 1
            result = audit.verify(s)
        assert not result.ok and "needs the key ring" in result.reason
    finally:
        bare.dispose()
    assert _verify(store).ok


def test_the_key_is_bound_per_engine_and_another_key_ring_is_named(store: Store) -> None:
    """Two engines in one process, one with another key ring's audit key: each verifies with its own, and
    the other names record 1's keyed start, not 'altered'."""
    _events(store, 2)
    other = Database(store.settings.resolved_database_url)
    audit.use_key(other.engine, audit.chain_key(keyring.generate().index_key))
    try:
        with other.session() as s:
            result = audit.verify(s)
        assert not result.ok and result.first_bad_seq == 1 and "another key ring" in result.reason, result
    finally:
        other.dispose()
    assert _verify(store).ok


def test_concurrent_appends_on_two_engines_form_one_keyed_chain(settings: Settings, store: Store) -> None:
    second = open_store(settings, migrate=False)
    errors: list[BaseException] = []

    def writer(st: Store, n: int) -> None:
        try:
            for i in range(6):
                with st.db.session() as s:
                    if i % 2:
                        audit.append(s, kind="test.one", actor=f"w{n}", subject=f"x:{i}")
                    else:
                        audit.append_many(s, [("test.many", f"w{n}", f"x:{i}:{j}", {"j": j}) for j in range(3)])
        except BaseException as exc:  # noqa: BLE001 - asserted below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(st, n)) for n, st in enumerate([store, second, store, second])]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    finally:
        second.close()
    assert not errors, errors
    result = _verify(store)
    assert result.ok and result.checked == 4 * (3 * 1 + 3 * 3) and result.keyed_from == 1, result


def test_roles_keying_an_old_database_together_append_one_record(settings: Settings) -> None:
    _old_database(settings, 2)
    key = audit.chain_key(keyring.load(settings.keyring_path).index_key)
    barrier, errors = threading.Barrier(4), []

    def role() -> None:
        db = Database(settings.resolved_database_url)
        try:
            barrier.wait()
            db.upgrade(audit_key=key)
        except BaseException as exc:  # noqa: BLE001 - asserted below
            errors.append(exc)
        finally:
            db.dispose()

    threads = [threading.Thread(target=role) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    st = open_store(settings, migrate=False)
    try:
        with st.db.session() as s:
            assert s.exec(select(AuditEvent.seq).where(AuditEvent.kind == audit.MARKER)).all() == [3]
        assert _verify(st).keyed_from == 3
    finally:
        st.close()


def test_a_keyed_chain_costs_no_lookup_per_append(store: Store) -> None:
    """Where the keyed part starts is looked up once per engine, not per append (the indexer appends a
    batch at a time, the CLI one event per view)."""
    _events(store, 2)
    statements: list[str] = []

    def seen(_conn: object, _cursor: object, statement: str, *_: object) -> None:
        statements.append(statement)

    event.listen(store.db.engine, "before_cursor_execute", seen)
    try:
        _events(store, 1)
        with store.db.session() as s:
            audit.append_many(s, [("test.many", "t", "y", {})])
    finally:
        event.remove(store.db.engine, "before_cursor_execute", seen)
    lookups = [q for q in statements if q.lstrip().upper().startswith("SELECT") and "audit_event" in q]
    assert lookups == [], lookups
