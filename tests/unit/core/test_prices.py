"""The price book: ordering, sources, ages and freshness (SPEC 4a)."""

import math

from hypothesis import given
from hypothesis import strategies as st

from tickguard.core.prices import Freshness, PriceBook, PriceSource

LIVE, POLL, CACHE = PriceSource.LIVE, PriceSource.POLL, PriceSource.CACHE


def book() -> PriceBook:
    return PriceBook(stale_warning=30.0, cache_timeout=300.0)


def test_rejects_thresholds_out_of_order() -> None:
    """A book whose stale threshold exceeds its cache timeout is refused."""
    try:
        PriceBook(stale_warning=10.0, cache_timeout=5.0)
    except ValueError:
        return
    raise AssertionError("accepted stale_warning > cache_timeout")


def test_unknown_symbol_without_since_is_unusable_forever() -> None:
    """A symbol never priced and never guarded has infinite age and no source."""
    q = book().quote("X", now=100.0)
    assert q.price is None and math.isinf(q.age)
    assert q.freshness is Freshness.UNUSABLE and q.source is PriceSource.NONE
    assert not q.usable


def test_never_priced_symbol_ages_from_since() -> None:
    """A guarded symbol without a price is aged from when it was guarded."""
    q = book().quote("X", now=150.0, since=100.0)
    assert q.age == 50.0 and q.freshness is Freshness.UNUSABLE


def test_live_price_on_healthy_socket_has_age_zero() -> None:
    """A quiet symbol on a healthy socket has not moved: age 0, source live."""
    b = book()
    b.channel_up(LIVE, 10.0)
    b.update("A", 100.0, 1, LIVE, 10.0)
    q = b.quote("A", 500.0)
    assert q.age == 0.0 and q.source is LIVE and q.freshness is Freshness.FRESH


def test_live_price_ages_from_last_sign_of_life_after_socket_down() -> None:
    """When the socket goes down, live prices age from its last frame or pong."""
    b = book()
    b.channel_up(LIVE, 10.0)
    b.update("A", 100.0, 1, LIVE, 10.0)
    b.channel_alive(LIVE, 40.0)
    b.channel_down(LIVE)
    q = b.quote("A", 100.0)
    assert q.source is CACHE and q.age == 60.0 and q.freshness is Freshness.STALE


def test_receipt_later_than_last_alive_wins() -> None:
    """A tick received after the last pong ages from its own receipt time."""
    b = book()
    b.channel_up(LIVE, 10.0)
    b.channel_alive(LIVE, 20.0)
    b.update("A", 100.0, None, LIVE, 25.0)
    b.channel_down(LIVE)
    assert b.quote("A", 35.0).age == 10.0


def test_tick_after_outage_detected_is_cache() -> None:
    """A live tick used after the outage was detected is served as cache."""
    b = book()
    b.channel_up(LIVE, 0.0)
    b.channel_down(LIVE)
    b.update("A", 100.0, None, LIVE, 5.0)
    q = b.quote("A", 6.0)
    assert q.source is CACHE and q.age == 1.0


def test_reconnect_does_not_refresh_old_ticks() -> None:
    """After a reconnect, a tick from the previous session stays cache until a new one arrives."""
    b = book()
    b.channel_up(LIVE, 0.0)
    b.update("A", 100.0, None, LIVE, 1.0)
    b.channel_down(LIVE)
    b.channel_up(LIVE, 50.0)
    q = b.quote("A", 60.0)
    assert q.source is CACHE and q.age == 59.0
    b.update("A", 101.0, None, LIVE, 61.0)
    assert b.quote("A", 70.0).source is LIVE


def test_poll_price_is_poll_while_polling_then_cache() -> None:
    """Poll prices keep source poll while the poll succeeds, cache once it fails."""
    b = book()
    b.channel_up(POLL, 10.0)
    b.update("A", 100.0, 5, POLL, 10.0)
    q = b.quote("A", 12.0)
    assert q.source is POLL and q.age == 2.0
    b.channel_down(POLL)
    q = b.quote("A", 50.0)
    assert q.source is CACHE and q.age == 40.0 and q.freshness is Freshness.STALE


def test_alive_on_down_channel_is_ignored() -> None:
    """A sign of life on a channel not marked healthy does not refresh its old prices."""
    b = book()
    b.channel_up(LIVE, 0.0)
    b.update("A", 1.0, None, LIVE, 0.0)
    b.channel_down(LIVE)
    b.channel_alive(LIVE, 100.0)
    b.channel_down(LIVE)
    assert b.quote("A", 100.0).age == 100.0


def test_older_exchange_time_does_not_overwrite() -> None:
    """A tick older in exchange time than the stored one is refused."""
    b = book()
    assert b.update("A", 100.0, 2000, POLL, 1.0)
    assert not b.update("A", 90.0, 1000, LIVE, 2.0)
    price = b.get("A")
    assert price is not None and price.value == 100.0
    assert b.update("A", 95.0, 2000, LIVE, 3.0)  # same exchange time: refreshed
    assert b.update("A", 96.0, None, LIVE, 4.0)  # no exchange time: by arrival


def test_freshness_boundaries_are_inclusive() -> None:
    """Age exactly at a threshold is still the better class."""
    b = book()
    assert b.freshness(30.0) is Freshness.FRESH
    assert b.freshness(30.0001) is Freshness.STALE
    assert b.freshness(300.0) is Freshness.STALE
    assert b.freshness(300.0001) is Freshness.UNUSABLE


def test_forget_and_symbols() -> None:
    """Forgotten symbols leave the book."""
    b = book()
    b.update("A", 1.0, None, POLL, 0.0)
    assert b.symbols() == ["A"]
    b.forget("A")
    b.forget("A")
    assert b.symbols() == [] and b.get("A") is None


@given(st.lists(st.tuples(st.integers(0, 10_000), st.floats(0.01, 1e6)), min_size=1))
def test_exchange_time_never_moves_backwards(ticks: list[tuple[int, float]]) -> None:
    """Whatever order ticks arrive in, the stored exchange time is the maximum seen."""
    b = book()
    for i, (ts, value) in enumerate(ticks):
        b.update("A", value, ts, LIVE, float(i))
    price = b.get("A")
    assert price is not None and price.exchange_ts == max(ts for ts, _ in ticks)


def test_late_poll_answer_does_not_replace_a_live_price() -> None:
    """A poll answer arriving after the socket priced the symbol is ignored, whatever its time."""
    b = book()
    b.channel_up(LIVE, 0.0)
    b.update("A", 100.0, 5000, LIVE, 1.0)
    b.channel_up(POLL, 1.0)
    assert not b.update("A", 100.0, 5000, POLL, 1.5)
    assert not b.update("A", 101.0, 6000, POLL, 1.6)
    b.channel_down(POLL)
    q = b.quote("A", 500.0)
    assert q.source is LIVE and q.age == 0.0
    b.channel_down(LIVE)
    assert b.update("A", 99.0, 7000, POLL, 501.0)  # the socket is down: the poll rules again
