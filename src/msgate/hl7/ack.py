"""ACK messages for the commit path, built by hand in the sender's delimiters (HL7 v2.5.1 §2.9, §2.15).

Built without a parser because the commit path must stay fast; tests validate the output with hl7apy.
MSA-1 is one of table 0008 (AA/AE/AR, CA/CE/CR); MSA-2 echoes MSH-10. An error adds an ERR segment
with a table 0357 code, its location and severity: ERR-2/3/4 from v2.5 on, ERR-1 (ELD) before. MSH-9 has
the components the answered version defines; an ACK that is not ASCII names its character set in MSH-18.
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass
from datetime import UTC, datetime

from msgate.hl7.msh import CHARSETS, DEFAULT_ENCODING, Encoding, Msh

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


def _version(version: str) -> tuple[int, ...]:
    """``2.3.1`` as (2, 3, 1); an unreadable version counts as the newest."""
    try:
        return tuple(int(part) for part in version.split("."))
    except ValueError:
        return (99,)


def _modern(version: str) -> bool:
    return _version(version) >= (2, 5)


def _msh9(trigger: str, version: str, c: str) -> str:
    """MSH-9 of the ACK: a single ID in v2.1, ``ACK^event`` from v2.2, MSH-9.3 (structure) from v2.3.1."""
    if not trigger or _version(version) < (2, 2):
        return "ACK"
    return f"ACK{c}{trigger}{c}ACK" if _version(version) >= (2, 3, 1) else f"ACK{c}{trigger}"


def hl7_charset(codec: str) -> str:
    """The MSH-18 value (table 0211) for a Python codec msgate reads or writes."""
    if codec == "utf-8":
        return "UNICODE UTF-8"
    return next((name for name, value in CHARSETS.items() if value == codec), "UNICODE UTF-8")


def ack_codec(text: str, msh: Msh | None) -> str:
    """The codec an ACK is sent in: the message's own (what it echoes was read with it), else UTF-8."""
    codec = msh.charset if msh is not None else "utf-8"
    try:
        text.encode(codec)
    except (UnicodeEncodeError, LookupError):
        return "utf-8"
    return codec


def encode_ack(text: str, msh: Msh | None) -> bytes:
    """An ACK (or batch of ACKs) as bytes, in the character set its MSH-18 names (see :func:`build_ack`)."""
    return text.encode(ack_codec(text, msh))


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
    fields = ["MSH", enc.msh2, _esc(sending_application, enc), _esc(sending_facility, enc), their_app, their_fac,
              _ts(), "", _msh9(trigger, version, c), _control_id(), processing, version]
    control_id = msh.control_id if msh is not None else ""
    msa = ["MSA", code, control_id]
    if text:
        msa.append(_esc(text, enc))
    segments = [f.join(msa), *(err_segment(e, enc, version) for e in errors)]
    body = f.join(fields) + "".join(segments)
    if not body.isascii() and _version(version) >= (2, 3):  # name the set it is sent in (MSH-18 is from v2.3)
        codec = ack_codec(body, msh)
        declared = msh.get(18).strip() if msh is not None else ""
        named = declared if declared and CHARSETS.get(declared.upper()) == codec else hl7_charset(codec)
        fields += ["", "", "", "", "", _esc(named, enc)]
    return "\r".join([f.join(fields), *segments]) + "\r"


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
