"""The API load scenario of issue 12: a burst of concurrent requests must not hurt the guard.

    python api_load.py WORK_DIR [--requests 1000] [--positions 50] [--json]
    python api_load.py --client URL REQUESTS      (the load generator; internal)

The real daemon runs as a subprocess (`tickguard run`: paper broker,
SQLite) with a systemd notify socket this process reads and
WATCHDOG_USEC=1 s, so it pings every 0.5 s. Its feed is a `json` WebSocket
server here (loopback, port 0) that keeps prices moving. Once it is READY, a
separate load-generator process opens REQUESTS connections at once, each one
request, spread evenly over `connection-health`, `/metrics` and
`/api/v1/positions`. As the first answer reaches the generator, the feed
sends a price crossing one position's stop, stamped with the wall-clock time
it is sent (`ts`). Measured, all from the daemon's own evidence:

- event-loop lag: the daemon's `tickguard_event_loop_lag_observed_seconds`
  histogram (a probe every 10 ms), its delta over the burst; p99 is read as
  the upper bound of the bucket holding the 99th percentile;
- watchdog cadence: the largest gap between two WATCHDOG=1 datagrams from
  READY to the end of the burst, timestamped by a thread blocked on the socket;
- the stop: the exit's journalled `decided_at` minus the crossing tick's `ts`
  (one machine, one wall clock; millisecond resolution);
- the API: answers by status, failures by kind, latency p50/p99/max.

The generator is its own process so that its work never delays this one's
feed or timestamps. Loopback only; bounded in count and time.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import itertools
import json
import math
import os
import re
import resource
import signal
import socket
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed

LOOPBACK = "127.0.0.1"
PATHS = ("/api/v1/monitoring/connection-health", "/metrics", "/api/v1/positions")
WATCHDOG_USEC = 1_000_000  # the daemon pings every 0.5 s; systemd would kill after 1 s
SWEEP_INTERVAL = 0.2  # the watchdog pings only on sweep progress: well under its 0.5 s
LAG_METRIC = "tickguard_event_loop_lag_observed_seconds"
UNIT_NOFILE = 65536  # systemd/tickguard.service
CROSS = "CROSSME"  # the position whose stop is crossed during the burst
STARTUP = 30.0
BURST_TIMEOUT = 120.0
LISTENING = r"\[HTTP\] listening on 127\.0\.0\.1:(\d+)"


@dataclass
class Report:
    requests: int
    statuses: dict[str, int]
    failures: dict[str, int]
    latency_p50: float
    latency_p99: float
    latency_max: float
    burst_seconds: float
    lag_samples: int
    lag_p99: float  # upper bound of the bucket holding the 99th percentile (inf: beyond all)
    lag_max_bucket: float
    watchdog_pings: int
    watchdog_max_gap: float
    watchdog_interval: float
    decided_after: float | None  # seconds from the crossing tick's ts to the exit's decided_at
    daemon_log: str = field(repr=False, default="")

    def lines(self) -> list[str]:
        ms = 1000.0
        decided = "none" if self.decided_after is None else f"{self.decided_after * ms:.0f} ms"
        return [
            f"{self.requests} concurrent requests in {self.burst_seconds:.2f} s:"
            f" answers {dict(sorted(self.statuses.items()))},"
            f" failures {dict(sorted(self.failures.items())) or 'none'};"
            f" latency p50 {self.latency_p50 * ms:.0f} ms, p99 {self.latency_p99 * ms:.0f} ms,"
            f" max {self.latency_max * ms:.0f} ms",
            f"event-loop lag p99 <= {self.lag_p99 * ms:g} ms over {self.lag_samples} probes"
            f" (largest bucket hit <= {self.lag_max_bucket * ms:g} ms)",
            f"watchdog: {self.watchdog_pings} pings, largest gap {self.watchdog_max_gap:.3f} s"
            f" (interval {self.watchdog_interval:g} s)",
            f"stop crossed during the burst decided {decided} after the tick was sent",
        ]


# -- the feed ----------------------------------------------------------------------------


class Feed:
    """A `json` feed: prices for every symbol on subscribe, then a steady trickle of ticks."""

    def __init__(self, prices: dict[str, float]) -> None:
        self.prices = dict(prices)
        self.clients: set[ServerConnection] = set()
        self.subscribed = asyncio.Event()
        self.port = 0

    async def handler(self, ws: ServerConnection) -> None:
        self.clients.add(ws)
        try:
            async for raw in ws:
                message = json.loads(raw)
                if message.get("op") == "subscribe":
                    await ws.send(self.frame(list(self.prices)))
                    self.subscribed.set()
        except ConnectionClosed:
            pass
        finally:
            self.clients.discard(ws)

    def frame(self, symbols: list[str]) -> str:
        ts = int(time.time() * 1000)
        ticks = [{"symbol": s, "price": self.prices[s], "ts": ts} for s in symbols]
        return json.dumps({"type": "ticks", "ticks": ticks})

    async def send(self, symbol: str, price: float) -> int:
        """Set and send one price; returns the `ts` it carries (epoch ms)."""
        self.prices[symbol] = price
        ts = int(time.time() * 1000)
        frame = json.dumps({"type": "tick", "symbol": symbol, "price": price, "ts": ts})
        for ws in list(self.clients):
            with contextlib.suppress(ConnectionClosed):
                await ws.send(frame)
        return ts

    async def trickle(self, symbols: list[str], per_second: float) -> None:
        """Background ticks: each symbol in turn, moving between its first price and 0.05%
        above it (never towards its stop), forever."""
        base = {s: self.prices[s] for s in symbols}
        i = 0
        while True:
            symbol = symbols[i % len(symbols)]
            up = round(base[symbol] * 1.0005, 2)
            await self.send(symbol, base[symbol] if self.prices[symbol] == up else up)
            i += 1
            await asyncio.sleep(1.0 / per_second)


# -- the notify socket -------------------------------------------------------------------


class NotifySocket:
    """systemd's notify socket, read by a thread that timestamps each datagram on arrival."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        path.unlink(missing_ok=True)
        self.sock.bind(str(path))
        self.messages: list[tuple[float, str]] = []
        self.ready = threading.Event()
        self.pinging = threading.Event()  # two pings seen after READY: the cadence is known
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while True:
            try:
                data = self.sock.recv(4096)
            except OSError:
                return
            text = data.decode(errors="replace")
            self.messages.append((time.monotonic(), text))
            if "READY=1" in text:
                self.ready.set()
            elif self.ready.is_set() and sum("WATCHDOG=1" in m for _, m in self.messages) >= 2:
                self.pinging.set()

    def pings(self, since: float, until: float) -> list[float]:
        return [t for t, m in self.messages if "WATCHDOG=1" in m and since <= t <= until]

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()


