"""The Upstox safety net (GTT orders, `SafetyNetBroker`) against the fake Upstox on loopback.

The fake is `FakeUpstox` of tests/integration/test_upstox_broker.py, loaded the way
tests/integration/upstox/conftest.py loads it (tests run with --import-mode=importlib):
its GTT endpoints validate every body as documented (broker-protocols.md section 2),
`market()` fires GTTs, and its knobs make failures real (500, a hang, a refusal, the
order rate limit, hostile answers through `overrides`).
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import random
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from tickguard.brokers.upstox import UpstoxBroker
from tickguard.core.account import Holding
from tickguard.core.orders import ExitOrder, OrderStatus
from tickguard.core.positions import Side
from tickguard.core.safety_net import BrokerStop, StopState
from tickguard.errors import BrokerError, BrokerRejected, BrokerUnavailable
from tickguard.replies import MAX_REPLY_BYTES


def _broker_fakes() -> ModuleType:
    """tests/integration/test_upstox_broker.py as a module (one instance per process)."""
    name = "tickguard_upstox_broker_fakes"
    if name not in sys.modules:
        path = Path(__file__).with_name("test_upstox_broker.py")
        spec = importlib.util.spec_from_file_location(name, path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


fakes = _broker_fakes()
FakeUpstox = fakes.FakeUpstox
GttBehaviour = fakes.GttBehaviour
Rig = fakes.Rig
TOKEN: str = fakes.TOKEN
SYMBOL: str = fakes.SYMBOL
OTHER: str = fakes.OTHER
DEAD_URL = "http://127.0.0.1:9"  # discard port on loopback: nothing listens, refused at once
CALL = 5.0  # seconds any one call may take here (a bound, not a measure)


async def call(awaitable: Awaitable[Any]) -> Any:
    return await asyncio.wait_for(awaitable, CALL)


@pytest.fixture
async def rig() -> AsyncIterator[Any]:
    fake = FakeUpstox()
    await fake.start()
    session = aiohttp.ClientSession()
    try:
        yield Rig(fake, session)
    finally:
        await session.close()
        await fake.close()


def answer(body: Any, status: int = 200) -> Callable[[web.Request], Awaitable[web.Response]]:
    """An override answering `body`: bytes as they are, anything else as JSON."""

    async def serve(request: web.Request) -> web.Response:
        if isinstance(body, bytes):
            return web.Response(body=body, status=status, content_type="application/json")
        return web.json_response(body, status=status)

    return serve


def requests_to(fake: Any, path: str) -> list[tuple[str, str]]:
    return [(m, p) for m, p in fake.requests if p.split("?")[0] == path]


# ---------------------------------------------------------------------------
# Round trips, with the exact bodies


async def test_place_sends_exactly_the_documented_body(rig: Any) -> None:
    """A long's stop is one POST /v3/order/gtt/place: a SINGLE GTT whose ENTRY rule sells
    BELOW the trigger, with exactly the documented fields and types; the answer's id is the
    stop's."""
    stop = await call(rig.broker().place_stop(SYMBOL, Side.LONG, 10.0, 94.35))
    (gtt_id,) = rig.fake.gtts
    assert stop == BrokerStop(gtt_id, SYMBOL, Side.LONG, 10.0, 94.35, StopState.ACTIVE, None)
    expected: dict[str, Any] = {
        "type": "SINGLE",
        "quantity": 10,
        "product": "I",
        "instrument_token": SYMBOL,
        "transaction_type": "SELL",
        "rules": [{"strategy": "ENTRY", "trigger_type": "BELOW", "trigger_price": 94.35}],
    }
    ((operation, body),) = rig.fake.gtt_bodies
    assert operation == "place" and body == expected
    assert type(body["quantity"]) is int and type(body["rules"][0]["trigger_price"]) is float
    assert rig.fake.requests == [("POST", "/v3/order/gtt/place")]
    assert rig.fake.gtts[gtt_id].status == "SCHEDULED"
    assert rig.fake.gtt_calls == {"place": 1}


async def test_a_short_stop_buys_above(rig: Any) -> None:
    """A short's stop buys once the price is at or above the trigger."""
    stop = await call(rig.broker().place_stop(OTHER, Side.SHORT, 3, 736.0))
    assert stop.position_side is Side.SHORT and stop.quantity == 3.0
    ((_, body),) = rig.fake.gtt_bodies
    assert body["transaction_type"] == "BUY"
    assert body["rules"] == [{"strategy": "ENTRY", "trigger_type": "ABOVE", "trigger_price": 736.0}]


async def test_modify_sends_exactly_the_documented_body(rig: Any) -> None:
    """A move is one PUT /v3/order/gtt/modify with the GTT id, the quantity and the ENTRY
    rule; the fake holds the new trigger and quantity, and so does the stop returned."""
    broker = rig.broker()
    stop = await call(broker.place_stop(SYMBOL, Side.LONG, 10.0, 94.35))
    moved = await call(broker.modify_stop(stop, 8.0, 95.1))
    assert moved == BrokerStop(stop.stop_id, SYMBOL, Side.LONG, 8.0, 95.1)
    operation, body = rig.fake.gtt_bodies[-1]
    assert operation == "modify"
    assert body == {
        "type": "SINGLE",
        "gtt_order_id": stop.stop_id,
        "quantity": 8,
        "rules": [{"strategy": "ENTRY", "trigger_type": "BELOW", "trigger_price": 95.1}],
    }
    assert rig.fake.requests[-1] == ("PUT", "/v3/order/gtt/modify")
    assert await call(broker.stop_state(stop)) == moved


