"""The API load benchmark of issue 12: what a flood of requests costs the guard.

    .venv/bin/python benchmarks/api_load.py [--requests 1000 4000] [--work-dir DIR]

Runs tests/integration/api_load.py (the real daemon and a load-generator
process, loopback only) once per request count and prints, for each: the
answers and their latency, the daemon's event-loop lag p99 (its lag
histogram), the largest gap between WATCHDOG=1 pings (interval 0.5 s) and how
long after the tick a stop crossed during the burst was decided. The suite
runs the same at 1,000 requests (tests/integration/test_api_load.py) and
asserts the bounds; the figures belong here.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
import tempfile
from pathlib import Path

import from_tests  # benchmarks/from_tests.py: run as a script, its folder is on sys.path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--requests", type=int, nargs="+", default=[1000, 4000])
    parser.add_argument("--positions", type=int, default=50)
    parser.add_argument("--work-dir", type=Path, default=None, help="default: a temporary dir")
    args = parser.parse_args()
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="tickguard-api-load-"))
    scenario = from_tests.load("api_load")
    for run, requests in enumerate(args.requests):
        report = asyncio.run(scenario.run(work / f"{run}-{requests}", requests, args.positions))
        print(f"== {requests} concurrent requests, {args.positions + 1} positions guarded")
        print("\n".join(report.lines()), flush=True)
    if args.work_dir is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
