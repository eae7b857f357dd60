"""``msgate status [--json] [--watch] [--role R] [--quiet]``: the whole system's health at a glance.

Exit code 0 healthy, 1 degraded, 2 down, so it can feed monitoring and compose health checks. Besides the
roles' heartbeats it looks at what they produce: jobs failing in the last hour, and ready studies that never
got a job (the scheduler cannot load its model), are degraded.
"""

from __future__ import annotations

import time
from typing import Annotated, Any

import typer
from rich.console import Group
from rich.live import Live
from rich.table import Table
from rich.text import Text
from sqlalchemy.exc import SQLAlchemyError

from msgate.cli import status_probe as probe
from msgate.cli.common import add_row, cell, console, missing_sqlite, print_json, state
from msgate.cli.serve_cmd import ROLE_RUNNERS, available_roles
from msgate.config import Settings
from msgate.errors import MsgateError
from msgate.storage.db import Database

LEVEL = {"ok": 0, "degraded": 1, "down": 2}
STYLE = {"ok": "green", "degraded": "yellow", "down": "red"}


def collect(settings: Settings, only_role: str | None = None, *, job_failures: int = probe.JOB_FAILURES,
            job_failure_ratio: float = probe.JOB_FAILURE_RATIO) -> dict[str, Any]:
    missing = missing_sqlite(settings)
    if missing is not None:  # not created by a probe (a first serve sets up the home)
        return _finish({"database": {"backend": "sqlite", "health": "down",
                                     "reason": "schema missing; run msgate db upgrade"},
                        "keys": probe.keys(settings), "disk": probe.disk(settings)}, critical=True)
    try:  # an unusable URL or database path is "down" too: JSON and exit 2, never a crash
        db = Database(settings.resolved_database_url, **probe.DB_LIMITS)
    except Exception as exc:
        return _finish({"database": probe.failed("database", exc), "keys": probe.keys(settings),
                        "disk": probe.disk(settings)}, critical=True)
    try:
        report: dict[str, Any] = {"database": probe.database(db), "keys": probe.keys(settings),
                                  "disk": probe.disk(settings)}
        if report["database"]["health"] == "down":
            return _finish(report, critical=True)
        try:
            _probe_system(db, settings, only_role, report, (job_failures, job_failure_ratio))
        except (MsgateError, SQLAlchemyError) as exc:  # the database went away or broke mid-probe
            report["database"] = probe.failed("database", exc) | {"backend": report["database"]["backend"]}
            return _finish(report, critical=True)
        return _finish(report)
    finally:
        db.dispose()


def _probe_system(db: Database, settings: Settings, only_role: str | None, report: dict[str, Any],
                  job_limits: tuple[int, float] = (probe.JOB_FAILURES, probe.JOB_FAILURE_RATIO)) -> None:
    """Roles (with their ports), broker, jobs, studies and outbox, added to ``report``."""
    expected = (only_role,) if only_role else probe.required_roles(settings, available_roles())
    ports = {"dicom": (settings.dicom.host, settings.dicom.port),
             "hl7": (settings.hl7.host, settings.hl7.port)}
    report["roles"] = probe.roles(db, expected, ports)
    if only_role in (None, "scheduler", "worker", "publish"):
        report["broker"] = probe.broker(settings)
    if only_role is None:
        report["jobs"] = probe.jobs(db, fail_count=job_limits[0], fail_ratio=job_limits[1])
        report["studies"] = probe.studies(db, settings)
        report["outbox"] = probe.outbox(db)


def _finish(report: dict[str, Any], critical: bool = False) -> dict[str, Any]:
    """Database or key ring down, or nothing running: down. A role, the broker (ingest still acknowledges,
    jobs wait), failing jobs, studies left without a job or the outbox in trouble: degraded."""
    levels = [LEVEL[part["health"]] for name, part in report.items()
              if isinstance(part, dict) and "health" in part and name not in ("broker", "roles")]
    roles = report.get("roles", {})
    role_levels = [LEVEL[r["health"]] for r in roles.values()]
    if role_levels and all(level == 2 for level in role_levels):
        levels.append(2)  # nothing is running
    elif role_levels:
        levels.append(min(1, max(role_levels)))  # some roles down: degraded
    if report.get("broker", {}).get("health") == "down":
        levels.append(1)
    worst = max(levels + [2 if critical else 0])
    report["health"] = {0: "ok", 1: "degraded", 2: "down"}[worst]
    return report


