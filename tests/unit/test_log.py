"""PHI-safe logging: allowlisted fields only, exception messages never rendered."""

from __future__ import annotations

import io
import json
import logging

from msgate.log import SafeFormatter, setup_logging


def _record(msg: str, **extra: object) -> logging.LogRecord:
    logger = logging.getLogger("t")
    return logger.makeRecord("t", logging.INFO, __file__, 1, msg, (), None, extra=extra)


def test_allowlist_drops_unknown_fields() -> None:
    line = SafeFormatter("json").format(_record("stored", instance_id=7, patient_name="DOE^JANE", ds="x"))
    doc = json.loads(line)
    assert doc["instance_id"] == 7 and doc["msg"] == "stored"
    assert "DOE" not in line and "patient_name" not in doc and "ds" not in doc


def test_exception_message_is_not_rendered() -> None:
    try:
        raise ValueError("PatientName DOE^JANE is invalid")
    except ValueError:
        import sys

        record = logging.getLogger("t").makeRecord("t", logging.ERROR, __file__, 1, "failed", (), sys.exc_info())
    line = SafeFormatter("json").format(record)
    assert "DOE" not in line and json.loads(line)["error_type"] == "ValueError"


def test_kv_style_and_pynetdicom_quiet() -> None:
    stream = io.StringIO()
    setup_logging("INFO", "kv", stream)
    logging.getLogger("msgate.x").info("hello", extra={"status": "0x0000", "count": 3})
    assert "msg=hello" in stream.getvalue() and "count=3" in stream.getvalue()
    from pynetdicom import _config

    assert _config.LOG_REQUEST_IDENTIFIERS is False and _config.LOG_RESPONSE_IDENTIFIERS is False
    assert logging.getLogger("pynetdicom").level >= logging.WARNING
