"""Reconciliation: the broker's account decides what is open (docs/account.md).

The account is read at start, every `account.reconcile_interval`, after
every feed (re)connect, after a paper trade, and right before each exit is
sent. Each successful read is applied to every open guarded position
(`core.account.reconcile`: closed outside tickguard, shrunk, grown, or still
unconfirmed), imports the broker's positions that a `[[rules]]` entry matches
(`account.source = "broker"`), and reports the rest as unguarded.

A positions endpoint that fails or is slow never delays an exit for long:
the read right before a send has a short timeout and is skipped while the
endpoint is known to be failing; the exit is then sized from the last view
that succeeded (or its own quantity when there never was one), and the
failure is counted.

Reads may overlap (a periodic one, and one before an exit): the view is
always that of the read that started last among those that succeeded, so an
exit is sized from a read that started after it was decided, never from an
older one that happened to answer later. Most positions are unchanged by most
reads; those are passed over without a verdict.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from tickguard.brokers.base import Broker
from tickguard.config import AccountConfig
from tickguard.core.account import (
    ExitRule,
    Holding,
    exit_size,
    first_rule,
    reconcile,
    to_judge,
)
from tickguard.core.exits import Exit
from tickguard.errors import BrokerError, PositionExists
from tickguard.guard_loop import GuardLoop
from tickguard.metrics import Metrics
from tickguard.status import AccountStatus

log = logging.getLogger(__name__)

FETCH_TIMEOUT = 2.0  # seconds one periodic read of the positions may take
PRESEND_TIMEOUT = 0.5  # seconds the read right before an exit may take
# A broker position in a symbol whose guarded position closed less than this ago is not
# imported: the broker's positions may lag its fills, and importing a position that our
# own exit just closed could sell it twice.
IMPORT_QUARANTINE = 60.0


@dataclass(frozen=True, slots=True)
class AccountView:
    """The broker's open positions as last read successfully."""

    holdings: dict[str, Holding]
    reconciled_at: float  # wall-clock epoch seconds


