"""One Settings object (pydantic-settings), built in the CLI and passed down; never at import time.

Sources, highest priority first: keyword overrides, environment variables ``MSGATE_*`` (nested with
``__``, e.g. ``MSGATE_DICOM__PORT=11113``), the TOML file given with ``--config``, then defaults.
Invalid settings raise one :class:`~msgate.errors.ConfigError` that names the setting.
"""

from __future__ import annotations

import os
import re
import unicodedata
from pathlib import Path
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import (
    AfterValidator,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
    TomlConfigSettingsSource,
)

from msgate.errors import ConfigError
from msgate.config_env import check_variable_names, not_json
from msgate.config_hl7 import HL7_DELIMITERS, Hl7Destination, Hl7Settings  # noqa: F401  (imported from here)
from msgate.config_hl7 import check_networks as _check_networks
from msgate.config_tls import ClientTlsSettings, Section, TlsSettings  # noqa: F401  (TlsSettings: imported from here)
from msgate.listener.rules import ListenerRules

PLACEHOLDER_SECRETS = frozenset({"changethis", "changeme", "password", "secret", "example"})
RESERVED_DESTINATIONS = frozenset({"hl7"})  # msgate.results.outbox.HL7_DESTINATION: the ORU lane
DATABASE_SCHEMES = ("sqlite", "postgresql+psycopg")


def _check_ae_title(value: str) -> str:
    """An AE title per PS3.5 §6.2 (VR AE): 1-16 ASCII characters, no backslash or control character,
    not only spaces (PS3.8 §9.3.2: a called or calling AE title may not be all spaces)."""
    if not value.strip():
        raise ValueError("an AE title must not be empty or only spaces")
    if len(value) > 16:
        raise ValueError(f"AE title {value!r} is longer than 16 characters")
    if not value.isascii() or "\\" in value or any(unicodedata.category(c)[0] == "C" for c in value):
        raise ValueError(f"AE title {value!r} may contain only printable ASCII characters other than "
                         "backslash")
    return value


AeTitle = Annotated[str, AfterValidator(_check_ae_title)]


class DicomSettings(Section):
    """The DICOM listener (C-ECHO, C-STORE SCP)."""

    ae_title: AeTitle = "MSGATE"
    host: str = "127.0.0.1"
    port: int = Field(11112, ge=0, le=65535)
    max_pdu: int = Field(262_144, ge=0, description="largest PDU announced and accepted, in bytes; 0 announces "
                                                   "the listener's own bound (64 MiB), not \"no maximum\"")
    acse_timeout: float = Field(30.0, gt=0)
    dimse_timeout: float = Field(60.0, gt=0)
    network_timeout: float = Field(60.0, gt=0)
    max_associations: int = Field(32, ge=1)
    allowed_aets: list[AeTitle] = Field(default_factory=list,
                                        description="empty: any calling AE (warned at start)")
    allowed_networks: list[str] = Field(default_factory=list, description="empty: any source address")
    quiet_seconds: float = Field(10.0, gt=0, description="a study with no new instance for this long is stable")
    default_issuer: str = Field("", max_length=64,
                                description="assigning authority for a study without IssuerOfPatientID (most "
                                            "scanners send none): the HL7 feed's PID-3 CX-4 namespace for the "
                                            "same MRNs, e.g. HOSP; empty: only DICOM-sent issuers link")
    index_backlog_mb: int = Field(256, ge=16, description="journaled bytes waiting for the indexer before "
                                                          "senders are slowed down (then answered 0xA700)")
    tls: TlsSettings = TlsSettings()

    _nets = field_validator("allowed_networks")(_check_networks)


# MSH-3..6 are HD, whose namespace id (HD.1) is at most 20 characters (HL7 v2.5.1 2.A.33): a longer
# name was accepted here and then every ORU failed strict validation, so no result reached the EHR.
class PacsDestination(Section):
    """A C-STORE destination for results (SR, SEG, parametric map, SC)."""

    name: str = Field("pacs", min_length=1, max_length=64, description="the outbox's destination key; unique")
    host: str = "127.0.0.1"
    port: int = Field(104, ge=1, le=65535)
    ae_title: AeTitle = "PACS"
    tls: ClientTlsSettings = Field(default_factory=ClientTlsSettings,
                                   description="DICOM TLS (PS3.15 B.9) to this PACS; off: plaintext")
    iocm_rejection: bool = Field(False, description="with a correction, also send an IHE IOCM rejection note "
                                 "(KOS, DCM 113001) for the superseded SEG, map and key images; only for a PACS "
                                 "that honours IOCM")

    @field_validator("name")
    @classmethod
    def _not_reserved(cls, value: str) -> str:
        if value.strip().lower() in RESERVED_DESTINATIONS:
            raise ValueError(f"{value!r} is reserved for the HL7 results lane; choose another PACS name")
        return value


