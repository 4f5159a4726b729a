"""What every broker adapter offers the exit executor."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Protocol

from tickguard.core.account import Holding
from tickguard.core.positions import Side


class OrderStatus(enum.Enum):
    FILLED = "filled"  # done: fill_price is set
    WORKING = "working"  # accepted, not filled yet: ask again later
    REJECTED = "rejected"  # refused or cancelled: no fill will come


@dataclass(frozen=True, slots=True)
class ExitOrder:
    """A market order that closes a position, keyed by our client order id."""

    client_order_id: str
    symbol: str
    position_side: Side  # the side being closed: a long is closed by a SELL
    quantity: float
    reference_price: float | None  # the price seen when decided (paper fills need one)

    @property
    def transaction(self) -> str:
        return "SELL" if self.position_side is Side.LONG else "BUY"


@dataclass(frozen=True, slots=True)
class OrderReport:
    """The broker's word on one order."""

    client_order_id: str
    broker_order_id: str
    status: OrderStatus
    fill_price: float | None = None
    detail: str = ""
    filled_quantity: float | None = None  # FILLED: None for all of the order, else how much

    def as_reply(self) -> dict[str, object]:
        """For the journal."""
        return {
            "broker_order_id": self.broker_order_id,
            "status": self.status.value,
            "fill_price": self.fill_price,
            "filled_quantity": self.filled_quantity,
            "detail": self.detail,
        }


class Broker(Protocol):
    """Places exit orders and finds them again by client order id.

    `place_exit` raises `BrokerRejected` when the broker refused the order
    (it does not exist) and `BrokerUnavailable` when the outcome is unknown
    (unreachable, timed out). `find_order` returns None when the broker has
    no order with that client order id.
    """

    name: str

    async def place_exit(self, order: ExitOrder) -> OrderReport: ...

    async def find_order(self, client_order_id: str) -> OrderReport | None: ...

    async def positions(self) -> list[Holding]:
        """The account's open net positions, one per symbol (SPEC 8); BrokerUnavailable
        when the broker cannot say (the caller keeps its last view)."""
        ...

    async def close(self) -> None: ...
