"""The price book: the newest price per symbol, where it came from, and how old it is.

Freshness is judged on our monotonic receipt time, never on wall-clock or
exchange time (docs/config.md, prices). Two channels deliver prices: the live socket and the
REST poll. Each has a *session*: an unbroken stretch during which it is known
healthy. A price keeps its channel as source only while that channel's
session it arrived in is still healthy; otherwise it is served as `cache`.

Age of a price:
- live, current session, socket healthy: 0. With ltp-on-change feeds a quiet
  symbol on a healthy socket has not moved.
- live, its session ended: since the last moment that session was known
  healthy (its last data frame: a tick or a heartbeat; a pong proves the
  network path, not the data), or the receipt time if later.
- poll or older: since receipt.
- no price: since the symbol was guarded (`since`, passed by the caller).
"""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass


class PriceSource(enum.Enum):
    """Where a price, or the price behind a decision, came from (docs/config.md, prices)."""

    LIVE = "live"
    POLL = "poll"
    CACHE = "cache"
    MANUAL = "manual"
    NONE = "none"


class Freshness(enum.Enum):
    FRESH = "fresh"  # age <= stale_warning
    STALE = "stale"  # age <= cache_timeout: usable, logged and flagged
    UNUSABLE = "unusable"  # older, or no price: never drives an exit

    @property
    def usable(self) -> bool:
        return self is not Freshness.UNUSABLE


@dataclass(frozen=True, slots=True)
class Price:
    """One price as received: value, exchange time (epoch ms, optional), receipt time."""

    value: float
    exchange_ts: int | None
    received_at: float  # monotonic seconds
    source: PriceSource  # LIVE or POLL
    session: int  # the channel session it arrived in
    known_at: float  # last moment this price was known current (>= received_at)


@dataclass(frozen=True, slots=True)
class Quote:
    """A symbol's price judged at one moment: what exits and health report."""

    symbol: str
    price: Price | None
    age: float
    freshness: Freshness
    source: PriceSource  # LIVE, POLL or CACHE; NONE without a price

    @property
    def usable(self) -> bool:
        return self.price is not None and self.freshness.usable


@dataclass(slots=True)
class _Channel:
    healthy: bool = False
    session: int = 0
    last_alive: float = 0.0


class PriceBook:
    """Newest price per symbol plus the health of the channels that feed it."""

    def __init__(self, stale_warning: float, cache_timeout: float) -> None:
        if not 0 < stale_warning <= cache_timeout:
            raise ValueError("need 0 < stale_warning <= cache_timeout")
        self.stale_warning = stale_warning
        self.cache_timeout = cache_timeout
        self._prices: dict[str, Price] = {}
        self._channels = {PriceSource.LIVE: _Channel(), PriceSource.POLL: _Channel()}
        # Each channel's session while it is healthy, else None: what quote() needs of them.
        self._current: dict[PriceSource, int | None] = dict.fromkeys(self._channels)

    # -- channel health -------------------------------------------------

    def channel_up(self, source: PriceSource, now: float) -> None:
        """`source` became healthy (socket subscribed, or a poll succeeded after a failure)."""
        channel = self._channels[source]
        if not channel.healthy:
            channel.healthy = True
            channel.session += 1
            self._current[source] = channel.session
        channel.last_alive = max(channel.last_alive, now)

    def channel_alive(self, source: PriceSource, now: float) -> None:
        """`source` proved its data current at `now` (a data frame; a successful poll)."""
        channel = self._channels[source]
        if channel.healthy:
            channel.last_alive = max(channel.last_alive, now)

    def channel_down(self, source: PriceSource) -> None:
        """`source` is down or silent: its prices turn into cache, aged from its last sign of life."""
        channel = self._channels[source]
        if not channel.healthy:
            return
        channel.healthy = False
        self._current[source] = None
        for symbol, price in self._prices.items():
            if price.source is source and price.session == channel.session:
                known = max(price.known_at, channel.last_alive)
                self._prices[symbol] = dataclasses.replace(price, known_at=known)

    def channel_healthy(self, source: PriceSource) -> bool:
        return self._channels[source].healthy

    # -- prices ---------------------------------------------------------

    def update(
        self,
        symbol: str,
        value: float,
        exchange_ts: int | None,
        source: PriceSource,
        now: float,
    ) -> bool:
        """Record a price; False (and nothing changes) if it is older in exchange time, or
        a poll price for a symbol the healthy socket has priced this session."""
        current = self._prices.get(symbol)
        if current is not None and source is not current.source and self._is_live_current(current):
            return (
                False  # a healthy socket is authoritative: a late poll answer does not replace it
            )
        if (
            current is not None
            and exchange_ts is not None
            and current.exchange_ts is not None
            and exchange_ts < current.exchange_ts
        ):
            return False
        session = self._channels[source].session
        self._prices[symbol] = Price(value, exchange_ts, now, source, session, now)
        return True

    def _is_live_current(self, price: Price) -> bool:
        live = self._channels[PriceSource.LIVE]
        return price.source is PriceSource.LIVE and live.healthy and price.session == live.session

    def get(self, symbol: str) -> Price | None:
        return self._prices.get(symbol)

    def symbols(self) -> list[str]:
        return list(self._prices)

    def forget(self, symbol: str) -> None:
        self._prices.pop(symbol, None)

    def quote(self, symbol: str, now: float, since: float | None = None) -> Quote:
        """Judge `symbol` at `now`; `since` ages a symbol that never had a price."""
        price = self._prices.get(symbol)
        return _judge(symbol, price, now, since, self._current, self.stale_warning, self.cache_timeout)

    def view(self) -> PriceView:
        """A frozen copy for readers off the hot path (the API, the metrics): one dict copy."""
        return PriceView(
            dict(self._prices), dict(self._current), self.stale_warning, self.cache_timeout
        )

    def freshness(self, age: float) -> Freshness:
        return _freshness(age, self.stale_warning, self.cache_timeout)


@dataclass(frozen=True, slots=True)
class PriceView:
    """The price book at one moment (`PriceBook.view()`), judged exactly as the book would."""

    prices: dict[str, Price]
    current: dict[PriceSource, int | None]  # each channel's session while healthy, else None
    stale_warning: float
    cache_timeout: float

    def symbols(self) -> list[str]:
        return list(self.prices)

    def quote(self, symbol: str, now: float, since: float | None = None) -> Quote:
        price = self.prices.get(symbol)
        return _judge(symbol, price, now, since, self.current, self.stale_warning, self.cache_timeout)


def _judge(
    symbol: str,
    price: Price | None,
    now: float,
    since: float | None,
    current: dict[PriceSource, int | None],
    stale_warning: float,
    cache_timeout: float,
) -> Quote:
    """A price's age, freshness and source at `now` (the rules in the module docstring)."""
    if price is None:
        age = max(0.0, now - since) if since is not None else float("inf")
        return Quote(symbol, None, age, Freshness.UNUSABLE, PriceSource.NONE)
    in_session = current[price.source] == price.session  # its channel still healthy since
    live_now = in_session and price.source is PriceSource.LIVE
    age = 0.0 if live_now else max(0.0, now - price.known_at)
    source = price.source if in_session else PriceSource.CACHE
    return Quote(symbol, price, age, _freshness(age, stale_warning, cache_timeout), source)


def _freshness(age: float, stale_warning: float, cache_timeout: float) -> Freshness:
    if age <= stale_warning:
        return Freshness.FRESH
    if age <= cache_timeout:
        return Freshness.STALE
    return Freshness.UNUSABLE
