"""Shared integration fixtures: real servers on loopback port 0, and a feed harness.

- `simulator`: the market simulator as a real subprocess (`python -m tickguard simulate`),
  with its fault switches, pinned prices and a restart on the same port;
- `dns_server`: UDP DNS servers built with dnspython that answer A records from a dict
  and can go dead (drop every query);
- `tcp_proxy`: a TCP proxy that can black-hole a connection both ways;
- `feed_server`: a websockets server (optionally TLS) scripted per connection;
- `feed`: builds a FeedSupervisor (and optionally a FallbackPoller) with small
  intervals, recording prices and failures so tests await them;
- `poll_server`: a REST price server (aiohttp) answering with a handler the test gives;
- `eventually`: awaits a condition, polling it every 10 ms;
- `pg_server`: one throw-away PostgreSQL server per session (pg_cluster.py: initdb and
  pg_ctl on a free loopback port, as an unprivileged user when we are root), and
  `pg_url`: a fresh database on it for each test. Without the server binaries these
  tests skip; with TICKGUARD_SYSTEM_TESTS=require (CI) they fail instead.

Tests run with `--import-mode=importlib`, so nothing here is imported by test
modules: everything is reached through fixtures (annotations may import the
classes under `TYPE_CHECKING`).

No packet leaves the machine: every server binds 127.0.0.x, and every config
built here sets `dns.fallback_servers` (the defaults are public resolvers).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import logging
import os
import random
import re
import ssl
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, NoReturn, cast

import aiohttp
import dns.exception
import dns.message
import dns.rcode
import dns.rdatatype
import dns.rrset
import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from tickguard.config import Config, parse_config
from tickguard.core.prices import PriceBook, PriceSource
from tickguard.feed.dns import ResolverChain
from tickguard.feed.json_protocol import JsonProtocol, poll_source
from tickguard.feed.poller import FallbackPoller
from tickguard.feed.supervisor import FeedSupervisor
from tickguard.metrics import Metrics
from tickguard.store import Store

if TYPE_CHECKING:
    from pg_cluster import PgServer

SIMULATOR_STARTUP = 20.0  # seconds a simulator subprocess may take to print its address
STOP_TIMEOUT = 5.0  # seconds a cancelled feed task may take to end
LOOPBACK = "127.0.0.1"


# ---------------------------------------------------------------------------
# Awaiting conditions


Eventually = Callable[..., Awaitable[None]]


async def eventually(
    predicate: Callable[[], object], timeout: float = 5.0, *, what: str = "", interval: float = 0.01
) -> None:
    """Return once `predicate()` is true; fail the test if it is not within `timeout` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"not within {timeout:g}s: {what or predicate}")
        await asyncio.sleep(interval)


@pytest.fixture(name="eventually")
def eventually_fixture() -> Eventually:
    """`await eventually(predicate, timeout, what=...)`: polls a condition every 10 ms."""
    return eventually


# ---------------------------------------------------------------------------
# The market simulator, as a subprocess


