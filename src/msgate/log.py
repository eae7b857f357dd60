"""PHI-safe structured logging (stdlib ``logging``, one JSON or key=value line per record).

Rules (STYLE.md, "Logging"):
- ``extra`` keys outside :data:`ALLOWED_FIELDS` are dropped, so a dataset or a name passed by mistake
  never reaches the output;
- exceptions are rendered as their type and stack frames only, never their message text, because
  third-party messages (pydicom, hl7apy, drivers) may quote field values;
- another library's message (pydicom, highdicom, drivers) is shown only as its format string when it
  has arguments, or as it is when it holds no digits and no quotes (a constant text); any other message
  it formatted itself may quote values (a UID, a name, a date) and is withheld, with its source line; Python ``warnings`` (highdicom quotes a Patient's Name) are logged
  the same way, as their category and source line, never their text;
- pynetdicom's identifier logging is switched off and its debug handlers stay silent.
Use :func:`uid_hash` (a keyed hash) when a UID is needed for correlation.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import traceback
import warnings
from datetime import UTC, datetime
from typing import Any, TextIO

ALLOWED_FIELDS = frozenset(
    {
        "instance_id", "study_id", "series_id", "message_id", "patient_id", "job_id", "blob_id",
        "outbox_id", "case_id", "assoc_id", "conn_id", "reason", "status", "code", "duration_ms",
        "role", "host", "port", "count", "bytes", "kek_id", "state", "attempt", "peer", "calling_aet",
        "msg_type", "version", "uid_hash", "error_type", "ack", "queue", "device", "worker",
        "destination", "seq", "elapsed_s", "batch", "sop_class", "transfer_syntax", "model_version", "key_id",
        "event", "hash", "keyed_from",  # the audit chain anchor (msgate.storage.audit_anchor): no PHI
        "studies", "blobs", "by_age", "by_space", "engine_texts",  # retention.purged counts
    }
)
_STANDARD_ATTRS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None)).keys()) | {"message", "asctime"}


def _safe_exception(exc_info: Any) -> dict[str, Any]:
    exc_type, exc, tb = exc_info
    frames = [f"{f.filename.rsplit('/', 1)[-1]}:{f.lineno} {f.name}" for f in traceback.extract_tb(tb)]
    return {"error_type": getattr(exc_type, "__name__", str(exc_type)), "stack": frames[-8:]}


def safe_fields(record: logging.LogRecord) -> dict[str, Any]:
    """The allowlisted ``extra`` fields of a record; everything else is dropped."""
    fields: dict[str, Any] = {}
    for key, value in vars(record).items():
        if key in _STANDARD_ATTRS or key.startswith("_"):
            continue
        if key in ALLOWED_FIELDS:
            fields[key] = value if isinstance(value, (int, float, bool)) or value is None else str(value)
    return fields


class SafeFormatter(logging.Formatter):
    """Render a record as one JSON object (``json``) or ``key=value`` pairs (``kv``)."""

    def __init__(self, style: str = "json") -> None:
        super().__init__()
        self.output_style = style

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "msg": _message(record),
        }
        if not _own(record):
            doc["src"] = f"{record.filename}:{record.lineno}"
        doc.update(safe_fields(record))
        if record.exc_info and record.exc_info[0] is not None:
            doc.update(_safe_exception(record.exc_info))
        if self.output_style == "json":
            return json.dumps(doc, default=str, ensure_ascii=False)
        return " ".join(f"{k}={json.dumps(v, default=str) if not isinstance(v, str) or ' ' in v else v}"
                        for k, v in doc.items())


WITHHELD = "(message withheld: it may quote data)"
# A library's message with no digits and no quotes is taken for a constant text (the values such messages
# quote, UIDs, dates, names, come with digits or in quotes): shown, so operators still read pynetdicom's
# "Connection closed before the entire PDU was received" or a pool's "Exception during reset".
_CONSTANT = re.compile(r"^[A-Za-z ,.;:()/_-]+$")


def _own(record: logging.LogRecord) -> bool:
    return record.name == "msgate" or record.name.startswith("msgate.")


def _message(record: logging.LogRecord) -> str:
    """msgate's own messages are constant strings (values go in allowlisted fields); another library's
    only as a format string whose arguments are left out."""
    if not isinstance(record.msg, str):
        return type(record.msg).__name__
    if _own(record) or record.args:
        return record.msg
    if len(record.msg) <= 200 and _CONSTANT.match(record.msg):  # "DIMSE timeout reached while waiting ..."
        return record.msg
    return WITHHELD


def _show_warning(message: Any, category: type[Warning], filename: str, lineno: int, file: Any = None,
                  line: str | None = None) -> None:
    """``warnings.showwarning``: the category and where, never the text (it may quote a value)."""
    logging.getLogger("msgate.warnings").warning(
        "library warning (text withheld: it may quote data)",
        extra={"error_type": getattr(category, "__name__", "Warning"),
               "reason": f"{str(filename).rsplit('/', 1)[-1]}:{lineno}"})


def quiet_pynetdicom() -> None:
    """Switch off pynetdicom's identifier logging and its chatty (UID-printing) handlers."""
    from pynetdicom import _config as pynd_config

    pynd_config.LOG_REQUEST_IDENTIFIERS = False
    pynd_config.LOG_RESPONSE_IDENTIFIERS = False
    pynd_config.LOG_HANDLER_LEVEL = "none"
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)


def setup_logging(level: str = "INFO", style: str = "json", stream: TextIO | None = None) -> None:
    """Install the PHI-safe formatter on the root logger (idempotent)."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "_msgate", False):
            root.removeHandler(handler)
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(SafeFormatter(style))
    handler._msgate = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(level)
    warnings.showwarning = _show_warning
    quiet_pynetdicom()
    for noisy in ("hl7apy", "pydicom", "highdicom", "celery", "kombu", "amqp", "alembic", "sqlalchemy"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLevelName(level)))
