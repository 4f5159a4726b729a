"""The broker-held safety net (docs/safety-net.md): a stop order the broker holds behind
each guarded position, so that the position is closed even while tickguard cannot act.

`core.safety_net` decides where each stop belongs and what to ask next; this
drives the broker there, on the guard loop's event loop:

- every PLAN_EVERY it places, moves and cancels stops, under a token bucket
  (the broker's order limits are shared with tickguard's exits) and at most one
  move per position every MOVE_EVERY;
- before a stop is placed, its row is journalled (`placing`, no stop id yet):
  a place whose answer never came (a timeout, a crash) is resolved from the
  broker's list (symbol, side, quantity and trigger; Upstox's GTT carries no
  tag of ours) once PLACE_SETTLE has passed, and nothing else is placed for
  that symbol until then: never two stops for one position;
- every REFRESH_EVERY it reads the broker's list: a stop that fired makes the
  reconciler read the account now (the position is then closed as external);
- right before tickguard sends its own exit, `disarm` cancels the position's
  stop (bounded by DISARM_TIMEOUT) and tells the executor whether to send.

A failure to place, move or cancel is counted (tickguard_safety_net_failures_total),
logged with `[SAFETY NET]`, and retried after a growing pause; none of them ever
holds up an exit. The race windows between the two stops are spelled out at
`SafetyNet.disarm`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from tickguard.brokers.base import SafetyNetBroker
from tickguard.core.backoff import Exponential
from tickguard.core.exits import Exit
from tickguard.core.guard import Guard
from tickguard.core.positions import Position, PositionState
from tickguard.core.safety_net import (
    Action,
    BrokerStop,
    Disarm,
    RateLimit,
    Step,
    StopState,
    plan,
)
from tickguard.errors import (
    BrokerBusy,
    BrokerError,
    BrokerRejected,
    BrokerUnavailable,
    StoreError,
)
from tickguard.metrics import Metrics
from tickguard.status import NetStop, SafetyNetStatus
from tickguard.store import AsyncStore, NetRow, Store, as_async

log = logging.getLogger(__name__)

PLAN_EVERY = 0.5  # seconds between looks at where the stops should be
MOVE_EVERY = 5.0  # a stop is moved at most this often
REFRESH_EVERY = 5.0  # the broker's list of stops is read this often (which fired?)
# Place, move and cancel calls: Upstox allows 10 orders a second, 500 a minute and 2,000
# in 30 minutes, shared with tickguard's own exits. One a second on average stays under
# all three (1,800 in 30 minutes); the burst lets a few positions be covered at once.
CALLS_PER_SECOND = 1.0
CALL_BURST = 5
CALL_TIMEOUT = 5.0  # seconds for one place, move, cancel or list
DISARM_TIMEOUT = 0.5  # seconds the cancel before an exit may take
ORDER_CANCEL_TIMEOUT = 2.0  # seconds to cancel the order a fired stop placed
# A stop that fired while the account still holds the position: its order (a limit order
# on Upstox) gets this long to fill before tickguard cancels it and sends its own exit.
FIRED_GRACE = 5.0
BUSY_PAUSE = 0.2  # seconds between the cancels of a broker that said "too many requests"...
BUSY_BUDGET = 1.5  # ...for at most this long (Upstox counts its limit per second)
# A place whose answer never came is looked for in the broker's list only once it is this
# old: a request still on its way must land before "not listed" can mean "never placed".
PLACE_SETTLE = 30.0
FAILURE_PAUSE = Exponential(initial=5.0, cap=300.0)  # per symbol, after a failed call


@dataclass(slots=True)
class _Held:
    """A stop the broker holds for a guarded position, and its journal row."""

    row: int
    stop: BrokerStop
    position_id: int  # whose stop it is: a later position in the same symbol is another


@dataclass(frozen=True, slots=True)
class _Fired:
    """A stop that fired while its position was guarded: nothing is sent over it."""

    row: int
    stop: BrokerStop
    position_id: int
    at: float  # monotonic


class SafetyNet:
    def __init__(
        self,
        broker: SafetyNetBroker,
        guard: Guard,
        store: Store | AsyncStore,
        metrics: Metrics,
        margin_pct: float,
        *,
        monotonic: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.broker = broker
        self.guard = guard
        self.store = as_async(store)
        self.metrics = metrics
        self.margin_pct = margin_pct
        self._mono = monotonic
        self._wall = wall
        self.held: dict[str, _Held] = {}  # active stops, by symbol
        self.fired: dict[str, _Fired] = {}
        self.placing: dict[str, NetRow] = {}  # places whose outcome is unknown
        self.limit = RateLimit(CALLS_PER_SECOND, CALL_BURST)
        self.failures: Counter[str] = Counter()  # by op, since start
        self.last_error = ""
        # Told when a stop fired: read the account now (the reconciler's trigger).
        self.on_fired: Callable[[], None] | None = None
        self._moved_at: dict[str, float] = {}
        self._memo: dict[str, tuple[Position, tuple[float, float] | None]] = {}  # for plan()
        self._failed: dict[str, tuple[int, float]] = {}  # symbol -> (failures in a row, until)
        self._locks: dict[str, asyncio.Lock] = {}
        self._strays: set[asyncio.Task[None]] = set()  # cancels of stray fired stops' orders
        self._refresh_at = -math.inf
        self._refresh_failures = 0

    # -- start, and the loop -----------------------------------------------

    async def load(self) -> None:
        """Take up the stops the journal says may be live (before any exit is resumed)."""
        for row in await self.store.net_live():
            if row.state == "active" and row.stop_id is not None:
                stop = BrokerStop(row.stop_id, row.symbol, row.side, row.quantity, row.trigger)
                self.held[row.symbol] = _Held(row.row, stop, row.position_id)
            else:
                self.placing[row.symbol] = row
        if self.held or self.placing:
            log.info(
                "[SAFETY NET] %d broker-held stops recovered, %d placements to look for",
                len(self.held),
                len(self.placing),
            )

    async def run(self) -> None:
        """Keep every guarded position's stop where it belongs, forever."""
        try:
            while True:
                if self._mono() >= self._refresh_at:
                    await self.refresh()
                await self.step()
                await asyncio.sleep(PLAN_EVERY)
        finally:
            for task in self._strays:
                task.cancel()

    async def refresh(self) -> None:
        """Read the broker's stops: resolve placements whose answer never came, and learn
        which held stops fired or were cancelled at the broker (by a person, or expired)."""
        try:
            async with asyncio.timeout(CALL_TIMEOUT):
                listed = await self.broker.stops()
        except (BrokerError, TimeoutError) as exc:
            self._refresh_failures += 1
            self._refresh_at = self._mono() + FAILURE_PAUSE.delay(self._refresh_failures)
            self._failure("lookup", None, exc)
            return
        self._refresh_failures = 0
        self._refresh_at = self._mono() + REFRESH_EVERY
        by_id = {s.stop_id: s for s in listed}
        wall = self._wall()
        for symbol, row in list(self.placing.items()):
            await self._resolve_placing(symbol, row, listed, wall)
        for symbol, held in list(self.held.items()):
            seen = by_id.get(held.stop.stop_id)
            if seen is None:  # not listed: ask for it by its id
                try:
                    async with asyncio.timeout(CALL_TIMEOUT):
                        seen = await self.broker.stop_state(held.stop)
                except (BrokerError, TimeoutError) as exc:
                    self._failure("lookup", symbol, exc)
                    continue
            if self.held.get(symbol) is held:  # not changed by a disarm meanwhile
                await self._learn(symbol, held, seen)

    async def _resolve_placing(
        self, symbol: str, row: NetRow, listed: list[BrokerStop], wall: float
    ) -> None:
        if wall - row.created_at < PLACE_SETTLE:
            return  # the request may still be on its way
        taken = {h.stop.stop_id for h in self.held.values()}
        match = next(
            (
                s
                for s in listed
                if s.state is not StopState.CANCELLED
                and s.stop_id not in taken
                and (s.symbol, s.position_side, s.quantity, s.trigger)
                == (row.symbol, row.side, row.quantity, row.trigger)
            ),
            None,
        )
        del self.placing[symbol]
        if match is None:
            await self.store.net_update(row.row, "not_placed", wall)
            log.info("[SAFETY NET] %s: the stop whose answer was lost was never placed", symbol)
            return
        log.info("[SAFETY NET] %s: found the stop whose answer was lost: %s", symbol, match.stop_id)
        held = _Held(row.row, match, row.position_id)
        self.held[symbol] = held  # before the write yields: a disarm meanwhile cancels it
        await self.store.net_update(row.row, "active", wall, stop_id=match.stop_id)
        await self._learn(symbol, held, match)

    async def _learn(self, symbol: str, held: _Held, seen: BrokerStop | None) -> None:
        """What the broker says of a held stop."""
        if seen is None or seen.state is StopState.CANCELLED:
            if not self._release(symbol, held):
                return
            await self.store.net_update(held.row, "cancelled", self._wall())
            log.warning(
                "[SAFETY NET] %s: the broker no longer holds stop %s (cancelled at the broker,"
                " or expired); a new one is placed",
                symbol,
                held.stop.stop_id,
            )
        elif seen.state is StopState.TRIGGERED:
            await self._fired_now(symbol, held, seen)

    async def _fired_now(self, symbol: str, held: _Held, seen: BrokerStop) -> None:
        if not self._release(symbol, held):
            return
        await self.store.net_update(held.row, "triggered", self._wall(), order_id=seen.order_id)
        position = self.guard.position(symbol)
        if position is not None and position.id == held.position_id:
            self.fired[symbol] = _Fired(held.row, seen, held.position_id, self._mono())
            log.warning(
                "[SAFETY NET] %s: broker-held stop %s fired (trigger %.2f); reconciling",
                symbol,
                seen.stop_id,
                seen.trigger,
            )
        else:
            # Its position is closed already: by this fire (reconciled as external before
            # the fire was learnt), or by tickguard's own exit while the stop could not be
            # cancelled (disarm's window 3). The account read says which: an opposite
            # holding is reported unguarded. An order of it that has not filled never will.
            log.warning(
                "[SAFETY NET] %s: broker-held stop %s fired, its position already closed;"
                " reading the account",
                symbol,
                seen.stop_id,
            )
            if seen.order_id is not None:
                task = asyncio.get_running_loop().create_task(self._cancel_stray(symbol, seen))
                self._strays.add(task)
                task.add_done_callback(self._strays.discard)
        if self.on_fired is not None:
            self.on_fired()

    async def step(self) -> None:
        """Ask the broker for what the plan says now, as far as the token bucket allows."""
        now = self._mono()
        positions = {p.symbol: p for p in self.guard.positions()}
        for symbol, fired in list(self.fired.items()):
            position = positions.get(symbol)
            if position is None or position.id != fired.position_id:
                del self.fired[symbol]  # its position is closed: done with it
        if len(self._locks) > len(positions) + len(self.held):  # bounded by those, not history
            for symbol in [s for s, lock in self._locks.items() if not lock.locked()]:
                if symbol not in positions and symbol not in self.held:
                    del self._locks[symbol]
        busy = set(self.placing) | set(self.fired)
        busy |= {s for s, (_, until) in self._failed.items() if until > now}
        busy |= {s for s, lock in self._locks.items() if lock.locked()}
        # A stop held for an earlier position in a symbol is cancelled (its position is
        # left out of the plan); the new position's is placed once it is gone.
        earlier = {s for s, h in self.held.items() if h.position_id != _id(positions.get(s))}
        steps = plan(
            {s: p for s, p in positions.items() if s not in busy and s not in earlier},
            {s: h.stop for s, h in self.held.items() if s not in busy},
            self.margin_pct,
            self._moved_at,
            now,
            MOVE_EVERY,
            self._memo,
        )
        for symbol in self._memo.keys() - positions.keys():
            del self._memo[symbol]
        for step in steps:
            if not self.limit.take(self._mono()):
                break
            lock = self._lock(step.symbol)
            if lock.locked():
                continue  # a disarm is at it
            async with lock:
                await self._do(step)
        self.metrics.safety_net_positions.set(self._covered(positions))

    async def _do(self, step: Step) -> None:
        if step.action is Action.PLACE:
            await self._place(step)
        elif step.action is Action.MOVE:
            await self._move(step)
        else:
            await self._cancel(step)

    async def _place(self, step: Step) -> None:
        symbol = step.symbol
        position = self.guard.position(symbol)
        if position is None or position.state is not PositionState.OPEN:
            return  # it changed while the step waited for the lock
        assert step.trigger is not None
        wall = self._wall()
        try:
            row = await self.store.net_intent(position, step.quantity, step.trigger, wall)
        except StoreError as exc:  # never place a stop the journal does not hold
            self._failure("place", symbol, exc)
            return
        try:
            async with asyncio.timeout(CALL_TIMEOUT):
                stop = await self.broker.place_stop(
                    symbol, position.side, step.quantity, step.trigger
                )
        except (BrokerRejected, BrokerBusy) as exc:  # refused: it does not exist
            await self.store.net_update(row, "not_placed", self._wall())
            self._failure("place", symbol, exc)
            return
        except (BrokerUnavailable, TimeoutError) as exc:
            # It may exist: looked for in the broker's list before anything else is placed.
            self.placing[symbol] = NetRow(
                row, position.id, symbol, position.side, step.quantity, step.trigger, wall
            )
            self._failure("place", symbol, exc)
            return
        await self.store.net_update(row, "active", self._wall(), stop_id=stop.stop_id)
        self.held[symbol] = _Held(row, stop, position.id)
        self._moved_at[symbol] = self._mono()
        self._failed.pop(symbol, None)
        log.info(
            "[SAFETY NET] %s: broker-held stop %s placed at %.2f for %g",
            symbol,
            stop.stop_id,
            stop.trigger,
            stop.quantity,
        )

    async def _move(self, step: Step) -> None:
        symbol = step.symbol
        held = self.held.get(symbol)
        if held is None or step.stop is None or held.stop.stop_id != step.stop.stop_id:
            return
        assert step.trigger is not None
        try:
            async with asyncio.timeout(CALL_TIMEOUT):
                await self.broker.modify_stop(held.stop, step.quantity, step.trigger)
        except BrokerRejected as exc:  # perhaps no longer active: what is it now?
            self._failure("move", symbol, exc)
            await self._look(symbol, held)
            return
        except (BrokerUnavailable, TimeoutError) as exc:  # the next move asks again
            self._failure("move", symbol, exc)
            return
        # Kept as asked (not as answered): a broker that rounds otherwise is not moved again.
        held.stop = dataclasses.replace(held.stop, quantity=step.quantity, trigger=step.trigger)
        await self.store.net_update(
            held.row, "active", self._wall(), quantity=step.quantity, trigger=step.trigger
        )
        self._moved_at[symbol] = self._mono()
        self._failed.pop(symbol, None)
        log.info("[SAFETY NET] %s: broker-held stop moved to %.2f", symbol, step.trigger)

    async def _cancel(self, step: Step) -> None:
        symbol = step.symbol
        held = self.held.get(symbol)
        if held is None or step.stop is None or held.stop.stop_id != step.stop.stop_id:
            return
        try:
            async with asyncio.timeout(CALL_TIMEOUT):
                after = await self.broker.cancel_stop(held.stop)
        except (BrokerError, TimeoutError) as exc:
            self._failure("cancel", symbol, exc)
            return
        if after.state is StopState.ACTIVE:
            self._failure("cancel", symbol, BrokerUnavailable("", "the stop is still active"))
        elif after.state is StopState.TRIGGERED:
            await self._fired_now(symbol, held, after)
        else:
            self._failed.pop(symbol, None)
            await self._gone(symbol, held)

    async def _gone(self, symbol: str, held: _Held) -> None:
        """A held stop cancelled by tickguard."""
        if not self._release(symbol, held):
            return
        await self.store.net_update(held.row, "cancelled", self._wall())
        log.info("[SAFETY NET] %s: broker-held stop %s cancelled", symbol, held.stop.stop_id)

    async def _cancel_stray(self, symbol: str, stop: BrokerStop) -> None:
        """Cancel the order of a stop that fired after its position closed, until the broker
        says nothing of it can fill (or that it filled: then the account read reports it)."""
        assert stop.order_id is not None
        failures = 0
        while True:
            try:
                async with asyncio.timeout(CALL_TIMEOUT):
                    dead = await self.broker.cancel_order(stop.order_id)
            except (BrokerError, TimeoutError) as exc:
                failures += 1
                self._failure("cancel", symbol, exc, before_exit=True)
                await asyncio.sleep(min(FAILURE_PAUSE.delay(failures), 30.0))
                continue
            if dead:
                log.warning(
                    "[SAFETY NET] %s: the order %s of the stop that fired after the close"
                    " is cancelled: no more of it can fill",
                    symbol,
                    stop.order_id,
                )
            return

    async def _look(self, symbol: str, held: _Held) -> None:
        try:
            async with asyncio.timeout(CALL_TIMEOUT):
                seen = await self.broker.stop_state(held.stop)
        except (BrokerError, TimeoutError) as exc:
            self._failure("lookup", symbol, exc)
            return
        if self.held.get(symbol) is held:
            await self._learn(symbol, held, seen)

    # -- before tickguard's own exit ------------------------------------------

    async def disarm(self, exit: Exit) -> Disarm:
        """Cancel `exit`'s position's broker-held stop before the exit is sent (the
        executor's hook); never raises, and takes at most DISARM_TIMEOUT (plus
        ORDER_CANCEL_TIMEOUT when a fired stop's order must be cancelled).

        The race windows, and what closes each:
        1. The stop fires at the broker while the cancel is on its way: the broker
           refuses the cancel, says the stop fired (`FIRED`), nothing is sent, and the
           account read the fire asks for closes the position as `external`.
        2. The stop fired and its order has not filled (a limit order, gapped past):
           the account still holds the position. Nothing is sent over it for
           FIRED_GRACE; then that order is cancelled, and only once the broker says
           nothing of it can fill is tickguard's own exit sent, sized by the account
           read made right before it (which sees any part that did fill).
        3. The cancel gets no answer within DISARM_TIMEOUT (`UNKNOWN`): the exit takes
           its normal path. If the broker cannot be reached, the exit cannot reach it
           either, and is retried (each retry disarms again). If the cancel was only
           slow, the exit may fill while the stop is still held: the stop can then
           fire only if the price goes past it (margin_pct beyond tickguard's own),
           before the planner cancels it (PLAN_EVERY after the position closed, retried
           until done). A fire then is logged as critical and reconciled (the account
           shows what it holds; an opposite holding is reported unguarded).
           A stop that fires after its position closed has the order it placed
           cancelled at once: in a gap that order has not filled, and never will.
        4. A place whose answer was lost and a concurrent exit: the exit is sent
           (`UNKNOWN`); a stop found later in the list for a closed position is
           cancelled as in 3.
        5. The broker refuses the cancel for now (rate limited: it did nothing): it is
           asked again every BUSY_PAUSE for up to BUSY_BUDGET, since an exit sent now
           would leave the stop active (window 3) if the order got through; then
           `UNKNOWN`. The planner's own calls stay under the broker's limits (the
           token bucket), so only exits crowding the limit meet this.
        """
        symbol = exit.symbol
        fired = self.fired.get(symbol)
        if fired is not None:
            return await self._over_fired(symbol, fired)
        lock = self._lock(symbol)
        if symbol not in self.held and not lock.locked():  # no stop, and none on its way
            return Disarm.UNKNOWN if symbol in self.placing else Disarm.CLEAR  # window 4
        busy_until = self._mono() + BUSY_BUDGET
        while True:
            try:
                async with asyncio.timeout(DISARM_TIMEOUT):
                    async with lock:  # after a place, move or cancel on its way
                        held = self.held.get(symbol)
                        if held is None:  # none placed, or a step cancelled it or saw it fire
                            if symbol in self.fired:
                                return Disarm.FIRED
                            return Disarm.UNKNOWN if symbol in self.placing else Disarm.CLEAR
                        after = await self.broker.cancel_stop(held.stop)
                break
            except BrokerBusy as exc:  # answered "not now": asked again, briefly (window 5)
                self._failure("cancel", symbol, exc, before_exit=True)
                if self._mono() + BUSY_PAUSE >= busy_until:
                    return Disarm.UNKNOWN
                await asyncio.sleep(BUSY_PAUSE)
            except (BrokerError, TimeoutError) as exc:
                self._failure("cancel", symbol, exc, before_exit=True)
                return Disarm.UNKNOWN
        if after.state is StopState.TRIGGERED:
            await self._fired_now(symbol, held, after)
            return Disarm.FIRED
        if after.state is StopState.CANCELLED:
            await self._gone(symbol, held)
            return Disarm.CLEAR
        return Disarm.UNKNOWN

    async def _over_fired(self, symbol: str, fired: _Fired) -> Disarm:
        """A stop of this position fired, and the position is still guarded."""
        if self.on_fired is not None:
            self.on_fired()
        if self._mono() - fired.at < FIRED_GRACE:
            return Disarm.FIRED
        stop = fired.stop
        try:
            if stop.order_id is None:  # the broker may say which order it placed by now
                async with asyncio.timeout(DISARM_TIMEOUT):
                    seen = await self.broker.stop_state(stop)
                if seen is not None and seen.order_id is not None:
                    stop = seen
                    self.fired[symbol] = dataclasses.replace(fired, stop=seen)
            if stop.order_id is None:
                log.error(
                    "[SAFETY NET] %s: broker-held stop %s fired, the account still holds the"
                    " position, and the broker does not say which order the stop placed:"
                    " tickguard sends nothing over it; check the broker's order book",
                    symbol,
                    stop.stop_id,
                )
                return Disarm.FIRED
            async with asyncio.timeout(ORDER_CANCEL_TIMEOUT):
                dead = await self.broker.cancel_order(stop.order_id)
        except (BrokerError, TimeoutError) as exc:
            self._failure("cancel", symbol, exc, before_exit=True)
            return Disarm.FIRED
        if not dead:
            return Disarm.FIRED  # it filled: the account read closes the position
        del self.fired[symbol]
        log.warning(
            "[SAFETY NET] %s: the order %s of the fired stop did not fill and is cancelled;"
            " tickguard sends its own exit",
            symbol,
            stop.order_id,
        )
        return Disarm.CLEAR

    # -- helpers ----------------------------------------------------------

    def _release(self, symbol: str, held: _Held) -> bool:
        """Forget a held stop; False when it was forgotten already (a disarm and the refresh
        may both learn of one fire, each after its own call)."""
        if self.held.get(symbol) is not held:
            return False
        del self.held[symbol]
        self._moved_at.pop(symbol, None)
        return True

    def _lock(self, symbol: str) -> asyncio.Lock:
        lock = self._locks.get(symbol)
        if lock is None:
            lock = self._locks[symbol] = asyncio.Lock()
        return lock

    def _failure(
        self, op: str, symbol: str | None, exc: BaseException, *, before_exit: bool = False
    ) -> None:
        why = "timed out" if isinstance(exc, TimeoutError) else getattr(exc, "detail", str(exc))
        self.failures[op] += 1
        self.metrics.safety_net_failures.labels(op).inc()
        self.last_error = f"{op} {symbol or 'list'}: {why}"
        if symbol is not None and not before_exit:
            count = self._failed.get(symbol, (0, 0.0))[0] + 1
            self._failed[symbol] = (count, self._mono() + FAILURE_PAUSE.delay(count))
        log.warning(
            "[SAFETY NET] %s: %s of the broker-held stop failed: %s%s",
            symbol or "all",
            op,
            why,
            "; tickguard's own exit goes on" if before_exit else "",
        )

    def covered(self) -> int:
        """Guarded positions with an active broker-held stop."""
        return self._covered({p.symbol: p for p in self.guard.positions()})

    def _covered(self, positions: dict[str, Position]) -> int:
        return sum(1 for s, h in self.held.items() if _id(positions.get(s)) == h.position_id)

    def status(self) -> SafetyNetStatus:
        stops = [
            NetStop(s, h.stop.stop_id, h.stop.trigger, h.stop.quantity, "active")
            for s, h in self.held.items()
        ]
        stops += [
            NetStop(s, f.stop.stop_id, f.stop.trigger, f.stop.quantity, "triggered")
            for s, f in self.fired.items()
        ]
        stops += [
            NetStop(s, None, r.trigger, r.quantity, "placing") for s, r in self.placing.items()
        ]
        return SafetyNetStatus(
            margin_pct=self.margin_pct,
            covered=self.covered(),
            stops=tuple(sorted(stops, key=lambda n: n.symbol)),
            failures=dict(self.failures),
            last_error=self.last_error,
        )


def _id(position: Position | None) -> int | None:
    return None if position is None else position.id
