"""Issue 11's acceptance against the Upstox fakes, end to end (SPEC 8, docs/account.md).

The real daemon runs in this event loop (`app.build` + `app.serve`) with
`feed.protocol = "upstox"` and `broker.kind = "upstox"`, against two fakes on
127.0.0.1:0: `UpstoxFeedServer` (the socket, authorize, LTP) and `FakeUpstox`
(orders, and an account ledger served as short-term positions). The broker
fake plays Upstox's API host, so it also serves the feed fake's authorize and
LTP; the socket stays on the feed fake. A test plays the bot (or a person)
trading outside tickguard by setting the broker fake's ledger, crosses a stop
by setting the feed fake's price (live ticks, or the LTP poll while the socket
is refused), and reads what happened from the broker fake's requests, the
daemon's API and its log lines.

Every wait is for a condition, bounded; the bounds are generous multiples of
the configured intervals so a loaded machine does not fail them.
"""

from __future__ import annotations

import asyncio
import logging
import re
import statistics
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tickguard import app
from tickguard.config import parse_config
from tickguard.core.exits import Exit
from tickguard.core.prices import PriceSource
from tickguard.reconciler import FETCH_TIMEOUT, PRESEND_TIMEOUT

KEY = "NSE_EQ|INE848E01016"  # the position the tests guard
NEW = "NSE_EQ|INE002A01018"  # the position the bot opens (imported by rule)
API_TOKEN = "api-token-for-the-account-tests"
INTERVAL = 0.2  # [account] reconcile_interval, seconds
# A reconcile_interval long enough that a crossing (an LTP poll or a live tick, tens of
# milliseconds away) certainly comes before the next periodic read: only the read made
# right before the send can then see what the bot did.
LONG_INTERVAL = 3.0
POLL_INTERVAL = 0.05  # feed.poll_interval: the LTP poll while the socket is down
STARTUP = 10.0  # seconds the daemon may take to listen and connect
SETTLE = 10.0  # seconds an exit or a close may take, far above what they need
# The slowest a crossing may reach the broker while the positions endpoint fails: the read
# right before the send is given PRESEND_TIMEOUT, plus a second for a loaded machine. Below
# FETCH_TIMEOUT, so an exit that waited for a periodic read's timeout fails the test.
EXIT_BOUND = PRESEND_TIMEOUT + 1.0
LATENCY_EXITS = 50
LISTENING_RE = re.compile(r"\[HTTP\] listening on 127\.0\.0\.1:(\d+)")
PLACE_PATH = "/v3/order/place"


async def eventually(
    predicate: Callable[[], object], timeout: float, *, what: str, interval: float = 0.01
) -> None:
    """Return once `predicate()` is true; fail the test if it is not within `timeout` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"not within {timeout:g}s: {what}")
        await asyncio.sleep(interval)


class Stamps(logging.Handler):
    """Every tickguard log line, with the monotonic time it was emitted."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[tuple[float, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append((time.monotonic(), record.getMessage()))

    def text(self) -> str:
        return "\n".join(line for _, line in self.lines)

    def first(self, prefix: str, since: int = 0) -> float | None:
        """When the first line starting with `prefix` (from line index `since` on) was logged."""
        return next((t for t, line in self.lines[since:] if line.startswith(prefix)), None)


