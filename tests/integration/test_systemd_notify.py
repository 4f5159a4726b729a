"""systemd notification (SPEC section 7) and the exit codes of `tickguard run` (SPEC section 1).

The test binds its own AF_UNIX datagram socket and hands its path to the
daemon as NOTIFY_SOCKET, as systemd does, then reads what arrives: READY=1
with a STATUS=, WATCHDOG=1 at half of WATCHDOG_USEC while the guard loop
makes progress (and none while it does not), STOPPING=1 on SIGTERM.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import re
import signal
import socket
import statistics
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client import CollectorRegistry

from tickguard import app
from tickguard.config import parse_config
from tickguard.metrics import Metrics
from tickguard.systemd import Notifier, measure_lag

LOOPBACK = "127.0.0.1"
LISTENING_RE = re.compile(r"\[HTTP\] listening on 127\.0\.0\.1:(\d+)")
NO_PROGRESS = "made no progress"
STARTUP = 20.0  # seconds a subprocess may take to import, build and listen


def unused_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        port: int = s.getsockname()[1]
    return port


# ---------------------------------------------------------------------------
# The notify socket


@dataclass(eq=False)
class NotifyListener:
    """A bound AF_UNIX datagram socket collecting (monotonic time, message) as they arrive."""

    path: Path
    messages: list[tuple[float, str]] = field(default_factory=list)
    sock: socket.socket = field(init=False)
    _arrived: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        assert len(os.fsencode(self.path)) < 100, f"socket path too long: {self.path}"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(self.path))
        self.sock.setblocking(False)
        asyncio.get_running_loop().add_reader(self.sock.fileno(), self.drain)

    def drain(self) -> None:
        """Read every datagram waiting now (synchronous: sends are delivered on return)."""
        while True:
            try:
                data = self.sock.recv(4096)
            except BlockingIOError:
                return
            self.messages.append((time.monotonic(), data.decode()))
            self._arrived.set()

    def with_line(self, line: str) -> list[tuple[float, str]]:
        """The messages holding `line` (e.g. "WATCHDOG=1") as one of their lines."""
        return [(t, m) for t, m in self.messages if line in m.splitlines()]

    def count(self, line: str) -> int:
        self.drain()
        return len(self.with_line(line))

    async def wait_for(self, predicate: Callable[[], bool], timeout: float, what: str) -> None:
        """Return once `predicate()` holds, re-checking on each datagram; fail after `timeout`."""
        try:
            async with asyncio.timeout(timeout):
                while not predicate():
                    self._arrived.clear()
                    await self._arrived.wait()
        except TimeoutError:
            got = [m for _, m in self.messages]
            raise AssertionError(f"not within {timeout:g}s: {what}; received {got}") from None

    async def wait_count(self, line: str, n: int, timeout: float) -> None:
        await self.wait_for(lambda: len(self.with_line(line)) >= n, timeout, f"{n} x {line}")

    def close(self) -> None:
        asyncio.get_running_loop().remove_reader(self.sock.fileno())
        self.sock.close()


@pytest.fixture
async def notify(tmp_path: Path) -> AsyncIterator[NotifyListener]:
    """A NotifyListener bound at tmp_path/notify.sock, closed at teardown."""
    listener = NotifyListener(tmp_path / "notify.sock")
    try:
        yield listener
    finally:
        listener.close()


def intervals(times: list[float]) -> list[float]:
    return [round(b - a, 3) for a, b in itertools.pairwise(times)]


# ---------------------------------------------------------------------------
# The daemon as a subprocess


def write_config(tmp_path: Path, listen: str = f"{LOOPBACK}:0") -> Path:
    """A config for `tickguard run`: a feed nobody serves (it retries), a fast guard loop."""
    path = tmp_path / "config.toml"
    path.write_text(
        f"""