async def test_cancel_sends_the_id_in_a_json_body(rig: Any) -> None:
    """A cancel is DELETE /v3/order/gtt/cancel with `{"gtt_order_id": id}` as its JSON body,
    and answers CANCELLED; the fake's GTT is cancelled."""
    broker = rig.broker()
    stop = await call(broker.place_stop(SYMBOL, Side.LONG, 10.0, 94.35))
    after = await call(broker.cancel_stop(stop))
    assert after == BrokerStop(
        stop.stop_id, SYMBOL, Side.LONG, 10.0, 94.35, StopState.CANCELLED, None
    )
    assert rig.fake.gtt_bodies[-1] == ("cancel", {"gtt_order_id": stop.stop_id})
    assert rig.fake.requests[-1] == ("DELETE", "/v3/order/gtt/cancel")
    assert rig.fake.gtts[stop.stop_id].status == "CANCELLED"
    assert rig.fake.gtt_calls == {"place": 1, "cancel": 1}  # no lookup after a success


async def test_stop_state_reads_the_details(rig: Any) -> None:
    """stop_state is GET /v3/order/gtt?gtt_order_id=ID, read into the stop as Upstox holds
    it: ACTIVE while scheduled, CANCELLED once cancelled."""
    broker = rig.broker()
    stop = await call(broker.place_stop(SYMBOL, Side.LONG, 10.0, 94.35))
    assert await call(broker.stop_state(stop)) == stop
    assert rig.fake.requests[-1] == ("GET", f"/v3/order/gtt?gtt_order_id={stop.stop_id}")
    await call(broker.cancel_stop(stop))
    seen = await call(broker.stop_state(stop))
    assert seen is not None and seen.state is StopState.CANCELLED
    assert rig.fake.gtt_calls["details"] == 2


@pytest.mark.parametrize("missing_as_error", [True, False])
async def test_an_unknown_gtt_is_none(rig: Any, missing_as_error: bool) -> None:
    """A GTT id Upstox does not know (400 'not found', or an empty list) is None."""
    rig.fake.gtt_missing_as_error = missing_as_error
    ghost = BrokerStop("GTT-C99999999", SYMBOL, Side.LONG, 10.0, 94.35)
    assert await call(rig.broker().stop_state(ghost)) is None


@pytest.mark.parametrize("list_inactive", [True, False])
async def test_stops_lists_every_stop_in_its_state(rig: Any, list_inactive: bool) -> None:
    """stops() is GET /v3/order/gtt without a query: each stop with its side (from the
    rule's transaction type), quantity, trigger, state and the order a fired one placed;
    fired and cancelled ones as far as Upstox still lists them."""
    broker = rig.broker()
    rig.fake.list_inactive = list_inactive
    rig.fake.set_position(SYMBOL, 10, 100.0)
    long_ = await call(broker.place_stop(SYMBOL, Side.LONG, 10.0, 94.35))
    short = await call(broker.place_stop(OTHER, Side.SHORT, 3.0, 736.0))
    gone = await call(broker.place_stop(fakes.THIRD, Side.LONG, 2.0, 50.0))
    await call(broker.cancel_stop(gone))
    assert rig.fake.market(SYMBOL, 94.0) == [long_.stop_id]
    listed = await call(broker.stops())
    assert rig.fake.requests[-1] == ("GET", "/v3/order/gtt")
    (order_id,) = rig.fake.orders
    fired = BrokerStop(long_.stop_id, SYMBOL, Side.LONG, 10.0, 94.35, StopState.TRIGGERED, order_id)
    cancelled = BrokerStop(gone.stop_id, fakes.THIRD, Side.LONG, 2.0, 50.0, StopState.CANCELLED)
    assert listed == ([fired, short, cancelled] if list_inactive else [short])


def gtt_entry(**changes: Any) -> dict[str, Any]:
    """A documented GTT list entry of a long's stop, with `changes` (rule fields under
    `rule`)."""
    rule = {
        "strategy": "ENTRY",
        "trigger_type": "BELOW",
        "trigger_price": 90.0,
        "transaction_type": "SELL",
        "status": "SCHEDULED",
    }
    rule.update(changes.pop("rule", {}))
    entry = {
        "type": "SINGLE",
        "exchange": "NSE_EQ",
        "quantity": 5,
        "product": "I",
        "rules": [rule],
        "gtt_order_id": "GTT-C1",
        "trading_symbol": "SBIN-EQ",
        "instrument_token": OTHER,
        "created_at": 1767770000000,
        "expires_at": 1799306000000,
    }
    entry.update(changes)
    return entry


@pytest.mark.parametrize(
    ("raw_status", "state"),
    [
        ("SCHEDULED", StopState.ACTIVE),
        ("pending", StopState.ACTIVE),
        (" Active ", StopState.ACTIVE),
        ("OPEN", StopState.ACTIVE),
        ("TRIGGERED", StopState.TRIGGERED),
        ("completed", StopState.TRIGGERED),
        ("EXECUTED", StopState.TRIGGERED),
        ("FILLED", StopState.TRIGGERED),
        ("CANCELLED", StopState.CANCELLED),
        ("canceled", StopState.CANCELLED),
        ("EXPIRED", StopState.CANCELLED),
        ("DELETED", StopState.CANCELLED),
        ("REJECTED", StopState.CANCELLED),
        ("FAILED", StopState.CANCELLED),
    ],
)
async def test_rule_statuses_map_tolerantly(rig: Any, raw_status: str, state: StopState) -> None:
    """Every status spelling in the table, any case, maps to its state."""
    rig.fake.extra_gtts.append(gtt_entry(rule={"status": raw_status}))
    (stop,) = await call(rig.broker().stops())
    assert stop == BrokerStop("GTT-C1", OTHER, Side.LONG, 5.0, 90.0, state)


@pytest.mark.parametrize(
    ("order_id", "expected"),
    [("250101000000099", "250101000000099"), (250101000000099, "250101000000099"), (None, None)],
)
async def test_a_rules_order_id_is_read_as_a_string(
    rig: Any, order_id: Any, expected: str | None
) -> None:
    """The order a fired GTT placed, a string or a number on its rule, is the stop's order_id."""
    rule = {"status": "TRIGGERED", "order_id": order_id}
    rig.fake.extra_gtts.append(gtt_entry(rule=rule))
    (stop,) = await call(rig.broker().stops())
    assert stop.state is StopState.TRIGGERED and stop.order_id == expected