class Simulator:
    """`python -m tickguard simulate` on 127.0.0.1, restartable on the same port."""

    def __init__(self, log_path: Path, *, symbols: int = 3, rate: float = 20.0, seed: int = 1):
        self.log_path = log_path
        self.symbols, self.rate, self.seed = symbols, rate, seed
        self.port = 0
        self.process: asyncio.subprocess.Process | None = None
        self._http: aiohttp.ClientSession | None = None

    @property
    def base(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://{LOOPBACK}:{self.port}/ws"

    @property
    def prices_url(self) -> str:
        return f"{self.base}/prices"

    async def start(self) -> None:
        """Start the subprocess (on `self.port`, 0 the first time) and parse where it listens."""
        for attempt in range(3):  # the same port can be briefly unavailable on a restart
            with self.log_path.open("ab") as log:
                process = await asyncio.create_subprocess_exec(
                    sys.executable,
                    "-m",
                    "tickguard",
                    "simulate",
                    "--listen",
                    f"{LOOPBACK}:{self.port}",
                    "--symbols",
                    str(self.symbols),
                    "--rate",
                    str(self.rate),
                    "--seed",
                    str(self.seed),
                    stdout=asyncio.subprocess.PIPE,
                    stderr=log,
                )
            assert process.stdout is not None
            async with asyncio.timeout(SIMULATOR_STARTUP):
                line = (await process.stdout.readline()).decode()
            found = re.search(r"listening on http://127\.0\.0\.1:(\d+) ", line)
            if found is not None:
                self.process = process
                self.port = int(found.group(1))
                return
            await process.wait()
            if attempt < 2:
                await asyncio.sleep(0.2)  # a retry pause, not synchronisation
        stderr = self.log_path.read_text(errors="replace")[-2000:]
        raise RuntimeError(f"the simulator did not start: {line!r}\n{stderr}")

    async def kill(self) -> None:
        """SIGKILL: the server vanishes without close frames."""
        if self.process is not None and self.process.returncode is None:
            self.process.kill()
            await self.process.wait()
        self.process = None

    async def stop(self) -> None:
        """SIGTERM, then SIGKILL if it does not exit within 5 s."""
        process, self.process = self.process, None
        if process is None or process.returncode is not None:
            return
        process.terminate()
        try:
            async with asyncio.timeout(5.0):
                await process.wait()
        except TimeoutError:
            process.kill()
            await process.wait()

    async def restart(self) -> None:
        """Kill the simulator if it runs, then start it again on the same port."""
        await self.kill()
        await self.start()

    async def _request(self, method: str, path: str, body: object = None) -> dict[str, Any]:
        if self._http is None:
            self._http = aiohttp.ClientSession()
        async with self._http.request(
            method, self.base + path, json=body, timeout=aiohttp.ClientTimeout(total=10)
        ) as response:
            answer: dict[str, Any] = await response.json()
            assert response.status == 200, answer
            return answer

    async def faults(
        self, mode: str, *, poll: str | None = None, status: int | None = None
    ) -> dict[str, Any]:
        """POST /faults: socket `mode`, optional `poll` mode and refuse `status`."""
        body: dict[str, object] = {"mode": mode}
        if poll is not None:
            body["poll"] = poll
        if status is not None:
            body["status"] = status
        return await self._request("POST", "/faults", body)

    async def connections_total(self) -> int:
        """WebSocket connections the simulator has accepted since it started."""
        return int((await self._request("GET", "/faults"))["connections_total"])

    async def set_price(self, symbol: str, price: float) -> None:
        """Pin `symbol` at `price` (broadcast live when the socket is healthy)."""
        await self._request("POST", f"/prices/{symbol}", {"price": price})

    async def close(self) -> None:
        await self.stop()
        if self._http is not None:
            await self._http.close()


SimulatorFactory = Callable[..., Awaitable[Simulator]]


@pytest.fixture
async def simulator(tmp_path: Path) -> AsyncIterator[SimulatorFactory]:
    """`await simulator(symbols=3, rate=20, seed=1)`: a started simulator, always stopped."""
    started: list[Simulator] = []

    async def start(*, symbols: int = 3, rate: float = 20.0, seed: int = 1) -> Simulator:
        sim = Simulator(
            tmp_path / f"simulator-{len(started)}.log", symbols=symbols, rate=rate, seed=seed
        )
        started.append(sim)
        await sim.start()
        return sim

    try:
        yield start
    finally:
        for sim in started:
            await sim.close()


# ---------------------------------------------------------------------------
# UDP DNS servers


class DnsServer(asyncio.DatagramProtocol):
    """Answers A queries for the names in `records`; NXDOMAIN for others, no data for AAAA.

    `dead = True` drops every query (a resolver that stopped answering);
    `queries` counts the queries received either way.
    """

    def __init__(self, records: Mapping[str, str], host: str = LOOPBACK) -> None:
        self.records = {name.rstrip(".").lower(): address for name, address in records.items()}
        self.host = host
        self.port = 0
        self.dead = False
        self.queries = 0
        self._transport: asyncio.DatagramTransport | None = None

    @property
    def nameserver(self) -> str:
        """How the config names this server: "IP:PORT"."""
        return f"{self.host}:{self.port}"

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(lambda: self, local_addr=(self.host, 0))
        self.port = transport.get_extra_info("sockname")[1]

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        self.queries += 1
        if self.dead or self._transport is None:
            return
        try:
            query = dns.message.from_wire(data)
        except dns.exception.DNSException:
            return
        response = dns.message.make_response(query)
        if query.question:
            question = query.question[0]
            name = question.name.to_text(omit_final_dot=True).lower()
            address = self.records.get(name)
            if address is None:
                response.set_rcode(dns.rcode.NXDOMAIN)
            elif question.rdtype == dns.rdatatype.A:
                response.answer.append(dns.rrset.from_text(question.name, 60, "IN", "A", address))
            # AAAA (or anything else) for a known name: NOERROR without data
        self._transport.sendto(response.to_wire(), addr)

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()


DnsServerFactory = Callable[..., Awaitable[DnsServer]]


@pytest.fixture
async def dns_server() -> AsyncIterator[DnsServerFactory]:
    """`await dns_server({"feed.tickguard.test": "127.0.0.1"}, host=..., dead=False)`."""
    servers: list[DnsServer] = []

    async def start(
        records: Mapping[str, str], *, host: str = LOOPBACK, dead: bool = False
    ) -> DnsServer:
        server = DnsServer(records, host)
        servers.append(server)
        await server.start()
        server.dead = dead
        return server

    try:
        yield start
    finally:
        for server in servers:
            server.close()


# ---------------------------------------------------------------------------
# A TCP proxy that can black-hole its connections


class TcpProxy:
    """Forwards 127.0.0.1:port to a target; `blackhole()` stops forwarding both ways.

    While black-holed the sockets stay open and nothing is answered (a cut network
    path); bytes already read wait in the proxy and flow on `restore()`, as TCP
    retransmissions would.
    """

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = 0
        self.connections = 0
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._holding = False
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, LOOPBACK, 0)
        self.port = self._server.sockets[0].getsockname()[1]

    def blackhole(self, *, hold_closes: bool = False) -> None:
        """Stop forwarding; with `hold_closes`, a side's close is held back too (a cut path
        carries no FIN either: the far end sees the connection idle, not closed)."""
        self._holding = hold_closes
        self._flowing.clear()

    def restore(self) -> None:
        self._flowing.set()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.add(writer)
        try:
            try:
                up_reader, up_writer = await asyncio.open_connection(*self.target)
            except OSError:
                return
            self._writers.add(up_writer)
            self.connections += 1
            await asyncio.gather(self._pump(reader, up_writer), self._pump(up_reader, writer))
        finally:
            writer.close()
            self._tasks.discard(task)

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                await self._flowing.wait()
                writer.write(data)
                await writer.drain()
        except OSError:
            pass
        finally:
            if self._holding:
                await self._flowing.wait()
            writer.close()  # one side ended: end the other too

    async def close(self) -> None:
        """Stop listening and end every connection (the pumps see EOF and return)."""
        if self._server is not None:
            self._server.close()
        self.restore()
        for writer in self._writers:
            writer.transport.abort()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(5.0):
                await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()


