"""A protocol-faithful fake of Upstox Market Data Feed V3, and a supervisor harness on it.

The fake follows shared/reference/broker-protocols.md section 1, on one aiohttp
server at 127.0.0.1 port 0:

- `GET /v3/feed/market-data-feed/authorize` with `Authorization: Bearer <token>`
  answers a single-use `ws://…/v3/feed?requestId=…&code=…`, or 401 with Upstox's
  error body for any other token;
- `GET /v3/feed` is the socket: an unknown or reused code is refused 403 at the
  handshake; otherwise it sends a `market_info` frame, and answers each binary
  JSON `sub` with an `initial_feed` snapshot of the new keys, then streams
  `live_feed` frames (LTPC with exchange times) every `interval` seconds. All
  server frames are protobuf FeedResponses serialized by the protobuf runtime
  from the code generated for Upstox's MarketDataFeedV3.proto, so the wire
  format is the one Upstox's own encoder writes;
- `GET /v3/market-quote/ltp?instrument_key=A,B` answers the REST LTP body,
  keyed by `SEGMENT:NAME`, not by instrument key.

Anything the client does that Upstox would not accept (a text frame, a `sub`
that breaks the documented shape) is recorded and fails the test at teardown.

Tests run with `--import-mode=importlib`: test modules reach all of this
through the fixtures `upstox_feed_server` and `upstox_feed`, and the broker
fake of tests/integration/test_upstox_broker.py (orders and the account)
through `upstox_broker_fakes` and `fake_upstox`.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import random
import secrets
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import aiohttp
import pytest
from aiohttp import WSMsgType, web
from prometheus_client import CollectorRegistry

from tickguard.config import Config, parse_config
from tickguard.core.prices import PriceBook, PriceSource
from tickguard.feed import MarketDataFeedV3_pb2 as v3
from tickguard.feed.dns import ResolverChain
from tickguard.feed.supervisor import FeedSupervisor
from tickguard.feed.upstox import UpstoxProtocol, authorize
from tickguard.metrics import Metrics

LOOPBACK = "127.0.0.1"
GOOD_TOKEN = "eyJ0-upstox-feed-secret-token-5678"  # distinctive: no log line may contain it
INVALID_TOKEN = {"errorCode": "UDAPI100050", "message": "Invalid token used to access API"}
MODES = ("ltpc", "full", "option_greeks", "full_d30")
INITIAL_FEED, LIVE_FEED, MARKET_INFO = v3.initial_feed, v3.live_feed, v3.market_info
STOP_TIMEOUT = 5.0


# ---------------------------------------------------------------------------
# FeedResponse frames, serialized by the protobuf runtime (MarketDataFeedV3.proto)


def ltpc_message(ltp: float, ltt: int, ltq: int = 1, cp: float = 100.0) -> v3.LTPC:
    return v3.LTPC(ltp=ltp, ltt=ltt, ltq=ltq, cp=cp)


def feeds_response(kind: int, prices: Mapping[str, tuple[float, int]], current_ts: int) -> bytes:
    """A FeedResponse of `kind` with one `Feed{ltpc}` map entry per key.

    Serialized in field order: type, the feeds entries (key, value), currentTs;
    the entries of one-key responses concatenate into one response.
    """
    response = v3.FeedResponse(type=kind, currentTs=current_ts)
    for key, (ltp, ltt) in prices.items():
        feed = response.feeds[key]
        feed.ltpc.CopyFrom(ltpc_message(ltp, ltt))
        feed.requestMode = v3.ltpc
    return response.SerializeToString()


def market_info_response(current_ts: int) -> bytes:
    response = v3.FeedResponse(type=MARKET_INFO, currentTs=current_ts)
    for segment in ("NSE_EQ", "NSE_INDEX", "NSE_FO"):
        response.marketInfo.segmentStatus[segment] = v3.NORMAL_OPEN
    return response.SerializeToString()


def _now_ms() -> int:
    return int(time.time() * 1000)  # exchange times are wall-clock epoch ms


# ---------------------------------------------------------------------------
# The fake


@dataclass(frozen=True, slots=True)
class Sub:
    """One `sub` request a socket received."""

    connection: int  # index in UpstoxFeedServer.connections
    guid: str
    mode: str
    keys: tuple[str, ...]


class UpstoxFeedServer:
    """The authorize, socket and LTP endpoints of Upstox on loopback; see the module docstring.

    Knobs: `token` (the only valid one), `interval` (live frame period),
    `authorize_status` / `authorize_body` (override the authorize answer),
    `authorize_stall` (never answer authorize).
    """

    def __init__(self, token: str = GOOD_TOKEN, interval: float = 0.02) -> None:
        self.token = token
        self.interval = interval
        self.port = 0
        self.authorize_status = 200
        self.authorize_body: bytes | None = None
        self.authorize_stall = False
        self.authorizations = 0  # authorize requests, good or bad
        self.issued: list[tuple[str, str]] = []  # (requestId, code) handed out
        self.handshakes = 0  # socket upgrade requests
        self.rejected = 0  # upgrades refused 403 (unknown or reused code)
        self.connections: list[web.WebSocketResponse] = []
        self.subs: list[Sub] = []
        self.snapshots: list[dict[str, float]] = []  # each initial_feed sent: key -> ltp
        self.ltp_requests = 0
        self.prices: dict[str, float] = {}
        self.errors: list[str] = []  # client behaviour Upstox would refuse
        self._codes: dict[str, str] = {}  # unused code -> requestId
        self._runner: web.AppRunner | None = None
        self._streams: set[asyncio.Task[None]] = set()
        self._closing = asyncio.Event()  # releases stalled handlers

    @property
    def api_url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    @property
    def ws_url(self) -> str:
        """The socket's base URL (without a code it is refused)."""
        return f"ws://{LOOPBACK}:{self.port}/v3/feed"

    def secrets(self) -> list[str]:
        """Every string that must never be logged: the token, each requestId and code."""
        return [self.token, *(s for pair in self.issued for s in pair)]

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/v3/feed/market-data-feed/authorize", self._authorize)
        app.router.add_get("/v3/feed", self._socket)
        app.router.add_get("/v3/market-quote/ltp", self._ltp)
        self._runner = web.AppRunner(app, handle_signals=False, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, LOOPBACK, 0)
        await site.start()
        self.port = self._runner.addresses[0][1]

    async def drop_connections(self) -> None:
        """Close every open socket from the server side (code 1001, going away)."""
        for ws in self.connections:
            if not ws.closed:
                await ws.close(code=aiohttp.WSCloseCode.GOING_AWAY, message=b"going away")

    def rest_routes(self) -> list[web.RouteDef]:
        """The authorize and LTP endpoints, for the broker fake to serve too: Upstox serves
        them on its API host beside the positions and order lookups."""
        return [
            web.get("/v3/feed/market-data-feed/authorize", self._authorize),
            web.get("/v3/market-quote/ltp", self._ltp),
        ]

    async def close(self) -> None:
        """Close the sockets and stop serving; raise what the client did wrong."""
        self._closing.set()
        await self.drop_connections()
        for task in self._streams:
            task.cancel()
        if self._runner is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(STOP_TIMEOUT):
                    await self._runner.cleanup()
        if self.errors:
            raise AssertionError(f"the fake Upstox saw a protocol violation: {self.errors[0]}")

    # -- endpoints -----------------------------------------------------------

    def _authorized(self, request: web.Request) -> bool:
        return request.headers.get("Authorization") == f"Bearer {self.token}"

    @staticmethod
    def _refused(status: int, error: Mapping[str, str]) -> web.Response:
        return web.json_response({"status": "error", "errors": [dict(error)]}, status=status)

    async def _authorize(self, request: web.Request) -> web.StreamResponse:
        self.authorizations += 1
        if request.headers.get("Accept") != "application/json":
            self.errors.append("authorize without Accept: application/json")
        if self.authorize_stall:
            await self._closing.wait()  # until the client goes away or the server closes
        if not self._authorized(request):
            return self._refused(401, INVALID_TOKEN)
        if self.authorize_body is not None or self.authorize_status != 200:
            return web.Response(
                status=self.authorize_status,
                body=self.authorize_body or b"",
                content_type="application/json",
            )
        request_id, code = uuid.uuid4().hex, secrets.token_urlsafe(12)
        self._codes[code] = request_id
        self.issued.append((request_id, code))
        uri = f"{self.ws_url}?requestId={request_id}&code={code}"
        return web.json_response({"status": "success", "data": {"authorized_redirect_uri": uri}})

    async def _socket(self, request: web.Request) -> web.StreamResponse:
        self.handshakes += 1
        code = request.query.get("code", "")
        if self._codes.pop(code, None) != request.query.get("requestId"):
            self.rejected += 1
            return web.Response(status=403, text="Forbidden")
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        index = len(self.connections)
        self.connections.append(ws)
        keys: list[str] = []
        stream: asyncio.Task[None] | None = None
        try:
            await ws.send_bytes(market_info_response(_now_ms()))
            async for msg in ws:
                if msg.type is not WSMsgType.BINARY:
                    self.errors.append(f"a {msg.type.name} frame (Upstox takes binary JSON)")
                    continue
                sub = self._parse_sub(index, msg.data)
                if sub is None:
                    continue
                self.subs.append(sub)
                added = [k for k in sub.keys if k not in keys]
                keys.extend(added)
                snapshot = {k: self.prices.setdefault(k, 100.0) for k in added}
                self.snapshots.append(snapshot)
                ltt = _now_ms()
                frame = {k: (v, ltt) for k, v in snapshot.items()}
                await ws.send_bytes(feeds_response(INITIAL_FEED, frame, ltt))
                if stream is None:
                    stream = asyncio.create_task(self._stream(ws, keys))
                    self._streams.add(stream)
        except ConnectionResetError:
            pass
        finally:
            if stream is not None:
                stream.cancel()
                self._streams.discard(stream)
        return ws

    def _parse_sub(self, index: int, data: bytes) -> Sub | None:
        try:
            request = json.loads(data.decode("utf-8"))
            guid, method = request["guid"], request["method"]
            mode, keys = request["data"]["mode"], request["data"]["instrumentKeys"]
        except (ValueError, TypeError, KeyError) as exc:
            self.errors.append(f"a request that is not the documented JSON: {exc!r}")
            return None
        if not (isinstance(guid, str) and guid) or method != "sub" or mode not in MODES:
            self.errors.append(f"a bad request header: {request!r}")
            return None
        if not (isinstance(keys, list) and keys and all(isinstance(k, str) for k in keys)):
            self.errors.append(f"bad instrumentKeys: {keys!r}")
            return None
        return Sub(index, guid, mode, tuple(keys))

    async def _stream(self, ws: web.WebSocketResponse, keys: list[str]) -> None:
        """A live_feed frame for every subscribed key each interval, prices rising by 0.05."""
        with contextlib.suppress(ConnectionResetError):
            while not ws.closed:
                await asyncio.sleep(self.interval)
                ltt = _now_ms()
                frame: dict[str, tuple[float, int]] = {}
                for key in keys:
                    self.prices[key] = round(self.prices[key] + 0.05, 2)
                    frame[key] = (self.prices[key], ltt)
                if not ws.closed:
                    await ws.send_bytes(feeds_response(LIVE_FEED, frame, ltt))

    async def _ltp(self, request: web.Request) -> web.StreamResponse:
        self.ltp_requests += 1
        if not self._authorized(request):
            return self._refused(401, INVALID_TOKEN)
        keys = [k for k in request.query.get("instrument_key", "").split(",") if k]
        data: dict[str, dict[str, Any]] = {}
        for key in keys:
            segment, _, isin = key.partition("|")
            price = self.prices.get(key, 100.0)
            data[f"{segment}:{isin[-6:]}"] = {
                "last_price": price,
                "instrument_token": key,
                "ltq": 1,
                "volume": 1000,
                "cp": 100.0,
            }
        return web.json_response({"status": "success", "data": data})


