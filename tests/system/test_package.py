"""The .deb and its unit under a real systemd (PID 1 of a throw-away namespace, see sandbox.py).

One sandbox for the module, the package installed with `dpkg -i`; the tests
then walk a VM admin's path: a fresh install is neither enabled nor
started; a missing or broken config fails the unit without a restart loop;
configured, it reaches READY with a STATUS= line and answers /healthz; the
LoadCredential token is the API's; the hardening holds at run time;
systemd's watchdog kills and restarts a frozen daemon; stop is clean; an
upgrade keeps the edited config; remove stops it and purge removes the state.

The feed is the built-in simulator, run inside as a transient unit: the
sandbox has loopback only, and every config here sets no public resolvers.
Each test writes the config it needs; they run in file order, so the
shipped-config case sees the config as installed and remove/purge comes last.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from typing import Any

import pytest

pytestmark = pytest.mark.slow

UNIT = "tickguard.service"
CONFIG = "/etc/tickguard/config.toml"
TOKEN_FILE = "/etc/credstore/tickguard.api-token"
DROP_IN = "/etc/systemd/system/tickguard.service.d/test.conf"
STATE = "/var/lib/private/tickguard"  # where DynamicUser keeps StateDirectory=
API = "http://127.0.0.1:8000"
SIM_PORT = 8765
SYMBOLS = ("BOSCHLTD", "ADANIENT")  # the simulator's first two
TOKEN = "sandbox-token-5f0c9a1e"
WAIT = 30.0  # seconds for any state change asserted below

CONFIGURED = f"""\
[http]
listen = "127.0.0.1:8000"

[feed]
url = "ws://127.0.0.1:{SIM_PORT}/ws"
symbols = {json.dumps(list(SYMBOLS))}

[dns]
fallback_servers = []

[guard]
sweep_interval = 0.2

[market]
always_open = true
"""
# Valid TOML, one bad value: the message must name the key and the value.
BROKEN = CONFIGURED.replace("[guard]\n", '[guard]\nblind_policy = "panic"\n')

# Inside the sandbox: METHOD URL [TOKEN [JSON]] -> the status code, then the body.
HTTP = r"""
import sys, urllib.error, urllib.request
method, url = sys.argv[1:3]
token = sys.argv[3] if len(sys.argv) > 3 else ""
body = sys.argv[4].encode() if len(sys.argv) > 4 else None
req = urllib.request.Request(url, data=body, method=method)
req.add_header("Content-Type", "application/json")
if token:
    req.add_header("Authorization", "Bearer " + token)
try:
    with urllib.request.urlopen(req, timeout=10) as r:
        print(r.status); print(r.read().decode())
except urllib.error.HTTPError as e:
    print(e.code); print(e.read().decode())
"""


def http(box: Any, method: str, path: str, token: str = "", body: object = None) -> tuple[int, str]:
    """An HTTP request to the API from inside the sandbox: (status, body)."""
    args = [method, API + path, token] + ([json.dumps(body)] if body is not None else [])
    out = box.run("/usr/bin/python3", "-c", HTTP, *args).stdout
    status, _, text = out.partition("\n")
    return int(status), text


def wait_for(what: str, probe: Callable[[], bool], timeout: float = WAIT) -> None:
    """Poll `probe` until it holds; fail naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not probe():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.1)


def state(box: Any) -> dict[str, str]:
    """The unit's run-time properties the tests look at."""
    return box.show(
        UNIT,
        "ActiveState",
        "SubState",
        "Result",
        "NRestarts",
        "MainPID",
        "ExecMainCode",
        "ExecMainStatus",
        "StatusText",
    )


def configure(box: Any, toml: str = CONFIGURED, token: str | None = TOKEN) -> None:
    """What the admin does: write the config and the API token credential."""
    box.write(CONFIG, toml, 0o644)
    if token is None:
        box.run("rm", "-f", TOKEN_FILE)
    else:
        box.run("install", "-d", "-m", "0700", "/etc/credstore")
        box.write(TOKEN_FILE, token + "\n", 0o600)


def start(box: Any) -> dict[str, str]:
    """(Re)start the unit, which returns once READY=1 came; then its properties."""
    box.run("systemctl", "reset-failed", UNIT, check=False)
    box.run("systemctl", "restart", UNIT, timeout=WAIT + 60)
    return state(box)


@pytest.fixture(scope="module")
def box(installed: Any) -> Any:
    """The sandbox with the package installed and the feed simulator running inside."""
    installed.run(
        "systemd-run",
        "--unit=feed-sim",
        "--property=DynamicUser=yes",
        "/opt/tickguard/bin/tickguard",
        *("simulate", "--listen", f"127.0.0.1:{SIM_PORT}", "--symbols", "4", "--seed", "1"),
    )
    wait_for(
        "the simulator to listen",
        lambda: "[SIM] listening" in installed.journal("feed-sim.service"),
    )
    return installed


