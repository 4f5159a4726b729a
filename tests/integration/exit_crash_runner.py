"""A small process that guards two positions and exits both, for the crash test.

    python exit_crash_runner.py STATE_DIR [--pause-at STEP]   (STEP: executor.CRASH_POINTS)

With --pause-at it prints `AT <step>` when every exit reached that step and
then waits forever, to be SIGKILLed. Without it, it recovers whatever the
state dir holds, finishes every exit, and prints a JSON summary.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

from tickguard.brokers.paper import PaperBroker, PaperFault
from tickguard.core.exits import Exit
from tickguard.core.guard import BlindPolicy, ExitDecided, Guard
from tickguard.core.orders import ExitOrder
from tickguard.core.positions import PositionSpec, Side
from tickguard.core.prices import PriceBook, PriceSource
from tickguard.executor import CRASH_POINTS, ExitExecutor, recover
from tickguard.store import Store

SPECS = (
    PositionSpec("LONGCO", Side.LONG, 10, 100.0, stop_loss=95.0),
    PositionSpec("SHORTCO", Side.SHORT, 5, 200.0, stop_loss=210.0),
)
PRICES = {"LONGCO": 94.0, "SHORTCO": 211.0}


async def main(state_dir: Path, pause_at: str | None) -> None:
    store = Store.in_dir(state_dir)
    book = PriceBook(stale_warning=30.0, cache_timeout=300.0)
    guard = Guard(
        book, blind_policy=BlindPolicy.HOLD, blind_after=300.0, install_id=store.install_id
    )

    def price_of(symbol: str) -> float | None:
        price = book.get(symbol)
        return price.value if price else None

    broker = PaperBroker(store, price_of)
    reached: set[str] = set()

    async def checkpoint(step: str, exit: Exit) -> None:
        if step != pause_at:
            return
        reached.add(exit.client_order_id)
        if len(reached) == len(SPECS):
            print(f"AT {step}", flush=True)
        await asyncio.Event().wait()

    async def after_accept(order: ExitOrder) -> None:
        # The exit is the guard's, found by id; the step is named as the test knows it.
        exit = guard.exit(order.client_order_id)
        assert exit is not None
        await checkpoint("accepted", exit)

    broker.after_accept = after_accept
    if pause_at == "retrying":  # the first send of each exit finds the broker unreachable
        broker.faults.extend([PaperFault.UNAVAILABLE] * len(SPECS))
    executor = ExitExecutor(guard, store, broker, checkpoint=checkpoint, order_timeout=5.0)
    now = time.monotonic()
    await recover(guard, store.aio, executor, now)
    if not store.positions(active_only=False):
        for spec in SPECS:
            guard.add(store.add_position(spec, time.time()), now)
    book.channel_up(PriceSource.POLL, now)
    for symbol, value in PRICES.items():
        book.update(symbol, value, None, PriceSource.POLL, now)
    for event in guard.sweep(now, time.time(), market_open=True):
        if isinstance(event, ExitDecided):
            executor.submit(event)
    if not await executor.drain(timeout=20.0):
        sys.exit("exits did not finish")
    summary = {
        "fills": store.paper_fill_count(),
        "positions": {p.symbol: p.state.value for p in store.positions(active_only=False)},
        "exits": [
            {"symbol": r.exit.symbol, "state": r.exit.state.value, "id": r.exit.client_order_id}
            for r in store.exits()
        ],
    }
    print(json.dumps(summary), flush=True)
    store.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("state_dir", type=Path)
    parser.add_argument("--pause-at", choices=CRASH_POINTS)
    args = parser.parse_args()
    asyncio.run(main(args.state_dir, args.pause_at))
