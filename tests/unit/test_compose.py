"""compose.yaml: valid against the Compose Specification's JSON schema, and every msgate service runs a
real msgate subcommand. (Docker does not run on this machine, so the file is validated, not started.)"""

from __future__ import annotations

import json
from pathlib import Path

import click
import jsonschema
import pytest
import typer.main
import yaml

from msgate.cli.app import app
from msgate.cli.serve_cmd import ROLE_RUNNERS, Role

ROOT = Path(__file__).resolve().parents[2]
SCHEMA = ROOT / ".cache/compose-spec/package/lib/compose-spec/schema/compose-spec.json"


@pytest.fixture(scope="module")
def compose() -> dict:  # type: ignore[type-arg]
    return yaml.safe_load((ROOT / "compose.yaml").read_text())


def test_compose_matches_the_specification(compose: dict) -> None:  # type: ignore[type-arg]
    assert SCHEMA.is_file(), "run scripts/sysdeps.sh (make test does) to fetch the Compose schema"
    schema = json.loads(SCHEMA.read_text())
    jsonschema.validate(compose, schema)


def test_required_services_and_gpu_reservation(compose: dict) -> None:  # type: ignore[type-arg]
    services = compose["services"]
    for name in ("postgres", "redis", "migrate", "dicom", "hl7", "scheduler", "worker", "publish", "flower",
                 "orthanc"):
        assert name in services, name
    devices = services["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    assert "replicas" in services["worker"]["deploy"]
    assert services["orthanc"]["profiles"] == ["peers"]
    assert compose["secrets"]["msgate_database_url"]["file"].startswith("./secrets/")


def _msgate_commands(compose: dict) -> list[tuple[str, list[str]]]:  # type: ignore[type-arg]
    found = []
    for name, service in compose["services"].items():
        command = service.get("command")
        if isinstance(command, list) and command[:1] == ["sh"]:
            command = command[-1].split("||")[-1].split()
        if command and command[0] == "msgate":
            found.append((name, command[1:]))
        test = service.get("healthcheck", {}).get("test")
        if test and test[:2] == ["CMD", "msgate"]:
            found.append((f"{name}.healthcheck", test[2:]))
    return found


def test_every_command_is_a_real_msgate_subcommand(compose: dict) -> None:  # type: ignore[type-arg]
    group = typer.main.get_command(app)
    commands = _msgate_commands(compose)
    assert len(commands) >= 8
    for service, args in commands:
        ctx = click.Context(group)
        cmd_name, cmd, rest = group.resolve_command(ctx, list(args))
        while isinstance(cmd, click.Group):
            sub = click.Context(cmd, parent=ctx)
            cmd_name, cmd, rest = cmd.resolve_command(sub, rest)
        assert cmd is not None, service
        cmd.make_context(cmd_name or "", list(rest), parent=ctx)  # parses options; raises on unknown ones
        if args[:1] == ["serve"]:
            role = args[args.index("--role") + 1]
            assert Role(role) and role in ROLE_RUNNERS, service


def _interpolate(value: object, env: dict[str, str]) -> object:
    """Compose's ``${VAR:-default}`` / ``${VAR}`` / ``$$`` on every string, with ``env`` as the shell."""
    import re

    if isinstance(value, dict):
        return {k: _interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [_interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def sub(m: re.Match[str]) -> str:
        name, default = m.group(1), m.group(3) or ""
        return env.get(name) or default

    out = re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(:-((?:[^{}]|\{[^{}]*\})*))?\}", sub, value.replace("$$", "\0"))
    return out.replace("\0", "$")


def _msgate_services(compose: dict) -> dict[str, dict]:  # type: ignore[type-arg]
    return {name: s for name, s in compose["services"].items()
            if isinstance(s.get("command"), list) and s["command"][:2] == ["msgate", "serve"]}


def test_every_service_environment_loads_as_settings(compose: dict, tmp_path: Path,  # type: ignore[type-arg]
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """With an empty shell environment, each msgate service's variables (defaults interpolated, the
    database URL from its secret file) must be valid settings: a typo'd name or a non-JSON list fails."""
    from msgate.config import load_settings

    secrets = tmp_path / "secrets"
    secrets.mkdir()
    (secrets / "msgate_database_url").write_text("postgresql+psycopg://msgate:pw@postgres/msgate\n")
    for name, service in _msgate_services(_interpolate(compose, {})).items():  # type: ignore[arg-type]
        env = {k: str(v) for k, v in service["environment"].items()}
        env["MSGATE_SECRETS_DIR"], env["MSGATE_HOME"] = str(secrets), str(tmp_path / "home")
        env["MSGATE_KEYRING_FILE"] = str(tmp_path / "home" / "keys" / "keyring.json")
        for key in [k for k in __import__("os").environ if k.startswith("MSGATE_")]:
            monkeypatch.delenv(key)
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        settings = load_settings()
        assert settings.resolved_database_url.startswith("postgresql+psycopg://"), name
        assert settings.storage.blob_backend == "postgres" and settings.pacs, name


def test_each_service_checks_its_own_role_and_shares_the_key_ring(compose: dict) -> None:  # type: ignore[type-arg]
    """A system-wide health check marked every container unhealthy when one role (say a GPU worker) was
    down; every role needs the key ring volume; migrations run once, after the database and the key ring."""
    for name, service in _msgate_services(compose).items():
        role = service["command"][service["command"].index("--role") + 1]
        assert service["healthcheck"]["test"] == ["CMD", "msgate", "status", "--role", role, "--quiet"], name
        assert any(str(v).startswith("keys:") for v in service["volumes"]), name
        assert service["depends_on"]["migrate"]["condition"] == "service_completed_successfully", name
    migrate = compose["services"]["migrate"]
    assert migrate["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert migrate["depends_on"]["keys-init"]["condition"] == "service_completed_successfully"
    assert compose["services"]["worker"]["command"][-1] == "worker"


def test_only_the_keys_role_holds_the_ckks_secret_key(compose: dict) -> None:  # type: ignore[type-arg]
    """HE mode keeps EHR values from the worker host; the CKKS secret key lived on the `keys` volume that
    the GPU worker mounts too."""
    services = compose["services"]
    mounts = {name: [str(v).split(":")[0] for v in s.get("volumes", [])] for name, s in _msgate_services(compose).items()}
    assert "he-secret" in mounts["keys"] and "he-public" in mounts["keys"]
    assert [name for name, m in mounts.items() if "he-secret" in m] == ["keys"]
    assert "he-public" in mounts["worker"]
    assert services["keys"]["volumes"][2].endswith(":/var/lib/msgate/keys/he")



def _header_variables() -> set[str]:
    """The ``MSGATE_*`` names the comment block at the top of compose.yaml tells operators to set."""
    import re

    header = []
    for line in (ROOT / "compose.yaml").read_text().splitlines():
        if not line.startswith("#"):
            break
        header.append(line)
    return set(re.findall(r"\bMSGATE_[A-Z0-9_]*[A-Z0-9]", "\n".join(header)))


def test_every_variable_the_header_names_reaches_a_service(compose: dict) -> None:  # type: ignore[type-arg]
    """Compose passes a container only what its `environment:` lists: the header told operators to set the
    network allowlists, but no service forwarded them, so the listeners stayed open to every address."""
    named = _header_variables()
    assert {"MSGATE_DICOM__ALLOWED_NETWORKS", "MSGATE_HL7__ALLOWED_NETWORKS"} <= named
    for name in sorted(named):
        forwarded = [svc for svc, s in compose["services"].items()
                     if f"${{{name}" in str((s.get("environment") or {}).get(name, ""))]
        assert forwarded, f"{name} is named in the header but no service's environment forwards ${{{name}}}"


def test_the_operators_allowlists_reach_the_listeners(compose: dict, tmp_path: Path,  # type: ignore[type-arg]
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from msgate.config import load_settings

    shell = {"MSGATE_DICOM__ALLOWED_AETS": '["PACS1"]', "MSGATE_DICOM__ALLOWED_NETWORKS": '["10.1.0.0/16"]',
             "MSGATE_HL7__ALLOWED_NETWORKS": '["10.2.0.0/16"]'}
    services = _msgate_services(_interpolate(compose, shell))  # type: ignore[arg-type]
    for key in [k for k in __import__("os").environ if k.startswith("MSGATE_")]:
        monkeypatch.delenv(key)
    loaded = {}
    for name in ("dicom", "hl7"):
        for key, value in services[name]["environment"].items():
            monkeypatch.setenv(key, str(value))
        monkeypatch.delenv("MSGATE_SECRETS_DIR")  # the container's /run/secrets is not here
        monkeypatch.setenv("MSGATE_HOME", str(tmp_path / "home"))
        loaded[name] = load_settings()
        for key in services[name]["environment"]:
            monkeypatch.delenv(key, raising=False)
    assert loaded["dicom"].dicom.allowed_aets == ["PACS1"]
    assert loaded["dicom"].dicom.allowed_networks == ["10.1.0.0/16"]
    assert loaded["hl7"].hl7.allowed_networks == ["10.2.0.0/16"]