NOT_STOPS: list[Any] = [
    gtt_entry(type="MULTIPLE"),  # a person's GTT with targets
    gtt_entry(rule={"trigger_type": "ABOVE"}),  # SELL ABOVE: a target, not a stop
    gtt_entry(rule={"transaction_type": "BUY"}),  # BUY BELOW: an entry, not a stop
    gtt_entry(rule={"strategy": "STOPLOSS"}),  # no ENTRY rule
    gtt_entry(rules=[gtt_entry()["rules"][0]] * 2),  # two ENTRY rules
    gtt_entry(rule={"status": "PARTIALLY_DONE"}),  # a status the table does not know
    gtt_entry(rule={"status": 3}),
    gtt_entry(rule={"status": "S" * 10_000}),
    gtt_entry(rule={"trigger_price": "ninety"}),
    gtt_entry(rule={"trigger_price": -1}),
    gtt_entry(rule={"trigger_price": 10**400}),
    gtt_entry(rule={"transaction_type": ["SELL"]}),
    gtt_entry(quantity=2.5),
    gtt_entry(quantity="5"),
    gtt_entry(quantity=True),
    gtt_entry(quantity=10**400),
    gtt_entry(quantity=0),
    gtt_entry(instrument_token="RELIANCE"),
    gtt_entry(instrument_token=None),
    gtt_entry(gtt_order_id=None),
    gtt_entry(gtt_order_id={"id": 1}),
    gtt_entry(gtt_order_id="x" * 1000),
    gtt_entry(rules={"strategy": "ENTRY"}),
    gtt_entry(rules=None),
    {"gtt_order_id": "GTT-C2"},
    ["not", "an", "entry"],
    "x" * 10_000,
    None,
    10**400,
]


@pytest.mark.parametrize("entry", NOT_STOPS, ids=range(len(NOT_STOPS)))
async def test_stops_skips_what_is_not_a_stop(rig: Any, entry: Any) -> None:
    """A listed entry that is not a readable stop (another kind of GTT, malformed, a status
    the table does not know) is skipped, never a failure of the whole list."""
    broker = rig.broker()
    ours = await call(broker.place_stop(SYMBOL, Side.LONG, 10.0, 94.35))
    rig.fake.extra_gtts.append(entry)
    assert await call(broker.stops()) == [ours]


UNREADABLE_ENTRIES = [
    e for e in NOT_STOPS if isinstance(e, dict) and e.get("gtt_order_id") == "GTT-C1"
]


@pytest.mark.parametrize("entry", UNREADABLE_ENTRIES, ids=range(len(UNREADABLE_ENTRIES)))
async def test_stop_state_of_an_unreadable_entry_is_unavailable(rig: Any, entry: Any) -> None:
    """The details of one GTT that cannot be read as a stop (of another kind, malformed, a
    status the table does not know) are BrokerUnavailable: its state cannot be told."""
    stop = BrokerStop("GTT-C1", OTHER, Side.LONG, 5.0, 90.0)
    rig.fake.overrides["details"] = answer({"status": "success", "data": [entry]})
    with pytest.raises(BrokerUnavailable) as caught:
        await call(rig.broker().stop_state(stop))
    assert "GTT details 'GTT-C1'" in str(caught.value) and len(str(caught.value)) < 600


# ---------------------------------------------------------------------------
# The market: a GTT fires


async def test_a_stop_fires_when_the_price_reaches_its_trigger(rig: Any) -> None:
    """A long's stop fires at or below its trigger, a short's at or above: each places a
    LIMIT order at its trigger that fills against the account, which goes flat."""
    broker = rig.broker()
    rig.fake.set_position(SYMBOL, 10, 100.0)
    rig.fake.set_position(OTHER, -3, 735.5)
    long_ = await call(broker.place_stop(SYMBOL, Side.LONG, 10.0, 94.35))
    short = await call(broker.place_stop(OTHER, Side.SHORT, 3.0, 736.0))
    assert rig.fake.market(SYMBOL, 94.40) == []
    assert rig.fake.market(OTHER, 735.95) == []
    assert rig.fake.market(SYMBOL, 94.35) == [long_.stop_id]
    assert rig.fake.market(OTHER, 740.0) == [short.stop_id]
    assert rig.fake.market(SYMBOL, 90.0) == []  # fired once
    assert rig.fake.fired == [long_.stop_id, short.stop_id]
    sell, buy = rig.fake.orders.values()
    assert sell.body["order_type"] == "LIMIT" and sell.body["price"] == 94.35
    assert sell.body["transaction_type"] == "SELL" and sell.status == "complete"
    assert buy.body["transaction_type"] == "BUY" and buy.body["price"] == 736.0
    assert await call(broker.positions()) == []


async def test_cancel_after_firing_is_triggered_with_the_order_id(rig: Any) -> None:
    """Cancelling a stop that fired is refused by Upstox; the lookup that follows answers
    TRIGGERED with the order it placed."""
    broker = rig.broker()
    rig.fake.set_position(SYMBOL, 10, 100.0)
    stop = await call(broker.place_stop(SYMBOL, Side.LONG, 10.0, 94.35))
    rig.fake.market(SYMBOL, 94.0)
    (order_id,) = rig.fake.orders
    after = await call(broker.cancel_stop(stop))
    assert after == BrokerStop(
        stop.stop_id, SYMBOL, Side.LONG, 10.0, 94.35, StopState.TRIGGERED, order_id
    )
    assert rig.fake.gtt_calls == {"place": 1, "cancel": 1, "details": 1}
    assert rig.fake.gtts[stop.stop_id].status == "TRIGGERED"


