"""The HTTP API (SPEC section 4) against the daemon running in-process.

Each test builds the daemon with `app.build`, runs it with `app.serve` on
127.0.0.1:0 (the port comes from the `[HTTP] listening on` log line) and
talks to it with aiohttp. Prices come from a tiny `json`-protocol WebSocket
server the test controls; orders go to the paper broker, whose faults the
tests inject through the Daemon object.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from tickguard import app
from tickguard.api import build_app
from tickguard.brokers.paper import PaperBroker, PaperFault
from tickguard.config import parse_config
from tickguard.store import Store

LOOPBACK = "127.0.0.1"
TOKEN = "t0ken-for-tests"
STARTUP = 10.0  # seconds the daemon may take to listen
LISTENING_RE = re.compile(r"\[HTTP\] listening on 127\.0\.0\.1:(\d+)")
NO_BODY: Any = object()

# SPEC section 5: every series, with its Prometheus type.
SPEC_METRICS = {
    "tickguard_websocket_connected": "gauge",
    "tickguard_websocket_reconnect_attempts_total": "counter",
    "tickguard_websocket_network_errors_total": "counter",
    "tickguard_ticks_total": "counter",
    "tickguard_feed_bad_messages_total": "counter",
    "tickguard_dns_lookups_total": "counter",
    "tickguard_dns_fallbacks_total": "counter",
    "tickguard_price_age_seconds": "gauge",
    "tickguard_price_age_max_seconds": "gauge",
    "tickguard_stale_symbols": "gauge",
    "tickguard_last_tick_timestamp_seconds": "gauge",
    "tickguard_fallback_active": "gauge",
    "tickguard_exits_total": "counter",
    "tickguard_exit_failures_total": "counter",
    "tickguard_order_seconds": "histogram",
    "tickguard_open_positions": "gauge",
    "tickguard_market_open": "gauge",
    "tickguard_watchdog_pings_total": "counter",
    "tickguard_event_loop_lag_seconds": "gauge",
    "tickguard_build_info": "gauge",
}


async def eventually(predicate: Callable[[], object], timeout: float = 5.0, what: str = "") -> None:
    """Return once `predicate()` is true; fail if it is not within `timeout` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"not within {timeout:g}s: {what or predicate}")
        await asyncio.sleep(0.01)


def assert_error(status: int, body: Any, expected: int, code: str | None = None) -> None:
    """`body` is a SPEC error (`status`, `error`, `message`) answered with `expected`."""
    assert status == expected, (status, body)
    assert isinstance(body, dict), body
    assert body["status"] == "error", body
    assert isinstance(body["error"], str) and body["error"], body
    assert isinstance(body["message"], str) and body["message"], body
    if code is not None:
        assert body["error"] == code, body


def unused_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        port: int = s.getsockname()[1]
    return port


# ---------------------------------------------------------------------------
# A json-protocol feed that sends the prices the test sets


class TickServer:
    """A `json` feed on 127.0.0.1:0: on subscribe it sends the known prices, then each change."""

    def __init__(self) -> None:
        self.prices: dict[str, float] = {}
        self.clients: dict[ServerConnection, set[str]] = {}
        self.subscriptions: list[set[str]] = []
        self.port = 0
        self._server: Server | None = None

    @property
    def url(self) -> str:
        return f"ws://{LOOPBACK}:{self.port}/ws"

    async def start(self) -> None:
        self._server = await serve(self._handler, LOOPBACK, 0)
        self.port = next(iter(self._server.sockets)).getsockname()[1]

    async def set_price(self, symbol: str, price: float) -> None:
        self.prices[symbol] = price
        for ws, symbols in list(self.clients.items()):
            if symbol in symbols:
                with contextlib.suppress(ConnectionClosed):
                    await ws.send(self._frame([symbol]))

    def _frame(self, symbols: list[str]) -> str:
        ticks = [{"symbol": s, "price": self.prices[s]} for s in symbols]
        return json.dumps({"type": "ticks", "ticks": ticks})

    async def _handler(self, ws: ServerConnection) -> None:
        try:
            async for message in ws:
                data = json.loads(message)
                if data.get("op") != "subscribe":
                    continue
                symbols = set(data["symbols"])
                self.clients[ws] = symbols
                self.subscriptions.append(symbols)
                known = sorted(s for s in symbols if s in self.prices)
                if known:
                    await ws.send(self._frame(known))
        except ConnectionClosed:
            pass
        finally:
            self.clients.pop(ws, None)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


@pytest.fixture
async def ticks() -> AsyncIterator[TickServer]:
    """A started TickServer, closed at teardown."""
    server = TickServer()
    await server.start()
    try:
        yield server
    finally:
        await server.close()


# ---------------------------------------------------------------------------
# The daemon, in-process