UpstoxFeedServerFactory = Callable[..., Awaitable[UpstoxFeedServer]]


@pytest.fixture
async def upstox_feed_server() -> AsyncIterator[UpstoxFeedServerFactory]:
    """`await upstox_feed_server(token=GOOD_TOKEN, interval=0.02)`: started, closed at teardown."""
    servers: list[UpstoxFeedServer] = []

    async def start(token: str = GOOD_TOKEN, interval: float = 0.02) -> UpstoxFeedServer:
        server = UpstoxFeedServer(token, interval)
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
# The broker fake (orders and the account), on the same API host as authorize and LTP

BROKER_FAKES = Path(__file__).parent.parent / "test_upstox_broker.py"


@pytest.fixture(scope="session")
def upstox_broker_fakes() -> ModuleType:
    """tests/integration/test_upstox_broker.py as a module: `FakeUpstox`, `TOKEN`, ..."""
    name = "tickguard_upstox_broker_fakes"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, BROKER_FAKES)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


FakeUpstoxFactory = Callable[..., Awaitable[Any]]


@pytest.fixture
async def fake_upstox(upstox_broker_fakes: ModuleType) -> AsyncIterator[FakeUpstoxFactory]:
    """`await fake_upstox(feed_server)`: a started `FakeUpstox` that also serves the feed
    server's authorize and LTP (start the feed server with the fake's `TOKEN`); closed at
    teardown."""
    fakes: list[Any] = []

    async def start(feed_server: UpstoxFeedServer | None = None) -> Any:
        fake = upstox_broker_fakes.FakeUpstox()
        fakes.append(fake)
        await fake.start(feed_server.rest_routes() if feed_server is not None else ())
        return fake

    try:
        yield start
    finally:
        for fake in fakes:
            await fake.close()


