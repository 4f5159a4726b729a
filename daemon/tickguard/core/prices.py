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

Prices and quotes are named tuples rather than frozen dataclasses: as
immutable, and several times cheaper to make (a frozen dataclass sets each
field through object.__setattr__). The book itself stores plain tuples in
`Price`'s field order, one made per tick taken, and makes a `Price` only
when one is read (docs/benchmarks.md, the tick path).
"""

from __future__ import annotations

import enum
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol


class PriceSource(enum.Enum):
    """Where a price, or the price behind a decision, came from (docs/config.md, prices)."""

    LIVE = "live"
    POLL = "poll"
    CACHE = "cache"
    MANUAL = "manual"
    NONE = "none"


# Members bound once for the per-tick code and for quotes: on Python 3.11 reading
# `PriceSource.LIVE` runs a descriptor, and an enum-keyed dict lookup a Python-level
# __hash__ (about 0.1 µs each).
_LIVE, _POLL, _CACHE, _NONE = (
    PriceSource.LIVE,
    PriceSource.POLL,
    PriceSource.CACHE,
    PriceSource.NONE,
)


class Freshness(enum.Enum):
    FRESH = "fresh"  # age <= stale_warning
    STALE = "stale"  # age <= cache_timeout: usable, logged and flagged
    UNUSABLE = "unusable"  # older, or no price: never drives an exit

    @property
    def usable(self) -> bool:
        return self is not _UNUSABLE


_FRESH, _STALE, _UNUSABLE = Freshness.FRESH, Freshness.STALE, Freshness.UNUSABLE


class Price(NamedTuple):
    """One price as received: value, exchange time (epoch ms, optional), receipt time."""

    value: float
    exchange_ts: int | None
    received_at: float  # monotonic seconds
    source: PriceSource  # LIVE or POLL
    session: int  # the channel session it arrived in
    known_at: float  # last moment this price was known current (>= received_at)


# A price as the book stores it: the fields of `Price`, in its order.
_Row = tuple[float, int | None, float, PriceSource, int, float]


class Quote(NamedTuple):
    """A symbol's price judged at one moment: what exits and health report."""

    symbol: str
    price: Price | None
    age: float
    freshness: Freshness
    source: PriceSource  # LIVE, POLL or CACHE; NONE without a price

    @property
    def usable(self) -> bool:
        return self.price is not None and self.freshness is not _UNUSABLE


class Tick(Protocol):
    """One price entry as a feed decoded it (tickguard.feed.protocol.Tick)."""

    @property
    def symbol(self) -> str: ...
    @property
    def price(self) -> float: ...
    @property
    def exchange_ts(self) -> int | None: ...