TcpProxyFactory = Callable[[str, int], Awaitable[TcpProxy]]


@pytest.fixture
async def tcp_proxy() -> AsyncIterator[TcpProxyFactory]:
    """`await tcp_proxy(host, port)`: a started proxy in front of host:port, closed at teardown."""
    proxies: list[TcpProxy] = []

    async def start(host: str, port: int) -> TcpProxy:
        proxy = TcpProxy(host, port)
        proxies.append(proxy)
        await proxy.start()
        return proxy

    try:
        yield start
    finally:
        for proxy in proxies:
            await proxy.close()


# ---------------------------------------------------------------------------
# A scripted websockets feed server


Script = Callable[["FeedServer", ServerConnection, int, list[str]], Awaitable[None]]


class FeedServer:
    """A `json`-protocol feed on 127.0.0.1:0 (wss with `ssl_context`), one script per connection.

    The script runs after the client's subscribe frame, with the server, the
    connection, its 0-based index and the subscribed symbols; the default is
    `stream_ticks`.
    """

    def __init__(
        self, script: Script | None = None, ssl_context: ssl.SSLContext | None = None
    ) -> None:
        self.script = script or FeedServer.stream_ticks
        self.ssl_context = ssl_context
        self.port = 0
        self.connections: list[ServerConnection] = []
        self.subscriptions: list[list[str]] = []
        self.hosts: list[str] = []  # Host header of each handshake
        self.errors: list[BaseException] = []  # scripts that failed
        self._server: Server | None = None

    def url(self, host: str = LOOPBACK) -> str:
        scheme = "wss" if self.ssl_context is not None else "ws"
        return f"{scheme}://{host}:{self.port}/ws"

    async def stream_ticks(self, ws: ServerConnection, index: int, symbols: list[str]) -> None:
        """A tick for every subscribed symbol every 20 ms, prices rising by 0.05."""
        price = 100.0
        while True:
            price += 0.05
            ticks = [{"symbol": s, "price": round(price, 2)} for s in symbols]
            await ws.send(json.dumps({"type": "ticks", "ticks": ticks}))
            await asyncio.sleep(0.02)

    async def start(self) -> None:
        self._server = await serve(self._handler, LOOPBACK, 0, ssl=self.ssl_context)
        self.port = next(iter(self._server.sockets)).getsockname()[1]

    async def _handler(self, ws: ServerConnection) -> None:
        index = len(self.connections)
        self.connections.append(ws)
        assert ws.request is not None
        self.hosts.append(ws.request.headers.get("Host", ""))
        try:
            message = json.loads(await ws.recv())
        except ConnectionClosed:
            return
        symbols = list(message["symbols"])
        self.subscriptions.append(symbols)
        # The script ends with its connection, even one waiting on something else.
        script = asyncio.create_task(self.script(self, ws, index, symbols))
        closed = asyncio.create_task(ws.wait_closed())
        try:
            await asyncio.wait([script, closed], return_when=asyncio.FIRST_COMPLETED)
            if script.done() and not script.cancelled():
                error = script.exception()
                if error is not None and not isinstance(error, ConnectionClosed):
                    self.errors.append(error)
                await closed
        finally:
            script.cancel()
            closed.cancel()
            await asyncio.gather(script, closed, return_exceptions=True)

    async def close(self) -> None:
        """Stop serving and close every connection; raise what a script raised."""
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(5.0):
                    await self._server.wait_closed()
        if self.errors:
            raise AssertionError(f"a feed server script failed: {self.errors[0]!r}")