@dataclass(eq=False)
class Rig:
    """The daemon served in this event loop, its two fakes, and an HTTP client for its API."""

    daemon: app.Daemon
    feed: Any  # UpstoxFeedServer (conftest)
    fake: Any  # FakeUpstox (tests/integration/test_upstox_broker.py)
    log: Stamps
    positions_path: str
    port: int = 0
    http: aiohttp.ClientSession = field(default_factory=aiohttp.ClientSession)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def get(self, path: str) -> Any:
        async with asyncio.timeout(5.0):
            async with self.http.get(self.base + path) as response:
                assert response.status == 200, (path, response.status, await response.text())
                return await response.json()

    async def register(self, **spec: Any) -> dict[str, Any]:
        """POST /api/v1/positions: the bot registers a position."""
        headers = {"Authorization": f"Bearer {API_TOKEN}"}
        async with asyncio.timeout(5.0):
            async with self.http.post(
                self.base + "/api/v1/positions", json=spec, headers=headers
            ) as response:
                body = await response.json()
                assert response.status == 201, body
                return dict(body)

    async def exits(self) -> list[dict[str, Any]]:
        return list((await self.get("/api/v1/exits"))["exits"])

    async def position(self, symbol: str) -> dict[str, Any] | None:
        rows = (await self.get("/api/v1/positions"))["positions"]
        return next((dict(p) for p in rows if p["symbol"] == symbol), None)

    async def metric(self, sample: str) -> float:
        async with asyncio.timeout(5.0):
            async with self.http.get(self.base + "/metrics") as response:
                text = await response.text()
        values = [
            s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
            if s.name == sample
        ]
        return sum(values)

    def reads(self) -> int:
        """Positions reads the broker fake received."""
        return sum(1 for _, path in self.fake.requests if path == self.positions_path)

    def orders(self) -> list[dict[str, Any]]:
        """The bodies of every order placed at the broker fake."""
        return list(self.fake.place_bodies)

    def order_arrivals(self) -> list[float]:
        return [
            at
            for (_, path), at in zip(self.fake.requests, self.fake.arrivals, strict=True)
            if path == PLACE_PATH
        ]

    def confirmed(self, symbol: str) -> bool:
        position = self.daemon.guard.position(symbol)
        return position is not None and position.confirmed

    def price(self, symbol: str) -> tuple[float, PriceSource] | None:
        quote = self.daemon.guard.quote(symbol, self.daemon.monotonic())
        return (quote.price.value, quote.source) if quote.price is not None else None

    async def next_read(self, timeout: float) -> None:
        """Return right after the broker fake received another positions read (it answers
        from its ledger at once, so a change made now is not in that answer)."""
        seen = self.reads()
        await eventually(lambda: self.reads() > seen, timeout, what="another positions read")

    async def feed_down(self) -> None:
        """The socket goes away and authorize is refused: prices come from the LTP poll."""
        self.feed.authorize_status = 503
        await self.feed.drop_connections()
        sup, poller = self.daemon.supervisor, self.daemon.poller
        assert poller is not None
        await eventually(
            lambda: not sup.connected and poller.polling and poller.last_success is not None,
            STARTUP,
            what="the feed down and the LTP poll answering",
        )


Start = Callable[..., Awaitable[Rig]]


@pytest.fixture
async def daemon(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    upstox_feed_server: Any,
    fake_upstox: Any,
    upstox_broker_fakes: ModuleType,
) -> AsyncIterator[Start]:
    """`await daemon(account={...}, rules=[...], wrap=..., safety_net={...})`: the real daemon, served in this
    event loop against both fakes and connected to the feed fake; stopped at teardown."""
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    logger = logging.getLogger("tickguard")
    stamps, level = Stamps(), logger.level
    logger.addHandler(stamps)
    logger.setLevel(logging.INFO)
    running: list[tuple[asyncio.Event, asyncio.Task[int], Rig]] = []

    async def start(
        *,
        account: dict[str, Any] | None = None,
        rules: list[dict[str, Any]] | None = None,
        wrap: Callable[[app.Daemon], None] | None = None,
        safety_net: dict[str, Any] | None = None,
    ) -> Rig:
        token = upstox_broker_fakes.TOKEN
        feed = await upstox_feed_server(token=token)
        fake = await fake_upstox(feed)
        (tmp_path / "upstox-token").write_text(token + "\n")
        (tmp_path / "api-token").write_text(API_TOKEN + "\n")
        tables: dict[str, Any] = {
            "daemon": {"state_dir": str(tmp_path / "state")},
            "http": {"listen": "127.0.0.1:0", "token_file": str(tmp_path / "api-token")},
            "feed": {
                "protocol": "upstox",
                "symbols": [KEY],
                "poll_interval": POLL_INTERVAL,
                "silence_timeout": 60.0,
                "reconnect": {"initial_delay": 0.05, "max_delay": 0.2},
            },
            "upstox": {
                "api_url": fake.url,
                "hft_url": fake.url,
                "token_file": str(tmp_path / "upstox-token"),
            },
            "broker": {"kind": "upstox"},
            "dns": {"fallback_servers": []},  # never the public resolvers
            "market": {"always_open": True},
            "guard": {"sweep_interval": 0.05},
            "account": {"reconcile_interval": INTERVAL, **(account or {})},
        }
        if rules:
            tables["rules"] = rules
        if safety_net is not None:
            tables["safety_net"] = safety_net
        d = await app.build(parse_config(tables, env={}))
        if wrap is not None:
            wrap(d)
        stop = asyncio.Event()
        rig = Rig(d, feed, fake, stamps, upstox_broker_fakes.POSITIONS_PATH)
        running.append((stop, asyncio.create_task(app.serve(d, stop=stop)), rig))
        await eventually(
            lambda: LISTENING_RE.search(stamps.text()), STARTUP, what="the API listening"
        )
        found = LISTENING_RE.search(stamps.text())
        assert found is not None
        rig.port = int(found.group(1))
        await eventually(lambda: d.supervisor.connected, STARTUP, what="the feed connected")
        return rig

    try:
        yield start
    finally:
        try:
            for stop, task, rig in running:
                stop.set()
                await rig.http.close()
                async with asyncio.timeout(15):
                    assert await task == 0
        finally:
            logger.removeHandler(stamps)
            logger.setLevel(level)


