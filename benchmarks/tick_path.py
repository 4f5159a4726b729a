"""How fast tickguard handles ticks, and what a large price book costs in memory.

    .venv/bin/python benchmarks/tick_path.py

Measures the per-tick work of the live path without the network: decoding a
`json` frame, updating the price book, and evaluating the guarded positions
the frame touched (what FeedSupervisor._receive and GuardLoop.on_prices do).
Prints figures; asserts nothing (numbers depend on the machine).
"""

from __future__ import annotations

import json
import random
import time
import tracemalloc

from tickguard.core.guard import BlindPolicy, Guard
from tickguard.core.positions import Position, PositionSpec, Side
from tickguard.core.prices import PriceBook, PriceSource
from tickguard.feed.json_protocol import JsonProtocol

SYMBOLS = 2000
GUARDED = 200
BATCH = 50  # ticks per frame
FRAMES = 4000


def main() -> None:
    rng = random.Random(1)
    symbols = [f"SYM{i:04d}" for i in range(SYMBOLS)]
    prices = {s: rng.uniform(100, 3000) for s in symbols}
    book = PriceBook(stale_warning=30.0, cache_timeout=300.0)
    guard = Guard(book, blind_policy=BlindPolicy.HOLD, blind_after=300.0, install_id="bench")
    for i, symbol in enumerate(symbols[:GUARDED]):
        p = prices[symbol]
        spec = PositionSpec(
            symbol, Side.LONG, 10, p, stop_loss=p * 0.5, take_profit=p * 2, trailing_stop=p * 0.3
        )
        guard.add(Position(i + 1, spec), 0.0)
    protocol = JsonProtocol()
    known = set(symbols)
    frames = []
    for n in range(FRAMES):
        ticks = []
        for symbol in rng.sample(symbols, BATCH):
            prices[symbol] *= 1 + rng.gauss(0, 0.0005)
            ticks.append(
                {"symbol": symbol, "price": round(prices[symbol], 2), "ts": 1_700_000_000_000 + n}
            )
        frames.append(json.dumps({"type": "ticks", "ticks": ticks}))
    book.channel_up(PriceSource.LIVE, 0.0)

    guarded = set(guard.symbols())
    started = time.perf_counter()
    decisions = 0
    for n, frame in enumerate(frames):
        now = n * 0.001
        decoded = protocol.decode(frame, known)
        updated = [
            t.symbol
            for t in decoded.ticks
            if book.update(t.symbol, t.price, t.exchange_ts, PriceSource.LIVE, now)
        ]
        for symbol in updated:
            if symbol in guarded:
                decisions += len(guard.evaluate(symbol, now, 0.0, True))
    elapsed = time.perf_counter() - started
    ticks = FRAMES * BATCH
    print(
        f"live path: {ticks} ticks in {FRAMES} frames of {BATCH}, {SYMBOLS} symbols, {GUARDED} guarded"
    )
    print(
        f"  {ticks / elapsed:,.0f} ticks/s, {elapsed / ticks * 1e6:.2f} us per tick ({decisions} exits decided)"
    )

    started = time.perf_counter()
    sweeps = 200
    for n in range(sweeps):
        guard.sweep(10.0 + n, 0.0, True)
    elapsed = time.perf_counter() - started
    print(f"sweep of {GUARDED} positions: {elapsed / sweeps * 1e3:.3f} ms")

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