async def test_a_modify_after_firing_is_rejected_and_the_lookup_says_triggered(rig: Any) -> None:
    """Moving a stop that fired is BrokerRejected (nothing changed); stop_state says
    TRIGGERED."""
    broker = rig.broker()
    stop = await call(broker.place_stop(SYMBOL, Side.LONG, 10.0, 94.35))
    rig.fake.market(SYMBOL, 94.0)
    with pytest.raises(BrokerRejected, match="UDAPI1101"):
        await call(broker.modify_stop(stop, 10.0, 95.0))
    seen = await call(broker.stop_state(stop))
    assert seen is not None and seen.state is StopState.TRIGGERED and seen.trigger == 94.35


async def test_a_second_cancel_is_cancelled(rig: Any) -> None:
    """Cancelling a stop cancelled before is refused; the lookup says CANCELLED."""
    broker = rig.broker()
    stop = await call(broker.place_stop(SYMBOL, Side.LONG, 10.0, 94.35))
    await call(broker.cancel_stop(stop))
    again = await call(broker.cancel_stop(stop))
    assert again.state is StopState.CANCELLED
    assert rig.fake.gtt_calls == {"place": 1, "cancel": 2, "details": 1}


async def test_a_gap_leaves_the_order_open_until_cancelled(rig: Any) -> None:
    """A fired stop's LIMIT order that does not fill (a gap) leaves the position held;
    cancel_order cancels it (True) on the HFT host, and the position stays whole."""
    broker = rig.broker()
    rig.fake.gtt_fills = False
    rig.fake.set_position(SYMBOL, 10, 100.0)
    stop = await call(broker.place_stop(SYMBOL, Side.LONG, 10.0, 94.35))
    rig.fake.market(SYMBOL, 90.0)
    (order_id,) = rig.fake.orders
    assert rig.fake.orders[order_id].status == "open"
    assert await call(broker.positions()) == [Holding(SYMBOL, 10.0, 100.0, "I")]
    after = await call(broker.cancel_stop(stop))
    assert after.state is StopState.TRIGGERED and after.order_id == order_id
    assert await call(broker.cancel_order(order_id)) is True
    assert rig.fake.requests[-1] == ("DELETE", f"/v3/order/cancel?order_id={order_id}")
    assert rig.fake.orders[order_id].status == "cancelled"
    assert await call(broker.positions()) == [Holding(SYMBOL, 10.0, 100.0, "I")]
    # Cancelled before: refused, and the details say so.
    assert await call(broker.cancel_order(order_id)) is True
    assert rig.fake.requests[-1] == ("GET", f"/v2/order/details?order_id={order_id}")


async def test_an_order_filled_late_cannot_be_cancelled(rig: Any) -> None:
    """An open order that fills before its cancel arrives: the cancel is refused and
    cancel_order answers False (it is complete); the position is flat."""
    broker = rig.broker()
    rig.fake.gtt_fills = False
    rig.fake.set_position(SYMBOL, 10, 100.0)
    await call(broker.place_stop(SYMBOL, Side.LONG, 10.0, 94.35))
    rig.fake.market(SYMBOL, 90.0)
    (order_id,) = rig.fake.orders
    rig.fake.fill(order_id)
    assert await call(broker.cancel_order(order_id)) is False
    assert requests_to(rig.fake, "/v3/order/cancel") == [
        ("DELETE", f"/v3/order/cancel?order_id={order_id}")
    ]
    assert rig.fake.requests[-1] == ("GET", f"/v2/order/details?order_id={order_id}")
    assert await call(broker.positions()) == []


async def test_cancel_order_of_a_complete_order_is_false(rig: Any) -> None:
    """The order of a stop that fired and filled cannot be cancelled: False."""
    broker = rig.broker()
    rig.fake.set_position(SYMBOL, 10, 100.0)
    await call(broker.place_stop(SYMBOL, Side.LONG, 10.0, 94.35))
    rig.fake.market(SYMBOL, 94.0)
    (order_id,) = rig.fake.orders
    assert await call(broker.cancel_order(order_id)) is False


async def test_cancel_order_of_a_rejected_order_is_true(rig: Any) -> None:
    """An order the exchange rejected can never fill: True."""
    rig.fake.behaviour = fakes.Behaviour.REJECT
    report = await call(rig.broker().place_exit(ExitOrder("tg-x-1-1", SYMBOL, Side.LONG, 1, None)))
    assert report.status is OrderStatus.REJECTED
    assert await call(rig.broker().cancel_order(report.broker_order_id)) is True


async def test_cancel_order_of_an_unknown_order_is_unavailable(rig: Any) -> None:
    """An order Upstox does not know: the cancel is refused and so are its details, so
    whether it can fill is unknown: BrokerUnavailable."""
    with pytest.raises(BrokerUnavailable, match="Order not found"):
        await call(rig.broker().cancel_order("250101999999999"))


async def test_cancel_refused_while_active_is_rejected(rig: Any) -> None:
    """A cancel refused while the GTT is still scheduled is BrokerRejected with the
    broker's message."""
    broker = rig.broker()
    stop = await call(broker.place_stop(SYMBOL, Side.LONG, 10.0, 94.35))
    refused = fakes.error_body({"errorCode": "UDAPI1999", "message": "Try later"})
    rig.fake.overrides["cancel"] = answer(refused, 400)
    with pytest.raises(BrokerRejected) as caught:
        await call(broker.cancel_stop(stop))
    assert "UDAPI1999: Try later" in str(caught.value) and "still active" in str(caught.value)
    assert rig.fake.gtts[stop.stop_id].status == "SCHEDULED"


