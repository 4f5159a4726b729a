"""No orders while the market is closed, on a real calendar with an injected clock (SPEC 4a).

The guard_loop, its store, the executor and the paper broker are real; only the
clocks are the test's, so the open, the close and a holiday are crossed on cue.
"""

from __future__ import annotations

import logging
import zoneinfo
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import date, datetime, time
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from tickguard.brokers.paper import PaperBroker
from tickguard.core.guard import BlindPolicy, Guard
from tickguard.core.market import MarketCalendar
from tickguard.core.positions import ExitReason, PositionSpec, Side
from tickguard.core.prices import PriceBook, PriceSource
from tickguard.executor import ExitExecutor
from tickguard.guard_loop import GuardLoop
from tickguard.metrics import Metrics
from tickguard.store import Store, run_now

IST = zoneinfo.ZoneInfo("Asia/Kolkata")
HOLIDAY = date(2026, 12, 3)  # a Thursday
NSE = MarketCalendar(
    IST,
    ((time(9, 15), time(15, 30)),),
    frozenset(range(5)),
    frozenset({HOLIDAY}),
    always_open=False,
)
SPEC = PositionSpec("BOSCHLTD", Side.LONG, 10.0, 700.0, stop_loss=650.0)


@dataclass
class Clock:
    """Wall and monotonic time the test moves: `at(...)` jumps the wall clock, mono follows."""

    wall: float = 0.0
    mono: float = 1000.0

    def at(self, when: datetime) -> None:
        step = when.timestamp() - self.wall if self.wall else 1.0
        self.wall = when.timestamp()
        self.mono += max(step, 0.001)


@dataclass
class World:
    clock: Clock
    book: PriceBook
    guard_loop: GuardLoop
    executor: ExitExecutor
    store: Store

    def price(self, value: float, when: datetime) -> None:
        """A poll price received at `when`, then judged as the poller would."""
        self.clock.at(when)
        self.book.update("BOSCHLTD", value, None, PriceSource.POLL, self.clock.mono)
        self.guard_loop.on_prices(["BOSCHLTD"], PriceSource.POLL)

    def sweep(self, when: datetime) -> None:
        self.clock.at(when)
        run_now(self.guard_loop.sweep())  # on SQLite, a sweep never waits

    def exits(self) -> int:
        return len(self.store.exits())


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    clock = Clock()
    store = Store.in_dir(tmp_path)
    book = PriceBook(stale_warning=30.0, cache_timeout=3600.0)
    book.channel_up(PriceSource.POLL, 0.0)
    guard = Guard(book, blind_policy=BlindPolicy.HOLD, blind_after=300.0, install_id="t")
    broker = PaperBroker(store, lambda s: 640.0)
    executor = ExitExecutor(guard, store, broker)
    guard_loop = GuardLoop(
        guard,
        store,
        executor,
        Metrics(CollectorRegistry()),
        NSE,
        sweep_interval=1.0,
        monotonic=lambda: clock.mono,
        wall=lambda: clock.wall,
    )
    executor.listener = guard_loop.on_exit
    w = World(clock, book, guard_loop, executor, store)
    w.clock.at(datetime(2026, 12, 2, 8, 0, tzinfo=IST))
    await guard_loop.add(SPEC, source="test")
    yield w
    await executor.drain(5.0)
    await executor.cancel_all()
    store.close()


def ist(day: int, hour: int, minute: int, second: int = 0) -> datetime:
    return datetime(2026, 12, day, hour, minute, second, tzinfo=IST)


async def test_before_the_open_a_crossing_is_held_and_said_once(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    """At 09:14:59 a crossed stop sends nothing and logs one `market closed: held` line."""
    caplog.set_level(logging.INFO, "tickguard")
    world.sweep(ist(2, 9, 14, 0))
    for second in (1, 30, 59):
        world.price(640.0, ist(2, 9, 14, second))
        world.sweep(ist(2, 9, 14, second))
    assert world.exits() == 0
    lines = [r.getMessage() for r in caplog.records if "held until the open" in r.getMessage()]
    assert lines == [
        "[SL] BOSCHLTD: price 640.00 <= SL 650.00 (FALLBACK) via poll, 0s old;"
        " market closed: held until the open"
    ]
    assert world.guard_loop.guard.held_for_open() == ["BOSCHLTD"]


async def test_at_the_open_the_first_price_received_after_it_fires(world: World) -> None:
    """At 09:15:00 the pre-open price fires nothing; the first price received after it does."""
    world.price(640.0, ist(2, 9, 14, 59))
    world.sweep(ist(2, 9, 14, 59))
    world.sweep(ist(2, 9, 15, 0))
    world.sweep(ist(2, 9, 15, 1))
    assert world.exits() == 0
    assert world.guard_loop.guard.held_for_open() == []
    world.price(641.0, ist(2, 9, 15, 2))
    (record,) = world.store.exits()
    assert record.exit.trigger_price == 641.0


async def test_a_crossing_in_the_last_second_fires(world: World) -> None:
    """At 15:29:59 the market is open: a crossing fires."""
    world.sweep(ist(2, 15, 29, 58))
    world.price(640.0, ist(2, 15, 29, 59))
    assert world.exits() == 1


async def test_at_the_close_a_crossing_is_held(world: World) -> None:
    """At 15:30:00 the market is closed (the session's end is exclusive): held, nothing sent."""
    world.sweep(ist(2, 15, 29, 58))
    world.price(640.0, ist(2, 15, 30, 0))
    world.sweep(ist(2, 15, 30, 0))
    assert world.exits() == 0 and world.guard_loop.guard.held_for_open() == ["BOSCHLTD"]


async def test_a_holiday_is_closed_all_day(world: World) -> None:
    """On a configured holiday, mid-session, a crossing is held and nothing is sent."""
    world.sweep(ist(3, 11, 0, 0))
    world.price(640.0, ist(3, 11, 0, 1))
    world.sweep(ist(3, 11, 0, 2))
    assert world.exits() == 0
    assert not world.guard_loop.market_open
    assert world.guard_loop.guard.held_for_open() == ["BOSCHLTD"]
    # The next trading day's open acts on the first price after it.
    world.sweep(ist(4, 9, 15, 0))
    world.price(639.0, ist(4, 9, 15, 1))
    assert world.exits() == 1


async def test_an_emergency_close_is_sent_while_closed(world: World) -> None:
    """A manual close goes to the broker at any hour."""
    world.sweep(ist(2, 20, 0, 0))
    outcome = world.guard_loop.close("BOSCHLTD", ExitReason.EMERGENCY)
    assert outcome.created and world.exits() == 1
