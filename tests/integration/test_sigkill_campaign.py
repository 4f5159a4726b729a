"""Issue 9: the real daemon SIGKILLed around its exits, restarted on the same store, checked.

The campaign lives in sigkill_campaign.py, runnable on its own (and for longer
from benchmarks/sigkill_campaign.py). Here its budget is
$TICKGUARD_CHAOS_SECONDS (default 60) and its seed $TICKGUARD_CHAOS_SEED
(default: a fresh one, printed in the report). Run with -s to watch the runs.
"""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

CAMPAIGN = Path(__file__).with_name("sigkill_campaign.py")
BUDGET = float(os.environ.get("TICKGUARD_CHAOS_SECONDS") or 60)
RUNS_PER_MINUTE = 8  # fewer within the budget: the campaign is too slow to be worth its time
CLEAN = re.compile(
    r"sigkill campaign: \d+ runs, \d+ kills, 0 stuck exits, 0 duplicate fills,"
    r" 0 positions left unguarded"
)


def run_campaign(work: Path, *args: str, timeout: float) -> tuple[int, str]:
    """Run the campaign in its own process group (ended whole on timeout); (status, report)."""
    proc = subprocess.Popen(
        [sys.executable, str(CAMPAIGN), str(work), *args], start_new_session=True
    )
    try:
        code = proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:  # timed out: its daemon and simulator go with it
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    report = work / "report.txt"
    return code, report.read_text() if report.exists() else "(no report written)"


@pytest.mark.slow
@pytest.mark.timeout(BUDGET + 120)
def test_randomized_sigkill_campaign(tmp_path: Path) -> None:
    """Random SIGKILLs around crossings and closes leave no stuck exit, duplicate fill or unguarded position."""
    seed = os.environ.get("TICKGUARD_CHAOS_SEED") or str(random.SystemRandom().randrange(1 << 32))
    min_runs = max(2, int(RUNS_PER_MINUTE * BUDGET / 60))
    code, report = run_campaign(
        tmp_path, "--seconds", f"{BUDGET:g}", "--min-runs", str(min_runs), "--seed", seed,
        timeout=BUDGET + 90,
    )  # fmt: skip
    assert code == 0, report
    assert CLEAN.match(report), report


@pytest.mark.slow
def test_sigkill_while_sent_before_the_broker_holds_the_order(tmp_path: Path) -> None:
    """Killed while the journal says sent and the broker holds nothing, the restart fills the exit once."""
    code, report = run_campaign(tmp_path, "--kill-in-sent", timeout=90)
    assert code == 0, report
    assert CLEAN.match(report), report