FeedServerFactory = Callable[..., Awaitable[FeedServer]]


@pytest.fixture
async def feed_server() -> AsyncIterator[FeedServerFactory]:
    """`await feed_server(script=None, ssl_context=None)`: a started server, closed at teardown."""
    servers: list[FeedServer] = []

    async def start(
        script: Script | None = None, ssl_context: ssl.SSLContext | None = None
    ) -> FeedServer:
        server = FeedServer(script, ssl_context)
        servers.append(server)
        await server.start()
        return server

    try:
        yield start
    finally:
        errors: list[AssertionError] = []
        for server in servers:
            try:
                await server.close()
            except AssertionError as exc:
                errors.append(exc)
        if errors:
            raise errors[0]


# ---------------------------------------------------------------------------
# The feed under test: supervisor (+ poller) with recorders


@dataclass(frozen=True, slots=True)
class PriceEvent:
    """One on_prices call: when (monotonic), which symbols, from where, at which values."""

    at: float
    symbols: tuple[str, ...]
    source: PriceSource
    values: dict[str, float]


@dataclass(frozen=True, slots=True)
class FailureEvent:
    """One `[RECONNECT]` line: a failed attempt or an ended connection."""

    at: float  # monotonic, when the supervisor logged it
    number: int  # attempt number in the streak
    delay: float  # seconds until the next attempt (as logged, 0.1 s resolution)
    kind: str  # a network_errors kind
    detail: str
    last_frame_at: float | None  # the supervisor's last data frame at that moment


_RECONNECT_RE = re.compile(r"\[RECONNECT\] attempt (\d+) in ([0-9.]+)s \(")


class _FailureRecorder(logging.Handler):
    def __init__(self, feed: Feed) -> None:
        super().__init__(logging.DEBUG)
        self._feed = feed

    def emit(self, record: logging.LogRecord) -> None:
        match = _RECONNECT_RE.match(record.getMessage())
        if match is None:
            return
        supervisor = self._feed.supervisor
        kind, _, detail = supervisor.last_error.partition(": ")
        self._feed.failures.append(
            FailureEvent(
                time.monotonic(),
                int(match.group(1)),
                float(match.group(2)),
                kind,
                detail,
                supervisor.last_frame_at,
            )
        )