async def guard_held(rig: Rig, quantity: int) -> None:
    """The bot holds `quantity` of KEY at the broker and registers it with a stop at 95;
    returns once a read has shown it held (confirmed)."""
    rig.fake.set_position(KEY, quantity, 100.0)
    await rig.register(
        symbol=KEY, side="long", quantity=quantity, entry_price=100.0, stop_loss=95.0
    )
    interval = rig.daemon.config.account.reconcile_interval
    await eventually(lambda: rig.confirmed(KEY), interval + SETTLE, what="KEY shown held")


BEFORE_THE_NEXT_READ = pytest.param(LONG_INTERVAL, id="crossing-before-the-next-read")
RACING_THE_NEXT_READ = pytest.param(INTERVAL, id="crossing-racing-the-next-read")


@pytest.mark.parametrize("interval", [BEFORE_THE_NEXT_READ, RACING_THE_NEXT_READ])
async def test_closed_by_the_bot_while_the_feed_is_down_no_order(
    daemon: Start, interval: float
) -> None:
    """A position the bot closes at the broker while the feed is down sends no order when its
    stop then crosses on the LTP poll, and is journalled once as closed outside tickguard."""
    rig = await daemon(account={"reconcile_interval": interval})
    await guard_held(rig, 10)
    await rig.feed_down()
    if interval == LONG_INTERVAL:
        await rig.next_read(interval + SETTLE)  # the next periodic read is `interval` away
    rig.fake.set_position(KEY, 0, None)  # the bot closes it at the broker
    rig.feed.prices[KEY] = 90.0  # the stop (95) crosses on the next LTP poll
    await eventually(
        lambda: rig.price(KEY) == (90.0, PriceSource.POLL), SETTLE, what="the poll's 90"
    )
    await eventually(
        lambda: rig.daemon.guard.position(KEY) is None, interval + SETTLE, what="KEY closed"
    )

    assert rig.orders() == [] and rig.fake.orders == {}
    exits = await rig.exits()
    external = [e for e in exits if e["reason"] == "external"]
    assert len(external) == 1, exits
    assert external[0]["symbol"] == KEY and external[0]["client_order_id"] is None
    # Exits the crossing decided were stopped by the read right before the send.
    stopped = [e for e in exits if e["reason"] != "external"]
    assert all(e["state"] == "cancelled" and e["broker_order_id"] is None for e in stopped)
    if interval == LONG_INTERVAL:
        assert stopped, "the crossing came first: the read before the send must stop it"
    assert f"[ACCOUNT] {KEY} closed outside tickguard: broker holds 0" in rig.log.text()
    assert rig.fake.net(KEY) == 0


@pytest.mark.parametrize("interval", [BEFORE_THE_NEXT_READ, RACING_THE_NEXT_READ])
async def test_halved_by_the_bot_the_exit_sells_the_half(daemon: Start, interval: float) -> None:
    """A position the bot halves at the broker is exited by one order for the half when its
    stop crosses, leaving the account flat, never short."""
    rig = await daemon(account={"reconcile_interval": interval})
    await guard_held(rig, 10)
    if interval == LONG_INTERVAL:
        await rig.next_read(interval + SETTLE)
    rig.fake.set_position(KEY, 5, 100.0)  # the bot sells half
    rig.feed.prices[KEY] = 90.0  # the stop crosses on the next live tick
    await eventually(
        lambda: rig.daemon.guard.position(KEY) is None, interval + SETTLE, what="KEY exited"
    )

    (order,) = rig.orders()
    assert order["transaction_type"] == "SELL" and order["quantity"] == 5
    assert order["instrument_token"] == KEY
    assert rig.fake.net(KEY) == 0  # 10, the bot's 5 sold, then ours: flat, never short
    filled = [e for e in await rig.exits() if e["state"] == "filled"]
    assert [(e["symbol"], e["reason"], e["quantity"]) for e in filled] == [(KEY, "stop_loss", 5)]
    if interval == LONG_INTERVAL:  # only the read right before the send saw the half
        assert f"[EXIT] {KEY}: the account holds 5: the exit is sized down from 10" in (
            rig.log.text()
        )
        assert await rig.metric("tickguard_exit_quantity_clamped_total") == 1


