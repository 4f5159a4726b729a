"""Issue 15's failovers: real processes on a real PostgreSQL (SPEC 9, docs/ha.md).

Two `python -m tickguard run` processes share one PostgreSQL store (the
session's throw-away cluster, a database per test) and one broker outside both
of them: the Upstox broker fake in this process (orders and the account
ledger), with the Upstox feed fake (socket, authorize, LTP). Each instance has
its own state dir and API port. Every wait is for a condition, bounded.

- the leader is SIGKILLed as a stop crosses: exactly one exit in all, and the
  takeover time is printed;
- the leader's path to PostgreSQL is black-holed (a TCP proxy that forwards
  nothing, not even a close): it stops before the standby takes over, and
  nothing is sent twice;
- 20 randomized failovers under a stream of crossings: no exit sent twice, none
  missed.
"""

from __future__ import annotations

import asyncio
import functools
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any
from urllib.parse import quote

import aiohttp
import pytest

API_TOKEN = "api-token-for-the-failover-tests"
FIRST = "NSE_EQ|INE848E01016"
STARTUP = 20.0  # seconds an instance may take to start, lead or stand by
SETTLE = 30.0  # seconds a takeover and an exit may take, far above what they need
# The server ends a session it has heard nothing from for this long (the instance sets it
# for its own session, in the URL): a leader cut off by a path that carries no FIN loses
# its lock by then. Above the leader's own bound (PROBE_EVERY + PROBE_TIMEOUT = 3 s), so it
# stops sending first (docs/ha.md).
IDLE_SESSION_TIMEOUT_MS = 6000
FAILOVERS = 20
# Where a crossing puts the price: the feed fake's live ticks rise 2.5 a second from there,
# so the stop at 95 stays crossed for some 20 s, longer than any takeover here.
CROSSED = 45.0


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def with_options(url: str, port: int | None = None) -> str:
    """The store URL (through `port` when given), the session's idle timeout set."""
    if port is not None:
        url = url.replace(url.split("@", 1)[1].split("/", 1)[0], f"127.0.0.1:{port}", 1)
    options = quote(f"-c idle_session_timeout={IDLE_SESSION_TIMEOUT_MS}")
    return f"{url}?connect_timeout=5&options={options}"


