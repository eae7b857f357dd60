"""Integer columns (InstanceNumber, SeriesNumber) take only what fits them: anything else is NULL.

IS text may carry any number of digits (a timestamp used as a number, ``3000000000``); the columns are
32-bit INTEGER. PostgreSQL refused the insert (DataError) and SQLite a 20-digit value ("Python int too
large"), so the instance could never be indexed. It is now stored with the number NULL, and a warning
names the internal ids only (never the value, never a UID)."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import dcmread
from sqlmodel import select

from msgate.log import safe_fields
from msgate.storage.models import Instance, Series
from msgate.storage.store import Store, open_store
from tests.conftest import make_settings
from tests.dicom_factory import mr_slice


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    st = open_store(make_settings(tmp_path / "home", "sqlite"))
    yield st
    st.close()


def _slice(instance_number: str, series_number: str) -> bytes:
    ds = dcmread(io.BytesIO(mr_slice()))
    ds.InstanceNumber, ds.SeriesNumber = instance_number, series_number
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


@pytest.mark.parametrize(("instance_number", "series_number", "expected"), [
    ("99999999999999999999", "3000000000", (None, None)),  # 20 digits: SQLite raised OverflowError
    ("3000000000", "-2147483649", (None, None)),
    ("2147483647", "-2147483648", (2147483647, -2147483648)),  # the edges of INTEGER are kept
    ("+12", " 7 ", (12, 7)),
])
def test_numbers_outside_integer_become_null(store: Store, caplog: pytest.LogCaptureFixture, instance_number: str,
                                             series_number: str, expected: tuple[int | None, int | None]) -> None:
    caplog.set_level(logging.WARNING, logger="msgate.storage.index_dicom")
    stored = store.ingest.store_instance(source=_slice(instance_number, series_number))
    with store.db.session() as session:
        instance = session.get(Instance, stored.instance_id)
        [series] = session.exec(select(Series)).all()
    assert instance is not None and (instance.instance_number, series.series_number) == expected
    warnings = [r for r in caplog.records if r.name == "msgate.storage.index_dicom"]
    assert len(warnings) == sum(v is None for v in expected)
    for record in warnings:
        assert record.levelno == logging.WARNING
        assert getattr(record, "study_id", None) == stored.study_id
        fields = record.getMessage() + " " + " ".join(str(v) for v in safe_fields(record).values())
        assert instance_number.strip() not in fields and series_number.strip() not in fields