# -- the daemon --------------------------------------------------------------------------


def write_config(work: Path, feed_port: int, positions: int) -> tuple[Path, dict[str, float]]:
    prices = {f"LOAD{i:03d}": 100.0 + i for i in range(positions)}
    prices[CROSS] = 100.0
    entries = []
    for symbol, price in prices.items():
        entries.append(
            f'[[positions]]\nsymbol = "{symbol}"\nside = "long"\nquantity = 1\n'
            f"entry_price = {price}\nstop_loss = {round(price * 0.9, 2)}\n"
        )
    (work / "state").mkdir(parents=True, exist_ok=True)
    config = work / "config.toml"
    config.write_text(
        f'[daemon]\nstate_dir = "{work / "state"}"\n'
        f'[http]\nlisten = "{LOOPBACK}:0"\n'
        f'[feed]\nurl = "ws://{LOOPBACK}:{feed_port}/ws"\n'
        "[dns]\nfallback_servers = []\n"
        f"[guard]\nsweep_interval = {SWEEP_INTERVAL}\n"
        "[market]\nalways_open = true\n" + "\n".join(entries)
    )
    return config, prices


def unit_nofile() -> None:
    """The descriptor limit the shipped unit gives (LimitNOFILE=65536), as far as allowed."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = UNIT_NOFILE if hard == resource.RLIM_INFINITY else min(hard, UNIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


class Daemon:
    """`tickguard run` as a subprocess; its stderr lines kept (and written to `log`) as they come."""

    def __init__(self, process: asyncio.subprocess.Process, log: Path) -> None:
        self.process = process
        self.lines: list[str] = []
        self._log = log.open("w")
        self._waiters: list[tuple[re.Pattern[str], asyncio.Future[re.Match[str]]]] = []
        self._pump = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.process.stderr is not None
        async for raw in self.process.stderr:
            line = raw.decode(errors="replace")
            self.lines.append(line)
            self._log.write(line)
            for pattern, future in self._waiters:
                match = pattern.search(line)
                if match and not future.done():
                    future.set_result(match)
        self._log.close()

    async def line(self, pattern: str, timeout: float) -> re.Match[str]:
        """The first line (already seen or to come) matching `pattern`."""
        regex = re.compile(pattern)
        for line in self.lines:
            if match := regex.search(line):
                return match
        future: asyncio.Future[re.Match[str]] = asyncio.get_running_loop().create_future()
        self._waiters.append((regex, future))
        return await asyncio.wait_for(future, timeout)

    async def stop(self) -> None:
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.process.wait(), 15.0)
            except TimeoutError:
                self.process.kill()
                await self.process.wait()
        await self._pump


async def start_daemon(config: Path, notify: Path, log: Path) -> tuple[Daemon, int]:
    env = {**os.environ, "NOTIFY_SOCKET": str(notify), "WATCHDOG_USEC": str(WATCHDOG_USEC)}
    env.pop("WATCHDOG_PID", None)
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tickguard", "run", "--config", str(config),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE, env=env,
        preexec_fn=unit_nofile,
    )  # fmt: skip
    daemon = Daemon(process, log)
    try:
        listening = await daemon.line(LISTENING, STARTUP)
    except TimeoutError:
        await daemon.stop()
        raise RuntimeError("the daemon did not listen:\n" + "".join(daemon.lines[-40:])) from None
    return daemon, int(listening.group(1))


async def scrape_lag(session: aiohttp.ClientSession, base: str) -> dict[float, float]:
    """The lag histogram's cumulative bucket counts, by upper bound."""
    async with session.get(f"{base}/metrics") as response:
        text = await response.text()
    buckets: dict[float, float] = {}
    for family in text_string_to_metric_families(text):
        if family.name == LAG_METRIC:
            for sample in family.samples:
                if sample.name.endswith("_bucket"):
                    buckets[float(sample.labels["le"])] = sample.value
    return buckets


