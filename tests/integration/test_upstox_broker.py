"""The Upstox broker against a protocol-faithful fake of Upstox's order endpoints on loopback.

The fake follows docs/reference broker-protocols.md section 2: place (v3) on
the HFT host, order details and history on the API host, bearer-token auth,
Upstox error bodies, and a scriptable behaviour per place request.
"""

from __future__ import annotations

import asyncio
import enum
import itertools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from tickguard.brokers.base import ExitOrder, OrderStatus
from tickguard.brokers.upstox import UpstoxBroker
from tickguard.core.exits import ExitState
from tickguard.core.guard import BlindPolicy, ExitDecided, Guard
from tickguard.core.positions import PositionSpec, PositionState, Side
from tickguard.core.prices import PriceBook, PriceSource
from tickguard.errors import BrokerRejected, BrokerUnavailable
from tickguard.executor import ExitExecutor
from tickguard.store import Store

TOKEN = "eyJ0-secret-access-token-1234"  # distinctive: no message may ever contain it
SYMBOL = "NSE_EQ|INE848E01016"
INVALID_TOKEN = {"errorCode": "UDAPI100050", "message": "Invalid token used to access API"}
RATE_LIMITED = {"errorCode": "UDAPI10005", "message": "Too Many Request Sent"}
ORDER_NOT_FOUND = {"errorCode": "UDAPI100010", "message": "Order not found"}
BAD_FIELD = "UDAPI1000"  # the fake's code for a body that breaks the documented schema

# The documented v3 place body: field -> (accepted JSON types, allowed values or None).
PLACE_SCHEMA: dict[str, tuple[tuple[type, ...], frozenset[object] | None]] = {
    "quantity": ((int,), None),
    "product": ((str,), frozenset({"I", "D", "MTF"})),
    "validity": ((str,), frozenset({"DAY", "IOC"})),
    "price": ((int, float), None),
    "tag": ((str,), None),
    "instrument_token": ((str,), None),
    "order_type": ((str,), frozenset({"MARKET", "LIMIT", "SL", "SL-M"})),
    "transaction_type": ((str,), frozenset({"BUY", "SELL"})),
    "disclosed_quantity": ((int,), None),
    "trigger_price": ((int, float), None),
    "is_amo": ((bool,), None),
    "slice": ((bool,), None),
}
OPTIONAL_FIELDS = frozenset({"tag"})
# The status trail of an order before it reaches the exchange's book.
ACCEPT_TRAIL = ("put order req received", "validation pending", "open pending")


class Behaviour(enum.Enum):
    FILL = "fill"  # complete at once
    OPEN_THEN_FILL = "open_then_fill"  # open for `open_polls` detail polls, then complete
    STAY_OPEN = "stay_open"  # open for ever
    REJECT = "reject"  # rejected by the exchange/RMS, with a status_message
    RATE_LIMIT = "rate_limit"  # 429 UDAPI10005, no order created
    SERVER_ERROR = "server_error"  # 500, no order created
    LOST_REPLY = "lost_reply"  # store the order (complete), then never answer


def error_body(*errors: dict[str, str]) -> dict[str, Any]:
    return {"status": "error", "errors": [dict(e, propertyPath=None) for e in errors]}


@dataclass
class FakeOrder:
    order_id: str
    body: dict[str, Any]
    behaviour: Behaviour
    history: list[dict[str, Any]] = field(default_factory=list)
    detail_polls: int = 0