async def test_an_exit_sized_down_and_filled_closes_the_position(daemon: Start) -> None:
    """An exit sized down to what the account holds closes the position when it fills: no
    later exit is decided for it and it is not journalled as closed outside tickguard."""
    rig = await daemon(account={"reconcile_interval": LONG_INTERVAL})
    await guard_held(rig, 10)
    await rig.next_read(LONG_INTERVAL + SETTLE)
    rig.fake.set_position(KEY, 5, 100.0)  # the bot sells half
    rig.feed.prices[KEY] = 90.0
    await eventually(rig.orders, SETTLE, what="the exit's order")
    await eventually(
        lambda: rig.daemon.guard.position(KEY) is None, LONG_INTERVAL + SETTLE, what="closed"
    )
    exits = await rig.exits()
    assert [(e["reason"], e["state"], e["quantity"]) for e in exits] == [("stop_loss", "filled", 5)]
    assert "partly filled" not in rig.log.text()


BROKER_RULES = [{"symbols": [NEW], "stop_loss_pct": 2.0, "take_profit_pct": 4.0}]


async def test_a_position_the_bot_opens_is_guarded_by_rule(daemon: Start) -> None:
    """With source broker, a position the bot opens at the broker is guarded within a few
    reconcile intervals, its levels from the broker's average price (origin broker)."""
    rig = await daemon(account={"source": "broker"}, rules=BROKER_RULES)
    rig.feed.prices[NEW] = 200.0  # the market, should the feed be asked for it
    started = time.monotonic()
    rig.fake.set_position(NEW, 7, 200.0)  # the bot opens 7 at 200
    await eventually(
        lambda: rig.daemon.guard.position(NEW) is not None,
        10 * INTERVAL + 2.0,
        what="NEW guarded",
    )
    print(f"\nguarded {time.monotonic() - started:.3f}s after the bot opened it")
    found = await rig.position(NEW)
    assert found is not None
    assert found["origin"] == "broker" and found["state"] == "open"
    assert found["side"] == "long" and found["quantity"] == 7 and found["entry_price"] == 200.0
    assert found["stop_loss"] == 196.0 and found["take_profit"] == 208.0
    assert found["trailing_stop"] is None and found["broker_quantity"] == 7.0
    account = await rig.get("/api/v1/account")
    assert [(p["symbol"], p["guarded"]) for p in account["positions"]] == [(NEW, True)]
    assert rig.orders() == []


async def test_a_position_the_bot_opens_is_exited_when_its_stop_crosses(daemon: Start) -> None:
    """A position imported by rule while the feed is up gets live prices, and its stop
    crossing sells what the bot opened."""
    rig = await daemon(account={"source": "broker"}, rules=BROKER_RULES)
    rig.feed.prices[NEW] = 200.0
    rig.fake.set_position(NEW, 7, 200.0)
    await eventually(
        lambda: rig.daemon.guard.position(NEW) is not None, 10 * INTERVAL + 2.0, what="imported"
    )
    await eventually(lambda: rig.price(NEW) is not None, SETTLE, what="a price for NEW")
    rig.feed.prices[NEW] = 190.0  # below the rule's stop, 196
    await eventually(rig.orders, SETTLE, what="an order for NEW")
    (order,) = rig.orders()
    assert order["instrument_token"] == NEW and order["quantity"] == 7
    assert order["transaction_type"] == "SELL"


async def test_a_position_the_bot_opens_while_the_feed_is_down_is_polled_and_exited(
    daemon: Start,
) -> None:
    """A position imported by rule while the socket is down is polled over LTP, and its stop
    crossing sells it (the poll asks for every guarded symbol)."""
    rig = await daemon(account={"source": "broker"}, rules=BROKER_RULES)
    await rig.feed_down()
    rig.feed.prices[NEW] = 200.0
    rig.fake.set_position(NEW, 7, 200.0)
    await eventually(
        lambda: rig.price(NEW) == (200.0, PriceSource.POLL), 10 * INTERVAL + SETTLE, what="polled"
    )
    rig.feed.prices[NEW] = 190.0
    await eventually(rig.orders, SETTLE, what="an order for NEW")
    (order,) = rig.orders()
    assert order["instrument_token"] == NEW and order["quantity"] == 7
    await eventually(lambda: rig.daemon.guard.position(NEW) is None, SETTLE, what="NEW closed")
    assert rig.fake.net(NEW) == 0