class _ListenWatcher(logging.Handler):
    """Resolves `port` from the `[HTTP] listening on` line."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.port: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    def emit(self, record: logging.LogRecord) -> None:
        found = LISTENING_RE.search(record.getMessage())
        if found is not None and not self.port.done():
            self.port.set_result(int(found.group(1)))


@dataclass(eq=False)
class Running:
    """A daemon served in this event loop, and an HTTP client for it."""

    daemon: app.Daemon
    state_dir: Path
    port: int
    stop_event: asyncio.Event
    task: asyncio.Task[int]
    http: aiohttp.ClientSession = field(default_factory=aiohttp.ClientSession)

    @property
    def base(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    @property
    def paper(self) -> PaperBroker:
        broker = self.daemon.broker
        assert isinstance(broker, PaperBroker)
        return broker

    async def call(
        self,
        method: str,
        path: str,
        body: Any = NO_BODY,
        *,
        token: str | None = TOKEN,
        raw: bytes | None = None,
    ) -> tuple[int, Any]:
        """(status, decoded JSON body, or the text if it is not JSON)."""
        headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
        kwargs: dict[str, Any] = {}
        if raw is not None:
            kwargs["data"] = raw
            headers["Content-Type"] = "application/json"
        elif body is not NO_BODY:
            kwargs["json"] = body
        async with self.http.request(
            method,
            self.base + path,
            headers=headers,
            timeout=aiohttp.ClientTimeout(total=15),
            **kwargs,
        ) as response:
            text = await response.text()
            if response.content_type == "application/json":
                return response.status, json.loads(text)
            return response.status, text

    async def open(
        self, symbol: str, side: str, quantity: float, entry: float, **rules: float
    ) -> dict[str, Any]:
        """POST a position; it must answer 201."""
        spec = {"symbol": symbol, "side": side, "quantity": quantity, "entry_price": entry}
        status, body = await self.call("POST", "/api/v1/positions", {**spec, **rules})
        assert status == 201, body
        return body  # type: ignore[no-any-return]

    async def priced(self, symbol: str, price: float) -> None:
        """Wait until the daemon's price book holds `price` for `symbol`."""

        def has() -> bool:
            p = self.daemon.book.get(symbol)
            return p is not None and p.value == price

        await eventually(has, what=f"{symbol} priced {price}")

    async def close(self, symbol: str, reason: str = "emergency") -> tuple[int, Any]:
        return await self.call(
            "POST",
            "/api/v1/monitoring/emergency-close-position",
            {"symbol": symbol, "reason": reason},
        )

    async def stop(self) -> int:
        """Stop the daemon (as SIGTERM would) and return its exit code."""
        self.stop_event.set()
        await self.http.close()
        async with asyncio.timeout(15):
            return await self.task


Start = Callable[..., Awaitable[Running]]


