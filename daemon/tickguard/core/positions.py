"""Positions and their exit triggers: stop-loss, take-profit, trailing stop."""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Mapping
from dataclasses import dataclass

from tickguard.core.untrusted import MAX_AMOUNT, amount, number, shown


class Side(enum.Enum):
    LONG = "long"
    SHORT = "short"


class PositionState(enum.Enum):
    OPEN = "open"
    EXITING = "exiting"
    CLOSED = "closed"


class ExitReason(enum.Enum):
    STOP_LOSS = "stop_loss"
    TAKE_PROFIT = "take_profit"
    TRAILING_STOP = "trailing_stop"
    BLIND = "blind"
    EMERGENCY = "emergency"


@dataclass(frozen=True, slots=True)
class FieldProblem:
    """A field of a position that fails validation."""

    field: str
    value: object
    expected: str

    def __str__(self) -> str:
        return f"{self.field}: {shown(self.value)} is invalid; expected {self.expected}"


@dataclass(frozen=True, slots=True)
class PositionSpec:
    """What a user asks to guard (config `[[positions]]` or `POST /api/v1/positions`)."""

    symbol: str
    side: Side
    quantity: float
    entry_price: float
    stop_loss: float | None = None
    take_profit: float | None = None
    trailing_stop: float | None = None

    def problems(self) -> list[FieldProblem]:
        """Every rule this spec breaks (empty when valid)."""
        return _rule_problems({name: getattr(self, name) for name in POSITION_FIELDS})


def _rule_problems(values: Mapping[str, object]) -> list[FieldProblem]:
    """Every rule broken by the fields present in `values` (already of the right types)."""
    found: list[FieldProblem] = []
    symbol = values.get("symbol")
    if isinstance(symbol, str) and not valid_symbol(symbol):
        found.append(FieldProblem("symbol", symbol, SYMBOL_EXPECTED))
    for name in ("quantity", "entry_price", "stop_loss", "take_profit", "trailing_stop"):
        value = values.get(name)
        if value is not None and amount(value) is None:
            found.append(FieldProblem(name, value, f"a number > 0 and below {MAX_AMOUNT:g}"))
    sl, tp = amount(values.get("stop_loss")), amount(values.get("take_profit"))
    side = values.get("side")
    if sl is not None and tp is not None:
        if side in (Side.LONG, "long") and not sl < tp:
            found.append(FieldProblem("stop_loss", sl, f"below take_profit ({tp:g}) for a long"))
        if side in (Side.SHORT, "short") and not sl > tp:
            found.append(FieldProblem("stop_loss", sl, f"above take_profit ({tp:g}) for a short"))
    return found


MAX_SYMBOL_LENGTH = 64
SYMBOL_EXPECTED = (
    f"a printable symbol of 1 to {MAX_SYMBOL_LENGTH} characters without surrounding spaces"
)


def valid_symbol(symbol: str) -> bool:
    """Non-empty, printable (no control characters or lone surrogates), no surrounding spaces."""
    return (
        0 < len(symbol) <= MAX_SYMBOL_LENGTH
        and symbol.isprintable()
        and symbol == symbol.strip()
        and not any(0xD800 <= ord(c) <= 0xDFFF for c in symbol)
    )


class _Missing:
    """Marks an absent required field; shown as <missing> in messages."""

    def __repr__(self) -> str:
        return "<missing>"


MISSING = _Missing()

# The fields of a position as users write them (config `[[positions]]`, API bodies).
POSITION_FIELDS = (
    "symbol",
    "side",
    "quantity",
    "entry_price",
    "stop_loss",
    "take_profit",
    "trailing_stop",
)
REQUIRED_POSITION_FIELDS = POSITION_FIELDS[:4]
_EXPECTED = {
    "symbol": "a non-empty symbol string",
    "side": "'long' or 'short'",
    "quantity": "a finite number > 0",
    "entry_price": "a finite price > 0",
    "stop_loss": "a finite price > 0",
    "take_profit": "a finite price > 0",
    "trailing_stop": "a finite distance in price units > 0",
}


def _typed(name: str, value: object) -> object:
    """The field's value in its type, or None when it has the wrong type (or no finite value)."""
    if name == "symbol":
        return value if isinstance(value, str) else None
    if name == "side":
        return value if value in ("long", "short") else None
    return number(value)


