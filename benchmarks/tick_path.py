"""How fast tickguard handles ticks, next to a bare json.loads loop; the sweep; memory.

    .venv/bin/python benchmarks/tick_path.py [--ticks N] [--repeat R]

The live path without the network, on the frames of issue 13: 5,000 symbols
subscribed, 1,000 of them guarded (long, stop at half the price, target at
twice, a trailing stop 30% away: levels the random walk never crosses), a
`json` frame of 1 tick and one of 100 ticks. Per frame it does what
FeedSupervisor._receive does between two recv(): a clock read, the protocol's
`decode`, and the `PriceIntake`, which records the ticks in the price book,
counts them in a metrics registry of its own and hands the symbols taken to
`GuardLoop.on_prices`. Next to it, on the same frames, the bare loop a client
would run: `json.loads` and a tick count. Every figure is the best of
--repeat runs (the machine is shared: the best run is the least disturbed).

Stages, to tell where the time goes: decode alone, decode and intake with
`on_prices` doing nothing, and the whole path. Only public entry points that
every version of the daemon has are used, so the same file measures an older
checkout (PYTHONPATH=<old>/daemon) for before/after figures.

Prints figures; asserts nothing (numbers depend on the machine). The
end-to-end figures (daemon, feed server and bare client in processes of their
own) come from benchmarks/e2e.py.
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from datetime import UTC
from pathlib import Path

from from_tests import finish
from prometheus_client import CollectorRegistry

from tickguard.brokers.paper import PaperBroker
from tickguard.core.guard import BlindPolicy, Guard
from tickguard.core.market import MarketCalendar
from tickguard.core.positions import Position, PositionSpec, Side
from tickguard.core.prices import PriceBook, PriceSource
from tickguard.executor import ExitExecutor
from tickguard.feed.intake import PriceIntake
from tickguard.feed.json_protocol import JsonProtocol
from tickguard.guard_loop import GuardLoop
from tickguard.metrics import Metrics
from tickguard.store import Store

SYMBOLS = 5000
GUARDED = 1000
SHAPES = (1, 100)  # ticks per frame
LIVE = PriceSource.LIVE


STAMP = 1_700_000_000_000  # exchange times: STAMP + the tick's number; a run adds RUN_STAMP


def make_frames(
    symbols: list[str], start: dict[str, float], per_frame: int, ticks: int
) -> list[str]:
    """`ticks` ticks in frames of `per_frame`: a random walk, exchange times increasing."""
    rng = random.Random(per_frame)
    prices = dict(start)
    frames = []
    stamp = STAMP
    for _ in range(ticks // per_frame):
        entries = []
        for symbol in rng.sample(symbols, per_frame):
            prices[symbol] *= 1 + rng.gauss(0, 0.0005)
            stamp += 1
            entries.append({"symbol": symbol, "price": round(prices[symbol], 2), "ts": stamp})
        message = (
            {"type": "tick", **entries[0]}
            if per_frame == 1
            else {"type": "ticks", "ticks": entries}
        )
        frames.append(json.dumps(message))
    return frames


class Rig:
    """The price book, the guard with its positions, the guard loop and a live intake."""

    def __init__(self, symbols: list[str], prices: dict[str, float], state: Path) -> None:
        self.book = PriceBook(stale_warning=30.0, cache_timeout=300.0)
        self.guard = Guard(
            self.book, blind_policy=BlindPolicy.HOLD, blind_after=300.0, install_id="bench"
        )
        self.store = Store.in_dir(state)
        executor = ExitExecutor(self.guard, self.store, PaperBroker(self.store, lambda s: None))
        market = MarketCalendar(UTC, (), frozenset(), frozenset(), always_open=True)
        self.metrics = Metrics(CollectorRegistry())
        self.loop = GuardLoop(
            self.guard, self.store, executor, self.metrics, market, sweep_interval=1.0
        )
        for i, symbol in enumerate(symbols[:GUARDED]):
            p = prices[symbol]
            spec = PositionSpec(
                symbol,
                Side.LONG,
                10,
                p,
                stop_loss=p * 0.5,
                take_profit=p * 2,
                trailing_stop=p * 0.3,
            )
            self.guard.add(Position(i + 1, spec), time.monotonic())
        self.book.channel_up(LIVE, time.monotonic())
        self.protocol = JsonProtocol()
        self.known = frozenset(symbols)

    def intake(self, on_prices: Callable[[list[str], PriceSource], None]) -> PriceIntake:
        return PriceIntake(self.book, self.metrics, on_prices, LIVE)


class Runs:
    """The frames of each run, their exchange times newer than any run's before (`"ts": 17RR…`
    for run RR): replayed as they were, every tick would be older than the book's price
    and refused, and the path would do a fraction of its work."""

    def __init__(self, frames: list[str]) -> None:
        assert all('"ts": 1700' in frame for frame in frames)
        self.frames = frames
        self.run = 0

    def next(self) -> list[str]:
        self.run += 1
        assert self.run < 100
        prefix = f'"ts": 17{self.run:02d}'
        return [frame.replace('"ts": 1700', prefix) for frame in self.frames]


def timed(runs: Runs, stage: Callable[[list[str]], object], repeat: int) -> float:
    """Best wall time of `repeat` runs of `stage` over fresh frames, garbage collector on (as
    in the daemon)."""
    best = float("inf")
    for _ in range(repeat):
        frames = runs.next()
        gc.collect()
        started = time.perf_counter()
        stage(frames)
        best = min(best, time.perf_counter() - started)
    return best


def bare(frames: list[str]) -> int:
    n = 0
    for frame in frames:
        message = json.loads(frame)
        n += len(message["ticks"]) if message["type"] == "ticks" else 1
    return n


def measure(rig: Rig, runs: Runs, repeat: int) -> dict[str, float]:
    """Best seconds of each stage, and of the bare loop, on the same frames."""
    decode, known, mono = rig.protocol.decode, rig.known, time.monotonic
    quiet = rig.intake(lambda symbols, source: None)
    full = rig.intake(rig.loop.on_prices)

    def decode_only(frames: list[str]) -> None:
        for frame in frames:
            decode(frame, known)

    def with_intake(frames: list[str], intake: PriceIntake = quiet) -> None:
        take = intake.take
        for frame in frames:
            take(decode(frame, known), mono())

    def whole(frames: list[str]) -> None:
        with_intake(frames, full)

    whole(runs.next())  # warm: every guarded position priced, its trailing anchor set
    return {
        "bare json.loads": timed(runs, bare, repeat),
        "decode": timed(runs, decode_only, repeat),
        "decode + intake": timed(runs, with_intake, repeat),
        "whole path": timed(runs, whole, repeat),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ticks", type=int, default=200_000, help="ticks per shape and run")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    rng = random.Random(1)
    symbols = [f"SYM{i:04d}" for i in range(SYMBOLS)]
    prices = {s: round(rng.uniform(100, 3000), 2) for s in symbols}
    with tempfile.TemporaryDirectory() as state:
        rig = Rig(symbols, prices, Path(state))
        print(
            f"{SYMBOLS} symbols subscribed, {GUARDED} guarded;"
            f" {args.ticks} ticks per run, best of {args.repeat}"
        )
        for per_frame in SHAPES:
            frames = make_frames(symbols, prices, per_frame, args.ticks)
            ticks = len(frames) * per_frame
            figures = measure(rig, Runs(frames), args.repeat)
            base = figures["bare json.loads"]
            print(f"\n{per_frame} tick(s) per frame ({len(frames)} frames):")
            for name, elapsed in figures.items():
                print(
                    f"  {name:16} {ticks / elapsed:>11,.0f} ticks/s"
                    f"  {elapsed / ticks * 1e6:6.2f} us/tick  {base / elapsed:5.2f}x bare"
                )

        sweeps = 20
        started = time.perf_counter()
        for _ in range(sweeps):
            rig.guard.sweep(time.monotonic(), time.time(), True)
        elapsed = time.perf_counter() - started
        print(f"\nsweep of {GUARDED} positions: {elapsed / sweeps * 1e3:.2f} ms")
        started = time.perf_counter()
        for _ in range(sweeps):
            # the guard's, then the loop's: [FALLBACK] lines, anchors, gauges
            finish(rig.loop.sweep())
        elapsed = time.perf_counter() - started
        print(f"the guard loop's whole sweep: {elapsed / sweeps * 1e3:.2f} ms")
        rig.store.close()

    tracemalloc.start()
    big = PriceBook(stale_warning=30.0, cache_timeout=300.0)
    before = tracemalloc.take_snapshot()
    for i in range(50_000):
        big.update(f"INSTR{i:05d}", 100.0 + i, 1_700_000_000_000, PriceSource.LIVE, 1.0)
    after = tracemalloc.take_snapshot()
    size = sum(stat.size_diff for stat in after.compare_to(before, "filename"))
    print(
        f"price book memory: {size / 50_000:.0f} bytes per symbol (50,000 symbols: {size / 2**20:.1f} MiB)"
    )


if __name__ == "__main__":
    main()
