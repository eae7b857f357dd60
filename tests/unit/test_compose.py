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