class ResultsSettings(Section):
    """What the results publisher renders (msgate.results; docs/results.md)."""

    key_images: int = Field(3, ge=0, le=20, description="RGB Secondary Capture key images per result; 0 turns them off")
    seg: bool = Field(True, description="send the lesion Segmentation (off for a PACS without SEG storage: its "
                                        "C-STOREs would be dead letters for every study)")
    parametric_map: bool = Field(True, description="send the Parametric Map (off for a PACS without it)")
    # The outbox's retry policy (msgate.results.outbox.Policy reads these by name). Times in seconds.
    base_delay: float = Field(5.0, gt=0, description="first retry delay; doubles per attempt (equal jitter)")
    max_delay: float = Field(3600.0, gt=0, description="cap on the retry delay")
    max_age: float = Field(3 * 24 * 3600.0, gt=0, description="a failing entry is dead-lettered after this")
    lease: float = Field(300.0, gt=0, description="how long a claimed entry stays with its sender")
    batch: int = Field(50, ge=1, description="entries a lane sends per round (one association or connection)")
    poll: float = Field(1.0, gt=0, description="how often an idle lane looks for due entries")
    dimse_timeout: float = Field(60.0, gt=0, description="C-STORE answer timeout at a PACS")
    hl7_timeout: float = Field(30.0, gt=0, description="ACK timeout at the interface engine")

    @field_validator("max_delay")
    @classmethod
    def _cap_above_base(cls, value: float, info: ValidationInfo) -> float:
        base = info.data.get("base_delay")
        if base is not None and value < base:
            raise ValueError("must not be shorter than base_delay")
        return value


class StorageSettings(Section):
    """Blob store and retention."""

    blob_backend: Literal["local", "postgres"] = "local"
    chunk_bytes: int = Field(1024 * 1024, ge=4096, le=64 * 1024 * 1024)
    min_free_bytes: int = Field(2 * 1024**3, ge=0, description="below this, ingest answers out-of-resources")
    retention_days: float = Field(30.0, ge=0, description="purge source images this long after delivery")
    unused_retention_days: float | None = Field(None, ge=0, description="studies with no result to deliver: this "
                                                "long after their last instance (unset: retention_days)")
    purge_free_bytes: int = Field(5 * 1024**3, ge=0, description="below this free space, purge finished studies, "
                                  "those with no result to deliver first, oldest first")
    purge_interval_s: float = Field(3600.0, ge=0, description="the scheduler role applies retention this often (free "
                                    "space is checked every min(this, 60) s); 0: only `msgate db purge`")


class MetricsSettings(Section):
    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = Field(9464, ge=0, le=65535)


class WorkerSettings(Section):
    """Scheduler and Celery workers (see msgate.workers). Times in seconds."""

    required_ehr_fields: list[str] = Field(default_factory=lambda: ["age", "sex"],
                                           description="feature names a case waits for (model.features)")
    ehr_deadline_seconds: float = Field(600.0, ge=0, description="then run with the missing fields masked")
    scan_seconds: float = Field(2.0, gt=0, description="scheduler / reconciler period")
    lookback_seconds: float = Field(3600.0, ge=0, description="ready studies older than deadline+this are done")
    publish_grace_seconds: float = Field(10.0, ge=0, description="unpublished jobs older than this are re-sent")
    publish_stall_seconds: float = Field(3600.0, ge=1, description="a done job handed to publishing this long ago "
                                         "with nothing rendered is handed off again (lost task, retries exhausted)")
    publish_handoffs: int = Field(4, ge=1, description="hand-offs of one job to publishing, the first included")
    batch_size: int = Field(4, ge=1, description="dynamic batching: cases per predict call")
    batch_wait_seconds: float = Field(0.2, ge=0, description="how long a batch waits for more queued cases")
    soft_time_limit: float = Field(600.0, gt=0)
    hard_time_limit: float = Field(900.0, gt=0)
    visibility_timeout: float = Field(3600.0, gt=0, description="Redis redelivery; must exceed hard_time_limit")
    lease_margin_seconds: float = Field(30.0, ge=0, description="a running job's lease outlasts hard_time_limit by "
                                        "this much (clock skew between hosts) before the reconciler re-queues it")
    max_retries: int = Field(5, ge=0)
    retry_backoff_max: float = Field(300.0, gt=0)
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$",
                        description="auto (CUDA if available, else CPU), cpu, cuda, cuda:N")
    model_module: str = Field("msgate.model.predict", description="module with load_model() and predict(cases)")
    queue_prefix: str = Field("", max_length=64, description="Redis key prefix: several deployments, one Redis")

    @property
    def lease_seconds(self) -> float:
        """How long a claimed job stays leased to its worker."""
        return self.hard_time_limit + self.lease_margin_seconds

    @field_validator("required_ehr_fields")
    @classmethod
    def _known_features(cls, value: list[str]) -> list[str]:
        """A name outside the feature schema is never missing, so the scheduler would never wait for it."""
        from msgate.model.features import FEATURES  # plain data, no torch: light roles load it too

        names = [spec.name for spec in FEATURES]
        unknown = [name for name in value if name not in names]
        if unknown:
            raise ValueError(f"unknown EHR feature {unknown[0]!r}; valid: {', '.join(names)}")
        return value

    @field_validator("visibility_timeout")
    @classmethod
    def _visibility_after_hard_limit(cls, value: float, info: Any) -> float:
        hard = info.data.get("hard_time_limit")
        if hard is not None and value <= hard:
            raise ValueError("must be longer than hard_time_limit, or a slow task is delivered twice")
        return value


