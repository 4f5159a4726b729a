"""The Upstox broker against a protocol-faithful fake of Upstox's order endpoints on loopback.

The fake follows docs/reference broker-protocols.md section 2: place (v3) on
the HFT host, order details and history on the API host, bearer-token auth,
Upstox error bodies, and a scriptable behaviour per place request. It also
keeps an account ledger served as `GET /v2/portfolio/short-term-positions`:
its own fills change it, and a test sets it directly (`set_position`, `trade`)
to play a bot or a person trading outside tickguard. The positions answer is
encoded once per change of the ledger (each entry once per change of its
line), so that a benchmark measures tickguard's read of 1,000 positions, not
the fake's.

It speaks GTT too (the safety net): `POST /v3/order/gtt/place`, `PUT
/v3/order/gtt/modify`, `DELETE /v3/order/gtt/cancel` (JSON body) and `GET
/v3/order/gtt` (`?gtt_order_id=` one GTT's details; without it, the list), with
the documented bodies validated field by field; and `DELETE
/v3/order/cancel?order_id=` for orders. A test moves the market with
`market(key, price)`: every active GTT on `key` whose trigger the price reaches
fires, its ENTRY rule TRIGGERED with the LIMIT order it placed (at the trigger),
which fills at once against the ledger unless `gtt_fills` is False (a gap: the
order stays open until cancelled, or `fill`ed by the test). Knobs:
`gtt_behaviour` (ANSWER, SERVER_ERROR, HANG until `release`, REJECT) on every
GTT endpoint, `overrides` (an operation's answer replaced by a handler: hostile
bodies), `gtt_missing_as_error`, `list_inactive`, `extra_gtts`; records
`gtt_calls` (a Counter by operation), `gtt_bodies`, `fired`. Upstox's order rate
limit is enforced: more than `order_rate_limit` (10) order-type calls (order
place and cancel, GTT place, modify and cancel) within one second of `clock`
are answered 429 UDAPI10005 and counted in `rate_limited`; order places count
against it, but are refused only with `limit_places` (the exit tests written
before the limit send exits faster than Upstox would take them).
"""

from __future__ import annotations

import asyncio
import collections
import enum
import itertools
import json
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from tickguard.brokers.upstox import (
    DEFAULT_PRODUCTS,
    POSITIONS_TIMEOUT,
    REQUEST_TIMEOUT,
    UpstoxBroker,
)
from tickguard.core.account import Holding
from tickguard.core.exits import ExitState
from tickguard.core.guard import BlindPolicy, ExitDecided, Guard
from tickguard.core.orders import ExitOrder, OrderStatus
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
POSITIONS_PATH = "/v2/portfolio/short-term-positions"
OTHER = "NSE_EQ|INE002A01018"
THIRD = "BSE_EQ|INE467B01029"
# The status trail of an order before it reaches the exchange's book.
ACCEPT_TRAIL = ("put order req received", "validation pending", "open pending")
FINAL_STATUSES = frozenset({"complete", "cancelled", "rejected"})

# GTT (broker-protocols.md section 2).
GTT_PLACE_PATH = "/v3/order/gtt/place"
GTT_MODIFY_PATH = "/v3/order/gtt/modify"
GTT_CANCEL_PATH = "/v3/order/gtt/cancel"
GTT_PATH = "/v3/order/gtt"
ORDER_CANCEL_PATH = "/v3/order/cancel"
GTT_FIELDS = {
    "place": ("type", "quantity", "product", "instrument_token", "transaction_type", "rules"),
    "modify": ("type", "gtt_order_id", "quantity", "rules"),
    "cancel": ("gtt_order_id",),
}
RULE_FIELDS = ("strategy", "trigger_type", "trigger_price")  # trailing_gap: STOPLOSS rules only
PRODUCTS = frozenset({"I", "D", "MTF"})
TICK = 0.05  # NSE equity prices move in 0.05 steps
SCHEDULED, TRIGGERED, CANCELLED = "SCHEDULED", "TRIGGERED", "CANCELLED"  # an ENTRY rule's status
GTT_OPERATIONS = frozenset({"place", "modify", "cancel", "details", "list"})
# Upstox's order limit (10/s, unconfirmed) counts these: GTT calls that change a GTT, and
# order place/cancel ("order_place" is `/v3/order/place`).
ORDER_TYPE_OPERATIONS = frozenset({"place", "modify", "cancel", "order_cancel", "order_place"})
ORDER_RATE_LIMIT = 10
# The fake's own codes and messages where Upstox's are unconfirmed: an unknown GTT id, a GTT
# no longer active (fired or cancelled) being modified or cancelled, the REJECT knob, and an
# order that is no longer open being cancelled.
GTT_NOT_FOUND = {"errorCode": "UDAPI1100", "message": "GTT order not found"}
GTT_NOT_ACTIVE = {
    "errorCode": "UDAPI1101",
    "message": "GTT order is already triggered or cancelled",
}
GTT_REFUSED = {"errorCode": "UDAPI1102", "message": "GTT order request refused"}
ORDER_NOT_OPEN = {"errorCode": "UDAPI1103", "message": "Order is already complete or cancelled"}


class Behaviour(enum.Enum):
    FILL = "fill"  # complete at once
    OPEN_THEN_FILL = "open_then_fill"  # open for `open_polls` detail polls, then complete
    STAY_OPEN = "stay_open"  # open for ever
    REJECT = "reject"  # rejected by the exchange/RMS, with a status_message
    RATE_LIMIT = "rate_limit"  # 429 UDAPI10005, no order created
    SERVER_ERROR = "server_error"  # 500, no order created
    LOST_REPLY = "lost_reply"  # store the order (complete), then never answer


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class GttBehaviour(enum.Enum):
    ANSWER = "answer"  # as Upstox would
    SERVER_ERROR = "server_error"  # 500 with an HTML page, nothing done
    HANG = "hang"  # no answer until `release` is set (then as ANSWER)
    REJECT = "reject"  # 400 with Upstox's error body (GTT_REFUSED), nothing done