@pytest.fixture
async def start(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Start]:
    """`await start(feed_url, symbols=(), token=True, state_dir=None, **tables)`: a running daemon."""
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    logger = logging.getLogger("tickguard")
    level = logger.level
    logger.setLevel(logging.INFO)
    started: list[Running] = []
    token_file = tmp_path / "token"
    token_file.write_text(f"  {TOKEN}\n")

    async def start_daemon(
        feed_url: str,
        *,
        symbols: tuple[str, ...] = (),
        token: bool = True,
        state_dir: Path | None = None,
        **tables: dict[str, Any],
    ) -> Running:
        state = state_dir or tmp_path / "state"
        data: dict[str, Any] = {
            "daemon": {"state_dir": str(state)},
            "http": {"listen": f"{LOOPBACK}:0", "token_file": str(token_file) if token else ""},
            "feed": {
                "url": feed_url,
                "symbols": list(symbols),
                "ping_interval": 1.0,
                "ping_timeout": 2.0,
                "silence_timeout": 60.0,
                "reconnect": {"initial_delay": 0.05, "max_delay": 0.2},
            },
            "dns": {"fallback_servers": []},
            "market": {"always_open": True},
            "guard": {"sweep_interval": 0.05},
            **tables,
        }
        config = parse_config(data, env={})
        daemon = await app.build(config)
        watcher = _ListenWatcher()
        logging.getLogger("tickguard.app").addHandler(watcher)
        stop_event = asyncio.Event()
        task = asyncio.create_task(app.serve(daemon, stop=stop_event))
        try:
            await asyncio.wait(
                [watcher.port, task], timeout=STARTUP, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            logging.getLogger("tickguard.app").removeHandler(watcher)
        if not watcher.port.done():
            stop_event.set()
            raise AssertionError(f"the daemon did not listen: {task}")
        running = Running(daemon, state, watcher.port.result(), stop_event, task)
        started.append(running)
        return running

    try:
        yield start_daemon
    finally:
        for running in started:
            if not running.task.done():
                await running.stop()
            else:
                await running.http.close()
        logger.setLevel(level)


# ---------------------------------------------------------------------------
# Emergency close


async def test_close_needs_the_token(ticks: TickServer, start: Start) -> None:
    """Emergency close answers 401 without a token and with a wrong one, and sends no order."""
    d = await start(ticks.url)
    await d.open("BOSCHLTD", "long", 38, 735.0)
    body = {"symbol": "BOSCHLTD", "reason": "emergency"}
    path = "/api/v1/monitoring/emergency-close-position"
    assert_error(*await d.call("POST", path, body, token=None), 401, "unauthorized")
    assert_error(*await d.call("POST", path, body, token="wrong-" + TOKEN), 401, "unauthorized")
    assert_error(*await d.call("POST", path, body, token=TOKEN[:-1]), 401, "unauthorized")
    status, listed = await d.call("GET", "/api/v1/positions")
    assert status == 200
    assert [p["state"] for p in listed["positions"]] == ["open"]
    assert d.daemon.store.paper_fill_count() == 0


async def test_close_rejects_bad_requests(ticks: TickServer, start: Start) -> None:
    """Bad JSON and an unknown reason answer 400; a symbol never seen answers 404."""
    d = await start(ticks.url)
    await d.open("BOSCHLTD", "long", 38, 735.0)
    path = "/api/v1/monitoring/emergency-close-position"
    assert_error(*await d.call("POST", path, raw=b"{not json"), 400, "bad_json")
    status, body = await d.call("POST", path, {"symbol": "BOSCHLTD", "reason": "panic"})
    assert_error(status, body, 400)
    assert "reason" in body["message"]
    assert_error(*await d.call("POST", path, ["BOSCHLTD"]), 400)
    assert_error(*await d.close("NOSUCH"), 404, "not_found")
    assert d.daemon.guard.position("BOSCHLTD") is not None


async def test_close_long_and_short(ticks: TickServer, start: Start) -> None:
    """A close answers the seed's shape with the pnl sign of each side, and 409 the second time."""
    ticks.prices.update(BOSCHLTD=575.0, ADANIENT=1900.0)
    d = await start(ticks.url)
    await d.open("BOSCHLTD", "long", 38, 735.0, stop_loss=500.0, take_profit=900.0)
    await d.open("ADANIENT", "short", 10, 2000.0, stop_loss=2200.0, take_profit=1500.0)
    await d.priced("BOSCHLTD", 575.0)
    await d.priced("ADANIENT", 1900.0)

    status, long = await d.close("BOSCHLTD", "stop_loss")
    assert status == 200, long
    seed = {
        "status": "success",
        "symbol": "BOSCHLTD",
        "entry_price": 735.0,
        "exit_price": 575.0,
        "pnl": -6080.0,
        "reason": "stop_loss",
    }
    assert {k: long[k] for k in seed} == seed

    status, short = await d.close("ADANIENT")
    assert status == 200, short
    assert short["exit_price"] == 1900.0
    assert short["pnl"] == pytest.approx(1000.0)  # (entry - exit) x quantity
    assert short["reason"] == "emergency"

    status, again = await d.close("BOSCHLTD")
    assert_error(status, again, 409, "conflict")
    assert again["state"] == "closed"
    assert d.daemon.store.paper_fill_count() == 2


async def test_close_conflict_survives_restart(ticks: TickServer, start: Start) -> None:
    """A position closed before a restart answers 409 after it, and no order is sent."""
    ticks.prices["BOSCHLTD"] = 700.0
    d = await start(ticks.url)
    await d.open("BOSCHLTD", "long", 5, 735.0)
    await d.priced("BOSCHLTD", 700.0)
    status, body = await d.close("BOSCHLTD")
    assert status == 200, body
    assert await d.stop() == 0

    again = await start(ticks.url, state_dir=d.state_dir)
    status, body = await again.close("BOSCHLTD")
    assert_error(status, body, 409, "conflict")
    assert body["state"] == "closed"
    assert again.daemon.guard.position("BOSCHLTD") is None
    assert await again.stop() == 0
    assert Store.in_dir(d.state_dir).paper_fill_count() == 1


async def test_concurrent_closes_send_one_order(ticks: TickServer, start: Start) -> None:
    """Twenty concurrent closes of one position send one order: one 200, nineteen 409."""
    ticks.prices["BOSCHLTD"] = 700.0
    d = await start(ticks.url)
    d.paper.latency = 0.05  # keep the exit in flight while the other calls arrive
    await d.open("BOSCHLTD", "long", 5, 735.0)
    await d.priced("BOSCHLTD", 700.0)

    answers = await asyncio.gather(*(d.close("BOSCHLTD") for _ in range(20)))
    statuses = sorted(status for status, _ in answers)
    assert statuses == [200] + [409] * 19, answers
    for status, body in answers:
        if status == 409:
            assert_error(status, body, 409, "conflict")
            assert body["state"] in ("exiting", "closed")
    assert await d.stop() == 0
    assert Store.in_dir(d.state_dir).paper_fill_count() == 1


async def test_close_all_reports_each_position(ticks: TickServer, start: Start) -> None:
    """Close-all answers `partial` when the broker refuses one, then `success`, then an empty list."""
    ticks.prices.update(BOSCHLTD=700.0, ADANIENT=1900.0, TCS=3000.0)
    d = await start(ticks.url)
    await d.open("BOSCHLTD", "long", 5, 735.0)
    await d.open("ADANIENT", "short", 10, 2000.0)
    await d.open("TCS", "long", 2, 2900.0)
    for symbol, price in ticks.prices.items():
        await d.priced(symbol, price)
    d.paper.faults.append(PaperFault.REJECT)  # the first order sent is refused
    path = "/api/v1/monitoring/emergency-close-all"

    status, body = await d.call("POST", path, {"reason": "emergency"})
    assert status == 200, body
    assert body["status"] == "partial"
    results = {r["symbol"]: r for r in body["results"]}
    assert set(results) == {"BOSCHLTD", "ADANIENT", "TCS"}
    refused = [r for r in body["results"] if r["status"] == "error"]
    assert len(refused) == 1, body
    assert refused[0]["error"] == "broker_rejected" and refused[0]["message"]
    pnl = {"BOSCHLTD": -175.0, "ADANIENT": 1000.0, "TCS": 200.0}
    for r in body["results"]:
        if r["status"] == "success":
            assert r["reason"] == "emergency"
            assert r["pnl"] == pytest.approx(pnl[r["symbol"]])

    status, body = await d.call("POST", path, raw=b"")  # the body is optional
    assert status == 200, body
    assert body["status"] == "success"
    assert [r["symbol"] for r in body["results"]] == [refused[0]["symbol"]]

    status, body = await d.call("POST", path, {})
    assert (status, body) == (200, {"status": "success", "results": []})
    assert d.daemon.store.paper_fill_count() == 3


async def test_broker_refusal_keeps_the_position_guarded(ticks: TickServer, start: Start) -> None:
    """A refused close answers 502, and the position stays open and exits on its stop later."""
    ticks.prices["BOSCHLTD"] = 700.0
    d = await start(ticks.url)
    await d.open("BOSCHLTD", "long", 5, 735.0, stop_loss=650.0)
    await d.priced("BOSCHLTD", 700.0)
    d.paper.faults.append(PaperFault.REJECT)

    status, body = await d.close("BOSCHLTD")
    assert_error(status, body, 502, "broker_rejected")
    status, listed = await d.call("GET", "/api/v1/positions")
    assert [(p["symbol"], p["state"]) for p in listed["positions"]] == [("BOSCHLTD", "open")]
    assert d.daemon.store.paper_fill_count() == 0

    await ticks.set_price("BOSCHLTD", 640.0)  # through the stop: the guard acts by itself

    def stopped_out() -> bool:
        return any(
            r.exit.reason.value == "stop_loss" and r.exit.state.value == "filled"
            for r in d.daemon.store.exits()
        )

    await eventually(stopped_out, what="a stop_loss exit filled")
    assert d.daemon.guard.position("BOSCHLTD") is None
    assert d.daemon.store.paper_fill_count() == 1


async def test_lost_reply_answers_502_and_never_sends_twice(
    ticks: TickServer, start: Start
) -> None:
    """A fill whose reply is lost answers 502; the retry finds the order and sends no second one."""
    ticks.prices["BOSCHLTD"] = 700.0
    d = await start(ticks.url)
    await d.open("BOSCHLTD", "long", 5, 735.0)
    await d.priced("BOSCHLTD", 700.0)
    d.paper.faults.append(PaperFault.LOST_REPLY)

    status, body = await d.close("BOSCHLTD")
    assert_error(status, body, 502, "broker_unavailable")
    await eventually(lambda: d.daemon.guard.position("BOSCHLTD") is None, what="reconciled")
    status, exits = await d.call("GET", "/api/v1/exits")
    assert [(e["state"], e["exit_price"]) for e in exits["exits"]] == [("filled", 700.0)]
    assert d.daemon.store.paper_fill_count() == 1


async def test_mutating_routes_answer_503_without_a_token(ticks: TickServer, start: Start) -> None:
    """With no token configured every mutating route answers 503 and the reads still work."""
    d = await start(ticks.url, token=False)
    spec = {"symbol": "BOSCHLTD", "side": "long", "quantity": 1, "entry_price": 10.0}
    for method, path, body in [
        ("POST", "/api/v1/monitoring/emergency-close-position", {"symbol": "BOSCHLTD"}),
        ("POST", "/api/v1/monitoring/emergency-close-all", {}),
        ("POST", "/api/v1/positions", spec),
        ("DELETE", "/api/v1/positions/BOSCHLTD", NO_BODY),
    ]:
        assert_error(*await d.call(method, path, body), 503, "no_token")
        assert_error(*await d.call(method, path, body, token=None), 503, "no_token")
    for path in ("/api/v1/positions", "/api/v1/exits", "/api/v1/monitoring/connection-health"):
        status, _ = await d.call("GET", path, token=None)
        assert status == 200, path
    assert d.daemon.guard.positions() == []


# ---------------------------------------------------------------------------
# Positions and exits


async def test_positions_add_list_delete(ticks: TickServer, start: Start) -> None:
    """POST answers 201 with the stored position (subscribed at once), 409 on a duplicate; DELETE sends no order."""
    d = await start(ticks.url, symbols=("TCS",))
    await eventually(lambda: ticks.subscriptions, what="the daemon subscribed")
    stored = await d.open("RELIANCE", "short", 3, 2500.0, stop_loss=2600.0, take_profit=2300.0)
    assert stored["symbol"] == "RELIANCE" and stored["state"] == "open"
    assert isinstance(stored["id"], int)
    assert {k: stored[k] for k in ("side", "quantity", "entry_price", "stop_loss")} == {
        "side": "short",
        "quantity": 3.0,
        "entry_price": 2500.0,
        "stop_loss": 2600.0,
    }
    assert stored["take_profit"] == 2300.0 and stored["trailing_stop"] is None
    await eventually(
        lambda: "RELIANCE" in ticks.subscriptions[-1], what="RELIANCE subscribed at once"
    )

    duplicate = {"symbol": "RELIANCE", "side": "long", "quantity": 1, "entry_price": 2500.0}
    assert_error(*await d.call("POST", "/api/v1/positions", duplicate), 409, "conflict")

    status, listed = await d.call("GET", "/api/v1/positions")
    assert status == 200
    assert [(p["symbol"], p["state"], p["id"]) for p in listed["positions"]] == [
        ("RELIANCE", "open", stored["id"])
    ]

    status, body = await d.call("DELETE", "/api/v1/positions/RELIANCE")
    assert status == 200, body
    assert body["symbol"] == "RELIANCE"
    assert d.daemon.guard.position("RELIANCE") is None
    assert_error(*await d.call("DELETE", "/api/v1/positions/RELIANCE"), 404, "not_found")
    status, listed = await d.call("GET", "/api/v1/positions")
    assert listed["positions"] == []
    status, listed = await d.call("GET", "/api/v1/positions?state=all")
    assert [(p["symbol"], p["state"]) for p in listed["positions"]] == [("RELIANCE", "closed")]
    status, exits = await d.call("GET", "/api/v1/exits")
    assert exits == {"exits": []}
    assert d.daemon.store.paper_fill_count() == 0
    again = await d.open("RELIANCE", "long", 1, 2500.0)  # a dropped symbol can be guarded anew
    assert again["id"] != stored["id"] and again["state"] == "open"


@pytest.mark.parametrize(
    ("change", "field_name"),
    [
        ({"stop_loss": 800.0, "take_profit": 700.0}, "stop_loss"),  # a long with SL above TP
        ({"side": "short", "stop_loss": 700.0, "take_profit": 800.0}, "stop_loss"),
        ({"quantity": 0}, "quantity"),
        ({"entry_price": -1.0}, "entry_price"),
        ({"trailing_stop": "5"}, "trailing_stop"),
        ({"side": "sideways"}, "side"),
        ({"colour": "red"}, "colour"),
        ({"symbol": None}, "symbol"),
    ],
)
async def test_invalid_positions_name_the_field(
    ticks: TickServer, start: Start, change: dict[str, Any], field_name: str
) -> None:
    """An invalid position spec answers 400 naming the offending field, and nothing is guarded."""
    d = await start(ticks.url)
    spec = {"symbol": "BOSCHLTD", "side": "long", "quantity": 38, "entry_price": 735.0}
    status, body = await d.call("POST", "/api/v1/positions", {**spec, **change})
    assert_error(status, body, 400, "bad_request")
    assert field_name in body["message"], body
    assert d.daemon.guard.positions() == []


async def test_exits_journal_has_the_spec_fields(ticks: TickServer, start: Start) -> None:
    """GET /api/v1/exits lists each exit with symbol, reason, source, order id, state, time, price, pnl."""
    ticks.prices["BOSCHLTD"] = 575.0
    d = await start(ticks.url)
    await d.open("BOSCHLTD", "long", 38, 735.0)
    await d.priced("BOSCHLTD", 575.0)
    status, closed = await d.close("BOSCHLTD", "stop_loss")
    assert status == 200, closed

    status, body = await d.call("GET", "/api/v1/exits", token=None)
    assert status == 200
    [exit] = body["exits"]
    assert exit["symbol"] == "BOSCHLTD"
    assert exit["reason"] == "stop_loss"
    assert exit["price_source"] == "manual"
    assert exit["client_order_id"] == closed["client_order_id"]
    assert exit["state"] == "filled"
    assert datetime.fromisoformat(exit["decided_at"]).utcoffset() is not None
    assert exit["exit_price"] == 575.0
    assert exit["pnl"] == pytest.approx(-6080.0)


# ---------------------------------------------------------------------------
# Health, readiness, metrics


async def test_healthz_and_readyz(ticks: TickServer, start: Start) -> None:
    """/healthz is 200; /readyz is 503 naming a guarded symbol without a price, then 200 once priced."""
    d = await start(ticks.url)
    status, body = await d.call("GET", "/healthz", token=None)
    assert (status, body) == (200, {"status": "ok"})
    status, body = await d.call("GET", "/readyz", token=None)
    assert status == 200, body  # nothing guarded: nothing missing

    await d.open("BOSCHLTD", "long", 5, 735.0)
    status, body = await d.call("GET", "/readyz", token=None)
    assert_error(status, body, 503, "not_ready")
    assert any("BOSCHLTD" in reason for reason in body["reasons"]), body
    assert "BOSCHLTD" in body["message"]

    await ticks.set_price("BOSCHLTD", 700.0)
    await d.priced("BOSCHLTD", 700.0)
    status, body = await d.call("GET", "/readyz", token=None)
    assert (status, body) == (200, {"status": "ready"})


async def test_metrics_export_every_spec_series(ticks: TickServer, start: Start) -> None:
    """/metrics parses, has every SPEC section-5 series with its type, and ages guarded symbols only."""
    ticks.prices.update(TCS=3000.0, BOSCHLTD=700.0)
    d = await start(ticks.url, symbols=("TCS",))
    await d.open("BOSCHLTD", "long", 5, 735.0)
    await d.open("ADANIENT", "short", 1, 2000.0)  # guarded, never priced
    await d.priced("TCS", 3000.0)
    await d.priced("BOSCHLTD", 700.0)

    status, text = await d.call("GET", "/metrics", token=None)
    assert status == 200
    assert isinstance(text, str)
    families = {f.name: f for f in text_string_to_metric_families(text)}
    types = {name: f.type for name, f in families.items()}
    for name, kind in SPEC_METRICS.items():
        family = name.removesuffix("_total") if kind == "counter" else name
        assert types.get(family) == kind, f"{name}: {types.get(family)}"
        assert name in text

    ages = {
        s.labels["symbol"]: s.value
        for s in families["tickguard_price_age_seconds"].samples
        if s.name == "tickguard_price_age_seconds"
    }
    assert set(ages) == {"BOSCHLTD", "ADANIENT"}  # TCS is priced but not guarded
    assert ages["BOSCHLTD"] < 5.0
    [build] = families["tickguard_build_info"].samples
    assert build.value == 1.0 and build.labels["version"]
    [stale] = families["tickguard_stale_symbols"].samples
    assert stale.value == 1.0  # ADANIENT has no price
    [opened] = families["tickguard_open_positions"].samples
    assert opened.value == 2.0


async def test_connection_health_has_the_seed_fields(ticks: TickServer, start: Start) -> None:
    """connection-health reports the socket, counters and every cached price with age and staleness."""
    ticks.prices.update(TCS=3000.0, BOSCHLTD=700.0)
    d = await start(ticks.url, symbols=("TCS",))
    await d.open("BOSCHLTD", "long", 5, 735.0)
    await d.priced("TCS", 3000.0)
    await d.priced("BOSCHLTD", 700.0)

    status, h = await d.call("GET", "/api/v1/monitoring/connection-health", token=None)
    assert status == 200
    assert datetime.fromisoformat(h["timestamp"]).utcoffset() is not None
    assert h["timestamp"].endswith("+05:30")  # the market's timezone (Asia/Kolkata)
    ws = h["websocket"]
    assert ws["connected"] is True
    assert ws["subscribed_symbols"] == 2
    assert isinstance(ws["reconnect_attempts"], int) and ws["reconnect_attempts"] >= 0
    assert isinstance(ws["network_errors"], int) and ws["network_errors"] >= 0
    cache = h["price_cache"]
    assert cache["cached_symbols"] == len(cache["cache_entries"]) == 2
    for symbol, price in (("TCS", 3000.0), ("BOSCHLTD", 700.0)):
        entry = cache["cache_entries"][symbol]
        assert entry["price"] == price
        assert isinstance(entry["age_seconds"], int | float) and 0 <= entry["age_seconds"] < 5
        assert entry["is_stale"] is False


async def test_connection_health_counts_failures(start: Start) -> None:
    """With the feed down, connection-health shows it disconnected with failures counted."""
    d = await start(f"ws://{LOOPBACK}:{unused_port()}/ws", symbols=("TCS",))

    async def health() -> dict[str, Any]:
        status, body = await d.call("GET", "/api/v1/monitoring/connection-health", token=None)
        assert status == 200
        return body  # type: ignore[no-any-return]

    def failed_twice() -> bool:
        value = d.daemon.metrics.registry.get_sample_value(
            "tickguard_websocket_reconnect_attempts_total"
        )
        return value is not None and value >= 2

    await eventually(failed_twice, what="two failed attempts")
    h = await health()
    ws = h["websocket"]
    assert ws["connected"] is False
    assert ws["reconnect_attempts"] >= 2
    assert ws["network_errors"] >= 2
    assert ws["subscribed_symbols"] == 1
    assert h["price_cache"] == {"cached_symbols": 0, "cache_entries": {}}


# ---------------------------------------------------------------------------
# The document and the error shape


async def test_openapi_documents_every_route(ticks: TickServer, start: Start) -> None:
    """Every route of the aiohttp app is in the served openapi.json, and nothing else is."""
    d = await start(ticks.url)
    status, document = await d.call("GET", "/api/v1/openapi.json", token=None)
    assert status == 200
    assert document["openapi"].startswith("3.")
    documented = {
        (path, method.upper())
        for path, operations in document["paths"].items()
        for method in operations
        if method in ("get", "post", "put", "patch", "delete")
    }
    routes = {
        (route.resource.canonical, route.method)
        for route in build_app(d.daemon.port, d.daemon.metrics.registry).router.routes()
        if route.resource is not None and route.method != "HEAD"
    }
    assert routes == documented
    error = document["components"]["schemas"]["Error"]
    assert set(error["required"]) == {"status", "error", "message"}


async def test_every_error_has_the_spec_shape(ticks: TickServer, start: Start) -> None:
    """Unknown routes, wrong methods, oversized and malformed bodies all answer the SPEC error shape."""
    d = await start(ticks.url)
    status, document = await d.call("GET", "/api/v1/openapi.json", token=None)
    close = "/api/v1/monitoring/emergency-close-position"
    cases: list[tuple[str, str, Any, bytes | None, int]] = [
        ("GET", "/api/v1/nowhere", NO_BODY, None, 404),
        ("PUT", "/api/v1/positions", {}, None, 405),
        ("POST", close, NO_BODY, b"x" * (128 * 1024), 413),
        ("POST", close, NO_BODY, b"[1, 2]", 400),
        ("POST", close, NO_BODY, b"", 400),
        ("POST", close, {"symbol": "X", "extra": 1}, None, 400),
        ("POST", close, {"reason": "emergency"}, None, 400),
        ("POST", "/api/v1/monitoring/emergency-close-all", {"reason": 7}, None, 400),
        ("POST", "/api/v1/positions", NO_BODY, b"nope", 400),
        ("POST", "/api/v1/positions", NO_BODY, b"\xff\xfe{", 400),  # not UTF-8
        ("POST", "/api/v1/monitoring/emergency-close-all", NO_BODY, b"\x80", 400),
        (
            "POST",
            "/api/v1/positions",
            {"symbol": "A\u0000B", "side": "long", "quantity": 1, "entry_price": 1},
            None,
            400,
        ),
        (
            "POST",
            "/api/v1/positions",
            {"symbol": "A", "side": "long", "quantity": 1e300, "entry_price": 1},
            None,
            400,
        ),
        ("POST", "/api/v1/positions", {"symbol": "X"}, None, 400),
        ("GET", "/api/v1/positions?state=weird", NO_BODY, None, 400),
        ("DELETE", "/api/v1/positions/NOSUCH", NO_BODY, None, 404),
        ("POST", close, {"symbol": "NOSUCH"}, None, 404),
    ]
    for method, path, body, raw, expected in cases:
        status, answer = await d.call(method, path, body, raw=raw)
        assert_error(status, answer, expected)
        operation = document["paths"].get(path.split("?")[0], {}).get(method.lower())
        if operation is not None and expected != 413:
            assert str(expected) in operation["responses"], (method, path, expected)
    async with d.http.request("TRACE", d.base + "/healthz") as response:
        assert response.status == 405 and "GET" in response.headers["Allow"]  # RFC 9110


async def test_no_token_in_logs(
    ticks: TickServer, start: Start, caplog: pytest.LogCaptureFixture
) -> None:
    """Neither a right nor a wrong token ever reaches a log line."""
    caplog.set_level(logging.DEBUG, logger="tickguard")
    d = await start(ticks.url)
    await d.open("BOSCHLTD", "long", 5, 735.0)
    await d.close("BOSCHLTD")
    await d.call("DELETE", "/api/v1/positions/BOSCHLTD", token="wrong-token-value")
    assert await d.stop() == 0
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert TOKEN not in text and "wrong-token-value" not in text


# ---------------------------------------------------------------------------
# The account (SPEC 8), on the paper broker's ledger


def account_tables(**account: Any) -> dict[str, Any]:
    return {"account": {"reconcile_interval": 0.1, **account}}


async def paper_trade(
    d: Running, symbol: str, side: str, quantity: float, price: float | None = None
) -> dict[str, Any]:
    """POST a paper trade (at the last price without `price`); it must answer 201."""
    body: dict[str, Any] = {"symbol": symbol, "side": side, "quantity": quantity}
    if price is not None:
        body["price"] = price
    status, answer = await d.call("POST", "/api/v1/paper/trades", body)
    assert status == 201, answer
    return answer  # type: ignore[no-any-return]


async def test_registering_a_position_fills_its_entry_on_the_paper_account(
    ticks: TickServer, start: Start
) -> None:
    """A registered position is the paper account's holding; the account shows it guarded."""
    ticks.prices["TCS"] = 3500.0
    d = await start(ticks.url, **account_tables())
    await d.open("TCS", "short", 4, 3510.0, stop_loss=3600.0)
    await eventually(
        lambda: (view := d.daemon.reconciler.view) is not None and "TCS" in view.holdings,
        what="a reconciliation that saw the entry",
    )
    status, body = await d.call("GET", "/api/v1/account")
    assert status == 200
    assert body["positions"] == [
        {"symbol": "TCS", "quantity": -4.0, "average_price": 3510.0, "guarded": True}
    ]
    assert body["reconciled_at"] is not None
    (position,) = (await d.call("GET", "/api/v1/positions"))[1]["positions"]
    assert position["origin"] == "api" and position["broker_quantity"] == -4.0


async def test_the_bot_closes_the_position_then_the_stop_crosses_nothing_is_sent(
    ticks: TickServer, start: Start
) -> None:
    """Closed outside tickguard (a paper trade), the position is closed as external; no order."""
    ticks.prices["INFY"] = 1500.0
    d = await start(ticks.url, **account_tables())
    await d.open("INFY", "long", 10, 1500.0, stop_loss=1400.0)
    await eventually(
        lambda: (p := d.daemon.guard.position("INFY")) is not None and p.confirmed,
        what="the broker showing the position held",
    )
    assert (await paper_trade(d, "INFY", "sell", 10))["quantity"] == 0.0
    await eventually(lambda: d.daemon.guard.position("INFY") is None, what="the external close")
    await ticks.set_price("INFY", 1300.0)  # through the stop: nothing left to guard
    exits = (await d.call("GET", "/api/v1/exits"))[1]["exits"]
    assert [(e["reason"], e["client_order_id"], e["state"]) for e in exits] == [
        ("external", None, "closed")
    ]
    assert d.paper.__class__.__name__ == "PaperBroker" and d.daemon.store.paper_fill_count() == 0
    metrics_text = (await d.call("GET", "/metrics"))[1]
    assert "tickguard_external_closes_total 1.0" in metrics_text


async def test_the_bot_halves_the_position_the_exit_sells_the_half(
    ticks: TickServer, start: Start
) -> None:
    """After the bot sold half, the guarded quantity shrinks and the stop sells only the rest."""
    ticks.prices["SBIN"] = 800.0
    d = await start(ticks.url, **account_tables())
    await d.open("SBIN", "long", 10, 800.0, stop_loss=750.0)
    await paper_trade(d, "SBIN", "sell", 5)
    await eventually(
        lambda: (p := d.daemon.guard.position("SBIN")) is not None and p.spec.quantity == 5,
        what="the shrink",
    )
    await ticks.set_price("SBIN", 740.0)
    await eventually(lambda: d.daemon.store.paper_fill_count() == 1, what="the exit's fill")
    await eventually(lambda: d.daemon.guard.position("SBIN") is None, what="closed")
    assert d.daemon.store.paper_position("SBIN") is None  # flat, not short
    (exit,) = [e for e in (await d.call("GET", "/api/v1/exits"))[1]["exits"] if e["symbol"] == "SBIN"]
    assert exit["quantity"] == 5 and exit["state"] == "filled"


async def test_an_exit_larger_than_the_holding_is_sized_down_before_it_is_sent(
    ticks: TickServer, start: Start
) -> None:
    """An exit decided before reconciliation noticed the bot's sale sells only what is held."""
    ticks.prices["ITC"] = 400.0
    d = await start(ticks.url, **account_tables(reconcile_interval=3600.0))
    await d.open("ITC", "long", 10, 400.0, stop_loss=380.0)
    await eventually(lambda: d.daemon.reconciler.view is not None, what="the first reconciliation")
    # The bot sells 6 straight into the ledger: no reconciliation is triggered.
    d.daemon.store.record_paper_trade("ITC", "sell", 6, 400.0, 0.0)
    await ticks.set_price("ITC", 370.0)
    await eventually(lambda: d.daemon.store.paper_fill_count() == 1, what="the clamped exit")
    assert d.daemon.store.paper_position("ITC") is None  # 4 sold, not 10: never through zero
    metrics_text = (await d.call("GET", "/metrics"))[1]
    assert "tickguard_exit_quantity_clamped_total 1.0" in metrics_text


async def test_a_broker_position_a_rule_matches_is_guarded(ticks: TickServer, start: Start) -> None:
    """With source broker, a position the bot opened is guarded by the first matching rule."""
    ticks.prices["WIPRO"] = 250.0
    d = await start(
        ticks.url,
        **account_tables(source="broker"),
        rules=[{"symbols": ["WIPRO"], "stop_loss_pct": 2.0, "take_profit_pct": 4.0}],
    )
    status, body = await d.call(
        "POST", "/api/v1/paper/trades", {"symbol": "WIPRO", "side": "buy", "quantity": 8, "price": 250.0}
    )
    assert status == 201 and body == {"symbol": "WIPRO", "quantity": 8.0, "average_price": 250.0}
    await eventually(lambda: d.daemon.guard.position("WIPRO") is not None, what="the import")
    position = d.daemon.guard.position("WIPRO")
    assert position is not None and position.origin == "broker"
    assert (position.spec.quantity, position.spec.stop_loss, position.spec.take_profit) == (
        8.0,
        245.0,
        260.0,
    )


async def test_an_unguarded_broker_position_is_reported(ticks: TickServer, start: Start) -> None:
    """With source config, a broker position nobody registered is unguarded, in metrics and API."""
    d = await start(ticks.url, **account_tables())
    await paper_trade(d, "HDFCBANK", "buy", 3, 1600.0)
    await eventually(
        lambda: [h.symbol for h in d.daemon.reconciler.unguarded()] == ["HDFCBANK"],
        what="reported unguarded",
    )
    (holding,) = (await d.call("GET", "/api/v1/account"))[1]["positions"]
    assert holding["guarded"] is False
    health = (await d.call("GET", "/api/v1/monitoring/connection-health"))[1]
    assert health["account"]["unguarded"] == [{"symbol": "HDFCBANK", "quantity": 3.0}]
    assert health["status"] == "degraded"
    assert "tickguard_unguarded_positions 1.0" in (await d.call("GET", "/metrics"))[1]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"symbol": "A", "side": "hold", "quantity": 1, "price": 1.0}, "side"),
        ({"symbol": "A", "side": "buy", "quantity": 10**400, "price": 1.0}, "quantity"),
        ({"symbol": "A", "side": "buy", "quantity": -1, "price": 1.0}, "quantity"),
        ({"symbol": "", "side": "buy", "quantity": 1, "price": 1.0}, "symbol"),
        ({"symbol": "A", "side": "buy", "quantity": 1, "price": "cheap"}, "price"),
    ],
)
async def test_a_bad_paper_trade_is_a_400(
    ticks: TickServer, start: Start, body: dict[str, Any], field: str
) -> None:
    """Every field of a paper trade is checked; the message names it."""
    d = await start(ticks.url)
    status, answer = await d.call("POST", "/api/v1/paper/trades", body)
    assert status == 400 and answer["message"].startswith(f"{field}: "), answer


