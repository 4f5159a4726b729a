"""Where decoded prices enter the daemon: one implementation for the live socket and the poll.

Both channels hand what one frame or one poll answer carried to a
`PriceIntake` for their source. It counts the entries the protocol dropped,
records the ticks in the price book, counts them, and tells the guard which
symbols' prices changed. What differs by source is kept here too:

- the price book decides per tick, by source: a poll price never replaces a
  live one from the socket's current session, and no price replaces a newer
  one in exchange time (`PriceBook.take`);
- only live ticks set `tickguard_last_tick_timestamp_seconds`.

Channel health (`PriceBook.channel_up` / `channel_alive`) and the fallback
stay with the channel: they depend on frames and answers, not on ticks.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from prometheus_client import Counter

from tickguard.core.prices import PriceBook, PriceSource
from tickguard.feed.protocol import Decoded
from tickguard.metrics import Metrics

# Told which symbols a batch changed (never an empty list), and from where.
OnPrices = Callable[[list[str], PriceSource], None]


class PriceIntake:
    """Takes decoded batches from one source (`PriceSource.LIVE` or `PriceSource.POLL`)."""

    __slots__ = (
        "_bad",
        "_bad_by_reason",
        "_book",
        "_counts",
        "_label",
        "_live",
        "_on_prices",
        "_source",
    )

    def __init__(
        self, book: PriceBook, metrics: Metrics, on_prices: OnPrices, source: PriceSource
    ) -> None:
        if source not in (PriceSource.LIVE, PriceSource.POLL):
            raise ValueError(f"prices arrive live or by poll, not as {source.value}")
        self._book = book
        self._on_prices = on_prices
        self._source = source
        # Labelled children, each looked up once: labels() takes a lock and a dict lookup.
        self._bad = metrics.bad_messages
        self._bad_by_reason: dict[str, Counter] = {}
        self._counts = metrics.ticks
        self._label = source.value  # read once: Enum.value is a property
        self._live = source is PriceSource.LIVE

    def take(self, decoded: Decoded, now: float) -> None:
        """Count `decoded`'s dropped entries; record its ticks, received at `now` (monotonic).

        Every tick counts in `tickguard_ticks_total{source}`, also one the book
        refuses; `on_prices` hears only of the symbols the book took, and only
        if there are any. A batch without ticks changes nothing but the
        bad-message counts.

        What a batch costs here (benchmarks/tick_path.py measures it):
        - per tick: the book's loop (`PriceBook.take`: a dict lookup, a few
          comparisons, a tuple and a dict store) and the symbol appended to
          the list `on_prices` gets. The ticks themselves were made in C by
          the decoder (`Tick` is a msgspec struct; the `json` protocol's
          symbols are the subscription's own strings, found by identity), and
          nothing else is made per tick here. Behind a socket the dict lookups
          dominate: the book's rows are cold in the CPU caches by then;
        - per batch: the tick count added to and, for live ticks, a wall-clock
          read (plain numbers the scrape reads: `TickCounts`), and the
          `on_prices` call, which costs the guard a dict lookup per symbol and a
          comparison per guarded one (`Guard.due`), and a full evaluation only
          for a price past a level, a new trailing high or a blind state;
        - per dropped entry (bad input only): a counter increment.
        """
        if decoded.errors:
            self._count_dropped(decoded.errors)
        ticks = decoded.ticks
        if not ticks:
            return
        source = self._source
        taken = self._book.take(ticks, source, now)
        counts = self._counts
        counts.received[self._label] += len(ticks)
        if self._live:
            counts.last_live_tick = time.time()
        if taken:
            self._on_prices(taken, source)

    def _count_dropped(self, reasons: list[str]) -> None:
        children = self._bad_by_reason
        for reason in reasons:
            child = children.get(reason)
            if child is None:
                child = children[reason] = self._bad.labels(reason)
            child.inc()
