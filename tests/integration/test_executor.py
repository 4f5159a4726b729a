"""The exit executor with a real store, paper broker and guard: journal first, one fill each."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tickguard.brokers.paper import PaperBroker, PaperFault
from tickguard.core.exits import Exit, ExitState
from tickguard.core.guard import BlindPolicy, ExitDecided, Guard
from tickguard.core.orders import ExitOrder, OrderReport, OrderStatus
from tickguard.core.positions import ExitReason, Position, PositionSpec, PositionState, Side
from tickguard.core.prices import PriceBook, PriceSource
from tickguard.executor import Checkpoint, ExitExecutor, Listener, recover
from tickguard.store import Store

LONG_SL = PositionSpec("LONGCO", Side.LONG, 10.0, 100.0, stop_loss=95.0, take_profit=110.0)
SHORT_SL = PositionSpec("SHORTCO", Side.SHORT, 5.0, 200.0, stop_loss=210.0, take_profit=180.0)


@dataclass
class World:
    """One daemon's worth of exit machinery around a state dir."""

    store: Store
    book: PriceBook
    guard: Guard
    broker: PaperBroker
    executor: ExitExecutor
    settled: list[tuple[Exit, Position | None, float | None]] = field(default_factory=list)
    accepted: list[ExitOrder] = field(default_factory=list)

    def now(self) -> float:
        return time.monotonic()

    def decide(self, spec: PositionSpec, price: float) -> ExitDecided:
        """Guard a new position and feed it a polled price that fires one of its rules."""
        position = self.store.add_position(spec, time.time())
        self.guard.add(position, self.now())
        self.book.update(spec.symbol, price, None, PriceSource.POLL, self.now())
        events = self.guard.evaluate(spec.symbol, self.now(), time.time(), market_open=True)
        (decided,) = [e for e in events if isinstance(e, ExitDecided)]
        return decided

    def events(self, cid: str) -> list[object]:
        return [e["state"] for e in self.store.exit_events(cid)]


Factory = Callable[..., World]


@pytest.fixture
async def make_world(tmp_path: Path) -> AsyncIterator[Factory]:
    worlds: list[World] = []

    def build(
        order_timeout: float = 0.5,
        checkpoint: Checkpoint | None = None,
        after_accept: Callable[[ExitOrder], Awaitable[None]] | None = None,
        listener: Listener | None = None,
    ) -> World:
        store = Store.in_dir(tmp_path)
        book = PriceBook(stale_warning=30.0, cache_timeout=300.0)
        book.channel_up(PriceSource.POLL, time.monotonic())
        guard = Guard(
            book, blind_policy=BlindPolicy.HOLD, blind_after=300.0, install_id=store.install_id
        )

        def price_of(symbol: str) -> float | None:
            price = book.get(symbol)
            return price.value if price else None

        broker = PaperBroker(store, price_of)
        settled: list[tuple[Exit, Position | None, float | None]] = []

        def listen(exit: Exit, position: Position | None, elapsed: float | None) -> None:
            settled.append((exit, position, elapsed))
            if listener is not None:
                listener(exit, position, elapsed)

        executor = ExitExecutor(
            guard,
            store,
            broker,
            order_timeout=order_timeout,
            checkpoint=checkpoint,
            listener=listen,
        )
        world = World(store, book, guard, broker, executor, settled)

        async def accept(order: ExitOrder) -> None:
            world.accepted.append(order)
            if after_accept is not None:
                await after_accept(order)

        broker.after_accept = accept
        worlds.append(world)
        return world

    yield build
    for world in worlds:
        await world.executor.cancel_all()
        world.store.close()


async def test_exit_is_journalled_before_the_broker_sees_it(make_world: Factory) -> None:
    """A decided exit is pending in the store before any send, and sent before the broker fills."""
    seen: list[tuple[str, object, object, int]] = []
    w: World

    async def checkpoint(step: str, exit: Exit) -> None:
        record = w.store.exit_record(exit.client_order_id)
        state = record.exit.state.value if record else None
        seen.append((step, state, w.events(exit.client_order_id), w.store.paper_fill_count()))

    async def after_accept(order: ExitOrder) -> None:
        position = w.store.latest_position(order.symbol)
        state = position.state.value if position else None
        events = w.events(order.client_order_id)
        seen.append(("accepted", state, events, w.store.paper_fill_count()))

    w = make_world(checkpoint=checkpoint, after_accept=after_accept)
    decided = w.decide(LONG_SL, 94.0)
    cid = decided.exit.client_order_id
    w.executor.submit(decided)
    assert w.store.exit_record(cid) is not None  # durable before submit returns
    assert await w.executor.drain(2.0)
    assert seen == [
        ("journalled", "pending", ["pending"], 0),
        ("sent", "sent", ["pending", "sent"], 0),
        ("accepted", "exiting", ["pending", "sent"], 1),
        ("answered", "sent", ["pending", "sent"], 1),
    ]