class Reconciler:
    def __init__(
        self,
        broker: Broker,
        guard_loop: GuardLoop,
        metrics: Metrics,
        account: AccountConfig,
        rules: tuple[ExitRule, ...] = (),
        *,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.broker = broker
        self.guard_loop = guard_loop
        self.metrics = metrics
        self.account = account
        self.rules = rules
        self._wall = wall
        self.view: AccountView | None = None
        self.last_error = ""
        self._due = asyncio.Event()
        self._lock = asyncio.Lock()  # one read-and-apply at a time
        self._reads = 0  # reads started
        self._viewed = 0  # the read (its number in `_reads`) that `view` comes from
        # Test seam: awaited between reading the account and acting on it (the crash test).
        self.after_read: Callable[[list[Holding]], Awaitable[None]] | None = None
        # Extends the live subscription to imported symbols (the feed supervisor's).
        self.subscribe: Callable[[], Awaitable[None]] | None = None

    def trigger(self) -> None:
        """Reconcile now (the feed reconnected; a paper trade was made)."""
        self._due.set()

    async def run(self) -> None:
        """Reconcile at start, then every interval or when triggered, forever."""
        while True:
            self._due.clear()
            await self.reconcile(FETCH_TIMEOUT)
            try:
                async with asyncio.timeout(self.account.reconcile_interval):
                    await self._due.wait()
            except TimeoutError:
                pass

    async def reconcile(self, timeout: float) -> bool:
        """Read the account and act on it; True when it was read. Never raises BrokerError.

        A read that answers after one started later was acted on is not acted on: the
        account it saw is older than the view already."""
        self._reads += 1
        read = self._reads
        try:
            async with asyncio.timeout(timeout):
                holdings = await self.broker.positions()
        except (BrokerError, TimeoutError) as exc:
            why = "timed out" if isinstance(exc, TimeoutError) else str(exc)
            self.metrics.reconcile_failures.inc()
            if why != self.last_error:
                log.warning("[ACCOUNT] the broker's positions are unavailable: %s", why)
            self.last_error = why
            return False
        if self.after_read is not None:
            await self.after_read(holdings)
        async with self._lock:
            if self.last_error:
                log.info("[ACCOUNT] the broker's positions are available again")
            self.last_error = ""
            wall = self._wall()
            self.metrics.reconcile_last_success.set(wall)
            if read < self._viewed:
                return True  # a read started after this one was acted on already
            self._viewed = read
            self.view = AccountView({h.symbol: h for h in holdings if h.quantity}, wall)
            imported = await self._apply(self.view, wall)
            self.metrics.unguarded_positions.set(self._unguarded_count())
        if imported and self.subscribe is not None:
            await self.subscribe()  # an imported symbol needs live prices like any other
        return True

    async def _apply(self, view: AccountView, wall: float) -> int:
        """Act on the view; the number of positions imported."""
        holdings = view.holdings
        for position in to_judge(self.guard_loop.guard.positions(), holdings):
            holding = holdings.get(position.symbol)
            verdict = reconcile(
                position,
                holding,
                age=wall - position.created_at,
                confirm_within=self.account.confirm_within,
            )
            broker_quantity = holding.quantity if holding is not None else 0.0
            await self.guard_loop.apply_account(position.symbol, verdict, broker_quantity)
        imported = 0
        if self.account.source != "broker":
            return imported
        for holding in self.unguarded():
            rule = first_rule(self.rules, holding.symbol)
            spec = rule.spec_for(holding) if rule is not None else None
            if spec is None or await self._recently_closed(holding.symbol, wall):
                # No rule, no average price, or a position in it closed so recently that
                # the broker may not show that yet: reported as unguarded, not imported.
                continue
            try:
                await self.guard_loop.add(spec, source="broker")
            except PositionExists:
                continue
            imported += 1
        return imported

    async def _recently_closed(self, symbol: str, wall: float) -> bool:
        closed_at = await self.guard_loop.store.closed_at(symbol)
        quarantine = max(IMPORT_QUARANTINE, 3 * self.account.reconcile_interval)
        return closed_at is not None and wall - closed_at < quarantine

    async def exit_quantity(self, exit: Exit) -> float:
        """How much `exit` may trade now: read the account (briefly), then at most what it
        holds on the position's side. The executor's `sizer`.

        The view it sizes from comes from this read, or from one started after it; only
        when this read fails (or is skipped, the endpoint known to be failing) from the last
        view that succeeded."""
        if not self.last_error:  # a failing endpoint is not waited for
            await self.reconcile(PRESEND_TIMEOUT)
        position = self.guard_loop.guard.position(exit.symbol)
        if position is None:
            return 0.0
        view = self.view
        holding = view.holdings.get(exit.symbol) if view is not None else None
        allowed = min(exit.quantity, exit_size(position, holding, view is not None))
        if 0 < allowed < exit.quantity:
            self.metrics.exit_quantity_clamped.inc()
            log.warning(
                "[EXIT] %s: the account holds %g: the exit is sized down from %g",
                exit.symbol,
                allowed,
                exit.quantity,
            )
        return allowed

    def status(self) -> AccountStatus:
        view = self.view
        return AccountStatus(
            holdings=dict(view.holdings) if view is not None else None,
            reconciled_at=view.reconciled_at if view is not None else None,
            last_error=self.last_error,
            unguarded=tuple(self.unguarded()),
        )

    def _unguarded_count(self) -> int:
        if self.view is None:
            return 0
        return len(self.view.holdings.keys() - set(self.guard_loop.guard.symbols()))

    def unguarded(self) -> list[Holding]:
        """Open broker positions that no guarded position covers (docs/account.md: reported)."""
        if self.view is None:
            return []
        guarded = set(self.guard_loop.guard.symbols())
        return [h for s, h in sorted(self.view.holdings.items()) if s not in guarded]
