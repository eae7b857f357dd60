"""Retiring a key id the ring does not have is a typo to correct, not a lost key to restore."""

from __future__ import annotations

import pytest

from msgate.errors import KeyNotFound
from msgate.storage import keyring


def test_retiring_an_unknown_id_names_the_typo_not_a_backup() -> None:
    ring = keyring.generate().with_new_kek()
    old = ring.keks[0].id
    with pytest.raises(KeyNotFound) as raised:
        ring.without(old + "x")
    said = str(raised.value)
    assert "keys status" in said and "backup" not in said
    assert [k.id for k in ring.without(old).keks] == [ring.active_id]


def test_a_missing_key_for_data_still_says_restore_it() -> None:
    with pytest.raises(KeyNotFound, match="restore it from backup"):
        keyring.generate().get("kek-gone")