@pytest.mark.parametrize(
    ("spec", "price", "reason", "pnl"),
    [
        (LONG_SL, 94.0, "stop_loss", -60.0),
        (LONG_SL, 112.5, "take_profit", 125.0),
        (SHORT_SL, 211.0, "stop_loss", -55.0),
        (SHORT_SL, 178.0, "take_profit", 110.0),
    ],
    ids=["long-loss", "long-profit", "short-loss", "short-profit"],
)
async def test_fill_closes_position_at_book_price(
    make_world: Factory,
    caplog: pytest.LogCaptureFixture,
    spec: PositionSpec,
    price: float,
    reason: str,
    pnl: float,
) -> None:
    """A filled exit closes the position at the book price with pnl signed by side, and logs it."""
    caplog.set_level(logging.INFO, logger="tickguard.executor")
    w = make_world()
    decided = w.decide(spec, price)
    cid = decided.exit.client_order_id
    w.executor.submit(decided)
    first = await w.executor.first_outcome(cid)
    assert first.state is ExitState.FILLED and first.fill_price == price
    assert first.broker_order_id == f"paper-{cid}-1" and first.attempts == 1
    assert await w.executor.drain(1.0)

    stored = w.store.latest_position(spec.symbol)
    assert stored is not None and stored.state is PositionState.CLOSED
    assert stored.exit_id == cid and w.store.positions() == []
    assert w.guard.position(spec.symbol) is None and w.guard.exit(cid) is None
    record = w.store.exit_record(cid)
    assert record is not None and record.exit.state is ExitState.FILLED
    assert record.exit.fill_price == price and record.pnl == pnl
    assert w.events(cid) == ["pending", "sent", "filled"]
    assert w.store.paper_fill_count(cid) == 1
    assert (await w.executor.first_outcome(cid)).state is ExitState.FILLED  # after the fact
    assert f"[EXIT] {spec.symbol} closed at {price:.2f}, pnl {pnl:.2f} ({reason}, poll)" in (
        caplog.messages
    )


async def test_rejected_exit_reopens_the_position(make_world: Factory) -> None:
    """A refused exit is rejected, fills nothing, and leaves the position open and guarded."""
    w = make_world()
    w.broker.faults.append(PaperFault.REJECT)
    decided = w.decide(LONG_SL, 94.0)
    cid = decided.exit.client_order_id
    w.executor.submit(decided)
    first = await w.executor.first_outcome(cid)
    assert first.state is ExitState.REJECTED and "rejected" in first.detail
    assert await w.executor.drain(1.0)

    guarded = w.guard.position("LONGCO")
    assert guarded is not None and guarded.state is PositionState.OPEN and guarded.exit_id is None
    stored = w.store.latest_position("LONGCO")
    assert stored is not None and stored.state is PositionState.OPEN and stored.exit_id is None
    assert w.store.positions() == [stored]
    assert w.store.paper_fill_count() == 0 and w.accepted == []
    assert w.events(cid) == ["pending", "sent", "rejected"]
    assert [(e.state, p is not None and p.state) for e, p, _ in w.settled] == [
        (ExitState.REJECTED, PositionState.OPEN)
    ]


async def test_unavailable_then_success_fills_the_same_order_once(make_world: Factory) -> None:
    """An unreachable broker puts the exit in retry; the same order id is then filled once."""
    w = make_world()
    w.broker.faults.append(PaperFault.UNAVAILABLE)
    decided = w.decide(SHORT_SL, 211.0)
    cid = decided.exit.client_order_id
    w.executor.submit(decided)
    first = await w.executor.first_outcome(cid)
    assert first.state is ExitState.RETRY and first.client_order_id == cid
    assert w.store.paper_fill_count() == 0
    assert await w.executor.drain(2.0)

    assert w.store.paper_fill_count(cid) == 1 and w.store.paper_fill_count() == 1
    assert [o.client_order_id for o in w.accepted] == [cid]
    assert w.events(cid) == ["pending", "sent", "retry", "sent", "filled"]
    record = w.store.exit_record(cid)
    assert record is not None and record.exit.state is ExitState.FILLED
    assert record.exit.attempts == 2 and record.pnl == -55.0
    assert [e.state for e, _, _ in w.settled] == [ExitState.RETRY, ExitState.FILLED]


