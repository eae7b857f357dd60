"""ACK messages for the commit path, built by hand in the sender's delimiters (HL7 v2.5.1 §2.9, §2.15).

Built without a parser because the commit path must stay fast; tests validate the output with hl7apy.
MSA-1 is one of table 0008 (AA/AE/AR, CA/CE/CR); MSA-2 echoes MSH-10. An error adds an ERR segment
with a table 0357 code, its location and severity: ERR-2/3/4 from v2.5 on, ERR-1 (ELD) before.
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass
from datetime import UTC, datetime

from msgate.hl7.msh import DEFAULT_ENCODING, Encoding, Msh

ERROR_TEXT: dict[int, str] = {
    0: "Message accepted", 100: "Segment sequence error", 101: "Required field missing", 102: "Data type error",
    103: "Table value not found", 104: "Value too long", 200: "Unsupported message type",
    201: "Unsupported event code", 202: "Unsupported processing id", 203: "Unsupported version id",
    204: "Unknown key identifier", 205: "Duplicate key identifier", 206: "Application record locked",
    207: "Application internal error",
}
_counter = itertools.count(1)
_prefix = os.urandom(3).hex().upper()


@dataclass(frozen=True)
class AckError:
    """One ERR segment: a table 0357 code, an HL7 location (``MSH^1^10``), severity E/W/I."""

    code: int
    location: str = ""
    severity: str = "E"


def _ts() -> str:
    return datetime.now(UTC).strftime("%Y%m%d%H%M%S+0000")


def _control_id() -> str:
    return f"MSG{_prefix}{next(_counter):09d}"


def _esc(value: str, enc: Encoding) -> str:
    out = value.replace(enc.escape, f"{enc.escape}E{enc.escape}")
    for char, code in ((enc.field, "F"), (enc.component, "S"), (enc.subcomponent, "T"), (enc.repetition, "R")):
        out = out.replace(char, f"{enc.escape}{code}{enc.escape}")
    return out


def _modern(version: str) -> bool:
    try:
        major, minor = version.split(".")[:2]
        return (int(major), int(minor)) >= (2, 5)
    except ValueError:
        return True


def err_segment(error: AckError, enc: Encoding, version: str) -> str:
    f, c, s = enc.field, enc.component, enc.subcomponent
    text = ERROR_TEXT.get(error.code, "Application error")
    loc = error.location.split("^") if error.location else []
    if _modern(version):
        return f"ERR{f}{f}{c.join(loc)}{f}{error.code}{c}{text}{c}HL70357{f}{error.severity}"
    location = (loc + ["", "", ""])[:3] if loc else ["", "", ""]
    return f"ERR{f}{c.join(location)}{c}{error.code}{s}{text}{s}HL70357"


def build_ack(code: str, msh: Msh | None, *, errors: tuple[AckError, ...] = (), sending_application: str = "MSGATE",
              sending_facility: str = "MSGATE", text: str = "") -> str:
    """One ACK message (segments joined by CR) answering ``msh`` (None: the message had no usable MSH)."""
    enc = msh.enc if msh is not None else DEFAULT_ENCODING
    f, c = enc.field, enc.component
    version = (msh.version if msh is not None else "") or "2.5.1"
    trigger = msh.trigger if msh is not None else ""
    their_app = msh.fields[3] if msh is not None and len(msh.fields) > 3 else ""
    their_fac = msh.fields[4] if msh is not None and len(msh.fields) > 4 else ""
    processing = (msh.get(11) if msh is not None else "") or "P"
    msh9 = f"ACK{c}{trigger}{c}ACK" if trigger else "ACK"
    fields = ["MSH", enc.msh2, _esc(sending_application, enc), _esc(sending_facility, enc), their_app, their_fac,
              _ts(), "", msh9, _control_id(), processing, version]
    segments = [f.join(fields)]
    control_id = msh.control_id if msh is not None else ""
    msa = ["MSA", code, control_id]
    if text:
        msa.append(_esc(text, enc))
    segments.append(f.join(msa))
    segments.extend(err_segment(e, enc, version) for e in errors)
    return "\r".join(segments) + "\r"


def wrap_batch(acks: list[str], *, enc: Encoding = DEFAULT_ENCODING, file_header: bool = False,
               received: dict[str, list[str]] | None = None) -> str:
    """A batch acknowledgement: [FHS] BHS, one ACK per message, BTS [FTS] (HL7 v2.5.1 §2.10.3).

    ``received``: the sender's FHS/BHS fields (``line.split(field separator)``). Their sender becomes our
    receiver (-5/-6) and their batch control id (-11) our reference batch control id (-12), so a sender
    can tell which batch this acknowledges."""
    f = enc.field

    def header(tag: str) -> str:
        theirs = (received or {}).get(tag, [])

        def field(n: int) -> str:  # field n of theirs (n >= 3: index n - 1)
            return theirs[n - 1] if len(theirs) > n - 1 else ""

        fields = ["MSGATE", "MSGATE", field(3), field(4), _ts(), "", "", "", "", field(11)]
        return f"{tag}{f}{enc.msh2}{f}" + f.join(fields).rstrip(f) + "\r"

    out = []
    if file_header:
        out.append(header("FHS"))
    out.append(header("BHS"))
    out.extend(acks)
    out.append(f"BTS{f}{len(acks)}\r")
    if file_header:
        out.append(f"FTS{f}1\r")
    return "".join(out)
