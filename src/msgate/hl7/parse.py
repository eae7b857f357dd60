"""Tolerant full parse for the mapping path: segments, fields, repetitions, components, escapes.

Chosen by measurement (bench/hl7_feed.py): plain ``str.split`` over the message's own delimiters is
faster than python-hl7 and about two orders of magnitude faster than hl7apy, and it accepts what real
feeds send (non-default and five-character delimiters, Z-segments, CR/LF line ends, segments hl7apy's
structures do not know). hl7apy stays the strict validator and builder for what msgate sends.
Escapes (§2.7): \\F\\ \\S\\ \\T\\ \\R\\ \\E\\ \\Xhh\\ \\.br\\; formatting escapes (\\H\\, \\N\\, ...) are dropped.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass

from msgate.hl7.msh import Encoding, encoding_of, read_msh

_HEX = re.compile(r"^X([0-9A-Fa-f]{2})+$")


class ParseError(Exception):
    """The message has no usable MSH; ``code`` is safe to log."""

    def __init__(self, code: str) -> None:
        super().__init__(code)
        self.code = code


@dataclass
class Segment:
    """One segment; ``fields[n]`` is field n (for MSH, ``fields[1]`` is the field separator)."""

    name: str
    fields: list[str]
    enc: Encoding

    def raw(self, n: int) -> str:
        return self.fields[n] if n < len(self.fields) else ""

    def reps(self, n: int) -> list[str]:
        value = self.raw(n)
        if self.name == "MSH" and n <= 2:
            return [value]
        return value.split(self.enc.repetition) if value else []

    def get(self, n: int, component: int = 1, sub: int = 1, rep: int = 0) -> str:
        """Field n, component, subcomponent of repetition ``rep``, unescaped."""
        reps = self.reps(n)
        if rep >= len(reps):
            return ""
        return component_of(reps[rep], self.enc, component, sub)


def component_of(rep: str, enc: Encoding, component: int = 1, sub: int = 1) -> str:
    parts = rep.split(enc.component)
    if component > len(parts):
        return ""
    subs = parts[component - 1].split(enc.subcomponent)
    if sub > len(subs):
        return ""
    return unescape(subs[sub - 1], enc)


def unescape(value: str, enc: Encoding) -> str:
    esc = enc.escape
    if not esc or esc not in value:
        return value
    out: list[str] = []
    pieces = value.split(esc)
    out.append(pieces[0])
    i = 1
    while i < len(pieces):
        if i + 1 >= len(pieces):  # unpaired escape character: keep it literally
            out.append(esc + pieces[i])
            break
        out.append(_escape_seq(pieces[i], enc))
        out.append(pieces[i + 1])
        i += 2
    return "".join(out)


def _escape_seq(seq: str, enc: Encoding) -> str:
    table = {"F": enc.field, "S": enc.component, "T": enc.subcomponent, "R": enc.repetition, "E": enc.escape,
             "P": enc.truncation or "#", ".br": "\n", "H": "", "N": ""}
    if seq in table:
        return table[seq]
    if _HEX.match(seq):
        try:
            return bytes.fromhex(seq[1:]).decode("utf-8")
        except UnicodeDecodeError:
            return bytes.fromhex(seq[1:]).decode("latin-1")
    if seq.startswith((".sp", ".in", ".ti", ".sk", ".ce", ".fi", ".nf", "C", "M", "Z")):
        return "\n" if seq.startswith(".sp") else ""
    return ""


@dataclass
class Message:
    """A parsed message: its segments in order, with the delimiters they were read with."""

    segments: list[Segment]
    enc: Encoding
    charset: str
    findings: tuple[dict[str, str], ...] = ()

    @property
    def msh(self) -> Segment:
        return self.segments[0]

    def all(self, name: str) -> list[Segment]:
        return [s for s in self.segments if s.name == name]

    def first(self, name: str) -> Segment | None:
        return next((s for s in self.segments if s.name == name), None)

    def __iter__(self) -> Iterator[Segment]:
        return iter(self.segments)


def lf_terminated(data: str | bytes) -> bool:
    """Whether the first segment (MSH, or FHS/BHS) ends with a bare LF rather than CR or CR LF.

    HL7 ends segments with CR (§2.5.1); some senders use LF. A message is split by its own terminator:
    when it is CR, a bare LF is text (report lines in OBX-5 TX/FT), never a segment end."""
    cr, lf = ("\r", "\n") if isinstance(data, str) else (b"\r", b"\n")
    data = data.lstrip()
    end_cr, end_lf = data.find(cr), data.find(lf)  # type: ignore[arg-type]
    return end_lf >= 0 and (end_cr < 0 or end_lf < end_cr)


def split_segments(text: str) -> list[str]:
    """Segment lines, split on the terminator the first segment ends with (see :func:`lf_terminated`)."""
    text = text.replace("\r\n", "\r")
    if lf_terminated(text):
        text = text.replace("\n", "\r")
    return [line.strip("\n") for line in text.split("\r") if line.strip()]


def _lf_findings(segments: list[Segment]) -> list[dict[str, str]]:
    """One finding per segment that keeps a line feed in its text (``OBX^2``: the second OBX)."""
    seen: dict[str, int] = {}
    out = []
    for seg in segments:
        seen[seg.name] = seen.get(seg.name, 0) + 1
        if any("\n" in value for value in seg.fields):
            out.append({"code": "embedded_lf", "location": f"{seg.name}^{seen[seg.name]}", "severity": "I"})
    return out


def parse(raw: bytes) -> Message:
    """Parse one message (no batch envelope). Raises :class:`ParseError` without a usable MSH."""
    try:
        msh = read_msh(raw)
    except Exception as exc:  # HeaderError or a decoding problem; the caller records the code
        raise ParseError(getattr(exc, "reason", "unparseable")) from None
    text = raw.decode(msh.charset, errors="replace")
    lines = split_segments(text)
    start = next((i for i, line in enumerate(lines) if line.startswith("MSH")), None)
    if start is None:
        raise ParseError("no MSH segment")
    enc = encoding_of(lines[start])
    segments = []
    for line in lines[start:]:
        parts = line.split(enc.field)
        name = parts[0].strip()[:3]
        if name == "MSH":
            segments.append(Segment("MSH", ["MSH", enc.field, *parts[1:]], enc))
        elif name:
            segments.append(Segment(name, parts, enc))
    return Message(segments, enc, msh.charset, (*msh.findings, *_lf_findings(segments)))


def split_batch(raw: bytes) -> tuple[list[bytes], bool]:
    """Split an FHS/BHS batch into its messages (raw bytes, one per MSH); also whether it had FHS."""
    data = raw.replace(b"\r\n", b"\r")
    if lf_terminated(data):
        data = data.replace(b"\n", b"\r")
    lines = [line for line in data.split(b"\r") if line.strip()]
    messages: list[list[bytes]] = []
    for line in lines:
        tag = line.lstrip()[:3]
        if tag == b"MSH":
            messages.append([line.lstrip()])
        elif tag in (b"FHS", b"BHS", b"BTS", b"FTS"):
            continue
        elif messages:
            messages[-1].append(line)
    return [b"\r".join(m) + b"\r" for m in messages], data.lstrip()[:3] == b"FHS"


def is_batch(raw: bytes) -> bool:
    head = raw.lstrip()[:3]
    return head in (b"FHS", b"BHS")
