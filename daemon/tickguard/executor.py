"""Drives decided exits to the broker and back, journalling every step.

One task per exit. The journal is written before each send; a send whose
outcome is unknown (timeout, unreachable) is followed by a lookup of the
client order id before anything is sent again, and so is every exit
recovered after a restart. The client order id never changes within an
exit, so a broker that has the order already is never asked for a second.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from tickguard.brokers.base import Broker
from tickguard.core.exits import Exit, ExitState
from tickguard.core.guard import ExitDecided, Guard
from tickguard.core.orders import ExitOrder, OrderReport, OrderStatus
from tickguard.core.positions import Position, PositionState
from tickguard.core.safety_net import Disarm
from tickguard.errors import BrokerError, BrokerRejected, BrokerUnavailable, StoreError
from tickguard.status import ExecutorStatus
from tickguard.store import AsyncStore, Store, as_async, run_now

log = logging.getLogger(__name__)

DEFAULT_ORDER_TIMEOUT = 10.0  # seconds for one broker call
WORKING_POLL_INTERVAL = 1.0  # an accepted but unfilled order is looked up this often
DRIVER_RESTART_DELAY = 1.0  # a crashed exit driver resumes (lookup first) after this
# Where a process may die with an exit in flight, in order (see Checkpoint); the crash
# test kills at each, and inside the broker's call ("accepted").
CRASH_POINTS = ("journalled", "sent", "accepted", "answered", "retrying")

# Test seam: awaited at each step of an exit, in order: "journalled" (decided, PENDING
# durable), "sent" (SENT durable, the broker not yet called), "answered" (the broker's
# reply in hand, not yet journalled), "retrying" (RETRY durable). CRASH_POINTS names
# them for the crash test, which also kills inside the broker ("accepted").
Checkpoint = Callable[[str, Exit], Awaitable[None]]
# Told of every exit that settles (filled or rejected) and every failed send.
Listener = Callable[[Exit, Position | None, float | None], None]


class ExitExecutor:
    def __init__(
        self,
        guard: Guard,
        store: Store | AsyncStore,
        broker: Broker,
        *,
        order_timeout: float = DEFAULT_ORDER_TIMEOUT,
        monotonic: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        checkpoint: Checkpoint | None = None,
        listener: Listener | None = None,
    ) -> None:
        self.guard = guard
        self.store = as_async(store)
        self.broker = broker
        self.order_timeout = order_timeout
        self._monotonic = monotonic
        self._wall = wall
        self._checkpoint = checkpoint
        self.listener = listener
        # How much an exit may trade, asked right before each send (docs/account.md: the account's
        # holding on its side); None: the exit's own quantity. Bounded in time; never raises.
        self.sizer: Callable[[Exit], Awaitable[float]] | None = None
        self.on_first_send: Callable[[Exit], None] | None = None  # told once per exit, when sent
        # Cancels the position's broker-held stop before each send (docs/safety-net.md);
        # bounded in time, never raises. FIRED: that stop fired, nothing is sent.
        self.disarm: Callable[[Exit], Awaitable[Disarm]] | None = None
        # Told when a decided exit cannot be journalled: it is never sent, and guarding can no
        # longer be trusted (the guard loop's fatal event: exit 1, systemd restarts us).
        self.on_journal_failure: Callable[[Exit, StoreError], None] | None = None
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._first: dict[str, asyncio.Future[Exit]] = {}

    def submit(self, decided: ExitDecided) -> None:
        """Journal a new exit (durably), then start sending it.

        On SQLite the journal is written before this returns; a store that must be
        awaited (PostgreSQL) is written by the exit's task, before anything else it
        does. Either way, an exit the journal cannot hold is never sent
        (`on_journal_failure`)."""
        cid = decided.exit.client_order_id
        if not self.store.immediate:
            self._start(cid, lookup_first=False, journal=decided)
            return
        try:
            run_now(self.store.journal_exit(decided.exit, decided.position, self._wall()))
        except StoreError as exc:
            self._journal_failed(decided.exit, exc)
            return
        self._start(cid, lookup_first=False)

    def _journal_failed(self, exit: Exit, exc: StoreError) -> None:
        # Never send an exit the journal does not hold: after a restart it would not be
        # reconciled. The guard loop stops the daemon (exit 1: systemd restarts it from
        # what the store holds).
        log.critical("[EXIT] %s: cannot journal the exit, not sending it: %s", exit.symbol, exc)
        if self.on_journal_failure is not None:
            self.on_journal_failure(exit, exc)

    def resume(self, client_order_id: str, after: float = 0.0) -> None:
        """Continue an exit recovered from the journal: look it up (`after` seconds from now)
        before any send."""
        self._start(client_order_id, lookup_first=True, after=after)

    def _start(
        self,
        client_order_id: str,
        lookup_first: bool,
        journal: ExitDecided | None = None,
        after: float = 0.0,
    ) -> None:
        if client_order_id in self._tasks:
            return
        self._first[client_order_id] = asyncio.get_running_loop().create_future()
        task = asyncio.create_task(
            self._drive(client_order_id, lookup_first, journal, after),
            name=f"exit {client_order_id}",
        )
        self._tasks[client_order_id] = task
        task.add_done_callback(lambda t: self._done(client_order_id, t))

    def _done(self, client_order_id: str, task: asyncio.Task[None]) -> None:
        self._tasks.pop(client_order_id, None)
        first = self._first.pop(client_order_id, None)
        if first is not None and not first.done():
            first.cancel()
        if task.cancelled() or task.exception() is None:
            return
        log.error("exit %s: driver crashed", client_order_id, exc_info=task.exception())
        if self.guard.exit(client_order_id) is not None:
            # Still in flight: look it up again (never blindly resend) after a pause.
            loop = asyncio.get_running_loop()
            loop.call_later(DRIVER_RESTART_DELAY, self._start, client_order_id, True)

    async def first_outcome(self, client_order_id: str) -> Exit:
        """The exit once it is filled, rejected, or its first send failed."""
        first = self._first.get(client_order_id)
        if first is None:
            exit = self.guard.exit(client_order_id)
            if exit is not None:
                return exit
            record = await self.store.exit_record(client_order_id)
            if record is None:
                raise KeyError(client_order_id)
            return record.exit
        return await asyncio.shield(first)

    def in_flight(self) -> int:
        return len(self._tasks)

    def status(self) -> ExecutorStatus:
        return ExecutorStatus(tuple(self.guard.exits_in_flight()), len(self._tasks))

    async def drain(self, timeout: float) -> bool:
        """Wait up to `timeout` for exits in flight; True if none is left."""
        tasks = list(self._tasks.values())
        if tasks:
            await asyncio.wait(tasks, timeout=timeout)
        return not self._tasks

    async def cancel_all(self) -> None:
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # -- the driver -----------------------------------------------------

    async def _drive(
        self, cid: str, lookup: bool, journal: ExitDecided | None, after: float
    ) -> None:
        if after > 0:
            await asyncio.sleep(after)
        exit = self._exit(cid)
        if journal is not None:  # a new exit: durable before anything is sent
            try:
                await self.store.journal_exit(journal.exit, journal.position, self._wall())
            except StoreError as exc:
                self._journal_failed(exit, exc)
                return
        if lookup:  # resumed after a crash (of the process or of a driver)
            resumed = self.guard.exit_recovered(cid)
            if resumed != exit:
                await self.store.update_exit(resumed, self._wall())
        elif self._checkpoint is not None:
            await self._checkpoint("journalled", exit)
        acknowledged = False  # the broker answered a send of this exit with an order
        while True:
            exit = self._exit(cid)
            if exit.state is ExitState.RETRY and exit.retry_at is not None:
                await asyncio.sleep(max(0.0, exit.retry_at - self._monotonic()))
            if lookup:
                try:
                    async with asyncio.timeout(self.order_timeout):  # not wait_for (see feed)
                        report = await self.broker.find_order(cid)
                except (BrokerError, TimeoutError) as exc:  # a refused lookup proves nothing
                    await self._unavailable(cid, f"lookup failed: {_why(exc)}")
                    continue
                if report is None and acknowledged:
                    # It told us it holds the order: a lookup that cannot see it
                    # is lagging, not proof that it is gone. Never resend then.
                    await self._unavailable(
                        cid, "the broker acknowledged the order; lookup finds none"
                    )
                    continue
                if report is None:
                    lookup = False  # the broker has no such order: send it
                elif report.status is OrderStatus.WORKING:
                    await asyncio.sleep(WORKING_POLL_INTERVAL)
                    continue
                else:
                    await self._settle(cid, report, None)
                    return
            if self.disarm is not None and await self.disarm(exit) is Disarm.FIRED:
                await self._cancelled(cid, "the broker-held stop fired first: nothing sent")
                return
            if self.sizer is not None:  # docs/account.md: never more than the account holds
                allowed = min(exit.quantity, await self.sizer(exit))
                if allowed <= 0:
                    await self._cancelled(
                        cid, f"the account holds no {exit.side.value} {exit.symbol}: nothing sent"
                    )
                    return
                if allowed < exit.quantity:
                    exit, position = self.guard.exit_resized(cid, allowed)
                    await self.store.update_exit(exit, self._wall(), None, position)
            exit = self.guard.exit_sending(cid)
            await self.store.update_exit(exit, self._wall())
            if exit.attempts == 1 and self.on_first_send is not None:
                self.on_first_send(exit)
            if self._checkpoint is not None:
                await self._checkpoint("sent", exit)
            started = self._monotonic()
            try:
                async with asyncio.timeout(self.order_timeout):
                    report = await self.broker.place_exit(_order(exit))
            except BrokerRejected as exc:
                await self._rejected(cid, exc.detail, None, self._monotonic() - started)
                return
            except (BrokerUnavailable, TimeoutError) as exc:
                await self._unavailable(cid, _why(exc))
                if self._checkpoint is not None:
                    await self._checkpoint("retrying", self._exit(cid))
                lookup = True
                continue
            elapsed = self._monotonic() - started
            if self._checkpoint is not None:
                await self._checkpoint("answered", exit)
            if report.status is OrderStatus.WORKING:
                acknowledged = True
                lookup = True
                continue
            await self._settle(cid, report, elapsed)
            return

    def _exit(self, cid: str) -> Exit:
        exit = self.guard.exit(cid)
        if exit is None:
            raise KeyError(f"exit {cid} is not in flight")
        return exit

    async def _settle(self, cid: str, report: OrderReport, elapsed: float | None) -> None:
        if report.status is OrderStatus.REJECTED:
            await self._rejected(cid, report.detail or "rejected", report, elapsed)
            return
        assert report.fill_price is not None
        exit, position = self.guard.exit_filled(
            cid, report.fill_price, report.broker_order_id, report.filled_quantity
        )
        await self.store.update_exit(exit, self._wall(), report, position)
        if position.state is PositionState.CLOSED:
            log.info(
                "[EXIT] %s closed at %.2f, pnl %.2f (%s, %s)",
                exit.symbol,
                report.fill_price,
                exit.pnl(position.spec.entry_price) or 0.0,
                exit.reason.value,
                exit.price_source.value,
            )
        else:  # partly filled: the rest is exited again, under a new client order id
            log.warning(
                "[EXIT] %s partly filled: %g of %g at %.2f; %g remain guarded",
                exit.symbol,
                exit.filled_quantity or 0.0,
                exit.quantity,
                report.fill_price,
                position.spec.quantity,
            )
        self._resolve(exit, position, elapsed)

    async def _rejected(
        self, cid: str, detail: str, report: OrderReport | None, elapsed: float | None
    ) -> None:
        exit, position = self.guard.exit_rejected(cid, detail, self._monotonic())
        await self.store.update_exit(exit, self._wall(), report, position)
        log.error(
            "[EXIT] %s exit %s refused by the broker: %s; the position stays guarded",
            exit.symbol,
            cid,
            detail,
        )
        self._resolve(exit, position, elapsed)

    async def _cancelled(self, cid: str, detail: str) -> None:
        """Not sent, and never will be: reconciliation decides what the position is now."""
        exit, position = self.guard.exit_cancelled(cid, detail, self._monotonic())
        await self.store.update_exit(exit, self._wall(), None, position)
        log.warning("[EXIT] %s exit %s: %s", exit.symbol, cid, detail)
        self._resolve(exit, position, None)

    async def _unavailable(self, cid: str, detail: str) -> None:
        exit = self.guard.exit_unavailable(cid, detail, self._monotonic())
        await self.store.update_exit(exit, self._wall())
        log.warning(
            "[EXIT] %s exit %s: %s; retrying in %.1fs with the same order id",
            exit.symbol,
            cid,
            detail,
            max(0.0, (exit.retry_at or 0.0) - self._monotonic()),
        )
        self._resolve(exit, None, None)

    def _resolve(self, exit: Exit, position: Position | None, elapsed: float | None) -> None:
        first = self._first.get(exit.client_order_id)
        if first is not None and not first.done():
            first.set_result(exit)
        if self.listener is not None:
            self.listener(exit, position, elapsed)


def _order(exit: Exit) -> ExitOrder:
    return ExitOrder(
        exit.client_order_id, exit.symbol, exit.side, exit.quantity, exit.trigger_price
    )


def _why(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out"
    return exc.detail if isinstance(exc, BrokerError) else str(exc)


async def recover(
    guard: Guard, store: AsyncStore, executor: ExitExecutor, now: float, settle: float = 0.0
) -> list[Position]:
    """Load active positions and resume their unfinished exits (lookup before any send; with
    `settle`, not before that long after the exit's last journal write)."""
    exits = {e.client_order_id: e for e in await store.unfinished_exits()}
    positions = await store.positions()
    for position in positions:
        exit = exits.get(position.exit_id) if position.exit_id else None
        guard.add(position, now, exit)
    wall = time.time()
    for cid in exits:
        if guard.exit(cid) is None:
            continue
        after = 0.0
        if settle > 0 and (record := await store.exit_record(cid)) is not None:
            after = max(0.0, record.updated_at + settle - wall)
        executor.resume(cid, after)
    return positions
