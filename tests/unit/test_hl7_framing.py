"""MLLP deframer, MSH reader, ACK builder (validated by hl7apy), tolerant parser and escapes."""

from __future__ import annotations

import pytest
from hl7apy.parser import parse_message

from msgate.hl7 import mllp
from msgate.hl7.ack import AckError, build_ack
from msgate.hl7.msh import HeaderError, check_msh, read_msh
from msgate.hl7.parse import parse, unescape

MSG = b"MSH|^~\\&|LAB|HOSP|MSGATE|MSGATE|20250101||ORU^R01^ORU_R01|C1|P|2.5.1\rPID|1||M1^^^HOSP^MR\r"


def test_deframer_garbage_split_oversize_unterminated() -> None:
    d = mllp.Deframer(100)
    events = d.feed(b"xx" + mllp.SB + MSG[:10])
    assert [e.kind for e in events] == ["garbage"]
    events = d.feed(MSG[10:] + mllp.END)
    assert [e.kind for e in events] == ["frame"] and events[0].payload == MSG
    d = mllp.Deframer(1024)
    events = d.feed(mllp.SB + MSG + mllp.SB + MSG + mllp.END)
    assert [e.kind for e in events] == ["unterminated", "frame"]
    d = mllp.Deframer(1024)
    events = d.feed(mllp.SB + MSG + b"x" * 2000)
    assert events == []
    events = d.feed(b"y" * 10 + mllp.END + mllp.frame(MSG))
    assert [e.kind for e in events] == ["oversize", "frame"] and events[0].payload.startswith(b"MSH")


def test_deframer_oversize_end_block_split_and_lost() -> None:
    """An oversize frame whose end block arrives in two reads ends at that end block, not at the next
    frame's; one that lost its end block ends where the next frame starts."""
    d = mllp.Deframer(1024)
    assert d.feed(mllp.SB + MSG + b"x" * 2000 + mllp.EB) == []
    events = d.feed(mllp.CR)
    assert [e.kind for e in events] == ["oversize"] and events[0].size == len(MSG) + 2000
    assert [e.kind for e in d.feed(mllp.frame(MSG))] == ["frame"]
    d = mllp.Deframer(len(MSG))  # exactly at the limit, its end block split: not oversize
    assert d.feed(mllp.SB + MSG + mllp.EB) == []
    assert [e.kind for e in d.feed(mllp.CR)] == ["frame"]
    d = mllp.Deframer(1024)
    assert d.feed(mllp.SB + MSG + b"x" * 2000) == []
    events = d.feed(b"y" * 10 + mllp.frame(MSG))
    assert [e.kind for e in events] == ["oversize", "frame"] and events[1].payload == MSG


def test_msh_non_default_and_five_char_encoding() -> None:
    a24 = read_msh(b"MSH^~/\\&^APP^FAC^^^2001^^ADT~A24^X1^P^2.4\r")
    assert (a24.message_type, a24.trigger, a24.control_id, a24.version) == ("ADT", "A24", "X1", "2.4")
    five = read_msh(b"MSH|^~\\&#|APP|FAC|||2001||OML^O21^OML_O21|X2|P|2.5.1|||AL|NE\r")
    assert five.enc.truncation == "#" and five.enhanced and five.accept_ack == "AL"


@pytest.mark.parametrize("raw,code", [(b"PID|1\r", 100), (b"MSH|^~\\&|A|B|||1||ADT^A01||P|2.5\r", 101),
                                      (b"MSH|^~\\&|A|B|||1||ADT^A01|X|P|9.9\r", 203)])
def test_msh_errors_carry_table_0357_codes(raw: bytes, code: int) -> None:
    with pytest.raises(HeaderError) as info:
        check_msh(read_msh(raw))
    assert info.value.code == code


def test_charset_fallback_and_mismatch() -> None:
    latin = read_msh(b"MSH|^~\\&|A|B|||1||ADT^A01|X|P|2.5|||||\xe9\r")
    assert latin.charset == "latin-1"
    mismatch = read_msh("MSH|^~\\&|A|B|||1||ADT^A01|X|P|2.5||||||8859/1\rOBR|1||–\r".encode())
    assert mismatch.charset == "utf-8" and mismatch.findings[0]["code"] == "charset_mismatch_utf8"


@pytest.mark.parametrize("version", ["2.3", "2.5.1", "2.7"])
def test_ack_and_nak_are_valid_hl7(version: str) -> None:
    msh = read_msh(MSG.replace(b"2.5.1", version.encode()))
    for code, errors in (("AA", ()), ("AR", (AckError(101, "MSH^1^10"),))):
        text = build_ack(code, msh, errors=errors)
        parsed = parse_message(text, find_groups=False)
        assert parsed.msa.msa_1.value == code and parsed.msa.msa_2.value == "C1"
        if errors:
            assert "101" in parsed.err.to_er7()


def test_parse_escapes_repetitions_zsegments() -> None:
    raw = (b"MSH|^~\\&|A|B|||1||ORU^R01|X|P|2.3\rPID|1||M1^^^H^MR~S2^^^SSA^SS\r"
           b"OBX|1|ST|c^d^L||a\\F\\b\\S\\c\\T\\d\\R\\e\\E\\f\\.br\\g\\X41\\||\rZDR|1|custom\r")
    msg = parse(raw)
    assert [s.name for s in msg] == ["MSH", "PID", "OBX", "ZDR"]
    assert msg.first("PID").get(3, 4, rep=1) == "SSA"  # type: ignore[union-attr]
    assert msg.first("OBX").get(5) == "a|b^c&d~e\\f\ngA"  # type: ignore[union-attr]
    assert unescape("x\\H\\bold\\N\\y", msg.enc) == "xboldy"
