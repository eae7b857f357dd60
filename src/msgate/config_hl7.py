"""The HL7 settings: the MLLP feed msgate listens on (``MSGATE_HL7__*``) and the interface engine that
receives its ORU^R01 (``MSGATE_HL7_OUT__*``), with the checks that keep their values valid inside HL7
segments. :class:`msgate.config.Settings` holds them; they are imported from there."""

from __future__ import annotations

import ipaddress

from pydantic import Field, field_validator

from msgate.config_tls import ClientTlsSettings, Section, TlsSettings


def check_networks(values: list[str]) -> list[str]:
    for value in values:
        try:
            ipaddress.ip_network(value, strict=False)
        except ValueError as exc:
            raise ValueError(f"not an IP network: {value!r}") from exc
    return values


HD1 = "MSH-3..6 namespace id: at most 20 characters (HL7 HD.1)"


class Hl7Settings(Section):
    """The HL7 v2 MLLP feed and the identity msgate uses in messages it sends."""

    host: str = "127.0.0.1"
    port: int = Field(2575, ge=0, le=65535)
    max_message_bytes: int = Field(4 * 1024 * 1024, ge=1024)
    idle_timeout: float = Field(600.0, gt=0)
    allowed_networks: list[str] = Field(default_factory=list)
    sending_application: str = Field("MSGATE", min_length=1, max_length=20, description=HD1)
    sending_facility: str = Field("MSGATE", min_length=1, max_length=20, description=HD1)
    processing_ids: list[str] = Field(default_factory=lambda: ["P"], min_length=1,
                                      description="MSH-11 values accepted (P production, T training, D "
                                                  "debugging); others are refused with error 202")
    tls: TlsSettings = TlsSettings()

    _nets = field_validator("allowed_networks")(check_networks)

    @field_validator("sending_application", "sending_facility")
    @classmethod
    def _printable(cls, value: str) -> str:
        if not value.isprintable():  # placed in MSH-3/4 of ACKs and ORUs as they are: a line break ended MSH
            raise ValueError("may not contain control characters (a line break ends the MSH segment)")
        return value

    @field_validator("processing_ids")
    @classmethod
    def _processing_ids(cls, value: list[str]) -> list[str]:
        out = [v.strip().upper() for v in value]
        if any(v not in ("P", "T", "D") for v in out):
            raise ValueError("processing ids are P, T or D (HL7 table 0103)")
        return out


HL7_DELIMITERS = "|^~\\&"  # the ORU's encoding characters: escaped in text, refused in codes


class Hl7Destination(Section):
    """The interface engine that receives ORU^R01 over MLLP."""

    host: str = "127.0.0.1"
    port: int = Field(2576, ge=1, le=65535)
    receiving_application: str = Field("EHR", min_length=1, max_length=20, description=HD1)
    receiving_facility: str = Field("HOSPITAL", min_length=1, max_length=20, description=HD1)
    processing_id: str = Field("P", description="MSH-11 of the ORU: P production, T training, D debugging "
                                                "(table 0103), optionally ^ processing mode (table 0207)")
    service_code: str = Field("MSAI", min_length=1, max_length=20, description="OBR-4.1 (CE.1)")
    service_text: str = Field("MS MRI AI analysis", description="OBR-4.2 (CE.2)")
    service_coding_system: str = Field("L", min_length=1, max_length=20,
                                       description="OBR-4.3 (CE.3; table 0396: L local, 99zzz, ...)")
    tls: ClientTlsSettings = Field(default_factory=ClientTlsSettings,
                                   description="MLLP over TLS to the engine; off: plaintext")

    @field_validator("processing_id")
    @classmethod
    def _processing_id(cls, value: str) -> str:
        parts = value.strip().upper().split("^")
        mode = parts[1] if len(parts) == 2 else "T"  # not sent: current processing
        if parts[0] not in ("P", "T", "D") or len(parts) > 2 or mode not in ("A", "I", "R", "T"):
            raise ValueError("a processing id is P, T or D (HL7 table 0103), optionally ^A, ^I, ^R or ^T "
                             "(processing mode, table 0207)")
        return "^".join(parts)

    @field_validator("service_code", "service_coding_system")
    @classmethod
    def _no_delimiters(cls, value: str) -> str:
        if any(char in value for char in HL7_DELIMITERS) or not value.isprintable():
            raise ValueError("may not contain HL7 delimiters (| ^ ~ \\ &) or control characters")
        return value

    @field_validator("service_text")
    @classmethod
    def _text_fits(cls, value: str) -> str:
        if not value.isprintable():  # a CR or LF ended OBR, and the rest of the text became a bogus segment
            raise ValueError("may not contain control characters (a line break ends the ORU's segment)")
        if len(value) + 2 * sum(value.count(char) for char in HL7_DELIMITERS) > 199:  # each escaped as \X\
            raise ValueError("longer than OBR-4.2 allows (199 characters, HL7 delimiters counted escaped)")
        return value

    @field_validator("receiving_application", "receiving_facility")
    @classmethod
    def _printable(cls, value: str) -> str:
        if not value.isprintable():  # placed in MSH-5/6 as they are: a line break ended MSH
            raise ValueError("may not contain control characters (a line break ends the ORU's MSH segment)")
        return value
