"""Issue 12: a burst of 1,000 concurrent API requests must not hurt the guard.

The scenario lives in api_load.py (the real daemon and the load generator as
subprocesses, loopback only; benchmarks/api_load.py runs it at 4,000). During
the burst, mixed over connection-health, /metrics and /api/v1/positions:

- the daemon's event-loop lag p99 stays at or below 50 ms;
- its WATCHDOG=1 pings keep their cadence: no gap reaches WATCHDOG_USEC,
  after which systemd would kill it;
- a stop crossed during the burst is decided within 100 ms of the tick.

These are the issue's bounds, read from the daemon's own evidence (its lag
histogram, its notify datagrams, its journal), not from timing in this test.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCENARIO = Path(__file__).with_name("api_load.py")
REQUESTS = 1000
TIMEOUT = 240.0


def test_a_burst_of_requests_does_not_hurt_the_guard(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(SCENARIO), str(tmp_path), "--requests", str(REQUESTS), "--json"],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    *lines, last = done.stdout.strip().splitlines()
    print("\n".join(lines))
    report = json.loads(last)
    log = (tmp_path / "daemon.log").read_text()
    answered = sum(report["statuses"].values())
    assert answered + sum(report["failures"].values()) == REQUESTS
    assert set(report["statuses"]) <= {"200", "503"}, report["statuses"]
    assert report["lag_samples"] >= 10, report
    assert report["lag_p99"] <= 0.05, lines
    assert report["watchdog_max_gap"] < 2 * report["watchdog_interval"], lines
    assert report["decided_after"] is not None, log[-3000:]
    assert report["decided_after"] <= 0.1, lines
