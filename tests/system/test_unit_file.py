"""systemd/tickguard.service read as a file: its contract settings and its hardening score.

These need no root and no sandbox (only `systemd-analyze`); what the unit
does when it runs is proven under a real systemd in test_package.py.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tickguard import app, http_server

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "systemd" / "tickguard.service"
MAX_EXPOSURE = 1.5
# Directives systemd 252 (Debian 12) rejects.
NEWER_THAN_252 = ("notify-reload", "RestartSteps", "RestartMaxDelaySec", "OpenFile")


def settings() -> dict[str, list[str]]:
    """Every `Key=value` of the unit, values in order of appearance."""
    found: dict[str, list[str]] = {}
    for raw in UNIT.read_text().splitlines():
        line = raw.strip()
        if line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            found.setdefault(key, []).append(value)
    return found


def seconds(value: str) -> float:
    """A systemd time span without units ("30") or in s/min ("1min 30s")."""
    units = {"": 1.0, "s": 1.0, "sec": 1.0, "min": 60.0, "m": 60.0, "ms": 0.001}
    total = 0.0
    for number, unit in re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", value):
        total += float(number) * units[unit]
    return total


def test_contract_settings() -> None:
    """The unit is Type=notify with the watchdog, restart and start-limit policy the issue names."""
    s = settings()
    assert s["Type"] == ["notify"]
    assert s["NotifyAccess"] == ["main"]
    assert s["WatchdogSec"] == ["30"]
    assert s["Restart"] == ["always"]
    assert s["RestartPreventExitStatus"] == ["2"]
    assert "StartLimitIntervalSec" in s
    assert "StartLimitBurst" in s
    assert any("check-config" in v for v in s["ExecStartPre"])
    assert s["DynamicUser"] == ["yes"]
    assert s["StateDirectory"] == ["tickguard"]
    assert s["ConfigurationDirectory"] == ["tickguard"]
    assert any(v.startswith("api-token:") for v in s["LoadCredential"])
    # /proc/stat feeds the process metrics: ProcSubset=pid would hide it.
    assert "ProcSubset" not in s


def test_stop_timeout_exceeds_the_daemon_shutdown() -> None:
    """TimeoutStopSec leaves room for the daemon's own shutdown bounds (exits in flight, API)."""
    shutdown = app.SHUTDOWN_EXIT_WAIT + app.API_SHUTDOWN_TIMEOUT
    assert seconds(settings()["TimeoutStopSec"][0]) >= 2 * max(shutdown, 10.0)


def test_no_directive_newer_than_systemd_252() -> None:
    """Nothing Debian 12's systemd would reject (Type=notify-reload, RestartSteps, ...) is used."""
    text = "\n".join(
        line for line in UNIT.read_text().splitlines() if not line.lstrip().startswith("#")
    )
    assert not [word for word in NEWER_THAN_252 if word in text]


def test_security_exposure_is_at_most_1_5() -> None:
    """`systemd-analyze security --offline=yes` rates the unit 1.5 or better."""
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze not installed (apt-get install systemd)")
    result = subprocess.run(
        ["systemd-analyze", "security", "--offline=yes", "--no-pager", str(UNIT)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    match = re.search(r"Overall exposure level for tickguard\.service: (\d+\.\d+)", result.stdout)
    assert match, result.stdout + result.stderr
    assert float(match[1]) <= MAX_EXPOSURE, result.stdout


def test_descriptor_and_journal_limits() -> None:
    """LimitNOFILE leaves the daemon room beyond the API's cap; the journal's rate limit is explicit."""
    s = settings()
    nofile = int(s["LimitNOFILE"][0])
    assert nofile >= 65536
    limits = http_server.HttpLimits()
    # The API takes at most half; the other half is the feed's, the poll's, the broker's.
    assert limits.connections(nofile) + limits.backlog <= nofile // 2
    assert seconds(s["LogRateLimitIntervalSec"][0]) == 30
    assert int(s["LogRateLimitBurst"][0]) >= 10000


def test_systemd_analyze_verify_accepts_the_unit(tmp_path: Path) -> None:
    """`systemd-analyze verify` (systemd 252 here) knows every directive of the unit."""
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze not installed (apt-get install systemd)")
    # The package's binary is not installed here: point the Exec lines at one that is.
    unit = tmp_path / UNIT.name
    unit.write_text(UNIT.read_text().replace("/opt/tickguard/bin/tickguard", "/bin/true"))
    result = subprocess.run(
        ["systemd-analyze", "verify", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Unknown" not in result.stderr, result.stderr
