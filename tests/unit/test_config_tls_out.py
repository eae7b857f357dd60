"""Outbound TLS settings (``[[pacs]].tls``, ``[hl7_out].tls``): validation names the setting, the nested
environment variables reach the section, and the context they make verifies the peer (TLS 1.2 or later)."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest
from test_config import _self_signed

from msgate.config import ClientTlsSettings, TlsSettings, load_settings
from msgate.errors import ConfigError, Transient


@pytest.fixture()
def files(tmp_path: Path) -> dict[str, str]:
    ca, _ = _self_signed(tmp_path, "ca")
    cert, key = _self_signed(tmp_path, "client")
    _, other_key = _self_signed(tmp_path, "other")
    return {"ca_file": str(ca), "cert_file": str(cert), "key_file": str(key), "other_key": str(other_key)}


def _refused(**overrides: object) -> str:
    with pytest.raises(ConfigError) as err:
        load_settings(**overrides)
    return str(err.value)


def test_tls_settings_still_import_from_config() -> None:
    """TlsSettings moved to msgate.config_tls; every existing import of msgate.config keeps working."""
    from msgate import config, config_tls

    assert TlsSettings is config_tls.TlsSettings and config.TlsSettings is config_tls.TlsSettings


def test_outbound_tls_is_off_by_default() -> None:
    settings = load_settings(pacs=[{"host": "pacs"}], hl7_out={"host": "engine"})
    assert not settings.pacs[0].tls.enabled and not settings.hl7_out.tls.enabled  # type: ignore[union-attr]
    assert settings.pacs[0].tls.check_hostname


def test_env_reaches_the_nested_hl7_out_tls_section(monkeypatch: pytest.MonkeyPatch,
                                                    files: dict[str, str]) -> None:
    monkeypatch.setenv("MSGATE_HL7_OUT", '{"host": "engine.example", "port": 2577}')
    monkeypatch.setenv("MSGATE_HL7_OUT__TLS__ENABLED", "true")
    monkeypatch.setenv("MSGATE_HL7_OUT__TLS__CA_FILE", files["ca_file"])
    monkeypatch.setenv("MSGATE_HL7_OUT__TLS__CERT_FILE", files["cert_file"])
    monkeypatch.setenv("MSGATE_HL7_OUT__TLS__KEY_FILE", files["key_file"])
    monkeypatch.setenv("MSGATE_HL7_OUT__TLS__SERVER_NAME", "mllp.engine.example")
    monkeypatch.setenv("MSGATE_HL7_OUT__TLS__CHECK_HOSTNAME", "false")
    out = load_settings().hl7_out
    assert out is not None and (out.host, out.port) == ("engine.example", 2577)
    assert out.tls.enabled and out.tls.ca_file == Path(files["ca_file"])
    assert out.tls.cert_file == Path(files["cert_file"]) and out.tls.key_file == Path(files["key_file"])
    assert out.tls.server_hostname(out.host) == "mllp.engine.example" and not out.tls.check_hostname


def test_env_json_and_toml_reach_the_pacs_tls_section(monkeypatch: pytest.MonkeyPatch, files: dict[str, str],
                                                      tmp_path: Path) -> None:
    monkeypatch.setenv("MSGATE_PACS", '[{"host": "10.1.2.3", "tls": {"enabled": true, "ca_file": "%s", '
                       '"server_name": "pacs.example"}}]' % files["ca_file"])
    pacs = load_settings().pacs[0]
    assert pacs.tls.enabled and pacs.tls.server_hostname(pacs.host) == "pacs.example"
    monkeypatch.delenv("MSGATE_PACS")
    toml = tmp_path / "msgate.toml"
    toml.write_text(f'[[pacs]]\nhost = "pacs"\n[pacs.tls]\nenabled = true\nca_file = "{files["ca_file"]}"\n\n'
                    f'[hl7_out]\nhost = "engine"\n[hl7_out.tls]\nenabled = true\nca_file = "{files["ca_file"]}"\n')
    settings = load_settings(toml)
    assert settings.pacs[0].tls.enabled and settings.hl7_out is not None and settings.hl7_out.tls.enabled
    assert settings.pacs[0].tls.server_hostname("pacs") == "pacs"


@pytest.mark.parametrize("field", ["ca_file", "cert_file", "key_file", "server_name"])
def test_a_setting_while_tls_is_off_is_refused_by_name(monkeypatch: pytest.MonkeyPatch, files: dict[str, str],
                                                       field: str) -> None:
    """A CA file with enabled = false looked like TLS and would have sent results in plaintext."""
    monkeypatch.setenv("MSGATE_HL7_OUT", '{"host": "engine"}')
    monkeypatch.setenv(f"MSGATE_HL7_OUT__TLS__{field.upper()}", files.get(field, "engine.example"))
    message = _refused()
    assert f"invalid setting MSGATE_HL7_OUT__TLS__{field.upper()}:" in message and "plaintext" in message


def test_files_that_do_not_load_are_refused_by_name(files: dict[str, str], tmp_path: Path) -> None:
    def hl7(**tls: object) -> str:
        return _refused(hl7_out={"host": "engine", "tls": {"enabled": True, **tls}})

    def pacs(**tls: object) -> str:
        return _refused(pacs=[{"host": "pacs", "tls": {"enabled": True, **tls}}])

    assert "MSGATE_HL7_OUT__TLS__CA_FILE: " in hl7(ca_file=str(tmp_path / "nope.pem"))
    assert "holds no PEM certificate" in hl7(ca_file=files["key_file"])
    assert "MSGATE_PACS__TLS__CA_FILE: " in pacs(ca_file=files["key_file"])
    assert "MSGATE_PACS__TLS__CERT_FILE: Value error, not a readable file" in pacs(cert_file=str(tmp_path / "nope.crt"),
                                                                       key_file=files["key_file"])
    assert "MSGATE_PACS__TLS__KEY_FILE: " in pacs(cert_file=files["cert_file"])  # both or neither
    assert "without cert_file" in pacs(key_file=files["key_file"])
    mismatch = pacs(cert_file=files["cert_file"], key_file=files["other_key"])
    assert "MSGATE_PACS__TLS__KEY_FILE: " in mismatch and "matches cert_file" in mismatch
    assert "MSGATE_PACS__TLS__SERVER_NAME: " in pacs(server_name="pacs example/x")


def test_the_context_verifies_the_peer_from_tls_1_2(files: dict[str, str]) -> None:
    tls = ClientTlsSettings(enabled=True, ca_file=Path(files["ca_file"]), cert_file=Path(files["cert_file"]),
                            key_file=Path(files["key_file"]))
    context = tls.context()
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname
    assert context.minimum_version == ssl.TLSVersion.TLSv1_2
    assert context.cert_store_stats()["x509"] == 1  # ca_file only, not the system store
    relaxed = ClientTlsSettings(enabled=True, ca_file=Path(files["ca_file"]), check_hostname=False).context()
    assert relaxed.verify_mode == ssl.CERT_REQUIRED and not relaxed.check_hostname
    system = ClientTlsSettings(enabled=True).context()  # no ca_file: the system trust store, names checked
    assert system.check_hostname and system.cert_store_stats()["x509_ca"] >= 0


def test_no_name_check_without_a_private_ca_is_refused() -> None:
    """check_hostname = false with the system trust store accepted any publicly trusted certificate, for any
    name, as the PACS or the engine."""
    message = _refused(hl7_out={"host": "engine", "tls": {"enabled": True, "check_hostname": False}})
    assert "MSGATE_HL7_OUT__TLS__CHECK_HOSTNAME: " in message and "needs ca_file" in message
    message = _refused(pacs=[{"host": "pacs", "tls": {"enabled": True, "check_hostname": False}}])
    assert "MSGATE_PACS__TLS__CHECK_HOSTNAME: " in message


def test_files_gone_since_start_are_a_transient_tls_failure(files: dict[str, str]) -> None:
    tls = ClientTlsSettings(enabled=True, ca_file=Path(files["ca_file"]))
    Path(files["ca_file"]).unlink()
    with pytest.raises(Transient) as err:
        tls.context()
    assert err.value.code == "tls_files" and str(err.value).startswith("TLS: the client TLS files cannot be loaded")


def test_tls_failures_are_named_for_the_operator() -> None:
    """The outbox attempt's detail: OpenSSL's reason or verify message, and what it likely means."""
    from msgate.config_tls import SESSION_CLOSED, tls_failure

    verify = ssl.SSLCertVerificationError(1, "certificate verify failed")
    verify.verify_message = "unable to get local issuer certificate"
    assert tls_failure(verify) == "TLS: certificate verify failed (unable to get local issuer certificate)"
    assert "does it speak TLS" in tls_failure(ConnectionResetError())
    assert tls_failure(TimeoutError(), timeout=2.0) == ("TLS: no handshake answer within 2 s (does the peer "
                                                        "speak TLS on this port?)")
    not_tls = ssl.SSLError(1, "wrong version number")
    not_tls.reason = "WRONG_VERSION_NUMBER"
    assert tls_failure(not_tls) == "TLS: handshake failed (wrong version number): the peer does not speak TLS " \
                                   "on this port"
    alert = ssl.SSLError(1, "alert")
    alert.reason = "TLSV13_ALERT_CERTIFICATE_REQUIRED"
    assert tls_failure(alert, handshake=False) == "TLS: the peer ended the session (tlsv13 alert certificate required)"
    assert tls_failure(ssl.SSLEOFError(), handshake=False) == SESSION_CLOSED