async def test_lost_reply_is_found_by_lookup_without_a_second_fill(make_world: Factory) -> None:
    """A fill whose reply was lost is found by client order id and settled without resending."""
    w = make_world()
    w.broker.faults.append(PaperFault.LOST_REPLY)
    decided = w.decide(LONG_SL, 94.0)
    cid = decided.exit.client_order_id
    w.executor.submit(decided)
    assert (await w.executor.first_outcome(cid)).state is ExitState.RETRY
    assert await w.executor.drain(2.0)

    assert w.store.paper_fill_count(cid) == 1 and len(w.accepted) == 1
    assert w.events(cid) == ["pending", "sent", "retry", "filled"]
    record = w.store.exit_record(cid)
    assert record is not None and record.exit.state is ExitState.FILLED
    assert record.exit.broker_order_id == f"paper-{cid}-1" and record.exit.attempts == 1
    stored = w.store.latest_position("LONGCO")
    assert stored is not None and stored.state is PositionState.CLOSED


async def test_reply_slower_than_timeout_is_reconciled_once(make_world: Factory) -> None:
    """A broker that accepts but answers after order_timeout is looked up, not asked again."""
    release = asyncio.Event()

    async def stall_first(order: ExitOrder) -> None:
        if not release.is_set():
            await release.wait()  # cancelled by the executor's timeout

    w = make_world(order_timeout=0.1, after_accept=stall_first)
    decided = w.decide(LONG_SL, 94.0)
    cid = decided.exit.client_order_id
    w.executor.submit(decided)
    first = await w.executor.first_outcome(cid)
    assert first.state is ExitState.RETRY and first.detail == "timed out"
    assert await w.executor.drain(2.0)

    assert w.store.paper_fill_count(cid) == 1 and len(w.accepted) == 1
    assert w.events(cid) == ["pending", "sent", "retry", "filled"]
    stored = w.store.latest_position("LONGCO")
    assert stored is not None and stored.state is PositionState.CLOSED


async def test_broker_slower_than_timeout_before_accepting(make_world: Factory) -> None:
    """A send that times out before the broker accepted it is looked up, then resent once."""
    w: World

    def speed_up(exit: Exit, position: Position | None, elapsed: float | None) -> None:
        w.broker.latency = 0.0  # told of the timeout: the broker is fast from now on

    w = make_world(order_timeout=0.1, listener=speed_up)
    w.broker.latency = 1.0
    decided = w.decide(LONG_SL, 94.0)
    cid = decided.exit.client_order_id
    w.executor.submit(decided)
    assert (await w.executor.first_outcome(cid)).detail == "timed out"
    assert await w.executor.drain(2.0)

    assert w.store.paper_fill_count(cid) == 1 and w.store.paper_fill_count() == 1
    assert w.events(cid) == ["pending", "sent", "retry", "sent", "filled"]


async def test_concurrent_closes_send_one_order(make_world: Factory) -> None:
    """Twenty concurrent closes of one position create one exit and send one order."""
    w = make_world()
    w.broker.latency = 0.02
    position = w.store.add_position(LONG_SL, time.time())
    w.guard.add(position, w.now())
    w.book.update("LONGCO", 99.0, None, PriceSource.POLL, w.now())
    created: list[str] = []

    async def close() -> Exit:
        request = w.guard.close("LONGCO", ExitReason.EMERGENCY, w.now(), time.time())
        if request.created:
            assert request.event is not None
            created.append(request.exit.client_order_id)
            w.executor.submit(request.event)
        return await w.executor.first_outcome(request.exit.client_order_id)

    outcomes = await asyncio.gather(*(close() for _ in range(20)))
    assert len(created) == 1
    assert {e.client_order_id for e in outcomes} == set(created)
    assert all(e.state is ExitState.FILLED and e.fill_price == 99.0 for e in outcomes)
    assert await w.executor.drain(1.0)
    assert w.store.paper_fill_count() == 1 and len(w.store.exits()) == 1
    record = w.store.exit_record(created[0])
    assert record is not None and record.exit.price_source is PriceSource.MANUAL
    assert record.exit.reason is ExitReason.EMERGENCY and record.pnl == -10.0


