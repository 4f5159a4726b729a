"""A small process whose guarded position the "bot" closed, for the account crash test.

    python account_crash_runner.py STATE_DIR [--pause-after-read]

First run on an empty state dir: registers a long BOSCHLTD (the paper account
holds it), confirms it, then the bot sells it outside tickguard. With
--pause-after-read it prints `AT read` once the account has been read flat,
before acting on it, and waits forever, to be SIGKILLed. Without it, it
reconciles, crosses the stop, settles, and prints a JSON summary.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
import zoneinfo
from pathlib import Path

from prometheus_client import CollectorRegistry

from tickguard.brokers.paper import PaperBroker
from tickguard.config import AccountConfig
from tickguard.core.account import Holding
from tickguard.core.guard import BlindPolicy, Guard
from tickguard.core.market import MarketCalendar
from tickguard.core.positions import PositionSpec, Side
from tickguard.core.prices import PriceBook, PriceSource
from tickguard.executor import ExitExecutor
from tickguard.guard_loop import GuardLoop
from tickguard.metrics import Metrics
from tickguard.reconciler import Reconciler
from tickguard.store import Store

SPEC = PositionSpec("BOSCHLTD", Side.LONG, 10, 500.0, stop_loss=450.0)
ALWAYS_OPEN = MarketCalendar(zoneinfo.ZoneInfo("UTC"), (), frozenset(), frozenset(), True)


async def main(state_dir: Path, pause: bool) -> None:
    store = Store.in_dir(state_dir)
    book = PriceBook(stale_warning=30.0, cache_timeout=300.0)
    book.channel_up(PriceSource.POLL, time.monotonic())
    guard = Guard(
        book, blind_policy=BlindPolicy.HOLD, blind_after=300.0, install_id=store.install_id
    )
    broker = PaperBroker(store, lambda s: 440.0)
    executor = ExitExecutor(guard, store, broker)
    metrics = Metrics(CollectorRegistry())
    guard_loop = GuardLoop(guard, store, executor, metrics, ALWAYS_OPEN, sweep_interval=1.0)
    executor.listener = guard_loop.on_exit
    guard_loop.on_registered = broker.open_if_flat
    reconciler = Reconciler(broker, guard_loop, metrics, AccountConfig("config", 1.0, 60.0, ()))
    executor.sizer = reconciler.exit_quantity
    await guard_loop.recover([])
    if not store.positions(active_only=False):
        await guard_loop.add(SPEC, source="api")
        assert await reconciler.reconcile(5.0)  # the broker shows it held: confirmed
        store.record_paper_trade("BOSCHLTD", "sell", 10, 480.0, time.time())  # the bot

    if pause:

        async def hold(holdings: list[Holding]) -> None:
            print("AT read", flush=True)
            await asyncio.Event().wait()

        reconciler.after_read = hold
    assert await reconciler.reconcile(5.0)
    book.update("BOSCHLTD", 440.0, None, PriceSource.POLL, time.monotonic())
    guard_loop.evaluate(["BOSCHLTD"])
    await executor.drain(10.0)
    summary = {
        "fills": store.paper_fill_count(),
        "external": len(store.external_closes()),
        "positions": {p.symbol: p.state.value for p in store.positions(active_only=False)},
        "net": [h.quantity for h in store.paper_positions()],
    }
    print(json.dumps(summary), flush=True)
    store.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("state_dir", type=Path)
    parser.add_argument("--pause-after-read", action="store_true")
    args = parser.parse_args()
    asyncio.run(main(args.state_dir, args.pause_after_read))