class AuditSettings(Section):
    """Anchors of the audit chain (msgate.storage.audit_anchor): its head, recorded outside the database by
    every process that runs the scheduler role, so records cut off its end are seen by ``audit verify``."""

    anchor_interval_s: float = Field(300.0, ge=0, description="seconds between anchors (the head is anchored "
                                     "again only once it moved), one more at a clean stop; 0: no anchors")
    anchor_file: str | None = Field(None, description="JSON lines file the anchors are appended to (fsynced); "
                                    "None: home/audit-anchors.jsonl, a relative path is under home; empty: "
                                    "log line only")


class HeSettings(Section):
    """Homomorphic mode (``MSGATE_HE__ENABLED``): EHR features stay under CKKS on the GPU workers.

    Parameters are checked against the 128-bit security limits of the HomomorphicEncryption.org
    standard (total coefficient modulus bits per ``poly_modulus_degree``) and the depth the HE circuit
    needs (msgate.model.he). Changing them makes the keys role rotate to a new CKKS key.
    """

    enabled: bool = False
    poly_modulus_degree: int = 8192
    coeff_mod_bit_sizes: list[int] = Field(default_factory=lambda: [42, 32, 32, 32, 32, 48])
    global_scale_bits: int = 32
    rpc_timeout_seconds: float = Field(60.0, gt=0, description="how long a worker waits for the keys role; "
                                       "also each request's deadline, after which the keys role drops it")
    clock_skew_seconds: float = Field(300.0, ge=0, description="how far the keys host's clock may run ahead of "
                                      "a worker's before its requests count as past their deadline")

    @model_validator(mode="after")
    def _secure(self) -> HeSettings:
        self.params()
        return self

    def params(self) -> Any:
        """The checked :class:`msgate.model.he.HeParams`."""
        from msgate.model.he import HeParams

        return HeParams(self.poly_modulus_degree, tuple(self.coeff_mod_bit_sizes), self.global_scale_bits).check()


