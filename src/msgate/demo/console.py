"""The demo's console side: start msgate and the stand-in peers, send the synthetic patients, follow them
live, and print and write what the stand-ins received back. ``msgate demo`` (cli/demo_cmd.py) calls
:func:`run`; it lives here so that every other CLI command starts without the synthetic cohort's imports."""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from rich.live import Live
from rich.markup import escape
from rich.table import Table

from msgate.cli.common import console, say
from msgate.demo import run as demo
from msgate.demo.patients import make_patients
from msgate.demo.peers import MllpStandIn, PacsStandIn
from msgate.demo.report import key_images, write_html
from msgate.errors import MsgateError
from msgate.storage.models import utcnow


def _table(rows: list[demo.Progress], elapsed: float) -> Table:
    table = Table(title=f"msgate demo — {elapsed:.0f} s", title_justify="left")
    table.add_column("patient")
    for stage in demo.STAGES:
        table.add_column(stage, justify="right")
    for row in rows:
        cells = [f"{row.stages[s]:.0f}s" if s in row.stages else ("…" if s != "job" else row.job_state or "…")
                 for s in demo.STAGES]
        table.add_row(row.patient.kind, *cells)
    return table


def run(out: Path, he: bool, patients: int, timeout: float, keep_home: bool, home_dir: Path | None) -> bool:
    """The whole demo; True only if every SR and ORU was acknowledged (and, with ``he``, both say HE)."""
    out.mkdir(parents=True, exist_ok=True)
    if home_dir is not None and home_dir.exists() and any(home_dir.iterdir()):
        raise MsgateError(f"--home {home_dir} is not empty; the demo needs a fresh home")
    home = home_dir or Path(tempfile.mkdtemp(prefix="msgate-demo-"))
    keep_home = keep_home or home_dir is not None
    pacs, mllp = PacsStandIn(out / "pacs"), MllpStandIn(out / "interface-engine")
    pacs.start()
    mllp.start()
    dicom_port, hl7_port = demo.free_port(), demo.free_port()
    system = demo.System(demo.environment(home, pacs, mllp, dicom_port, hl7_port, he), out / "msgate.log")
    console.print(f"msgate home {home}; DICOM 127.0.0.1:{dicom_port} (AE MSGATE); HL7 127.0.0.1:{hl7_port}")
    console.print(f"stand-ins: PACS {pacs.ae_title}@127.0.0.1:{pacs.port}, interface engine 127.0.0.1:{mllp.port}")
    ok = False
    try:
        with ThreadPoolExecutor(1) as pool:
            patients_future = pool.submit(make_patients, out / "patients", count=patients)
            system.start()
            with console.status(f"starting msgate and generating {patients} synthetic patient(s)"):
                system.wait_ports([dicom_port, hl7_port])
                patients = patients_future.result()
        ok = _follow(patients, system, home, pacs, mllp, dicom_port, hl7_port, timeout, out, he)
    finally:
        system.stop()
        pacs.stop()
        mllp.stop()
        if not keep_home:
            shutil.rmtree(home, ignore_errors=True)
    return ok


def _follow(patients: list, system: demo.System, home: Path, pacs: PacsStandIn, mllp: MllpStandIn,  # type: ignore[type-arg]
            dicom_port: int, hl7_port: int, timeout: float, out: Path, he: bool) -> bool:
    rows = [demo.Progress(p) for p in patients]
    t0, t0_wall = time.monotonic(), utcnow()
    for row in rows:
        if not system.alive():
            raise MsgateError(f"msgate stopped while starting; see {out / 'msgate.log'}")
        demo.send_hl7(row.patient, hl7_port)
        row.mark("hl7 acked", time.monotonic() - t0)
        stored = demo.send_dicom(row.patient, dicom_port)
        if stored != len(row.patient.dicom_files):
            row.error = f"{len(row.patient.dicom_files) - stored} instances not stored"
        row.mark("dicom stored", time.monotonic() - t0)
    store = demo.wait_for_store(home)
    done = False
    with Live(_table(rows, 0), console=console, refresh_per_second=2) as live:
        while time.monotonic() - t0 < timeout and system.alive():
            done = demo.poll(store, rows, pacs, mllp, t0, t0_wall)
            live.update(_table(rows, time.monotonic() - t0))
            if done:
                break
            time.sleep(1)
    time.sleep(1)  # let the stand-ins finish writing the last objects
    results = [demo.summary_row(row, pacs, mllp) for row in rows]
    images = key_images(pacs.objects(), out)
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str))
    summary = write_html(results, images, out)
    _print(results)
    store.close()
    all_acked = all(r["sr"]["count"] and r["oru"]["received"] for r in results)
    he_marked = all(r["he"]["sr"] and r["he"]["oru"] for r in results)
    console.print(f"\nsummary: {summary}   results: {out / 'results.json'}   log: {out / 'msgate.log'}")
    if not all_acked:
        console.print("[red]not every SR and ORU was acknowledged[/red]" + ("" if system.alive() else
                      " (msgate stopped; see the log)"))
    if he and not he_marked:
        console.print("[red]HE was on, but not every SR and ORU says so[/red]")
    return bool(done and all_acked and (he_marked or not he))


def _print(results: list[dict]) -> None:  # type: ignore[type-arg]
    console.rule("results, as received back by the stand-in PACS and interface engine")
    for r in results:
        v, t = r["result"], r["truth"]
        console.print(f"[bold]{escape(str(r['subject']))}[/bold] "
                      + escape(f"({r['kind']})   truth: {t['diagnosis']}, EDSS {t['edss']}, "
                               f"{t['lesions']} lesions, {t['rims']} Rim+"))
        if v:
            rim = v.get("rim_count")
            say(f"  EDSS class {v.get('edss_class', '-')} (confidence {v.get('confidence', 0):.2f}, "
                f"estimate {v.get('edss_estimate', 0):.1f})")
            say(f"  {v.get('diagnosis', '-')} (P(MS) {v.get('p_ms', 0):.2f}); "
                f"{int(v.get('lesion_count', 0))} lesions, {v.get('lesion_volume_ml', 0):.2f} mL; "
                f"Rim+ {int(rim) if rim is not None else 'not assessable'}")
        if r["he"]["sr"] or r["he"]["oru"]:
            console.print("  EHR branch under homomorphic encryption (CKKS): said by the "
                          + " and ".join(n for n, k in (("SR", "sr"), ("ORU", "oru")) if r["he"][k]))
        sr = escape(f"{r['sr']['destination']} acked") if r["sr"]["count"] else "[red]SR missing[/red]"
        oru = escape(f"{r['oru']['destination']} acked") if r["oru"]["received"] else "[red]ORU missing[/red]"
        console.print(f"  SR to {sr}; ORU to {oru}")
        stages = ", ".join(f"{k} {v}s" for k, v in r["stages_s"].items())
        error = f"  [red]{escape(str(r['error']))}" if r["error"] else ""
        console.print(escape(f"  timeline: {stages}") + error)