class _Entry(NamedTuple):
    """A `Tick` for `PriceBook.update`."""

    symbol: str
    price: float
    exchange_ts: int | None


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
        self._prices: dict[str, _Row] = {}
        self._live, self._poll = _Channel(), _Channel()
        self._channels = {PriceSource.LIVE: self._live, PriceSource.POLL: self._poll}
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
        prices = self._prices
        for symbol, row in prices.items():
            value, exchange_ts, received_at, had_source, session, known_at = row
            if had_source is source and session == channel.session:
                known = max(known_at, channel.last_alive)
                prices[symbol] = (value, exchange_ts, received_at, source, session, known)

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
        """Record one price (see `take`); False (and nothing changes) if it is refused."""
        return bool(self.take((_Entry(symbol, value, exchange_ts),), source, now))

    def take(self, ticks: Iterable[Tick], source: PriceSource, now: float) -> list[str]:
        """Record the prices of `ticks`, received from `source` at `now`, in order; the
        symbols whose price they set (a symbol once per tick taken).

        A tick is refused (and changes nothing) if it is older in exchange time
        than the symbol's price, or if it is a poll price for a symbol the
        healthy socket has priced this session.

        Per tick: one dict lookup, a few comparisons, one tuple and one dict store.
        """
        prices, socket = self._prices, self._live
        session = socket.session if source is _LIVE else self._channels[source].session
        live = socket.session if socket.healthy else None  # the socket's current session
        taken: list[str] = []
        for tick in ticks:
            symbol, exchange_ts = tick.symbol, tick.exchange_ts
            current = prices.get(symbol)
            if current is not None:
                _, newest_ts, _, had_source, had_session, _ = current
                if had_source is not source and had_source is _LIVE and had_session == live:
                    continue  # a healthy socket is authoritative: a late poll answer does not replace it
                if exchange_ts is not None and newest_ts is not None and exchange_ts < newest_ts:
                    continue
            prices[symbol] = (tick.price, exchange_ts, now, source, session, now)
            taken.append(symbol)
        return taken

    def get(self, symbol: str) -> Price | None:
        row = self._prices.get(symbol)
        return None if row is None else Price._make(row)

    def live_value(self, symbol: str) -> float | None:
        """The value of `symbol`'s price while it came over the socket's current healthy
        session (age 0, so usable), else None."""
        row = self._prices.get(symbol)
        if row is None:
            return None
        value, _, _, source, session, _ = row
        socket = self._live
        return value if source is _LIVE and socket.healthy and session == socket.session else None

    def symbols(self) -> list[str]:
        return list(self._prices)

    def forget(self, symbol: str) -> None:
        self._prices.pop(symbol, None)

    def quote(self, symbol: str, now: float, since: float | None = None) -> Quote:
        """Judge `symbol` at `now`; `since` ages a symbol that never had a price."""
        row = self._prices.get(symbol)
        live, poll = self._live, self._poll
        return _judge(
            symbol,
            row,
            now,
            since,
            live.session if live.healthy else None,
            poll.session if poll.healthy else None,
            self.stale_warning,
            self.cache_timeout,
        )

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

    prices: dict[str, _Row]  # as the book stores them (`Price` fields in order)
    current: dict[PriceSource, int | None]  # each channel's session while healthy, else None
    stale_warning: float
    cache_timeout: float
    # `current`'s sessions, looked up once (by enum: see _LIVE) rather than per quote.
    _live: int | None = field(init=False, repr=False, compare=False)
    _poll: int | None = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_live", self.current.get(_LIVE))
        object.__setattr__(self, "_poll", self.current.get(_POLL))

    def symbols(self) -> list[str]:
        return list(self.prices)

    def get(self, symbol: str) -> Price | None:
        row = self.prices.get(symbol)
        return None if row is None else Price._make(row)

    def quote(self, symbol: str, now: float, since: float | None = None) -> Quote:
        row = self.prices.get(symbol)
        return _judge(
            symbol,
            row,
            now,
            since,
            self._live,
            self._poll,
            self.stale_warning,
            self.cache_timeout,
        )


# Named tuples made from their fields in order, without the Python-level __new__ their
# classes have: a quote per guarded symbol per scrape of /metrics adds up.
_new = tuple.__new__


def _judge(
    symbol: str,
    row: _Row | None,
    now: float,
    since: float | None,
    live: int | None,
    poll: int | None,
    stale_warning: float,
    cache_timeout: float,
) -> Quote:
    """A price's age, freshness and source at `now` (the rules in the module docstring);
    `live` and `poll`: each channel's session while it is healthy, else None."""
    if row is None:
        age = max(0.0, now - since) if since is not None else math.inf
        return _new(Quote, (symbol, None, age, _UNUSABLE, _NONE))
    source, session, known_at = row[3], row[4], row[5]
    is_live = source is _LIVE
    in_session = session == (live if is_live else poll)  # its channel still healthy since
    age = 0.0 if in_session and is_live else max(0.0, now - known_at)
    freshness = _freshness(age, stale_warning, cache_timeout)
    price = _new(Price, row)
    return _new(Quote, (symbol, price, age, freshness, source if in_session else _CACHE))


def _freshness(age: float, stale_warning: float, cache_timeout: float) -> Freshness:
    if age <= stale_warning:
        return _FRESH
    if age <= cache_timeout:
        return _STALE
    return _UNUSABLE