def test_fresh_install_is_neither_enabled_nor_started(box: Any) -> None:
    """dpkg -i registers the unit and the conffile, and leaves the service disabled and stopped."""
    assert box.run("systemctl", "is-enabled", UNIT, check=False).stdout.strip() == "disabled"
    assert box.run("systemctl", "is-active", UNIT, check=False).stdout.strip() == "inactive"
    assert box.show(UNIT, "FragmentPath")["FragmentPath"] == "/lib/systemd/system/tickguard.service"
    conffiles = box.run("dpkg-query", "-W", "-f=${Conffiles}", "tickguard").stdout
    assert CONFIG in conffiles
    assert box.run("tickguard", "--version").stdout.startswith("tickguard ")


def test_installed_unit_verifies_without_output(box: Any) -> None:
    """`systemd-analyze verify` on the installed unit prints nothing at all (warnings included)."""
    result = box.run(
        "systemd-analyze",
        "verify",
        "/lib/systemd/system/tickguard.service",
        check=False,
        env={"SYSTEMD_UNIT_PATH": box.unit_path},
    )
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


@pytest.mark.parametrize(
    ("config", "journal_line"),
    [
        pytest.param(None, "feed.url: '' is invalid", id="shipped-unconfigured"),
        pytest.param(BROKEN, "guard.blind_policy: 'panic'", id="bad-value"),
    ],
)
def test_bad_config_fails_once_with_a_clear_journal_line(
    box: Any, config: str | None, journal_line: str
) -> None:
    """A shipped (no feed.url) or broken config: start fails, the journal names the key, no restart."""
    if config is not None:
        box.write(CONFIG, config)
    cursor = box.journal_cursor()
    result = box.run("systemctl", "start", UNIT, check=False, timeout=WAIT + 60)
    assert result.returncode != 0
    journal = box.journal(UNIT, since_cursor=cursor)
    assert journal_line in journal
    # check-config (ExecStartPre) said it first, then `run` exited 2.
    assert journal.index(journal_line) < journal.index("invalid configuration")
    s = state(box)
    assert (s["ActiveState"], s["Result"], s["ExecMainStatus"]) == ("failed", "exit-code", "2")
    time.sleep(3)  # past RestartSec=2: a scheduled restart would have happened
    s = state(box)
    assert (s["ActiveState"], s["NRestarts"]) == ("failed", "0")
    assert "Scheduled restart job" not in box.journal(UNIT, since_cursor=cursor)
    box.run("systemctl", "reset-failed", UNIT)


def test_configured_service_is_ready_with_status_and_healthz(box: Any) -> None:
    """Configured, `enable --now` reaches READY (active/running), shows STATUS= and serves /healthz."""
    configure(box)
    box.run("systemctl", "enable", "--now", UNIT, timeout=WAIT + 60)  # returns after READY=1
    assert box.run("systemctl", "is-enabled", UNIT).stdout.strip() == "enabled"
    s = state(box)
    assert (s["ActiveState"], s["SubState"]) == ("active", "running")
    assert s["StatusText"]
    status = box.run("systemctl", "status", "--no-pager", UNIT, check=False).stdout
    assert re.search(r'^\s+Status: ".*positions guarded', status, re.MULTILINE), status
    assert http(box, "GET", "/healthz")[0] == 200
    # Process metrics read /proc/stat (boot time): the unit must not hide it.
    code, metrics = http(box, "GET", "/metrics")
    assert code == 200
    assert re.search(r"^process_start_time_seconds [0-9.e+]+$", metrics, re.MULTILINE), metrics
    wait_for(
        "`tickguard status` to report healthy (exit 0)",
        lambda: box.run("tickguard", "status", check=False).returncode == 0,
    )


def test_api_accepts_the_loadcredential_token(box: Any) -> None:
    """The token handed over with LoadCredential= is the one the API accepts; others are refused."""
    configure(box, token=TOKEN)
    start(box)
    position = {"symbol": SYMBOLS[0], "side": "long", "quantity": 1, "entry_price": 100.0}
    assert http(box, "POST", "/api/v1/positions", "wrong-token", position)[0] == 401
    assert http(box, "POST", "/api/v1/positions", "", position)[0] == 401
    code, body = http(box, "POST", "/api/v1/positions", TOKEN, position)
    assert code == 201, body
    assert http(box, "DELETE", f"/api/v1/positions/{SYMBOLS[0]}", TOKEN)[0] in (200, 204)
    # The service reads its copy, not the root-only source file.
    pid = state(box)["MainPID"]
    assert box.run("ls", f"/proc/{pid}/root/run/credentials/{UNIT}/").stdout.split() == [
        "api-token"
    ]