def render(report: dict[str, Any]) -> Group:
    health = report["health"]
    head = Table.grid(padding=(0, 1))
    head.add_row(f"[bold]msgate[/bold] [{STYLE[health]}]{health.upper()}[/]")
    parts = Table("component", "health", "detail", box=None, show_edge=False, pad_edge=False, width=78)
    for name in ("database", "keys", "disk", "broker"):
        if name in report:
            part = report[name]
            add_row(parts, name, _h(part["health"]), _detail(part))
    for role, info in report.get("roles", {}).items():
        add_row(parts, f"role {role}", _h(info["health"]), _detail(info))
    if "jobs" in report:
        jobs = report["jobs"]
        counts = ", ".join(f"{k} {v}" for k, v in sorted(jobs["last_hour"].items())) or "none"
        timing = f"p50 {jobs['p50_s']:.1f}s p95 {jobs['p95_s']:.1f}s" if jobs["p50_s"] is not None else ""
        add_row(parts, "jobs (1 h)", _h(jobs["health"]) if "health" in jobs else "", f"{counts} {timing}".strip())
        if jobs.get("reason"):
            add_row(parts, "", "", cell(jobs["reason"], style="yellow"))
        for failure in jobs["recent_failures"]:
            add_row(parts, "", "", cell(f"job {failure['job']}: {failure['reason']}", style="red"))
    if "studies" in report:
        studies = report["studies"]
        waiting = f"{studies['stuck']} ready without a job, oldest {studies['oldest_s']:.0f}s" if studies["stuck"] \
            else "none left without a job"
        add_row(parts, "studies", _h(studies["health"]), waiting)
        if studies["reason"]:
            add_row(parts, "", "", cell(studies["reason"], style="yellow"))
    if "outbox" in report:
        out = report["outbox"]
        add_row(parts, "outbox", _h(out["health"]),
                f"backlog {out['backlog']}, oldest {out['oldest_s']:.0f}s, dead {out['dead_letters']}")
        for error in out["recent_errors"]:
            add_row(parts, "", "", cell(f"{error['destination']}: {error['reason']}", style="yellow"))
    return Group(head, parts)


def _h(level: str) -> Text:
    return cell(level, style=STYLE[level])


def _detail(part: dict[str, Any]) -> str:
    skip = {"health"}
    bits = [f"{k} {v}" for k, v in part.items() if k not in skip and v not in ("", None, [], {})]
    return ", ".join(bits)[:200]


def command(
    ctx: typer.Context,
    json_out: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
    watch: Annotated[bool, typer.Option("--watch", help="refresh every 2 s until Ctrl-C")] = False,
    role: Annotated[str | None, typer.Option("--role", help="check only this role (container health checks)")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="print nothing; exit code only")] = False,
    job_failures: Annotated[int, typer.Option("--job-failures", min=1, help="degraded at this many jobs failed in "
                                              "the last hour ...")] = probe.JOB_FAILURES,
    job_failure_ratio: Annotated[float, typer.Option("--job-failure-ratio", min=0.0, max=1.0, help="... that are "
                                                     "at least this share of the jobs finished in it")
                                 ] = probe.JOB_FAILURE_RATIO,
) -> None:
    """Health of every role, the broker, the database and disk; queues, jobs, studies, outbox, keys.

    Exit code: 0 healthy, 1 degraded, 2 down.
    """
    if role is not None and role not in ROLE_RUNNERS:  # not "down": a role that can never run is a typo
        raise typer.BadParameter(f"unknown role {role!r}; valid roles: {', '.join(ROLE_RUNNERS)}",
                                 param_hint="'--role'")
    settings = state(ctx).settings

    def now() -> dict[str, Any]:
        return collect(settings, role, job_failures=job_failures, job_failure_ratio=job_failure_ratio)

    if watch:
        with Live(render(now()), console=console, refresh_per_second=1) as live:
            try:
                while True:
                    time.sleep(2)
                    live.update(render(now()))
            except KeyboardInterrupt:
                pass
    report = now()
    if json_out:
        print_json(report)
    elif not quiet:
        console.print(render(report))
    raise typer.Exit(LEVEL[report["health"]])