@dataclass(eq=False)
class Feed:
    """A running FeedSupervisor (and FallbackPoller) plus what it has done so far."""

    config: Config
    registry: CollectorRegistry
    metrics: Metrics
    book: PriceBook
    resolver: ResolverChain
    supervisor: FeedSupervisor = field(init=False)
    poller: FallbackPoller | None = None
    started_at: float = 0.0
    prices: list[PriceEvent] = field(default_factory=list)
    failures: list[FailureEvent] = field(default_factory=list)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    session: aiohttp.ClientSession | None = None
    _recorder: _FailureRecorder | None = None

    def on_prices(self, symbols: list[str], source: PriceSource) -> None:
        values = {s: p.value for s in symbols if (p := self.book.get(s)) is not None}
        self.prices.append(PriceEvent(time.monotonic(), tuple(symbols), source, values))

    def metric(self, name: str, **labels: str) -> float:
        """A sample's value in this feed's registry (0.0 when absent)."""
        value = self.registry.get_sample_value(name, labels)
        return 0.0 if value is None else value

    def mark(self) -> int:
        """A position in the price events, for `since`."""
        return len(self.prices)

    def since(self, mark: int, source: PriceSource | None = None) -> list[PriceEvent]:
        return [e for e in self.prices[mark:] if source is None or e.source is source]

    def symbols_since(self, mark: int, source: PriceSource) -> set[str]:
        return {s for e in self.since(mark, source) for s in e.symbols}

    def failures_of(self, kind: str) -> list[FailureEvent]:
        return [f for f in self.failures if f.kind == kind]

    def assert_running(self) -> None:
        """Fail if the supervisor or poller task has ended (they never should)."""
        for task in self.tasks:
            if task.done():
                raise AssertionError(f"{task.get_name()} ended: {task!r}") from (
                    None if task.cancelled() else task.exception()
                )

    async def stop(self) -> None:
        """Cancel the tasks, close the poll session, detach the recorder. Idempotent.

        A task still running a second after its cancellation is cancelled again
        (so the loop can close), and the test fails: a supervisor or poller that
        swallows cancellation would hang the daemon's shutdown.
        """
        tasks, self.tasks = self.tasks, []
        loop = asyncio.get_running_loop()
        deadline = loop.time() + STOP_TIMEOUT
        cancels = 0
        pending = {t for t in tasks if not t.done()}
        while pending and loop.time() < deadline:
            for task in pending:
                task.cancel()
            cancels += 1
            _, pending = await asyncio.wait(pending, timeout=1.0)
        if self.session is not None:
            await self.session.close()
            self.session = None
        if self._recorder is not None:
            logging.getLogger("tickguard.feed.supervisor").removeHandler(self._recorder)
            self._recorder = None
        if pending or cancels > 1:
            names = ", ".join(t.get_name() for t in tasks)
            raise AssertionError(
                f"{names}: {cancels} cancellations, {len(pending)} tasks still running"
            )
        for task in tasks:
            if not task.cancelled() and task.exception() is not None:
                raise AssertionError(f"{task.get_name()} crashed") from task.exception()


def _merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def feed_config(url: str, symbols: Sequence[str], overrides: Mapping[str, Any]) -> Config:
    """A config with test-sized intervals; `overrides` is merged table by table."""
    base: dict[str, Any] = {
        "feed": {
            "url": url,
            "symbols": list(symbols),
            "ping_interval": 0.1,
            "ping_timeout": 1.0,
            "silence_timeout": 2.0,
            "poll_interval": 0.2,
            "reconnect": {
                "initial_delay": 0.05,
                "max_delay": 0.4,
                "multiplier": 2.0,
                "jitter": 0.5,
                "stable_after": 30.0,
            },
        },
        # Never the public defaults: no packet may leave this machine.
        "dns": {"servers": [], "fallback_servers": [], "timeout": 0.5},
        "market": {"always_open": True},
    }
    return parse_config(_merge(base, overrides), env={})


FeedFactory = Callable[..., Awaitable[Feed]]


