"""The commit path's header reader: MSH only, no full parse (HL7 v2.5.1 §2.14.9).

Encoding characters come from MSH-1/MSH-2 (any separators, including the v2.7 truncation character
``#`` as a fifth one). The character set comes from MSH-18 with a fallback: a declared single-byte set
that hides valid UTF-8 is read as UTF-8, and undecodable bytes fall back to ISO 8859-1 (never fails),
with a finding (a declared multi-byte set such as UTF-8 included: no character is replaced silently).
C1 bytes (0x80-0x9F) in a message read as Latin-1 are read as Windows-1252, with a finding.
Errors carry a table 0357 code and an HL7 location, and never quote field values.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace

from msgate.storage.ingest import Hl7Header

SUPPORTED_VERSIONS = re.compile(r"^2\.(1|2|3|3\.1|4|5|5\.1|6|7|7\.1|8|8\.1|8\.2)$")

CHARSETS: dict[str, str] = {
    "ASCII": "ascii", "8859/1": "latin-1", "8859/2": "iso8859-2", "8859/3": "iso8859-3", "8859/4": "iso8859-4",
    "8859/5": "iso8859-5", "8859/6": "iso8859-6", "8859/7": "iso8859-7", "8859/8": "iso8859-8",
    "8859/9": "iso8859-9", "8859/15": "iso8859-15", "UNICODE": "utf-8", "UNICODE UTF-8": "utf-8",
    "UTF-8": "utf-8", "UNICODE UTF-16": "utf-16", "UNICODE UTF-32": "utf-32", "ISO IR87": "iso2022_jp",
    "ISO IR159": "iso2022_jp_2", "GB 18030-2000": "gb18030", "KS X 1001": "euc_kr", "CNS 11643-1992": "big5",
    "BIG-5": "big5", "WINDOWS-1252": "cp1252",
}


@dataclass(frozen=True)
class Encoding:
    """The message's delimiters (MSH-1 and MSH-2)."""

    field: str = "|"
    component: str = "^"
    repetition: str = "~"
    escape: str = "\\"
    subcomponent: str = "&"
    truncation: str = ""

    @property
    def msh2(self) -> str:
        return self.component + self.repetition + self.escape + self.subcomponent + self.truncation


DEFAULT_ENCODING = Encoding()


class HeaderError(Exception):
    """The MSH cannot be used. ``code`` is table 0357; ``location`` like ``MSH^1^10``; safe to log."""

    def __init__(self, reason: str, *, code: int, location: str = "", header: Msh | None = None) -> None:
        super().__init__(reason)
        self.reason, self.code, self.location, self.header = reason, code, location, header


@dataclass(frozen=True)
class Msh:
    """MSH fields as text; ``fields[n]`` is MSH-n (``fields[1]`` is the field separator)."""

    enc: Encoding
    fields: tuple[str, ...]
    charset: str = "utf-8"
    findings: tuple[dict[str, str], ...] = field(default=())
    event: str = ""  # EVN-1, read only when MSH-9.2 is empty (HL7 v2.1, and senders that leave it out)

    def get(self, n: int, component: int = 1) -> str:
        if n >= len(self.fields):
            return ""
        value = self.fields[n]
        if n <= 2:
            return value
        rep = value.split(self.enc.repetition, 1)[0]
        parts = rep.split(self.enc.component)
        return parts[component - 1] if component <= len(parts) else ""

    @property
    def control_id(self) -> str:
        return self.get(10).strip()

    @property
    def version(self) -> str:
        return self.get(12).strip()

    @property
    def message_type(self) -> str:
        return self.get(9, 1).strip().upper()

    @property
    def trigger(self) -> str:
        """MSH-9.2, else EVN-1: v2.1 has no MSH-9.2 and carries the event in EVN-1 (ADT)."""
        return self.get(9, 2).strip().upper() or self.event

    @property
    def structure(self) -> str:
        return self.get(9, 3).strip().upper()

    @property
    def accept_ack(self) -> str:
        return self.get(15).strip().upper()

    @property
    def app_ack(self) -> str:
        return self.get(16).strip().upper()

    @property
    def enhanced(self) -> bool:
        """Enhanced acknowledgement mode: MSH-15 or MSH-16 valued (HL7 v2.5.1 §2.9.3)."""
        return bool(self.accept_ack or self.app_ack)

    @property
    def stored_ack(self) -> str | None:
        """The answer sent once this message is stored: AA (original mode), CA (enhanced mode), or none
        when MSH-15 asks for no accept ACK on success (NE, ER). Recorded on the row as what was sent."""
        if not self.enhanced:
            return "AA"
        return None if self.accept_ack in ("NE", "ER") else "CA"

    def header(self) -> Hl7Header:
        return Hl7Header(control_id=self.control_id, sending_application=self.get(3).strip(),
                         sending_facility=self.get(4).strip(), message_type=self.message_type,
                         trigger=self.trigger, structure=self.structure, version=self.version)


def _msh_line(raw: bytes) -> bytes:
    start = raw.find(b"MSH")
    if start < 0:
        raise HeaderError("no MSH segment", code=100, location="MSH")
    if raw[:start].strip(b" \r\n\t\x00"):
        for prefix in (b"FHS", b"BHS"):
            if raw.lstrip().startswith(prefix):
                break
        else:
            raise HeaderError("data before the MSH segment", code=100, location="MSH")
    end = len(raw)
    for sep in (b"\r", b"\n"):
        pos = raw.find(sep, start)
        if 0 <= pos < end:
            end = pos
    return raw[start:end]


