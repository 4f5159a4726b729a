"""What the safety net costs the guard loop (issue 14): one `SafetyNet.step()` with N positions.

    .venv/bin/python benchmarks/safety_net.py [--positions N] [--steps S] [--no-memo]

A real `SafetyNet` on a real store (a temporary directory) and the paper broker,
with N guarded long positions whose stops are all placed already (the token
bucket is set aside for the set-up). Then S steps are timed in each of two
states of the book:

- *steady*: nothing changed since the last step (most steps of a day);
- *trailing*: every position's trailing anchor rose since the last step (a market
  moving up in one go: each position is a new object, its stop is worked out
  again; the moves themselves wait for MOVE_EVERY, as in the daemon).

A step runs every PLAN_EVERY (0.5 s) on the guard loop's event loop, so its
time is time no price is judged. Printed: the median and the worst step.
`--no-memo` forgets the planner's memo before every step (as the first
version, which worked out every position's stop at every step).
Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import statistics
import sys
import tempfile
import time
from pathlib import Path

from prometheus_client import CollectorRegistry

from tickguard.brokers.paper import PaperBroker
from tickguard.core.guard import BlindPolicy, Guard
from tickguard.core.positions import PositionSpec, Side
from tickguard.core.prices import PriceBook, PriceSource
from tickguard.core.safety_net import RateLimit
from tickguard.metrics import Metrics
from tickguard.safety_net import CALL_BURST, CALLS_PER_SECOND, SafetyNet
from tickguard.store import Store


async def measure(positions: int, steps: int, state_dir: Path, memo: bool = True) -> None:
    store = Store.in_dir(state_dir)
    book = PriceBook(stale_warning=30.0, cache_timeout=300.0)
    now = time.monotonic()
    book.channel_up(PriceSource.LIVE, now)
    guard = Guard(book, blind_policy=BlindPolicy.HOLD, blind_after=300.0, install_id="bench")

    def price_of(symbol: str) -> float | None:
        price = book.get(symbol)
        return price.value if price else None

    broker = PaperBroker(store, price_of)
    net = SafetyNet(broker, guard, store, Metrics(CollectorRegistry()), 1.0)
    for i in range(positions):
        spec = PositionSpec(f"SYM{i:05d}", Side.LONG, 10.0, 100.0, 95.0, None, 3.0)
        guard.add(store.add_position(spec, time.time()), now)
        book.update(spec.symbol, 100.0, None, PriceSource.LIVE, now)
    net.limit = RateLimit(1e9, positions)  # set-up only: place every stop at once
    await net.step()
    net.limit = RateLimit(CALLS_PER_SECOND, CALL_BURST)
    assert net.covered() == positions, net.covered()
    gc.freeze()  # as the daemon does at READY (tickguard.app)

    if not memo:
        net._memo = _Forgetful()  # a benchmark's switch
    steady = [await _timed(net) for _ in range(steps)]
    trailing = []
    for round_ in range(steps):
        price = 100.0 + 0.1 * (round_ + 1)
        for position in guard.positions():  # judged by the guard: its trailing anchor rises
            book.update(position.symbol, price, None, PriceSource.LIVE, time.monotonic())
            guard.evaluate(position.symbol, time.monotonic(), time.time(), True)
        trailing.append(await _timed(net))
    for name, times in (("steady", steady), ("trailing", trailing)):
        print(
            f"{name:<9} {positions} positions: step median {statistics.median(times) * 1e3:.2f} ms,"
            f" worst {max(times) * 1e3:.2f} ms ({steps} steps)"
        )
    store.close()


class _Forgetful(dict):  # type: ignore[type-arg]
    """A memo that never remembers."""

    def __setitem__(self, key: object, value: object) -> None:
        pass


async def _timed(net: SafetyNet) -> float:
    started = time.perf_counter()
    await net.step()
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--positions", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--no-memo", action="store_true")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        asyncio.run(measure(args.positions, args.steps, Path(tmp), not args.no_memo))
    gc.unfreeze()
    return 0


if __name__ == "__main__":
    sys.exit(main())
