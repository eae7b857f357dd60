"""Spies on every way a process can read or decrypt EHR data; a process that uses one records it and fails.

``main()`` runs the ``msgate`` CLI with the spies installed (``python -c "import ehr_spy; ehr_spy.main()"
serve --role worker``), so a real worker process proves that it never touches the EHR: each attempt is
appended to the file named by ``MSGATE_TEST_EHR_SPY`` (written before raising, so an exception that
some handler swallows is still seen) and raises :class:`EhrTouched`. This file holds no tests.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

EHR_COLUMNS = ("observation.", "patient.", "patient_identifier.", "order.", "study.birth_date", "study.sex",
               "study.patient_", "study.study_date")
"""Encrypted columns that hold EHR values or demographics (and the study date the EHR snapshot is taken at)."""


class EhrTouched(AssertionError):
    """An EHR read or decryption in a process that must not make one."""


def _record(what: str) -> None:
    path = os.environ.get("MSGATE_TEST_EHR_SPY")
    if path:
        with open(path, "a") as handle:
            handle.write(f"{os.getpid()} {what}\n")
    raise EhrTouched(what)


def install(patch: Callable[[Any, str, Any], None] = setattr) -> None:
    """Replace the EHR readers; ``patch`` is ``setattr`` or pytest's ``monkeypatch.setattr``."""
    from msgate.model import he_keys, he_service
    from msgate.storage import crypto, repo_ehr
    from msgate.workers import ehr as ehr_mod

    original = crypto.FieldCipher.decrypt

    def decrypt(self: Any, token: bytes | None, *, column: str) -> str | None:
        if column.startswith(EHR_COLUMNS):
            _record(f"FieldCipher.decrypt {column}")
        return original(self, token, column=column)

    def spy(name: str) -> Callable[..., Any]:
        def called(*_: Any, **__: Any) -> Any:
            _record(name)
        return called

    patch(crypto.FieldCipher, "decrypt", decrypt)
    for module, name in ((ehr_mod, "link"), (ehr_mod, "snapshot"), (repo_ehr, "snapshot"),
                         (he_service, "job_inputs")):
        patch(module, name, spy(f"{module.__name__}.{name}"))
    patch(he_keys.HeKeys, "_secret", spy("HeKeys._secret (the CKKS secret key)"))


def main() -> None:
    install()
    from msgate.cli.app import main as cli

    cli()