class FakeUpstox:
    """Upstox's place/details/history endpoints on 127.0.0.1:0, one behaviour per place."""

    def __init__(self) -> None:
        self.behaviour = Behaviour.FILL
        self.open_polls = 2
        self.fill_price = 93.85
        self.reject_message = "RMS:Margin Exceeds,Required:1000, Available:10"
        self.missing_as_error = False  # history of an unknown tag: 400 (True) or empty data
        self.lookup_status: int | None = None  # answer history requests with this HTTP status
        self.requests: list[tuple[str, str]] = []  # (method, path_qs) of every request
        self.place_bodies: list[Any] = []  # every place body received, as decoded JSON
        self.place_headers: list[dict[str, str]] = []
        self.orders: dict[str, FakeOrder] = {}
        self.release = asyncio.Event()  # ends hung replies
        self._ids = itertools.count(250101000000001)
        self._runner: web.AppRunner | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        app = web.Application(middlewares=[self._auth])
        app.router.add_post("/v3/order/place", self._place)
        app.router.add_get("/v2/order/details", self._details)
        app.router.add_get("/v2/order/history", self._history)
        self._runner = web.AppRunner(app, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = self._runner.addresses[0][1]

    async def close(self) -> None:
        self.release.set()
        if self._runner is not None:
            await self._runner.cleanup()

    @web.middleware
    async def _auth(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        self.requests.append((request.method, request.path_qs))
        if request.headers.get("Authorization") != f"Bearer {TOKEN}":
            return web.json_response(error_body(INVALID_TOKEN), status=401)
        return await handler(request)

    # -- endpoints -------------------------------------------------------

    async def _place(self, request: web.Request) -> web.StreamResponse:
        self.place_headers.append(dict(request.headers))
        try:
            body = await request.json()
        except ValueError:
            return bad_request("body", "Invalid JSON")
        self.place_bodies.append(body)
        problem = place_problem(body, request.headers)
        if problem:
            return bad_request(*problem)
        behaviour = self.behaviour
        if behaviour is Behaviour.RATE_LIMIT:
            return web.json_response(error_body(RATE_LIMITED), status=429)
        if behaviour is Behaviour.SERVER_ERROR:
            return web.Response(status=500, text="<html>Internal Server Error</html>")
        order = FakeOrder(str(next(self._ids)), body, behaviour)
        self.orders[order.order_id] = order
        for status in ACCEPT_TRAIL:
            self._append(order, status)
        if behaviour in (Behaviour.FILL, Behaviour.LOST_REPLY):
            self._append(order, "open")
            self._append(order, "complete")
        elif behaviour is Behaviour.REJECT:
            self._append(order, "rejected", self.reject_message)
        else:
            self._append(order, "open")
        if behaviour is Behaviour.LOST_REPLY:
            await self.release.wait()  # the order exists; its reply never comes
        return web.json_response(
            {
                "status": "success",
                "data": {"order_ids": [order.order_id]},
                "metadata": {"latency": 21},
            }
        )

    async def _details(self, request: web.Request) -> web.StreamResponse:
        order = self.orders.get(request.query.get("order_id", ""))
        if order is None:
            return web.json_response(error_body(ORDER_NOT_FOUND), status=400)
        order.detail_polls += 1
        current = order.history[-1]
        if (
            order.behaviour is Behaviour.OPEN_THEN_FILL
            and current["status"] == "open"
            and order.detail_polls > self.open_polls
        ):
            self._append(order, "complete")
        return web.json_response({"status": "success", "data": order.history[-1]})

    async def _history(self, request: web.Request) -> web.StreamResponse:
        if self.lookup_status is not None:
            return web.json_response(
                error_body({"errorCode": "UDAPI100500", "message": "Something went wrong"}),
                status=self.lookup_status,
            )
        order_id, tag = request.query.get("order_id"), request.query.get("tag")
        if not order_id and not tag:
            return bad_request("order_id", "order_id or tag is required")
        entries = [
            entry
            for order in self.orders.values()
            if order.order_id == order_id or (tag and order.body.get("tag") == tag)
            for entry in order.history
        ]
        if not entries and self.missing_as_error:
            return web.json_response(error_body(ORDER_NOT_FOUND), status=400)
        return web.json_response({"status": "success", "data": entries})

    def _append(self, order: FakeOrder, status: str, message: str = "") -> None:
        body = order.body
        done = status == "complete"
        order.history.append(
            {
                "exchange": body["instrument_token"].split("_", 1)[0],
                "product": body["product"],
                "price": 0.0,
                "quantity": body["quantity"],
                "status": status,
                "tag": body.get("tag"),
                "instrument_token": body["instrument_token"],
                "placed_by": "AB1234",
                "trading_symbol": "SBIN-EQ",
                "order_type": body["order_type"],
                "validity": body["validity"],
                "trigger_price": 0.0,
                "disclosed_quantity": 0,
                "transaction_type": body["transaction_type"],
                "average_price": self.fill_price if done else 0.0,
                "filled_quantity": body["quantity"] if done else 0,
                "pending_quantity": 0 if done else body["quantity"],
                "status_message": message or None,
                "exchange_order_id": "1300000012345678" if status not in ACCEPT_TRAIL else "",
                "parent_order_id": None,
                "order_id": order.order_id,
                "variety": "SIMPLE",
                "order_timestamp": "2026-01-07 11:30:00",
                "exchange_timestamp": None,
                "is_amo": body["is_amo"],
                "order_request_id": str(len(order.history) + 1),
                "order_ref_id": f"GTT-{order.order_id}",
            }
        )

    def place_count(self) -> int:
        return sum(1 for method, path in self.requests if path == "/v3/order/place")


def place_problem(body: Any, headers: Any) -> tuple[str, str] | None:
    """What breaks the documented place contract, as (field, message); None if nothing."""
    if headers.get("Content-Type", "").split(";")[0] != "application/json":
        return ("Content-Type", "Content-Type must be application/json")
    if headers.get("Accept") != "application/json":
        return ("Accept", "Accept must be application/json")
    if not isinstance(body, dict):
        return ("body", "Invalid request body")
    for name in body:
        if name not in PLACE_SCHEMA:
            return (name, f"Unknown field {name}")
    for name, (types, allowed) in PLACE_SCHEMA.items():
        if name not in body:
            if name in OPTIONAL_FIELDS:
                continue
            return (name, f"{name} is required")
        value = body[name]
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            return (name, f"{name} has the wrong type")
        if allowed is not None and value not in allowed:
            return (name, f"{name} has an invalid value")
    if body["quantity"] <= 0:
        return ("quantity", "Quantity should be greater than 0")
    if "|" not in body["instrument_token"]:
        return ("instrument_token", "Invalid instrument key")
    if body["order_type"] == "MARKET" and body["price"] != 0:
        return ("price", "Price must be 0 for MARKET orders")
    return None


def bad_request(name: str, message: str) -> web.Response:
    return web.json_response(
        {
            "status": "error",
            "errors": [{"errorCode": BAD_FIELD, "message": message, "propertyPath": name}],
        },
        status=400,
    )


# ---------------------------------------------------------------------------


@dataclass
class Rig:
    fake: FakeUpstox
    session: aiohttp.ClientSession

    def broker(self, *, token: str = TOKEN, fill_wait: float = 1.0) -> UpstoxBroker:
        return UpstoxBroker(
            self.session,
            token=token,
            api_url=self.fake.url,
            hft_url=self.fake.url,
            fill_wait=fill_wait,
            poll_interval=0.02,
        )


@pytest.fixture
async def rig() -> AsyncIterator[Rig]:
    fake = FakeUpstox()
    await fake.start()
    session = aiohttp.ClientSession()
    try:
        yield Rig(fake, session)
    finally:
        await session.close()
        await fake.close()


def exit_order(cid: str = "tg-a1b2c3-1-1", quantity: float = 10.0) -> ExitOrder:
    return ExitOrder(cid, SYMBOL, Side.LONG, quantity, 94.0)


async def test_place_sends_exactly_the_documented_body(rig: Rig) -> None:
    """A long's exit is one POST /v3/order/place with exactly the documented fields and types."""
    report = await asyncio.wait_for(rig.broker().place_exit(exit_order()), 5.0)
    assert report.status is OrderStatus.FILLED
    (body,) = rig.fake.place_bodies
    expected: dict[str, Any] = {
        "quantity": 10,
        "product": "I",
        "validity": "DAY",
        "price": 0,
        "tag": "tg-a1b2c3-1-1",
        "instrument_token": SYMBOL,
        "order_type": "MARKET",
        "transaction_type": "SELL",
        "disclosed_quantity": 0,
        "trigger_price": 0,
        "is_amo": False,
        "slice": False,
    }
    assert body == expected
    assert {k: type(v) for k, v in body.items()} == {k: type(v) for k, v in expected.items()}
    (headers,) = rig.fake.place_headers
    assert headers["Authorization"] == f"Bearer {TOKEN}"
    assert headers["Accept"] == "application/json"
    assert headers["Content-Type"].startswith("application/json")


async def test_short_exit_buys(rig: Rig) -> None:
    """A short position is closed by a BUY."""
    order = ExitOrder("tg-a1b2c3-2-1", SYMBOL, Side.SHORT, 3.0, None)
    await asyncio.wait_for(rig.broker().place_exit(order), 5.0)
    assert rig.fake.place_bodies[0]["transaction_type"] == "BUY"
    assert rig.fake.place_bodies[0]["quantity"] == 3


async def test_fill_is_reported_with_average_price(rig: Rig) -> None:
    """An order that completes at once is FILLED at its average_price with Upstox's order id."""
    report = await asyncio.wait_for(rig.broker().place_exit(exit_order()), 5.0)
    (order_id,) = rig.fake.orders
    assert report.status is OrderStatus.FILLED
    assert report.fill_price == 93.85
    assert report.broker_order_id == order_id
    assert report.client_order_id == "tg-a1b2c3-1-1"


async def test_open_order_is_polled_until_complete(rig: Rig) -> None:
    """An order that stays open for three detail polls is polled until it completes."""
    rig.fake.behaviour = Behaviour.OPEN_THEN_FILL
    rig.fake.open_polls = 3
    report = await asyncio.wait_for(rig.broker().place_exit(exit_order()), 5.0)
    assert report.status is OrderStatus.FILLED and report.fill_price == 93.85
    (order,) = rig.fake.orders.values()
    assert order.detail_polls == 4
    assert rig.fake.place_count() == 1


async def test_order_still_open_after_fill_wait_is_working(rig: Rig) -> None:
    """An order still open when fill_wait elapses is reported WORKING with its order id."""
    rig.fake.behaviour = Behaviour.STAY_OPEN
    started = time.monotonic()
    report = await asyncio.wait_for(rig.broker(fill_wait=0.2).place_exit(exit_order()), 5.0)
    assert time.monotonic() - started < 2.0
    (order_id,) = rig.fake.orders
    assert report.status is OrderStatus.WORKING and report.broker_order_id == order_id
    assert rig.fake.orders[order_id].detail_polls >= 2


async def test_rejected_order_is_reported_with_its_message(rig: Rig) -> None:
    """An order the exchange rejects is a REJECTED report carrying the status_message."""
    rig.fake.behaviour = Behaviour.REJECT
    report = await asyncio.wait_for(rig.broker().place_exit(exit_order()), 5.0)
    assert report.status is OrderStatus.REJECTED and report.fill_price is None
    assert "rejected" in report.detail and "RMS:Margin Exceeds" in report.detail


async def test_invalid_token_is_rejected_without_leaking_it(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    """A 401 UDAPI100050 is BrokerRejected naming the error code, never the token sent."""
    caplog.set_level(logging.DEBUG)
    wrong = "wrong-token-do-not-print-77"
    with pytest.raises(BrokerRejected) as caught:
        await asyncio.wait_for(rig.broker(token=wrong).place_exit(exit_order()), 5.0)
    message = str(caught.value)
    assert "UDAPI100050" in message and "Invalid token" in message
    assert "401" in message and "tg-a1b2c3-1-1" in message
    assert wrong not in message and wrong not in caplog.text
    assert rig.fake.orders == {}


@pytest.mark.parametrize(
    ("behaviour", "needle"),
    [(Behaviour.RATE_LIMIT, "UDAPI10005"), (Behaviour.SERVER_ERROR, "HTTP 500")],
)
async def test_rate_limit_and_server_error_are_unavailable(
    rig: Rig, caplog: pytest.LogCaptureFixture, behaviour: Behaviour, needle: str
) -> None:
    """A 429 (UDAPI10005) or a 500 is BrokerUnavailable: the outcome is unknown, retry later."""
    caplog.set_level(logging.DEBUG)
    rig.fake.behaviour = behaviour
    with pytest.raises(BrokerUnavailable) as caught:
        await asyncio.wait_for(rig.broker().place_exit(exit_order()), 5.0)
    assert needle in str(caught.value)
    assert TOKEN not in caplog.text and TOKEN not in str(caught.value)
    assert rig.fake.place_count() == 1


async def test_unreachable_broker_is_unavailable(rig: Rig) -> None:
    """A refused connection is BrokerUnavailable."""
    await rig.fake.close()
    with pytest.raises(BrokerUnavailable):
        await asyncio.wait_for(rig.broker().place_exit(exit_order()), 5.0)


@pytest.mark.parametrize("quantity", [2.5, 0.0, -1.0, float("nan")])
async def test_non_integral_quantity_is_refused_without_a_request(
    rig: Rig, quantity: float
) -> None:
    """A quantity that is not a positive whole number is refused before anything is sent."""
    with pytest.raises(BrokerRejected, match="whole number"):
        await rig.broker().place_exit(exit_order(quantity=quantity))
    assert rig.fake.requests == []


async def test_find_order_by_tag_reports_a_fill(rig: Rig) -> None:
    """A filled order is found by its tag as FILLED at its average price."""
    placed = await asyncio.wait_for(rig.broker().place_exit(exit_order()), 5.0)
    found = await asyncio.wait_for(rig.broker().find_order("tg-a1b2c3-1-1"), 5.0)
    assert found is not None and found.status is OrderStatus.FILLED
    assert found.fill_price == 93.85 and found.broker_order_id == placed.broker_order_id
    assert ("GET", "/v2/order/history?tag=tg-a1b2c3-1-1") in rig.fake.requests


async def test_find_order_by_tag_reports_an_open_order_working(rig: Rig) -> None:
    """An open order is found by its tag as WORKING; another tag's order is not confused with it."""
    rig.fake.behaviour = Behaviour.FILL
    await asyncio.wait_for(rig.broker().place_exit(exit_order("tg-other-9-1")), 5.0)
    rig.fake.behaviour = Behaviour.STAY_OPEN
    await asyncio.wait_for(rig.broker(fill_wait=0.0).place_exit(exit_order()), 5.0)
    found = await asyncio.wait_for(rig.broker().find_order("tg-a1b2c3-1-1"), 5.0)
    assert found is not None and found.status is OrderStatus.WORKING
    assert found.broker_order_id == list(rig.fake.orders)[1]


async def test_find_order_by_tag_reports_a_rejection(rig: Rig) -> None:
    """A rejected order is found by its tag as REJECTED with its message."""
    rig.fake.behaviour = Behaviour.REJECT
    await asyncio.wait_for(rig.broker().place_exit(exit_order()), 5.0)
    found = await asyncio.wait_for(rig.broker().find_order("tg-a1b2c3-1-1"), 5.0)
    assert found is not None and found.status is OrderStatus.REJECTED
    assert "RMS:Margin Exceeds" in found.detail


@pytest.mark.parametrize("missing_as_error", [False, True])
async def test_find_order_of_unknown_tag_is_none(rig: Rig, missing_as_error: bool) -> None:
    """A tag the broker never saw (empty data or 400 'Order not found') is None."""
    rig.fake.missing_as_error = missing_as_error
    await asyncio.wait_for(rig.broker().place_exit(exit_order("tg-other-9-1")), 5.0)
    assert await asyncio.wait_for(rig.broker().find_order("tg-a1b2c3-1-1"), 5.0) is None


@pytest.mark.parametrize("status", [401, 429, 500])
async def test_failed_lookup_is_unavailable_not_absent(rig: Rig, status: int) -> None:
    """A lookup that fails is BrokerUnavailable, never None: absence must not be guessed."""
    await asyncio.wait_for(rig.broker().place_exit(exit_order()), 5.0)
    rig.fake.lookup_status = status
    with pytest.raises(BrokerUnavailable, match=str(status)):
        await asyncio.wait_for(rig.broker().find_order("tg-a1b2c3-1-1"), 5.0)


async def test_lookup_with_a_wrong_token_is_unavailable(rig: Rig) -> None:
    """A 401 on lookup is BrokerUnavailable (the order may exist), without the token."""
    wrong = "wrong-token-do-not-print-77"
    with pytest.raises(BrokerUnavailable) as caught:
        await asyncio.wait_for(rig.broker(token=wrong).find_order("tg-a1b2c3-1-1"), 5.0)
    assert "UDAPI100050" in str(caught.value) and wrong not in str(caught.value)


# ---------------------------------------------------------------------------
# Through the real executor


async def test_lost_reply_is_reconciled_by_tag_without_a_second_order(
    rig: Rig, tmp_path: Path
) -> None:
    """A place whose reply never comes times out, is found filled by tag, and is never resent."""
    rig.fake.behaviour = Behaviour.LOST_REPLY
    store = Store.in_dir(tmp_path)
    book = PriceBook(stale_warning=30.0, cache_timeout=300.0)
    book.channel_up(PriceSource.POLL, time.monotonic())
    guard = Guard(
        book, blind_policy=BlindPolicy.HOLD, blind_after=300.0, install_id=store.install_id
    )
    executor = ExitExecutor(guard, store, rig.broker(), order_timeout=0.3)
    try:
        spec = PositionSpec(SYMBOL, Side.LONG, 10.0, 100.0, stop_loss=95.0, take_profit=110.0)
        position = store.add_position(spec, time.time())
        guard.add(position, time.monotonic())
        book.update(SYMBOL, 94.0, None, PriceSource.POLL, time.monotonic())
        events = guard.evaluate(SYMBOL, time.monotonic(), time.time(), market_open=True)
        (decided,) = [e for e in events if isinstance(e, ExitDecided)]
        cid = decided.exit.client_order_id
        executor.submit(decided)

        first = await asyncio.wait_for(executor.first_outcome(cid), 5.0)
        assert first.state is ExitState.RETRY and first.detail == "timed out"
        assert await executor.drain(5.0)

        assert rig.fake.place_count() == 1 and len(rig.fake.orders) == 1
        (order_id,) = rig.fake.orders
        assert ("GET", f"/v2/order/history?tag={cid}") in rig.fake.requests
        assert [e["state"] for e in store.exit_events(cid)] == [
            "pending",
            "sent",
            "retry",
            "filled",
        ]
        record = store.exit_record(cid)
        assert record is not None and record.exit.state is ExitState.FILLED
        assert record.exit.fill_price == 93.85 and record.exit.broker_order_id == order_id
        assert record.exit.attempts == 1
        stored = store.latest_position(SYMBOL)
        assert stored is not None and stored.state is PositionState.CLOSED
    finally:
        await executor.cancel_all()
        store.close()
