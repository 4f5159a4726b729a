"""What a socket drop costs the guard loop in `[FALLBACK]` lines, with 1,000 positions (issue 13).

    .venv/bin/python benchmarks/fallback_burst.py [--positions N] [--repeat R]
                                                  [--handler daemon|queue|off]

A `GuardLoop` with N guarded positions (no network: the price book is moved
by hand) goes through one outage R times, and each sweep that starts, changes
or ends the fallback condition of every symbol at once is timed:

- *drop*: the socket goes down, every price turns into `cache`;
- *poll*: the poll prices every symbol, `cache` becomes `poll`;
- *quiet*: a sweep with nothing new to say (the floor: what a sweep costs);
- *live*: live prices are back for every symbol.

Log records go where the daemon's go: stderr, here a pipe read by a `cat`
process as journald would read it. `--handler daemon` is the checkout's own
setup (`tickguard.cli.configure_logging`), `queue` puts the same handler
behind a `logging.handlers.QueueHandler` and a `QueueListener` thread (the
other candidate of issue 13), `off` discards every record below CRITICAL.
Printed: per phase the median sweep time, the `[FALLBACK]` records logged,
and for `queue` how long the listener took to write them after the sweep.

Prints figures; asserts nothing. Only entry points every version has are
used, so the same file measures an older checkout (PYTHONPATH=<old>/daemon).
"""

from __future__ import annotations

import argparse
import logging
import logging.handlers
import os
import queue
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC
from pathlib import Path

from from_tests import finish
from prometheus_client import CollectorRegistry

from tickguard import cli
from tickguard.brokers.paper import PaperBroker
from tickguard.core.guard import BlindPolicy, Guard
from tickguard.core.market import MarketCalendar
from tickguard.core.positions import Position, PositionSpec, Side
from tickguard.core.prices import PriceBook, PriceSource
from tickguard.executor import ExitExecutor
from tickguard.guard_loop import GuardLoop
from tickguard.metrics import Metrics
from tickguard.store import Store

LIVE, POLL = PriceSource.LIVE, PriceSource.POLL
PHASES = ("drop", "poll", "quiet", "live")


class Counted(logging.Filter):
    """Counts the `[FALLBACK]` records the guard loop's logger lets through."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def filter(self, record: logging.LogRecord) -> bool:
        if str(record.msg).startswith("[FALLBACK]"):
            self.count += 1
        return True


def stderr_to_pipe() -> subprocess.Popen[bytes]:
    """fd 2 becomes a pipe that a `cat` process drains, as journald drains the daemon's."""
    reader = subprocess.Popen(["cat"], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL)
    assert reader.stdin is not None
    sys.stderr.flush()
    os.dup2(reader.stdin.fileno(), 2)
    reader.stdin.close()
    return reader


def install(handler: str) -> Callable[[], None]:
    """Set up logging as `handler` says; a function that waits until every record is written."""
    cli.configure_logging("info")
    if handler == "off":
        logging.getLogger().setLevel(logging.CRITICAL)
        return lambda: None
    if handler == "queue":
        root = logging.getLogger()
        target = root.handlers[-1]
        root.removeHandler(target)
        records: queue.Queue[logging.LogRecord] = queue.Queue()
        root.addHandler(logging.handlers.QueueHandler(records))
        logging.handlers.QueueListener(records, target).start()  # a daemon thread
        return records.join
    return lambda: None


class Rig:
    """A guard loop with `positions` long positions far from their levels, and its price book."""

    def __init__(self, positions: int, state: Path) -> None:
        self.symbols = [f"SYM{i:04d}" for i in range(positions)]
        self.book = PriceBook(stale_warning=30.0, cache_timeout=300.0)
        self.guard = Guard(
            self.book, blind_policy=BlindPolicy.HOLD, blind_after=300.0, install_id="bench"
        )
        self.store = Store.in_dir(state)
        executor = ExitExecutor(self.guard, self.store, PaperBroker(self.store, lambda s: None))
        market = MarketCalendar(UTC, (), frozenset(), frozenset(), always_open=True)
        self.loop = GuardLoop(
            self.guard, self.store, executor, Metrics(CollectorRegistry()), market,
            sweep_interval=1.0,
        )  # fmt: skip
        now = time.monotonic()
        for i, symbol in enumerate(self.symbols):
            spec = PositionSpec(symbol, Side.LONG, 10, 500.0, stop_loss=100.0, take_profit=900.0)
            self.guard.add(Position(i + 1, spec), now)
        self.ts = 1_700_000_000_000

    def prices(self, source: PriceSource) -> None:
        now = time.monotonic()
        self.book.channel_up(source, now)
        self.ts += 1
        for symbol in self.symbols:
            self.book.update(symbol, 500.0, self.ts, source, now)

    def to(self, phase: str) -> None:
        if phase == "drop":
            self.book.channel_down(LIVE)
        elif phase == "poll":
            self.prices(POLL)
        elif phase == "live":
            self.book.channel_down(POLL)
            self.prices(LIVE)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--positions", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--handler", choices=("daemon", "queue", "off"), default="daemon")
    args = parser.parse_args()
    reader = stderr_to_pipe()
    drain = install(args.handler)
    counted = Counted()
    logging.getLogger("tickguard.guard_loop").addFilter(counted)
    sweeps: dict[str, list[float]] = {p: [] for p in PHASES}
    lines: dict[str, list[int]] = {p: [] for p in PHASES}
    drained: dict[str, list[float]] = {p: [] for p in PHASES}
    with tempfile.TemporaryDirectory() as state:
        rig = Rig(args.positions, Path(state))
        rig.prices(LIVE)
        finish(rig.loop.sweep())
        for _ in range(args.repeat):
            for phase in PHASES:
                rig.to(phase)
                before = counted.count
                started = time.perf_counter()
                finish(rig.loop.sweep())
                swept = time.perf_counter()
                drain()
                sweeps[phase].append(swept - started)
                drained[phase].append(time.perf_counter() - swept)
                lines[phase].append(counted.count - before)
        rig.store.close()
    print(
        f"{args.positions} positions, handler {args.handler}, median of {args.repeat} outages;"
        " stderr: a pipe drained by cat"
    )
    for phase in PHASES:
        note = ""
        if args.handler == "queue":
            note = f", written {statistics.median(drained[phase]) * 1e3:6.2f} ms after"
        print(
            f"  {phase:5} sweep {statistics.median(sweeps[phase]) * 1e3:7.2f} ms"
            f"  [FALLBACK] records {statistics.median(lines[phase]):5.0f}{note}"
        )
    logging.shutdown()
    os.close(2)
    reader.wait()


if __name__ == "__main__":
    main()
