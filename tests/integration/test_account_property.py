"""The account invariant under random interleavings (SPEC 8): no order through zero, none twice.

Hypothesis drives the real machinery (store, paper ledger, guard, guard_loop,
executor, reconciler) through random sequences of outside trades (a bot, a
person), price crossings, emergency closes, broker timeouts, lost replies and
partial fills,
reconciliations and crash-restarts. After each run the paper account's trades
are replayed: every order tickguard sent must move the net position toward
zero, never through it, and no client order id may be filled twice.

The second test removes the check made right before each send and expects
Hypothesis to find a reversal: the first test could fail.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import tempfile
import time
import zoneinfo
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from tickguard.brokers.paper import PaperBroker, PaperFault
from tickguard.config import AccountConfig
from tickguard.core import exits as exits_module
from tickguard.core.guard import BlindPolicy, Guard
from tickguard.core.market import MarketCalendar
from tickguard.core.positions import ExitReason, PositionSpec, Side
from tickguard.core.prices import PriceBook, PriceSource
from tickguard.errors import PositionExists
from tickguard.executor import ExitExecutor
from tickguard.guard_loop import GuardLoop
from tickguard.metrics import Metrics
from tickguard.reconciler import Reconciler
from tickguard.store import Store, run_now

SYMBOLS = ("A", "B")
ALWAYS_OPEN = MarketCalendar(zoneinfo.ZoneInfo("UTC"), (), frozenset(), frozenset(), True)
ACCOUNT = AccountConfig("config", 3600.0, 3600.0, ("I", "D", "MTF"))
EXAMPLES = 300

Step = tuple[str, ...] | tuple[object, ...]

steps = st.lists(
    st.one_of(
        st.tuples(
            st.just("register"),
            st.sampled_from(SYMBOLS),
            st.sampled_from(["long", "short"]),
            st.integers(1, 20),
        ),
        st.tuples(
            st.just("outside"),
            st.sampled_from(SYMBOLS),
            st.sampled_from(["buy", "sell"]),
            st.integers(1, 30),
        ),
        st.tuples(st.just("cross"), st.sampled_from(SYMBOLS)),
        st.tuples(st.just("close"), st.sampled_from(SYMBOLS)),
        st.tuples(
            st.just("fault"),
            st.sampled_from([PaperFault.UNAVAILABLE, PaperFault.LOST_REPLY, PaperFault.PARTIAL]),
        ),
        st.tuples(st.just("reconcile")),
        st.tuples(st.just("settle")),
        st.tuples(st.just("restart")),
    ),
    max_size=25,
)


@dataclass
class Rig:
    """One daemon's worth of account machinery on a state dir."""

    store: Store
    book: PriceBook
    guard_loop: GuardLoop
    executor: ExitExecutor
    broker: PaperBroker
    reconciler: Reconciler

    @classmethod
    def build(cls, state: Path, presend: bool) -> Rig:
        store = Store.in_dir(state)
        book = PriceBook(stale_warning=30.0, cache_timeout=300.0)
        book.channel_up(PriceSource.POLL, time.monotonic())
        guard = Guard(book, blind_policy=BlindPolicy.HOLD, blind_after=300.0, install_id="p")

        def price_of(symbol: str) -> float | None:
            price = book.get(symbol)
            return price.value if price else 100.0

        broker = PaperBroker(store, price_of)
        executor = ExitExecutor(guard, store, broker, order_timeout=1.0)
        metrics = Metrics(CollectorRegistry())
        guard_loop = GuardLoop(guard, store, executor, metrics, ALWAYS_OPEN, sweep_interval=1.0)
        executor.listener = guard_loop.on_exit
        guard_loop.on_registered = broker.open_if_flat
        reconciler = Reconciler(broker, guard_loop, metrics, ACCOUNT)
        if presend:
            executor.sizer = reconciler.exit_quantity
        run_now(guard_loop.recover([]))  # on SQLite: done at once
        return cls(store, book, guard_loop, executor, broker, reconciler)

    async def crash(self) -> None:
        """Die at once: exits in flight stop wherever they are (the store keeps what it had)."""
        await self.executor.cancel_all()
        self.store.close()


