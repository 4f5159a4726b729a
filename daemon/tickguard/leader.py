"""Who leads among the instances sharing a PostgreSQL store (docs/ha.md, SPEC 9).

The leader holds a session advisory lock on its store connection
(`PostgresStore.try_lead`); PostgreSQL releases it when that session ends. A
standby tries for it every RETRY_EVERY, with its feed connected and its prices
warm, and takes over the moment it is free: `take_over` (reload positions and
the journal, look up every exit in flight by client order id, reconcile the
account), then it guards.

Why a stale leader cannot send. Every exit is journalled before it is sent
(`sent` before each attempt), and once an instance leads, every write
transaction on its store first proves, in the same transaction, that its
session still holds the lock (`PostgresStore.fence`). A leader whose session
PostgreSQL ended holds no lock: its journal writes fail, so it sends nothing
more; the lock is free only once that session has ended, so two instances
never both pass the proof. The leader also probes its session every
PROBE_EVERY and stops (exit 1: systemd restarts it as a standby) when a
probe fails or takes longer than PROBE_TIMEOUT, which is well before
PostgreSQL, with the server settings of docs/ha.md, ends the session of an
unreachable peer and lets a standby in. What a stale leader may still have
on its way is an order whose `sent` was journalled before it lost the lock:
the new leader looks such an exit up only once `[store] takeover_settle` has
passed since that write (the old leader's broker call is bounded by its order
timeout).
"""

from __future__ import annotations

import asyncio
import enum
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable

from tickguard.errors import StoreError
from tickguard.metrics import Metrics
from tickguard.status import HaStatus
from tickguard.store_pg import PostgresStore

log = logging.getLogger(__name__)

RETRY_EVERY = 0.5  # seconds between a standby's tries for the leader's lock
PROBE_EVERY = 1.0  # seconds between the leader's probes of its session
PROBE_TIMEOUT = 2.0  # a probe that takes longer counts as a lost session
STANDBY_FAILURES = 5  # a standby whose store fails this many tries in a row stops (exit 1)


class Role(enum.Enum):
    STANDBY = "standby"
    LEADER = "leader"
    LOST = "lost"  # led, then could no longer prove it: stopping


def instance_name() -> str:
    """How the others name this instance: its host and process."""
    return f"{socket.gethostname()}:{os.getpid()}"


class Leadership:
    def __init__(
        self,
        store: PostgresStore,
        metrics: Metrics,
        *,
        me: str | None = None,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.metrics = metrics
        self.me = me or instance_name()
        self.role = Role.STANDBY
        self.leader: str | None = None
        self.epoch: int | None = None
        self.changes = 0
        self.tries = 0  # progress (the watchdog's, on a standby)
        self._mono = monotonic
        metrics.leader.set(0)

    @property
    def leading(self) -> bool:
        return self.role is Role.LEADER

    async def run(self, take_over: Callable[[], Awaitable[None]]) -> None:
        """Stand by until the lock is free, take over, then lead until the session is lost.
        Returns only when this instance must stop (exit 1): it lost its leadership, or
        (standing by) its store stopped answering."""
        failures = 0
        while True:
            self.tries += 1
            try:
                epoch = await asyncio.wait_for(self.store.try_lead(self.me), PROBE_TIMEOUT)
                if epoch is None:
                    await self._note_leader()
            except (StoreError, TimeoutError) as exc:
                failures += 1
                log.warning("[HA] standby: the shared store did not answer: %s", _why(exc))
                if failures >= STANDBY_FAILURES:
                    log.critical(
                        "[HA] standby: the shared store is unreachable; stopping (exit 1)"
                        " so that a restart connects again"
                    )
                    return
                await asyncio.sleep(RETRY_EVERY)
                continue
            failures = 0
            if epoch is not None:
                break
            await asyncio.sleep(RETRY_EVERY)
        self.store.fence()  # from now on every write proves this lead
        self.role, self.epoch, self.leader = Role.LEADER, epoch, self.me
        self.changes += 1
        self.metrics.leader.set(1)
        self.metrics.leader_changes.inc()
        started = self._mono()
        await take_over()
        log.warning(
            "[HA] leader: this instance now guards (epoch %d, took over in %.2fs)",
            epoch,
            self._mono() - started,
        )
        while True:
            await asyncio.sleep(PROBE_EVERY)
            self.tries += 1
            try:
                held = await asyncio.wait_for(self.store.holds_lead(), PROBE_TIMEOUT)
            except (StoreError, TimeoutError) as exc:
                why = _why(exc)
            else:
                if held:
                    continue
                why = "the session no longer holds the leader's lock"
            self.role = Role.LOST
            self.metrics.leader.set(0)
            self.metrics.leader_changes.inc()
            self.changes += 1
            log.critical("[HA] lost leadership (%s): stopping (exit 1); nothing more is sent", why)
            return

    async def _note_leader(self) -> None:
        """A standby reads who leads (for the API's answers) and counts changes."""
        epoch = await self.store.meta("leader_epoch")
        leader = await self.store.meta("leader")
        seen = int(epoch) if epoch is not None else None
        if seen != self.epoch and self.epoch is not None:
            self.changes += 1
            self.metrics.leader_changes.inc()
        self.epoch, self.leader = seen, leader

    def status(self) -> HaStatus:
        return HaStatus(self.role.value, self.me, self.leader, self.epoch, self.changes)


def _why(exc: BaseException) -> str:
    return "no answer within the probe's time" if isinstance(exc, TimeoutError) else str(exc)