@pytest.mark.parametrize("missing_as_error", [True, False])
async def test_cancel_refused_and_not_found_is_unavailable(
    rig: Any, missing_as_error: bool
) -> None:
    """A refused cancel of a GTT Upstox no longer lists is not taken for cancelled (it may
    have fired): BrokerUnavailable."""
    rig.fake.gtt_missing_as_error = missing_as_error
    ghost = BrokerStop("GTT-C99999999", SYMBOL, Side.LONG, 10.0, 94.35)
    with pytest.raises(BrokerUnavailable, match="not found: its state is unknown"):
        await call(rig.broker().cancel_stop(ghost))


async def test_gtts_go_to_the_api_host_and_order_cancels_to_the_hft_host(rig: Any) -> None:
    """Every GTT call reaches the API host (the HFT host unreachable); an order cancel reaches
    the HFT host (the API host unreachable)."""
    api_only = rig.broker(hft_url=DEAD_URL)
    stop = await call(api_only.place_stop(SYMBOL, Side.LONG, 10.0, 94.35))
    stop = await call(api_only.modify_stop(stop, 10.0, 94.0))
    assert await call(api_only.stop_state(stop)) == stop
    assert await call(api_only.stops()) == [stop]
    assert (await call(api_only.cancel_stop(stop))).state is StopState.CANCELLED
    rig.fake.behaviour = fakes.Behaviour.STAY_OPEN
    report = await call(
        rig.broker(fill_wait=0.0).place_exit(ExitOrder("tg-x-1-1", SYMBOL, Side.LONG, 1, None))
    )
    assert await call(rig.broker(api_url=DEAD_URL).cancel_order(report.broker_order_id)) is True
    with pytest.raises(BrokerUnavailable):
        await call(rig.broker(hft_url=DEAD_URL).cancel_order(report.broker_order_id))


# ---------------------------------------------------------------------------
# Refused before sending


@pytest.mark.parametrize("quantity", [2.5, 0.0, -1.0, float("nan"), float("inf"), 1e13])
async def test_a_quantity_that_is_not_whole_is_refused_unsent(rig: Any, quantity: float) -> None:
    """Upstox quantities are whole numbers: anything else is BrokerRejected before a request."""
    broker = rig.broker()
    stop = BrokerStop("GTT-C1", SYMBOL, Side.LONG, 10.0, 94.35)
    with pytest.raises(BrokerRejected, match="whole number"):
        await broker.place_stop(SYMBOL, Side.LONG, quantity, 94.35)
    with pytest.raises(BrokerRejected, match="whole number"):
        await broker.modify_stop(stop, quantity, 94.35)
    assert rig.fake.requests == []


@pytest.mark.parametrize("trigger", [0.0, -94.35, float("nan"), float("inf"), 1e13])
async def test_a_trigger_that_is_not_a_price_is_refused_unsent(rig: Any, trigger: float) -> None:
    """A trigger that is not a positive finite price is BrokerRejected before a request."""
    broker = rig.broker()
    stop = BrokerStop("GTT-C1", SYMBOL, Side.LONG, 10.0, 94.35)
    with pytest.raises(BrokerRejected, match="not a price"):
        await broker.place_stop(SYMBOL, Side.LONG, 10.0, trigger)
    with pytest.raises(BrokerRejected, match="not a price"):
        await broker.modify_stop(stop, 10.0, trigger)
    assert rig.fake.requests == []


@pytest.mark.parametrize("bad", ["", " GTT-C1", "GTT\nC1", "x" * 65])
async def test_an_id_that_is_not_one_is_refused_unsent(rig: Any, bad: str) -> None:
    """An id that could not be Upstox's (empty, spaced, a control character, too long) is
    BrokerRejected before a request, for every call that takes one."""
    broker = rig.broker()
    stop = BrokerStop(bad, SYMBOL, Side.LONG, 10.0, 94.35)
    for attempt in (
        broker.modify_stop(stop, 10.0, 94.35),
        broker.cancel_stop(stop),
        broker.stop_state(stop),
        broker.cancel_order(bad),
    ):
        with pytest.raises(BrokerRejected, match="not an id"):
            await attempt
    with pytest.raises(BrokerRejected, match="not an instrument key"):
        await broker.place_stop("RELIANCE", Side.LONG, 10.0, 94.35)
    assert rig.fake.requests == []


# ---------------------------------------------------------------------------
# Faults: every call, every way Upstox can fail

Operation = Callable[[UpstoxBroker, BrokerStop, str], Awaitable[Any]]
OPERATIONS: dict[str, Operation] = {
    "place": lambda b, s, o: b.place_stop(SYMBOL, Side.LONG, 10.0, 94.35),
    "modify": lambda b, s, o: b.modify_stop(s, 10.0, 94.0),
    "cancel": lambda b, s, o: b.cancel_stop(s),
    "details": lambda b, s, o: b.stop_state(s),
    "list": lambda b, s, o: b.stops(),
    "order_cancel": lambda b, s, o: b.cancel_order(o),
}


async def placed(rig: Any) -> tuple[BrokerStop, str]:
    """A scheduled stop and an open order (a gap's), made while the fake answers."""
    rig.fake.gtt_fills = False
    stop = await call(rig.broker().place_stop(SYMBOL, Side.LONG, 10.0, 94.35))
    await call(rig.broker().place_stop(OTHER, Side.LONG, 1.0, 700.0))
    rig.fake.market(OTHER, 690.0)
    (order_id,) = rig.fake.orders
    return stop, order_id


