"""The coded parts of an engine's ACK (MSA-1, ERR-3, ERR-4, ERR-5, ERR-2; ERR-1 of v2.3; MSA-6) are sanitised
for plaintext; its free text (MSA-3, ERR-8, the text components) stays out of exception messages and reprs."""

from __future__ import annotations

import pytest

from msgate.hl7.client import CODE_LIMIT, MAX_ERRORS, PeerNak, PeerRejected, code_part, read_ack
from msgate.results.outbox import Attempt

HEADER = b"MSH|^~\\&|ENGINE|HOSP|MSGATE|HOSP|20251201||ACK^R01|A1|P|2.5.1\r"


@pytest.mark.parametrize("raw,kept", [
    ("204", "204"),
    ("NOT FOUND", "NOTFOUND"),  # no spaces: a name written as words cannot pass whole
    ("Patient DOE, JOHN!", "PatientDOEJOHN"),
    ("PID^1^3&x", "PID^1^3&x"),
    ("a.b_c-d", "a.b_c-d"),
    ("<script>|~\\'\"%;\n\t", "script"),
    ("é204ü", "204"),
    ("X" * 100, "X" * CODE_LIMIT),
])
def test_code_part_keeps_only_code_characters_and_caps_the_length(raw: str, kept: str) -> None:
    assert code_part(raw) == kept
    assert code_part(raw, 3) == kept[:3]


def test_a_rejection_names_its_codes_and_keeps_the_text_out_of_the_message() -> None:
    ack = read_ack(HEADER + b"MSA|AR|C1|Patient DOE^JOHN not found\r"
                   b"ERR||PID^1^3|204 x^Unknown key DOE^HL70357|error|NOT FOUND^No patient DOE^L||diag DOE|"
                   b"Patient DOE\\S\\JOHN\\.br\\not in MPI\r")
    assert (ack.code, ack.control_id, ack.error_code) == ("AR", "C1", "204x")
    (error,) = ack.errors
    assert (error.hl7_code, error.severity, error.app_code, error.location) == ("204x", "E", "NOTFOUND", "PID^1^3")
    assert ack.summary() == "AR; ERR-3 204x, ERR-4 E, ERR-5 NOTFOUND, ERR-2 PID^1^3"
    assert ack.peer_text().splitlines() == ["MSA-3: Patient DOE^JOHN not found", "ERR-3.2: Unknown key DOE",
                                            "ERR-5.2: No patient DOE", "ERR-7: diag DOE",
                                            "ERR-8: Patient DOE^JOHN not in MPI"]
    rejected = PeerRejected(ack)
    assert str(rejected) == "peer rejected the message (AR; ERR-3 204x, ERR-4 E, ERR-5 NOTFOUND, ERR-2 PID^1^3)"
    assert rejected.code == "rejected" and rejected.ack is ack
    for shown in (str(rejected), repr(ack), repr(rejected), repr(Attempt("dead", "rejected", "d", ack.peer_text()))):
        assert "DOE" not in shown and "MPI" not in shown


def test_a_v23_err1_gives_code_and_location_per_repetition_and_msa6_its_condition() -> None:
    ack = read_ack(b"MSH|^~\\&|E|H|M|H|2025||ACK|A1|P|2.3\rMSA|AE|C1|busy|||207 ^Internal error SMITH\r"
                   b"ERR|PID^1^3^204&Unknown SMITH&HL70357~OBR^1^2^101&Required field missing\r")
    assert [(e.hl7_code, e.location) for e in ack.errors] == [("204", "PID^1^3"), ("101", "OBR^1^2")]
    assert (ack.condition, ack.error_code) == ("207", "204")
    assert str(PeerNak(ack)) == ("peer did not accept the message (AE; MSA-6 207; ERR-3 204, ERR-2 PID^1^3; "
                                 "ERR-3 101, ERR-2 OBR^1^2)")
    assert ack.peer_text().splitlines() == ["MSA-3: busy", "MSA-6.2: Internal error SMITH",
                                            "ERR-1.4.2: Unknown SMITH", "ERR-1.4.2: Required field missing"]


def test_an_ack_without_err_has_no_codes_and_errors_are_capped() -> None:
    plain = read_ack(HEADER + b"MSA|aa|C1|OK\r")
    assert (plain.code, plain.errors, plain.summary(), plain.success) == ("AA", (), "AA", True)
    many = read_ack(HEADER + b"MSA|AE|C1\r" + b"".join(b"ERR|||%d|E\r" % n for n in range(MAX_ERRORS + 3)))
    assert [e.hl7_code for e in many.errors] == [str(n) for n in range(MAX_ERRORS)]
    odd = read_ack(HEADER + b"MSA|A A; drop|C1\r")
    assert odd.code == "AADROP" and not odd.success
