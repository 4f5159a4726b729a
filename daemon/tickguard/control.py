"""The daemon's side of the API port (tickguard.port): snapshots and actions on the guard loop.

The API runs on a thread of its own; everything here that touches the daemon
runs on the guard loop, handed over with `asyncio.run_coroutine_threadsafe`.
The API's threads never touch the guard, the store or the broker directly.

What a flood of requests can cost the guard loop is bounded:
- a read is answered from a snapshot taken after it arrived (never older
  state than the client has seen), but every read waiting shares the next
  one: one snapshot (copies of two dicts) per guard-loop turn at most,
  however many requests;
- actions (closes, new positions) and journal reads handed to the guard loop
  and not yet started there are at most MAX_QUEUED and MAX_QUEUED_READS;
  more are refused at once (`Overloaded`: the API answers 503 with
  Retry-After), never queued behind a busy loop. A close waiting for the
  broker's answer has started: it holds no place. Mutating routes are
  authenticated before they count, so no unauthenticated client can take an
  emergency close's place.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from tickguard.brokers.base import Broker
from tickguard.brokers.paper import PaperBroker
from tickguard.core.account import Holding
from tickguard.core.guard import Guard
from tickguard.core.positions import ExitReason, Position, PositionSpec, PositionState
from tickguard.errors import PositionExists
from tickguard.executor import ExitExecutor
from tickguard.guard_loop import GuardLoop
from tickguard.port import (
    Closing,
    ExternalClose,
    Journal,
    NoPosition,
    NotPaper,
    Overloaded,
    PositionExiting,
)
from tickguard.status import Snapshot
from tickguard.store import AsyncStore, Store, as_async

T = TypeVar("T")

MAX_QUEUED = 64  # closes, position changes, paper trades handed over, not yet started
MAX_QUEUED_READS = 2  # exit-journal and all-positions reads (a store query each)
SNAPSHOT_WAIT = 1.0  # s a read waits for a fresh snapshot before it takes the newest one


class GuardPort:
    """tickguard.port.Port for the running daemon. Made on the guard loop, used by the API."""

    def __init__(
        self,
        *,
        take_snapshot: Callable[[], Snapshot],
        guard_loop: GuardLoop,
        guard: Guard,
        executor: ExitExecutor,
        store: Store | AsyncStore,
        broker: Broker,
        subscribe: Callable[[], Coroutine[Any, Any, None]],
        account_changed: Callable[[], None],
        token: str | None,
        close_wait: float,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._take = take_snapshot
        self._guard_loop = guard_loop
        self._guard = guard
        self._executor = executor
        self._store = as_async(store)
        self._broker = broker
        self._subscribe = subscribe
        self._account_changed = account_changed
        self._token = token
        self.close_wait = close_wait
        self._monotonic = monotonic
        self._loop = asyncio.get_running_loop()  # the guard loop
        self._latest = take_snapshot()
        self._refreshing: asyncio.Future[Snapshot] | None = None  # on the API's loop
        # Actions by kind: handed over (counted on the API's loop) and started (on the
        # guard loop); each counter has one writer, so no lock is needed.
        self._handed: dict[str, int] = collections.Counter()
        self._started: dict[str, int] = collections.Counter()

    # -- reads ----------------------------------------------------------

    @property
    def token(self) -> str | None:
        return self._token

    def now(self) -> float:
        return self._monotonic()

    def latest(self) -> Snapshot:
        return self._latest

    def publish(self, snapshot: Snapshot) -> None:
        """A snapshot the guard loop took anyway (the STATUS line's): the newest for readers."""
        if snapshot.taken_at >= self._latest.taken_at:
            self._latest = snapshot

    async def snapshot(self) -> Snapshot:
        arrived = self._monotonic()
        try:
            async with asyncio.timeout(SNAPSHOT_WAIT):
                # A snapshot taken on the guard loop after this request arrived; refreshes
                # are one at a time, and every request waiting shares the next one.
                while self._latest.taken_at < arrived:
                    if self._refreshing is None:
                        self._refreshing = asyncio.ensure_future(self._refresh())
                    await asyncio.shield(self._refreshing)
        except TimeoutError:  # the guard loop is busy or stuck: /healthz says which
            pass
        return self._latest

    async def _refresh(self) -> Snapshot:
        try:
            snapshot = await self._on_guard_loop(self._snapshot())
            self.publish(snapshot)
            return snapshot
        finally:
            self._refreshing = None

    async def _snapshot(self) -> Snapshot:
        return self._take()

    # -- actions --------------------------------------------------------

    async def close(self, symbol: str, reason: ExitReason, remote: str | None) -> Closing:
        return await self._act("closes", MAX_QUEUED, self._close(symbol, reason, remote))

    async def _close(self, symbol: str, reason: ExitReason, remote: str | None) -> Closing:
        detail = {"symbol": symbol, "reason": reason.value, "remote": remote}
        await self._guard_loop.audit("emergency_close", detail)
        return await self._close_one(symbol, reason)

    async def close_all(self, reason: ExitReason, remote: str | None) -> list[Closing]:
        return await self._act("closes", MAX_QUEUED, self._close_all(reason, remote))

    async def _close_all(self, reason: ExitReason, remote: str | None) -> list[Closing]:
        symbols = [p.symbol for p in self._guard.positions() if p.state is PositionState.OPEN]
        detail = {"symbols": symbols, "reason": reason.value, "remote": remote}
        await self._guard_loop.audit("emergency_close_all", detail)
        return list(await asyncio.gather(*(self._close_one(s, reason) for s in symbols)))

    async def _close_one(self, symbol: str, reason: ExitReason) -> Closing:
        position = self._guard.position(symbol)
        if position is None:
            latest = await self._store.latest_position(symbol)
            raise NoPosition(symbol, latest.state if latest is not None else None)
        if position.state is PositionState.EXITING:
            raise PositionExiting(symbol)
        outcome = self._guard_loop.close(symbol, reason)
        cid = outcome.exit.client_order_id
        try:
            async with asyncio.timeout(self.close_wait):
                exit = await self._executor.first_outcome(cid)
        except TimeoutError:
            exit = self._guard.exit(cid) or outcome.exit
        return Closing(outcome.position, exit)

    async def add(self, spec: PositionSpec, remote: str | None) -> Position:
        return await self._act("changes", MAX_QUEUED, self._add(spec, remote))

    async def _add(self, spec: PositionSpec, remote: str | None) -> Position:
        if self._guard.position(spec.symbol) is not None:
            raise PositionExists(spec.symbol)
        position = await self._guard_loop.add(spec, source=f"api {remote}")
        await self._subscribe()
        return position

    async def remove(self, symbol: str, remote: str | None) -> Position:
        return await self._act("changes", MAX_QUEUED, self._remove(symbol, remote))

    async def _remove(self, symbol: str, remote: str | None) -> Position:
        position = self._guard.position(symbol)
        if position is None:
            raise NoPosition(symbol)
        if position.state is PositionState.EXITING:
            raise PositionExiting(symbol)
        return await self._guard_loop.remove(symbol, source=f"api {remote}")

    async def positions(self) -> list[Position]:
        return await self._act("journal reads", MAX_QUEUED_READS, self._positions())

    async def _positions(self) -> list[Position]:
        guarded = {p.id: p for p in self._guard.positions()}
        return [guarded.get(p.id, p) for p in await self._store.positions(active_only=False)]

    async def journal(self) -> Journal:
        return await self._act("journal reads", MAX_QUEUED_READS, self._journal())

    async def _journal(self) -> Journal:
        external = [
            ExternalClose(
                symbol=str(row["symbol"]),
                position_id=int(row["position_id"]),  # type: ignore[call-overload]
                quantity=float(row["quantity"]),  # type: ignore[arg-type]
                detail=str(row["detail"]),
                at=float(row["at"]),  # type: ignore[arg-type]
            )
            for row in await self._store.external_closes()
        ]
        exits = [
            (r, self._guard.exit(r.exit.client_order_id) or r.exit)
            for r in await self._store.exits()
        ]
        return Journal(exits, external)

    async def paper_trade(
        self, symbol: str, side: str, quantity: float, price: float | None
    ) -> Holding | None:
        return await self._act(
            "changes", MAX_QUEUED, self._paper_trade(symbol, side, quantity, price)
        )

    async def _paper_trade(
        self, symbol: str, side: str, quantity: float, price: float | None
    ) -> Holding | None:
        broker = self._broker
        if not isinstance(broker, PaperBroker):
            raise NotPaper("paper trades exist only with broker.kind = paper")
        detail = {"symbol": symbol, "side": side, "quantity": quantity, "price": price}
        await self._guard_loop.audit("paper_trade", detail)
        after = broker.trade(symbol, side, quantity, price)  # BrokerRejected: no price
        self._account_changed()
        return after

    # -- the hand-over --------------------------------------------------

    async def _act(self, kind: str, limit: int, action: Coroutine[Any, Any, T]) -> T:
        """Run `action` on the guard loop, unless `limit` of `kind` wait to start (Overloaded)."""
        if self._handed[kind] - self._started[kind] >= limit:
            action.close()
            raise Overloaded(kind, limit)
        self._handed[kind] += 1
        return await self._on_guard_loop(self._started_then(kind, action))

    async def _started_then(self, kind: str, action: Coroutine[Any, Any, T]) -> T:
        """On the guard loop: count `action` started, run it, then take a snapshot for
        readers, so what it changed is seen at once."""
        self._started[kind] += 1
        try:
            return await action
        finally:
            self.publish(self._take())

    async def _on_guard_loop(self, action: Coroutine[Any, Any, T]) -> T:
        if asyncio.get_running_loop() is self._loop:
            return await action
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(action, self._loop))
