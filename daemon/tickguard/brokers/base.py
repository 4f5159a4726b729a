"""What every broker adapter offers the exit executor and the reconciler.

The values it speaks in (`ExitOrder`, `OrderReport`, `OrderStatus`, `Holding`)
live in the core, so the store can keep them without importing an adapter.
"""

from __future__ import annotations

from typing import Protocol

from tickguard.core.account import Holding
from tickguard.core.orders import ExitOrder, OrderReport


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
        """The account's open net positions, one per symbol (docs/account.md); BrokerUnavailable
        when the broker cannot say (the caller keeps its last view)."""
        ...

    async def close(self) -> None: ...
