"""Orders as tickguard and its brokers speak of them: values only (no I/O)."""

from __future__ import annotations

import enum
from dataclasses import dataclass

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