@pytest.mark.parametrize("operation", list(OPERATIONS))
@pytest.mark.parametrize(
    ("behaviour", "needle"),
    [("SERVER_ERROR", "HTTP 500"), ("HANG", "no answer within 0.2s"), ("REJECT", "UDAPI1102")],
)
async def test_a_failing_gtt_endpoint_is_an_error_of_the_protocol(
    rig: Any, caplog: pytest.LogCaptureFixture, operation: str, behaviour: str, needle: str
) -> None:
    """A 500 or a hang is BrokerUnavailable for every GTT call; a refusal (400 with Upstox's
    error body) is BrokerRejected for a place or a move and BrokerUnavailable for a lookup
    (and for a cancel, whose lookup is refused too). Order cancels do not touch GTT
    endpoints but for nothing; the token is in no message or log line."""
    caplog.set_level(logging.DEBUG)
    stop, order_id = await placed(rig)
    rig.fake.gtt_behaviour = GttBehaviour[behaviour]
    broker = rig.broker(request_timeout=0.2)
    if operation == "order_cancel":  # no GTT endpoint: unaffected
        assert await call(OPERATIONS[operation](broker, stop, order_id)) is True
        return
    refused = behaviour == "REJECT" and operation in ("place", "modify")
    with pytest.raises(BrokerRejected if refused else BrokerUnavailable) as caught:
        await call(OPERATIONS[operation](broker, stop, order_id))
    assert needle in str(caught.value)
    assert TOKEN not in str(caught.value) and TOKEN not in caplog.text
    assert rig.fake.gtts[stop.stop_id].status == "SCHEDULED"


@pytest.mark.parametrize("operation", list(OPERATIONS))
async def test_rate_limited_calls_are_unavailable(rig: Any, operation: str) -> None:
    """A 429 UDAPI10005 on an order-type call (GTT place, modify, cancel; order cancel) is
    BrokerUnavailable saying so; lookups do not count against the order limit."""
    stop, order_id = await placed(rig)
    rig.fake.order_rate_limit = 0
    result = OPERATIONS[operation](rig.broker(), stop, order_id)
    if operation in ("details", "list"):
        await call(result)
        assert rig.fake.rate_limited == 0
        return
    with pytest.raises(BrokerUnavailable) as caught:
        await call(result)
    assert "HTTP 429 UDAPI10005" in str(caught.value) and "rate limited" in str(caught.value)
    assert rig.fake.rate_limited == 1


async def test_a_storm_of_order_calls_is_caught_by_the_rate_limit(rig: Any) -> None:
    """Twelve stops placed at once, within one second of the fake's (frozen) clock: ten are
    placed, two are 429 (BrokerUnavailable); the exits share the same limit; a second later
    calls are admitted again."""
    now = [1000.0]
    rig.fake.clock = lambda: now[0]
    rig.fake.limit_places = True
    broker = rig.broker()
    keys = [f"NSE_EQ|INE{i:06d}A01" for i in range(12)]
    results = await call(
        asyncio.gather(
            *(broker.place_stop(k, Side.LONG, 1.0, 50.0) for k in keys), return_exceptions=True
        )
    )
    placed_ = [r for r in results if isinstance(r, BrokerStop)]
    limited = [r for r in results if isinstance(r, BrokerUnavailable)]
    assert len(placed_) == 10 and len(limited) == 2 and len(rig.fake.gtts) == 10
    assert all("rate limited" in str(e) for e in limited)
    with pytest.raises(BrokerUnavailable, match="UDAPI10005"):
        await call(broker.place_exit(ExitOrder("tg-x-1-1", SYMBOL, Side.LONG, 1, None)))
    assert rig.fake.rate_limited == 3
    now[0] += 1.0
    await call(broker.place_stop(SYMBOL, Side.LONG, 1.0, 50.0))
    assert len(rig.fake.gtts) == 11


async def test_exits_count_against_the_limit_of_the_stops(rig: Any) -> None:
    """Ten exits within one second of the fake's clock are all placed (the fake refuses
    places only with `limit_places`), and use up the second: the stop placed next is 429."""
    rig.fake.clock = lambda: 1000.0
    broker = rig.broker()
    for n in range(10):
        report = await call(broker.place_exit(ExitOrder(f"tg-x-{n}-1", SYMBOL, Side.LONG, 1, None)))
        assert report.status is OrderStatus.FILLED
    with pytest.raises(BrokerUnavailable, match="rate limited"):
        await call(broker.place_stop(SYMBOL, Side.LONG, 1.0, 50.0))
    assert rig.fake.rate_limited == 1 and rig.fake.gtts == {}


# ---------------------------------------------------------------------------
# Hostile answers

UNREADABLE: list[Any] = [
    b"<html>upstream gateway</html>",
    b'{"status": "success", "data": ',
    b"[" * 100_000 + b"]" * 100_000,  # nested beyond the parser's depth
    b'{"status": "success", "data": [' + b"9" * 5000 + b"]}",  # an int past the digits limit
    b"\xff\xfe not utf-8",
    b" " * (MAX_REPLY_BYTES + 1),  # over the size limit
]


@pytest.mark.parametrize("operation", list(OPERATIONS))
@pytest.mark.parametrize("body", UNREADABLE, ids=range(len(UNREADABLE)))
async def test_an_unreadable_answer_is_unavailable(rig: Any, operation: str, body: bytes) -> None:
    """A 200 whose body is not JSON, is too deep, too large, or not UTF-8 is
    BrokerUnavailable for every call, never another exception."""
    stop, order_id = await placed(rig)
    rig.fake.overrides[operation] = answer(body)
    with pytest.raises(BrokerUnavailable) as caught:
        await call(OPERATIONS[operation](rig.broker(), stop, order_id))
    assert len(str(caught.value)) < 800


WRONG_SHAPES: list[Any] = [
    None,
    [],
    "success",
    10**400,
    {"status": "error", "errors": [{"errorCode": "UDAPI100500", "message": "Something"}]},
    {"status": "success"},
    {"status": "success", "data": None},
    {"status": "success", "data": 5},
    {"status": "success", "data": {"gtt_order_ids": []}},
    {"status": "success", "data": {"gtt_order_ids": [None]}},
    {"status": "success", "data": {"gtt_order_ids": ["A", "B"]}},
    {"status": "success", "data": {"gtt_order_ids": ["x" * 100_000]}},
    {"status": "success", "data": {"gtt_order_ids": [{"id": "GTT-C1"}]}},
    {"status": "SUCCESS", "data": {"gtt_order_ids": ["GTT-C1"]}},
]