[daemon]
state_dir = "{tmp_path / "state"}"
[http]
listen = "{listen}"
[feed]
url = "ws://{LOOPBACK}:{unused_port()}/ws"
symbols = ["TCS"]
[feed.reconnect]
initial_delay = 0.05
max_delay = 0.2
[dns]
fallback_servers = []
[market]
always_open = true
[guard]
sweep_interval = 0.05
"""
    )
    return path


def daemon_env(**extra: str) -> dict[str, str]:
    """This environment without anything systemd or tickguard would read, plus `extra`."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k
        not in (
            "NOTIFY_SOCKET",
            "WATCHDOG_USEC",
            "WATCHDOG_PID",
            "CREDENTIALS_DIRECTORY",
            "STATE_DIRECTORY",
            "TICKGUARD_CONFIG",
        )
    }
    return {**env, **extra}


@dataclass(eq=False)
class Process:
    """`python -m tickguard run` with its stderr lines collected as they come."""

    process: asyncio.subprocess.Process
    lines: list[str] = field(default_factory=list)
    _line: asyncio.Event = field(default_factory=asyncio.Event)
    _reader: asyncio.Task[None] | None = None

    @classmethod
    async def start(cls, config: Path, env: dict[str, str]) -> Process:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "tickguard",
            "run",
            "--config",
            str(config),
            env=env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        started = cls(process)
        started._reader = asyncio.create_task(started._read())
        return started

    async def _read(self) -> None:
        assert self.process.stderr is not None
        while line := await self.process.stderr.readline():
            self.lines.append(line.decode(errors="replace").rstrip())
            self._line.set()

    async def port(self) -> int:
        """The port from the `[HTTP] listening on` line."""
        async with asyncio.timeout(STARTUP):
            while True:
                for line in self.lines:
                    if found := LISTENING_RE.search(line):
                        return int(found.group(1))
                self._line.clear()
                await self._line.wait()

    async def wait(self, timeout: float) -> int:
        """The exit code, within `timeout` seconds; the stderr has been read to its end."""
        async with asyncio.timeout(timeout):
            code = await self.process.wait()
            if self._reader is not None:
                await self._reader
        return code

    async def kill(self) -> None:
        if self.process.returncode is None:
            self.process.kill()
            await self.process.wait()
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader

    @property
    def stderr(self) -> str:
        return "\n".join(self.lines)


@pytest.fixture
async def processes() -> AsyncIterator[list[Process]]:
    """Processes a test appends here are killed at teardown if still running."""
    started: list[Process] = []
    try:
        yield started
    finally:
        for p in started:
            await p.kill()


async def test_ready_watchdog_and_stopping(
    tmp_path: Path, notify: NotifyListener, processes: list[Process]
) -> None:
    """A real daemon sends READY=1 with STATUS= once it serves, WATCHDOG=1 every 0.2 s, and STOPPING=1 then exit 0 on SIGTERM."""
    env = daemon_env(NOTIFY_SOCKET=str(notify.path), WATCHDOG_USEC="400000")
    daemon = await Process.start(write_config(tmp_path), env)
    processes.append(daemon)

    await notify.wait_count("READY=1", 1, STARTUP)
    _, ready = notify.with_line("READY=1")[0]
    assert any(line.startswith("STATUS=") and len(line) > 7 for line in ready.splitlines())
    assert not notify.with_line("WATCHDOG=1")  # nothing before READY
    port = await daemon.port()
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"http://{LOOPBACK}:{port}/healthz") as response,
    ):
        assert response.status == 200  # READY=1 came once the API listens

    await notify.wait_count("WATCHDOG=1", 4, 10.0)
    times = [t for t, _ in notify.with_line("WATCHDOG=1")]
    measured = intervals(times)
    print(f"WATCHDOG=1 intervals (expected 0.2 s): {measured}")
    assert all(i > 0.1 for i in measured), measured  # never faster than WATCHDOG_USEC/2
    assert 0.15 <= statistics.median(measured) <= 0.35, measured

    sent = time.monotonic()
    daemon.process.send_signal(signal.SIGTERM)
    assert await daemon.wait(10.0) == 0, daemon.stderr
    print(f"exit 0 {time.monotonic() - sent:.2f}s after SIGTERM")
    notify.drain()
    stopping = notify.with_line("STOPPING=1")
    assert len(stopping) == 1, notify.messages
    assert stopping[0][0] >= sent