def encoding_of(line: str) -> Encoding:
    if len(line) < 8 or line[:3] not in ("MSH", "FHS", "BHS"):
        raise HeaderError("MSH segment too short", code=100, location="MSH^1")
    sep = line[3]
    if sep.isalnum() or sep in " \r\n":
        raise HeaderError("invalid field separator", code=102, location="MSH^1^1")
    chars = line[4:].split(sep, 1)[0]
    if len(chars) < 4 or len(chars) > 5 or len(set(chars + sep)) != len(chars) + 1:
        raise HeaderError("invalid encoding characters", code=102, location="MSH^1^2")
    return Encoding(sep, chars[0], chars[1], chars[2], chars[3], chars[4] if len(chars) == 5 else "")


def charset_of(declared: str, raw: bytes) -> tuple[str, list[dict[str, str]]]:
    """The Python codec for a message and any findings about its declared character set."""
    findings: list[dict[str, str]] = []
    name = declared.strip().upper()
    codec = CHARSETS.get(name, "")
    if name and not codec:
        findings.append({"code": "charset_unknown", "location": "MSH^1^18", "severity": "W"})
    if not codec or codec in ("ascii", "latin-1", "cp1252"):
        try:
            raw.decode("utf-8")
            if codec and not raw.isascii():
                findings.append({"code": "charset_mismatch_utf8", "location": "MSH^1^18", "severity": "W"})
            return "utf-8", findings
        except UnicodeDecodeError:
            if not codec:
                findings.append({"code": "charset_fallback_latin1", "location": "MSH^1^18", "severity": "W"})
            codec = codec if codec not in ("", "ascii") else "latin-1"
            if codec == "latin-1" and _c1_as_cp1252(raw):
                findings.append({"code": "charset_c1_as_cp1252", "location": "MSH^1^18", "severity": "W"})
                return "cp1252", findings
            return codec, findings
    try:  # a multi-byte set: bytes it cannot decode would become U+FFFD in patient data
        raw.decode(codec)
    except UnicodeDecodeError:
        findings.append({"code": "charset_invalid_bytes", "location": "MSH^1^18", "severity": "W"})
        return "latin-1", findings
    except LookupError:
        return "latin-1", findings
    return codec, findings


_C1 = re.compile(rb"[\x80-\x9f]")


def _c1_as_cp1252(raw: bytes) -> bool:
    """Bytes 0x80-0x9F (C1 controls, never text in ISO 8859-1) in a message read as Latin-1: a Windows
    sender's curly apostrophe (O’BRIEN, 0x92), dash or euro sign under a declared (or assumed) 8859/1.
    Read as Latin-1 they became invisible control characters in the stored name; Windows-1252, which
    every Windows HL7 sender writes, reads them as meant. Not where a byte is undefined in Windows-1252."""
    if not _C1.search(raw):
        return False
    try:
        raw.decode("cp1252")
    except UnicodeDecodeError:
        return False
    return True


def read_msh(raw: bytes) -> Msh:
    """Read MSH from raw bytes: encoding, fields and character set. Raises :class:`HeaderError`."""
    line = _msh_line(raw).decode("latin-1")
    enc = encoding_of(line)
    parts = line.split(enc.field)
    fields = ("MSH", enc.field, *parts[1:])
    probe = Msh(enc=enc, fields=tuple(fields))
    codec, findings = charset_of(probe.get(18), raw)
    if codec != "latin-1":
        try:
            fields = ("MSH", enc.field, *line.encode("latin-1").decode(codec).split(enc.field)[1:])
        except (UnicodeDecodeError, LookupError):
            codec = "latin-1"
    msh = Msh(enc=enc, fields=tuple(fields), charset=codec, findings=tuple(findings))
    if not msh.trigger:
        msh = replace(msh, event=evn_event(raw, enc))
    return msh


def evn_event(raw: bytes, enc: Encoding) -> str:
    """EVN-1 (event type code) of the message's EVN segment, upper case; '' without one."""
    sep = enc.field.encode("latin-1")
    for marker in (b"\rEVN" + sep, b"\nEVN" + sep):
        start = raw.find(marker)
        if start >= 0:
            line = raw[start + 1:].split(b"\r", 1)[0].split(b"\n", 1)[0].decode("latin-1")
            value = line.split(enc.field)[1] if enc.field in line else ""
            event = value.split(enc.repetition, 1)[0].split(enc.component, 1)[0].strip().upper()
            return "" if event == '""' else event
    return ""


def check_msh(msh: Msh) -> None:
    """The checks that decide AR before storing: control id, type and version."""
    if not msh.control_id:
        raise HeaderError("MSH-10 message control id is empty", code=101, location="MSH^1^10", header=msh)
    if not msh.message_type or not msh.message_type.isalnum():
        raise HeaderError("MSH-9 message type is missing or malformed", code=101, location="MSH^1^9", header=msh)
    version = msh.version
    if not version:
        raise HeaderError("MSH-12 version id is empty", code=101, location="MSH^1^12", header=msh)
    if not SUPPORTED_VERSIONS.match(version):
        raise HeaderError("MSH-12 version not supported", code=203, location="MSH^1^12", header=msh)
