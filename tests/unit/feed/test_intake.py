"""The one price intake behind the live socket and the poll: the same rules, two differences.

Both sources count dropped entries and every tick, keep exchange-time order and
tell `on_prices` only of the symbols the book took. They differ where they
must: only live ticks set `tickguard_last_tick_timestamp_seconds`, and a poll
price never replaces a live one from the socket's current session.
"""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry

from tickguard.core.prices import PriceBook, PriceSource
from tickguard.feed.intake import PriceIntake
from tickguard.feed.json_protocol import JsonProtocol, decode_poll
from tickguard.feed.protocol import BAD_PRICE, NO_SYMBOL, UNKNOWN_SYMBOL, Decoded, Tick
from tickguard.metrics import Metrics

LIVE, POLL = PriceSource.LIVE, PriceSource.POLL
KNOWN = {"A", "B", "C"}


class Rig:
    """A price book, metrics in their own registry, and an intake per source, sharing them."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.metrics = Metrics(self.registry)
        self.book = PriceBook(stale_warning=30.0, cache_timeout=300.0)
        self.calls: list[tuple[list[str], PriceSource]] = []
        self.intake = {
            source: PriceIntake(self.book, self.metrics, self.on_prices, source)
            for source in (LIVE, POLL)
        }

    def on_prices(self, symbols: list[str], source: PriceSource) -> None:
        self.calls.append((list(symbols), source))

    def take(self, source: PriceSource, decoded: Decoded, now: float) -> None:
        self.intake[source].take(decoded, now)

    def metric(self, name: str, **labels: str) -> float:
        return self.registry.get_sample_value(name, labels) or 0.0

    def ticks(self, source: PriceSource) -> float:
        return self.metric("tickguard_ticks_total", source=source.value)

    def bad(self, reason: str) -> float:
        return self.metric("tickguard_feed_bad_messages_total", reason=reason)

    def last_tick(self) -> float:
        return self.metric("tickguard_last_tick_timestamp_seconds")


def batch(*ticks: tuple[str, float, int | None], errors: tuple[str, ...] = ()) -> Decoded:
    return Decoded([Tick(s, p, ts) for s, p, ts in ticks], list(errors))


@pytest.mark.parametrize("source", [LIVE, POLL])
def test_both_sources_count_every_tick_and_every_dropped_entry(source: PriceSource) -> None:
    """Dropped entries count by reason; every tick counts under its source, also one refused."""
    rig = Rig()
    rig.take(source, batch(("A", 10.0, 200)), 1.0)
    rig.take(
        source,
        batch(("A", 9.0, 100), ("B", 5.0, None), errors=(BAD_PRICE, NO_SYMBOL, BAD_PRICE)),
        2.0,
    )

    assert rig.ticks(source) == 3  # the older A is refused by the book, and still counted
    assert rig.ticks(LIVE if source is POLL else POLL) == 0
    assert (rig.bad(BAD_PRICE), rig.bad(NO_SYMBOL)) == (2, 1)
    assert rig.calls == [(["A"], source), (["B"], source)]


@pytest.mark.parametrize("source", [LIVE, POLL])
def test_both_sources_keep_exchange_time_order(source: PriceSource) -> None:
    """An older exchange time is refused; an equal or newer one, or none, is taken."""
    rig = Rig()
    rig.book.channel_up(source, 0.0)
    rig.take(source, batch(("A", 10.0, 200), ("B", 1.0, 50)), 1.0)
    rig.take(source, batch(("A", 9.0, 199), ("B", 2.0, 50)), 2.0)  # A older, B same time
    rig.take(source, batch(("A", 8.0, None)), 3.0)  # no exchange time: always newer

    a, b = rig.book.get("A"), rig.book.get("B")
    assert a is not None and (a.value, a.received_at, a.source) == (8.0, 3.0, source)
    assert b is not None and (b.value, b.received_at, b.source) == (2.0, 2.0, source)
    assert rig.calls == [(["A", "B"], source), (["B"], source), (["A"], source)]


@pytest.mark.parametrize("source", [LIVE, POLL])
def test_a_batch_without_ticks_only_counts_its_dropped_entries(source: PriceSource) -> None:
    """No ticks: no tick count, no on_prices, no newest-tick time; its errors still count."""
    rig = Rig()
    rig.take(source, batch(errors=(UNKNOWN_SYMBOL,)), 1.0)
    rig.take(source, batch(), 2.0)

    assert rig.bad(UNKNOWN_SYMBOL) == 1
    assert rig.ticks(source) == 0
    assert rig.calls == []
    assert rig.last_tick() == 0
    assert rig.book.symbols() == []


@pytest.mark.parametrize("source", [LIVE, POLL])
def test_a_batch_the_book_refuses_whole_is_counted_and_not_announced(source: PriceSource) -> None:
    """Ticks that change no price count, and on_prices is not called with an empty list."""
    rig = Rig()
    rig.take(source, batch(("A", 10.0, 200)), 1.0)
    rig.calls.clear()
    rig.take(source, batch(("A", 9.0, 100), ("A", 8.0, 150)), 2.0)

    assert rig.ticks(source) == 3
    assert rig.calls == []


def test_only_live_ticks_set_the_newest_tick_time() -> None:
    """tickguard_last_tick_timestamp_seconds moves on live ticks, never on polled ones."""
    rig = Rig()
    rig.take(POLL, batch(("A", 10.0, None)), 1.0)
    assert rig.last_tick() == 0

    rig.take(LIVE, batch(("B", 10.0, None)), 2.0)
    first = rig.last_tick()
    assert first > 0
    rig.take(POLL, batch(("C", 10.0, None)), 3.0)
    assert rig.last_tick() == first


def test_a_poll_price_never_replaces_a_live_one_from_the_current_session() -> None:
    """While the socket's session lasts, polled prices for its symbols are counted and dropped;
    a live price replaces a polled one; once the socket is down the poll may replace it."""
    rig = Rig()
    rig.book.channel_up(LIVE, 0.0)
    rig.book.channel_up(POLL, 0.0)
    rig.take(LIVE, batch(("A", 10.0, 100)), 1.0)
    rig.take(POLL, batch(("A", 11.0, 200), ("B", 20.0, 200)), 2.0)  # A newer, and still refused

    a = rig.book.get("A")
    assert a is not None and (a.value, a.source) == (10.0, LIVE)
    assert rig.ticks(POLL) == 2
    assert rig.calls == [(["A"], LIVE), (["B"], POLL)]

    rig.calls.clear()
    rig.take(LIVE, batch(("B", 21.0, 300)), 3.0)  # live replaces a polled price
    rig.book.channel_down(LIVE)
    rig.take(POLL, batch(("A", 12.0, 400), ("B", 22.0, 400)), 4.0)  # the session is over

    assert rig.calls == [(["B"], LIVE), (["A", "B"], POLL)]
    a, b = rig.book.get("A"), rig.book.get("B")
    assert a is not None and (a.value, a.source) == (12.0, POLL)
    assert b is not None and (b.value, b.source) == (22.0, POLL)


def test_the_same_prices_by_socket_and_by_poll_come_out_the_same() -> None:
    """A frame and a poll answer with the same entries give the same book values, counts and
    announced symbols, each under its own source."""
    frame = (
        '{"type": "ticks", "ticks": [{"symbol": "A", "price": 10.5, "ts": 7},'
        ' {"symbol": "B", "price": "x"}, {"symbol": "Z", "price": 1.0},'
        ' {"symbol": "C", "price": 30.0}]}'
    )
    answer = {
        "prices": {
            "A": {"price": 10.5, "ts": 7},
            "B": {"price": "x"},
            "Z": {"price": 1.0},
            "C": {"price": 30.0},
        }
    }
    seen = {}
    for source, decoded in [
        (LIVE, JsonProtocol().decode(frame, KNOWN)),
        (POLL, decode_poll(answer, KNOWN)),
    ]:
        rig = Rig()
        rig.book.channel_up(source, 0.0)
        rig.take(source, decoded, 1.0)
        prices = {s: (p.value, p.exchange_ts, p.source) for s in "ABC" if (p := rig.book.get(s))}
        seen[source] = (
            prices,
            rig.ticks(source),
            rig.bad(BAD_PRICE),
            rig.bad(UNKNOWN_SYMBOL),
            rig.calls,
        )

    assert seen[LIVE] == (
        {"A": (10.5, 7, LIVE), "C": (30.0, None, LIVE)},
        2,
        1,
        1,
        [(["A", "C"], LIVE)],
    )
    assert seen[POLL] == (
        {"A": (10.5, 7, POLL), "C": (30.0, None, POLL)},
        2,
        1,
        1,
        [(["A", "C"], POLL)],
    )


@pytest.mark.parametrize("source", [PriceSource.CACHE, PriceSource.MANUAL, PriceSource.NONE])
def test_no_intake_for_a_source_prices_do_not_arrive_by(source: PriceSource) -> None:
    """Prices arrive live or by poll; an intake for any other source is refused at once."""
    rig = Rig()
    with pytest.raises(ValueError, match=source.value):
        PriceIntake(rig.book, rig.metrics, rig.on_prices, source)


def test_the_tick_series_are_exported_from_the_start() -> None:
    """Both sources' tick counts and the newest-tick time exist at 0 before any tick, so a
    first tick shows in increase() (they are read at scrape time: metrics.TickCounts)."""
    rig = Rig()
    for source in ("live", "poll"):
        assert rig.registry.get_sample_value("tickguard_ticks_total", {"source": source}) == 0
    assert rig.registry.get_sample_value("tickguard_last_tick_timestamp_seconds") == 0
    rig.take(LIVE, batch(("A", 10.0, None), ("B", 1.0, None)), 1.0)
    assert rig.registry.get_sample_value("tickguard_ticks_total", {"source": "live"}) == 2
