"""Reads of the account that overlap are acted on in the order they started (docs/account.md).

A periodic read and the read right before an exit may be in flight at once,
and answer in any order. The view, and what is done with it, is always that
of the read that started last among those that answered: an exit is sized
from a read that started after it was decided, never from an older one that
answered later. The broker here answers when the test says so.
"""

from __future__ import annotations

import asyncio
import time
import zoneinfo
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from tickguard.config import AccountConfig
from tickguard.core.account import Holding
from tickguard.core.guard import BlindPolicy, ExitDecided, Guard
from tickguard.core.market import MarketCalendar
from tickguard.core.orders import ExitOrder, OrderReport
from tickguard.core.positions import PositionSpec, Side
from tickguard.core.prices import PriceBook, PriceSource
from tickguard.executor import ExitExecutor
from tickguard.guard_loop import GuardLoop
from tickguard.metrics import Metrics
from tickguard.reconciler import Reconciler
from tickguard.store import Store

ALWAYS_OPEN = MarketCalendar(zoneinfo.ZoneInfo("UTC"), (), frozenset(), frozenset(), True)
ACCOUNT = AccountConfig("config", 3600.0, 3600.0, ("I", "D", "MTF"))


class HeldBroker:
    """A broker whose positions reads answer when the test sets their result."""

    name = "held"

    def __init__(self) -> None:
        self.reads: list[asyncio.Future[list[Holding]]] = []
        self.asked = asyncio.Event()  # set by each read

    async def positions(self) -> list[Holding]:
        read = asyncio.get_running_loop().create_future()
        self.reads.append(read)
        self.asked.set()
        return await read

    async def place_exit(self, order: ExitOrder) -> OrderReport:
        raise AssertionError("no order is sent here")

    async def find_order(self, client_order_id: str) -> OrderReport | None:
        return None

    async def close(self) -> None:
        return None


@dataclass
class Rig:
    broker: HeldBroker
    guard: Guard
    book: PriceBook
    guard_loop: GuardLoop
    reconciler: Reconciler

    async def started(self, count: int) -> None:
        """Return once `count` reads are in flight at the broker."""
        while len(self.broker.reads) < count:
            self.broker.asked.clear()
            await self.broker.asked.wait()


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    store = Store.in_dir(tmp_path)
    book = PriceBook(stale_warning=30.0, cache_timeout=300.0)
    book.channel_up(PriceSource.POLL, time.monotonic())
    guard = Guard(book, blind_policy=BlindPolicy.HOLD, blind_after=300.0, install_id="r")
    broker = HeldBroker()
    executor = ExitExecutor(guard, store, broker)
    metrics = Metrics(CollectorRegistry())
    guard_loop = GuardLoop(guard, store, executor, metrics, ALWAYS_OPEN, sweep_interval=1.0)
    reconciler = Reconciler(broker, guard_loop, metrics, ACCOUNT)
    try:
        yield Rig(broker, guard, book, guard_loop, reconciler)
    finally:
        store.close()


async def test_a_read_that_answers_after_a_later_one_is_not_acted_on(rig: Rig) -> None:
    """Two reads in flight: the later one answers first and is acted on; the earlier one,
    answering after it, changes neither the view nor a guarded position."""
    await rig.guard_loop.add(PositionSpec("A", Side.LONG, 10, 100.0, stop_loss=90.0), source="test")
    earlier = asyncio.create_task(rig.reconciler.reconcile(5.0))
    await rig.started(1)
    later = asyncio.create_task(rig.reconciler.reconcile(5.0))
    await rig.started(2)

    rig.broker.reads[1].set_result([Holding("A", 6.0, 100.0, "I")])  # the bot sold 4
    assert await later
    rig.broker.reads[0].set_result([Holding("A", 10.0, 100.0, "I")])  # before it did
    assert await earlier

    view = rig.reconciler.view
    assert view is not None and view.holdings == {"A": Holding("A", 6.0, 100.0, "I")}
    position = rig.guard.position("A")
    assert position is not None and position.spec.quantity == 6 and position.confirmed
    assert rig.reconciler.last_error == ""


async def test_an_exit_is_sized_from_a_read_started_after_it_was_decided(rig: Rig) -> None:
    """A periodic read in flight when a stop crosses answers last, with the account as it
    was before the bot halved the position: the exit is sized from the read made for it."""
    await rig.guard_loop.add(PositionSpec("A", Side.LONG, 10, 100.0, stop_loss=90.0), source="test")
    first = asyncio.create_task(rig.reconciler.reconcile(5.0))
    await rig.started(1)
    rig.broker.reads[0].set_result([Holding("A", 10.0, 100.0, "I")])
    assert await first  # shown held: confirmed

    periodic = asyncio.create_task(rig.reconciler.reconcile(5.0))
    await rig.started(2)  # it reads the account before the bot sells half
    rig.book.update("A", 85.0, None, PriceSource.POLL, time.monotonic())
    (decided,) = [
        e
        for e in rig.guard.evaluate("A", time.monotonic(), time.time(), market_open=True)
        if isinstance(e, ExitDecided)
    ]
    sizing = asyncio.create_task(rig.reconciler.exit_quantity(decided.exit))
    await rig.started(3)
    rig.broker.reads[2].set_result([Holding("A", 5.0, 100.0, "I")])  # after the bot sold
    rig.broker.reads[1].set_result([Holding("A", 10.0, 100.0, "I")])  # before it did
    assert await periodic
    assert await sizing == 5.0
    view = rig.reconciler.view
    assert view is not None and view.holdings["A"].quantity == 5.0