@pytest.fixture
async def feed() -> AsyncIterator[FeedFactory]:
    """`await feed(url, symbols=..., config={...}, poll=False, store=None, ssl_context=None)`.

    Starts a FeedSupervisor on `url` (a FallbackPoller too when `poll` is true and
    the config has a feed.fallback_url), seeded with random.Random(seed), and
    records its prices and failures. Everything started is stopped at teardown.
    """
    feeds: list[Feed] = []

    async def start(
        url: str,
        *,
        symbols: Sequence[str] = ("BOSCHLTD", "ADANIENT"),
        config: Mapping[str, Any] | None = None,
        poll: bool = False,
        store: Store | None = None,
        ssl_context: ssl.SSLContext | None = None,
        seed: int = 7,
    ) -> Feed:
        cfg = feed_config(url, symbols, config or {})
        registry = CollectorRegistry()
        metrics = Metrics(registry)
        book = PriceBook(cfg.prices.stale_warning, cfg.prices.cache_timeout)
        f = Feed(cfg, registry, metrics, book, ResolverChain(cfg.dns, store, metrics))
        f.supervisor = FeedSupervisor(
            cfg.feed,
            protocol=JsonProtocol(),
            resolver=f.resolver,
            book=book,
            metrics=metrics,
            symbols=lambda: cfg.feed.symbols,
            on_prices=f.on_prices,
            market_open=lambda: True,
            rng=random.Random(seed),
            ssl_context=ssl_context,
        )
        feeds.append(f)
        f._recorder = _FailureRecorder(f)
        logging.getLogger("tickguard.feed.supervisor").addHandler(f._recorder)
        f.started_at = time.monotonic()
        f.tasks.append(asyncio.create_task(f.supervisor.run(), name="feed supervisor"))
        if poll:
            assert cfg.feed.fallback_url, "poll=True needs feed.fallback_url"
            f.session = aiohttp.ClientSession()
            f.poller = FallbackPoller(
                poll_source(cfg.feed.fallback_url),
                cfg.feed.poll_interval,
                session=f.session,
                supervisor=f.supervisor,
                book=book,
                metrics=metrics,
                symbols=lambda: cfg.feed.symbols,
                on_prices=f.on_prices,
            )
            f.tasks.append(asyncio.create_task(f.poller.run(), name="fallback poller"))
        return f

    try:
        yield start
    finally:
        errors: list[BaseException] = []
        for f in feeds:
            try:
                await f.stop()
            except AssertionError as exc:
                errors.append(exc)
        if errors:
            raise errors[0]


@pytest.fixture
async def poll_server() -> AsyncIterator[Callable[..., Awaitable[str]]]:
    """`await poll_server(handler)`: a REST price server on 127.0.0.1:0 whose `GET /prices`
    `handler` answers; returns its URL."""
    runners: list[web.AppRunner] = []

    async def start(handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> str:
        app = web.Application()
        app.router.add_get("/prices", handler)
        runner = web.AppRunner(app)
        await runner.setup()
        await web.TCPSite(runner, LOOPBACK, 0).start()
        runners.append(runner)
        return f"http://{LOOPBACK}:{runner.addresses[0][1]}/prices"

    yield start
    for runner in runners:
        await runner.cleanup()


# ---------------------------------------------------------------------------
# A throw-away PostgreSQL server

REQUIRE_ENV = "TICKGUARD_SYSTEM_TESTS"  # "require" (CI): a missing server fails, not skips


def unavailable(reason: str) -> NoReturn:
    """Skip with `reason`, or fail when the environment requires these tests to run."""
    if os.environ.get(REQUIRE_ENV) == "require":
        pytest.fail(f"{reason} ({REQUIRE_ENV}=require)", pytrace=False)
    pytest.skip(reason)


def _pg_cluster() -> ModuleType:
    """tests/integration/pg_cluster.py, loaded by path (tests import nothing by name)."""
    name = "tickguard_test_pg_cluster"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            name, Path(__file__).with_name("pg_cluster.py")
        )
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    """A PostgreSQL server of our own on 127.0.0.1 (`.url`, `.port`, `.bin_dir`,
    `new_database()`, `stop()`/`start()`, `terminate(pid)`), removed after the session."""
    pg_cluster = _pg_cluster()
    try:
        server: PgServer = pg_cluster.PgServer.create()
    except pg_cluster.PgUnavailable as exc:
        unavailable(exc.reason)
    try:
        yield server
    finally:
        server.destroy()


@pytest.fixture
def pg_url(pg_server: PgServer) -> str:
    """A database of its own for this test, on the session's server (restarted if a test
    stopped it)."""
    if not pg_server.running():
        pg_server.start()
    return pg_server.new_database()
