"""Issue 13: the end-to-end benchmark runs, and prints every figure.

`benchmarks/e2e.py --quick` runs the scenarios of e2e_scenarios.py at small
counts and short times: the real daemon, the feed server, the bare loop and
the Upstox order API fake, each its own process on loopback. This test only
proves that it completes and prints each figure as a number; it asserts no
timing bound, since the figures belong in docs/benchmarks.md, not in a timed
test.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BENCHMARK = ROOT / "benchmarks" / "e2e.py"
TIMEOUT = 400.0  # the quick run takes under a minute on an idle machine

SHAPES = ("json_1", "json_100", "upstox_1", "upstox_100")
FIGURES = (
    *(f"{kind}_{shape}" for shape in SHAPES for kind in ("bare", "tickguard", "ratio")),
    "rss_mib",
    "rss_peak_mib",
    "cpu_percent",
    "latency_p50_ms",
    "latency_p99_ms",
    "ready_seconds",
    "zombie_seconds",
    "black_hole_seconds",
    "drop_to_poll_price_ms",
)


@pytest.mark.slow
@pytest.mark.timeout(TIMEOUT + 30)
def test_the_quick_benchmark_prints_every_figure(tmp_path: Path) -> None:
    docs = (ROOT / "docs" / "benchmarks.md").read_text()
    done = subprocess.run(
        [sys.executable, str(BENCHMARK), "--quick", "--json", "--work-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )
    print(done.stdout)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    *table, last = done.stdout.strip().splitlines()
    result = json.loads(last)
    assert result["failures"] == {}, result["failures"]
    figures = result["figures"]
    missing = [name for name in FIGURES if not _number(figures.get(name))]
    assert not missing, (missing, figures)
    assert any(line.startswith("| json | 1 tick |") for line in table), table
    assert (ROOT / "docs" / "benchmarks.md").read_text() == docs  # --quick never writes


def _number(value: object) -> bool:
    return isinstance(value, int | float) and math.isfinite(value) and value > 0
