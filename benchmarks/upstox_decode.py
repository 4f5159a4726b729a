"""How fast tickguard decodes Upstox frames, against the bare protobuf runtime (upb).

    .venv/bin/python benchmarks/upstox_decode.py [--instruments 50] [--repeat 15]

FeedResponse frames built with the code generated from Upstox's
MarketDataFeedV3.proto: an `ltpc` frame of N instruments (the mode tickguard
subscribes in), a `full` frame of N (marketFF: five depth levels, greeks, two
OHLC bars; every fifth instrument an index, indexFF), and an `ltpc` frame of
one instrument (`ltpc1`: what a frame costs beside its entries). For each,
µs per frame:

- bare upb: `FeedResponse().ParseFromString(frame)`, nothing read;
- upb+read: that parse, then each entry's key, ltp and ltt read from the map
  (the least any user of the parsed message does);
- tickguard: `UpstoxProtocol.decode`, every check included, a `Tick` made
  per entry;
- entries: what tickguard's decode reads, and no more: the frame parsed as
  upstox_wire.proto's FeedEntries (the feeds map as the repeated entries it
  is on the wire) and each entry's key, ltp and ltt read. tickguard-entries
  is the rest: the checks, the Ticks, the frame's own costs.

Each figure is the best of --repeat rounds; a round times every candidate in
turn for at least 0.1 s of this process's CPU time (time.process_time: other
work on the machine does not count, and all candidates meet the same
moods of a shared machine). Prints figures and ratios; asserts only that
the decoder found every tick (numbers depend on the machine).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

from tickguard.feed import MarketDataFeedV3_pb2 as v3
from tickguard.feed import upstox_wire_pb2 as wire
from tickguard.feed.upstox import UpstoxProtocol

LTT = 1_767_765_256_123  # epoch ms
MIN_RUN = 0.1  # CPU seconds per timed run


def keys(n: int) -> list[str]:
    return [f"NSE_EQ|INE{i:06d}A01018" for i in range(n)]


def ltpc_frame(symbols: list[str]) -> bytes:
    response = v3.FeedResponse(type=v3.live_feed, currentTs=LTT + 5)
    for i, key in enumerate(symbols):
        ltpc = response.feeds[key].ltpc
        ltpc.ltp, ltpc.ltt, ltpc.ltq, ltpc.cp = 2500.5 + i, LTT + i, 10 + i, 2490.0
    return response.SerializeToString()


def _ohlc(bars: v3.MarketOHLC, close: float) -> None:
    for interval, ts in (("1d", LTT - 36_000_000), ("I1", LTT - 60_000)):
        bars.ohlc.add(
            interval=interval, open=close - 20, high=close + 5, low=close - 30, close=close,
            vol=123_456, ts=ts,
        )  # fmt: skip


def full_frame(symbols: list[str]) -> bytes:
    response = v3.FeedResponse(type=v3.live_feed, currentTs=LTT + 5)
    for i, key in enumerate(symbols):
        feed = response.feeds[key]
        feed.requestMode = v3.full_d5
        price = 2500.5 + i
        if i % 5 == 4:
            index = feed.fullFeed.indexFF
            index.ltpc.ltp, index.ltpc.ltt, index.ltpc.cp = price, LTT + i, price - 10
            _ohlc(index.marketOHLC, price)
            continue
        market = feed.fullFeed.marketFF
        market.ltpc.ltp, market.ltpc.ltt, market.ltpc.ltq, market.ltpc.cp = (
            price, LTT + i, 10 + i, price - 10,
        )  # fmt: skip
        for level in range(5):
            market.marketLevel.bidAskQuote.add(
                bidQ=100 + level, bidP=price - 0.05 * (level + 1),
                askQ=200 + level, askP=price + 0.05 * (level + 1),
            )  # fmt: skip
        greeks = market.optionGreeks
        greeks.delta, greeks.theta, greeks.gamma, greeks.vega, greeks.rho = (
            0.5,
            -1.2,
            0.01,
            3.4,
            0.2,
        )
        _ohlc(market.marketOHLC, price)
        market.atp, market.vtt, market.oi, market.iv = price - 3, 1_234_567 + i, 5_000.0, 0.18
        market.tbq, market.tsq = 10_000.0, 12_000.0
    return response.SerializeToString()


def _calls(fn: Callable[[], object]) -> int:
    """How many calls of `fn` last at least MIN_RUN of CPU time."""
    calls = 1
    while True:
        started = time.process_time()
        for _ in range(calls):
            fn()
        if time.process_time() - started >= MIN_RUN:
            return calls
        calls *= 2


def best_of(candidates: dict[str, Callable[[], object]], repeat: int) -> dict[str, float]:
    """Best CPU µs per call of each candidate over `repeat` rounds; a round times each in
    turn, so all of them meet the machine in the same moods."""
    calls = {name: _calls(fn) for name, fn in candidates.items()}
    best = dict.fromkeys(candidates, float("inf"))
    for _ in range(repeat):
        for name, fn in candidates.items():
            n = calls[name]
            started = time.process_time()
            for _ in range(n):
                fn()
            best[name] = min(best[name], (time.process_time() - started) / n)
    return {name: seconds * 1e6 for name, seconds in best.items()}


def read_each(frame: bytes) -> None:
    """upb's parse, then each entry's key, ltp and ltt, wherever its mode put them."""
    response = v3.FeedResponse()
    response.ParseFromString(frame)
    for key, feed in response.feeds.items():
        member = feed.WhichOneof("FeedUnion")
        if member == "ltpc":
            ltpc = feed.ltpc
        elif member == "fullFeed":
            full = feed.fullFeed
            ltpc = full.marketFF.ltpc if full.HasField("marketFF") else full.indexFF.ltpc
        else:
            ltpc = feed.firstLevelWithGreeks.ltpc
        _ = key, ltpc.ltp, ltpc.ltt


def read_entries(frame: bytes) -> None:
    """The frame parsed as FeedEntries, then each entry's key, ltp and ltt, wherever its
    mode put them (ltpc, or the full mode's marketFF or indexFF)."""
    for entry in wire.FeedEntries.FromString(frame).feeds:
        feed = entry.value
        if feed.HasField("ltpc"):
            ltpc = feed.ltpc
        else:
            full = feed.fullFeed
            ltpc = full.marketFF.ltpc if full.HasField("marketFF") else full.indexFF.ltpc
        _ = entry.key, ltpc.ltp, ltpc.ltt


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--instruments", type=int, default=50, help="entries per frame (50)")
    parser.add_argument("--repeat", type=int, default=15, help="timed rounds, best taken (15)")
    args = parser.parse_args()
    symbols = keys(args.instruments)
    known = frozenset(symbols)
    protocol = UpstoxProtocol()
    print(f"{args.instruments} instruments a frame; CPU µs per frame, best of {args.repeat} rounds")
    print(
        f"{'frame':<6} {'bytes':>6} {'bare upb':>9} {'upb+read':>9} {'tickguard':>10} "
        f"{'x bare':>7} {'x read':>7} {'entries':>8} {'tickguard-entries':>18}"
    )
    frames = (
        ("ltpc", ltpc_frame(symbols), args.instruments),
        ("full", full_frame(symbols), args.instruments),
        ("ltpc1", ltpc_frame(symbols[:1]), 1),
    )
    for name, frame, entries_in in frames:
        decoded = protocol.decode(frame, known)
        assert len(decoded.ticks) == entries_in and not decoded.errors, decoded.errors[:3]
        us = best_of(
            {
                "bare": lambda f=frame: v3.FeedResponse().ParseFromString(f),
                "read": lambda f=frame: read_each(f),
                "ours": lambda f=frame: protocol.decode(f, known),
                "entries": lambda f=frame: read_entries(f),
            },
            args.repeat,
        )
        bare, read, ours, entries = us["bare"], us["read"], us["ours"], us["entries"]
        print(
            f"{name:<6} {len(frame):>6} {bare:>9.1f} {read:>9.1f} {ours:>10.1f} "
            f"{ours / bare:>6.1f}x {ours / read:>6.2f}x {entries:>8.1f} {ours - entries:>18.1f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