def lag_quantile(
    before: dict[float, float], after: dict[float, float], q: float
) -> tuple[int, float, float]:
    """(samples, bound of the q-quantile's bucket, bound of the largest bucket hit) of the delta."""
    bounds = sorted(after)
    delta = [after[b] - before.get(b, 0.0) for b in bounds]
    total = int(delta[-1]) if delta else 0
    if total == 0:
        return 0, math.nan, math.nan
    quantile = next(b for b, c in zip(bounds, delta, strict=True) if c >= q * total)
    largest = next(b for b, c in zip(bounds, delta, strict=True) if c >= total)
    return total, quantile, largest


async def decided_at(session: aiohttp.ClientSession, base: str, symbol: str) -> float | None:
    async with session.get(f"{base}/api/v1/exits") as response:
        exits = (await response.json())["exits"]
    for entry in exits:
        if entry["symbol"] == symbol and entry.get("client_order_id"):
            return datetime.fromisoformat(entry["decided_at"]).timestamp()
    return None


async def run(work: Path, requests: int, positions: int = 50) -> Report:
    """The scenario, start to end; the daemon is stopped (SIGTERM) before it returns."""
    feed = Feed({})
    server = await serve(feed.handler, LOOPBACK, 0)
    feed.port = next(iter(server.sockets)).getsockname()[1]
    config, prices = write_config(work, feed.port, positions)
    feed.prices = prices
    notify = NotifySocket(work / "notify.sock")
    log = work / "daemon.log"
    daemon, port = await start_daemon(config, notify.path, log)
    base = f"http://{LOOPBACK}:{port}"
    trickle: asyncio.Task[None] | None = None
    try:
        if not await asyncio.to_thread(notify.ready.wait, STARTUP):
            raise RuntimeError("no READY=1")
        await asyncio.wait_for(feed.subscribed.wait(), STARTUP)
        ready_at = time.monotonic()
        symbols = [s for s in prices if s != CROSS]
        trickle = asyncio.create_task(feed.trickle(symbols, per_second=200.0))
        async with aiohttp.ClientSession() as session:
            if not await asyncio.to_thread(notify.pinging.wait, STARTUP):
                raise RuntimeError("no WATCHDOG=1 pings")
            before = await scrape_lag(session, base)
            client = await asyncio.create_subprocess_exec(
                sys.executable, __file__, "--client", base, str(requests),
                stdout=asyncio.subprocess.PIPE,
            )  # fmt: skip
            assert client.stdout is not None
            started = await asyncio.wait_for(client.stdout.readline(), BURST_TIMEOUT)
            burst_from = time.monotonic()
            cross_ts = None
            if started.strip() == b"first answer":
                cross_ts = await feed.send(CROSS, 80.0)  # the stop is 90
            out, _ = await asyncio.wait_for(client.communicate(), BURST_TIMEOUT)
            burst_until = time.monotonic()
            result = json.loads(out)
            after = await scrape_lag(session, base)
            decided = None
            if cross_ts is not None:  # the decision is journalled before its [SL] line is logged
                await daemon.line(rf"\[SL\] {CROSS}:", BURST_TIMEOUT)
                at = await decided_at(session, base, CROSS)
                decided = None if at is None else at - cross_ts / 1000.0
        pings = notify.pings(ready_at, burst_until)
        gaps = [b - a for a, b in itertools.pairwise(pings)]
        # A ping due after the last one seen must not be overdue either.
        gaps.append(burst_until - pings[-1] if pings else burst_until - ready_at)
        samples, p99, largest = lag_quantile(before, after, 0.99)
        return Report(
            requests=requests,
            statuses=result["statuses"],
            failures=result["failures"],
            latency_p50=result["p50"],
            latency_p99=result["p99"],
            latency_max=result["max"],
            burst_seconds=burst_until - burst_from,
            lag_samples=samples,
            lag_p99=p99,
            lag_max_bucket=largest,
            watchdog_pings=len(notify.pings(burst_from, burst_until)),
            watchdog_max_gap=max(gaps),
            watchdog_interval=WATCHDOG_USEC / 2e6,
            decided_after=decided,
            daemon_log="".join(daemon.lines),
        )
    finally:
        if trickle is not None:
            trickle.cancel()
        await daemon.stop()
        server.close()
        notify.close()