async def test_an_emergency_close_of_a_position_the_account_does_not_hold_sends_nothing(
    ticks: TickServer, start: Start
) -> None:
    """A close of a position the account holds none of answers 409 not_held and sends nothing."""
    ticks.prices["TITAN"] = 3000.0
    d = await start(ticks.url, **account_tables(reconcile_interval=3600.0))
    await d.open("TITAN", "long", 2, 3000.0)
    await eventually(lambda: d.daemon.reconciler.view is not None, what="the first reconciliation")
    d.daemon.store.record_paper_trade("TITAN", "sell", 2, 3000.0, 0.0)  # the bot, unseen yet
    status, body = await d.close("TITAN")
    assert status == 409 and body["error"] == "not_held", body
    assert d.daemon.store.paper_fill_count() == 0
    sent = d.daemon.metrics.registry.get_sample_value(
        "tickguard_exits_total", {"reason": "emergency", "price_source": "manual"}
    )
    assert not sent  # exits sent: this one never was


async def test_a_partly_filled_exit_is_exited_again_for_the_rest(
    ticks: TickServer, start: Start
) -> None:
    """Half filled, the rest is exited again under a new client order id; the account ends flat."""
    ticks.prices["LT"] = 3000.0
    d = await start(ticks.url, **account_tables())
    await d.open("LT", "long", 10, 3000.0, stop_loss=2900.0)
    d.paper.faults.append(PaperFault.PARTIAL)
    await ticks.set_price("LT", 2850.0)
    await eventually(lambda: d.daemon.guard.position("LT") is None, what="closed in two exits")
    exits = [e for e in (await d.call("GET", "/api/v1/exits"))[1]["exits"] if e["symbol"] == "LT"]
    assert sorted(e["quantity"] for e in exits) == [5, 10]  # ordered
    assert [e["filled_quantity"] for e in exits] == [5, 5]
    assert len({e["client_order_id"] for e in exits}) == 2
    assert all(e["state"] == "filled" for e in exits)
    assert d.daemon.store.paper_position("LT") is None
