"""PHI-safe logging: allowlisted fields only, exception messages never rendered."""

from __future__ import annotations

import io
import json
import logging
import warnings

from msgate.log import WITHHELD, SafeFormatter, setup_logging


def _record(msg: str, name: str = "msgate.t", args: tuple[object, ...] = (), **extra: object) -> logging.LogRecord:
    return logging.getLogger(name).makeRecord(name, logging.INFO, __file__, 1, msg, args, None, extra=extra)


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


def test_another_librarys_message_is_shown_without_its_values() -> None:
    """pydicom formats the value into its message ("Invalid value for VR UI: '2.25.0123'"): withheld,
    with where it came from; a format string with arguments is shown without them."""
    line = SafeFormatter("json").format(_record("Invalid value for VR UI: '2.25.099887766'", name="pydicom"))
    doc = json.loads(line)
    assert "99887766" not in line and doc["msg"] == WITHHELD and doc["src"].startswith("test_log.py:")
    line = SafeFormatter("json").format(_record("Invalid value for VR DA: %r", name="pydicom", args=("1953-03-17",)))
    assert "1953" not in line and json.loads(line)["msg"] == "Invalid value for VR DA: %r"
    for quoting in ('The string "DOE JOHN" is unlikely to represent the intended person name', "Patient DOE^JOHN"):
        assert json.loads(SafeFormatter("json").format(_record(quoting, name="highdicom")))["msg"] == WITHHELD
    constant = "DIMSE timeout reached while waiting for message response"  # a constant text operators need
    assert json.loads(SafeFormatter("json").format(_record(constant, name="pynetdicom.dimse")))["msg"] == constant


def test_library_warnings_are_logged_without_their_text() -> None:
    """highdicom warns with the Patient's Name in the text; it went raw to stderr, past the formatter."""
    stream = io.StringIO()
    setup_logging("INFO", "json", stream)
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.warn('The string "ZZTOPSECRET QWERTY" is unlikely to represent the intended person name',
                      UserWarning, stacklevel=1)
    out = stream.getvalue()
    assert "ZZTOPSECRET" not in out and '"error_type": "UserWarning"' in out


def test_a_taken_metrics_port_is_named_with_its_reason(caplog: object, monkeypatch: object) -> None:
    """The log said only "metrics port unavailable": an operator could not tell a port in use from an
    address this host does not have. It now names the errno (code and symbolic reason)."""
    import socket

    import pytest

    from msgate import metrics

    assert isinstance(caplog, pytest.LogCaptureFixture) and isinstance(monkeypatch, pytest.MonkeyPatch)
    monkeypatch.setattr(metrics, "_collector", object())  # no store collector registered in this process
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen(1)
        port = holder.getsockname()[1]
        with caplog.at_level(logging.WARNING, logger="msgate.metrics"):
            assert metrics.serve(None, "127.0.0.1", port) is None
    [record] = [r for r in caplog.records if r.name == "msgate.metrics"]
    fields = json.loads(SafeFormatter("json").format(record))
    assert fields["port"] == port and fields["reason"] == "EADDRINUSE" and fields["code"] == 98