class PositionsBehaviour(enum.Enum):
    ANSWER = "answer"  # the ledger, in the documented shape
    SERVER_ERROR = "server_error"  # 500 with an HTML page
    HANG = "hang"  # never answer
    UNAUTHORIZED = "unauthorized"  # 401 UDAPI100050 (the token expired at 03:30)
    NOT_JSON = "not_json"  # 200 with a body that is not JSON
    STATUS_ERROR = "status_error"  # 200 with {"status": "error", "errors": [...]}
    MALFORMED = "malformed"  # the ledger plus one intraday entry whose quantity is a string
    ECHO = "echo"  # 200, status error, the message repeating the Authorization header sent


@dataclass
class LedgerLine:
    """The fake account's position in one instrument key and product.

    The carried part (`overnight_*`) is what `set_position` sets; the day's trades
    (the fake's own fills, `trade`) add to `day_*`. The net is their sum.
    """

    overnight_quantity: int = 0
    overnight_price: float = 0.0
    day_buy_quantity: int = 0
    day_buy_value: float = 0.0
    day_sell_quantity: int = 0
    day_sell_value: float = 0.0
    average_price: float | None = None  # of the net, by average-cost rules; None when flat

    @property
    def quantity(self) -> int:
        return self.overnight_quantity + self.day_buy_quantity - self.day_sell_quantity


def error_body(*errors: dict[str, str]) -> dict[str, Any]:
    return {"status": "error", "errors": [dict(e, propertyPath=None) for e in errors]}


@dataclass
class FakeOrder:
    order_id: str
    body: dict[str, Any]
    behaviour: Behaviour
    history: list[dict[str, Any]] = field(default_factory=list)
    detail_polls: int = 0

    @property
    def status(self) -> str:
        return str(self.history[-1]["status"])


