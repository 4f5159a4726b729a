"""What each part of the daemon says about itself: frozen values, copied out on the guard loop.

Every adapter has a `status()` giving one of these; the guard loop gathers
them, with a copy of the price book and of the guarded positions, into one
`Snapshot`. The API, the systemd STATUS line and the price-age collector read
only snapshots, never the live objects (the API runs on its own thread: see
tickguard.http_server), and never read a counter back from the Prometheus
registry: each adapter keeps the counts it reports.

A snapshot costs copies of two dicts (prices and positions); the API's
requests share them (tickguard.control), so reading the daemon's state costs
the guard loop a bounded amount however many ask.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, tzinfo

from tickguard.core.account import Holding
from tickguard.core.exits import Exit, ExitState
from tickguard.core.guard import GuardView
from tickguard.core.positions import PositionState
from tickguard.core.prices import Freshness, PriceView, Quote


@dataclass(frozen=True, slots=True)
class FeedStatus:
    """The feed supervisor (`FeedSupervisor.status()`)."""

    state: str  # FeedState value: starting, connecting, connected, backoff, auth_failed
    connected: bool  # open and subscribed
    subscribed: int  # instruments subscribed on the open connection; while down, those it will
    reconnect_attempts: int  # since start: tickguard_websocket_reconnect_attempts_total
    network_errors: int  # since start, every kind: tickguard_websocket_network_errors_total
    streak: int  # failed attempts since the last stable connection
    last_error: str
    address: str | None  # the address connected to, or last tried
    last_frame_at: float | None  # monotonic
    connected_since: float | None  # monotonic
    fallback_active: bool  # prices come from the poll or the cache


@dataclass(frozen=True, slots=True)
class DnsStatus:
    """The resolver chain (`ResolverChain.status()`)."""

    primary_failed: bool
    last_stage: str | None  # primary, fallback, last_known_good; None before the first
    resolved_via: str | None
    last_error: str


@dataclass(frozen=True, slots=True)
class PollStatus:
    """The fallback poll (`FallbackPoller.status()`)."""

    polling: bool
    last_success_at: float | None  # monotonic
    last_error: str


@dataclass(frozen=True, slots=True)
class ExecutorStatus:
    """Exits on their way to the broker (`ExitExecutor.status()`)."""

    in_flight: tuple[Exit, ...]  # decided, not yet filled or refused
    driving: int  # exits being sent or looked up right now

    @property
    def retrying(self) -> int:
        return sum(1 for e in self.in_flight if e.state is ExitState.RETRY)


@dataclass(frozen=True, slots=True)
class AccountStatus:
    """The broker's account as last reconciled (`Reconciler.status()`)."""

    holdings: dict[str, Holding] | None  # None until the first successful read
    reconciled_at: float | None  # wall-clock epoch seconds
    last_error: str
    unguarded: tuple[Holding, ...]  # broker positions nobody guards


@dataclass(frozen=True, slots=True)
class NetStop:
    """One broker-held stop of the safety net, for health."""

    symbol: str
    stop_id: str | None  # None while its placement is unresolved
    trigger: float
    quantity: float
    state: str  # active | triggered (fired, its position still guarded) | placing


@dataclass(frozen=True, slots=True)
class SafetyNetStatus:
    """The broker-held safety net (`SafetyNet.status()`; docs/safety-net.md)."""

    margin_pct: float
    covered: int  # guarded positions with an active broker-held stop
    stops: tuple[NetStop, ...]
    failures: dict[str, int]  # by op, since start
    last_error: str


@dataclass(frozen=True, slots=True)
class HaStatus:
    """Leadership among instances sharing a store, as this one sees it (docs/ha.md)."""

    role: str  # standby | leader | lost
    me: str
    leader: str | None  # the holder the store names (this instance when it leads)
    epoch: int | None
    changes: int  # leadership changes this instance has seen

    @property
    def standby(self) -> bool:
        return self.role != "leader"


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The daemon as the guard loop saw it at `taken_at` (monotonic) / `wall`."""

    taken_at: float
    wall: float
    prices: PriceView
    guard: GuardView
    exits: ExecutorStatus
    feed: FeedStatus
    dns: DnsStatus
    poll: PollStatus | None  # None: no fallback poll configured
    account: AccountStatus
    market_open: bool
    next_market_change: datetime | None
    tz: tzinfo  # the market's: times in answers are given in it
    held_back: tuple[str, ...]  # config positions not armed: the store was lost
    sweeps: int  # guard sweeps since start: progress
    sweep_interval: float
    last_sweep_at: float | None  # monotonic
    safety_net: SafetyNetStatus | None = None  # None: [safety_net] is not enabled
    ha: HaStatus | None = None  # None: a lone instance (SQLite), which always guards

    def quote(self, symbol: str, now: float) -> Quote:
        """`symbol`'s price judged at `now`, aged from when it was guarded if it never had one."""
        return self.prices.quote(symbol, now, self.guard.since.get(symbol))

    def guarded_quotes(self, now: float) -> list[Quote]:
        return [self.quote(symbol, now) for symbol in self.guard.positions]

    def stale_symbols(self, now: float) -> list[str]:
        """Guarded symbols whose price is stale or unusable (sorted): the one definition
        behind health's `stale_symbols`, `tickguard_stale_symbols` and the STATUS line."""
        return sorted(
            q.symbol for q in self.guarded_quotes(now) if q.freshness is not Freshness.FRESH
        )

    def count(self, state: PositionState) -> int:
        return sum(1 for p in self.guard.positions.values() if p.state is state)

    def status_line(self, now: float) -> str:
        """systemd's STATUS= line: the feed, the positions, the market."""
        feed = "feed connected" if self.feed.connected else f"feed {self.feed.state}"
        if self.feed.fallback_active:
            feed += ", fallback active"
        stale = len(self.stale_symbols(now))
        line = f"{feed}; {len(self.guard.positions)} positions guarded, {stale} stale"
        if not self.market_open:
            held = len(self.guard.held_for_open)
            line += "; market closed" + (f", {held} held until the open" if held else "")
        return line