async def test_config_error_exits_2(tmp_path: Path, processes: list[Process]) -> None:
    """An invalid config makes `tickguard run` exit 2 naming the key, before it listens."""
    config = write_config(tmp_path)
    config.write_text(config.read_text().replace("sweep_interval = 0.05", "sweep_interval = -1"))
    daemon = await Process.start(config, daemon_env())
    processes.append(daemon)
    assert await daemon.wait(STARTUP) == 2, daemon.stderr
    assert "guard.sweep_interval" in daemon.stderr
    assert not any(LISTENING_RE.search(line) for line in daemon.lines)


async def test_busy_http_port_exits_1(tmp_path: Path, processes: list[Process]) -> None:
    """A port another socket listens on makes `tickguard run` exit 1 with a `[HTTP]` error."""
    with socket.socket() as busy:
        busy.bind((LOOPBACK, 0))
        busy.listen()
        port = busy.getsockname()[1]
        config = write_config(tmp_path, listen=f"{LOOPBACK}:{port}")
        daemon = await Process.start(config, daemon_env())
        processes.append(daemon)
        assert await daemon.wait(STARTUP) == 1, daemon.stderr
    assert f"cannot listen on {LOOPBACK}:{port}" in daemon.stderr


# ---------------------------------------------------------------------------
# In-process: the watchdog follows the guard loop's progress


class _NoProgress(logging.Handler):
    """On each "no progress" log line, drains the notify socket and notes the WATCHDOG count."""

    def __init__(self, notify: NotifyListener) -> None:
        super().__init__(logging.ERROR)
        self.notify = notify
        self.pings_at: list[int] = []  # WATCHDOG=1 received when each line was logged
        self.logged = asyncio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if NO_PROGRESS in record.getMessage():
            self.pings_at.append(self.notify.count("WATCHDOG=1"))
            self.logged.set()

    async def wait_lines(self, n: int, timeout: float) -> None:
        async with asyncio.timeout(timeout):
            while len(self.pings_at) < n:
                self.logged.clear()
                await self.logged.wait()


@pytest.fixture
def no_progress(notify: NotifyListener) -> Iterator[_NoProgress]:
    """A _NoProgress handler on the tickguard.systemd logger, removed at teardown."""
    handler = _NoProgress(notify)
    logger = logging.getLogger("tickguard.systemd")
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)


