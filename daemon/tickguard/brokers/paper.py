"""The paper broker: the embedded default. Fills exits at the last known price.

Fills live in the state store with their client order id, so they survive
restarts and reconciliation finds them. Like a real broker, it does not
deduplicate: an order id sent twice is filled twice (and logged as such), so
paper trading shows a duplicate exit exactly where a real account would.

For tests it can inject latency and a queue of faults, one per call of
`place_exit`, and run a hook right after it accepted an order.

It also holds stops for the safety net (docs/safety-net.md), in the same
ledger. A paper stop fires when the paper broker sees a price at or beyond its
trigger: whenever it is asked about its stops or its positions, and on
`watch()` (the safety net's periodic look). A fired stop trades its quantity
on the paper account at the price seen, as a marketable order would; so the
paper broker never shows the gap a real stop's limit order can fall into.
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
from tickguard.core.safety_net import BrokerStop, StopState
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
        self.watch()
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

    # -- stops held for the safety net -------------------------------------

    async def place_stop(
        self, symbol: str, position_side: Side, quantity: float, trigger: float
    ) -> BrokerStop:
        if self.latency:
            await asyncio.sleep(self.latency)
        return self._store.paper_stop_place(symbol, position_side, quantity, trigger, self._wall())

    async def modify_stop(self, stop: BrokerStop, quantity: float, trigger: float) -> BrokerStop:
        if self.latency:
            await asyncio.sleep(self.latency)
        current = self._fire_if_crossed(self._store.paper_stop(stop.stop_id))
        if current is None or current.state is not StopState.ACTIVE:
            state = current.state.value if current is not None else "unknown"
            raise BrokerRejected("", f"paper broker: stop {stop.stop_id} is {state}")
        changed = self._store.paper_stop_change(
            stop.stop_id, self._wall(), quantity=quantity, trigger=trigger
        )
        assert changed is not None
        return changed

    async def cancel_stop(self, stop: BrokerStop) -> BrokerStop:
        if self.latency:
            await asyncio.sleep(self.latency)
        if self._fire_if_crossed(self._store.paper_stop(stop.stop_id)) is None:
            raise BrokerRejected("", f"paper broker: no stop {stop.stop_id}")
        cancelled = self._store.paper_stop_cancel(stop.stop_id, self._wall())
        assert cancelled is not None
        return cancelled

    async def stop_state(self, stop: BrokerStop) -> BrokerStop | None:
        if self.latency:
            await asyncio.sleep(self.latency)
        return self._fire_if_crossed(self._store.paper_stop(stop.stop_id))

    async def stops(self) -> list[BrokerStop]:
        if self.latency:
            await asyncio.sleep(self.latency)
        self.watch()
        return self._store.paper_stops()

    async def cancel_order(self, order_id: str) -> bool:
        """A fired paper stop's order filled at once: there is never one left to cancel."""
        return False

    def watch(self) -> int:
        """Fire every active paper stop whose trigger the last price reached; how many fired."""
        fired = 0
        for stop in self._store.paper_stops():
            if stop.state is not StopState.ACTIVE:
                break  # active ones come first
            after = self._fire_if_crossed(stop)
            fired += after is not None and after.state is StopState.TRIGGERED
        return fired

    def _fire_if_crossed(self, stop: BrokerStop | None) -> BrokerStop | None:
        """`stop` after the last price was shown to it: fired if that price reached its trigger."""
        if stop is None or stop.state is not StopState.ACTIVE:
            return stop
        price = self._price_of(stop.symbol)
        if price is None:
            return stop
        crossed = (
            price <= stop.trigger if stop.position_side is Side.LONG else price >= stop.trigger
        )
        if not crossed:
            return stop
        self._store.paper_stop_fire(stop, price, self._wall())
        log.warning(
            "paper broker: stop %s on %s fired at %.2f (trigger %.2f): %s %g",
            stop.stop_id,
            stop.symbol,
            price,
            stop.trigger,
            "sold" if stop.position_side is Side.LONG else "bought",
            stop.quantity,
        )
        return self._store.paper_stop(stop.stop_id)

    async def close(self) -> None:
        return None
