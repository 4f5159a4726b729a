"""The paper broker: the embedded default. Fills exits at the last known price.

Fills live in the state store with their client order id, so they survive
restarts and reconciliation finds them. Like a real broker, it does not
deduplicate: an order id sent twice is filled twice (and logged as such), so
paper trading shows a duplicate exit exactly where a real account would.

For tests it can inject latency and a queue of faults, one per call of
`place_exit`, and run a hook right after it accepted an order.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable

from tickguard.core.account import Holding
from tickguard.core.orders import ExitOrder, OrderReport, OrderStatus
from tickguard.core.positions import PositionSpec, Side
from tickguard.errors import BrokerRejected, BrokerUnavailable
from tickguard.store import Store

log = logging.getLogger(__name__)


class PaperFault(enum.Enum):
    REJECT = "reject"  # refuse the order: nothing is filled
    UNAVAILABLE = "unavailable"  # act unreachable: nothing is filled
    LOST_REPLY = "lost_reply"  # fill it, then act as if the reply was lost
    PARTIAL = "partial"  # fill half of it (rounded down, at least 1) and report that


class PaperBroker:
    name = "paper"

    def __init__(
        self,
        store: Store,
        price_of: Callable[[str], float | None],
        *,
        latency: float = 0.0,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self._price_of = price_of
        self._wall = wall
        self.latency = latency
        self.faults: deque[PaperFault] = deque()
        self.after_accept: Callable[[ExitOrder], Awaitable[None]] | None = None

    async def place_exit(self, order: ExitOrder) -> OrderReport:
        if self.latency:
            await asyncio.sleep(self.latency)
        fault = self.faults.popleft() if self.faults else None
        cid = order.client_order_id
        if fault is PaperFault.REJECT:
            raise BrokerRejected(cid, "paper broker: rejected (injected fault)")
        if fault is PaperFault.UNAVAILABLE:
            raise BrokerUnavailable(cid, "paper broker: unreachable (injected fault)")
        price = self._price_of(order.symbol)
        if price is None:
            price = order.reference_price
        if price is None:
            raise BrokerRejected(cid, f"paper broker: no price known for {order.symbol}")
        previous = self._store.paper_fill_count(cid)
        if previous:
            log.error("paper broker: order id %s filled again (duplicate #%d)", cid, previous + 1)
        quantity = order.quantity
        if fault is PaperFault.PARTIAL:
            quantity = max(1.0, float(int(order.quantity / 2)))
        report = OrderReport(
            cid,
            f"paper-{cid}-{previous + 1}",
            OrderStatus.FILLED,
            price,
            filled_quantity=quantity,
        )
        self._store.record_paper_fill(
            report, order.symbol, order.transaction, quantity, self._wall()
        )
        if self.after_accept is not None:
            await self.after_accept(order)
        if fault is PaperFault.LOST_REPLY:
            raise BrokerUnavailable(cid, "paper broker: reply lost (injected fault)")
        return report

    async def find_order(self, client_order_id: str) -> OrderReport | None:
        if self.latency:
            await asyncio.sleep(self.latency)
        return self._store.paper_fill(client_order_id)

    async def positions(self) -> list[Holding]:
        """The paper account: every fill of ours and every outside trade, netted per symbol."""
        if self.latency:
            await asyncio.sleep(self.latency)
        return self._store.paper_positions()

    def trade(self, symbol: str, side: str, quantity: float, price: float | None) -> Holding | None:
        """A trade made outside tickguard (a bot, a person); at the last price without `price`.

        The net position after it. BrokerRejected without any price to fill at.
        """
        fill = price if price is not None else self._price_of(symbol)
        if fill is None:
            raise BrokerRejected("", f"paper broker: no price known for {symbol}")
        return self._store.record_paper_trade(symbol, side, quantity, fill, self._wall())

    def open_if_flat(self, spec: PositionSpec) -> None:
        """A position registered on a symbol the paper account is flat in: its entry filled
        (docs/account.md), recorded as the opening trade at the entry price."""
        if self._store.paper_position(spec.symbol) is None:
            side = "buy" if spec.side is Side.LONG else "sell"
            self._store.record_paper_trade(
                spec.symbol, side, spec.quantity, spec.entry_price, self._wall()
            )

    async def close(self) -> None:
        return None
