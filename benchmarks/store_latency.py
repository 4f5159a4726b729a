"""What a journal write costs on each store backend (issue 15): the write before every send.

    .venv/bin/python benchmarks/store_latency.py [--writes N] [--url postgresql://...]

For each backend, N exits are journalled (`journal_exit`: the exit and its
position's move to exiting, one transaction) and each is marked `sent`
(`update_exit`, the write right before a broker call), one after the other;
each call is timed, and the median and the 99th percentile printed.

- SQLite: a temporary state dir (WAL, synchronous=FULL: each commit is on
  disk when it returns, as in the daemon);
- PostgreSQL, without and with the fence (each write transaction first proves
  that its session holds the leader's lock, as on a leader): `--url` names a
  database to use (its tables are created if missing, rows added); without it,
  a throw-away loopback cluster is made as the tests make theirs
  (tests/integration/pg_cluster.py), with fsync off: the figures are then the
  protocol's and the server's cost, not a disk's.

Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable
from pathlib import Path

from from_tests import load

from tickguard.core.exits import Exit
from tickguard.core.positions import ExitReason, Position, PositionSpec, PositionState, Side
from tickguard.core.prices import PriceSource
from tickguard.store import AsyncStore, Store
from tickguard.store_pg import PostgresStore


async def journal(store: AsyncStore, writes: int, tag: str) -> dict[str, list[float]]:
    """Time `writes` journal_exit + update_exit(sent) pairs; seconds per call, by call."""
    times: dict[str, list[float]] = {"journal_exit": [], "update_exit (sent)": []}
    wall = time.time()
    for i in range(writes):
        spec = PositionSpec(f"{tag}{i:05d}", Side.LONG, 10.0, 100.0, stop_loss=95.0)
        position = await store.add_position(spec, wall)
        exit = Exit(
            client_order_id=f"tg-{tag}-{position.id}-1",
            position_id=position.id,
            symbol=spec.symbol,
            side=spec.side,
            quantity=10.0,
            reason=ExitReason.STOP_LOSS,
            price_source=PriceSource.LIVE,
            trigger_price=94.0,
            decided_at=wall,
        )
        exiting = Position(
            position.id, spec, state=PositionState.EXITING, exit_id=exit.client_order_id
        )
        await timed(times["journal_exit"], store.journal_exit(exit, exiting, wall))
        await timed(times["update_exit (sent)"], store.update_exit(exit.sending(), wall))
    return times


async def timed(into: list[float], call: Awaitable[None]) -> None:
    started = time.perf_counter()
    await call
    into.append(time.perf_counter() - started)


def report(backend: str, times: dict[str, list[float]]) -> None:
    for call, seconds in times.items():
        ordered = sorted(seconds)
        p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
        print(
            f"{backend:<28} {call:<20} p50 {statistics.median(ordered) * 1e3:6.2f} ms"
            f"   p99 {p99 * 1e3:6.2f} ms   ({len(ordered)} calls)"
        )


async def measure(writes: int, url: str | None) -> None:
    with tempfile.TemporaryDirectory() as state:
        sqlite = Store.in_dir(Path(state))
        report("SQLite (synchronous=FULL)", await journal(sqlite.aio, writes, "s"))
        sqlite.close()
    server = None
    if url is None:
        server = load("pg_cluster").PgServer.create()
        url = server.new_database()
    try:
        pg = await PostgresStore.open(url)
        tag = f"p{int(time.time())}"
        report("PostgreSQL", await journal(pg, writes, tag))
        assert await pg.try_lead("benchmark") is not None, "another session leads this store"
        pg.fence()
        report("PostgreSQL, fenced (leader)", await journal(pg, writes, tag + "f"))
        await pg.close()
    finally:
        if server is not None:
            server.destroy()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--writes", type=int, default=500)
    parser.add_argument("--url", default=None)
    args = parser.parse_args(argv)
    asyncio.run(measure(args.writes, args.url))
    return 0


if __name__ == "__main__":
    sys.exit(main())
