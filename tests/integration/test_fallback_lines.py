"""The `[FALLBACK]` lines of a socket drop with many guarded positions: bounded per sweep (SPEC 6).

The guard loop, its store and the paper broker are real; the price book is
moved by hand (the socket drops, the poll answers, live prices come back) and
the clocks are the test's, so each sweep is exactly one step of an outage.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from tickguard.brokers.paper import PaperBroker
from tickguard.core.guard import BlindPolicy, Guard
from tickguard.core.market import MarketCalendar
from tickguard.core.positions import PositionSpec, Side
from tickguard.core.prices import PriceBook, PriceSource
from tickguard.executor import ExitExecutor
from tickguard.guard_loop import FALLBACK_LINES, REPEAT_EVERY, GuardLoop
from tickguard.metrics import Metrics
from tickguard.store import Store, run_now

LIVE, POLL = PriceSource.LIVE, PriceSource.POLL
ALWAYS_OPEN = MarketCalendar(UTC, (), frozenset(), frozenset(), always_open=True)
PER_SYMBOL = re.compile(r"^\[FALLBACK\] Using (\w+) price for (S\d+): ")
SUMMARY = re.compile(r"^\[FALLBACK\] Using (\w+) price for (\d+) more symbols ")
LIVE_AGAIN = re.compile(r"^\[FALLBACK\] (S\d+): live price again$")


@dataclass
class Clock:
    mono: float = 1000.0

    def wall(self) -> float:
        return 1_767_765_256.0 + self.mono


@dataclass
class Outage:
    """A guard loop with guarded positions, its price book, and a clock the test moves."""

    clock: Clock
    book: PriceBook
    loop: GuardLoop
    caplog: pytest.LogCaptureFixture
    symbols: list[str] = field(default_factory=list)
    ts: int = 1_767_765_256_000

    def prices(self, source: PriceSource) -> None:
        """Every symbol priced by `source` now (its channel up)."""
        self.book.channel_up(source, self.clock.mono)
        self.ts += 1
        for symbol in self.symbols:
            self.book.update(symbol, 500.0, self.ts, source, self.clock.mono)

    def sweep(self, after: float = 1.0) -> list[str]:
        """Move the clock on by `after` seconds, sweep; the `[FALLBACK]` lines it wrote."""
        self.clock.mono += after
        self.caplog.clear()
        run_now(self.loop.sweep())  # on SQLite, a sweep never waits
        return [m for r in self.caplog.records if (m := r.getMessage()).startswith("[FALLBACK]")]


@pytest.fixture
def outage(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> Iterator[Outage]:
    caplog.set_level(logging.INFO, "tickguard")
    clock = Clock()
    store = Store.in_dir(tmp_path)
    book = PriceBook(stale_warning=30.0, cache_timeout=3600.0)
    guard = Guard(book, blind_policy=BlindPolicy.HOLD, blind_after=300.0, install_id="t")
    executor = ExitExecutor(guard, store, PaperBroker(store, lambda s: 500.0))
    loop = GuardLoop(
        guard,
        store,
        executor,
        Metrics(CollectorRegistry()),
        ALWAYS_OPEN,
        sweep_interval=1.0,
        monotonic=lambda: clock.mono,
        wall=clock.wall,
    )
    yield Outage(clock, book, loop, caplog)
    store.close()


def found(pattern: re.Pattern[str], lines: list[str]) -> list[tuple[str, ...]]:
    """The groups of each line `pattern` matches, in order."""
    return [m.groups() for m in map(pattern.match, lines) if m is not None]


def guarded(outage: Outage, n: int) -> None:
    """`n` long positions, far from their levels, priced live."""
    outage.symbols = [f"S{i:04d}" for i in range(n)]
    for symbol in outage.symbols:
        spec = PositionSpec(symbol, Side.LONG, 1.0, 500.0, stop_loss=100.0, take_profit=900.0)
        run_now(outage.loop.add(spec, source="test"))
    outage.prices(LIVE)
    assert outage.sweep() == []


def test_a_drop_with_many_positions_writes_at_most_the_cap_and_one_summary(
    outage: Outage,
) -> None:
    """With more guarded symbols than FALLBACK_LINES, each step of an outage (cache, poll,
    repeat, live again) writes FALLBACK_LINES lines naming a symbol and one summary for the
    others, and nothing between the repeats."""
    n = FALLBACK_LINES + 40
    more = n - FALLBACK_LINES
    guarded(outage, n)

    outage.book.channel_down(LIVE)  # the socket drops: every price is now cache
    lines = outage.sweep()
    assert found(PER_SYMBOL, lines) == [("cache", s) for s in outage.symbols[:FALLBACK_LINES]]
    assert lines[FALLBACK_LINES:] == [
        f"[FALLBACK] Using cache price for {more} more symbols (see tickguard status)"
    ]
    assert outage.sweep() == []  # the condition lasts: said again only after REPEAT_EVERY

    outage.prices(POLL)  # the poll answers: a change of kind for every symbol
    lines = outage.sweep()
    assert [kind for kind, _ in found(PER_SYMBOL, lines)] == ["poll"] * FALLBACK_LINES
    assert found(SUMMARY, lines) == [("poll", str(more))]
    assert len(lines) == FALLBACK_LINES + 1

    outage.prices(POLL)
    lines = outage.sweep(REPEAT_EVERY)  # still polled, 30 s on: repeated, bounded again
    assert len(lines) == FALLBACK_LINES + 1
    assert SUMMARY.match(lines[-1])

    outage.book.channel_down(POLL)
    outage.prices(LIVE)  # live prices are back
    lines = outage.sweep()
    assert found(LIVE_AGAIN, lines) == [(s,) for s in outage.symbols[:FALLBACK_LINES]]
    assert lines[FALLBACK_LINES:] == [f"[FALLBACK] {more} more symbols: live price again"]
    assert outage.sweep() == []
