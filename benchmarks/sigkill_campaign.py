"""The SIGKILL campaign of issue 9 on a longer budget: exactly-once exits under random kills.

    .venv/bin/python benchmarks/sigkill_campaign.py [--seconds 600] [--seed S] [--work-dir DIR]

Runs the campaign the suite runs for about 60 s
(tests/integration/sigkill_campaign.py: the real daemon and simulator as
subprocesses, loopback only) for `--seconds`, printing a line per run and the
report `sigkill campaign: N runs, K kills, 0 stuck exits, 0 duplicate fills,
0 positions left unguarded (seed S)`. Exit status 0 when every invariant held.
The work dir (default: a new temporary one) keeps the logs of failed runs and
report.txt; it is removed afterwards when it was temporary and all went well.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import from_tests  # benchmarks/from_tests.py: run as a script, its folder is on sys.path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--seconds", type=float, default=600.0, help="wall-time budget")
    parser.add_argument("--seed", type=int, default=None, help="default: a fresh one, printed")
    parser.add_argument("--min-runs", type=int, default=1)
    parser.add_argument("--work-dir", type=Path, default=None, help="default: a temporary dir")
    args = parser.parse_args()
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="tickguard-sigkill-"))
    argv = [str(work), "--seconds", f"{args.seconds:g}", "--min-runs", str(args.min_runs)]
    if args.seed is not None:
        argv += ["--seed", str(args.seed)]
    code: int = from_tests.load("sigkill_campaign").main(argv)
    if code == 0 and args.work_dir is None:
        shutil.rmtree(work, ignore_errors=True)
    else:
        print(f"logs and report: {work}")
    return code


if __name__ == "__main__":
    sys.exit(main())
