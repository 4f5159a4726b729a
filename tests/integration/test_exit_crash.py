"""SIGKILL at each step of an exit, restart: exactly one fill per position."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

RUNNER = Path(__file__).with_name("exit_crash_runner.py")


def run_to_completion(state_dir: Path, runner: Path = RUNNER) -> dict[str, object]:
    done = subprocess.run(
        [sys.executable, str(runner), str(state_dir)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    summary: dict[str, object] = json.loads(done.stdout.strip().splitlines()[-1])
    return summary


def kill_when_it_says(argv: list[str], marker: str) -> None:
    """Run `argv` (a runner), SIGKILL it once it prints `marker` (it then waits forever)."""
    proc = subprocess.Popen(
        [sys.executable, *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # blocks until the runner reaches the step
        assert line.strip() == marker, (line, proc.stderr.read() if proc.stderr else "")
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()


def kill_at(state_dir: Path, step: str) -> None:
    kill_when_it_says([str(RUNNER), str(state_dir), "--pause-at", step], f"AT {step}")


def assert_exactly_once(summary: dict[str, object]) -> None:
    assert summary["fills"] == 2
    assert summary["positions"] == {"LONGCO": "closed", "SHORTCO": "closed"}
    exits = summary["exits"]
    assert isinstance(exits, list) and len(exits) == 2
    assert {e["symbol"] for e in exits} == {"LONGCO", "SHORTCO"}
    assert all(e["state"] == "filled" for e in exits)


def test_uninterrupted_run_fills_each_position_once(tmp_path: Path) -> None:
    """Without a crash both positions close with one fill each."""
    assert_exactly_once(run_to_completion(tmp_path))


CRASH_POINTS = ("journalled", "sent", "accepted", "answered", "retrying")


def test_every_crash_point_is_tested() -> None:
    """The steps killed at below are every crash point the executor declares."""
    from tickguard.executor import CRASH_POINTS as declared

    assert declared == CRASH_POINTS


@pytest.mark.parametrize("step", CRASH_POINTS)
def test_sigkill_at_step_then_restart_fills_once(tmp_path: Path, step: str) -> None:
    """Killed at `step`, the restarted process reconciles by client order id: one fill each."""
    kill_at(tmp_path, step)
    summary = run_to_completion(tmp_path)
    assert_exactly_once(summary)
    # A further restart finds nothing left to do and sends nothing more.
    again = run_to_completion(tmp_path)
    assert again["fills"] == 2 and again["exits"] == summary["exits"]


ACCOUNT_RUNNER = Path(__file__).with_name("account_crash_runner.py")


def test_sigkill_between_reading_flat_and_journalling_external(tmp_path: Path) -> None:
    """Killed after the account read flat, before acting: the restart journals one external close
    and sends nothing; a further restart changes nothing."""
    kill_when_it_says([str(ACCOUNT_RUNNER), str(tmp_path), "--pause-after-read"], "AT read")
    for _ in range(2):
        summary = run_to_completion(tmp_path, ACCOUNT_RUNNER)
        assert summary == {
            "fills": 0,
            "external": 1,
            "positions": {"BOSCHLTD": "closed"},
            "net": [],
        }, summary