# ---------------------------------------------------------------------------
# The supervisor under test on the fake


@dataclass(frozen=True, slots=True)
class Received:
    """One price the supervisor handed on: symbol, value, exchange time."""

    symbol: str
    price: float
    exchange_ts: int | None


@dataclass(eq=False)
class UpstoxFeed:
    """A FeedSupervisor speaking UpstoxProtocol, authorizing at the fake before each connect."""

    server: UpstoxFeedServer
    config: Config
    registry: CollectorRegistry
    book: PriceBook
    session: aiohttp.ClientSession
    supervisor: FeedSupervisor = field(init=False)
    received: list[Received] = field(default_factory=list)
    task: asyncio.Task[None] | None = None

    def on_prices(self, symbols: list[str], source: PriceSource) -> None:
        for symbol in symbols:
            price = self.book.get(symbol)
            if price is not None and source is PriceSource.LIVE:
                self.received.append(Received(symbol, price.value, price.exchange_ts))

    def metric(self, name: str, **labels: str) -> float:
        value = self.registry.get_sample_value(name, labels)
        return 0.0 if value is None else value

    def bad_messages(self) -> dict[str, float]:
        """tickguard_feed_bad_messages_total by reason, non-zero ones only."""
        return {
            s.labels["reason"]: s.value
            for metric in self.registry.collect()
            for s in metric.samples
            if s.name == "tickguard_feed_bad_messages_total" and s.value
        }

    async def stop(self) -> None:
        task, self.task = self.task, None
        if task is not None and not task.done():
            task.cancel()
            _, pending = await asyncio.wait({task}, timeout=STOP_TIMEOUT)
            if pending:
                raise AssertionError("the supervisor did not stop when cancelled")
        await self.session.close()
        if task is not None and not task.cancelled() and task.exception() is not None:
            raise AssertionError("the supervisor crashed") from task.exception()