@pytest.mark.parametrize("body", WRONG_SHAPES, ids=range(len(WRONG_SHAPES)))
async def test_a_place_answered_without_a_readable_id_is_unavailable(rig: Any, body: Any) -> None:
    """A 2xx to a place without one readable GTT id may still have placed it:
    BrokerUnavailable (the safety net finds it again in the list)."""
    rig.fake.overrides["place"] = answer(body)
    with pytest.raises(BrokerUnavailable, match="without a GTT id"):
        await call(rig.broker().place_stop(SYMBOL, Side.LONG, 10.0, 94.35))


@pytest.mark.parametrize(
    ("operation", "body"),
    [("modify", b) for b in WRONG_SHAPES[:5]]
    + [(op, b) for op in ("details", "list") for b in WRONG_SHAPES[:8]],
    ids=[f"modify-{i}" for i in range(5)]
    + [f"{op}-{i}" for op in ("details", "list") for i in range(8)],
)
async def test_an_answer_of_the_wrong_shape_is_unavailable(
    rig: Any, operation: str, body: Any
) -> None:
    """A 2xx that is not a success (a move), or not a success with a list of GTTs (the
    lookups), is BrokerUnavailable."""
    stop, order_id = await placed(rig)
    rig.fake.overrides[operation] = answer(body)
    with pytest.raises(BrokerUnavailable):
        await call(OPERATIONS[operation](rig.broker(), stop, order_id))


@pytest.mark.parametrize("body", WRONG_SHAPES[:5], ids=range(5))
async def test_a_cancel_answered_without_success_asks_the_gtt(rig: Any, body: Any) -> None:
    """A cancel answered 2xx without success (or 400 with no error body) is no cancel: the
    lookup finds the GTT still scheduled, so it is BrokerRejected, never CANCELLED."""
    stop, _ = await placed(rig)
    for status in (200, 400):
        rig.fake.overrides["cancel"] = answer(body, status)
        with pytest.raises(BrokerRejected, match="still active"):
            await call(rig.broker().cancel_stop(stop))
    assert rig.fake.gtts[stop.stop_id].status == "SCHEDULED"


@pytest.mark.parametrize("body", WRONG_SHAPES[:5], ids=range(5))
async def test_an_order_cancel_answered_without_success_asks_the_order(rig: Any, body: Any) -> None:
    """An order cancel answered without success is settled by the order's details: an open
    order is BrokerUnavailable (it may still fill), a complete one False."""
    _, order_id = await placed(rig)
    rig.fake.overrides["order_cancel"] = answer(body)
    with pytest.raises(BrokerUnavailable, match="its details: 'open'"):
        await call(rig.broker().cancel_order(order_id))
    rig.fake.fill(order_id)
    assert await call(rig.broker().cancel_order(order_id)) is False


@pytest.mark.parametrize("status", [400, 401, 403, 404, 409, 422])
async def test_a_4xx_without_an_error_body_is_not_a_refusal(rig: Any, status: int) -> None:
    """A 4xx to a place or a move without Upstox's error body (a proxy's page) does not say
    Upstox refused: BrokerUnavailable; with the error body it is BrokerRejected."""
    stop, _ = await placed(rig)
    for operation in ("place", "modify"):
        rig.fake.overrides[operation] = answer(b"<html>Bad Request</html>", status)
        with pytest.raises(BrokerUnavailable, match=f"HTTP {status}"):
            await call(OPERATIONS[operation](rig.broker(), stop, ""))
        refused = fakes.error_body({"errorCode": "UDAPI1000", "message": "No"})
        rig.fake.overrides[operation] = answer(refused, status)
        with pytest.raises(BrokerRejected, match=f"HTTP {status} UDAPI1000: No"):
            await call(OPERATIONS[operation](rig.broker(), stop, ""))


