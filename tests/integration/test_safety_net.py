"""The safety net (docs/safety-net.md) on a real store, guard and paper broker: what it
places, moves and cancels, what it finds again after a restart or a lost answer, and
what `disarm` tells the executor. Time is a hand-moved clock, so no test waits."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from tickguard import safety_net as net_module
from tickguard.brokers.paper import PaperBroker
from tickguard.core.exits import Exit, ExitState
from tickguard.core.guard import BlindPolicy, ExitDecided, Guard
from tickguard.core.positions import ExitReason, PositionSpec, PositionState, Side
from tickguard.core.prices import PriceBook, PriceSource
from tickguard.core.safety_net import BrokerStop, Disarm, StopState, net_level
from tickguard.errors import BrokerRejected, BrokerUnavailable
from tickguard.executor import ExitExecutor
from tickguard.metrics import Metrics
from tickguard.safety_net import SafetyNet
from tickguard.store import Store, run_now

LONG = PositionSpec("LONGCO", Side.LONG, 10.0, 100.0, stop_loss=95.0)
SHORT = PositionSpec("SHORTCO", Side.SHORT, 4.0, 200.0, stop_loss=210.0)
TRAILING = PositionSpec("TRAILCO", Side.LONG, 10.0, 100.0, trailing_stop=5.0)


class Clock:
    """Monotonic and wall time, moved by the test."""

    def __init__(self) -> None:
        self.t = 1_000.0

    def mono(self) -> float:
        return self.t

    def wall(self) -> float:
        return 1_800_000_000.0 + self.t


class Broker(PaperBroker):
    """The paper broker, counting stop calls, with faults a test switches on."""

    def __init__(self, store: Store, price_of: Callable[[str], float | None], clock: Clock) -> None:
        super().__init__(store, price_of, wall=clock.wall)
        self.calls: Counter[str] = Counter()
        self.down = False  # every stop call: unreachable
        self.refuse = False  # places: refused
        self.lose_place_reply = False  # place it, then act as if the reply was lost
        self.hang_cancel = False
        self.fired_order: str | None = None  # cancel_stop answers TRIGGERED with this order
        self.order_cancelled: bool | None = None  # cancel_order's answer

    async def place_stop(
        self, symbol: str, position_side: Side, quantity: float, trigger: float
    ) -> BrokerStop:
        self.calls["place"] += 1
        if self.down:
            raise BrokerUnavailable("", "unreachable")
        if self.refuse:
            raise BrokerRejected("", "refused")
        stop = await super().place_stop(symbol, position_side, quantity, trigger)
        if self.lose_place_reply:
            raise BrokerUnavailable("", "reply lost")
        return stop

    async def modify_stop(self, stop: BrokerStop, quantity: float, trigger: float) -> BrokerStop:
        self.calls["modify"] += 1
        if self.down:
            raise BrokerUnavailable("", "unreachable")
        return await super().modify_stop(stop, quantity, trigger)

    async def cancel_stop(self, stop: BrokerStop) -> BrokerStop:
        self.calls["cancel"] += 1
        if self.hang_cancel:
            await asyncio.Event().wait()
        if self.down:
            raise BrokerUnavailable("", "unreachable")
        if self.fired_order is not None:
            return BrokerStop(
                stop.stop_id,
                stop.symbol,
                stop.position_side,
                stop.quantity,
                stop.trigger,
                StopState.TRIGGERED,
                self.fired_order,
            )
        return await super().cancel_stop(stop)

    async def stops(self) -> list[BrokerStop]:
        self.calls["list"] += 1
        if self.down:
            raise BrokerUnavailable("", "unreachable")
        return await super().stops()

    async def cancel_order(self, order_id: str) -> bool:
        self.calls["cancel_order"] += 1
        assert self.order_cancelled is not None
        return self.order_cancelled


@dataclass
class World:
    clock: Clock
    store: Store
    book: PriceBook
    guard: Guard
    broker: Broker
    registry: CollectorRegistry
    net: SafetyNet
    fired: list[float] = field(default_factory=list)

    def guard_position(self, spec: PositionSpec, price: float) -> None:
        position = self.store.add_position(spec, self.clock.wall())
        self.guard.add(position, self.clock.mono())
        self.broker.open_if_flat(spec)  # its entry filled on the paper account
        self.price(spec.symbol, price)

    def price(self, symbol: str, value: float) -> list[object]:
        """A polled price: judged by the guard (trailing anchors move), seen by the broker."""
        self.book.update(symbol, value, None, PriceSource.POLL, self.clock.mono())
        return list(self.guard.evaluate(symbol, self.clock.mono(), self.clock.wall(), True))

    def stops(self, state: StopState = StopState.ACTIVE) -> list[BrokerStop]:
        return [s for s in self.store.paper_stops() if s.state is state]

    def covered(self) -> float | None:
        return self.registry.get_sample_value("tickguard_safety_net_positions")

    def restarted(self) -> SafetyNet:
        """A new SafetyNet on the same store, as after a restart."""
        net = SafetyNet(
            self.broker,
            self.guard,
            self.store,
            Metrics(CollectorRegistry()),
            1.0,
            monotonic=self.clock.mono,
            wall=self.clock.wall,
        )
        run_now(net.load())
        return net


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    clock = Clock()
    store = Store.in_dir(tmp_path)
    book = PriceBook(stale_warning=30.0, cache_timeout=300.0)
    book.channel_up(PriceSource.POLL, clock.mono())
    guard = Guard(
        book, blind_policy=BlindPolicy.HOLD, blind_after=300.0, install_id=store.install_id
    )

    def price_of(symbol: str) -> float | None:
        price = book.get(symbol)
        return price.value if price else None

    broker = Broker(store, price_of, clock)
    registry = CollectorRegistry()
    net = SafetyNet(
        broker, guard, store, Metrics(registry), 1.0, monotonic=clock.mono, wall=clock.wall
    )
    w = World(clock, store, book, guard, broker, registry, net)
    net.on_fired = lambda: w.fired.append(clock.mono())
    await net.load()
    yield w
    store.close()


async def test_a_guarded_position_gets_one_stop_margin_beyond_its_own(world: World) -> None:
    world.guard_position(LONG, 100.0)
    world.guard_position(SHORT, 200.0)
    await world.net.step()
    await world.net.step()
    long_stop, short_stop = sorted(world.stops(), key=lambda s: s.symbol)
    assert (long_stop.symbol, long_stop.position_side, long_stop.quantity) == (
        "LONGCO",
        Side.LONG,
        10.0,
    )
    assert long_stop.trigger == pytest.approx(94.05)  # 95 less 1%, down to the 0.05 step
    assert (short_stop.symbol, short_stop.quantity) == ("SHORTCO", 4.0)
    assert short_stop.trigger == pytest.approx(212.1)  # 210 plus 1%, up to the step
    assert world.broker.calls["place"] == 2  # the second step placed nothing more
    assert world.covered() == 2.0
    assert world.net.status().covered == 2


async def test_the_stop_follows_the_trailing_level_within_the_move_limit(world: World) -> None:
    world.guard_position(TRAILING, 100.0)
    await world.net.step()
    seconds = 60.0
    for i in range(int(seconds / 0.5)):  # the price climbs 0.5 every half second
        world.clock.t += 0.5
        world.price(TRAILING.symbol, 100.0 + 0.5 * (i + 1))
        await world.net.step()
    # One move per MOVE_EVERY at most, however often the level changed (every step here).
    assert 1 <= world.broker.calls["modify"] <= seconds / net_module.MOVE_EVERY + 1
    world.clock.t += net_module.MOVE_EVERY
    await world.net.step()
    position = world.guard.position(TRAILING.symbol)
    assert position is not None
    (stop,) = world.stops()
    assert stop.trigger == pytest.approx(net_level(position, 1.0))  # caught up: 160 - 5, less 1%
    assert stop.trigger == pytest.approx(153.45)


async def test_a_removed_position_has_its_stop_cancelled(world: World) -> None:
    world.guard_position(LONG, 100.0)
    await world.net.step()
    world.guard.remove(LONG.symbol)
    await world.net.step()
    assert world.stops() == []
    assert len(world.stops(StopState.CANCELLED)) == 1
    assert world.store.net_live() == []
    assert world.covered() == 0.0


async def test_after_a_restart_the_stops_are_found_again_never_doubled(world: World) -> None:
    world.guard_position(LONG, 100.0)
    await world.net.step()
    net = world.restarted()
    await net.refresh()
    await net.step()
    assert world.broker.calls["place"] == 1
    assert len(world.stops()) == 1
    assert net.status().covered == 1


@pytest.mark.parametrize("placed", [True, False], ids=["placed", "never-placed"])
async def test_a_place_whose_answer_was_lost_is_looked_for_before_another(
    world: World, placed: bool
) -> None:
    world.guard_position(LONG, 100.0)
    if placed:
        world.broker.lose_place_reply = True
    else:
        world.broker.down = True
    await world.net.step()
    world.broker.lose_place_reply = world.broker.down = False
    for _ in range(3):  # the answer may still come: nothing else is placed meanwhile
        world.clock.t += 1.0
        await world.net.refresh()
        await world.net.step()
    assert world.broker.calls["place"] == 1
    assert [r.state for r in world.store.net_live()] == ["placing"]
    world.clock.t += net_module.PLACE_SETTLE
    await world.net.refresh()
    await world.net.step()
    assert len(world.stops()) == 1  # found (placed) or placed now (never placed)
    assert world.broker.calls["place"] == (1 if placed else 2)
    assert world.net.status().covered == 1


async def test_a_restart_with_a_place_in_doubt_finds_it_in_the_list(world: World) -> None:
    world.guard_position(LONG, 100.0)
    world.broker.lose_place_reply = True
    await world.net.step()  # then the process dies: the row says placing
    world.broker.lose_place_reply = False
    world.clock.t += net_module.PLACE_SETTLE
    net = world.restarted()
    await net.refresh()
    await net.step()
    assert world.broker.calls["place"] == 1
    (row,) = world.store.net_live()
    (stop,) = world.stops()
    assert (row.state, row.stop_id) == ("active", stop.stop_id)


async def test_disarm_cancels_the_stop_before_the_exit(world: World) -> None:
    world.guard_position(LONG, 100.0)
    await world.net.step()
    outcome = await world.net.disarm(_exit_of(world, LONG.symbol, 94.9))
    assert outcome is Disarm.CLEAR
    assert world.stops() == []
    assert world.fired == []


async def test_disarm_finds_a_stop_that_fired_first(world: World) -> None:
    world.guard_position(LONG, 100.0)
    await world.net.step()
    world.price(LONG.symbol, 90.0)  # a gap through both stops: the broker's fires first
    outcome = await world.net.disarm(_exit_of(world, LONG.symbol, 90.0))
    assert outcome is Disarm.FIRED
    assert world.fired  # the account is read at once
    assert world.store.paper_position(LONG.symbol) is None  # the stop sold all 10
    assert world.net.status().stops[0].state == "triggered"
    assert (await world.net.disarm(_exit_of(world, LONG.symbol, 90.0))) is Disarm.FIRED


async def test_disarm_gives_up_within_its_timeout(world: World) -> None:
    world.guard_position(LONG, 100.0)
    await world.net.step()
    world.broker.hang_cancel = True
    outcome = await asyncio.wait_for(world.net.disarm(_exit_of(world, LONG.symbol, 94.9)), 10.0)
    assert outcome is Disarm.UNKNOWN
    assert world.net.failures["cancel"] == 1
    assert (
        world.registry.get_sample_value("tickguard_safety_net_failures_total", {"op": "cancel"})
        == 1.0
    )


async def test_a_fired_stops_unfilled_order_is_cancelled_before_tickguard_sends(
    world: World,
) -> None:
    world.guard_position(LONG, 100.0)
    await world.net.step()
    world.broker.fired_order = "ORDER-1"
    world.broker.order_cancelled = True
    exit = _exit_of(world, LONG.symbol, 80.0)
    assert await world.net.disarm(exit) is Disarm.FIRED
    world.clock.t += net_module.FIRED_GRACE / 2
    assert await world.net.disarm(exit) is Disarm.FIRED  # its order may yet fill
    assert world.broker.calls["cancel_order"] == 0
    world.clock.t += net_module.FIRED_GRACE
    assert await world.net.disarm(exit) is Disarm.CLEAR
    assert world.broker.calls["cancel_order"] == 1


async def test_a_fired_stops_order_that_filled_is_not_sent_over(world: World) -> None:
    world.guard_position(LONG, 100.0)
    await world.net.step()
    world.broker.fired_order = "ORDER-1"
    world.broker.order_cancelled = False  # complete
    exit = _exit_of(world, LONG.symbol, 80.0)
    assert await world.net.disarm(exit) is Disarm.FIRED
    world.clock.t += net_module.FIRED_GRACE * 2
    assert await world.net.disarm(exit) is Disarm.FIRED


async def test_refused_stop_calls_are_paused_and_counted(world: World) -> None:
    world.guard_position(LONG, 100.0)
    world.broker.refuse = True
    for _ in range(10):
        await world.net.step()
    assert world.broker.calls["place"] == 1  # paused after the failure, not retried at once
    world.clock.t += net_module.FAILURE_PAUSE.delay(1)
    world.broker.refuse = False
    await world.net.step()
    assert world.broker.calls["place"] == 2
    assert world.covered() == 1.0
    assert world.net.failures["place"] == 1


# -- with the executor ------------------------------------------------------------


async def test_a_fired_stop_means_tickguard_sends_nothing(world: World) -> None:
    executor = ExitExecutor(world.guard, world.store, world.broker, order_timeout=1.0)
    executor.disarm = world.net.disarm
    world.guard_position(LONG, 100.0)
    await world.net.step()
    events = world.price(LONG.symbol, 90.0)
    (decided,) = [e for e in events if isinstance(e, ExitDecided)]
    executor.submit(decided)
    exit = await asyncio.wait_for(executor.first_outcome(decided.exit.client_order_id), 10.0)
    assert exit.state is ExitState.CANCELLED
    assert "broker-held stop fired" in exit.detail
    assert world.store.paper_fill_count() == 0  # no order of tickguard's
    assert world.store.paper_position(LONG.symbol) is None  # the stop closed it
    position = world.guard.position(LONG.symbol)
    assert position is not None and position.state is PositionState.OPEN  # reconciliation's now


async def test_an_unreachable_safety_net_never_holds_up_an_exit(world: World) -> None:
    executor = ExitExecutor(world.guard, world.store, world.broker, order_timeout=1.0)
    executor.disarm = world.net.disarm
    world.guard_position(LONG, 100.0)
    await world.net.step()
    world.broker.hang_cancel = True
    events = world.price(LONG.symbol, 94.9)
    (decided,) = [e for e in events if isinstance(e, ExitDecided)]
    started = time.monotonic()
    executor.submit(decided)
    exit = await asyncio.wait_for(executor.first_outcome(decided.exit.client_order_id), 10.0)
    assert exit.state is ExitState.FILLED
    assert world.store.paper_fill_count() == 1
    assert time.monotonic() - started < net_module.DISARM_TIMEOUT + 5.0  # bounded, not hung


def _exit_of(world: World, symbol: str, price: float) -> Exit:
    """An exit decided for `symbol` at `price` (the stop crossed)."""
    world.price(symbol, price)
    return world.guard.close(
        symbol, ExitReason.EMERGENCY, world.clock.mono(), world.clock.wall()
    ).exit