@dataclass(eq=False)
class Instance:
    """One `tickguard run` child process, its log lines, and its API."""

    name: str
    config: Path
    port: int
    proc: subprocess.Popen[bytes] | None = None
    lines: list[tuple[float, str]] = field(default_factory=list)
    _reader: asyncio.Future[None] | None = None

    def start(self) -> None:
        env = {k: v for k, v in os.environ.items() if k != "NOTIFY_SOCKET"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tickguard", "run", "--config", str(self.config)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=env,
        )
        self._reader = asyncio.get_running_loop().run_in_executor(None, self._read, self.proc)

    def _read(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stderr is not None
        for raw in proc.stderr:
            self.lines.append((time.monotonic(), raw.decode("utf-8", "replace").rstrip()))

    def first(self, text: str) -> float | None:
        return next((t for t, line in self.lines if text in line), None)

    def text(self) -> str:
        return "\n".join(line for _, line in self.lines)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def health(self, http: aiohttp.ClientSession) -> dict[str, Any] | None:
        try:
            async with asyncio.timeout(2.0):
                async with http.get(self.base + "/api/v1/monitoring/connection-health") as r:
                    return dict(await r.json())
        except (aiohttp.ClientError, OSError, TimeoutError, ValueError):
            return None

    async def role(self, http: aiohttp.ClientSession) -> str | None:
        health = await self.health(http)
        return health["ha"]["role"] if health and health.get("ha") else None

    async def end(self, sig: signal.Signals) -> int | None:
        if self.proc is None:
            return None
        proc, self.proc = self.proc, None
        if proc.poll() is None:
            proc.send_signal(sig)
        code = await asyncio.get_running_loop().run_in_executor(None, proc.wait, 30)
        if self._reader is not None:
            await self._reader
        return code

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


@dataclass(eq=False)
class Cluster:
    feed: Any
    fake: Any
    http: aiohttp.ClientSession
    instances: dict[str, Instance]

    async def until(self, predicate: Callable[[], Any], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while True:
            result = predicate()
            if asyncio.iscoroutine(result):
                result = await result
            if result:
                return
            if time.monotonic() > deadline:
                logs = "\n".join(
                    f"--- {i.name}\n{i.text()[-3000:]}" for i in self.instances.values()
                )
                raise AssertionError(f"not within {timeout:g}s: {what}\n{logs}")
            await asyncio.sleep(0.05)

    async def leader(self) -> Instance | None:
        for instance in self.instances.values():
            if instance.running and await instance.role(self.http) == "leader":
                return instance
        return None

    async def register(self, instance: Instance, symbol: str, quantity: int) -> int:
        """The bot holds `quantity` of `symbol` and registers it (stop at 95) with `instance`;
        the HTTP status."""
        self.fake.set_position(symbol, quantity, 100.0)
        body = {
            "symbol": symbol,
            "side": "long",
            "quantity": quantity,
            "entry_price": 100.0,
            "stop_loss": 95.0,
        }
        headers = {"Authorization": f"Bearer {API_TOKEN}"}
        try:
            async with asyncio.timeout(5.0):
                async with self.http.post(
                    instance.base + "/api/v1/positions", json=body, headers=headers
                ) as response:
                    return response.status
        except (aiohttp.ClientError, OSError, TimeoutError):
            return 0

    def orders(self, symbol: str) -> list[Any]:
        return [b for b in self.fake.place_bodies if b.get("instrument_token") == symbol]

    def held(self, symbol: str) -> float:
        return float(sum(line.quantity for (k, _), line in self.fake.ledger.items() if k == symbol))


@pytest.fixture
async def cluster(
    tmp_path: Path,
    pg_url: str,
    upstox_feed_server: Any,
    fake_upstox: Any,
    upstox_broker_fakes: ModuleType,
    tcp_proxy: Any,
) -> AsyncIterator[Callable[..., Any]]:
    token = upstox_broker_fakes.TOKEN
    feed = await upstox_feed_server(token=token)
    fake = await fake_upstox(feed)
    (tmp_path / "upstox-token").write_text(token + "\n")
    (tmp_path / "api-token").write_text(API_TOKEN + "\n")
    http = aiohttp.ClientSession()
    made = Cluster(feed, fake, http, {})

    def config(name: str, store_url: str, symbols: list[str], positions: list[str]) -> Instance:
        port = free_port()
        lines = [
            "[daemon]",
            f'state_dir = "{tmp_path / name}"',
            "[http]",
            f'listen = "127.0.0.1:{port}"',
            f'token_file = "{tmp_path / "api-token"}"',
            "[store]",
            f'url = "{store_url}"',
            "takeover_settle = 1.0",  # the broker fake answers within milliseconds
            "[feed]",
            'protocol = "upstox"',
            f"symbols = {symbols!r}".replace("'", '"'),
            "poll_interval = 0.05",
            "silence_timeout = 60.0",
            "[feed.reconnect]",
            "initial_delay = 0.05",
            "max_delay = 0.2",
            "[upstox]",
            f'api_url = "{fake.url}"',
            f'hft_url = "{fake.url}"',
            f'token_file = "{tmp_path / "upstox-token"}"',
            "[broker]",
            'kind = "upstox"',
            "[dns]",
            "fallback_servers = []",
            "[market]",
            "always_open = true",
            "[guard]",
            "sweep_interval = 0.05",
            "[account]",
            "reconcile_interval = 0.2",
        ]
        for symbol in positions:
            lines += [
                "[[positions]]",
                f'symbol = "{symbol}"',
                'side = "long"',
                "quantity = 10",
                "entry_price = 100.0",
                "stop_loss = 95.0",
            ]
        path = tmp_path / f"{name}.toml"
        path.write_text("\n".join(lines) + "\n")
        instance = Instance(name, path, port)
        made.instances[name] = instance
        return instance

    async def build(
        *, proxied: str | None = None, symbols: list[str], positions: list[str]
    ) -> Cluster:
        """Instances a and b on the shared store; `proxied` reaches PostgreSQL through a TCP
        proxy (`cluster.proxy`)."""
        pg_port = int(pg_url.split("@", 1)[1].split("/", 1)[0].rsplit(":", 1)[1])
        for name in ("a", "b"):
            port = None
            if name == proxied:
                proxy = await tcp_proxy("127.0.0.1", pg_port)
                made.proxy = proxy  # type: ignore[attr-defined]
                port = proxy.port
            config(name, with_options(pg_url, port), symbols, positions)
        return made

    try:
        yield build
    finally:
        for instance in made.instances.values():
            await instance.end(signal.SIGKILL)
        await http.close()


async def lead_and_stand_by(c: Cluster) -> tuple[Instance, Instance]:
    a, b = c.instances["a"], c.instances["b"]
    a.start()
    await c.until(lambda: _role_is(c, a, "leader"), STARTUP, "a leads")
    b.start()
    await c.until(lambda: _role_is(c, b, "standby"), STARTUP, "b stands by")
    await c.until(lambda: _connected(c, b), STARTUP, "b's feed connected (prices warm)")
    return a, b


async def _role_is(c: Cluster, instance: Instance, role: str) -> bool:
    return await instance.role(c.http) == role


async def _connected(c: Cluster, instance: Instance) -> bool:
    health = await instance.health(c.http)
    return bool(health and health["websocket"]["connected"])


async def test_sigkill_the_leader_as_a_stop_crosses(cluster: Any) -> None:
    c: Cluster = await cluster(symbols=[FIRST], positions=[FIRST])
    c.fake.set_position(FIRST, 10, 100.0)
    c.feed.prices[FIRST] = 100.0
    a, b = await lead_and_stand_by(c)
    # The stop crosses, and the leader dies a moment later.
    c.feed.prices[FIRST] = CROSSED
    await asyncio.sleep(random.Random(15).uniform(0.0, 0.05))  # the race, not a wait for
    killed = time.monotonic()
    assert await a.end(signal.SIGKILL) == -signal.SIGKILL
    await c.until(lambda: _role_is(c, b, "leader"), SETTLE, "b takes over")
    took = (b.first("[HA] leader") or time.monotonic()) - killed
    await c.until(lambda: c.held(FIRST) == 0.0, SETTLE, "the position closed at the broker")
    await c.until(lambda: _no_exit_in_flight(c, b), SETTLE, "nothing in flight")
    print(f"\ntakeover after a SIGKILL: {took:.2f}s (kill to the new leader's [HA] line)")
    assert len(c.orders(FIRST)) == 1, c.orders(FIRST)  # exactly one exit in all
    assert "Traceback" not in b.text()


async def _no_exit_in_flight(c: Cluster, instance: Instance) -> bool:
    health = await instance.health(c.http)
    return bool(health and health["exits"]["in_flight"] == 0)


async def test_a_leader_cut_off_from_postgresql_stops_before_the_standby_takes_over(
    cluster: Any,
) -> None:
    c: Cluster = await cluster(proxied="a", symbols=[FIRST], positions=[FIRST])
    c.fake.set_position(FIRST, 10, 100.0)
    c.feed.prices[FIRST] = 100.0
    a, b = await lead_and_stand_by(c)
    proxy = c.proxy  # type: ignore[attr-defined]
    proxy.blackhole(hold_closes=True)  # no bytes, no FIN: PostgreSQL sees an idle session
    cut = time.monotonic()
    c.feed.prices[FIRST] = CROSSED  # the stop crosses: a cannot journal, so it cannot send
    await c.until(lambda: a.first("[HA] lost leadership") is not None, SETTLE, "a stops")
    await c.until(lambda: _role_is(c, b, "leader"), SETTLE, "b takes over")
    a_stopped, b_leads = a.first("[HA] lost leadership"), b.first("[HA] leader")
    assert a_stopped is not None and b_leads is not None
    assert a_stopped < b_leads, (a_stopped - cut, b_leads - cut)
    assert await a.end(signal.SIGTERM) == 1  # it had stopped itself: exit 1
    await c.until(lambda: c.held(FIRST) == 0.0, SETTLE, "b's exit closed the position")
    await c.until(lambda: _no_exit_in_flight(c, b), SETTLE, "nothing in flight")
    print(f"\nblack hole: a stopped after {a_stopped - cut:.2f}s, b led after {b_leads - cut:.2f}s")
    assert len(c.orders(FIRST)) == 1, c.orders(FIRST)  # nothing sent twice


async def test_randomized_failovers_under_a_stream_of_crossings(cluster: Any) -> None:
    """Each round: a new position is registered with the leader and its stop crosses; the
    leader is SIGKILLed or stopped (SIGTERM) at a random moment around the crossing and
    comes back as a standby. At the end every position was exited exactly once."""
    rng = random.Random(2026_1203)
    symbols = [f"NSE_EQ|INE{i:03d}A01016" for i in range(FAILOVERS)]
    c: Cluster = await cluster(symbols=symbols, positions=[])
    for symbol in symbols:
        c.feed.prices[symbol] = 100.0
    await lead_and_stand_by(c)
    takeovers: list[float] = []
    for round_, symbol in enumerate(symbols):
        leader = await c.leader()
        assert leader is not None, f"round {round_}: no leader"
        await c.until(
            functools.partial(_registered, c, leader, symbol),
            SETTLE,
            f"round {round_}: {symbol} guarded",
        )
        c.feed.prices[symbol] = CROSSED  # the stop crosses on the next live tick
        await asyncio.sleep(rng.uniform(0.0, 0.15))  # the race itself
        sig = rng.choice([signal.SIGKILL, signal.SIGTERM])
        gone = time.monotonic()
        await leader.end(sig)
        standby = next(i for i in c.instances.values() if i is not leader)
        await c.until(
            functools.partial(_role_is, c, standby, "leader"), SETTLE, f"round {round_}: takeover"
        )
        takeovers.append(time.monotonic() - gone)
        leader.start()  # back, as a standby
        await c.until(
            functools.partial(_role_is, c, leader, "standby"), STARTUP, f"round {round_}: back"
        )
    await c.until(lambda: all(c.held(s) == 0.0 for s in symbols), SETTLE, "every position closed")
    leader = await c.leader()
    assert leader is not None
    await c.until(lambda: _no_exit_in_flight(c, leader), SETTLE, "nothing in flight")
    twice = {s: len(c.orders(s)) for s in symbols if len(c.orders(s)) > 1}
    missed = [s for s in symbols if not c.orders(s)]
    assert twice == {} and missed == [], (twice, missed)
    print(
        f"\n{FAILOVERS} failovers: takeover p50 {statistics.median(takeovers):.2f}s,"
        f" max {max(takeovers):.2f}s (the old leader gone to the new one's API saying leader)"
    )


async def _registered(c: Cluster, leader: Instance, symbol: str) -> bool:
    status = await c.register(leader, symbol, 10)
    return status in (201, 409)