def random_json(rng: random.Random, depth: int = 0) -> Any:
    """A random JSON value, biased to the shapes the answers have."""
    kinds = ["null", "bool", "int", "float", "str", "list", "object", "shaped"]
    kind = rng.choice(kinds if depth < 4 else kinds[:5])
    if kind == "null":
        return None
    if kind == "bool":
        return rng.random() < 0.5
    if kind == "int":
        return rng.choice([0, -1, 1, 10, 2**63, 10**30, rng.randint(-(10**6), 10**6)])
    if kind == "float":
        return rng.choice([0.0, -0.5, 94.35, 1e300, 1e-300, rng.uniform(-1e3, 1e3)])
    if kind == "str":
        return rng.choice(
            ["", "success", "SINGLE", "ENTRY", "BELOW", "SELL", "SCHEDULED", "TRIGGERED",
             "GTT-C1", SYMBOL, "x" * rng.randint(0, 200), "\u0000\u202e"]
        )  # fmt: skip
    if kind == "list":
        return [random_json(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    if kind == "object":
        keys = ["status", "data", "errors", "type", "rules", "quantity", "gtt_order_ids",
                "gtt_order_id", "instrument_token", "trigger_price", "strategy", "order_id"]  # fmt: skip
        return {rng.choice(keys): random_json(rng, depth + 1) for _ in range(rng.randint(0, 4))}
    shaped = gtt_entry()
    rule = shaped["rules"][0]
    for _ in range(rng.randint(1, 3)):  # a documented entry, a field or two broken
        target = shaped if rng.random() < 0.5 else rule
        target[rng.choice(list(target))] = random_json(rng, depth + 1)
    return {"status": "success", "data": [shaped] if rng.random() < 0.8 else shaped}


async def test_random_answers_never_raise_anything_else(rig: Any) -> None:
    """Hundreds of random JSON answers, at random HTTP statuses, to every call: each call
    returns a value of its type or raises BrokerRejected/BrokerUnavailable, nothing else."""
    rng = random.Random(14)
    stop, order_id = await placed(rig)
    rig.fake.order_rate_limit = None
    broker = rig.broker()
    outcomes: dict[str, int] = {}
    for _ in range(150):
        value = random_json(rng)
        status = rng.choice([200, 200, 200, 400, 404, 500])
        for operation, perform in OPERATIONS.items():
            rig.fake.overrides = {
                "details": answer(random_json(rng)),
                "list": answer(random_json(rng)),
                operation: answer(value, status),
            }
            try:
                result = await call(perform(broker, stop, order_id))
            except BrokerError as exc:
                kind = type(exc).__name__
                assert len(str(exc)) < 1000
            else:
                kind = type(result).__name__
                if operation == "list":
                    assert all(isinstance(s, BrokerStop) for s in result)
                elif operation == "details":
                    assert result is None or isinstance(result, BrokerStop)
                elif operation == "order_cancel":
                    assert isinstance(result, bool)
                else:
                    assert isinstance(result, BrokerStop)
            outcomes[kind] = outcomes.get(kind, 0) + 1
    assert outcomes.keys() >= {"BrokerUnavailable", "BrokerStop", "list"}


# ---------------------------------------------------------------------------
# The token


@pytest.mark.parametrize("operation", list(OPERATIONS))
@pytest.mark.parametrize("status", [200, 400, 500])
async def test_the_token_is_never_repeated(
    rig: Any, caplog: pytest.LogCaptureFixture, operation: str, status: int
) -> None:
    """A broker that repeats the Authorization header in its answer (in an error message,
    in a field, long enough to be cut short) never gets the token into an exception or a
    log line."""
    caplog.set_level(logging.DEBUG)
    stop, order_id = await placed(rig)

    async def echo(request: web.Request) -> web.Response:
        said = "x" * 255 + f"Bad header {request.headers.get('Authorization')}"
        body = fakes.error_body({"errorCode": "UDAPI100500", "message": said})
        body["data"] = {"gtt_order_ids": [said]}  # not an id: it is too long
        return web.json_response(body, status=status)

    rig.fake.overrides = {"details": echo, "list": echo, operation: echo}
    entry = gtt_entry(rule={"status": f"Bearer {TOKEN}"})
    rig.fake.extra_gtts.append(entry)
    with pytest.raises(BrokerError) as caught:
        await call(OPERATIONS[operation](rig.broker(), stop, order_id))
    message = str(caught.value)
    assert TOKEN[:12] not in message and TOKEN[:12] not in caplog.text
    assert TOKEN[-12:] not in message and TOKEN[-12:] not in caplog.text
    del rig.fake.overrides["list"]
    assert [s.stop_id for s in await call(rig.broker().stops())] == list(rig.fake.gtts)
    assert TOKEN[:12] not in caplog.text and TOKEN[-12:] not in caplog.text


async def test_the_fake_refuses_what_upstox_would(rig: Any) -> None:
    """The fake holds clients to the documented GTT bodies: each break is a 400 with
    Upstox's error body naming the field (so a passing test means a valid body)."""
    good = {
        "type": "SINGLE",
        "quantity": 1,
        "product": "I",
        "instrument_token": SYMBOL,
        "transaction_type": "SELL",
        "rules": [{"strategy": "ENTRY", "trigger_type": "BELOW", "trigger_price": 94.35}],
    }
    rule = good["rules"][0]
    breaks: list[tuple[dict[str, Any], str]] = [
        (dict(good, type="MULTIPLE"), "type"),
        (dict(good, quantity=2.5), "quantity"),
        (dict(good, quantity="1"), "quantity"),
        (dict(good, quantity=0), "quantity"),
        (dict(good, product="CO"), "product"),
        (dict(good, instrument_token="RELIANCE"), "instrument_token"),
        (dict(good, transaction_type="sell"), "transaction_type"),
        (dict(good, tag="tg-1"), "tag"),
        ({k: v for k, v in good.items() if k != "rules"}, "rules"),
        (dict(good, rules=[rule, rule]), "rules"),
        (dict(good, rules=[dict(rule, strategy="STOPLOSS")]), "rules[0].strategy"),
        (dict(good, rules=[dict(rule, trigger_type="IMMEDIATE")]), "rules[0].trigger_type"),
        (dict(good, rules=[dict(rule, trigger_price=94.33)]), "rules[0].trigger_price"),
        (dict(good, rules=[dict(rule, trigger_price="94.35")]), "rules[0].trigger_price"),
        (dict(good, rules=[dict(rule, trailing_gap=1.0)]), "rules[0].trailing_gap"),
        (dict(good, rules=[dict(rule, transaction_type="SELL")]), "rules[0].transaction_type"),
    ]
    rig.fake.order_rate_limit = None  # more than 10 here, within a second
    headers = {"Authorization": f"Bearer {TOKEN}", "Accept": "application/json"}
    url = rig.fake.url + fakes.GTT_PLACE_PATH
    for body, name in breaks:
        async with rig.session.post(url, json=body, headers=headers) as response:
            said = await response.json()
        assert response.status == 400 and said["status"] == "error", body
        assert said["errors"][0]["propertyPath"] == name, (body, said)
    async with rig.session.post(url, json=good, headers=headers) as response:
        assert response.status == 200
    assert len(rig.fake.gtts) == 1
    modify = {"type": "SINGLE", "gtt_order_id": "GTT-C1", "quantity": 1, "rules": [rule]}
    async with rig.session.put(
        rig.fake.url + fakes.GTT_MODIFY_PATH, json=dict(modify, product="I"), headers=headers
    ) as response:
        assert response.status == 400
    async with rig.session.delete(
        rig.fake.url + fakes.GTT_CANCEL_PATH, json={"id": "x"}, headers=headers
    ) as response:
        said = await response.json()
        assert said["errors"][0]["propertyPath"] == "id"
        assert response.status == 400