@dataclass
class FakeGtt:
    """A SINGLE GTT the fake holds, as placed (or last modified)."""

    gtt_id: str
    key: str
    product: str
    transaction_type: str
    quantity: int
    # The ENTRY rule as Upstox lists it: strategy, trigger_type, trigger_price,
    # transaction_type, status (SCHEDULED, TRIGGERED, CANCELLED), and once fired, order_id.
    rule: dict[str, Any]
    created_at: int  # epoch ms

    @property
    def status(self) -> str:
        return str(self.rule["status"])

    def reached(self, price: float) -> bool:
        trigger = self.rule["trigger_price"]
        return price <= trigger if self.rule["trigger_type"] == "BELOW" else price >= trigger


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
        self.arrivals: list[float] = []  # time.monotonic() each request arrived, as `requests`
        self.place_bodies: list[Any] = []  # every place body received, as decoded JSON
        self.place_headers: list[dict[str, str]] = []
        self.orders: dict[str, FakeOrder] = {}
        self.release = asyncio.Event()  # ends hung replies
        # (instrument key, product) -> line; changed through set_position and trade only (the
        # positions answer is kept encoded until they change it)
        self.ledger: dict[tuple[str, str], LedgerLine] = {}
        self.last_price = 94.0
        self.positions_behaviour = PositionsBehaviour.ANSWER
        self.extra_entries: list[Any] = []  # raw JSON values appended to the positions data
        self.positions_override: Handler | None = None  # answers positions requests instead
        # The positions answer as sent, kept until set_position or trade changes the ledger
        # (or last_price changes): each ledger line's entry, in the ledger's order (lines
        # are added, never removed), and the whole answer.
        self._entries: list[bytes] = []
        self._entry_of: dict[tuple[str, str], int] = {}  # ledger line -> its entry's index
        self._stale: set[tuple[str, str]] = set()  # lines whose entry is to be encoded again
        self._answer: bytes | None = None
        self._encoded_price = self.last_price
        self._ids = itertools.count(250101000000001)
        self._runner: web.AppRunner | None = None
        self.port = 0
        # GTT (the safety net) and order cancel
        self.gtts: dict[str, FakeGtt] = {}
        self.gtt_behaviour = GttBehaviour.ANSWER
        self.gtt_fills = True  # a fired GTT's LIMIT order fills at once (False: stays open)
        self.gtt_missing_as_error = True  # details of an unknown id: 400 (True) or empty data
        self.list_inactive = True  # fired and cancelled GTTs stay listed (unconfirmed)
        self.extra_gtts: list[Any] = []  # raw JSON values appended to the list answer's data
        # operation ("place", "modify", "cancel", "details", "list", "order_cancel") -> a
        # handler answering it instead, after it is counted and rate limited
        self.overrides: dict[str, Handler] = {}
        self.gtt_calls: collections.Counter[str] = collections.Counter()  # by GTT operation
        self.gtt_bodies: list[tuple[str, Any]] = []  # (operation, decoded body) as received
        self.fired: list[str] = []  # GTT ids, as they fired
        self.ltp: dict[str, float] = {}  # the market as `market` last set it
        self.order_rate_limit: int | None = ORDER_RATE_LIMIT  # order-type calls a second
        # Order places count against the limit, but are refused over it only when True: the
        # exit tests written before the limit send exits faster than 10 a second.
        self.limit_places = False
        self.rate_limited = 0  # order-type calls answered 429
        self.clock: Callable[[], float] = time.monotonic  # the rate limit's (a test may freeze it)
        self._order_calls: collections.deque[float] = collections.deque()  # admitted, in 1 s
        self._gtt_ids = itertools.count(25010700000001)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self, routes: Sequence[web.RouteDef] = ()) -> None:
        """Serve on 127.0.0.1:0; `routes`: more endpoints of the same host (behind the same
        token check), e.g. the feed fake's authorize and LTP, which Upstox serves there too."""
        app = web.Application(middlewares=[self._auth])
        app.router.add_post("/v3/order/place", self._place)
        app.router.add_get("/v2/order/details", self._details)
        app.router.add_get("/v2/order/history", self._history)
        app.router.add_get(POSITIONS_PATH, self._positions)
        app.router.add_post(GTT_PLACE_PATH, self._gtt_place)
        app.router.add_put(GTT_MODIFY_PATH, self._gtt_modify)
        app.router.add_delete(GTT_CANCEL_PATH, self._gtt_cancel)
        app.router.add_get(GTT_PATH, self._gtt_get)
        app.router.add_delete(ORDER_CANCEL_PATH, self._order_cancel)
        app.router.add_routes(routes)
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
        self.arrivals.append(time.monotonic())
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
        throttled = self._throttled(refuse=self.limit_places)
        if throttled is not None:
            return throttled
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

    # -- GTT and order cancel ---------------------------------------------

    async def _gtt_place(self, request: web.Request) -> web.StreamResponse:
        return await self._serve("place", request, self._place_gtt)

    async def _gtt_modify(self, request: web.Request) -> web.StreamResponse:
        return await self._serve("modify", request, self._modify_gtt)

    async def _gtt_cancel(self, request: web.Request) -> web.StreamResponse:
        return await self._serve("cancel", request, self._cancel_gtt)

    async def _gtt_get(self, request: web.Request) -> web.StreamResponse:
        if "gtt_order_id" in request.query:
            return await self._serve("details", request, self._gtt_details)
        return await self._serve("list", request, self._gtt_list)

    async def _order_cancel(self, request: web.Request) -> web.StreamResponse:
        return await self._serve("order_cancel", request, self._cancel_order)

    async def _serve(
        self,
        operation: str,
        request: web.Request,
        act: Callable[[Any, web.Request], web.StreamResponse],
    ) -> web.StreamResponse:
        """A GTT or order-cancel request: counted, rate limited (order-type calls), answered
        by its override if any, refused (400) if it breaks the documented shape, faulted by
        `gtt_behaviour` (GTT calls), and then done by `act(body, request)`."""
        if operation in GTT_OPERATIONS:
            self.gtt_calls[operation] += 1
        if operation in ORDER_TYPE_OPERATIONS:
            throttled = self._throttled()
            if throttled is not None:
                return throttled
        override = self.overrides.get(operation)
        if override is not None:
            return await override(request)
        if request.headers.get("Accept") != "application/json":
            return bad_request("Accept", "Accept must be application/json")
        body: Any = None
        if operation in GTT_FIELDS:
            if request.headers.get("Content-Type", "").split(";")[0] != "application/json":
                return bad_request("Content-Type", "Content-Type must be application/json")
            try:
                body = await request.json()
            except ValueError:
                return bad_request("body", "Invalid JSON")
            self.gtt_bodies.append((operation, body))
            problem = gtt_problem(operation, body)
            if problem is not None:
                return bad_request(*problem)
        if operation in GTT_OPERATIONS:
            behaviour = self.gtt_behaviour
            if behaviour is GttBehaviour.SERVER_ERROR:
                return web.Response(status=500, text="<html>Internal Server Error</html>")
            if behaviour is GttBehaviour.REJECT:
                return web.json_response(error_body(GTT_REFUSED), status=400)
            if behaviour is GttBehaviour.HANG:
                await self.release.wait()
        return act(body, request)

    def _throttled(self, *, refuse: bool = True) -> web.Response | None:
        """429 UDAPI10005 (no Retry-After) for an order-type call when `order_rate_limit`
        calls were admitted within the last second of `clock`; a throttled call is not
        admitted (it does not count against the next). `refuse` False: admitted all the
        same, counted against the calls after it (order places, see `limit_places`)."""
        limit = self.order_rate_limit
        if limit is None:
            return None
        now = self.clock()
        admitted = self._order_calls
        while admitted and now - admitted[0] >= 1.0:
            admitted.popleft()
        if len(admitted) >= limit and refuse:
            self.rate_limited += 1
            return web.json_response(error_body(RATE_LIMITED), status=429)
        admitted.append(now)
        return None

    def _place_gtt(self, body: Any, request: web.Request) -> web.StreamResponse:
        (rule,) = body["rules"]
        gtt = FakeGtt(
            gtt_id=f"GTT-C{next(self._gtt_ids)}",
            key=body["instrument_token"],
            product=body["product"],
            transaction_type=body["transaction_type"],
            quantity=body["quantity"],
            rule={
                "strategy": rule["strategy"],
                "trigger_type": rule["trigger_type"],
                "trigger_price": rule["trigger_price"],
                "transaction_type": body["transaction_type"],
                "status": SCHEDULED,
            },
            created_at=int(time.time() * 1000),
        )
        self.gtts[gtt.gtt_id] = gtt
        return _gtt_ids_answer(gtt.gtt_id)

    def _changeable(self, gtt_id: str) -> FakeGtt | web.Response:
        """The GTT to modify or cancel, or the 400 refusing it: unknown, or no longer active
        (Upstox's answer for a GTT that fired or was cancelled is unconfirmed)."""
        gtt = self.gtts.get(gtt_id)
        if gtt is None:
            return web.json_response(error_body(GTT_NOT_FOUND), status=400)
        if gtt.status != SCHEDULED:
            return web.json_response(error_body(GTT_NOT_ACTIVE), status=400)
        return gtt

    def _modify_gtt(self, body: Any, request: web.Request) -> web.StreamResponse:
        gtt = self._changeable(body["gtt_order_id"])
        if isinstance(gtt, web.Response):
            return gtt
        (rule,) = body["rules"]
        gtt.quantity = body["quantity"]
        gtt.rule.update(trigger_type=rule["trigger_type"], trigger_price=rule["trigger_price"])
        return _gtt_ids_answer(gtt.gtt_id)

    def _cancel_gtt(self, body: Any, request: web.Request) -> web.StreamResponse:
        gtt = self._changeable(body["gtt_order_id"])
        if isinstance(gtt, web.Response):
            return gtt
        gtt.rule["status"] = CANCELLED
        return _gtt_ids_answer(gtt.gtt_id)

    def _gtt_details(self, body: Any, request: web.Request) -> web.StreamResponse:
        gtt = self.gtts.get(request.query["gtt_order_id"])
        if gtt is None:
            if self.gtt_missing_as_error:
                return web.json_response(error_body(GTT_NOT_FOUND), status=400)
            return web.json_response({"status": "success", "data": []})
        return web.json_response({"status": "success", "data": [self.gtt_entry(gtt)]})

    def _gtt_list(self, body: Any, request: web.Request) -> web.StreamResponse:
        data = [
            self.gtt_entry(gtt)
            for gtt in self.gtts.values()
            if self.list_inactive or gtt.status == SCHEDULED
        ]
        return web.json_response({"status": "success", "data": data + self.extra_gtts})

    def _cancel_order(self, body: Any, request: web.Request) -> web.StreamResponse:
        order = self.orders.get(request.query.get("order_id", ""))
        if order is None:
            return web.json_response(error_body(ORDER_NOT_FOUND), status=400)
        if order.status in FINAL_STATUSES:  # Upstox's answer here is unconfirmed
            return web.json_response(error_body(ORDER_NOT_OPEN), status=400)
        self._append(order, "cancelled")
        return web.json_response(
            {"status": "success", "data": {"order_id": order.order_id}, "metadata": {"latency": 9}}
        )

    def gtt_entry(self, gtt: FakeGtt) -> dict[str, Any]:
        """One GTT in the documented details/list shape."""
        return {
            "type": "SINGLE",
            "exchange": gtt.key.split("_", 1)[0],
            "quantity": gtt.quantity,
            "product": gtt.product,
            "rules": [dict(gtt.rule)],
            "gtt_order_id": gtt.gtt_id,
            "trading_symbol": "SBIN-EQ",
            "instrument_token": gtt.key,
            "created_at": gtt.created_at,
            "expires_at": gtt.created_at + 365 * 86_400_000,
        }

    # -- the market --------------------------------------------------------

    def market(self, key: str, price: float) -> list[str]:
        """`key` last traded at `price`: every active GTT on it whose trigger that reaches
        (BELOW: price <= trigger; ABOVE: price >= trigger) fires. The ids fired now."""
        self.ltp[key] = price
        fired = [
            gtt
            for gtt in self.gtts.values()
            if gtt.key == key and gtt.status == SCHEDULED and gtt.reached(price)
        ]
        for gtt in fired:
            self._fire(gtt)
        return [gtt.gtt_id for gtt in fired]

    def _fire(self, gtt: FakeGtt) -> None:
        """The GTT's ENTRY rule TRIGGERED: a LIMIT order at its trigger, filled at once
        against the ledger when `gtt_fills`, else left open (a gap)."""
        body = {
            "quantity": gtt.quantity,
            "product": gtt.product,
            "validity": "DAY",
            "price": gtt.rule["trigger_price"],
            "instrument_token": gtt.key,
            "order_type": "LIMIT",
            "transaction_type": gtt.transaction_type,
            "disclosed_quantity": 0,
            "trigger_price": 0,
            "is_amo": False,
            "slice": False,
        }
        behaviour = Behaviour.FILL if self.gtt_fills else Behaviour.STAY_OPEN
        order = FakeOrder(str(next(self._ids)), body, behaviour)
        self.orders[order.order_id] = order
        for status in (*ACCEPT_TRAIL, "open"):
            self._append(order, status)
        if self.gtt_fills:
            self._append(order, "complete")
        gtt.rule.update(status=TRIGGERED, order_id=order.order_id)
        self.fired.append(gtt.gtt_id)

    def fill(self, order_id: str, price: float | None = None) -> None:
        """An open order fills now (at its limit price, or `price`), against the ledger."""
        order = self.orders[order_id]
        assert order.status == "open", f"order {order_id} is {order.status}, not open"
        self._append(order, "complete", fill_price=price)

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

    async def _positions(self, request: web.Request) -> web.StreamResponse:
        if self.positions_override is not None:
            return await self.positions_override(request)
        behaviour = self.positions_behaviour
        if behaviour is PositionsBehaviour.SERVER_ERROR:
            return web.Response(status=500, text="<html>Internal Server Error</html>")
        if behaviour is PositionsBehaviour.HANG:
            await self.release.wait()
        if behaviour is PositionsBehaviour.UNAUTHORIZED:
            return web.json_response(error_body(INVALID_TOKEN), status=401)
        if behaviour is PositionsBehaviour.NOT_JSON:
            return web.Response(text="<html>upstream gateway</html>", content_type="text/html")
        if behaviour is PositionsBehaviour.STATUS_ERROR:
            body = error_body({"errorCode": "UDAPI100500", "message": "Something went wrong"})
            return web.json_response(body)
        if behaviour is PositionsBehaviour.ECHO:
            said = f"Bad header {request.headers.get('Authorization')}"
            return web.json_response(error_body({"errorCode": "UDAPI100500", "message": said}))
        if behaviour is PositionsBehaviour.ANSWER and not self.extra_entries:
            body = self._ledger_answer()
        else:
            data = [self._entries_json()]
            if behaviour is PositionsBehaviour.MALFORMED:
                bad = self.position_entry(SYMBOL, "I", LedgerLine(overnight_quantity=5))
                data.append(json.dumps(dict(bad, quantity="5")).encode())
            data += [json.dumps(entry).encode() for entry in self.extra_entries]
            body = _answer(b", ".join(d for d in data if d))
        # What web.json_response({"status": "success", "data": [...]}) sends, byte for byte.
        return web.Response(body=body, content_type="application/json", charset="utf-8")

    def _ledger_answer(self) -> bytes:
        """The answer for the ledger alone, encoded once per change."""
        self._forget_if_repriced()
        if self._answer is None:
            self._answer = _answer(self._entries_json())
        return self._answer

    def _forget_if_repriced(self) -> None:
        if self._encoded_price != self.last_price:  # every entry's pnl and last_price move
            self._stale.update(self.ledger)
            self._answer = None
            self._encoded_price = self.last_price

    def _entries_json(self) -> bytes:
        """The ledger's entries as json.dumps writes them in a list, without the brackets."""
        self._forget_if_repriced()
        entries, entry_of = self._entries, self._entry_of
        for line in itertools.islice(self.ledger, len(entries), None):  # added since
            entry_of[line] = len(entries)
            entries.append(b"")
            self._stale.add(line)
        for line in self._stale:
            entries[entry_of[line]] = json.dumps(self.position_entry(*line)).encode()
        self._stale.clear()
        return b", ".join(entries)

    def _changed(self, key: str, product: str) -> None:
        self._stale.add((key, product))
        self._answer = None

    def position_entry(
        self, key: str, product: str, line: LedgerLine | None = None
    ) -> dict[str, Any]:
        """One ledger line in Upstox's documented positions shape."""
        line = line if line is not None else self.ledger[(key, product)]
        carried = line.overnight_quantity
        night_buy, night_sell = max(carried, 0), max(-carried, 0)
        night_buy_amount = night_buy * line.overnight_price
        night_sell_amount = night_sell * line.overnight_price
        buy_quantity = night_buy + line.day_buy_quantity
        sell_quantity = night_sell + line.day_sell_quantity
        buy_value = night_buy_amount + line.day_buy_value
        sell_value = night_sell_amount + line.day_sell_value
        value = sell_value - buy_value
        pnl = value + line.quantity * self.last_price
        average = line.average_price
        unrealised = line.quantity * (self.last_price - average) if average is not None else 0.0
        symbol = key.split("|", 1)[1]
        return {
            "exchange": key.split("_", 1)[0],
            "multiplier": 1.0,
            "value": round(value, 2),
            "pnl": round(pnl, 2),
            "product": product,
            "instrument_token": key,
            "average_price": average,
            "buy_value": round(buy_value, 2),
            "overnight_quantity": carried,
            "day_buy_value": round(line.day_buy_value, 2),
            "day_buy_price": _price(line.day_buy_value, line.day_buy_quantity),
            "overnight_buy_amount": round(night_buy_amount, 2),
            "overnight_buy_quantity": night_buy,
            "day_buy_quantity": line.day_buy_quantity,
            "day_sell_value": round(line.day_sell_value, 2),
            "day_sell_price": _price(line.day_sell_value, line.day_sell_quantity),
            "overnight_sell_amount": round(night_sell_amount, 2),
            "overnight_sell_quantity": night_sell,
            "day_sell_quantity": line.day_sell_quantity,
            "quantity": line.quantity,
            "last_price": self.last_price,
            "unrealised": round(unrealised, 2),
            "realised": round(pnl - unrealised, 2),
            "sell_value": round(sell_value, 2),
            "trading_symbol": symbol,
            "tradingsymbol": symbol,
            "close_price": self.last_price,
            "buy_price": _price(buy_value, buy_quantity),
            "sell_price": _price(sell_value, sell_quantity),
        }

    # -- the account ledger ----------------------------------------------

    def set_position(
        self, key: str, quantity: int, average_price: float | None, product: str = "I"
    ) -> None:
        """The account holds `quantity` (signed) of `key` in `product`, carried at
        `average_price`: what a bot's entry or a person's trade left; the day's trades reset."""
        self._changed(key, product)
        self.ledger[(key, product)] = LedgerLine(
            overnight_quantity=quantity,
            overnight_price=average_price or 0.0,
            average_price=average_price if quantity else None,
        )

    def trade(self, key: str, transaction: str, quantity: int, price: float, product: str) -> None:
        """A fill on the account (ours or anyone's), by average-cost rules: adding averages in,
        reducing keeps the average, crossing zero starts the new side at `price`."""
        self._changed(key, product)
        line = self.ledger.setdefault((key, product), LedgerLine())
        before = line.quantity
        if transaction == "BUY":
            line.day_buy_quantity += quantity
            line.day_buy_value += quantity * price
        else:
            line.day_sell_quantity += quantity
            line.day_sell_value += quantity * price
        after = line.quantity
        if after == 0:
            line.average_price = None
        elif before == 0 or (before > 0) != (after > 0):
            line.average_price = price
        elif abs(after) > abs(before):
            old = line.average_price
            added = abs(after) - abs(before)
            line.average_price = (
                None if old is None else (abs(before) * old + added * price) / abs(after)
            )

    def net(self, key: str, product: str = "I") -> int:
        line = self.ledger.get((key, product))
        return line.quantity if line is not None else 0

    def _append(
        self, order: FakeOrder, status: str, message: str = "", fill_price: float | None = None
    ) -> None:
        body = order.body
        done = status == "complete"
        if fill_price is None:  # a LIMIT order fills at its price (no better), MARKET at ours
            fill_price = body["price"] if body["order_type"] == "LIMIT" else self.fill_price
        if done:  # the fill changes the account, in the order's product
            self.trade(
                body["instrument_token"],
                body["transaction_type"],
                body["quantity"],
                fill_price,
                body["product"],
            )
        order.history.append(
            {
                "exchange": body["instrument_token"].split("_", 1)[0],
                "product": body["product"],
                "price": float(body["price"]),
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
                "average_price": fill_price if done else 0.0,
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


def _answer(entries: bytes) -> bytes:
    """A positions answer around its entries' JSON, as json.dumps writes it."""
    return b'{"status": "success", "data": [' + entries + b"]}"


def _price(value: float, quantity: int) -> float:
    return round(value / quantity, 2) if quantity else 0.0


def _gtt_ids_answer(gtt_id: str) -> web.Response:
    """Place, modify and cancel answer the GTT's id."""
    return web.json_response(
        {"status": "success", "data": {"gtt_order_ids": [gtt_id]}, "metadata": {"latency": 18}}
    )


def _one_of(value: Any, allowed: frozenset[str] | set[str]) -> bool:
    return isinstance(value, str) and value in allowed


def gtt_problem(operation: str, body: Any) -> tuple[str, str] | None:
    """What breaks the documented GTT body of `operation` (place, modify, cancel), as
    (field, message); None if nothing. Only SINGLE GTTs are modelled."""
    if not isinstance(body, dict):
        return ("body", "Invalid request body")
    fields = GTT_FIELDS[operation]
    for name in body:
        if name not in fields:
            return (name, f"Unknown field {name}")
    for name in fields:
        if name not in body:
            return (name, f"{name} is required")
    if "gtt_order_id" in fields and not (
        isinstance(body["gtt_order_id"], str) and body["gtt_order_id"]
    ):
        return ("gtt_order_id", "gtt_order_id has the wrong type")
    if operation == "cancel":
        return None
    if body["type"] != "SINGLE":
        if body["type"] == "MULTIPLE":
            return ("type", "MULTIPLE GTTs are not modelled by this fake")
        return ("type", "type has an invalid value")
    quantity = body["quantity"]
    if not isinstance(quantity, int) or isinstance(quantity, bool):
        return ("quantity", "quantity has the wrong type")
    if quantity <= 0:
        return ("quantity", "Quantity should be greater than 0")
    if operation == "place":
        if not _one_of(body["product"], PRODUCTS):
            return ("product", "product has an invalid value")
        key = body["instrument_token"]
        if not isinstance(key, str) or "|" not in key:
            return ("instrument_token", "Invalid instrument key")
        if not _one_of(body["transaction_type"], {"BUY", "SELL"}):
            return ("transaction_type", "transaction_type has an invalid value")
    return rules_problem(body["rules"])


def rules_problem(rules: Any) -> tuple[str, str] | None:
    """A SINGLE GTT's rules: exactly one ENTRY rule, ABOVE or BELOW a price on the tick."""
    if not isinstance(rules, list) or len(rules) != 1:
        return ("rules", "A SINGLE GTT has exactly one rule")
    rule = rules[0]
    if not isinstance(rule, dict):
        return ("rules[0]", "Invalid rule")
    for name in rule:
        if name not in (*RULE_FIELDS, "trailing_gap"):
            return (f"rules[0].{name}", f"Unknown field {name}")
    for name in RULE_FIELDS:
        if name not in rule:
            return (f"rules[0].{name}", f"{name} is required")
    if rule["strategy"] != "ENTRY":
        return ("rules[0].strategy", "A SINGLE GTT's rule is its ENTRY rule")
    if "trailing_gap" in rule:
        return ("rules[0].trailing_gap", "trailing_gap is for a STOPLOSS rule")
    if rule["trigger_type"] == "IMMEDIATE":
        return ("rules[0].trigger_type", "IMMEDIATE is not modelled by this fake")
    if not _one_of(rule["trigger_type"], {"ABOVE", "BELOW"}):
        return ("rules[0].trigger_type", "trigger_type has an invalid value")
    price = rule["trigger_price"]
    if isinstance(price, bool) or not isinstance(price, int | float):
        return ("rules[0].trigger_price", "trigger_price has the wrong type")
    if not (math.isfinite(price) and 0 < price < 1e12):
        return ("rules[0].trigger_price", "Trigger price should be greater than 0")
    if abs(price / TICK - round(price / TICK)) > 1e-6:
        return ("rules[0].trigger_price", f"Trigger price should be a multiple of {TICK}")
    return None


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

    def broker(
        self,
        *,
        token: str = TOKEN,
        fill_wait: float = 1.0,
        products: tuple[str, ...] = DEFAULT_PRODUCTS,
        positions_timeout: float = POSITIONS_TIMEOUT,
        request_timeout: float = REQUEST_TIMEOUT,
        api_url: str | None = None,
        hft_url: str | None = None,
    ) -> UpstoxBroker:
        return UpstoxBroker(
            self.session,
            token=token,
            api_url=api_url or self.fake.url,
            hft_url=hft_url or self.fake.url,
            fill_wait=fill_wait,
            poll_interval=0.02,
            products=products,
            positions_timeout=positions_timeout,
            request_timeout=request_timeout,
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


# ---------------------------------------------------------------------------
# The account: GET /v2/portfolio/short-term-positions


async def positions_of(broker: UpstoxBroker) -> list[Holding]:
    return await asyncio.wait_for(broker.positions(), 5.0)


async def test_positions_in_the_documented_shape_become_holdings(rig: Rig) -> None:
    """Long and short entries become signed Holdings by instrument key; flat and uncounted
    products are left out."""
    rig.fake.set_position(SYMBOL, 10, 100.5)
    rig.fake.set_position(OTHER, -5, 735.5)
    rig.fake.set_position(THIRD, 0, None)
    rig.fake.set_position("NSE_EQ|INE040A01034", 7, 1500.0, product="CO")
    holdings = await positions_of(rig.broker())
    assert holdings == [
        Holding(OTHER, -5.0, 735.5, "I"),
        Holding(SYMBOL, 10.0, 100.5, "I"),
    ]
    assert rig.fake.requests == [("GET", POSITIONS_PATH)]


async def test_positions_are_sent_with_the_token_in_the_header_only(rig: Rig) -> None:
    """A wrong token is refused by the fake (401), which proves the Authorization header
    carries it; the error never repeats it."""
    wrong = "wrong-token-do-not-print-77"
    with pytest.raises(BrokerUnavailable) as caught:
        await positions_of(rig.broker(token=wrong))
    assert "401" in str(caught.value) and "UDAPI100050" in str(caught.value)
    assert wrong not in str(caught.value)
    assert all(wrong not in path for _, path in rig.fake.requests)


async def test_a_null_average_price_is_none(rig: Rig) -> None:
    """An open entry whose average_price is null (or 0) is held with no average price."""
    rig.fake.set_position(SYMBOL, 10, None)
    rig.fake.set_position(OTHER, 3, 0.0)
    assert await positions_of(rig.broker()) == [
        Holding(OTHER, 3.0, None, "I"),
        Holding(SYMBOL, 10.0, None, "I"),
    ]


@pytest.mark.parametrize(
    ("lines", "expected"),
    [
        # Same side: summed, the average weighted by quantity.
        ([(10, 100.0, "I"), (30, 110.0, "D")], Holding(SYMBOL, 40.0, 107.5, "")),
        ([(-2, 50.0, "I"), (-6, 54.0, "MTF")], Holding(SYMBOL, -8.0, 53.0, "")),
        # Opposite sides: the net, no average.
        ([(10, 100.0, "I"), (-4, 90.0, "D")], Holding(SYMBOL, 6.0, None, "")),
        # One side's average missing: no average.
        ([(10, 100.0, "I"), (5, None, "D")], Holding(SYMBOL, 15.0, None, "")),
        # A flat product beside an open one: the open one alone.
        ([(0, None, "I"), (5, 120.0, "D")], Holding(SYMBOL, 5.0, 120.0, "D")),
    ],
)
async def test_products_of_one_instrument_are_summed(
    rig: Rig, lines: list[tuple[int, float | None, str]], expected: Holding
) -> None:
    """An instrument held in several counted products is one Holding: the net summed, the
    average weighted over the entries when all are on the net's side."""
    for quantity, price, product in lines:
        rig.fake.set_position(SYMBOL, quantity, price, product)
    assert await positions_of(rig.broker()) == [expected]


async def test_products_that_cancel_out_are_flat(rig: Rig) -> None:
    """A long in one product and an equal short in another net to flat: no Holding."""
    rig.fake.set_position(SYMBOL, 10, 100.0, "I")
    rig.fake.set_position(SYMBOL, -10, 101.0, "D")
    assert await positions_of(rig.broker()) == []


async def test_only_the_configured_products_count(rig: Rig) -> None:
    """Only the configured products count: others are ignored, even malformed ones, and the
    same malformed entry fails the call once its product counts."""
    rig.fake.set_position(SYMBOL, 10, 100.0, "I")
    rig.fake.set_position(SYMBOL, 30, 110.0, "D")
    rig.fake.set_position(OTHER, 4, 700.0, "MTF")
    bad = rig.fake.position_entry(THIRD, "D", LedgerLine(overnight_quantity=1))
    rig.fake.extra_entries.append(dict(bad, quantity="lots"))
    assert await positions_of(rig.broker(products=("I",))) == [Holding(SYMBOL, 10.0, 100.0, "I")]
    assert await positions_of(rig.broker(products=("MTF",))) == [Holding(OTHER, 4.0, 700.0, "MTF")]
    with pytest.raises(BrokerUnavailable, match=r"data\[3\]\.quantity: 'lots'"):
        await positions_of(rig.broker(products=("D", "MTF")))


async def test_a_filled_exit_reduces_the_position(rig: Rig) -> None:
    """The fake's fill of an exit changes what positions() reports: 10 long, sell 4 -> 6 long
    at the same average; sell 6 more -> flat."""
    broker = rig.broker()
    rig.fake.set_position(SYMBOL, 10, 100.0)
    assert await positions_of(broker) == [Holding(SYMBOL, 10.0, 100.0, "I")]
    report = await asyncio.wait_for(broker.place_exit(exit_order("tg-a-1-1", 4.0)), 5.0)
    assert report.status is OrderStatus.FILLED
    assert await positions_of(broker) == [Holding(SYMBOL, 6.0, 100.0, "I")]
    await asyncio.wait_for(broker.place_exit(exit_order("tg-a-1-2", 6.0)), 5.0)
    assert await positions_of(broker) == []
    assert rig.fake.net(SYMBOL) == 0


async def test_a_short_covered_in_part_shrinks(rig: Rig) -> None:
    """A BUY exit of a short reduces the short by what it bought."""
    broker = rig.broker()
    rig.fake.set_position(OTHER, -5, 735.5)
    order = ExitOrder("tg-b-1-1", OTHER, Side.SHORT, 2.0, None)
    await asyncio.wait_for(broker.place_exit(order), 5.0)
    assert await positions_of(broker) == [Holding(OTHER, -3.0, 735.5, "I")]


async def test_an_unfilled_exit_leaves_the_position(rig: Rig) -> None:
    """An exit order still open has not traded: positions() still shows the whole holding."""
    broker = rig.broker(fill_wait=0.0)
    rig.fake.set_position(SYMBOL, 10, 100.0)
    rig.fake.behaviour = Behaviour.STAY_OPEN
    report = await asyncio.wait_for(broker.place_exit(exit_order()), 5.0)
    assert report.status is OrderStatus.WORKING
    assert await positions_of(broker) == [Holding(SYMBOL, 10.0, 100.0, "I")]


async def test_an_outside_trade_changes_the_position(rig: Rig) -> None:
    """A trade made outside tickguard (the fake's ledger set by the test) is what positions()
    reports next."""
    broker = rig.broker()
    rig.fake.set_position(SYMBOL, 10, 100.0)
    assert await positions_of(broker) == [Holding(SYMBOL, 10.0, 100.0, "I")]
    rig.fake.trade(SYMBOL, "BUY", 10, 110.0, "I")
    assert await positions_of(broker) == [Holding(SYMBOL, 20.0, 105.0, "I")]
    rig.fake.trade(SYMBOL, "SELL", 25, 90.0, "I")
    assert await positions_of(broker) == [Holding(SYMBOL, -5.0, 90.0, "I")]


@pytest.mark.parametrize(
    ("behaviour", "needles"),
    [
        (PositionsBehaviour.SERVER_ERROR, ("HTTP 500",)),
        (PositionsBehaviour.UNAUTHORIZED, ("HTTP 401", "UDAPI100050")),
        (PositionsBehaviour.NOT_JSON, ("not JSON",)),
        (PositionsBehaviour.STATUS_ERROR, ("status 'error'", "UDAPI100500")),
        (PositionsBehaviour.MALFORMED, ("data[1].quantity", "'5'")),
        (PositionsBehaviour.ECHO, ("Bad header Bearer <token>",)),
    ],
)
async def test_a_failed_positions_call_is_unavailable(
    rig: Rig,
    caplog: pytest.LogCaptureFixture,
    behaviour: PositionsBehaviour,
    needles: tuple[str, ...],
) -> None:
    """A 500, a 401, a body that is not JSON, status error or a malformed entry is
    BrokerUnavailable saying why, never a partial answer, and never carries the token (even
    when the broker repeats it)."""
    caplog.set_level(logging.DEBUG)
    rig.fake.set_position(OTHER, 3, 700.0)
    rig.fake.positions_behaviour = behaviour
    with pytest.raises(BrokerUnavailable) as caught:
        await positions_of(rig.broker())
    message = str(caught.value)
    assert "positions" in message
    for needle in needles:
        assert needle in message
    assert TOKEN not in message and TOKEN not in caplog.text


async def test_a_hung_positions_call_ends_at_its_timeout(rig: Rig) -> None:
    """A positions endpoint that never answers is BrokerUnavailable after positions_timeout."""
    rig.fake.positions_behaviour = PositionsBehaviour.HANG
    started = time.monotonic()
    with pytest.raises(BrokerUnavailable, match=r"no answer within 0\.2s"):
        await positions_of(rig.broker(positions_timeout=0.2))
    assert time.monotonic() - started < 1.5


async def test_an_unreachable_positions_endpoint_is_unavailable(rig: Rig) -> None:
    """A refused connection is BrokerUnavailable."""
    await rig.fake.close()
    with pytest.raises(BrokerUnavailable, match="positions"):
        await positions_of(rig.broker())


DROP = object()  # a field left out of an entry


def documented(**changes: Any) -> dict[str, Any]:
    """An open intraday entry of OTHER in the documented shape, with `changes` (DROP: left out)."""
    fake = FakeUpstox()
    entry = fake.position_entry(OTHER, "I", LedgerLine(overnight_quantity=4, average_price=7.0))
    entry.update(changes)
    return {k: v for k, v in entry.items() if v is not DROP}


@pytest.mark.parametrize(
    ("entry", "needle"),
    [
        (documented(quantity=10**400), "data[1].quantity: <an integer of 401 digits>"),
        (documented(quantity=-(10**400)), "data[1].quantity"),
        (documented(quantity=2.5), "data[1].quantity: 2.5"),
        (documented(quantity="4"), "data[1].quantity: '4'"),
        (documented(quantity=True), "data[1].quantity: True"),
        (documented(quantity=None), "data[1].quantity: None"),
        (documented(quantity=float("nan")), "data[1].quantity: nan"),
        (documented(quantity=10**12), "data[1].quantity"),
        (documented(quantity=[4]), "data[1].quantity: [4]"),
        (documented(quantity=DROP), "data[1].quantity is missing"),
        (documented(instrument_token=DROP), "data[1].instrument_token is missing"),
        (documented(instrument_token=""), "data[1].instrument_token: ''"),
        (documented(instrument_token="RELIANCE"), "data[1].instrument_token: 'RELIANCE'"),
        (documented(instrument_token="NSE_EQ|" + "9" * 500), "data[1].instrument_token"),
        (documented(instrument_token=12345), "data[1].instrument_token: 12345"),
        (documented(average_price="735.5"), "data[1].average_price: '735.5'"),
        (documented(average_price=-1.0), "data[1].average_price: -1.0"),
        (documented(average_price=10**400), "data[1].average_price: <an integer of 401"),
        (documented(average_price=DROP), "data[1].average_price is missing"),
        (documented(product=DROP), "data[1].product is missing"),
        (documented(product=["I"]), "data[1].product: ['I']"),
        (["not", "an", "entry"], "data[1] is not an object"),
        ("x" * 10_000, "data[1] is not an object"),
        (documented(quantity=2), "a second entry for NSE_EQ|INE002A01018 in product I"),
    ],
)
async def test_a_malformed_entry_fails_the_whole_call(rig: Rig, entry: Any, needle: str) -> None:
    """Any malformed counted entry fails the call naming the field, so that a held position is
    never reported flat; a 400-digit number is a failure, not a crash."""
    rig.fake.set_position(OTHER, 3, 700.0)
    rig.fake.extra_entries.append(entry)
    with pytest.raises(BrokerUnavailable) as caught:
        await positions_of(rig.broker())
    message = str(caught.value)
    assert needle in message and len(message) < 400
    assert TOKEN not in message


async def test_a_net_beyond_any_position_fails(rig: Rig) -> None:
    """Two entries whose sum is beyond any real position fail the call rather than report it."""
    rig.fake.set_position(SYMBOL, 900_000_000_000, 1.0, "I")
    rig.fake.set_position(SYMBOL, 900_000_000_000, 1.0, "D")
    with pytest.raises(BrokerUnavailable, match="is not a position"):
        await positions_of(rig.broker())


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ({"status": "success", "data": {"quantity": 5}}, "data is not a list"),
        ({"status": "success", "data": None}, "data is not a list: None"),
        ({"status": "success"}, "data is missing"),
        ({"data": []}, "status None"),
        ([{"status": "success", "data": []}], "the answer is not an object"),
        ("success", "the answer is not an object"),
        (10**400, "the answer is not an object: <an integer of 401 digits>"),
    ],
)
async def test_an_answer_of_the_wrong_shape_fails(rig: Rig, body: Any, needle: str) -> None:
    """A 200 whose body is not `{"status": "success", "data": [...]}` is BrokerUnavailable."""

    async def serve(request: web.Request) -> web.StreamResponse:
        return web.json_response(body)

    rig.fake.positions_override = serve
    with pytest.raises(BrokerUnavailable) as caught:
        await positions_of(rig.broker())
    assert needle in str(caught.value)


async def test_an_empty_account_is_no_holdings(rig: Rig) -> None:
    """`data: []` is an account with no positions: an empty list, not a failure."""
    assert await positions_of(rig.broker()) == []
    assert rig.fake.requests == [("GET", POSITIONS_PATH)]


async def test_the_kept_answer_is_the_documented_json_byte_for_byte(rig: Rig) -> None:
    """The fake's positions answer, kept encoded between changes of its ledger, is byte for
    byte what `web.json_response` makes of the ledger, after each kind of change."""
    fake = rig.fake

    async def served() -> tuple[bytes, str]:
        headers = {"Authorization": f"Bearer {TOKEN}"}
        async with rig.session.get(fake.url + POSITIONS_PATH, headers=headers) as response:
            return await response.read(), response.headers["Content-Type"]

    def documented() -> bytes:
        data = [fake.position_entry(key, product) for key, product in fake.ledger]
        body = web.json_response({"status": "success", "data": data + fake.extra_entries}).body
        assert isinstance(body, bytes)
        return body

    changes: list[Callable[[], None]] = [
        lambda: None,
        lambda: fake.set_position(SYMBOL, 10, 100.5),
        lambda: fake.set_position(OTHER, -3, None, "D"),
        lambda: fake.trade(SYMBOL, "SELL", 4, 99.0, "I"),
        lambda: fake.trade(THIRD, "BUY", 2, 50.0, "MTF"),  # a new line
        lambda: fake.set_position(SYMBOL, 7, 101.0),  # an old line set again
        lambda: setattr(fake, "last_price", 95.5),
        lambda: fake.extra_entries.append({"odd": float("nan")}),
    ]
    for change in changes:
        change()
        for _ in range(2):  # encoded, then kept
            body, content_type = await served()
            assert body == documented()
            assert content_type == "application/json; charset=utf-8"