async def test_watchdog_pings_only_on_progress(
    notify: NotifyListener, no_progress: _NoProgress, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Notifier.watchdog pings while `progress()` moves, stops while it stands still, and resumes."""
    monkeypatch.setenv("NOTIFY_SOCKET", str(notify.path))
    monkeypatch.setenv("WATCHDOG_USEC", "100000")  # a ping every 0.05 s
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    notifier = Notifier()
    assert notifier.enabled and notifier.watchdog_interval == pytest.approx(0.05)
    metrics = Metrics(CollectorRegistry())
    state = {"sweeps": 0, "moving": True}

    def progress() -> int:
        if state["moving"]:
            state["sweeps"] += 1
        return state["sweeps"]

    task = asyncio.create_task(notifier.watchdog(progress, metrics))
    try:
        await notify.wait_count("WATCHDOG=1", 3, 5.0)
        no_progress.pings_at.clear()
        state["moving"] = False
        await no_progress.wait_lines(4, 5.0)
        assert len(set(no_progress.pings_at)) == 1, no_progress.pings_at  # none while stalled
        stalled = no_progress.pings_at[0]
        state["moving"] = True
        await notify.wait_count("WATCHDOG=1", stalled + 2, 5.0)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        notifier.close()
    pings = metrics.registry.get_sample_value("tickguard_watchdog_pings_total")
    assert pings == notify.count("WATCHDOG=1")


async def test_stalled_guard_loop_stops_the_daemon_pings(
    tmp_path: Path,
    notify: NotifyListener,
    no_progress: _NoProgress,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """In the daemon the watchdog follows the guard loop: a stalled sweep stops WATCHDOG=1, a resumed one restarts it."""
    monkeypatch.setenv("NOTIFY_SOCKET", str(notify.path))
    monkeypatch.setenv("WATCHDOG_USEC", "200000")  # a ping every 0.1 s
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    config = parse_config(
        {
            "daemon": {"state_dir": str(tmp_path / "state")},
            "http": {"listen": f"{LOOPBACK}:0", "token_file": ""},
            "feed": {"url": f"ws://{LOOPBACK}:{unused_port()}/ws", "symbols": ["TCS"]},
            "dns": {"fallback_servers": []},
            "market": {"always_open": True},
            "guard": {"sweep_interval": 0.02},
        },
        env={},
    )
    daemon = await app.build(config)
    stop = asyncio.Event()
    task = asyncio.create_task(app.serve(daemon, stop=stop))
    try:
        await notify.wait_count("READY=1", 1, 10.0)
        await notify.wait_count("WATCHDOG=1", 3, 5.0)
        no_progress.pings_at.clear()
        # The guard loop keeps running but makes no progress.
        monkeypatch.setattr(daemon.guard_loop, "sweep", lambda: None)
        await no_progress.wait_lines(4, 5.0)
        assert len(set(no_progress.pings_at)) == 1, no_progress.pings_at
        monkeypatch.undo()  # the real sweep again (and the environment back)
        await notify.wait_count("WATCHDOG=1", no_progress.pings_at[0] + 2, 5.0)
    finally:
        stop.set()
        async with asyncio.timeout(10.0):
            code = await task
    assert code == 0
    assert notify.count("STOPPING=1") == 1
    pings = daemon.metrics.registry.get_sample_value("tickguard_watchdog_pings_total")
    assert pings == notify.count("WATCHDOG=1")


async def test_without_notify_socket_everything_is_a_no_op(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Without NOTIFY_SOCKET the notifier is disabled, sends nothing and its watchdog returns at once."""
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    monkeypatch.setenv("WATCHDOG_USEC", "100000")
    notifier = Notifier()
    assert not notifier.enabled
    assert notifier.send("READY=1") is False
    notifier.ready("starting")
    notifier.status("changed")
    notifier.stopping()
    metrics = Metrics(CollectorRegistry())
    async with asyncio.timeout(1.0):
        await notifier.watchdog(lambda: 0, metrics)
    notifier.close()


def test_watchdog_pid_of_another_process_disables_the_watchdog(
    notify: NotifyListener, monkeypatch: pytest.MonkeyPatch
) -> None:
    """WATCHDOG_PID naming another process means the watchdog is not ours: no pings at all."""
    monkeypatch.setenv("NOTIFY_SOCKET", str(notify.path))
    monkeypatch.setenv("WATCHDOG_USEC", "100000")
    found = []
    for pid in (os.getpid() + 1, os.getpid()):
        monkeypatch.setenv("WATCHDOG_PID", str(pid))
        notifier = Notifier()
        found.append(notifier.watchdog_interval)
        notifier.close()
    assert found == [None, pytest.approx(0.05)]


async def test_measure_lag_sees_a_blocked_loop() -> None:
    """measure_lag exports how long a blocked event loop delayed a sleeper."""
    metrics = Metrics(CollectorRegistry())
    probe = asyncio.create_task(measure_lag(metrics, interval=0.01))
    try:
        await asyncio.sleep(0)  # let the probe start its sleep
        time.sleep(0.2)  # noqa: ASYNC251 - blocking the loop is the point
        lag: Any = None

        def lagged() -> bool:
            nonlocal lag
            lag = metrics.registry.get_sample_value("tickguard_event_loop_lag_seconds")
            return lag is not None and lag > 0.1

        deadline = time.monotonic() + 2.0
        while not lagged():
            assert time.monotonic() < deadline, f"no lag seen: {lag}"
            await asyncio.sleep(0.005)
        assert lag < 2.0
    finally:
        probe.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await probe
