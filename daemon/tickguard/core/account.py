"""The broker's account as the truth (docs/account.md): holdings, exit rules, and exit sizing.

Pure: the broker adapters report `Holding`s; this module decides what they
mean for the positions tickguard guards. The one invariant it serves: no
order from tickguard ever takes a net position through zero.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from tickguard.core.positions import Position, PositionSpec, PositionState, Side
from tickguard.core.untrusted import amount


@dataclass(frozen=True, slots=True)
class Holding:
    """The broker's net position in one symbol: signed quantity (> 0 long, < 0 short)."""

    symbol: str
    quantity: float
    average_price: float | None  # None when the broker does not say
    product: str = ""  # the broker's product code (Upstox: I, D, MTF), "" when it has none

    @property
    def side(self) -> Side | None:
        if self.quantity > 0:
            return Side.LONG
        if self.quantity < 0:
            return Side.SHORT
        return None


@dataclass(frozen=True, slots=True)
class ExitRule:
    """Exit levels for positions imported from the broker (`[[rules]]`), in percent of the
    broker's average price. The first rule whose `symbols` match a symbol applies."""

    symbols: tuple[str, ...]  # symbols or instrument keys; "*" matches any
    stop_loss_pct: float | None = None
    take_profit_pct: float | None = None
    trailing_stop_pct: float | None = None

    def matches(self, symbol: str) -> bool:
        return "*" in self.symbols or symbol in self.symbols

    def spec_for(self, holding: Holding) -> PositionSpec | None:
        """The position to guard for `holding`, or None without a usable average price."""
        side, price = holding.side, amount(holding.average_price)
        quantity = amount(abs(holding.quantity))
        if side is None or price is None or quantity is None:
            return None
        sign = 1.0 if side is Side.LONG else -1.0

        def level(pct: float | None, direction: float) -> float | None:
            if pct is None:
                return None
            value = round(price * (1 + direction * sign * pct / 100), 8)
            return value if value > 0 else None  # a short's target of 100% or more: none

        trailing = None if self.trailing_stop_pct is None else price * self.trailing_stop_pct / 100
        return PositionSpec(
            symbol=holding.symbol,
            side=side,
            quantity=quantity,
            entry_price=price,
            stop_loss=level(self.stop_loss_pct, -1.0),
            take_profit=level(self.take_profit_pct, +1.0),
            trailing_stop=trailing,
        )


def apply_trade(holding: Holding | None, symbol: str, delta: float, price: float) -> Holding | None:
    """The net position after a trade of signed `delta` at `price` (average-cost rules):
    adding keeps a quantity-weighted average, reducing keeps the average, crossing zero
    starts the new side at `price`; flat is None."""
    quantity = holding.quantity if holding is not None else 0.0
    average = holding.average_price if holding is not None else None
    new = round(quantity + delta, 8)
    if new == 0:
        return None
    if quantity == 0 or (quantity > 0) == (delta > 0):  # opening or adding
        if average is None or quantity == 0:
            average = price
        else:
            average = (abs(quantity) * average + abs(delta) * price) / abs(new)
    elif (quantity > 0) != (new > 0):  # through zero: what is left is new, at this price
        average = price
    product = holding.product if holding is not None else ""
    return Holding(symbol, new, average, product)


class Verdict(enum.Enum):
    """What the broker's holding means for one guarded, open position (docs/account.md)."""

    UNCONFIRMED = "unconfirmed"  # registered, the broker shows nothing yet: keep guarding
    HELD = "held"  # the broker holds exactly the guarded quantity
    SHRINK = "shrink"  # it holds less on our side: guard less
    GROW = "grow"  # it holds more on our side: guard more, at its average price
    EXTERNAL = "external"  # shown held before, now flat or the other side: closed outside
    NEVER_HELD = "never_held"  # never shown held within confirm_within: closed as external


@dataclass(frozen=True, slots=True)
class Reconciled:
    verdict: Verdict
    quantity: float  # the quantity to guard after it (the broker's, on our side)
    entry_price: float | None = None  # for GROW: the broker's average price


def reconcile(
    position: Position, holding: Holding | None, *, age: float, confirm_within: float
) -> Reconciled:
    """Judge one open position against the broker's holding in its symbol.

    `age`: seconds since it was registered (wall clock, for confirm_within).
    """
    held = held_on_side(position.side, holding)
    guarded = position.spec.quantity
    if held == 0:
        if position.confirmed:
            return Reconciled(Verdict.EXTERNAL, 0.0)
        if age > confirm_within:
            return Reconciled(Verdict.NEVER_HELD, 0.0)
        return Reconciled(Verdict.UNCONFIRMED, guarded)
    if held < guarded:
        return Reconciled(Verdict.SHRINK, held)
    if held > guarded:
        price = amount(holding.average_price) if holding is not None else None
        return Reconciled(Verdict.GROW, held, price)
    return Reconciled(Verdict.HELD, held)


# Read once: an enum member read through its class costs a metaclass lookup (Python 3.11),
# and `to_judge` reads them once per guarded position at every read of the account.
_OPEN = PositionState.OPEN
_LONG = Side.LONG


def to_judge(positions: Iterable[Position], holdings: Mapping[str, Holding]) -> list[Position]:
    """The open positions that a read of `holdings` may change: every open one but those
    the broker was shown to hold before and holds exactly as guarded now, which most
    positions are at most reads (`reconcile` would find them HELD, and a confirmed
    position found HELD is left as it is)."""
    judged = []
    get = holdings.get
    for position in positions:
        if position.state is not _OPEN:
            continue  # an exit is in flight: its own pre-send check sizes it
        spec = position.spec
        holding = get(spec.symbol)
        if position.confirmed and holding is not None:
            held = holding.quantity if spec.side is _LONG else -holding.quantity
            if 0 < held == spec.quantity:
                continue
        judged.append(position)
    return judged


def first_rule(rules: tuple[ExitRule, ...], symbol: str) -> ExitRule | None:
    return next((r for r in rules if r.matches(symbol)), None)


def signed_quantity(position: Position) -> float:
    """The guarded position as a signed net quantity (> 0 long, < 0 short)."""
    q = position.spec.quantity
    return q if position.side is Side.LONG else -q


def held_on_side(side: Side, holding: Holding | None) -> float:
    """How much of `side` the broker holds: 0 when flat or on the other side."""
    if holding is None:
        return 0.0
    return max(0.0, holding.quantity if side is Side.LONG else -holding.quantity)


def exit_size(position: Position, holding: Holding | None, known: bool) -> float:
    """How much an exit of `position` may sell (long) or buy (short).

    At most the guarded quantity and, when the account is `known`, at most what
    the broker holds on the position's side: an exit never takes the net
    position through zero. 0 means: send nothing.
    """
    if not known:
        return position.spec.quantity
    return min(position.spec.quantity, held_on_side(position.side, holding))


__all__ = [
    "ExitRule",
    "Holding",
    "Reconciled",
    "Verdict",
    "apply_trade",
    "exit_size",
    "first_rule",
    "held_on_side",
    "reconcile",
    "signed_quantity",
    "to_judge",
]
