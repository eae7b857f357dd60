"""``msgate keys he list|rotate|retire``: the CKKS keys of homomorphic mode (:mod:`msgate.model.he_keys`).

They were made only by the keys role (``HeKeys.ensure``) and rotated only by changing the HE parameters;
an operator could neither see them nor rotate after a suspected exposure, nor drop old ones.

Which jobs a key served is known from the audit trail: the key service writes one ``decrypt.he_encrypt``
event per job and attempt, naming the key id it encrypted under, before it reads the job's EHR. A key is
still needed while such a job is not finished (its encrypted result comes back to be decrypted).

A running keys role reads ``keys/he/active`` at every request and opens a new key's secret file then, and
workers load a public context when a pack first names its key id: a rotation needs no restart.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.table import Table

from msgate.cli.common import add_row, cell, check_schema, console, print_json, state
from msgate.errors import ConfigError
from msgate.storage import audit, keyring

if TYPE_CHECKING:
    from sqlmodel import Session

    from msgate.model.he_keys import HeKeys

app = typer.Typer(no_args_is_help=True, help="CKKS keys of homomorphic mode: list, rotate, retire.")
JsonOpt = Annotated[bool, typer.Option("--json", help="machine-readable output")]
SHOWN_JOBS = 5
"""Job ids named in a refusal (the rest are counted)."""


def _keys(home: Path, ring: Any = None) -> HeKeys:
    from msgate.model.he_keys import HeKeys  # numpy and the HE package: only for these commands

    return HeKeys(home, ring)


def unfinished_jobs(session: Session, key_ids: Iterable[str]) -> dict[str, list[str]]:
    """Per key id, the jobs not yet finished that the key service encrypted inputs for under it (from their
    ``decrypt.he_encrypt`` audit events). Only unfinished jobs are looked up: few, and ``subject`` is indexed."""
    from sqlmodel import col, select

    from msgate.model.he_service import AUDIT_KIND
    from msgate.storage.models import AuditEvent, Job
    from msgate.workers.jobs import FINAL

    out: dict[str, set[str]] = {k: set() for k in key_ids}
    open_jobs = list(session.exec(select(Job.id).where(col(Job.state).not_in(FINAL))).all())
    for start in range(0, len(open_jobs), 500):
        subjects = [f"job:{j}" for j in open_jobs[start:start + 500]]
        rows = session.exec(select(AuditEvent.subject, AuditEvent.detail)
                            .where(AuditEvent.kind == AUDIT_KIND, col(AuditEvent.subject).in_(subjects)))
        for subject, detail in rows:
            key_id = (detail or {}).get("key_id")
            if key_id in out:
                out[key_id].add(subject.removeprefix("job:"))
    return {k: sorted(v) for k, v in out.items()}


def _created(epoch: Any) -> str | None:
    return datetime.fromtimestamp(float(epoch), UTC).isoformat(timespec="seconds") if epoch is not None else None


@app.command("list")
def list_keys(ctx: typer.Context, json_out: JsonOpt = False) -> None:
    """CKKS keys: active, parameters, created, KEK, public SHA-256, unfinished jobs that used them.

    No secret material is shown (nor the MAC keys)."""
    st = state(ctx)
    settings = st.settings
    keys = _keys(settings.home)
    ids = keys.known_ids()
    store = st.store()  # the job counts; refuses a database at another schema revision, as every keys command
    with store.db.session() as session:
        using = unfinished_jobs(session, ids)
    configured = settings.he.params().to_dict()
    rows = []
    for key_id in ids:
        row = keys.describe(key_id)
        row["created"] = _created(row["created"])
        row["unfinished_jobs"] = len(using[key_id])
        rows.append(row)
    active = keys.active_id()
    stale = next((r["params"] != configured for r in rows if r["key_id"] == active), False)
    if json_out:
        print_json({"enabled": settings.he.enabled, "active": active, "configured_params": configured,
                    "active_params_differ": stale, "dir": str(keys.dir), "keys": rows})
        return
    if not settings.he.enabled:
        console.print(cell("homomorphic mode is off (MSGATE_HE__ENABLED); these keys are not in use", style="yellow"))
    if not rows:
        console.print(f"no CKKS keys in {keys.dir}")
        return
    table = Table("key id", "active", "N", "coeff moduli (bits)", "scale", "created", "KEK", "public SHA-256",
                  "unfinished jobs")
    for r in rows:
        p = r["params"] or {}
        kek = r["kek_id"] if r["secret_file"] and r["wrapped"] else ("not wrapped" if r["secret_file"] else "no secret")
        add_row(table, r["key_id"], "yes" if r["active"] else "", p.get("poly_modulus_degree"),
                ",".join(str(b) for b in p.get("coeff_mod_bit_sizes", [])),
                f"2^{p['global_scale_bits']}" if "global_scale_bits" in p else "", r["created"], kek,
                (r["public_sha256"] or "")[:16], r["unfinished_jobs"])
    console.print(table)
    if stale:
        console.print(cell("the active key's parameters differ from the configured ones (MSGATE_HE__*): the keys "
                           "role makes a new key at its next start; `msgate keys he rotate` does it now",
                           style="yellow"))


def _check_owner(folder: Path) -> None:
    """A key made by another account than the one that owns the CKKS key folder (an operator running
    ``keys he rotate`` as root beside a keys role running as ``msgate``) is a 0600 file the key service
    cannot read: every HE job would fail. Refused before anything is written."""
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    owner, me = probe.stat().st_uid, os.geteuid()
    if owner != me:
        raise ConfigError(f"{probe} belongs to uid {owner}, this command runs as uid {me}: a key made now could "
                          "not be read by the keys role; run it as that account (in compose: `docker compose exec "
                          "keys msgate keys he rotate`)")


@app.command()
def rotate(ctx: typer.Context, json_out: JsonOpt = False) -> None:
    """Make a new CKKS key with the configured parameters and make it active.

    Older keys stay for results in flight until `msgate keys he retire`."""
    st = state(ctx)
    settings = st.settings
    if not settings.he.enabled:
        raise ConfigError("homomorphic mode is off (MSGATE_HE__ENABLED is not set): there is no CKKS key in use "
                          "to rotate")
    keyring.load(settings.keyring_path)  # a missing or unreadable key ring is named first
    check_schema(settings, migrating=False)  # refused before a key is made, not after
    params = settings.he.params()
    _check_owner(_keys(settings.home).dir)
    store = st.store()
    keys = _keys(settings.home, store.ring)
    previous = keys.active_id()
    key_id = keys.rotate(params)
    info = keys.describe(key_id)
    with store.db.session() as session:
        audit.append(session, kind="he_key.rotated", actor=audit.operator(), subject=f"he_key:{key_id}",
                     detail={"previous": previous, "kek_id": info["kek_id"], "public_sha256": info["public_sha256"],
                             **params.to_dict()})
    if json_out:
        print_json({"active": key_id, "previous": previous, "key": {**info, "created": _created(info["created"])}})
        return
    console.print(f"new active CKKS key [bold]{key_id}[/bold]" + (f" (was {previous})" if previous else ""))
    console.print("A running keys role uses it from its next request and workers load its public context when "
                  "they first meet it: no restart needed.")
    if previous:
        console.print(f"Keep {previous} for results in flight; once `msgate keys he list` shows no unfinished jobs "
                      f"on it, run `msgate keys he retire {previous}`.")


@app.command()
def retire(
    ctx: typer.Context,
    key_id: str,
    force: Annotated[bool, typer.Option("--force", help="retire although jobs that used the key are not "
                                                        "finished (their results decrypt only until the keys "
                                                        "role restarts)")] = False,
) -> None:
    """Remove an old, inactive CKKS key's secret and public files."""
    st = state(ctx)
    settings = st.settings
    keys = _keys(settings.home)
    keys.check_retirable(key_id)  # before the jobs are counted: an unknown id or the active key ends here
    store = st.store()  # refuses a database at another schema revision
    with store.db.session() as session:
        using = unfinished_jobs(session, [key_id])[key_id]
    if using and not force:
        shown = ", ".join(using[:SHOWN_JOBS]) + (f" and {len(using) - SHOWN_JOBS} more" if len(using) > SHOWN_JOBS
                                                 else "")
        raise ConfigError(f"CKKS key {key_id} encrypted the inputs of {len(using)} jobs that are not finished "
                          f"({shown}); their results still need it. Wait until they finish (`msgate jobs list`), "
                          "or retire with --force (their results then decrypt only until the keys role restarts)")
    keys.retire(key_id)
    with store.db.session() as session:
        audit.append(session, kind="he_key.retired", actor=audit.operator(), subject=f"he_key:{key_id}",
                     detail={"forced": bool(force and using), "unfinished_jobs": len(using)})
    console.print(f"retired CKKS key {key_id}" + (f" although {len(using)} unfinished jobs used it" if using else ""))
    console.print(cell("Only this host's files are removed: delete the public context on worker hosts that keep "
                       "their own copy. A keys role that already opened the key keeps it in memory until it "
                       "restarts.", style="yellow"))
