"""What every broker adapter offers the exit executor and the reconciler.

The values it speaks in (`ExitOrder`, `OrderReport`, `OrderStatus`, `Holding`)
live in the core, so the store can keep them without importing an adapter.
"""

from __future__ import annotations

from typing import Protocol

from tickguard.core.account import Holding
from tickguard.core.orders import ExitOrder, OrderReport
from tickguard.core.positions import Side
from tickguard.core.safety_net import BrokerStop


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


class SafetyNetBroker(Protocol):
    """A broker that holds stop orders for tickguard: the safety net (docs/safety-net.md).

    Every call raises `BrokerRejected` when the broker refused it (nothing changed) and
    `BrokerUnavailable` when the outcome is unknown (unreachable, timed out, an answer
    that cannot be read). A stop's id is the broker's; `BrokerStop.position_side` is the
    side of the position it closes (a long's stop sells).
    """

    async def place_stop(
        self, symbol: str, position_side: Side, quantity: float, trigger: float
    ) -> BrokerStop:
        """Place a stop that closes `quantity` of the position once the price reaches
        `trigger` (a long's: at or below it; a short's: at or above it)."""
        ...

    async def modify_stop(self, stop: BrokerStop, quantity: float, trigger: float) -> BrokerStop:
        """Move an active stop; the stop as the broker holds it now. BrokerRejected also
        when it is no longer active (fired or cancelled): `stop_state` then says which."""
        ...

    async def cancel_stop(self, stop: BrokerStop) -> BrokerStop:
        """Cancel a stop; its state after the call: CANCELLED (now or before), or
        TRIGGERED when it fired first (with the order it placed, when the broker says)."""
        ...

    async def stop_state(self, stop: BrokerStop) -> BrokerStop | None:
        """The stop as the broker holds it now; None when the broker has no such stop."""
        ...

    async def stops(self) -> list[BrokerStop]:
        """Every stop the broker holds for this account, in any state it still lists
        (to find ours again after a restart: matched by symbol, side and quantity)."""
        ...

    async def cancel_order(self, order_id: str) -> bool:
        """Cancel the order a fired stop placed. True: nothing of it can fill any more
        (cancelled now, or it was cancelled or rejected before); False: it is complete."""
        ...
