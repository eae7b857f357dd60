"""HL7 feed benchmark: msgate (durable storage) vs a python-hl7 parse+ACK server and hl7apy's MLLPServer.

Each server runs in its own process; an asyncio client sends a ~2 KB ORU^R01 (a new control id, a new
observation time each) and waits for each ACK, over 1 and 8 connections, for a fixed time; then paced
runs at 200 msg/s measure p99 ACK latency on the same msgate server (its indexer still working through
what the unpaced runs left), and again on a fresh server (steady state at that load). A sustained phase on a fresh msgate server offers 300 ORU/s for twice the
run time and measures how fast they end up mapped (the indexer process keeping up, end to end); the
mapping path alone (``map_messages``, batches of 64) is timed offline, for new and for known patients.
Medians over the runs; ratios are taken within the same run; the load average is printed with each run.
Usage: ``.venv/bin/python bench/hl7_feed.py [--seconds 5] [--runs 3] [--write]``
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import multiprocessing as mp
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

SB, END = b"\x0b", b"\x1c\x0d"


def oru(i: int) -> bytes:
    """~2 KB ORU^R01 like the peer baseline's (2,068 B): 12 NM OBX, a report, a comment, an NTE."""
    when = f"2025{1 + i // 40000 % 12:02d}{1 + i // 1440 % 28:02d}{i // 60 % 24:02d}{i % 60:02d}00"
    obx = "".join(f"OBX|{n}|NM|{2000 + n}-{n}^Analyte {n}^LN||{4.5 + n / 10:.2f}|10*9/L|3.5-11.0|N|||F|||{when}|"
                  f"LAB^Central lab|1234^SMITH^JOHN|AUTO^Automated count^99LAB\r" for n in range(1, 13))
    text = (f"MSH|^~\\&|LAB|HOSP|MSGATE|MSGATE|20250101120000||ORU^R01^ORU_R01|BENCH{i:08d}|P|2.5.1\r"
            f"PID|1||MRN{i % 500:05d}^^^HOSP^MR||DOE^JANE^Q||19800101|F|||1 Main St^^Town^ST^12345\r"
            "PD1|||Clinic^^123\rPV1|1|O|CLINIC^^^HOSP||||1234^SMITH^JOHN\r"
            f"ORC|RE|PL{i}|FI{i}\rOBR|1|PL{i}|FI{i}|57021-8^CBC W Auto Differential panel^LN|||{when}\r"
            + obx + "OBX|13|FT|18748-4^Report^LN||Blood counts within normal limits.\\.br\\No action.||||||F\r"
            "OBX|14|ST|8251-1^Comment^LN||hemolysed: no||||||F\rNTE|1||Specimen received in good condition.\r")
    return text.encode()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def serve_msgate(port: int, home: str, ready: mp.Event) -> None:  # type: ignore[valid-type]
    import logging

    from msgate.config import load_settings
    from msgate.hl7.server import Hl7Server
    from msgate.storage.store import open_store

    logging.disable(logging.INFO)
    store = open_store(load_settings(home=Path(home), storage={"min_free_bytes": 0}, hl7={"port": port},
                                     log_level="WARNING"))

    async def main() -> None:
        await Hl7Server(store).start()
        gc.freeze()  # as msgate.hl7.server.run does
        ready.set()  # type: ignore[attr-defined]
        await asyncio.Event().wait()

    asyncio.run(main())


def serve_python_hl7(port: int, ready: mp.Event) -> None:  # type: ignore[valid-type]
    import hl7

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        buf = b""
        while data := await reader.read(65536):
            buf += data
            while (end := buf.find(END)) >= 0:
                frame, buf = buf[buf.find(SB) + 1:end], buf[end + 2:]
                msg = hl7.parse(frame.decode())
                writer.write(SB + str(msg.create_ack()).encode() + END)
            await writer.drain()

    async def main() -> None:
        await asyncio.start_server(handle, "127.0.0.1", port)
        ready.set()  # type: ignore[attr-defined]
        await asyncio.Event().wait()

    asyncio.run(main())


def serve_hl7apy(port: int, ready: mp.Event) -> None:  # type: ignore[valid-type]
    from hl7apy.core import Message
    from hl7apy.mllp import AbstractHandler, MLLPServer
    from hl7apy.parser import parse_message

    class Handler(AbstractHandler):  # type: ignore[misc]
        def reply(self) -> str:
            msg = parse_message(self.incoming_message, find_groups=True)
            ack = Message("ACK", version="2.5.1")
            ack.msa.msa_1 = "AA"
            ack.msa.msa_2 = msg.msh.msh_10.value
            return str(ack.to_mllp())

    server = MLLPServer("127.0.0.1", port, handlers={"ORU^R01^ORU_R01": (Handler,)}, timeout=10)
    ready.set()  # type: ignore[attr-defined]
    server.serve_forever()


