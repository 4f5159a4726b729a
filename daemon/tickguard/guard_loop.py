"""The guard loop: the pure guard wired to the clock, the store, the executor and the logs.

Prices are evaluated the moment they arrive (an exit never waits for the
sweep) and again by the sweep every guard.sweep_interval, so positions are
re-judged as prices age even when nothing arrives. Every decision is logged
with the prefixes of docs/logs.md and journalled before it is sent.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Coroutine, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from tickguard.core.account import Reconciled, Verdict
from tickguard.core.exits import Exit, ExitState
from tickguard.core.guard import BlindChanged, Event, ExitDecided, Guard, HeldForOpen
from tickguard.core.market import MarketCalendar
from tickguard.core.positions import ExitReason, Position, PositionSpec, PositionState
from tickguard.core.prices import Freshness, PriceSource, Quote
from tickguard.errors import StoreError
from tickguard.executor import ExitExecutor, recover
from tickguard.log_limit import Burst
from tickguard.metrics import Metrics
from tickguard.status import (
    AccountStatus,
    DnsStatus,
    FeedStatus,
    HaStatus,
    PollStatus,
    SafetyNetStatus,
    Snapshot,
)
from tickguard.store import AsyncStore, Store, as_async

log = logging.getLogger(__name__)

REPEAT_EVERY = 30.0  # a lasting condition is logged again at most this often per symbol
FALLBACK_LINES = 50  # [FALLBACK] lines naming a symbol per sweep; the rest are summed up
LIVE_AGAIN = "live"  # the kind of a "live price again" line, in a sweep's Burst
TRAIL_SAVE_EVERY = 1.0  # changed trailing anchors reach the store at least this often


class Throttle:
    """Start/change/end/repeat logging of lasting conditions, per key."""

    def __init__(self, every: float = REPEAT_EVERY) -> None:
        self.every = every
        self._logged: dict[str, tuple[str, float]] = {}

    def due(self, key: str, state: str, now: float) -> bool:
        """True when the condition starts or changes, or has lasted another `every`."""
        last = self._logged.get(key)
        if last is None or last[0] != state or now - last[1] >= self.every:
            self._logged[key] = (state, now)
            return True
        return False

    def end(self, key: str) -> bool:
        """True if the condition was on (log its end)."""
        return self._logged.pop(key, None) is not None

    def __contains__(self, key: str) -> bool:
        """The condition is on for `key` (it was logged, and its end was not)."""
        return key in self._logged


@dataclass(frozen=True, slots=True)
class CloseOutcome:
    """How a manual close went, for the API."""

    exit: Exit
    position: Position
    created: bool  # False: the exit was already in flight (or done)


class GuardLoop:
    def __init__(
        self,
        guard: Guard,
        store: Store | AsyncStore,
        executor: ExitExecutor,
        metrics: Metrics,
        market: MarketCalendar,
        *,
        sweep_interval: float,
        monotonic: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.guard = guard
        self.store = as_async(store)
        self.executor = executor
        self.metrics = metrics
        self.market = market
        self.sweep_interval = sweep_interval
        self._mono = monotonic
        self._wall = wall
        self.sweeps = 0  # progress counter: the watchdog pings only when it moves
        self.last_sweep_at: float | None = None
        self.market_open = False  # as of the last price or sweep (see _market_at)
        self._market_checked = math.inf  # wall time market_open was computed at...
        self._market_until = -math.inf  # ...and the next open or close after it
        self._fallback_log = Throttle()
        self._blind_log = Throttle()
        self._saved_anchors: dict[int, float | None] = {}  # of guarded positions only
        self.held_back: list[str] = []  # config positions not armed: the store was lost
        # Told of every position registered (the paper broker records its entry as filled).
        self.on_registered: Callable[[PositionSpec], None] | None = None
        self._last_trail_save = 0.0
        # Set when guarding can no longer be trusted (the journal cannot be written):
        # the daemon then exits 1 and systemd restarts it from what the store holds.
        self.fatal = asyncio.Event()
        # Whether prices and sweeps may decide exits: False on a standby, and while one takes
        # over until the account is reconciled (docs/ha.md); always True on a lone instance.
        self.guarding = True
        executor.on_journal_failure = lambda exit, exc: self.fatal.set()

    # -- positions ------------------------------------------------------

    async def recover(
        self,
        config_positions: Iterable[PositionSpec],
        *,
        rearm: bool = False,
        settle: float = 0.0,
    ) -> None:
        """Load positions from the store (resuming unfinished exits), then the config's new ones.

        A config position is armed only if the store never held its symbol. When
        the store was lost (`Store.lost`), "never held" cannot be trusted: one of
        them may have exited already, and arming it again would sell it twice.
        They are then held back unless the operator said `rearm`. `settle`: an exit in
        flight is looked up only once this long has passed since its last journal write
        (a takeover: the previous leader's order may still be on its way, docs/ha.md).
        """
        now = self._mono()
        recovered = await recover(self.guard, self.store, self.executor, now, settle)
        for position in recovered:
            self._saved_anchors[position.id] = position.trail_anchor
            log.info("[GUARD] recovered %s", describe(position))
            if self.on_registered is not None and not position.confirmed:
                # Registered, never shown held: the paper account may have missed its
                # entry (a crash between the two commits). Idempotent for a real holding.
                self.on_registered(position.spec)
        new = [s for s in config_positions if await self.store.latest_position(s.symbol) is None]
        if new and self.store.lost is not None and not rearm:
            self.held_back = [s.symbol for s in new]
            log.critical(
                "[GUARD] the state store was lost (%s): the config's positions %s are NOT armed,"
                " since they may have exited already. Check the account, then register them"
                " through the API, or start once with `tickguard run --rearm`.",
                self.store.lost,
                ", ".join(self.held_back),
            )
            new = []
        for spec in new:
            await self.add(spec, source="config")
        self._gauges()

    async def add(self, spec: PositionSpec, *, source: str) -> Position:
        """Guard a new position (StoreError if its symbol already has an active one)."""
        origin = source if source in ("config", "broker") else "api"
        position = await self.store.add_position(spec, self._wall(), origin)
        self.guard.add(position, self._mono())
        if self.on_registered is not None:
            self.on_registered(spec)
        self._saved_anchors[position.id] = None
        await self.audit("add_position", {"source": source, **spec_dict(spec)})
        log.info("[GUARD] guarding %s (%s)", describe(position), source)
        self._gauges()
        self.evaluate([spec.symbol])
        return position

    async def remove(self, symbol: str, *, source: str) -> Position:
        """Stop guarding an open position without an order. KeyError / ValueError as Guard.remove."""
        position = self.guard.remove(symbol)
        await self.store.delete_position(position, self._wall())
        await self.audit("remove_position", {"source": source, "symbol": symbol})
        log.info("[GUARD] stopped guarding %s (%s); no order sent", symbol, source)
        self._gauges()
        return position

    async def audit(self, action: str, detail: Mapping[str, object]) -> None:
        """Record a mutating call in the audit log, best effort: a store that cannot take
        the entry (a full disk) never stops the action itself, least of all a close."""
        try:
            await self.store.audit(action, detail, self._wall())
        except StoreError as exc:
            log.error("[GUARD] %s not written to the audit log: %s", action, exc)

    # -- the account (docs/account.md) -------------------------------------------

    async def apply_account(self, symbol: str, verdict: Reconciled, broker_quantity: float) -> None:
        """Act on what the broker holds for one open position: close it as external (no
        order), or guard the broker's quantity.

        The guard changes first, then the journal: a store that yields (PostgreSQL) must
        not leave an exit to be decided meanwhile on a position closed outside. A journal
        that cannot be written stops the daemon (the store's state is then the truth,
        reconciled again at the next start)."""
        position = self.guard.position(symbol)
        if position is None or position.state is not PositionState.OPEN:
            return
        wall = self._wall()
        if verdict.verdict in (Verdict.EXTERNAL, Verdict.NEVER_HELD):
            held = f"broker holds {broker_quantity:g}"
            if verdict.verdict is Verdict.NEVER_HELD:
                held = f"never held by the broker (checked for {wall - position.created_at:.0f}s)"
            closed = self.guard.close_external(symbol)
            await self._journalled(self.store.close_external(closed, broker_quantity, held, wall))
            self.metrics.external_closes.inc()
            log.warning("[ACCOUNT] %s closed outside tickguard: %s", symbol, held)
            self._gauges()
            return
        if verdict.verdict is Verdict.UNCONFIRMED:
            return
        quantity = verdict.quantity
        changed = quantity != position.spec.quantity or not position.confirmed
        if not changed:
            return
        updated = self.guard.account_update(symbol, quantity, verdict.entry_price, confirmed=True)
        await self._journalled(self.store.save_positions([updated], wall))
        if quantity != position.spec.quantity:
            log.warning(
                "[ACCOUNT] %s: the broker holds %g, tickguard guarded %g: guarding %g%s",
                symbol,
                broker_quantity,
                position.spec.quantity,
                quantity,
                f" at {updated.spec.entry_price:g}" if verdict.verdict is Verdict.GROW else "",
            )

    async def _journalled(self, write: Coroutine[Any, Any, None]) -> None:
        try:
            await write
        except StoreError as exc:
            log.critical("[GUARD] cannot write the state store: %s; stopping", exc)
            self.fatal.set()
            raise

    def close(self, symbol: str, reason: ExitReason) -> CloseOutcome:
        """Start (or find) the manual exit of `symbol`. KeyError if it is not guarded."""
        request = self.guard.close(symbol, reason, self._mono(), self._wall())
        position = self.guard.position(symbol)
        assert position is not None
        if request.event is not None:
            self._decided(request.event)
        return CloseOutcome(request.exit, position, request.created)

    # -- evaluation -----------------------------------------------------

    def on_prices(self, symbols: list[str], source: PriceSource) -> None:
        if not self.guarding:
            return
        """New prices arrived: judge now the positions they may change.

        `Guard.due` leaves out the unguarded symbols, and the guarded ones whose
        new price provably changes nothing (live, between the position's stops and
        targets): a batch of those costs a dict lookup per tick and no clock read.
        """
        due = self.guard.due(symbols)
        if due is None:
            return
        now, wall = self._mono(), self._wall()
        market_open = self._market_at(wall)
        self.guard.note_market(now, market_open)  # as evaluating any of them would
        for symbol in due:
            self._handle(self.guard.evaluate(symbol, now, wall, market_open))

    def evaluate(self, symbols: Iterable[str]) -> None:
        if not self.guarding:
            return
        now, wall = self._mono(), self._wall()
        market_open = self._market_at(wall)
        for symbol in symbols:
            self._handle(self.guard.evaluate(symbol, now, wall, market_open))

    def _market_at(self, wall: float) -> bool:
        """Whether the market is open at `wall`: exact on every tick, not only at the sweep
        (a tick at 15:30:00 must not send an order), and O(1) between open/close changes."""
        if not self._market_checked <= wall < self._market_until:
            at = datetime.fromtimestamp(wall, UTC)
            self.market_open = self.market.is_open(at)
            change = self.market.next_change(at)
            self._market_checked = wall
            self._market_until = change.timestamp() if change is not None else math.inf
        return self.market_open

    async def sweep(self) -> None:
        """Judge every position; refresh gauges; log lasting fallback conditions.

        First the store is checked: a database that vanished or was emptied
        under us would silently lose every later journal write, so guarding
        stops (exit 1, systemd restarts us) rather than go on without it.
        """
        try:
            await self.store.check()
        except StoreError as exc:
            log.critical("[GUARD] %s: stopping, so nothing is decided without a journal", exc)
            self.fatal.set()
            return
        now, wall = self._mono(), self._wall()
        market_open = self._market_at(wall)
        self.metrics.market_open.set(1 if market_open else 0)
        if self.guarding:
            self._handle(self.guard.sweep(now, wall, market_open))
        self._log_fallbacks(now)
        self._gauges()
        self.sweeps += 1
        self.last_sweep_at = now
        await self._save_anchors(now)

    def snapshot(
        self,
        *,
        feed: FeedStatus,
        dns: DnsStatus,
        poll: PollStatus | None,
        account: AccountStatus,
        safety_net: SafetyNetStatus | None = None,
        ha: HaStatus | None = None,
    ) -> Snapshot:
        """The daemon as it is now, with the adapters' own status: what the API, the STATUS
        line and the age collector read. Two dict copies; the objects in them are frozen."""
        now, wall = self._mono(), self._wall()
        market_open = self._market_at(wall)
        until = self._market_until
        return Snapshot(
            taken_at=now,
            wall=wall,
            prices=self.guard.book.view(),
            guard=self.guard.view(),
            exits=self.executor.status(),
            feed=feed,
            dns=dns,
            poll=poll,
            account=account,
            market_open=market_open,
            next_market_change=datetime.fromtimestamp(until, UTC) if until < math.inf else None,
            tz=self.market.tz,
            held_back=tuple(self.held_back),
            sweeps=self.sweeps,
            sweep_interval=self.sweep_interval,
            last_sweep_at=self.last_sweep_at,
            safety_net=safety_net,
            ha=ha,
        )

    async def run(self) -> None:
        """The sweep loop, forever."""
        while True:
            await self.sweep()
            await asyncio.sleep(self.sweep_interval)

    def _handle(self, events: list[Event]) -> None:
        for event in events:
            if isinstance(event, ExitDecided):
                self._decided(event)
            elif isinstance(event, BlindChanged):
                self._blind(event)
            elif isinstance(event, HeldForOpen):
                log.warning(
                    "[%s] %s: %s%s; market closed: held until the open",
                    event.trigger.log_tag,
                    event.position.symbol,
                    event.trigger.describe(event.position.side),
                    _fallback_note(event.quote),
                )

    def _decided(self, event: ExitDecided) -> None:
        exit, quote = event.exit, event.quote
        if event.trigger is not None:
            log.warning(
                "[%s] %s: %s%s",
                event.trigger.log_tag,
                exit.symbol,
                event.trigger.describe(exit.side),
                _fallback_note(quote),
            )
        elif exit.reason is ExitReason.BLIND:
            log.warning(
                "[BLIND] %s: no usable price for %.0fs with the market open; closing (blind_policy=close)",
                exit.symbol,
                quote.age,
            )
        else:
            log.warning("[EXIT] %s: manual close requested (%s)", exit.symbol, exit.reason.value)
        # Journalled (durably) before it is sent; an exit the journal cannot hold is never
        # sent, and `fatal` is set (the executor's on_journal_failure).
        self.executor.submit(event)

    def on_sent(self, exit: Exit) -> None:
        """An exit handed to the broker for the first time (the executor's hook): counted in
        tickguard_exits_total, which counts exits sent (one cancelled before it, is not)."""
        self.metrics.exits.labels(exit.reason.value, exit.price_source.value).inc()

    def _blind(self, event: BlindChanged) -> None:
        if event.blind:
            log.warning(
                "[BLIND] %s: no usable price for %.0fs with the market open; policy %s",
                event.symbol,
                event.quote.age,
                self.guard.blind_policy.value,
            )
        else:
            log.info("[BLIND] %s: usable price again", event.symbol)

    def _log_fallbacks(self, now: float) -> None:
        """The sweep's `[FALLBACK]` lines: per guarded symbol, a price used that is not live
        (at the start, on a change of kind, every REPEAT_EVERY) and the live price again.

        At most FALLBACK_LINES of them per sweep name their symbol; the others are
        counted, and one summary line per kind, with the same prefix, says how many
        more symbols (each is in `tickguard status` and the connection-health
        document). A socket drop with 1,000 guarded positions wrote 1,000 lines in
        one sweep, on the event loop, while a stop might be waiting to be judged.
        Moving the writes to a QueueHandler thread was the other candidate:
        measured (benchmarks/fallback_burst.py), that sweep took 35 ms with direct
        writes and 53 ms with the queue (its thread takes the GIL for every record
        it formats), against 12 ms with no line at all; the cap keeps it within a few
        ms of that, and the journal gets 51 lines instead of 1,000 (a user with at
        most 50 positions still sees every symbol named).
        """
        burst = Burst(FALLBACK_LINES)
        logged, live_value = self._fallback_log, self.guard.book.live_value
        for symbol in self.guard.symbols():
            if symbol not in logged and live_value(symbol) is not None:
                continue  # live, and never said otherwise: nothing to say (most, most sweeps)
            quote = self.guard.quote(symbol, now)
            if quote.price is not None and quote.usable and quote.source is not PriceSource.LIVE:
                kind = "stale" if quote.freshness is Freshness.STALE else quote.source.value
                if self._fallback_log.due(symbol, kind, now) and burst.take(kind):
                    log.warning(
                        "[FALLBACK] Using %s price for %s: %.2f (%.0fs old)",
                        kind,
                        symbol,
                        quote.price.value,
                        quote.age,
                    )
            elif (
                self._fallback_log.end(symbol)
                and quote.source is PriceSource.LIVE
                and burst.take(LIVE_AGAIN)
            ):
                log.info("[FALLBACK] %s: live price again", symbol)
        for kind, more in burst.more.items():
            if kind == LIVE_AGAIN:
                log.info("[FALLBACK] %d more symbols: live price again", more)
            else:
                log.warning(
                    "[FALLBACK] Using %s price for %d more symbols (see tickguard status)",
                    kind,
                    more,
                )

    # -- exits settling (the executor's listener) -----------------------

    def on_exit(self, exit: Exit, position: Position | None, elapsed: float | None) -> None:
        if elapsed is not None:
            self.metrics.order_seconds.observe(elapsed)
        if exit.state is ExitState.REJECTED:
            self.metrics.exit_failures.labels("rejected").inc()
        elif exit.state is ExitState.RETRY:
            why = "timeout" if "timed out" in exit.detail else "unavailable"
            self.metrics.exit_failures.labels(why).inc()
        self._gauges()

    # -- helpers ----------------------------------------------------------

    def _gauges(self) -> None:
        self.metrics.open_positions.set(len(self.guard.positions()))

    async def _save_anchors(self, now: float) -> None:
        if now - self._last_trail_save < TRAIL_SAVE_EVERY:
            return
        self._last_trail_save = now
        changed = [
            p
            for p in self.guard.positions()
            if p.state is PositionState.OPEN and self._saved_anchors.get(p.id) != p.trail_anchor
        ]
        # Rebuilt, not updated: closed and removed positions drop out. Taken before the write
        # (which may yield), kept once it succeeded.
        saved = {p.id: p.trail_anchor for p in self.guard.positions()}
        if changed:
            await self.store.save_positions(changed, self._wall())
        self._saved_anchors = saved

    async def save_all(self) -> None:
        """Persist every trailing anchor now (at shutdown)."""
        self._last_trail_save = -TRAIL_SAVE_EVERY
        await self._save_anchors(self._mono())


def _fallback_note(quote: Quote) -> str:
    if quote.source is PriceSource.LIVE:
        return ""
    return f" (FALLBACK) via {quote.source.value}, {quote.age:.0f}s old"


def spec_dict(spec: PositionSpec) -> dict[str, object]:
    return {
        "symbol": spec.symbol,
        "side": spec.side.value,
        "quantity": spec.quantity,
        "entry_price": spec.entry_price,
        "stop_loss": spec.stop_loss,
        "take_profit": spec.take_profit,
        "trailing_stop": spec.trailing_stop,
    }


def describe(position: Position) -> str:
    spec = position.spec
    rules = [
        f"{name} {value:g}"
        for name, value in (
            ("SL", spec.stop_loss),
            ("TP", spec.take_profit),
            ("trail", spec.trailing_stop),
        )
        if value is not None
    ]
    return (
        f"{spec.symbol} {spec.side.value} {spec.quantity:g} @ {spec.entry_price:g}"
        f" ({', '.join(rules) or 'no rules'}) [{position.state.value}]"
    )