async def play(state: Path, sequence: list[Step], presend: bool) -> None:
    rig = Rig.build(state, presend)
    try:
        for step in sequence:
            await do(rig, step)
            if step[0] == "restart":
                await rig.crash()
                rig = Rig.build(state, presend)
                await rig.reconciler.reconcile(1.0)
        await rig.executor.drain(10.0)
    finally:
        await rig.crash()


async def do(rig: Rig, step: Step) -> None:
    kind = step[0]
    g = rig.guard_loop
    if kind == "register":
        _, symbol, side, quantity = step
        assert isinstance(symbol, str) and isinstance(side, str) and isinstance(quantity, int)
        if g.guard.position(symbol) is None:
            spec = PositionSpec(
                symbol, Side(side), float(quantity), 100.0,
                stop_loss=90.0 if side == "long" else 110.0,
            )  # fmt: skip
            with contextlib.suppress(PositionExists):
                await g.add(spec, source="api")
    elif kind == "outside":
        _, symbol, side, quantity = step
        assert isinstance(symbol, str) and isinstance(side, str) and isinstance(quantity, int)
        rig.store.record_paper_trade(symbol, side, float(quantity), 100.0, time.time())
    elif kind == "cross":
        (_, symbol) = step
        assert isinstance(symbol, str)
        position = g.guard.position(symbol)
        price = 85.0 if position is None or position.side is Side.LONG else 115.0
        rig.book.update(symbol, price, None, PriceSource.POLL, time.monotonic())
        g.evaluate([symbol])
    elif kind == "close":
        (_, symbol) = step
        assert isinstance(symbol, str)
        if (p := g.guard.position(symbol)) is not None and p.exit_id is None:
            g.close(symbol, ExitReason.EMERGENCY)
    elif kind == "fault":
        (_, fault) = step
        assert isinstance(fault, PaperFault)
        rig.broker.faults.append(fault)
    elif kind == "reconcile":
        await rig.reconciler.reconcile(1.0)
    elif kind == "settle":
        await rig.executor.drain(5.0)
    await asyncio.sleep(0)  # let started exits take a step


def violations(state: Path) -> list[str]:
    """Replay the paper account: tickguard's orders must move each net toward zero, once each."""
    store = Store.in_dir(state)
    try:
        rows = store._rows("SELECT * FROM paper_trades ORDER BY id")
        fills = store._rows(
            "SELECT client_order_id, COUNT(*) AS n FROM paper_fills GROUP BY client_order_id"
        )
    finally:
        store.close()
    found = [f"{r['client_order_id']} filled {r['n']} times" for r in fills if r["n"] > 1]
    net: dict[str, float] = {}
    for r in rows:
        before = net.get(r["symbol"], 0.0)
        delta = r["quantity"] if r["side"] == "buy" else -r["quantity"]
        after = before + delta
        if r["client_order_id"] is not None and (abs(after) > abs(before) or before * after < 0):
            found.append(
                f"{r['client_order_id']}: {r['side']} {r['quantity']:g} {r['symbol']}"
                f" took the net from {before:g} to {after:g}"
            )
        net[r["symbol"]] = after
    return found


def check(sequence: list[Step], presend: bool) -> None:
    state = Path(tempfile.mkdtemp(prefix="tickguard-account-"))
    try:
        asyncio.run(play(state, sequence, presend))
        problems = violations(state)
        assert not problems, problems
    finally:
        shutil.rmtree(state, ignore_errors=True)


@pytest.fixture(autouse=True)
def fast_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    """Retries after a timeout come at once (the schedule is not under test here)."""
    monkeypatch.setattr(exits_module, "RETRY_INITIAL_DELAY", 0.001)
    monkeypatch.setattr(exits_module, "RETRY_MAX_DELAY", 0.002)


PROPERTY = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    derandomize=True,
)


@pytest.mark.slow
@PROPERTY
@given(steps)
def test_no_order_ever_takes_a_position_through_zero(sequence: list[Step]) -> None:
    """Whatever trades, crossings, faults and crashes interleave, orders only reduce a net position."""
    check(sequence, presend=True)


@pytest.mark.slow
def test_without_the_pre_send_check_a_reversal_is_found() -> None:
    """The same search, with the check before each send removed, finds an order through zero."""

    @PROPERTY
    @given(steps)
    def unchecked(sequence: list[Step]) -> None:
        check(sequence, presend=False)

    with pytest.raises(AssertionError, match="took the net from") as raised:
        unchecked()
    print(f"\nwithout the pre-send check: {raised.value}")
