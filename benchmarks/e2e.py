"""The tick path end to end (issue 13): the real daemon next to a bare receive loop.

    .venv/bin/python benchmarks/e2e.py [--quick] [--work-dir DIR] [--no-docs] [--json]
                                       [--only SCENARIO ...] [--positions N]

Runs tests/integration/e2e_scenarios.py: the daemon (`tickguard run`, 5,000
symbols subscribed, 1,000 positions guarded), the feed server, the bare loop
and the Upstox order API fake, each its own process on loopback. Prints the
figures as a table: ticks/s of a bare `websockets` + `json.loads` loop and
of tickguard on the same frames, and their ratio, for 1 and 100 ticks per
frame (and for Upstox's protobuf frames); the daemon's RSS and CPU under
1,000 ticks/s; tick-to-order latency under 20,000 ticks/s; start to
READY=1; zombie and black-hole detection against their bounds; socket drop
to the first poll price. A full run then rewrites its section of
docs/benchmarks.md ("The tick path, end to end"); `--quick` (small counts,
short times, every figure, under a minute) proves the benchmark works and
never touches the docs. Figures belong here, never in a timed test.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import math
import os
import platform
import shutil
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

import from_tests  # benchmarks/from_tests.py: run as a script, its folder is on sys.path

DOCS = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"
HEADING = "## The tick path, end to end"
AFTER = "## The tick path\n"  # the section goes right after this one
WIDTH = 76


def machine() -> str:
    """CPU model, cores, memory, Python: what the figures were measured on."""
    model = "unknown CPU"
    memory = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                memory = f", {int(line.split()[1]) / 2**20:.0f} GiB"
                break
    except OSError:
        pass
    return (
        f"{model}, {os.cpu_count()} cores{memory}, Linux {platform.release()},"
        f" Python {platform.python_version()}"
    )


def code_version() -> str:
    """The commit measured, and whether daemon/ had uncommitted changes then."""
    import subprocess

    root = DOCS.parents[1]
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--", "daemon"],
                               capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return "an unknown commit"
    return f"commit {head}" + (" with uncommitted changes in daemon/" if dirty else "")


def section(report: Any, command: str, seconds: float) -> str:
    """The docs section: how it is measured, on what, with which command, and the figures."""
    p = report.params
    t = p["timeouts"]
    intro = [
        f"Measured on: {machine()}; {code_version()}; the whole run took {seconds:.0f} s."
        " The machine is a shared VM: the same run varies from one minute to the next"
        " (the ranges in brackets). A ratio pairs two runs a few seconds apart:"
        " compare those, and read the absolute figures as orders of magnitude.",
        "Every part is its own process on loopback: the daemon (`python -m tickguard"
        f" run`, {p['symbols']:,} symbols subscribed, {p['positions']:,} positions guarded"
        " whose stops, targets and trailing stops the load never crosses, plus"
        f" {len(p['markers'])} marker positions crossed on purpose, one each;"
        f" `ping_interval` {t['ping_interval']:g} s, `ping_timeout` {t['ping_timeout']:g} s,"
        f" `silence_timeout` {t['silence_timeout']:g} s), the feed server, the bare loop,"
        " and for the `json` runs the Upstox order API fake of"
        " tests/integration/test_upstox_broker.py as the broker (`broker.kind ="
        ' "upstox"`, holding every position). The feed encodes a run\'s frames first,'
        " then writes them as raw WebSocket frames in 64 KiB chunks, each once the"
        " kernel took the last: it sends as fast as the connection takes them and"
        " costs next to nothing meanwhile. Times taken in different processes are"
        " CLOCK_MONOTONIC, one clock machine-wide.",
    ]
    bullets = [
        "*ticks/s*: N ticks, then one tick through a marker's stop. Start: the feed's"
        " first write. The bare loop (a plain `websockets` client, `json.loads` per"
        " frame, ticks counted; for Upstox the protobuf runtime's `FeedResponse` parse"
        " and each entry's key, ltp and ltt read, since upb makes a message's Python"
        " objects only when they are read) ends when it has counted them all. The"
        " daemon ends at the"
        " marker's `[SL]` line on its stderr, stamped as it arrives: it judges ticks in"
        " the order they came, so every earlier one was handled."
        ' `tickguard_ticks_total{source="live"}` is scraped before and after each run to'
        " check the count. Runs alternate, bare then tickguard, shape by shape; the"
        " daemon stays connected, idle, while the bare loop runs. Each figure is the"
        f" median of {p['repeats']} runs (Upstox: {p['upstox_repeats']}), their range"
        " in brackets. *ratio*: the median of each round's tickguard / bare. *CPU*:"
        " the consumer's share of one core over the run (the bare loop's"
        " process_time(), the daemon's /proc/PID/stat): near 100% means it, not the"
        " feed, set the pace. The Upstox rows: a second daemon, `feed.protocol ="
        ' "upstox"` on the paper broker, the feed process speaking Upstox V3'
        " (authorize, `market_info`, `initial_feed`, then `live_feed` frames built with"
        " tests/integration/upstox/conftest.py's encoder).",
        "*RSS, CPU*: measured first, before any other load; the feed sends 1 tick per"
        " frame at the rate shown; /proc/PID/status VmRSS every second (the mean;"
        " VmHWM as the peak) and /proc/PID/stat utime + stime over the window (100% ="
        " one core).",
        "*tick to order*: under the background load shown, marker positions are"
        " crossed one after another; from the feed handing the crossing tick to the"
        " kernel to the broker fake's place-order handler starting. It includes the"
        " daemon's pre-send read of the account (`GET"
        " /v2/portfolio/short-term-positions`, every position), split out below.",
        "*start to READY=1*: from spawning the process to the `READY=1` datagram on its"
        " notify socket, with a fresh store.",
        "*zombie*: the server stays connected and answers pings but sends nothing; from"
        " its last frame to the daemon's `[RECONNECT]` line. *black hole*: the server"
        " stops reading its socket (no pong comes back) while still sending ticks; from"
        " then to the `[RECONNECT]` line.",
        "*socket drop to first poll price*: the server aborts the socket (and refuses"
        " reconnects for now); its `feed.fallback_url` answer carries a price through a"
        " marker's stop, so the `[SL] ... via poll` line is the moment the daemon"
        " judged the first poll price.",
    ]
    lines = [HEADING, "", f"    {command}", ""]
    for paragraph in intro:
        lines += [*textwrap.wrap(paragraph, WIDTH, break_on_hyphens=False), ""]
    for bullet in bullets:
        lines += textwrap.wrap(
            bullet, WIDTH, initial_indent="- ", subsequent_indent="  ", break_on_hyphens=False
        )
    return "\n".join([*lines, "", *report.table(), ""])


def update_docs(text: str, path: Path = DOCS) -> None:
    """Replace the section (up to the next `## `), or put it right after "The tick path"."""
    doc = path.read_text()
    start = doc.find(HEADING + "\n")
    if start >= 0:
        end = doc.find("\n## ", start + len(HEADING))
        end = len(doc) if end < 0 else end + 1
    else:
        after = doc.find(AFTER)
        start = doc.find("\n## ", after + len(AFTER)) + 1 if after >= 0 else 0
        if start <= 0:
            start = len(doc)
            text = "\n" + text
        end = start
    path.write_text(doc[:start] + text + ("\n" if end < len(doc) else "") + doc[end:])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="small counts, short times")
    parser.add_argument("--work-dir", type=Path, default=None, help="default: a temporary dir")
    parser.add_argument("--no-docs", action="store_true", help="do not rewrite docs/benchmarks.md")
    parser.add_argument("--json", action="store_true", help="end with the figures as JSON")
    parser.add_argument("--only", action="append", default=[], metavar="SCENARIO",
                        help="run only this scenario (repeatable; implies --no-docs): one of"
                        " resources, throughput, latency, zombie, black_hole, drop, upstox")  # fmt: skip
    parser.add_argument("--positions", type=int, default=None, metavar="N",
                        help="guard N positions instead of 1,000 (implies --no-docs)")  # fmt: skip
    args = parser.parse_args()
    scenario = from_tests.load("e2e_scenarios")
    unknown = set(args.only) - set(scenario.SCENARIOS)
    if unknown:
        parser.error(f"--only: unknown scenario {', '.join(sorted(unknown))}")
    params = scenario.QUICK if args.quick else scenario.FULL
    if args.positions is not None:
        params = dataclasses.replace(params, positions=args.positions)
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="tickguard-e2e-"))
    work.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()

    def progress(message: str) -> None:
        print(f"[{time.monotonic() - started:6.1f}s] {message}", file=sys.stderr, flush=True)

    only = tuple(args.only) or scenario.SCENARIOS
    report = asyncio.run(scenario.run(work, params, progress, only))
    seconds = time.monotonic() - started
    print("\n".join(report.table()), flush=True)
    if args.json:
        figures = {k: (None if math.isnan(v) else v) for k, v in report.figures().items()}
        print(json.dumps({"figures": figures, "failures": report.failures}), flush=True)
    if not args.quick and not args.no_docs and not args.only and args.positions is None:
        update_docs(section(report, ".venv/bin/python benchmarks/e2e.py", seconds))
        print(f"(written to {DOCS})", file=sys.stderr)
    if args.work_dir is None:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if report.failures else 0


if __name__ == "__main__":
    sys.exit(main())