def test_hardening_holds_at_run_time(box: Any) -> None:
    """The running daemon has no capabilities, a seccomp filter, a read-only /etc and a writable state dir."""
    configure(box)
    pid = start(box)["MainPID"]
    status = dict(
        line.split(":", 1) for line in box.read(f"/proc/{pid}/status").splitlines() if ":" in line
    )
    for cap in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
        assert int(status[cap].strip(), 16) == 0, (cap, status[cap])
    assert status["NoNewPrivs"].strip() == "1"
    assert status["Seccomp"].strip() == "2"
    uid = status["Uid"].split()[0]
    gid = status["Gid"].split()[0]
    assert uid != "0"

    def in_service_mounts(script: str, *, as_service: bool) -> Any:
        """Run `script` in the service's mount namespace, as root or as the service's user."""
        user = ("setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups")
        return box.run(
            *("nsenter", "-t", pid, "-m"),
            *(user if as_service else ()),
            *("sh", "-c", script),
            check=False,
        )

    # Read-only mounts: even root, in the service's view, cannot write there.
    for path in ("/etc/tickguard", "/etc", "/opt/tickguard", "/usr"):
        denied = in_service_mounts(f"touch {path}/probe", as_service=False)
        assert "Read-only file system" in denied.stderr, (path, denied)
    allowed = in_service_mounts(
        "touch /var/lib/tickguard/probe && rm /var/lib/tickguard/probe && echo ok",
        as_service=True,
    )
    assert allowed.stdout.strip() == "ok", allowed.stderr
    # The store is in the state dir, owned by the service's (dynamic) user.
    files = box.run("find", STATE, "-user", uid, "-type", "f").stdout.split()
    assert files, box.run("ls", "-la", STATE, check=False).stdout


def test_watchdog_kills_and_restarts_a_frozen_daemon(box: Any) -> None:
    """SIGSTOP on the main process: the watchdog (shortened by a drop-in) kills it and systemd restarts it."""
    configure(box)
    box.write(DROP_IN, "[Service]\nWatchdogSec=3\nTimeoutAbortSec=2\n")
    box.run("systemctl", "daemon-reload")
    try:
        s = start(box)
        assert s["NRestarts"] == "0"
        frozen = s["MainPID"]
        time.sleep(4)  # longer than WatchdogSec: the pings keep it alive while it runs
        assert state(box)["MainPID"] == frozen
        pings = re.search(
            r"^tickguard_watchdog_pings_total (\S+)$", http(box, "GET", "/metrics")[1], re.M
        )
        assert pings and float(pings[1]) >= 2
        cursor = box.journal_cursor()
        box.run("kill", "-STOP", frozen)

        def restarted() -> bool:
            now = state(box)
            return (
                now["NRestarts"] == "1"
                and now["ActiveState"] == "active"
                and (now["MainPID"] not in ("0", frozen))
            )

        wait_for("the watchdog restart", restarted)
        assert "Watchdog timeout" in box.journal(UNIT, since_cursor=cursor)
        assert box.run("kill", "-0", frozen, check=False).returncode != 0  # gone, not resumed
        wait_for("/healthz after the restart", lambda: http(box, "GET", "/healthz")[0] == 200)
    finally:
        box.run("rm", "-f", DROP_IN)
        box.run("systemctl", "daemon-reload")


def test_stop_is_clean_and_quick(box: Any) -> None:
    """systemctl stop: the daemon exits 0 on SIGTERM well within TimeoutStopSec."""
    configure(box)
    start(box)
    began = time.monotonic()
    box.run("systemctl", "stop", UNIT, timeout=WAIT + 30)
    took = time.monotonic() - began
    s = state(box)
    assert (s["ActiveState"], s["Result"], s["ExecMainStatus"]) == ("inactive", "success", "0")
    assert took < 10.0


def test_upgrade_keeps_the_config_and_restarts_a_running_service(box: Any) -> None:
    """Installing the package again keeps the edited conffile and restarts the running daemon."""
    configure(box)
    before = start(box)["MainPID"]
    enabled = box.run("systemctl", "is-enabled", UNIT, check=False).stdout
    box.run("dpkg", "-i", str(box.share / next(p.name for p in box.share.glob("*.deb"))))
    assert box.read(CONFIG) == CONFIGURED
    s = state(box)
    assert s["ActiveState"] == "active"
    assert s["MainPID"] not in ("0", before)
    assert box.run("systemctl", "is-enabled", UNIT, check=False).stdout == enabled


def test_remove_stops_and_purge_removes_state(box: Any) -> None:
    """dpkg -r stops the service and keeps config and state; dpkg -P removes them and the token."""
    configure(box)
    box.run("systemctl", "enable", UNIT)
    start(box)
    box.run("dpkg", "-r", "tickguard")
    assert box.run("systemctl", "is-active", UNIT, check=False).stdout.strip() != "active"
    assert box.run("pgrep", "-f", "tickguard run", check=False).returncode == 1
    kept = box.run("ls", CONFIG, STATE, TOKEN_FILE, check=False)
    assert kept.returncode == 0, kept.stderr
    leftover = box.run("find", "/opt/tickguard", "/usr/bin/tickguard", check=False).stdout
    assert leftover == "", leftover  # the program is gone with the package
    box.run("dpkg", "-P", "tickguard")
    for gone in (CONFIG, STATE, "/var/lib/tickguard", TOKEN_FILE, "/opt/tickguard"):
        assert box.run("test", "-e", gone, check=False).returncode != 0, gone
    wants = "/etc/systemd/system/multi-user.target.wants/tickguard.service"
    assert box.run("test", "-L", wants, check=False).returncode != 0