def _merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


UpstoxFeedFactory = Callable[..., Awaitable[UpstoxFeed]]


@pytest.fixture
async def upstox_feed() -> AsyncIterator[UpstoxFeedFactory]:
    """`await upstox_feed(server, symbols=[...], token=..., config={...})`: a running supervisor."""
    feeds: list[UpstoxFeed] = []

    async def start(
        server: UpstoxFeedServer,
        *,
        symbols: Sequence[str],
        token: str = GOOD_TOKEN,
        config: Mapping[str, Any] | None = None,
        seed: int = 7,
    ) -> UpstoxFeed:
        base: dict[str, Any] = {
            "feed": {
                "url": server.ws_url,
                "symbols": list(symbols),
                "ping_interval": 0.1,
                "ping_timeout": 1.0,
                "silence_timeout": 2.0,
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
        cfg = parse_config(_merge(base, config or {}), env={})
        registry = CollectorRegistry()
        metrics = Metrics(registry)
        book = PriceBook(cfg.prices.stale_warning, cfg.prices.cache_timeout)
        session = aiohttp.ClientSession()

        async def endpoint() -> str:
            return await authorize(session, server.api_url, token, timeout=2.0)

        f = UpstoxFeed(server, cfg, registry, book, session)
        f.supervisor = FeedSupervisor(
            cfg.feed,
            protocol=UpstoxProtocol(),
            resolver=ResolverChain(cfg.dns, None, metrics),
            book=book,
            metrics=metrics,
            symbols=lambda: cfg.feed.symbols,
            on_prices=f.on_prices,
            market_open=lambda: True,
            rng=random.Random(seed),
            endpoint=endpoint,
        )
        feeds.append(f)
        f.task = asyncio.create_task(f.supervisor.run(), name="upstox feed supervisor")
        return f

    try:
        yield start
    finally:
        errors: list[AssertionError] = []
        for f in feeds:
            try:
                await f.stop()
            except AssertionError as exc:
                errors.append(exc)
        if errors:
            raise errors[0]
