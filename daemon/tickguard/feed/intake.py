"""Where decoded prices enter the daemon: one implementation for the live socket and the poll.

Both channels hand what one frame or one poll answer carried to a
`PriceIntake` for their source. It counts the entries the protocol dropped,
records the ticks in the price book, counts them, and tells the guard which
symbols' prices changed. What differs by source is kept here too:

- the price book decides per tick, by source: a poll price never replaces a
  live one from the socket's current session, and no price replaces a newer
  one in exchange time (`PriceBook.update`);
- only live ticks set `tickguard_last_tick_timestamp_seconds`.

Channel health (`PriceBook.channel_up` / `channel_alive`) and the fallback
stay with the channel: they depend on frames and answers, not on ticks.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from tickguard.core.prices import PriceBook, PriceSource
from tickguard.feed.protocol import Decoded
from tickguard.metrics import Metrics

# Told which symbols a batch changed (never an empty list), and from where.
OnPrices = Callable[[list[str], PriceSource], None]


class PriceIntake:
    """Takes decoded batches from one source (`PriceSource.LIVE` or `PriceSource.POLL`)."""

    __slots__ = ("_bad", "_book", "_last_tick", "_on_prices", "_source", "_ticks")

    def __init__(
        self, book: PriceBook, metrics: Metrics, on_prices: OnPrices, source: PriceSource
    ) -> None:
        if source not in (PriceSource.LIVE, PriceSource.POLL):
            raise ValueError(f"prices arrive live or by poll, not as {source.value}")
        self._book = book
        self._on_prices = on_prices
        self._source = source
        self._bad = metrics.bad_messages
        # The labelled child, looked up once: labels() takes a lock and a dict lookup.
        self._ticks = metrics.ticks.labels(source.value)
        self._last_tick = metrics.last_tick_timestamp if source is PriceSource.LIVE else None

    def take(self, decoded: Decoded, now: float) -> None:
        """Count `decoded`'s dropped entries; record its ticks, received at `now` (monotonic).

        Every tick counts in `tickguard_ticks_total{source}`, also one the book
        refuses; `on_prices` hears only of the symbols the book took, and only
        if there are any. A batch without ticks changes nothing but the
        bad-message counts.

        Costs, per batch: one book update per tick (a dict lookup, and a `Price`
        for each tick taken), the list of symbols taken, one counter increment
        and, for live ticks, one wall-clock read and gauge set; one `labels()`
        lookup per dropped entry (bad input only). Nothing else is made per tick.
        """
        for reason in decoded.errors:
            self._bad.labels(reason).inc()
        ticks = decoded.ticks
        if not ticks:
            return
        update, source = self._book.update, self._source
        updated = [t.symbol for t in ticks if update(t.symbol, t.price, t.exchange_ts, source, now)]
        self._ticks.inc(len(ticks))
        if self._last_tick is not None:
            self._last_tick.set(time.time())
        if updated:
            self._on_prices(updated, source)
