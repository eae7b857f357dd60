"""Settings: env prefix and nesting, TOML file, and one clear error naming the bad setting."""

from __future__ import annotations

from pathlib import Path

import pytest

from msgate.config import load_settings
from msgate.errors import ConfigError


def test_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MSGATE_HOME", raising=False)
    s = load_settings()
    assert s.home == Path("./var") and s.dicom.port == 11112 and s.dicom.ae_title == "MSGATE"
    assert s.hl7.port == 2575 and s.metrics.port == 9464
    assert s.resolved_database_url.startswith("sqlite:///") and s.is_embedded
    assert s.resolved_broker_url.startswith("sqla+sqlite:///")


def test_env_nested_and_home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MSGATE_HOME", str(tmp_path))
    monkeypatch.setenv("MSGATE_DICOM__PORT", "11113")
    monkeypatch.setenv("MSGATE_DICOM__ALLOWED_AETS", '["PACS1","ROUTER"]')
    s = load_settings()
    assert s.home == tmp_path and s.dicom.port == 11113 and s.dicom.allowed_aets == ["PACS1", "ROUTER"]
    assert s.resolved_database_url == f"sqlite:///{tmp_path.resolve() / 'msgate.db'}"


def test_toml_file_and_env_priority(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    cfg = tmp_path / "msgate.toml"
    cfg.write_text('[dicom]\nae_title = "FROMFILE"\nport = 4242\n[hl7]\nport = 2600\n'
                   '[[pacs]]\nname = "main"\nhost = "10.0.0.5"\nport = 104\nae_title = "PACS"\n')
    monkeypatch.setenv("MSGATE_DICOM__PORT", "5000")
    s = load_settings(cfg)
    assert s.dicom.ae_title == "FROMFILE" and s.dicom.port == 5000 and s.hl7.port == 2600
    assert s.pacs[0].host == "10.0.0.5"


@pytest.mark.parametrize("env,value,name", [
    ("MSGATE_DICOM__PORT", "notaport", "MSGATE_DICOM__PORT"),
    ("MSGATE_DICOM__AE_TITLE", "X" * 17, "MSGATE_DICOM__AE_TITLE"),
    ("MSGATE_HL7__ALLOWED_NETWORKS", '["10.0.0.0/33"]', "MSGATE_HL7__ALLOWED_NETWORKS"),
    ("MSGATE_DATABASE_URL", "postgresql+psycopg://msgate:changeme@db/msgate", "MSGATE_DATABASE_URL"),
    ("MSGATE_LOG_LEVEL", "LOUD", "MSGATE_LOG_LEVEL"),
])
def test_invalid_setting_is_named(monkeypatch: pytest.MonkeyPatch, env: str, value: str, name: str) -> None:
    monkeypatch.setenv(env, value)
    with pytest.raises(ConfigError) as err:
        load_settings()
    assert name in str(err.value)


def test_missing_config_file_and_unknown_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_settings(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[dicom]\nportt = 1\n")
    with pytest.raises(ConfigError, match="MSGATE_DICOM__PORTT"):
        load_settings(bad)


def test_job_lease_is_the_hard_limit_plus_the_margin(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MSGATE_WORKERS__LEASE_MARGIN_SECONDS", "2.5")
    wk = load_settings(workers={"soft_time_limit": 3, "hard_time_limit": 4, "visibility_timeout": 6}).workers
    assert wk.lease_seconds == 6.5
    monkeypatch.delenv("MSGATE_WORKERS__LEASE_MARGIN_SECONDS")
    assert load_settings().workers.lease_seconds == 900 + 30  # the defaults


@pytest.mark.parametrize("overrides,name", [
    ({"dicom": {"allowed_aets": ["CT_SCANNER_ROOM_12"]}}, "MSGATE_DICOM__ALLOWED_AETS"),  # 18 characters
    ({"dicom": {"allowed_aets": ["MR1", "    "]}}, "MSGATE_DICOM__ALLOWED_AETS"),
    ({"dicom": {"allowed_aets": ["MR\\1"]}}, "MSGATE_DICOM__ALLOWED_AETS"),
    ({"dicom": {"ae_title": "   "}}, "MSGATE_DICOM__AE_TITLE"),
    ({"dicom": {"ae_title": "MS\x07GATE"}}, "MSGATE_DICOM__AE_TITLE"),
    ({"pacs": [{"name": "main", "ae_title": "ORTHANC\\PACS"}]}, "MSGATE_PACS__AE_TITLE"),
    ({"pacs": [{"name": "main", "ae_title": "A_VERY_LONG_PACS_AET"}]}, "MSGATE_PACS__AE_TITLE"),
    ({"pacs": [{"name": "main", "ae_title": "PACSÄ"}]}, "MSGATE_PACS__AE_TITLE"),
])
def test_invalid_ae_titles_are_refused_and_named(overrides: dict[str, object], name: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_settings(**overrides)
    assert f"invalid setting {name}:" in str(err.value)


def test_valid_ae_titles_pass() -> None:
    s = load_settings(dicom={"ae_title": "MSGATE_MS_01", "allowed_aets": ["CT SCANNER 1", "X" * 16]},
                      pacs=[{"name": "main", "ae_title": "ORTHANC"}])
    assert s.dicom.allowed_aets == ["CT SCANNER 1", "X" * 16] and s.pacs[0].ae_title == "ORTHANC"


def _self_signed(folder: Path, name: str) -> tuple[Path, Path]:
    from datetime import UTC, datetime, timedelta

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.now(UTC)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - timedelta(minutes=1))
            .not_valid_after(now + timedelta(days=1)).sign(key, hashes.SHA256()))
    cert_path, key_path = folder / f"{name}.crt", folder / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


@pytest.fixture()
def tls_files(tmp_path: Path) -> dict[str, str]:
    cert, key = _self_signed(tmp_path, "server")
    ca, _ = _self_signed(tmp_path, "ca")
    return {"cert_file": str(cert), "key_file": str(key), "ca_file": str(ca)}


@pytest.mark.parametrize("section", ["dicom", "hl7"])
def test_tls_files_that_do_not_load_are_refused_by_name(section: str, tls_files: dict[str, str],
                                                        tmp_path: Path) -> None:
    """A readable file that is not PEM (or a key of another certificate) passed the check, and the role
    then crashed at start with only "SSLError" in its log, restarting forever under compose."""
    prefix = f"MSGATE_{section.upper()}__TLS__"
    junk = tmp_path / "junk.pem"
    junk.write_text("junk\n")
    _, other_key = _self_signed(tmp_path, "other")

    def refused(**tls: object) -> str:
        with pytest.raises(ConfigError) as err:
            load_settings(**{section: {"tls": {"enabled": True, **tls_files, **tls}}})
        return str(err.value)

    assert f"{prefix}CERT_FILE:" in refused(cert_file=str(junk))
    assert f"{prefix}KEY_FILE:" in refused(key_file=str(junk))
    assert f"{prefix}KEY_FILE:" in refused(key_file=tls_files["cert_file"])
    assert f"{prefix}KEY_FILE:" in refused(key_file=str(other_key))  # not the certificate's key
    assert f"{prefix}CA_FILE:" in refused(ca_file=str(junk))


@pytest.mark.parametrize("section", ["dicom", "hl7"])
def test_tls_settings_are_checked_at_load(section: str, tls_files: dict[str, str], tmp_path: Path) -> None:
    prefix = f"MSGATE_{section.upper()}__TLS__"

    def refused(**tls: object) -> str:
        with pytest.raises(ConfigError) as err:
            load_settings(**{section: {"tls": tls}})
        return str(err.value)

    assert f"{prefix}CERT_FILE:" in refused(enabled=True)
    assert f"{prefix}KEY_FILE:" in refused(enabled=True, cert_file=tls_files["cert_file"])
    missing = refused(enabled=True, cert_file=str(tmp_path / "nope.pem"), key_file=tls_files["key_file"])
    assert f"{prefix}CERT_FILE:" in missing and "readable file" in missing
    assert f"{prefix}KEY_FILE:" in refused(enabled=True, cert_file=tls_files["cert_file"],
                                           key_file=str(tmp_path))  # a folder
    assert f"{prefix}CA_FILE:" in refused(enabled=True, cert_file=tls_files["cert_file"],
                                          key_file=tls_files["key_file"], ca_file=str(tmp_path / "ca.pem"))
    tls = getattr(load_settings(**{section: {"tls": {"enabled": True, **tls_files}}}), section).tls
    assert tls.enabled and tls.ca_file is not None


@pytest.mark.parametrize("section", ["dicom", "hl7"])
@pytest.mark.parametrize("field", ["cert_file", "key_file", "ca_file"])
def test_tls_files_without_tls_enabled_are_refused(section: str, field: str, tls_files: dict[str, str],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Files set but TLS off used to give a plaintext listener without a word."""
    monkeypatch.setenv(f"MSGATE_{section.upper()}__TLS__{field.upper()}", tls_files[field])
    with pytest.raises(ConfigError) as err:
        load_settings()
    assert f"invalid setting MSGATE_{section.upper()}__TLS__{field.upper()}:" in str(err.value)
    assert "not enabled" in str(err.value) or "enabled = false" in str(err.value)


def test_pacs_names_must_be_distinct(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two unnamed [[pacs]] were both 'pacs': the outbox sent both entries to the second PACS."""
    monkeypatch.setenv("MSGATE_PACS", '[{"host": "10.0.0.5", "ae_title": "PACSA"},'
                                      ' {"host": "10.0.0.6", "ae_title": "PACSB"}]')
    with pytest.raises(ConfigError) as err:
        load_settings()
    assert "invalid setting MSGATE_PACS:" in str(err.value) and "distinct name" in str(err.value)
    monkeypatch.setenv("MSGATE_PACS", '[{"name": "a", "ae_title": "PACSA"},'
                                      ' {"name": "b", "ae_title": "PACSB"}]')
    assert [d.name for d in load_settings().pacs] == ["a", "b"]


def test_pacs_names_in_the_toml_file_must_be_distinct(tmp_path: Path) -> None:
    cfg = tmp_path / "msgate.toml"
    cfg.write_text('[[pacs]]\nhost = "10.0.0.5"\n[[pacs]]\nhost = "10.0.0.6"\n')
    with pytest.raises(ConfigError, match=r"MSGATE_PACS:.*give each \[\[pacs\]\] a distinct name"):
        load_settings(cfg)


@pytest.mark.parametrize("name", ["hl7", "HL7", "x" * 65, ""])
def test_reserved_or_overlong_pacs_name_is_refused(name: str) -> None:
    """A PACS named 'hl7' was routed to the HL7 lane; the outbox keys destinations by 64 characters."""
    with pytest.raises(ConfigError) as err:
        load_settings(pacs=[{"name": name}])
    assert "invalid setting MSGATE_PACS__NAME:" in str(err.value)
    assert load_settings(pacs=[{"name": "x" * 64}]).pacs[0].name == "x" * 64


def test_outbox_policy_is_configurable(monkeypatch: pytest.MonkeyPatch) -> None:
    from msgate.results.outbox import Policy

    assert Policy.from_settings(load_settings()) == Policy()  # the same defaults
    monkeypatch.setenv("MSGATE_RESULTS__MAX_AGE", "3600")
    monkeypatch.setenv("MSGATE_RESULTS__DIMSE_TIMEOUT", "20")
    policy = Policy.from_settings(load_settings(results={"lease": 120, "batch": 10}))
    assert (policy.max_age, policy.dimse_timeout, policy.lease, policy.batch) == (3600, 20, 120, 10)
    assert policy.base_delay == Policy().base_delay
    with pytest.raises(ConfigError, match="MSGATE_RESULTS__MAX_DELAY"):
        load_settings(results={"base_delay": 60, "max_delay": 30})
    with pytest.raises(ConfigError, match="MSGATE_RESULTS__BATCH"):
        load_settings(results={"batch": 0})


# --- names and forms the environment gets wrong -----------------------------------------------------------


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for key in [k for k in __import__("os").environ if k.upper().startswith("MSGATE_")]:
        monkeypatch.delenv(key)
    return monkeypatch


@pytest.mark.parametrize("name", ["MSGATE_DATABSE_URL", "MSGATE_DICOMM__PORT", "msgate_brokerurl"])
def test_an_unknown_variable_is_refused_by_name(clean_env: pytest.MonkeyPatch, name: str) -> None:
    """MSGATE_DATABSE_URL was ignored without a word: the command ran on the embedded SQLite database."""
    clean_env.setenv(name, "postgresql+psycopg://u:pw@db/msgate")
    with pytest.raises(ConfigError) as err:
        load_settings()
    assert name in str(err.value) and "pw" not in str(err.value)


def test_variables_that_are_not_settings_are_accepted(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Read by load_settings itself, interpolated by compose on the host only, or a test hook."""
    for name in ("MSGATE_IMAGE", "MSGATE_GPU_IMAGE", "MSGATE_WORKER_GPU", "MSGATE_TEST_PG_ADMIN"):
        clean_env.setenv(name, "x")
    clean_env.setenv("MSGATE_SECRETS_DIR", str(tmp_path))
    clean_env.setenv("MSGATE_KEYRING_FILE", str(tmp_path / "ring.json"))
    assert load_settings().keyring_path == tmp_path / "ring.json"


def test_a_missing_secrets_dir_is_refused(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    clean_env.setenv("MSGATE_SECRETS_DIR", str(tmp_path / "nope"))
    with pytest.raises(ConfigError, match="MSGATE_SECRETS_DIR"):
        load_settings()


@pytest.mark.parametrize("name,value,says", [
    ("MSGATE_DICOM__ALLOWED_AETS", "PACS1", 'e.g. ["PACS1"]'),
    ("MSGATE_HL7__ALLOWED_NETWORKS", "10.0.0.0/8, 192.168.1.0/24", 'e.g. ["10.0.0.0/8", "192.168.1.0/24"]'),
    ("MSGATE_PACS", "orthanc", "JSON"),
])
def test_a_value_that_is_not_json_names_the_variable(clean_env: pytest.MonkeyPatch, name: str, value: str,
                                                      says: str) -> None:
    clean_env.setenv("MSGATE_DICOM__HOST", "0.0.0.0")  # a plain value is not JSON either, and is fine
    clean_env.setenv(name, value)
    with pytest.raises(ConfigError) as err:
        load_settings()
    assert f"invalid setting {name}:" in str(err.value) and says in str(err.value), str(err.value)


@pytest.mark.parametrize("url,says", [
    ("postgres://msgate:pw@db/msgate", "use postgresql+psycopg://"),
    ("postgresql://msgate:pw@db/msgate", "use postgresql+psycopg://"),
    ("mysql://msgate:pw@db/msgate", "unsupported"),
    ("notaurl", "unsupported"),
    ("sqlite://", "unsupported"),
])
def test_database_url_forms(url: str, says: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_settings(database_url=url)
    assert "invalid setting MSGATE_DATABASE_URL:" in str(err.value) and says in str(err.value)
    assert "pw" not in str(err.value)


def test_supported_database_urls_pass(tmp_path: Path) -> None:
    assert load_settings(database_url="postgresql+psycopg://msgate:s3cret@db/msgate").database_url
    assert load_settings(database_url=f"sqlite:///{tmp_path}/x.db").is_embedded


@pytest.mark.parametrize(("section", "key", "value", "name"), [
    ("workers", "device", "gpu", "MSGATE_WORKERS__DEVICE"),
    ("hl7", "sending_application", "RADIOLOGY_AI_GATEWAY_1", "MSGATE_HL7__SENDING_APPLICATION"),
    ("hl7_out", "receiving_facility", "UNIVERSITY_HOSPITAL_NORTH", "MSGATE_HL7_OUT__RECEIVING_FACILITY"),
])
def test_values_that_only_failed_later_are_refused_at_start(tmp_path: Path, section: str, key: str, value: str,
                                                            name: str) -> None:
    """A worker device torch does not know crash-looped the worker with only 'RuntimeError'; an HL7 name
    over HD.1's 20 characters was accepted and then no ORU was ever built. Both are refused by name now."""
    with pytest.raises(ConfigError) as info:
        load_settings(home=tmp_path, **{section: {key: value}})
    assert name in str(info.value)
    assert load_settings(home=tmp_path, workers={"device": "cuda:1"}).workers.device == "cuda:1"