def parse_spec(data: Mapping[str, object]) -> tuple[PositionSpec | None, list[FieldProblem]]:
    """A position from user input (a config table or an API body): the spec, or every problem.

    Missing required fields, wrong types and broken rules are reported;
    unknown fields are the caller's business (it knows where they came from).
    `null` counts as absent for the optional fields.
    """
    problems: list[FieldProblem] = []
    values: dict[str, object] = {}
    for name in POSITION_FIELDS:
        value = data.get(name)
        if value is None:
            if name in REQUIRED_POSITION_FIELDS:
                problems.append(FieldProblem(name, MISSING, _EXPECTED[name]))
        elif (typed := _typed(name, value)) is not None:
            values[name] = typed
        else:
            problems.append(FieldProblem(name, value, _EXPECTED[name]))
    # Rules on every field that has the right type, so a person sees every problem at once.
    problems.extend(_rule_problems(values))
    if problems:
        return None, problems
    spec = PositionSpec(
        symbol=str(values.pop("symbol")),
        side=Side(values.pop("side")),
        **values,  # type: ignore[arg-type]
    )
    return spec, []


@dataclass(frozen=True, slots=True)
class Position:
    """A guarded position. Replaced, never mutated, as it changes.

    `trail_anchor` is the most favourable price seen since the position was
    guarded (highest for a long, lowest for a short), starting at the entry
    price; the trailing stop sits `trailing_stop` away from it and so only
    ever tightens. `exit_seq` counts exits decided for this position, so each
    gets a distinct client order id.
    """

    id: int
    spec: PositionSpec
    state: PositionState = PositionState.OPEN
    trail_anchor: float | None = None
    exit_seq: int = 0
    exit_id: str | None = None  # client order id of the exit in flight or done
    origin: str = "api"  # who registered it: config, api, or broker (a [[rules]] import)
    confirmed: bool = False  # the broker has shown it held (docs/account.md: unconfirmed until then)
    # Wall-clock epoch seconds it was registered (for confirm_within); bookkeeping of the
    # store, not part of what a position is: left out of comparisons.
    created_at: float = dataclasses.field(default=0.0, compare=False)

    @property
    def symbol(self) -> str:
        return self.spec.symbol

    @property
    def side(self) -> Side:
        return self.spec.side

    def trailing_level(self) -> float | None:
        """Where the trailing stop sits now, or None without one."""
        distance = self.spec.trailing_stop
        if distance is None:
            return None
        anchor = self.spec.entry_price if self.trail_anchor is None else self.trail_anchor
        return anchor - distance if self.side is Side.LONG else anchor + distance

    def ratchet(self, price: float) -> Position:
        """The position with its trailing anchor moved to `price` if that is more favourable."""
        if self.spec.trailing_stop is None:
            return self
        anchor = self.spec.entry_price if self.trail_anchor is None else self.trail_anchor
        better = price > anchor if self.side is Side.LONG else price < anchor
        if not better and self.trail_anchor is not None:
            return self
        return dataclasses.replace(self, trail_anchor=price if better else anchor)

    def pnl(self, exit_price: float) -> float:
        """(exit - entry) x qty for a long, (entry - exit) x qty for a short."""
        move = exit_price - self.spec.entry_price
        if self.side is Side.SHORT:
            move = -move
        return round(move * self.spec.quantity, 8)


@dataclass(frozen=True, slots=True)
class Trigger:
    """An exit condition met by a price: which rule, at what level."""

    reason: ExitReason
    level: float
    price: float

    @property
    def log_tag(self) -> str:
        return {
            ExitReason.STOP_LOSS: "SL",
            ExitReason.TAKE_PROFIT: "TP",
            ExitReason.TRAILING_STOP: "TRAIL",
        }.get(self.reason, self.reason.name)

    def describe(self, side: Side) -> str:
        """E.g. `price 575.00 <= SL 698.25`."""
        below = (side is Side.LONG) != (self.reason is ExitReason.TAKE_PROFIT)
        op = "<=" if below else ">="
        return f"price {self.price:.2f} {op} {self.log_tag} {self.level:.2f}"


def check_triggers(position: Position, price: float) -> Trigger | None:
    """The exit rule `price` meets for `position`, if any.

    Long: SL at price <= SL, trailing at price <= level, TP at price >= TP;
    short mirrored. When both stops are crossed the tighter one (the one a
    continuous path would have met first) is reported; SL wins a tie.
    """
    spec = position.spec
    long = position.side is Side.LONG

    def crossed_stop(level: float) -> bool:
        return price <= level if long else price >= level

    stops: list[Trigger] = []
    if spec.stop_loss is not None and crossed_stop(spec.stop_loss):
        stops.append(Trigger(ExitReason.STOP_LOSS, spec.stop_loss, price))
    trail = position.trailing_level()
    if trail is not None and crossed_stop(trail):
        stops.append(Trigger(ExitReason.TRAILING_STOP, trail, price))
    if stops:
        # Tighter = higher for a long, lower for a short; max/min keep the first on ties.
        return max(stops, key=lambda t: t.level) if long else min(stops, key=lambda t: t.level)
    tp = spec.take_profit
    if tp is not None and (price >= tp if long else price <= tp):
        return Trigger(ExitReason.TAKE_PROFIT, tp, price)
    return None