def leave_exit(tmp_path: Path, state: ExitState, *, filled: bool) -> str:
    """A state dir whose process died with LONGCO's exit in `state` (and its fill, if `filled`)."""
    store = Store.in_dir(tmp_path)
    book = PriceBook(stale_warning=30.0, cache_timeout=300.0)
    guard = Guard(book, blind_policy=BlindPolicy.HOLD, blind_after=300.0, install_id="x")
    guard.add(store.add_position(LONG_SL, time.time()), 0.0)
    book.update("LONGCO", 94.0, None, PriceSource.POLL, 0.0)
    (decided,) = [e for e in guard.sweep(0.0, time.time(), True) if isinstance(e, ExitDecided)]
    store.journal_exit(decided.exit, decided.position, time.time())
    cid = decided.exit.client_order_id
    if state is ExitState.SENT:
        store.update_exit(guard.exit_sending(cid), time.time())
    if filled:
        report = OrderReport(cid, f"paper-{cid}-1", OrderStatus.FILLED, 94.0)
        store.record_paper_fill(report, "LONGCO", "SELL", 10.0, time.time())
    store.close()
    return cid


async def test_recover_settles_a_sent_exit_found_filled(
    tmp_path: Path, make_world: Factory
) -> None:
    """After a restart, an exit left sent whose fill exists is settled filled without sending."""
    cid = leave_exit(tmp_path, ExitState.SENT, filled=True)
    w = make_world()
    positions = await recover(w.guard, w.store.aio, w.executor, w.now())
    assert [p.state for p in positions] == [PositionState.EXITING]
    assert w.executor.in_flight() == 1
    first = await w.executor.first_outcome(cid)
    assert first.state is ExitState.FILLED and first.fill_price == 94.0
    assert await w.executor.drain(1.0)

    assert w.accepted == [] and w.store.paper_fill_count(cid) == 1
    # The resumed exit is journalled as a retry (its outcome unknown), then found filled.
    assert w.events(cid) == ["pending", "sent", "retry", "filled"]
    stored = w.store.latest_position("LONGCO")
    assert stored is not None and stored.state is PositionState.CLOSED
    record = w.store.exit_record(cid)
    assert record is not None and record.pnl == -60.0 and record.exit.attempts == 1


async def test_recover_sends_a_pending_exit_once(tmp_path: Path, make_world: Factory) -> None:
    """After a restart, an exit left pending with no order at the broker is sent exactly once."""
    cid = leave_exit(tmp_path, ExitState.PENDING, filled=False)
    w = make_world()
    await recover(w.guard, w.store.aio, w.executor, w.now())
    assert (await w.executor.first_outcome(cid)).state is ExitState.FILLED
    assert await w.executor.drain(1.0)

    assert [o.client_order_id for o in w.accepted] == [cid]
    assert w.store.paper_fill_count(cid) == 1
    assert w.events(cid) == ["pending", "sent", "filled"]
    # Nothing left: a second restart resumes nothing.
    assert w.store.unfinished_exits() == [] and w.store.positions() == []


async def test_drain_reports_whether_exits_are_done(make_world: Factory) -> None:
    """drain() is False while an exit is still in flight and True once it settled."""
    release = asyncio.Event()

    async def hold(order: ExitOrder) -> None:
        await release.wait()

    w = make_world(order_timeout=2.0, after_accept=hold)
    assert await w.executor.drain(0.01)  # nothing in flight
    decided = w.decide(LONG_SL, 94.0)
    w.executor.submit(decided)
    assert not await w.executor.drain(0.05)
    assert w.executor.in_flight() == 1
    release.set()
    assert await w.executor.drain(1.0)
    assert w.executor.in_flight() == 0 and w.store.paper_fill_count() == 1


async def test_listener_gets_settled_exits_with_elapsed_time(make_world: Factory) -> None:
    """The listener is told of a fill with its position and the broker round-trip time."""
    w = make_world()
    w.broker.latency = 0.03
    decided = w.decide(SHORT_SL, 178.0)
    w.executor.submit(decided)
    assert await w.executor.drain(1.0)
    ((exit, position, elapsed),) = w.settled
    assert exit.state is ExitState.FILLED and exit.client_order_id == decided.exit.client_order_id
    assert position is not None and position.state is PositionState.CLOSED
    assert position.pnl(178.0) == 110.0
    assert elapsed is not None and 0.03 <= elapsed < 0.5


