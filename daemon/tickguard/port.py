"""The API's one way into the daemon: snapshots to read, actions to take (docs/api.md).

The HTTP API holds a `Port` and nothing else of the daemon. Reads come from a
`Snapshot` (tickguard.status) taken after the request arrived; every change is
an action the port runs on the guard loop and answers with plain values. So a
handler can be tested against a fake port, and the API can run on its own
thread (tickguard.http_server) without touching the guard's objects.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from tickguard.core.account import Holding
from tickguard.core.exits import Exit
from tickguard.core.positions import ExitReason, Position, PositionSpec, PositionState
from tickguard.status import Snapshot
from tickguard.store import ExitRecord


class Overloaded(Exception):
    """Too many actions of this kind are waiting for the guard loop: try again shortly."""

    def __init__(self, what: str, limit: int) -> None:
        super().__init__(f"{limit} {what} already in progress; try again shortly")


class NoPosition(Exception):
    """No position is guarded for the symbol (`state`: the latest one's, if any)."""

    def __init__(self, symbol: str, state: PositionState | None = None) -> None:
        super().__init__(symbol)
        self.symbol, self.state = symbol, state


class PositionExiting(Exception):
    """The symbol's position is exiting: it cannot be closed again or dropped."""

    def __init__(self, symbol: str) -> None:
        super().__init__(symbol)
        self.symbol = symbol


class NotPaper(Exception):
    """Paper trades exist only with the paper broker."""


@dataclass(frozen=True, slots=True)
class Closing:
    """A close as far as it got: the exit's first outcome, or its state when the wait ended."""

    position: Position
    exit: Exit


@dataclass(frozen=True, slots=True)
class ExternalClose:
    """A position closed outside tickguard (docs/account.md): no order was sent."""

    symbol: str
    position_id: int
    quantity: float
    detail: str
    at: float  # wall-clock epoch seconds


@dataclass(frozen=True, slots=True)
class Journal:
    """The exit journal: exits sent (with their live state) and closes seen outside."""

    exits: Sequence[tuple[ExitRecord, Exit]]  # the record, and the exit as it is now
    external: Sequence[ExternalClose]


class Port(Protocol):
    """What the API may read and do. Errors: NoPosition, PositionExiting, NotPaper,
    Overloaded, tickguard.errors.PositionExists, StoreError, BrokerRejected."""

    @property
    def token(self) -> str | None:
        """The API token (None: mutating routes answer 503)."""

    def now(self) -> float:
        """The daemon's monotonic clock, which snapshot times are on."""

    def latest(self) -> Snapshot:
        """The newest snapshot taken, however old (for the metrics' age collector)."""

    async def snapshot(self) -> Snapshot:
        """A snapshot taken after this call began, or the newest one if the guard loop does
        not answer in time (its `taken_at` then shows how old it is)."""

    async def close(self, symbol: str, reason: ExitReason, remote: str | None) -> Closing:
        """Close `symbol` (one order, however many ask) and wait for the broker's first answer,
        within a bound. NoPosition, PositionExiting."""

    async def close_all(self, reason: ExitReason, remote: str | None) -> list[Closing]:
        """Close every open position, as `close`."""

    async def add(self, spec: PositionSpec, remote: str | None) -> Position:
        """Guard a new position and subscribe its symbol. PositionExists."""

    async def remove(self, symbol: str, remote: str | None) -> Position:
        """Stop guarding `symbol` without an order. NoPosition, PositionExiting."""

    async def positions(self) -> list[Position]:
        """Every position the store holds, closed ones too, newest first."""

    async def journal(self) -> Journal:
        """The exit journal."""

    async def paper_trade(
        self, symbol: str, side: str, quantity: float, price: float | None
    ) -> Holding | None:
        """A trade on the paper account made outside tickguard; the holding after it.
        NotPaper, BrokerRejected (no price to fill at)."""
