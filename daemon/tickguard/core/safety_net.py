"""The broker-held safety net, decided without I/O: where each position's broker-held
stop belongs, and what to ask the broker next so that it gets there without
exceeding the broker's limits.

A guarded position with a stop (its stop loss, its trailing stop, or both:
the tighter one) gets one broker-held stop order that sells a long (buys back
a short) when the price reaches a level `margin_pct` beyond tickguard's own
stop, so that tickguard normally acts first. The level is rounded to the
exchange's price step away from the price: never nearer than the margin.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

from tickguard.core.positions import Position, PositionState, Side

PRICE_STEP = 0.05  # NSE equity trigger prices move in 0.05 steps


class StopState(enum.Enum):
    ACTIVE = "active"  # held by the broker, not fired
    TRIGGERED = "triggered"  # fired: the broker placed its order
    CANCELLED = "cancelled"  # cancelled (by us, or by the broker: expired)


@dataclass(frozen=True, slots=True)
class BrokerStop:
    """A stop order the broker holds for one position."""

    stop_id: str
    symbol: str
    position_side: Side  # the side it closes: a long's stop sells
    quantity: float
    trigger: float
    state: StopState = StopState.ACTIVE
    # The order it placed when it fired, when the broker says (to cancel it if it is still
    # working: a stop's limit order may not fill in a gap).
    order_id: str | None = None


def net_level(position: Position, margin_pct: float, step: float = PRICE_STEP) -> float | None:
    """Where `position`'s broker-held stop belongs; None when tickguard has no stop for it.

    Tickguard's own stop is the tighter of its stop loss and its trailing level
    (the higher for a long, the lower for a short); the broker's sits `margin_pct`
    percent beyond it, on a multiple of `step`, rounded away from the price."""
    own, trail = position.spec.stop_loss, position.trailing_level()
    long = position.side is Side.LONG
    if own is None or (trail is not None and (trail > own if long else trail < own)):
        own = trail
    if own is None:
        return None
    if long:
        steps = math.floor(round(own * (1 - margin_pct / 100) / step, 6))
    else:
        steps = math.ceil(round(own * (1 + margin_pct / 100) / step, 6))
    return round(max(steps, 1) * step, 8)


class Disarm(enum.Enum):
    """What the cancel of a position's broker-held stop, right before tickguard's own exit
    is sent, found (docs/safety-net.md)."""

    CLEAR = "clear"  # no broker-held stop can fire for it any more: send
    FIRED = "fired"  # the broker's stop fired (its order may be filling): send nothing
    UNKNOWN = "unknown"  # the broker could not be reached: the exit's normal path


class Action(enum.Enum):
    PLACE = "place"
    MOVE = "move"
    CANCEL = "cancel"


@dataclass(frozen=True, slots=True)
class Step:
    """One thing to ask the broker: place a stop, move one, or cancel one."""

    action: Action
    symbol: str
    trigger: float | None = None  # PLACE and MOVE
    quantity: float = 0.0  # PLACE and MOVE
    stop: BrokerStop | None = None  # MOVE and CANCEL


def wanted(position: Position, margin_pct: float) -> tuple[float, float] | None:
    """(trigger, quantity) of the stop `position` should have; None: it should have none
    (not open, or no stop of its own). An exiting position's stop is tickguard's to
    cancel before it sends (the executor), not the planner's."""
    if position.state is not PositionState.OPEN:
        return None
    level = net_level(position, margin_pct)
    return None if level is None else (level, position.spec.quantity)


def plan(
    positions: dict[str, Position],
    stops: dict[str, BrokerStop],
    margin_pct: float,
    moved_at: dict[str, float],
    now: float,
    move_every: float,
    memo: dict[str, tuple[Position, tuple[float, float] | None]] | None = None,
) -> list[Step]:
    """What to ask the broker so that every open position has its stop where it belongs.

    `stops`: the active broker-held stops by symbol; `moved_at`: when each symbol's
    stop was last placed or moved (monotonic). A stop is moved at most every
    `move_every` seconds, and only when its trigger or quantity changed; a stop
    whose position is gone or no longer wants one is cancelled at once. `memo` (kept by
    the caller from one plan to the next) saves working out where the stop of a position
    that is the same object as last time belongs. The order
    of the steps: cancels first (they free the broker's limits and never loosen
    protection that is still wanted), then places, then moves, the furthest first.
    A stop held on the other side than its symbol's position (left from an earlier
    position) is cancelled; the new one is placed once it is gone."""
    cancels: list[Step] = []
    places: list[Step] = []
    moves: list[Step] = []
    for symbol, held in stops.items():
        position = positions.get(symbol)
        if position is None or position.state is PositionState.CLOSED:
            cancels.append(Step(Action.CANCEL, symbol, stop=held))
    for symbol, position in positions.items():
        # Positions are frozen, replaced when they change: most are the same object as before.
        seen = memo.get(symbol) if memo is not None else None
        if seen is not None and seen[0] is position:
            want = seen[1]
        else:
            want = wanted(position, margin_pct)
            if memo is not None:
                memo[symbol] = (position, want)
        stop = stops.get(symbol)
        if want is None:
            if stop is not None and position.state is PositionState.OPEN:
                cancels.append(Step(Action.CANCEL, symbol, stop=stop))
            continue
        trigger, quantity = want
        if stop is None:
            places.append(Step(Action.PLACE, symbol, trigger, quantity))
        elif stop.position_side is not position.side:  # a stop left from an earlier position
            cancels.append(Step(Action.CANCEL, symbol, stop=stop))
        elif (stop.trigger, stop.quantity) != (trigger, quantity) and (
            now - moved_at.get(symbol, -math.inf) >= move_every
        ):
            moves.append(Step(Action.MOVE, symbol, trigger, quantity, stop))
    # When the broker's limits let only some moves go, the stops furthest behind go first.
    moves.sort(key=_lag, reverse=True)
    return cancels + places + moves


def _lag(step: Step) -> float:
    """How far a move takes its stop, relative to the price (a quantity change alone: 0)."""
    assert step.stop is not None and step.trigger is not None
    return abs(step.trigger - step.stop.trigger) / step.trigger


class RateLimit:
    """A token bucket: at most `burst` calls at once, refilled at `per_second`.

    Keeps the safety net's calls well under the broker's own limits (Upstox:
    10 orders a second, 500 a minute), which tickguard's exits share."""

    def __init__(self, per_second: float, burst: int) -> None:
        if per_second <= 0 or burst < 1:
            raise ValueError("need per_second > 0 and burst >= 1")
        self.per_second = per_second
        self.burst = burst
        self._tokens = float(burst)
        self._at: float | None = None

    def take(self, now: float) -> bool:
        """True (and one token spent) if a call may go now."""
        if self._at is not None:
            self._tokens = min(self.burst, self._tokens + (now - self._at) * self.per_second)
        self._at = now
        if self._tokens >= 1:
            self._tokens -= 1
            return True
        return False