class Settings(BaseSettings):
    """Everything msgate reads from its environment. See README "Configuration"."""

    model_config = SettingsConfigDict(
        env_prefix="MSGATE_", env_nested_delimiter="__", extra="forbid", validate_default=True
    )

    home: Path = Path("./var")
    keyring_file: Path | None = Field(None, description="None: home/keys/keyring.json")
    database_url: str | None = Field(None, description="None: SQLite under home; postgresql+psycopg://... in production")
    broker_url: str | None = Field(None, description="None: durable embedded queue under home; redis://... in production")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["json", "kv"] = "json"
    site_timezone: str = Field("UTC", description="IANA zone of the site's DICOM dates and times (StudyDate is local)")
    dicom: DicomSettings = DicomSettings()
    hl7: Hl7Settings = Hl7Settings()
    pacs: list[PacsDestination] = Field(default_factory=list)
    hl7_out: Hl7Destination | None = None
    results: ResultsSettings = ResultsSettings()
    storage: StorageSettings = StorageSettings()
    metrics: MetricsSettings = MetricsSettings()
    workers: WorkerSettings = WorkerSettings()
    rules: ListenerRules = ListenerRules()  # series roles and routing, see msgate.listener.rules
    he: HeSettings = HeSettings()
    audit: AuditSettings = AuditSettings()

    @field_validator("pacs")
    @classmethod
    def _distinct_pacs_names(cls, value: list[PacsDestination]) -> list[PacsDestination]:
        seen: set[str] = set()
        for dest in value:
            if dest.name in seen:
                raise ValueError(f"two PACS destinations are named {dest.name!r} ('pacs' when name is not "
                                 "set); give each [[pacs]] a distinct name")
            seen.add(dest.name)
        return value

    @field_validator("site_timezone")
    @classmethod
    def _known_zone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {value!r} (an IANA name such as Europe/Rome)") from None
        return value

    @property
    def site_zone(self) -> ZoneInfo:
        return ZoneInfo(self.site_timezone)

    @field_validator("database_url")
    @classmethod
    def _supported_database(cls, value: str | None) -> str | None:
        """The two engines msgate runs on; the URL itself is never echoed (it may hold a password)."""
        if value is None:
            return value
        scheme = value.split("://", 1)[0].lower() if "://" in value else ""
        if scheme in ("postgres", "postgresql"):
            raise ValueError(f"{scheme}:// names no driver; use postgresql+psycopg://user:password@host/db")
        if scheme not in DATABASE_SCHEMES or (scheme == "sqlite" and not value.startswith("sqlite:///")):
            raise ValueError("unsupported database URL; use postgresql+psycopg://user:password@host/db "
                             "or sqlite:///path/to/msgate.db")
        return value

    @field_validator("database_url", "broker_url")
    @classmethod
    def _no_placeholder_password(cls, value: str | None) -> str | None:
        if value and "@" in value and ":" in value.split("@", 1)[0].split("//", 1)[-1]:
            password = value.split("@", 1)[0].split("//", 1)[-1].split(":", 1)[1]
            if password.lower() in PLACEHOLDER_SECRETS:
                raise ValueError("uses a placeholder password; set a real secret")
        return value

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        toml_file = settings_cls.model_config.get("toml_file")
        if toml_file:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=toml_file))
        sources.append(file_secret_settings)
        return tuple(sources)

    # Derived locations under home. Roles create them on start, not here.
    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{(self.home / 'msgate.db').resolve()}"

    @property
    def resolved_broker_url(self) -> str:
        return self.broker_url or f"sqla+sqlite:///{(self.home / 'queue.db').resolve()}"

    @property
    def blob_dir(self) -> Path:
        return self.home / "blobs"

    @property
    def keyring_path(self) -> Path:
        return self.keyring_file or self.home / "keys" / "keyring.json"

    @property
    def is_embedded(self) -> bool:
        return self.database_url is None or self.resolved_database_url.startswith("sqlite")


def _env_name(loc: tuple[Any, ...]) -> str:
    return "MSGATE_" + "__".join(str(part).upper() for part in loc if not isinstance(part, int))


def load_settings(config_file: Path | None = None, **overrides: Any) -> Settings:
    """Build the Settings; raise ConfigError naming the first invalid setting."""
    if config_file is not None and not Path(config_file).is_file():
        raise ConfigError(f"config file not found: {config_file}")
    check_variable_names(os.environ, Settings)
    secrets_dir = os.environ.get("MSGATE_SECRETS_DIR")  # e.g. /run/secrets: a file msgate_database_url
    if secrets_dir is not None and not Path(secrets_dir).is_dir():  # else: a warning, then the defaults
        raise ConfigError(f"invalid setting MSGATE_SECRETS_DIR: not a directory: {secrets_dir}")

    class _FileSettings(Settings):
        model_config = SettingsConfigDict(**{**Settings.model_config, "toml_file": config_file,
                                             "secrets_dir": secrets_dir})

    try:
        loaded = _FileSettings(**overrides) if (config_file or secrets_dir) else Settings(**overrides)
    except ValidationError as exc:
        first = exc.errors()[0]
        raise ConfigError(f"invalid setting {_env_name(first['loc'])}: {first['msg']}") from None
    except SettingsError as exc:  # a value pydantic-settings could not decode (a list that is not JSON)
        field = re.search(r'field "(\w+)"', str(exc))
        named = not_json(field.group(1), os.environ, Settings) if field else None
        raise (named or ConfigError(f"invalid configuration: {exc}")) from None
    except ValueError as exc:  # a malformed TOML file
        raise ConfigError(f"invalid configuration: {exc}") from None
    return loaded