@pytest.mark.parametrize("behaviour", ["SERVER_ERROR", "HANG"])
@pytest.mark.parametrize("known", [False, True], ids=["failing-since-now", "known-failing"])
async def test_a_failing_positions_endpoint_never_holds_an_exit_back(
    daemon: Start, upstox_broker_fakes: ModuleType, behaviour: str, known: bool
) -> None:
    """With the positions endpoint answering 500 or hanging, a stop crossing reaches the
    broker within the pre-send timeout plus a little, sized from the last good read, and
    the failed reads are counted."""
    rig = await daemon()
    await guard_held(rig, 10)
    rig.fake.positions_behaviour = upstox_broker_fakes.PositionsBehaviour[behaviour]
    if known:  # a periodic read has failed: the read before the send is skipped
        await eventually(
            lambda: rig.daemon.reconciler.last_error,
            FETCH_TIMEOUT + INTERVAL + SETTLE,
            what="a failed read",
        )
    since = len(rig.log.lines)
    rig.feed.prices[KEY] = 90.0  # the stop crosses on the next live tick
    await eventually(rig.orders, EXIT_BOUND + SETTLE, what="the exit's order")

    crossed = rig.log.first(f"[SL] {KEY}:", since)
    assert crossed is not None
    (arrived,) = rig.order_arrivals()
    took = arrived - crossed
    print(f"\n{behaviour} ({'known' if known else 'new'}): crossing to order {took * 1000:.1f} ms")
    assert 0 <= took < EXIT_BOUND
    (order,) = rig.orders()
    assert order["quantity"] == 10 and order["transaction_type"] == "SELL"
    await eventually(lambda: rig.daemon.guard.position(KEY) is None, SETTLE, what="KEY exited")
    assert rig.fake.net(KEY) == 0
    assert await rig.metric("tickguard_reconcile_failures_total") >= 1


def percentile(values: list[float], pct: int) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[pct - 1]


async def test_latency_of_the_read_before_each_exit(daemon: Start) -> None:
    """Measures what the read right before each send adds to an exit against the local
    fake (p50/p99 over 50 exits, printed); each exit is one order after one such read."""
    presend: list[float] = []  # seconds in the executor's sizer: the added latency itself

    def wrap(d: app.Daemon) -> None:
        sizer = d.executor.sizer
        assert sizer is not None

        async def timed(exit: Exit) -> float:
            started = time.perf_counter()
            try:
                return await sizer(exit)
            finally:
                presend.append(time.perf_counter() - started)

        d.executor.sizer = timed

    # Periodic reads out of the way: the read before each send is the only one in flight.
    rig = await daemon(account={"reconcile_interval": 3600.0}, wrap=wrap)
    crossing_to_order: list[float] = []
    read_to_order: list[float] = []  # the fake receiving the read, then the order

    def exited(count: int) -> Callable[[], bool]:
        return lambda: len(rig.orders()) == count and rig.daemon.guard.position(KEY) is None

    for n in range(1, LATENCY_EXITS + 1):
        rig.feed.prices[KEY] = 100.0
        await eventually(
            lambda: (p := rig.price(KEY)) is not None and p[0] >= 99.0, SETTLE, what="live 100"
        )
        rig.fake.set_position(KEY, 10, 100.0)
        await rig.register(symbol=KEY, side="long", quantity=10, entry_price=100.0, stop_loss=95.0)
        since = len(rig.log.lines)
        rig.feed.prices[KEY] = 90.0
        await eventually(
            exited(n),
            SETTLE,
            what=f"exit {n} filled",
        )
        crossed = rig.log.first(f"[SL] {KEY}:", since)
        assert crossed is not None
        requests = list(zip(rig.fake.requests, rig.fake.arrivals, strict=True))
        place = max(i for i, ((_, path), _) in enumerate(requests) if path == PLACE_PATH)
        read = max(
            i for i, ((_, path), _) in enumerate(requests[:place]) if path == rig.positions_path
        )
        crossing_to_order.append(requests[place][1] - crossed)
        read_to_order.append(requests[place][1] - requests[read][1])

    assert len(presend) == LATENCY_EXITS and rig.reads() >= LATENCY_EXITS + 1
    assert [o["quantity"] for o in rig.orders()] == [10] * LATENCY_EXITS
    assert rig.fake.net(KEY) == 0
    print()
    for name, values in (
        ("pre-send check (the sizer, in the daemon)", presend),
        ("positions read received -> order received (fake)", read_to_order),
        ("crossing logged -> order received (fake)", crossing_to_order),
    ):
        print(
            f"{name}: p50 {percentile(values, 50) * 1000:.2f} ms,"
            f" p99 {percentile(values, 99) * 1000:.2f} ms, max {max(values) * 1000:.2f} ms"
            f" over {len(values)} exits"
        )