async def _conn(port: int, stop_at: float, lat: list[float], base: int, reconnect: bool, rate: float) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    i, start = 0, time.perf_counter()
    while time.perf_counter() < stop_at:
        if rate:
            await asyncio.sleep(max(0.0, start + i / rate - time.perf_counter()))
        payload = SB + oru(base + i) + END
        t0 = time.perf_counter()
        writer.write(payload)
        await writer.drain()
        ack = await reader.readuntil(END)
        lat.append(time.perf_counter() - t0)
        assert b"MSA|AA" in ack or b"MSA|CA" in ack, ack[:200]
        i += 1
        if reconnect:
            writer.close()
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.close()


def load(port: int, conns: int, seconds: float, *, reconnect: bool = False, rate: float = 0.0,
         base: int = 0) -> dict[str, float]:
    lat: list[float] = []

    async def main() -> None:
        stop_at = time.perf_counter() + seconds
        await asyncio.gather(*(_conn(port, stop_at, lat, base + c * 1_000_000, reconnect, rate / conns if rate else 0)
                               for c in range(conns)))

    t0 = time.perf_counter()
    asyncio.run(main())
    wall = time.perf_counter() - t0
    lat.sort()
    return {"msgs": len(lat), "rate": len(lat) / wall, "p50": lat[len(lat) // 2] * 1000,
            "p99": lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1000}


def start(target, *args):  # type: ignore[no-untyped-def]
    ready = mp.Event()
    proc = mp.Process(target=target, args=(*args, ready), daemon=True)
    proc.start()
    assert ready.wait(60)
    return proc


def mapping_rate(count: int = 640) -> dict[str, float]:
    """``map_messages`` alone, batches of 64, raw bytes handed over (as the indexer does): ``new`` ORUs
    create their patients (500 MRNs), ``known`` ORUs (new results) find them. ORU/s wall and CPU ms/ORU."""
    import logging

    from msgate.config import load_settings
    from msgate.hl7.mapping import map_messages
    from msgate.hl7.msh import read_msh
    from msgate.storage.store import open_store

    logging.disable(logging.INFO)
    store = open_store(load_settings(home=Path(tempfile.mkdtemp()), storage={"min_free_bytes": 0}))
    out: dict[str, float] = {}
    for name, first in (("new", 8_000_000), ("known", 9_000_000)):
        items = [(oru(first + i), read_msh(oru(first + i)).header()) for i in range(count)]
        ids = [s.message_id for k in range(0, count, 64) for s in store.ingest.store_hl7_batch(items[k:k + 64])]
        raws = {mid: raw for mid, (raw, _) in zip(ids, items, strict=True)}
        t0, c0 = time.perf_counter(), time.process_time()
        for k in range(0, count, 64):
            map_messages(store, ids[k:k + 64], raws=raws)
        out[name] = count / (time.perf_counter() - t0)
        out[f"{name}_cpu_ms"] = (time.process_time() - c0) / count * 1000
    store.close()
    return out


def sustained(seconds: float, rate: float = 300.0, conns: int = 4) -> dict[str, float]:
    """A fresh msgate server offered ``rate`` ORU/s: ACK latency, and the rate at which they are mapped
    (all messages / time from the first send until the last one is mapped)."""
    import logging

    from sqlmodel import func, select

    from msgate.config import load_settings
    from msgate.storage.models import Hl7Message
    from msgate.storage.store import open_store

    logging.disable(logging.INFO)
    home, port = tempfile.mkdtemp(), _free_port()
    proc = start(serve_msgate, port, home)
    try:
        started = time.perf_counter()
        result = load(port, conns, seconds, rate=rate, base=700_000_000)
        store = open_store(load_settings(home=Path(home), storage={"min_free_bytes": 0}), migrate=False)
        deadline, mapped = time.perf_counter() + 300, 0
        while time.perf_counter() < deadline:
            with store.db.session() as session:
                mapped = session.exec(select(func.count()).select_from(Hl7Message)
                                      .where(Hl7Message.mapping_state != "pending")).one()
            if mapped >= result["msgs"]:
                break
            time.sleep(0.1)
        store.close()
        result["mapped_rate"] = mapped / (time.perf_counter() - started)
        result["lag_s"] = time.perf_counter() - started - seconds
    finally:
        proc.kill()
    return result


def fresh_paced(seconds: float, run: int, rate: float = 200.0) -> dict[int, dict[str, float]]:
    """200 msg/s offered to a fresh server (1, then 8 connections): the ACK latency at that load in steady
    state. The ``paced200`` rows above run on the server that has just taken the unpaced bursts (~20,000
    messages), while its indexer is still mapping them: the latency at 200 msg/s during that catch-up."""
    home, port = tempfile.mkdtemp(), _free_port()
    proc = start(serve_msgate, port, home)
    try:
        return {conns: load(port, conns, seconds, rate=rate, base=run * 10_000_000 + 600_000_000 + conns * 1_000_000)
                for conns in (1, 8)}
    finally:
        proc.kill()


def loadavg() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--write", action="store_true")
    args = ap.parse_args()
    rows: dict[str, list[dict[str, float]]] = {}
    loads: list[str] = []
    for run in range(args.runs):
        loads.append(loadavg())
        ports = {name: _free_port() for name in ("msgate", "python-hl7", "hl7apy")}
        procs = [start(serve_msgate, ports["msgate"], tempfile.mkdtemp()),
                 start(serve_python_hl7, ports["python-hl7"]), start(serve_hl7apy, ports["hl7apy"])]
        try:
            for conns in (1, 8):
                for name in ("msgate", "python-hl7"):
                    rows.setdefault(f"{name} c{conns}", []).append(
                        load(ports[name], conns, args.seconds, base=run * 10_000_000 + conns * 100_000_000))
                rows.setdefault(f"hl7apy c{conns}", []).append(
                    load(ports["hl7apy"], conns, args.seconds, reconnect=True, base=run * 10_000_000))
            rows.setdefault("msgate paced200 c1", []).append(
                load(ports["msgate"], 1, args.seconds, rate=200, base=run * 10_000_000 + 900_000_000))
            rows.setdefault("msgate paced200 c8", []).append(
                load(ports["msgate"], 8, args.seconds, rate=200, base=run * 10_000_000 + 950_000_000))
        finally:
            for proc in procs:
                proc.kill()
        for key in [k for k in rows if k.startswith("msgate c")]:
            other = rows[key.replace("msgate", "python-hl7")][-1]
            rows[key][-1]["ratio"] = rows[key][-1]["rate"] / other["rate"]
        rows.setdefault("msgate sustained300 c4", []).append(sustained(args.seconds * 2))
        for conns, result in fresh_paced(args.seconds, run).items():
            rows.setdefault(f"msgate paced200-fresh c{conns}", []).append(result)
        loads[-1] += f" -> {loadavg()}"
        print(f"run {run + 1} (load {loads[-1]}): " + ", ".join(f"{k}={v[-1]['rate']:.0f}/s p99={v[-1]['p99']:.1f}ms"
                                                           for k, v in rows.items()), flush=True)
    maps = [mapping_rate() for _ in range(args.runs)]
    table = _table(rows, maps, loads)
    print(table)
    if args.write:
        write_results(table, args)


def _table(rows: dict[str, list[dict[str, float]]], maps: list[dict[str, float]], loads: list[str]) -> str:
    lines = ["| server | conns / load | msg/s | p50 ms | p99 ms | × python-hl7 (same run) |", "|---|---|---|---|---|---|"]
    for key, vals in rows.items():
        med = {m: statistics.median(v[m] for v in vals) for m in ("rate", "p50", "p99")}
        ratio = statistics.median(v["ratio"] for v in vals) if "ratio" in vals[0] else None
        name, load_desc = key.rsplit(" ", 1)
        lines.append(f"| {name} | {load_desc} | {med['rate']:.0f} | {med['p50']:.2f} | {med['p99']:.2f} | "
                     f"{'' if ratio is None else f'{ratio:.2f}'} |")
    p99s = {k: ", ".join(f"{v['p99']:.1f}" for v in vals) for k, vals in rows.items() if "paced" in k or "sust" in k}
    sus = rows.get("msgate sustained300 c4", [])
    lines.append("\np99 per run (ms): " + "; ".join(f"{k}: {v}" for k, v in p99s.items()))
    if sus:
        mapped = [v["mapped_rate"] for v in sus]
        lines.append(f"\nSustained 300 ORU/s offered (fresh server, 4 connections): mapped end to end at "
                     f"**{statistics.median(mapped):.0f} ORU/s** (runs: {', '.join(f'{m:.0f}' for m in mapped)}; "
                     f"last one mapped {statistics.median(v['lag_s'] for v in sus):.1f} s after the last send)")
    for kind in ("new", "known"):
        lines.append(f"\nMapping path alone (map_messages, batches of 64, {kind} patients): "
                     f"**{statistics.median(m[kind] for m in maps):.0f} ORU/s** wall (runs: "
                     f"{', '.join(f'{m[kind]:.0f}' for m in maps)}), "
                     f"{statistics.median(m[kind + '_cpu_ms'] for m in maps):.2f} ms CPU per ORU")
    lines.append("\nLoad average (1/5/15 min) at the start -> end of each run: " + "; ".join(loads))
    return "\n".join(lines)


def write_results(table: str, args: argparse.Namespace) -> None:
    path = Path(__file__).with_name("RESULTS.md")
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    section = (f"## HL7 feed\n\n`bench/hl7_feed.py --seconds {args.seconds:g} --runs {args.runs}`, {time.strftime('%Y-%m-%d')}, "
               f"2-vCPU shared VM; ~2 KB ORU^R01 (14 OBX), one ACK per message; medians of {args.runs} runs. "
               "hl7apy's MLLPServer serves one message per connection, so its client reconnects per message. "
               "paced200 = 200 msg/s offered in total.\n\n" + table + "\n")
    start_at = text.find("## HL7 feed")
    if start_at >= 0:
        end = text.find("\n## ", start_at + 5)
        text = text[:start_at] + section + (text[end + 1:] if end >= 0 else "")
    else:
        text = text.rstrip() + "\n\n" + section
    path.write_text(text)


if __name__ == "__main__":
    sys.exit(main())