# -- the load generator (its own process) ------------------------------------------------


async def generate(base: str, requests: int) -> dict[str, Any]:
    """REQUESTS connections at once, one request each; prints `first answer` on the first."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, requests + 256)), hard))
    statuses: Counter[str] = Counter()
    failures: Counter[str] = Counter()
    latencies: list[float] = []
    first = asyncio.Event()
    timeout = aiohttp.ClientTimeout(total=60.0)
    connector = aiohttp.TCPConnector(limit=0, force_close=True)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def one(i: int) -> None:
            started = time.monotonic()
            try:
                async with session.get(base + PATHS[i % len(PATHS)]) as response:
                    await response.read()
                    statuses[str(response.status)] += 1
            except Exception as exc:  # the kinds are the report
                failures[type(exc).__name__] += 1
            latencies.append(time.monotonic() - started)
            if not first.is_set():
                first.set()
                print("first answer", flush=True)

        await asyncio.gather(*(one(i) for i in range(requests)))
    latencies.sort()

    def pick(q: float) -> float:
        return latencies[min(len(latencies) - 1, int(q * len(latencies)))]

    return {
        "statuses": dict(statuses),
        "failures": dict(failures),
        "p50": pick(0.5),
        "p99": pick(0.99),
        "max": latencies[-1],
    }


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("work", nargs="?", type=Path)
    parser.add_argument("--client", nargs=2, metavar=("URL", "REQUESTS"))
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--positions", type=int, default=50)
    parser.add_argument("--json", action="store_true", help="end with the report as JSON")
    args = parser.parse_args()
    if args.client:
        result = asyncio.run(generate(args.client[0], int(args.client[1])))
        print(json.dumps(result), flush=True)
        return 0
    if args.work is None:
        parser.error("WORK_DIR is required")
    args.work.mkdir(parents=True, exist_ok=True)
    report = asyncio.run(run(args.work, args.requests, args.positions))
    print("\n".join(report.lines()), flush=True)
    if args.json:
        fields = {k: v for k, v in dataclasses.asdict(report).items() if k != "daemon_log"}
        print(json.dumps(fields), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
