"""The guard: positions, their prices and their exits, decided exactly once.

Pure: every call takes `now` (monotonic seconds) and, where a record needs
it, `wall` (epoch seconds); every decision comes back as an event for the
adapter to journal, send and log. A position has at most one exit in flight:
asking again returns that exit.

Most ticks change nothing: a guarded price moves between its stop and its
target. Each guarded symbol keeps the open interval of prices that provably
change nothing (`_Guarded.calm`), recomputed whenever its position or its
blind state changes, so `due` can leave a tick's full evaluation out at the
cost of a dict lookup and a comparison.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from collections.abc import Iterable
from dataclasses import dataclass

from tickguard.core.backoff import Exponential
from tickguard.core.exits import Exit, ExitState
from tickguard.core.positions import (
    ExitReason,
    Position,
    PositionState,
    Side,
    Trigger,
    check_triggers,
)
from tickguard.core.prices import PriceBook, PriceSource, Quote

# After the broker refuses an automatic exit, the rule that fired it is
# re-armed after 1 s, 2 s, 4 s, ... up to 60 s; a manual close is never held.
REJECT_HOLD = Exponential(initial=1.0, cap=60.0)


class BlindPolicy(enum.Enum):
    HOLD = "hold"  # raise a flag for health and metrics
    CLOSE = "close"  # decide one exit with reason `blind`


@dataclass(frozen=True, slots=True)
class ExitDecided:
    """A new exit: journal it, then send it."""

    exit: Exit
    position: Position
    trigger: Trigger | None  # None for blind and manual exits
    quote: Quote  # the price judged when it was decided


@dataclass(frozen=True, slots=True)
class BlindChanged:
    """A symbol became blind (no usable price for blind_after, market open) or saw again."""

    symbol: str
    blind: bool
    quote: Quote


@dataclass(frozen=True, slots=True)
class HeldForOpen:
    """A rule was crossed while the market is closed: no order (docs/config.md, market hours). Said once per
    position per closed spell; the position stays armed and is judged again on the
    first usable price received after the open."""

    position: Position
    trigger: Trigger
    quote: Quote


Event = ExitDecided | BlindChanged | HeldForOpen


@dataclass(frozen=True, slots=True)
class CloseRequest:
    """The answer to a close request: the exit in flight, and whether this call created it."""

    exit: Exit
    created: bool
    event: ExitDecided | None


class PositionExists(ValueError):
    def __init__(self, position: Position) -> None:
        super().__init__(position.symbol)
        self.position = position

    def __str__(self) -> str:
        return f"{self.position.symbol} already has a {self.position.state.value} position"


@dataclass(frozen=True, slots=True)
class GuardView:
    """The guarded positions and what the guard knows of each symbol (`Guard.view()`)."""

    positions: dict[str, Position]  # by symbol: open and exiting
    since: dict[str, float]  # monotonic: when each symbol began to be guarded
    blind: frozenset[str]
    held_for_open: tuple[str, ...]  # crossed while the market is closed (sorted)


_ANY_PRICE = (-math.inf, math.inf)
_NO_PRICE = (math.inf, -math.inf)


def _calm(position: Position, blind_clear: bool) -> tuple[float, float]:
    """(low, high): a usable price p with low < p < high changes nothing when `position` is
    evaluated on it, and yields no event (see `Guard._evaluate`).

    - A blind flag to clear, or a blind clock running, could change: no price is calm.
    - Exiting: only the blind state is looked at, and a usable price leaves it be.
    - Open: p must cross no rule (`check_triggers`: a stop fires at p <= level for a
      long, a target at p >= level), and must not move the trailing anchor
      (`Position.ratchet`: p > anchor for a long; p == anchor leaves it, so the
      bound is the next double above it), which a first price always sets.
      Held after a refusal or not, such a price changes nothing. Short is mirrored.
    """
    if not blind_clear:
        return _NO_PRICE
    if position.state is not PositionState.OPEN:
        return _ANY_PRICE
    spec = position.spec
    long = position.side is Side.LONG
    stops: list[float] = [] if spec.stop_loss is None else [spec.stop_loss]
    limits: list[float] = [] if spec.take_profit is None else [spec.take_profit]
    trail = position.trailing_level()
    if trail is not None:
        if position.trail_anchor is None:
            return _NO_PRICE
        stops.append(trail)
        limits.append(math.nextafter(position.trail_anchor, math.inf if long else -math.inf))
    if long:
        return max(stops, default=-math.inf), min(limits, default=math.inf)
    return max(limits, default=-math.inf), min(stops, default=math.inf)


class _Guarded:
    """A guarded position and what the guard knows of its symbol.

    `calm` follows `position`, `unusable_since` and `blind`: assigning any of
    them recomputes it (positions are immutable, so every change is one).
    """

    __slots__ = (
        "_blind",
        "_position",
        "_unusable_since",
        "calm",
        "held",
        "hold_until",
        "since",
        "symbol",
    )

    def __init__(self, position: Position, since: float) -> None:
        self.symbol = position.symbol  # a guarded entry's symbol never changes
        self.since = since  # monotonic: when guarding began (ages a symbol without a price)
        self.hold_until = 0.0  # no automatic exit before this (after a refusal)
        self.held = False  # a crossing was held for the open in this closed spell (said once)
        self._unusable_since: float | None = None  # market-open moment first seen unusable
        self._blind = False
        self._position = position
        self.calm = _calm(position, True)

    @property
    def position(self) -> Position:
        return self._position

    @position.setter
    def position(self, position: Position) -> None:
        if position is not self._position:  # ratchet() gives the same one when nothing moved
            self._position = position
            self.calm = _calm(position, self._blind_clear())

    @property
    def unusable_since(self) -> float | None:
        return self._unusable_since

    @unusable_since.setter
    def unusable_since(self, moment: float | None) -> None:
        if moment != self._unusable_since:
            self._unusable_since = moment
            self.calm = _calm(self._position, self._blind_clear())

    @property
    def blind(self) -> bool:
        return self._blind

    @blind.setter
    def blind(self, blind: bool) -> None:
        if blind != self._blind:
            self._blind = blind
            self.calm = _calm(self._position, self._blind_clear())

    def _blind_clear(self) -> bool:
        return self._unusable_since is None and not self._blind


class Guard:
    """Positions being guarded (open or exiting), at most one per symbol."""

    def __init__(
        self,
        book: PriceBook,
        *,
        blind_policy: BlindPolicy,
        blind_after: float,
        install_id: str,
    ) -> None:
        self.book = book
        self.blind_policy = blind_policy
        self.blind_after = blind_after
        self.install_id = install_id
        self._guarded: dict[str, _Guarded] = {}
        self._exits: dict[str, Exit] = {}  # in flight, by client order id
        self._market_open_since: float | None = None
        # When the market was seen to open after being seen closed: prices received
        # before it are the closed market's and never fire a rule after the open.
        self._seen_closed = False
        self._opened_at: float | None = None

    # -- positions ------------------------------------------------------

    def add(self, position: Position, now: float, exit: Exit | None = None) -> None:
        """Guard `position` (new, or recovered with its unfinished `exit`)."""
        current = self._guarded.get(position.symbol)
        if current is not None:
            raise PositionExists(current.position)
        if position.state is PositionState.CLOSED:
            raise ValueError(f"position {position.id} is closed")
        if (exit is not None) != (position.state is PositionState.EXITING):
            raise ValueError(f"position {position.id}: exiting iff an exit is given")
        if exit is not None:
            if not exit.state.in_flight or exit.client_order_id != position.exit_id:
                raise ValueError(f"exit {exit.client_order_id} is not in flight for {position.id}")
            self._exits[exit.client_order_id] = exit
        self._guarded[position.symbol] = _Guarded(position, now)

    def remove(self, symbol: str) -> Position:
        """Stop guarding an open position (no order). KeyError if none; ValueError if exiting."""
        guarded = self._guarded[symbol]
        if guarded.position.state is not PositionState.OPEN:
            raise ValueError(f"{symbol} is {guarded.position.state.value}")
        del self._guarded[symbol]
        return guarded.position

    def position(self, symbol: str) -> Position | None:
        guarded = self._guarded.get(symbol)
        return guarded.position if guarded else None

    def positions(self) -> list[Position]:
        return [g.position for g in self._guarded.values()]

    def symbols(self) -> list[str]:
        return list(self._guarded)

    def quote(self, symbol: str, now: float) -> Quote:
        guarded = self._guarded.get(symbol)
        return self.book.quote(symbol, now, since=guarded.since if guarded else None)

    def is_blind(self, symbol: str) -> bool:
        guarded = self._guarded.get(symbol)
        return guarded is not None and guarded.blind

    def held_for_open(self) -> list[str]:
        """Symbols whose crossed rule waits for the market to open (sorted)."""
        return sorted(s for s, g in self._guarded.items() if g.held)

    def view(self) -> GuardView:
        """A frozen copy of what readers off the guard loop may see (the API, the metrics)."""
        guarded = self._guarded.items()
        return GuardView(  # the fields, not their properties: one per guarded symbol each
            positions={s: g._position for s, g in guarded},
            since={s: g.since for s, g in guarded},
            blind=frozenset(s for s, g in guarded if g._blind),
            held_for_open=tuple(self.held_for_open()),
        )

    # -- evaluation -----------------------------------------------------

    def evaluate(self, symbol: str, now: float, wall: float, market_open: bool) -> list[Event]:
        """Evaluate one symbol's position (on its tick) against the best usable price."""
        guarded = self._guarded.get(symbol)
        if guarded is None:
            return []
        self._note_market(now, market_open)
        return self._evaluate(guarded, now, wall, market_open)

    def due(self, symbols: Iterable[str]) -> list[str] | None:
        """Of `symbols`, whose prices just changed in the book, those to `evaluate`; None if
        none is guarded (then evaluating them all would do nothing at all).

        Left out: unguarded symbols, and guarded ones whose price is live from the
        socket's current session (so usable at any moment) and calm (`_calm`):
        evaluating them would change nothing and yield no event. When any symbol is
        guarded the caller still tells the guard what it sees of the market
        (`note_market`), as evaluating it would. A dict lookup per symbol (in C), a
        method call and a comparison per guarded one.
        """
        # The guarded ones, in order, found by a loop in C (most symbols are not guarded).
        found = [*filter(None, map(self._guarded.get, symbols))]
        if not found:
            return None
        live_value = self.book.live_value
        due: list[str] = []
        for g in found:
            low, high = g.calm
            value = live_value(g.symbol)
            if value is None or not low < value < high:
                due.append(g.symbol)
        return due

    def note_market(self, now: float, market_open: bool) -> None:
        """What evaluating any position tells the guard of the market (`due`'s caller)."""
        self._note_market(now, market_open)

    def sweep(self, now: float, wall: float, market_open: bool) -> list[Event]:
        """Evaluate every position (the periodic sweep), as prices age.

        A position whose price is live (age 0 while the socket's session lasts)
        and calm is left out, as `due` leaves it out: evaluating it would change
        nothing, now or at any later moment of that session.
        """
        self._note_market(now, market_open)
        live_value = self.book.live_value
        events: list[Event] = []
        for guarded in list(self._guarded.values()):
            low, high = guarded.calm
            value = live_value(guarded.symbol)
            if value is not None and low < value < high:
                continue
            events.extend(self._evaluate(guarded, now, wall, market_open))
        return events

    def _note_market(self, now: float, market_open: bool) -> None:
        if not market_open:
            self._seen_closed = True
            self._market_open_since = None
        elif self._market_open_since is None:
            self._market_open_since = now
            if self._seen_closed:
                self._opened_at = now
            for guarded in self._guarded.values():
                guarded.held = False

    def _evaluate(
        self, guarded: _Guarded, now: float, wall: float, market_open: bool
    ) -> list[Event]:
        quote = self.book.quote(guarded.position.symbol, now, since=guarded.since)
        events: list[Event] = list(self._track_blind(guarded, quote, now, market_open))
        position = guarded.position
        if position.state is not PositionState.OPEN or now < guarded.hold_until:
            return events
        if quote.price is None or not quote.usable:
            if guarded.blind and self.blind_policy is BlindPolicy.CLOSE:
                blind_exit = self._decide(
                    guarded, ExitReason.BLIND, PriceSource.NONE, None, quote, wall
                )
                events.append(blind_exit)
            return events
        position = guarded.position = position.ratchet(quote.price.value)
        trigger = check_triggers(position, quote.price.value)
        if trigger is None:
            return events
        if not market_open:  # the broker would refuse it, or fill it at the open at any price
            if not guarded.held:
                guarded.held = True
                events.append(HeldForOpen(position, trigger, quote))
            return events
        if self._opened_at is not None and now - quote.age < self._opened_at:
            return events  # a price from before the open: wait for one received after it
        events.append(self._decide(guarded, trigger.reason, quote.source, trigger, quote, wall))
        return events

    def _track_blind(
        self, guarded: _Guarded, quote: Quote, now: float, market_open: bool
    ) -> Iterable[BlindChanged]:
        if quote.usable or not market_open:
            guarded.unusable_since = None
        elif guarded.unusable_since is None:
            # blind_after counts from the moment it became unusable, market-open time only.
            became = now - max(0.0, quote.age - self.book.cache_timeout)
            if quote.price is None:
                became = guarded.since
            opened = self._market_open_since if self._market_open_since is not None else now
            guarded.unusable_since = max(became, opened)
        blind = (
            guarded.unusable_since is not None and now - guarded.unusable_since >= self.blind_after
        )
        if blind != guarded.blind:
            guarded.blind = blind
            yield BlindChanged(guarded.position.symbol, blind, quote)

    # -- exits ----------------------------------------------------------

    def _decide(
        self,
        guarded: _Guarded,
        reason: ExitReason,
        source: PriceSource,
        trigger: Trigger | None,
        quote: Quote,
        wall: float,
    ) -> ExitDecided:
        position = guarded.position
        seq = position.exit_seq + 1
        client_order_id = f"tg-{self.install_id}-{position.id}-{seq}"
        exit = Exit(
            client_order_id=client_order_id,
            position_id=position.id,
            symbol=position.symbol,
            side=position.side,
            quantity=position.spec.quantity,
            reason=reason,
            price_source=source,
            trigger_price=quote.price.value if quote.price is not None else None,
            decided_at=wall,
        )
        guarded.position = dataclasses.replace(
            position, state=PositionState.EXITING, exit_seq=seq, exit_id=client_order_id
        )
        self._exits[client_order_id] = exit
        return ExitDecided(exit, guarded.position, trigger, quote)

    def close(self, symbol: str, reason: ExitReason, now: float, wall: float) -> CloseRequest:
        """A manual close: the exit in flight if there is one, else a new one. KeyError if none."""
        guarded = self._guarded[symbol]
        position = guarded.position
        if position.state is PositionState.EXITING:
            assert position.exit_id is not None
            return CloseRequest(self._exits[position.exit_id], False, None)
        quote = self.book.quote(symbol, now, since=guarded.since)
        event = self._decide(guarded, reason, PriceSource.MANUAL, None, quote, wall)
        return CloseRequest(event.exit, True, event)

    def exit(self, client_order_id: str) -> Exit | None:
        return self._exits.get(client_order_id)

    def exits_in_flight(self) -> list[Exit]:
        return list(self._exits.values())

    def due_retries(self, now: float) -> list[Exit]:
        return [e for e in self._exits.values() if e.due(now)]

    def exit_resized(self, client_order_id: str, quantity: float) -> tuple[Exit, Position]:
        """Size an exit down to the account's holding before it is sent: the position is
        that holding now, so a full fill of the exit closes it."""
        exit = self._exits[client_order_id] = self._exits[client_order_id].resized(quantity)
        guarded = self._guarded[exit.symbol]
        spec = dataclasses.replace(guarded.position.spec, quantity=quantity)
        guarded.position = dataclasses.replace(guarded.position, spec=spec)
        return exit, guarded.position

    def exit_cancelled(
        self, client_order_id: str, detail: str, now: float
    ) -> tuple[Exit, Position]:
        """Not sent: the account holds nothing on its side. The position is open and guarded
        again, its rules held for a while as after a refusal (reconciliation decides the rest)."""
        exit = self._exits.pop(client_order_id).cancelled(detail)
        return exit, self._reopen(exit, now)

    # -- the account (docs/account.md) -------------------------------------------

    def account_update(
        self, symbol: str, quantity: float, entry_price: float | None, *, confirmed: bool
    ) -> Position:
        """An open position resized (and re-priced, when it grew) to the broker's holding."""
        guarded = self._open(symbol)
        position = guarded.position
        spec = dataclasses.replace(
            position.spec,
            quantity=quantity,
            entry_price=entry_price if entry_price is not None else position.spec.entry_price,
        )
        guarded.position = dataclasses.replace(position, spec=spec, confirmed=confirmed)
        return guarded.position

    def close_external(self, symbol: str) -> Position:
        """An open position closed outside tickguard: no longer guarded, no order."""
        position = self._open(symbol).position
        del self._guarded[symbol]
        return dataclasses.replace(position, state=PositionState.CLOSED)

    def _open(self, symbol: str) -> _Guarded:
        guarded = self._guarded[symbol]
        if guarded.position.state is not PositionState.OPEN:
            raise ValueError(f"{symbol} is {guarded.position.state.value}")
        return guarded

    def exit_recovered(self, client_order_id: str) -> Exit:
        """Resume an exit after a crash (see `Exit.recovered`): it is looked up before any send."""
        exit = self._exits[client_order_id] = self._exits[client_order_id].recovered()
        return exit

    def exit_sending(self, client_order_id: str) -> Exit:
        exit = self._exits[client_order_id] = self._exits[client_order_id].sending()
        return exit

    def exit_unavailable(self, client_order_id: str, detail: str, now: float) -> Exit:
        exit = self._exits[client_order_id].unavailable(detail, now)
        self._exits[client_order_id] = exit
        return exit

    def exit_filled(
        self,
        client_order_id: str,
        price: float,
        broker_order_id: str,
        quantity: float | None = None,
    ) -> tuple[Exit, Position]:
        """The broker filled the exit (`quantity` of it when partly). What is left of the
        position stays guarded, open, and is exited again by the next evaluation (a new
        client order id); with nothing left it is closed and no longer guarded."""
        exit = self._exits.pop(client_order_id).filled(price, broker_order_id, quantity)
        guarded = self._guarded[exit.symbol]
        assert exit.filled_quantity is not None
        left = round(guarded.position.spec.quantity - exit.filled_quantity, 8)
        if left <= 0:
            del self._guarded[exit.symbol]
            return exit, dataclasses.replace(guarded.position, state=PositionState.CLOSED)
        spec = dataclasses.replace(guarded.position.spec, quantity=left)
        guarded.position = dataclasses.replace(
            guarded.position, spec=spec, state=PositionState.OPEN, exit_id=None
        )
        return exit, guarded.position

    def exit_rejected(self, client_order_id: str, detail: str, now: float) -> tuple[Exit, Position]:
        """The broker refused: no order exists, the position is open and guarded again.

        Automatic rules are held for a growing while so a refusing broker is
        not asked again on every tick.
        """
        exit = self._exits.pop(client_order_id).rejected(detail)
        return exit, self._reopen(exit, now)

    def _reopen(self, exit: Exit, now: float) -> Position:
        guarded = self._guarded[exit.symbol]
        guarded.position = dataclasses.replace(
            guarded.position, state=PositionState.OPEN, exit_id=None
        )
        guarded.hold_until = now + REJECT_HOLD.delay(guarded.position.exit_seq)
        return guarded.position


__all__ = [
    "BlindChanged",
    "BlindPolicy",
    "CloseRequest",
    "Event",
    "ExitDecided",
    "ExitState",
    "Guard",
    "GuardView",
    "HeldForOpen",
    "PositionExists",
]