@pytest.mark.parametrize(
    ("step", "journal"),
    [
        ("journalled", ["pending", "sent", "filled"]),
        # Died between journalling `sent` and the broker call: resumed as a retry.
        ("sent", ["pending", "sent", "retry", "sent", "filled"]),
    ],
)
async def test_a_crashed_driver_resumes_with_a_lookup(
    tmp_path: Path, step: str, journal: list[str]
) -> None:
    """If an exit's driver crashes at `step`, it restarts by looking the order up, and fills once."""
    store = Store.in_dir(tmp_path)
    book = PriceBook(stale_warning=30.0, cache_timeout=300.0)
    guard = Guard(book, blind_policy=BlindPolicy.HOLD, blind_after=300.0, install_id="t")
    broker = PaperBroker(store, lambda s: 99.0)
    crashes = 0

    async def crash_once(at: str, exit: Exit) -> None:
        nonlocal crashes
        if at == step and crashes == 0:
            crashes += 1
            raise RuntimeError("a bug in the driver")

    settled = asyncio.Event()
    executor = ExitExecutor(
        guard, store, broker, checkpoint=crash_once, listener=lambda e, p, t: settled.set()
    )
    guard.add(store.add_position(PositionSpec("A", Side.LONG, 1, 100.0), 0.0), 0.0)
    request = guard.close("A", ExitReason.EMERGENCY, 0.0, 0.0)
    assert request.event is not None
    executor.submit(request.event)
    async with asyncio.timeout(10):
        await settled.wait()  # the restarted driver settles it
    assert crashes == 1 and store.paper_fill_count() == 1 and guard.position("A") is None
    assert [e["state"] for e in store.exit_events(request.exit.client_order_id)] == journal
    store.close()


@pytest.mark.parametrize("state", [ExitState.PENDING, ExitState.SENT, ExitState.RETRY])
async def test_recover_sends_an_exit_the_broker_never_got_once(
    tmp_path: Path, make_world: Factory, state: ExitState
) -> None:
    """An exit left in any in-flight state with no order at the broker is sent exactly once."""
    cid = leave_exit(tmp_path, ExitState.SENT if state is ExitState.RETRY else state, filled=False)
    if state is ExitState.RETRY:
        store = Store.in_dir(tmp_path)
        (left,) = store.unfinished_exits()
        store.update_exit(left.unavailable("timed out", 1e9), time.time())
        store.close()
    w = make_world()
    await recover(w.guard, w.store.aio, w.executor, w.now())
    assert (await w.executor.first_outcome(cid)).state is ExitState.FILLED
    assert await w.executor.drain(1.0)
    assert [o.client_order_id for o in w.accepted] == [cid]
    assert w.store.paper_fill_count(cid) == 1 and w.store.unfinished_exits() == []


class AcknowledgingBroker:
    """Answers a send with a working order, then its lookup lags (finds nothing) twice."""

    name = "lagging"

    def __init__(self) -> None:
        self.placed: list[str] = []
        self.lookups = 0

    async def place_exit(self, order: ExitOrder) -> OrderReport:
        self.placed.append(order.client_order_id)
        return OrderReport(order.client_order_id, "B1", OrderStatus.WORKING)

    async def find_order(self, client_order_id: str) -> OrderReport | None:
        self.lookups += 1
        if self.lookups <= 2:
            return None
        return OrderReport(client_order_id, "B1", OrderStatus.FILLED, 94.0)

    async def close(self) -> None:
        return None


async def test_an_acknowledged_order_is_never_resent_when_its_lookup_lags(
    tmp_path: Path,
) -> None:
    """A broker that said it holds the order and then cannot find it is asked again, not sent twice."""
    store = Store.in_dir(tmp_path)
    book = PriceBook(stale_warning=30.0, cache_timeout=300.0)
    guard = Guard(book, blind_policy=BlindPolicy.HOLD, blind_after=300.0, install_id="t")
    broker = AcknowledgingBroker()
    executor = ExitExecutor(guard, store, broker, monotonic=lambda: 0.0)
    guard.add(store.add_position(LONG_SL, 0.0), 0.0)
    request = guard.close("LONGCO", ExitReason.EMERGENCY, 0.0, 0.0)
    assert request.event is not None
    executor.submit(request.event)
    async with asyncio.timeout(10):
        assert await executor.drain(10.0)
    assert broker.placed == [request.exit.client_order_id] and broker.lookups == 3
    record = store.exit_record(request.exit.client_order_id)
    assert record is not None and record.exit.state is ExitState.FILLED
    store.close()
