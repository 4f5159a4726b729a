"""The end-to-end benchmark of issue 13: the real daemon on its tick path, next to a bare loop.

    python e2e_scenarios.py feed LAYOUT PROTOCOL        the feed server (commands on stdin)
    python e2e_scenarios.py bare LAYOUT PROTOCOL URL TICKS   the bare receive loop
    python e2e_scenarios.py broker LAYOUT               the Upstox order API fake

benchmarks/e2e.py runs `run()` and prints the figures (tests/integration/
test_e2e_benchmark.py runs its `--quick` preset). Every part is its own
process, on loopback, bound to port 0; this one only orchestrates, reads
their lines and keeps the time. CLOCK_MONOTONIC is one clock for every
process of the machine, so a time stamped in the feed process and one
stamped here (or in the broker process) subtract.

The processes:

- the daemon: `python -m tickguard run --config X` with 5,000 symbols
  subscribed and 1,000 positions guarded whose levels the load never crosses,
  plus marker positions that the benchmark crosses on purpose, one each. Its
  stderr lines are read here as they come, each stamped on arrival;
- the feed server (`feed`): a WebSocket server for the `json` protocol or
  Upstox V3 (protobuf frames built with tests/integration/upstox/conftest.py's
  encoder), and an HTTP server for the `json` REST fallback or Upstox's
  authorize and LTP endpoints. Frames are encoded before a run and written to
  the socket as raw WebSocket frames in 64 KiB chunks, each once the kernel
  took the previous one: the feed costs next to nothing while a consumer is
  measured, and sends "as fast as the connection takes them";
- the bare loop (`bare`): a plain `websockets` client, subscribing the same
  symbols, `json.loads` (or the protobuf runtime's FeedResponse parser, each
  entry's key, ltp and ltt read) and a tick count per frame, on the same frames from the same server;
- the broker (`broker`): the Upstox order API fake of
  tests/integration/test_upstox_broker.py, run standalone, holding every
  guarded position in its account and stamping each place-order's arrival.

The run (`run`): the `json` daemon, with the broker fake, says READY=1;
then RSS and CPU under a steady load, the throughput runs (bare loop and
daemon in turn), tick to order, the zombie, the black hole and the socket
drop. Then a second daemon speaks Upstox's protocol to an Upstox feed (on
the paper broker: the feed process serves authorize and LTP on the API
host) for the throughput runs on protobuf frames. A scenario that fails is
recorded in `Report.failures` and the others still run. What is measured,
and how, is told at each scenario below.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import json
import math
import os
import re
import signal
import socket
import statistics
import struct
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from http import HTTPStatus
from pathlib import Path
from types import ModuleType
from typing import Any

LOOPBACK = "127.0.0.1"
HERE = Path(__file__).resolve().parent
UPSTOX_CONFTEST = HERE / "upstox" / "conftest.py"
BROKER_FAKES = HERE / "test_upstox_broker.py"
SEND_BUFFER = 128 << 10  # SO_SNDBUF of the feed's sockets (the kernel doubles it)
CHUNK = 64 << 10  # bytes of whole frames handed to the kernel at a time
STARTUP = 60.0  # seconds for the daemon to listen and say READY=1
RUN_TIMEOUT = 300.0  # one blast, one wait for a line
CROSS_PRICE = 80.0  # a marker's price through its stop (90)
MARKER_PRICE = 100.0
STOP_FRACTION = 0.9  # every stop 10% under its price; the load moves prices up 0.05%
UP = 1.0005
POLL_INTERVAL = 1.0  # feed.poll_interval
HEARTBEAT = 0.25  # seconds idle before the feed sends a heartbeat: no silence timeout unasked
MAX_CHILD_SECONDS = 1800.0  # a helper process never outlives this, whatever happens here
LISTENING = r"\[HTTP\] listening on 127\.0\.0\.1:(\d+)"


# -- the layout: symbols, prices, positions ----------------------------------------------


@dataclass
class Layout:
    """Who is who, shared by every process through a JSON file."""

    guarded: list[str]  # positions whose levels the load never crosses
    extra: list[str]  # subscribed, not guarded
    markers: list[str]  # positions crossed on purpose, each once
    prices: dict[str, float]  # every symbol's first price
    token: str  # the Upstox access token the fakes take

    @property
    def load(self) -> list[str]:
        """The symbols the load ticks, round robin (markers never get a load tick)."""
        return self.guarded + self.extra

    @property
    def subscribed(self) -> list[str]:
        return self.guarded + self.markers + self.extra

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self)))

    @classmethod
    def read(cls, path: Path) -> Layout:
        return cls(**json.loads(path.read_text()))


def make_layout(symbols: int, positions: int, markers: Sequence[str], token: str) -> Layout:
    guarded = [f"NSE_EQ|G{i:05d}" for i in range(positions)]
    marks = [f"NSE_EQ|{m}" for m in markers]
    extra = [f"NSE_EQ|S{i:05d}" for i in range(symbols - positions - len(marks))]
    prices = {s: float(100 + i % 900) for i, s in enumerate(guarded + extra)}
    prices.update(dict.fromkeys(marks, MARKER_PRICE))
    return Layout(guarded, extra, marks, prices, token)


# -- the daemon's config -----------------------------------------------------------------


@dataclass(frozen=True)
class FeedTimeouts:
    ping_interval: float = 5.0
    ping_timeout: float = 5.0
    silence_timeout: float = 10.0


def write_config(
    work: Path,
    layout: Layout,
    *,
    protocol: str,
    feed_url: str,
    fallback_url: str,
    api_url: str,
    broker: str,
    timeouts: FeedTimeouts,
) -> Path:
    """The daemon's config: every layout symbol subscribed, guarded and marker positions."""
    token_file = work / "upstox-token"
    token_file.write_text(layout.token + "\n")
    entries = []
    for i, symbol in enumerate(layout.guarded + layout.markers):
        price = layout.prices[symbol]
        # A stop 10% under, a target 50% over; every other guarded one also trails 5% under
        # its best price (a marker only has the stop its crossing tick goes through).
        trailing = ""
        if i % 2 and i < len(layout.guarded):
            trailing = f"trailing_stop = {round(price * 0.05, 2)}\n"
        entries.append(
            f'[[positions]]\nsymbol = "{symbol}"\nside = "long"\nquantity = 1\n'
            f"entry_price = {price}\nstop_loss = {round(price * STOP_FRACTION, 2)}\n"
            f"take_profit = {round(price * 1.5, 2)}\n{trailing}"
        )
    (work / "state").mkdir(parents=True, exist_ok=True)
    config = work / "config.toml"
    feed = (
        'protocol = "upstox"\nurl = ""\n'
        if protocol == "upstox"
        else f'url = "{feed_url}"\nfallback_url = "{fallback_url}"\n'
    )
    config.write_text(
        f'[daemon]\nstate_dir = "{work / "state"}"\n'
        f'[http]\nlisten = "{LOOPBACK}:0"\n'
        f"[feed]\n{feed}symbols = {json.dumps(layout.extra + layout.markers)}\n"
        f"ping_interval = {timeouts.ping_interval}\nping_timeout = {timeouts.ping_timeout}\n"
        f"silence_timeout = {timeouts.silence_timeout}\npoll_interval = {POLL_INTERVAL}\n"
        "[feed.reconnect]\ninitial_delay = 0.5\nmax_delay = 2.0\n"
        "[dns]\nfallback_servers = []\n"  # no packet leaves the machine
        "[market]\nalways_open = true\n"
        f'[broker]\nkind = "{broker}"\n'
        f'[upstox]\napi_url = "{api_url}"\nhft_url = "{api_url}"\ntoken_file = "{token_file}"\n'
        + "\n".join(entries)
    )
    return config


# -- lines from a child process, stamped on arrival ---------------------------------------


class Lines:
    """Every line a stream gave, with time.monotonic() at its arrival; waits for the next."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.items: list[tuple[float, str]] = []
        self.ended = False
        self._waiters: list[tuple[int, re.Pattern[str], asyncio.Future[tuple[float, str]]]] = []

    def mark(self) -> int:
        """An index: `wait(..., since=mark)` sees only lines from now on."""
        return len(self.items)

    def add(self, text: str) -> None:
        item = (time.monotonic(), text)
        self.items.append(item)
        for since, pattern, future in self._waiters:
            if not future.done() and len(self.items) > since and pattern.search(text):
                future.set_result(item)

    def end(self) -> None:
        """The stream closed (the process ended): nothing more will match."""
        self.ended = True
        for _, pattern, future in self._waiters:
            if not future.done():
                future.set_exception(RuntimeError(self._missing(pattern.pattern, "it ended")))

    def _missing(self, pattern: str, why: str) -> str:
        last = self.items[-1][1] if self.items else "nothing"
        return f"{self.name}: no line matching {pattern!r}, {why}; its last: {last[:200]}"

    async def wait(self, pattern: str, since: int, timeout: float) -> tuple[float, str]:
        """(arrival, text) of the first line at or after index `since` matching `pattern`."""
        regex = re.compile(pattern)
        for item in self.items[since:]:
            if regex.search(item[1]):
                return item
        if self.ended:
            raise RuntimeError(self._missing(pattern, "it ended"))
        future: asyncio.Future[tuple[float, str]] = asyncio.get_running_loop().create_future()
        waiter = (since, regex, future)
        self._waiters.append(waiter)
        try:
            return await asyncio.wait_for(future, timeout)
        except TimeoutError:
            raise TimeoutError(self._missing(pattern, f"within {timeout:g} s")) from None
        finally:
            self._waiters.remove(waiter)


class Child:
    """A process of ours: its lines (stdout for a helper, stderr for the daemon) in `lines`,
    the other stream to a log file; helpers take JSON commands on stdin and answer with
    JSON events on stdout."""

    def __init__(self, process: asyncio.subprocess.Process, stream: asyncio.StreamReader,
                 log: Path) -> None:  # fmt: skip
        self.process = process
        self.pid = process.pid
        self.lines = Lines(str(log.with_suffix("")))  # named by its logs: NAME.log, NAME.stderr
        self._log = log.open("w", buffering=1)  # line by line: readable while it runs
        self._pump = asyncio.create_task(self._read(stream))

    @classmethod
    async def helper(cls, work: Path, name: str, *args: str) -> Child:
        log = work / f"{name}.log"
        with log.with_suffix(".stderr").open("w") as stderr:  # the child keeps its own copy
            process = await asyncio.create_subprocess_exec(
                sys.executable, __file__, name, *args,
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=stderr,
            )  # fmt: skip
        assert process.stdout is not None
        return cls(process, process.stdout, log)

    @classmethod
    async def daemon(cls, work: Path, config: Path, notify: Path) -> Child:
        env = {**os.environ, "NOTIFY_SOCKET": str(notify)}
        for name in ("WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS"):
            env.pop(name, None)
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "tickguard", "run", "--config", str(config),
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE, env=env,
        )  # fmt: skip
        assert process.stderr is not None
        return cls(process, process.stderr, work / "daemon.log")

    async def _read(self, stream: asyncio.StreamReader) -> None:
        async for raw in stream:
            line = raw.decode(errors="replace").rstrip("\n")
            self.lines.add(line)
            self._log.write(line + "\n")
        self._log.close()
        self.lines.end()

    def send(self, **command: Any) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps(command).encode() + b"\n")

    async def event(self, name: str, since: int, timeout: float = RUN_TIMEOUT) -> dict[str, Any]:
        """The first event `name` the helper printed at or after `since`."""
        _, text = await self.lines.wait(rf'^\{{"event": "{name}"', since, timeout)
        event: dict[str, Any] = json.loads(text)
        return event

    async def ask(self, name: str, timeout: float = RUN_TIMEOUT, **command: Any) -> dict[str, Any]:
        """Send a command; its answer, the event `name`."""
        since = self.lines.mark()
        self.send(cmd=name, **command)
        return await self.event(name, since, timeout)

    async def stop(self) -> None:
        """SIGTERM (the daemon), or end of input (a helper); killed if still there in 15 s."""
        if self.process.returncode is None:
            if self.process.stdin is not None:
                with contextlib.suppress(OSError):
                    self.process.stdin.close()
            else:
                self.process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.process.wait(), 15.0)
            except TimeoutError:
                self.process.kill()
                await self.process.wait()
        await self._pump


# -- /proc and /metrics ------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """utime + stime of `pid` (/proc/<pid>/stat fields 14 and 15), in seconds."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()  # the name may hold spaces
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def memory_kib(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (the peak) of `pid`, KiB."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0])
    return out


async def live_ticks(port: int) -> float:
    """tickguard_ticks_total{source="live"}, scraped once."""
    import aiohttp
    from prometheus_client.parser import text_string_to_metric_families

    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://{LOOPBACK}:{port}/metrics") as response,
    ):
        text = await response.text()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "tickguard_ticks_total" and sample.labels.get("source") == "live":
                return float(sample.value)
    return math.nan


def quantile(values: Sequence[float], q: float) -> float:
    """The nearest-rank q-quantile (p99 of 50 samples is their largest)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


# -- the report --------------------------------------------------------------------------


@dataclass
class Throughput:
    """Ticks/s of one frame shape: each run's, the bare loop's and the daemon's."""

    protocol: str
    per_frame: int
    ticks: int
    bare: list[float] = field(default_factory=list)
    daemon: list[float] = field(default_factory=list)
    counted: list[float] = field(default_factory=list)  # the daemon's live-tick delta per run
    bare_cpu: list[float] = field(default_factory=list)  # share of one core, per run
    daemon_cpu: list[float] = field(default_factory=list)

    @property
    def bare_rate(self) -> float:
        return statistics.median(self.bare) if self.bare else math.nan

    @property
    def daemon_rate(self) -> float:
        return statistics.median(self.daemon) if self.daemon else math.nan

    @property
    def ratios(self) -> list[float]:
        """tickguard / bare of each round: the two runs of a round are next to each other."""
        return [d / b for b, d in zip(self.bare, self.daemon, strict=False)]

    @property
    def ratio(self) -> float:
        return statistics.median(self.ratios) if self.ratios else math.nan

    @property
    def key(self) -> str:
        return f"{self.protocol}_{self.per_frame}"


@dataclass
class Report:
    params: dict[str, Any]
    throughput: list[Throughput] = field(default_factory=list)
    ready_seconds: float = math.nan  # spawn -> READY=1
    rss_mib: float = math.nan  # VmRSS, the mean of 1 s samples under the paced load
    rss_peak_mib: float = math.nan  # VmHWM at the end
    cpu_percent: float = math.nan  # of one core, under the paced load
    paced_rate: float = math.nan  # ticks/s the feed actually sent then
    latency: list[float] = field(default_factory=list)  # tick sent -> order at the broker, s
    decided: list[float] = field(default_factory=list)  # tick sent -> its [SL] line, s
    account_read: list[float] = field(default_factory=list)  # pre-send positions GET -> order
    latency_load: float = math.nan  # ticks/s the feed actually sent meanwhile
    zombie_seconds: float = math.nan
    black_hole_seconds: float = math.nan
    black_hole_kind: str = ""
    drop_detected: float = math.nan  # drop -> [FALLBACK] socket down
    drop_poll_price: float = math.nan  # drop -> the first poll price's [SL] line
    failures: dict[str, str] = field(default_factory=dict)

    def figures(self) -> dict[str, float]:
        """Every figure by name (NaN where its scenario failed): what the test looks for."""
        out: dict[str, float] = {}
        for t in self.throughput:
            out[f"bare_{t.key}"] = t.bare_rate
            out[f"tickguard_{t.key}"] = t.daemon_rate
            out[f"ratio_{t.key}"] = t.ratio
        ms = 1000.0
        out.update(
            rss_mib=self.rss_mib,
            rss_peak_mib=self.rss_peak_mib,
            cpu_percent=self.cpu_percent,
            latency_p50_ms=quantile(self.latency, 0.5) * ms if self.latency else math.nan,
            latency_p99_ms=quantile(self.latency, 0.99) * ms if self.latency else math.nan,
            ready_seconds=self.ready_seconds,
            zombie_seconds=self.zombie_seconds,
            black_hole_seconds=self.black_hole_seconds,
            drop_to_poll_price_ms=self.drop_poll_price * ms,
        )
        return out

    def table(self) -> list[str]:
        """The figures as Markdown tables."""
        p = self.params
        ms = 1000.0
        rows = [
            "| feed | frame | ticks | bare loop | tickguard | ratio | CPU bare / tickguard |",
            "|---|---|---|---|---|---|---|",
        ]
        for t in self.throughput:
            several = len(t.daemon) > 1
            bare = f" ({_range(t.bare, '{:,.0f}')})" if several else ""
            daemon = f" ({_range(t.daemon, '{:,.0f}')})" if several else ""
            ratio = f" ({_range(t.ratios, '{:.2f}')})" if several else ""
            rows.append(
                f"| {t.protocol} | {t.per_frame} tick{'s' if t.per_frame > 1 else ''} |"
                f" {t.ticks:,} | {t.bare_rate:,.0f} /s{bare} | {t.daemon_rate:,.0f} /s{daemon} |"
                f" **{t.ratio:.2f}**{ratio} | {_share(t.bare_cpu)} / {_share(t.daemon_cpu)} |"
            )
        rows += ["", "| figure | value | conditions |", "|---|---|---|"]
        rows.append(
            f"| RSS | {self.rss_mib:.0f} MiB (peak since start {self.rss_peak_mib:.0f} MiB) |"
            f" {p['symbols']:,} symbols, {p['positions']:,} positions, fed"
            f" {self.paced_rate:,.0f} ticks/s for {p['paced_seconds']:g} s |"
        )
        rows.append(f"| CPU | {self.cpu_percent:.1f}% of one core | the same |")
        lat = self.latency
        if lat:
            rows.append(
                f"| tick to order | p50 {quantile(lat, 0.5) * ms:.1f} ms,"
                f" p99 {quantile(lat, 0.99) * ms:.1f} ms, max {max(lat) * ms:.1f} ms |"
                f" {len(lat)} stops crossed one by one under {self.latency_load:,.0f} ticks/s"
                f" ({p['latency_per_frame']} per frame); broker: the Upstox fake |"
            )
        else:
            rows.append("| tick to order | none | no order reached the broker |")
        if self.decided and self.account_read:
            rows.append(
                f"| of which: tick to `[SL]` line | p50 {quantile(self.decided, 0.5) * ms:.1f} ms,"
                f" p99 {quantile(self.decided, 0.99) * ms:.1f} ms | the decision, seen in the log |"
            )
            rows.append(
                f"| of which: account read to order | p50"
                f" {quantile(self.account_read, 0.5) * ms:.1f} ms, p99"
                f" {quantile(self.account_read, 0.99) * ms:.1f} ms | the pre-send positions GET"
                f" ({p['positions'] + len(p['markers'])} positions) until the order arrives |"
            )
        rows.append(
            f"| start to READY=1 | {self.ready_seconds:.2f} s | {p['positions']:,} positions"
            " (fresh store), process spawn to the notify datagram |"
        )
        timeouts = p["timeouts"]
        rows.append(
            f"| zombie detected | {self.zombie_seconds:.2f} s |"
            f" bound `silence_timeout` {timeouts['silence_timeout']:g} s; connected, no frame |"
        )
        bound = timeouts["ping_interval"] + timeouts["ping_timeout"]
        rows.append(
            f"| black hole detected | {self.black_hole_seconds:.2f} s ({self.black_hole_kind}) |"
            f" bound `ping_interval` + `ping_timeout` = {bound:g} s; the server stops reading"
            " (no pong), still sends |"
        )
        rows.append(
            f"| socket drop to first poll price | {self.drop_poll_price * ms:.0f} ms |"
            f" `[FALLBACK] socket down` after {self.drop_detected * ms:.1f} ms;"
            f" the poll asks for {p['symbols']:,} symbols |"
        )
        for name, why in self.failures.items():
            rows.append(f"| {name} | FAILED | {why} |")
        return rows


def _share(values: Sequence[float]) -> str:
    return f"{statistics.median(values):.0%}" if values else "?"


def _range(values: Sequence[float], form: str) -> str:
    return f"{form.format(min(values))}–{form.format(max(values))}"


# -- presets -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Params:
    """What one run does. FULL gives the figures of docs/benchmarks.md; QUICK every figure
    at small counts and short times (the suite runs it, under a minute)."""

    symbols: int = 5000
    positions: int = 1000
    ticks_single: int = 300_000  # ticks of the 1-tick-per-frame runs
    ticks_batch: int = 2_000_000  # ticks of the 100-ticks-per-frame runs
    batch: int = 100
    repeats: int = 5
    upstox_repeats: int = 3
    paced_rate: float = 1000.0
    paced_seconds: float = 30.0
    latency_rate: float = 20_000.0
    latency_per_frame: int = 10
    crossings: int = 50
    crossing_gap: float = 0.25
    timeouts: FeedTimeouts = FeedTimeouts()

    def markers(self) -> list[str]:
        ends = [f"END{i:03d}" for i in range(2 * max(self.repeats, self.upstox_repeats))]
        return [*ends, *(f"LAT{i:03d}" for i in range(self.crossings)), "POLL000"]


FULL = Params()
QUICK = Params(
    ticks_single=20_000,
    ticks_batch=200_000,
    repeats=1,
    upstox_repeats=1,
    paced_seconds=3.0,
    crossings=10,
    crossing_gap=0.1,
    # Short bounds for the fault scenarios. A pong waits behind every byte the socket holds
    # when it is sent: ping_timeout must outlast a throughput run's backlog. So must the
    # silence timeout a stall of the daemon's loop on a loaded machine (1.5 s once fired in
    # the middle of a throughput run on CI, and the run was lost).
    timeouts=FeedTimeouts(ping_interval=1.0, ping_timeout=3.0, silence_timeout=3.0),
)


# -- the scenarios -----------------------------------------------------------------------


class Bench:
    """One protocol's rig: the feed process, and the daemon once started."""

    def __init__(self, work: Path, layout: Layout, layout_path: Path, protocol: str,
                 feed: Child, ports: dict[str, int], progress: Callable[[str], None]) -> None:  # fmt: skip
        self.work = work
        self.layout = layout
        self.layout_path = layout_path
        self.protocol = protocol
        self.feed = feed
        self.ws_port = ports["ws"]
        self.http_port = ports["http"]
        self.progress = progress
        self.daemon: Child | None = None
        self.notify: Any = None  # api_load.NotifySocket
        self.api_port = 0
        self.ends = iter(m for m in layout.markers if "|END" in m)

    @property
    def feed_url(self) -> str:
        return f"ws://{LOOPBACK}:{self.ws_port}/ws"

    @property
    def bare_url(self) -> str:
        """The bare loop's: its own path (Upstox: the authorize endpoint's host)."""
        return f"ws://{LOOPBACK}:{self.ws_port}/bare" if self.protocol == "json" else self.http_url

    @property
    def http_url(self) -> str:
        return f"http://{LOOPBACK}:{self.http_port}"

    async def bare(self, ticks: int, per_frame: int) -> tuple[float, float]:
        """The bare loop's ticks/s, from the feed's first write to the loop's N-th tick, and
        the share of one core it used meanwhile (its own process_time()).

        A fresh bare process connects and subscribes; once it has the snapshot,
        the feed sends it N ticks and a last one (the marker's, here just one
        more tick); the loop stamps the moment it has counted them all."""
        bare = await Child.helper(
            self.work, "bare", str(self.layout_path), self.protocol, self.bare_url, str(ticks + 1)
        )
        try:
            await bare.event("ready", 0, STARTUP)
            marker = self.layout.markers[0]  # not guarded here: any symbol will do
            blast = await self.feed.ask(
                "blast", ticks=ticks, per_frame=per_frame, marker=marker, to="bare"
            )
            end = await bare.event("end", 0)
            if end["ticks"] != ticks + 1:
                raise RuntimeError(f"the bare loop counted {end['ticks']} of {ticks + 1}")
            elapsed = end["t"] - blast["t0"]
            return (ticks + 1) / elapsed, end["cpu"] / elapsed
        finally:
            await bare.stop()

    async def start_daemon(self, config: Path) -> float:
        """Start the daemon; seconds from its spawn to READY=1 on the notify socket (a thread
        stamps each datagram as it arrives: api_load.NotifySocket)."""
        notify = _load_module("e2e_api_load", HERE / "api_load.py").NotifySocket(
            self.work / "notify.sock"
        )
        self.notify = notify  # open while the daemon runs: it notifies until it stops
        since = self.feed.lines.mark()
        spawned = time.monotonic()
        self.daemon = await Child.daemon(self.work, config, notify.path)
        _, line = await self.daemon.lines.wait(LISTENING, 0, STARTUP)
        self.api_port = int(re.findall(LISTENING, line)[0])
        if not await asyncio.to_thread(notify.ready.wait, STARTUP):
            raise RuntimeError("no READY=1")
        ready_at = next(t for t, m in notify.messages if "READY=1" in m)
        await self.feed.event("subscribed", since, STARTUP)
        await self.daemon.lines.wait(r"\[FEED\] live prices arriving", 0, STARTUP)
        return ready_at - spawned

    async def through_daemon(self, ticks: int, per_frame: int) -> tuple[float, float, float]:
        """The daemon's ticks/s, how many live ticks it counted meanwhile, and the share of
        one core it used (/proc/PID/stat from the feed's first write to the `[SL]` line).

        The feed sends N ticks as fast as the socket takes them, then one
        tick through a marker position's stop. The daemon reads one socket
        in order and judges each price as it arrives, so the `[SL]` line of
        the marker, stamped here on arrival, comes after every earlier tick
        was handled: the run ends there. `tickguard_ticks_total{source="live"}`
        is scraped before and after (not during: that would disturb it) to
        check it counted N + 1."""
        assert self.daemon is not None
        marker = next(self.ends)
        before = await live_ticks(self.api_port)
        since = self.daemon.lines.mark()
        sent = self.feed.lines.mark()
        self.feed.send(cmd="blast", ticks=ticks, per_frame=per_frame, marker=marker, to="daemon")
        await self.feed.event("blasting", sent)
        cpu = cpu_seconds(self.daemon.pid)
        pattern = rf"\[SL\] {re.escape(marker)}:|\[RECONNECT\]"
        end, line = await self.daemon.lines.wait(pattern, since, RUN_TIMEOUT)
        cpu = cpu_seconds(self.daemon.pid) - cpu
        blast = await self.feed.event("blast", sent)
        if "[RECONNECT]" in line:
            raise RuntimeError(f"the daemon lost the socket during the run: {line}")
        await asyncio.sleep(0.5)  # the marker's exit is sent meanwhile
        counted = await live_ticks(self.api_port) - before
        if counted != ticks + 1:  # then the [SL] line did not mark the end of this run
            raise RuntimeError(f"the daemon counted {counted:,.0f} live ticks of {ticks + 1:,}")
        elapsed = end - blast["t0"]
        return (ticks + 1) / elapsed, counted, cpu / elapsed

    async def throughput(self, params: Params, repeats: int, report: Report) -> None:
        """Both frame shapes, `repeats` rounds; in each, the bare loop's run, then the
        daemon's, on the same frames: a load on the machine that comes and goes (it is
        shared) weighs on both sides alike. The daemon stays connected, idle, while the
        bare loop runs; the feed sends each run to one of them."""
        shapes = [
            Throughput(self.protocol, 1, params.ticks_single),
            Throughput(self.protocol, params.batch, params.ticks_batch),
        ]
        report.throughput += shapes
        for _ in range(repeats):
            for t in shapes:
                await asyncio.sleep(1.0)  # quiet before each run
                rate, cpu = await self.bare(t.ticks, t.per_frame)
                t.bare.append(rate)
                t.bare_cpu.append(cpu)
                self.progress(f"bare {t.key}: {rate:,.0f} ticks/s, {cpu:.0%} of a core")
                await asyncio.sleep(1.0)
                rate, counted, cpu = await self.through_daemon(t.ticks, t.per_frame)
                t.daemon.append(rate)
                t.counted.append(counted)
                t.daemon_cpu.append(cpu)
                self.progress(
                    f"tickguard {t.key}: {rate:,.0f} ticks/s, {cpu:.0%} of a core"
                    f" ({counted:,.0f} counted)"
                )

    async def resources(self, params: Params, report: Report) -> None:
        """RSS and CPU under a steady load of `paced_rate` ticks/s (1 tick per frame).

        After 2 s of warm-up, /proc/<pid>/stat's utime + stime is read at the
        start and the end of `paced_seconds` (CPU % of one core), VmRSS every
        second (the mean reported) and VmHWM (the peak) at the end."""
        assert self.daemon is not None
        pid = self.daemon.pid
        await self.feed.ask("pace", rate=params.paced_rate, per_frame=1,
                            seconds=params.paced_seconds + 10)  # fmt: skip
        try:
            await asyncio.sleep(2.0)
            started, cpu0 = time.monotonic(), cpu_seconds(pid)
            sent0 = (await self.feed.ask("paced"))["sent"]
            rss = []
            while time.monotonic() - started < params.paced_seconds:
                await asyncio.sleep(1.0)
                rss.append(memory_kib(pid)["VmRSS"])
            elapsed = time.monotonic() - started
            report.cpu_percent = 100.0 * (cpu_seconds(pid) - cpu0) / elapsed
            report.paced_rate = ((await self.feed.ask("paced"))["sent"] - sent0) / elapsed
            report.rss_mib = statistics.mean(rss) / 1024
            report.rss_peak_mib = memory_kib(pid)["VmHWM"] / 1024
        finally:
            await self.feed.ask("unpace")

    async def latency(self, params: Params, report: Report, broker: Child) -> None:
        """Tick to order: from the feed writing a price through a stop to the broker fake
        receiving the order, under `latency_rate` ticks/s of background load.

        `crossings` marker positions are crossed one after another,
        `crossing_gap` apart. The feed stamps each crossing tick as it hands
        it to the kernel; the broker process stamps each place-order request
        as its handler starts. Both stamps are CLOCK_MONOTONIC. Also split
        out: the tick to its `[SL]` line here, and the daemon's pre-send read
        of the account (GET positions, arrival at the broker) to the order."""
        assert self.daemon is not None
        markers = [m for m in self.layout.markers if "|LAT" in m][: params.crossings]
        await self.feed.ask("pace", rate=params.latency_rate, per_frame=params.latency_per_frame,
                            seconds=params.crossings * params.crossing_gap + 60)  # fmt: skip
        sent: dict[str, float] = {}
        since = self.daemon.lines.mark()
        try:
            await asyncio.sleep(2.0)
            started = time.monotonic()
            sent0 = (await self.feed.ask("paced"))["sent"]
            for marker in markers:
                crossed = await self.feed.ask("cross", symbol=marker, price=CROSS_PRICE)
                sent[marker] = crossed["t"]
                await asyncio.sleep(params.crossing_gap)
            orders: dict[str, Any] = {}
            deadline = time.monotonic() + 30.0
            while not orders.keys() >= set(markers) and time.monotonic() < deadline:
                orders = {o["symbol"]: o for o in (await broker.ask("orders"))["orders"]}
                await asyncio.sleep(0.2)
            report.latency_load = ((await self.feed.ask("paced"))["sent"] - sent0) / (
                time.monotonic() - started
            )
        finally:
            await self.feed.ask("unpace")
        for marker in markers:
            if marker in orders:
                order = orders[marker]
                report.latency.append(order["t"] - sent[marker])
                if order["account_read"] is not None:
                    report.account_read.append(order["t"] - order["account_read"])
            with contextlib.suppress(TimeoutError):
                seen, _ = await self.daemon.lines.wait(rf"\[SL\] {re.escape(marker)}:", since, 1.0)
                report.decided.append(seen - sent[marker])
        if len(report.latency) < len(markers):
            raise RuntimeError(f"{len(markers) - len(report.latency)} orders never arrived")

    async def reconnected(self, since: int, timeout: float) -> None:
        assert self.daemon is not None
        await self.daemon.lines.wait(r"\[FEED\] connected", since, timeout)
        await self.daemon.lines.wait(r"\[FALLBACK\] live prices are back", since, timeout)

    async def zombie(self, params: Params, report: Report) -> None:
        """A server that stays connected (and answers pings) but sends nothing: from its
        last frame written to the daemon's `[RECONNECT] ... (silence: ...)` line."""
        assert self.daemon is not None
        timeouts = params.timeouts
        await self.feed.ask("pace", rate=200.0, per_frame=1, seconds=120.0)
        try:
            await asyncio.sleep(1.0)
            since = self.daemon.lines.mark()
            fault = await self.feed.ask("mode", mode="silent")
            seen, _ = await self.daemon.lines.wait(
                r"\[RECONNECT\].*\(silence", since, timeouts.silence_timeout * 3 + 10
            )
            report.zombie_seconds = seen - fault["last_write"]
            await self.feed.ask("mode", mode="normal")
            await self.reconnected(since, 30.0)
        finally:
            await self.feed.ask("unpace")

    async def black_hole(self, params: Params, report: Report) -> None:
        """A server whose socket stops reading, so no pong comes back, while it still sends
        ticks (the silence timeout cannot fire): from the moment it stops reading to the
        daemon's `[RECONNECT]` line. Worst case: a ping just answered, the next one
        `ping_interval` later, then `ping_timeout` for its pong."""
        assert self.daemon is not None
        t = params.timeouts
        await self.feed.ask("pace", rate=200.0, per_frame=1, seconds=120.0)
        try:
            await asyncio.sleep(1.0)
            since = self.daemon.lines.mark()
            fault = await self.feed.ask("mode", mode="deaf")
            seen, line = await self.daemon.lines.wait(
                r"\[RECONNECT\]", since, (t.ping_interval + t.ping_timeout) * 3 + 10
            )
            report.black_hole_seconds = seen - fault["t"]
            kind = re.search(r"\((\w+):", line)
            report.black_hole_kind = kind.group(1) if kind else line
            await self.feed.ask("mode", mode="normal")
            await self.reconnected(since, 30.0)
        finally:
            await self.feed.ask("unpace")

    async def drop(self, report: Report) -> None:
        """The socket drops (the server aborts it, and refuses new handshakes with 503 for
        now): from the drop to the daemon's `[FALLBACK] socket down` line, and to the
        first poll price taken. The poll answer carries a price through a marker's stop,
        so the `[SL] ... via poll` line marks the moment the daemon judged it."""
        assert self.daemon is not None
        marker = next(m for m in self.layout.markers if "|POLL" in m)
        # The poll loop sleeps out its interval after its last poll, even once live prices
        # are back: a drop within that time would wait for it. Measured from a quiet start.
        await asyncio.sleep(POLL_INTERVAL * 2 + 0.5)
        since = self.daemon.lines.mark()
        fault = await self.feed.ask("mode", mode="down", poll_cross={marker: CROSS_PRICE})
        detected, _ = await self.daemon.lines.wait(r"\[FALLBACK\] socket down", since, 30.0)
        priced, _ = await self.daemon.lines.wait(rf"\[SL\] {re.escape(marker)}:", since, 30.0)
        report.drop_detected = detected - fault["t"]
        report.drop_poll_price = priced - fault["t"]
        await self.feed.ask("mode", mode="normal")
        await self.reconnected(since, 30.0)

    async def stop(self) -> None:
        if self.daemon is not None:
            await self.daemon.stop()
        if self.notify is not None:
            self.notify.close()
        await self.feed.stop()


def _load_module(name: str, path: Path) -> ModuleType:
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up while it loads
        spec.loader.exec_module(module)
    return sys.modules[name]


async def _item(report: Report, name: str, progress: Callable[[str], None], run: Any) -> None:
    """Run one scenario; a failure is recorded and the others still run."""
    try:
        await run
    except Exception as exc:
        report.failures[name] = f"{type(exc).__name__}: {exc}"[:300]
        progress(f"{name} FAILED: {report.failures[name]}")


async def _rig(work: Path, layout: Layout, protocol: str, progress: Callable[[str], None]) -> Bench:
    layout_path = _saved(work, layout)
    feed = await Child.helper(work, "feed", str(layout_path), protocol)
    ports = await feed.event("listening", 0, STARTUP)
    return Bench(work, layout, layout_path, protocol, feed, ports, progress)


SCENARIOS = ("resources", "throughput", "latency", "zombie", "black_hole", "drop", "upstox")


async def run(work: Path, params: Params = FULL,
              progress: Callable[[str], None] = lambda _: None,
              only: Sequence[str] = SCENARIOS) -> Report:  # fmt: skip
    """Every scenario (or those of `only`), in one run; every process is stopped before it
    returns."""
    report = Report(params={**asdict(params), "markers": params.markers()})
    token = _broker_fakes().TOKEN
    layout = make_layout(params.symbols, params.positions, params.markers(), token)

    # -- json: the daemon with the Upstox broker fake -----------------------------------------
    broker = await Child.helper(work, "broker", str(_saved(work, layout)))
    bench = await _rig(work / "json", layout, "json", progress)
    try:
        broker_port = (await broker.event("listening", 0, STARTUP))["port"]
        config = write_config(
            bench.work, layout, protocol="json", feed_url=bench.feed_url,
            fallback_url=f"{bench.http_url}/prices", api_url=f"http://{LOOPBACK}:{broker_port}",
            broker="upstox", timeouts=params.timeouts,
        )  # fmt: skip
        report.ready_seconds = await bench.start_daemon(config)
        progress(f"daemon READY=1 after {report.ready_seconds:.2f} s")
        # The steady state first: VmHWM is then the peak of start-up and a steady load.
        if "resources" in only:
            await _item(report, "RSS and CPU", progress, bench.resources(params, report))
            progress(f"RSS {report.rss_mib:.0f} MiB, CPU {report.cpu_percent:.1f}%")
        if "throughput" in only:
            await _item(report, "throughput (json)", progress,
                        bench.throughput(params, params.repeats, report))  # fmt: skip
        if "latency" in only:
            await _item(report, "tick to order", progress, bench.latency(params, report, broker))
            progress(f"tick to order: {len(report.latency)} orders")
        if "zombie" in only:
            await _item(report, "zombie", progress, bench.zombie(params, report))
            progress(f"zombie {report.zombie_seconds:.2f} s")
        if "black_hole" in only:
            await _item(report, "black hole", progress, bench.black_hole(params, report))
            progress(f"black hole {report.black_hole_seconds:.2f} s")
        if "drop" in only:
            await _item(report, "socket drop", progress, bench.drop(report))
            progress(f"poll price {report.drop_poll_price * 1000:.0f} ms after the drop")
    finally:
        await bench.stop()
        await broker.stop()

    # -- upstox: protobuf frames, the daemon on the paper broker ------------------------------
    async def upstox() -> None:
        rig = await _rig(work / "upstox", layout, "upstox", progress)
        try:
            config = write_config(
                rig.work, layout, protocol="upstox", feed_url="", fallback_url="",
                api_url=rig.http_url, broker="paper", timeouts=params.timeouts,
            )  # fmt: skip
            await rig.start_daemon(config)
            await rig.throughput(params, params.upstox_repeats, report)
        finally:
            await rig.stop()

    if "upstox" in only:
        await _item(report, "throughput (upstox)", progress, upstox())
    return report


def _saved(work: Path, layout: Layout) -> Path:
    work.mkdir(parents=True, exist_ok=True)
    path = work / "layout.json"
    layout.save(path)
    return path


# =========================================================================================
# The helper processes. Each runs this file as a script; none outlives MAX_CHILD_SECONDS,
# and each exits when its standard input closes (the orchestrator went away).


def emit(**event: Any) -> None:
    print(json.dumps({"event": event.pop("event"), **event}), flush=True)


async def commands() -> Any:
    """JSON commands from stdin, one a line, until it closes."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=1 << 20)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while line := await reader.readline():
        yield json.loads(line)


def now_ms() -> int:
    return int(time.time() * 1000)


def ws_frame(payload: bytes, binary: bool) -> bytes:
    """One unmasked WebSocket frame, server to client (RFC 6455 5.2)."""
    first = 0x82 if binary else 0x81  # FIN + binary / text
    size = len(payload)
    if size < 126:
        return bytes((first, size)) + payload
    if size < 1 << 16:
        return struct.pack("!BBH", first, 126, size) + payload
    return struct.pack("!BBQ", first, 127, size) + payload


def upstox_conftest() -> ModuleType:
    """tests/integration/upstox/conftest.py: its FeedResponse encoder (`feeds_response`)."""
    return _load_module("e2e_upstox_conftest", UPSTOX_CONFTEST)


class Encoder:
    """Frames of the load: ticks round robin over the load symbols, each price moving
    between its first value and 0.05% above it (never towards a stop)."""

    def __init__(self, layout: Layout, protocol: str) -> None:
        self.protocol = protocol
        self.symbols = layout.load
        self.prices = [
            [layout.prices[s] for s in self.symbols],
            [round(layout.prices[s] * UP, 2) for s in self.symbols],
        ]
        self.cursor = 0
        self.quoted = [json.dumps(s) for s in self.symbols]
        self._entries: tuple[int, list[list[bytes]], bytes, bytes] | None = None

    def _next(self) -> Iterator[int]:
        """(index, phase) pairs as one int: index + phase * len, continuing the cycle."""
        n = len(self.symbols)
        while True:
            i = self.cursor % n
            phase = (self.cursor // n) % 2
            self.cursor += 1
            yield i + phase * n

    def frames(self, ticks: int, per_frame: int, ts: int) -> list[bytes]:
        """`ticks` ticks in frames of `per_frame` (the last may be shorter), WebSocket-framed."""
        n = len(self.symbols)
        picks = self._next()
        out = []
        for start in range(0, ticks, per_frame):
            count = min(per_frame, ticks - start)
            chosen = [(k % n, k // n) for k in (next(picks) for _ in range(count))]
            out.append(self.payload(chosen, ts, single=per_frame == 1))
        return out

    def payload(self, chosen: list[tuple[int, int]], ts: int, single: bool) -> bytes:
        if self.protocol == "json":
            p, q = self.prices, self.quoted
            ticks = [f'"symbol":{q[i]},"price":{p[ph][i]},"ts":{ts}' for i, ph in chosen]
            if single:
                text = '{"type":"tick",' + ticks[0] + "}"
            else:
                text = '{"type":"ticks","ticks":[{' + "},{".join(ticks) + "}]}"
            return ws_frame(text.encode(), binary=False)
        entries, head, tail = self._upstox_entries(ts)
        return ws_frame(head + b"".join(entries[ph][i] for i, ph in chosen) + tail, binary=True)

    def _upstox_entries(self, ts: int) -> tuple[list[list[bytes]], bytes, bytes]:
        """Each symbol's `feeds` map entry at both prices, cut out of one-key FeedResponses
        that the conftest's encoder built: a response is its type, its entries, its
        currentTs, and entries of one map concatenate."""
        if self._entries is None or self._entries[0] != ts:
            conftest = upstox_conftest()
            empty = conftest.feeds_response(conftest.LIVE_FEED, {}, ts)
            head, tail = empty[:2], empty[2:]  # type (field 1, one byte value); currentTs
            entries: list[list[bytes]] = [[], []]
            for phase in (0, 1):
                for symbol, price in zip(self.symbols, self.prices[phase], strict=True):
                    one = conftest.feeds_response(conftest.LIVE_FEED, {symbol: (price, ts)}, ts)
                    if not (one.startswith(head) and one.endswith(tail)):
                        raise RuntimeError("the conftest's FeedResponse layout changed")
                    entries[phase].append(one[len(head) : len(one) - len(tail)])
            self._entries = (ts, entries, head, tail)
        return self._entries[1], self._entries[2], self._entries[3]

    def one(self, symbol: str, price: float, ts: int) -> bytes:
        """A frame with one tick of `symbol` (a marker's crossing, say)."""
        if self.protocol == "json":
            tick = {"type": "tick", "symbol": symbol, "price": price, "ts": ts}
            return ws_frame(json.dumps(tick).encode(), binary=False)
        conftest = upstox_conftest()
        return ws_frame(conftest.feeds_response(conftest.LIVE_FEED, {symbol: (price, ts)}, ts),
                        binary=True)  # fmt: skip

    def heartbeat(self) -> bytes:
        if self.protocol == "json":
            return ws_frame(b'{"type":"heartbeat"}', binary=False)
        return ws_frame(upstox_conftest().market_info_response(now_ms()), binary=True)

    def snapshot(self, symbols: Sequence[str], prices: dict[str, float]) -> str | bytes:
        ts = now_ms()
        if self.protocol == "json":
            ticks = [{"symbol": s, "price": prices[s], "ts": ts} for s in symbols]
            return json.dumps({"type": "ticks", "ticks": ticks})
        conftest = upstox_conftest()
        frame = {s: (prices[s], ts) for s in symbols}
        data: bytes = conftest.feeds_response(conftest.INITIAL_FEED, frame, ts)
        return data


class FeedServer:
    """The feed process: WebSocket server, HTTP server, and the commands that drive them."""

    def __init__(self, layout: Layout, protocol: str) -> None:
        self.layout = layout
        self.protocol = protocol
        self.encoder = Encoder(layout, protocol)
        self.clients: list[Any] = []  # subscribed connections (websockets ServerConnection)
        self.mode = "normal"  # silent | deaf | down
        self.poll_cross: dict[str, float] = {}
        self.last_write = 0.0
        self.pacer: asyncio.Task[None] | None = None
        self.sent = 0  # ticks the pacer sent
        self.ws_port = 0
        if protocol == "upstox":
            upstox_conftest()  # loaded now, not on the first connection

    # -- writing ------------------------------------------------------------------------

    async def write(self, data: bytes, to: str = "") -> None:
        """Whole frames to every subscribed client (or those of one role: `bare`, `daemon`),
        then wait until the kernel takes them (the library's flow control: its write
        buffer's high-water mark)."""
        clients = [
            ws
            for ws in self.clients
            if not ws.transport.is_closing() and (not to or self.role(ws) == to)
        ]
        for ws in clients:
            ws.transport.write(data)
        self.last_write = time.monotonic()
        for ws in clients:
            with contextlib.suppress(Exception):  # a connection lost meanwhile
                await ws.drain()

    @staticmethod
    def role(ws: Any) -> str:
        """The bare loop says `bare` in its URL; any other client is the daemon."""
        return "bare" if "bare" in ws.request.path else "daemon"

    async def blast(self, ticks: int, per_frame: int, marker: str, to: str) -> None:
        ts = now_ms()
        frames = self.encoder.frames(ticks, per_frame, ts)
        frames.append(self.encoder.one(marker, CROSS_PRICE, ts))
        chunks, chunk, size = [], [], 0
        for frame in frames:
            chunk.append(frame)
            size += len(frame)
            if size >= CHUNK:
                chunks.append(b"".join(chunk))
                chunk, size = [], 0
        chunks.append(b"".join(chunk))
        t0 = time.monotonic()
        emit(event="blasting", t0=t0)
        for data in chunks:
            await self.write(data, to)
        emit(event="blast", t0=t0, t1=time.monotonic(), frames=len(frames),
             bytes=sum(map(len, chunks)))  # fmt: skip

    async def pace(self, rate: float, per_frame: int, seconds: float) -> None:
        """`rate` ticks/s in frames of `per_frame`, sent every 5 ms as they fall due, for at
        most `seconds`; paused while silent. If the socket does not take them, they wait."""
        started = time.monotonic()
        base, done = started, 0
        while time.monotonic() - started < seconds:
            await asyncio.sleep(0.005)
            if self.mode == "silent":
                base, done = time.monotonic(), 0
                continue
            due = int(rate * (time.monotonic() - base)) - done
            due -= due % per_frame
            if due <= 0:
                continue
            await self.write(b"".join(self.encoder.frames(due, per_frame, now_ms())))
            done += due
            self.sent += due

    async def heartbeat(self) -> None:
        """A heartbeat frame whenever nothing was written for HEARTBEAT seconds, unless
        silent: the daemon's silence timeout fires only when we mean it to. (Upstox has no
        heartbeat frame; its market_info counts as a sign of life, so that is sent.)"""
        while True:
            await asyncio.sleep(HEARTBEAT / 2)
            if self.mode != "silent" and time.monotonic() - self.last_write >= HEARTBEAT:
                await self.write(self.encoder.heartbeat())

    async def cross(self, symbol: str, price: float) -> float:
        await self.write(self.encoder.one(symbol, price, now_ms()))
        return self.last_write

    def set_mode(self, mode: str, poll_cross: dict[str, float]) -> float:
        at = time.monotonic()
        self.poll_cross.update(poll_cross)
        if mode == "deaf":  # nothing more is read: pings stay unanswered
            for ws in self.clients:
                ws.transport.pause_reading()
        elif mode == "down" or self.mode == "deaf":
            # down: the socket drops, and new handshakes get 503 until normal again;
            # normal after deaf: the deaf connection goes (the daemon left it already)
            for ws in self.clients:
                ws.transport.abort()
            self.clients.clear()
        self.mode = mode
        return at

    # -- the socket ---------------------------------------------------------------------

    def process_request(self, connection: Any, request: Any) -> Any:
        if self.mode == "down":
            return connection.respond(HTTPStatus.SERVICE_UNAVAILABLE, "down\n")
        return None

    async def handler(self, ws: Any) -> None:
        from websockets.exceptions import ConnectionClosed

        try:
            if self.protocol == "upstox":
                await ws.send(upstox_conftest().market_info_response(now_ms()))
            async for raw in ws:
                symbols = self.subscription(raw)
                if symbols is None:
                    continue
                await ws.send(self.encoder.snapshot(symbols, self.layout.prices))
                if ws not in self.clients:
                    # What the kernel buffers on our side (the default grows to 4 MiB): less
                    # queued in front of a pong, so a consumer behind on a run still answers
                    # its keepalive in time. Writes wait for it as they would for any socket.
                    sock = ws.transport.get_extra_info("socket")
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)
                    self.clients.append(ws)
                emit(event="subscribed", symbols=len(symbols), t=time.monotonic())
        except ConnectionClosed:
            pass
        finally:
            if ws in self.clients:
                self.clients.remove(ws)

    def subscription(self, raw: str | bytes) -> list[str] | None:
        """The symbols a subscribe frame names: a json `subscribe` text frame, or Upstox's
        binary JSON `sub`."""
        try:
            message = json.loads(raw)
        except ValueError:
            return None
        if self.protocol == "json" and message.get("op") == "subscribe":
            return [s for s in message["symbols"] if s in self.layout.prices]
        if self.protocol == "upstox" and message.get("method") == "sub":
            keys = message["data"]["instrumentKeys"]
            return [k for k in keys if k in self.layout.prices]
        return None

    # -- HTTP: the json poll, Upstox's authorize and LTP --------------------------------

    def http_routes(self) -> list[Any]:
        from aiohttp import web

        async def prices(request: web.Request) -> web.Response:
            """The `json` REST fallback: `GET /prices?symbols=A,B`."""
            symbols = [s for s in request.query.get("symbols", "").split(",") if s]
            ts = now_ms()
            body = {s: {"price": self.layout.prices.get(s, 100.0), "ts": ts} for s in symbols}
            crossed = [s for s in self.poll_cross if s in body]
            for s in crossed:
                body[s]["price"] = self.poll_cross.pop(s)
            emit(event="poll", t=time.monotonic(), symbols=len(symbols), crossed=crossed)
            return web.json_response({"prices": body})

        async def authorize(request: web.Request) -> web.Response:
            if request.headers.get("Authorization") != f"Bearer {self.layout.token}":
                return web.json_response({"status": "error", "errors": []}, status=401)
            uri = (
                f"ws://{LOOPBACK}:{self.ws_port}/v3/feed"
                f"?requestId={uuid.uuid4().hex}&code={uuid.uuid4().hex[:12]}"
            )
            return web.json_response(
                {"status": "success", "data": {"authorized_redirect_uri": uri}}
            )

        async def ltp(request: web.Request) -> web.Response:
            keys = [k for k in request.query.get("instrument_key", "").split(",") if k]
            data = {
                k.replace("|", ":"): {"last_price": self.layout.prices.get(k, 100.0),
                                      "instrument_token": k, "ltq": 1, "volume": 1, "cp": 100.0}
                for k in keys
            }  # fmt: skip
            return web.json_response({"status": "success", "data": data})

        return [
            web.get("/prices", prices),
            web.get("/v3/feed/market-data-feed/authorize", authorize),
            web.get("/v3/market-quote/ltp", ltp),
        ]

    async def serve(self) -> None:
        from aiohttp import web
        from websockets.asyncio.server import serve

        server = await serve(
            self.handler, LOOPBACK, 0, process_request=self.process_request,
            compression=None, ping_interval=None, max_size=1 << 22,
        )  # fmt: skip
        self.ws_port = next(iter(server.sockets)).getsockname()[1]
        app = web.Application()
        app.add_routes(self.http_routes())
        # A poll of 5,000 symbols is a request line of about 70 KB.
        runner = web.AppRunner(app, access_log=None, handle_signals=False,
                               max_line_size=1 << 20, max_field_size=1 << 16)  # fmt: skip
        await runner.setup()
        site = web.TCPSite(runner, LOOPBACK, 0)
        await site.start()
        emit(event="listening", ws=self.ws_port, http=runner.addresses[0][1])
        beating = asyncio.create_task(self.heartbeat())
        async for command in commands():
            await self.command(command)
        beating.cancel()
        server.close()
        await runner.cleanup()

    async def command(self, command: dict[str, Any]) -> None:
        name = command.pop("cmd")
        if name == "blast":
            await self.blast(**command)
        elif name == "pace":
            if self.pacer is not None:
                self.pacer.cancel()
            self.pacer = asyncio.create_task(self.pace(**command))
            emit(event="pace")
        elif name == "paced":
            emit(event="paced", sent=self.sent)
        elif name == "unpace":
            if self.pacer is not None:
                self.pacer.cancel()
                self.pacer = None
            emit(event="unpace", sent=self.sent)
        elif name == "cross":
            emit(event="cross", t=await self.cross(command["symbol"], command["price"]))
        elif name == "mode":
            at = self.set_mode(command["mode"], command.get("poll_cross", {}))
            emit(event="mode", t=at, last_write=self.last_write)


# -- the bare loop -----------------------------------------------------------------------


def feed_response_class() -> Any:
    """FeedResponse (MarketDataFeedV3.proto, the fields an LTPC feed uses) for the protobuf
    runtime, built from a descriptor: no generated module needed."""
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    f = descriptor_pb2.FieldDescriptorProto
    proto = descriptor_pb2.FileDescriptorProto(name="e2e_upstox.proto", package="e2e",
                                               syntax="proto3")  # fmt: skip
    ltpc = proto.message_type.add(name="LTPC")
    for name, number, kind in (("ltp", 1, f.TYPE_DOUBLE), ("ltt", 2, f.TYPE_INT64),
                               ("ltq", 3, f.TYPE_INT64), ("cp", 4, f.TYPE_DOUBLE)):  # fmt: skip
        ltpc.field.add(name=name, number=number, type=kind, label=f.LABEL_OPTIONAL)
    feed = proto.message_type.add(name="Feed")
    feed.field.add(name="ltpc", number=1, type=f.TYPE_MESSAGE, type_name=".e2e.LTPC",
                   label=f.LABEL_OPTIONAL)  # fmt: skip
    feed.field.add(name="requestMode", number=4, type=f.TYPE_INT32, label=f.LABEL_OPTIONAL)
    response = proto.message_type.add(name="FeedResponse")
    response.field.add(name="type", number=1, type=f.TYPE_INT32, label=f.LABEL_OPTIONAL)
    entry = response.nested_type.add(name="FeedsEntry")
    entry.options.map_entry = True
    entry.field.add(name="key", number=1, type=f.TYPE_STRING, label=f.LABEL_OPTIONAL)
    entry.field.add(name="value", number=2, type=f.TYPE_MESSAGE, type_name=".e2e.Feed",
                    label=f.LABEL_OPTIONAL)  # fmt: skip
    response.field.add(name="feeds", number=2, type=f.TYPE_MESSAGE, label=f.LABEL_REPEATED,
                       type_name=".e2e.FeedResponse.FeedsEntry")  # fmt: skip
    response.field.add(name="currentTs", number=3, type=f.TYPE_INT64, label=f.LABEL_OPTIONAL)
    pool = descriptor_pool.DescriptorPool()
    pool.AddSerializedFile(proto.SerializeToString())
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("e2e.FeedResponse"))


async def bare_loop(layout: Layout, protocol: str, url: str, ticks: int) -> None:
    """Connect, subscribe, take the snapshot, say `ready`; then count ticks until `ticks`.

    json: `json.loads` each frame, 1 for a `tick`, len(`ticks`) for a batch.
    upstox: the protobuf runtime parses each FeedResponse, and each entry's key, ltp and
    ltt are read: upb makes a message's Python objects only when they are read, so a
    bare count of `feeds` would skip the work json.loads does for the json loop (and
    that any user of the prices does)."""
    from websockets.asyncio.client import connect

    if protocol == "upstox":  # the single-use socket URL, as the daemon gets it
        request = urllib.request.Request(
            f"{url}/v3/feed/market-data-feed/authorize",
            headers={"Authorization": f"Bearer {layout.token}", "Accept": "application/json"},
        )
        with await asyncio.to_thread(urllib.request.urlopen, request, timeout=10) as answer:
            url = json.loads(answer.read())["data"]["authorized_redirect_uri"] + "&role=bare"
    symbols = layout.subscribed
    async with connect(url, compression=None, ping_interval=None, max_size=1 << 22) as ws:
        count = 0
        if protocol == "json":
            await ws.send(json.dumps({"op": "subscribe", "symbols": symbols}))
            await ws.recv()  # the snapshot
            emit(event="ready")
            cpu = time.process_time()
            loads = json.loads
            async for frame in ws:
                message = loads(frame)
                kind = message["type"]
                if kind == "tick":
                    count += 1
                elif kind == "ticks":
                    count += len(message["ticks"])
                if count >= ticks:
                    break
        else:
            sub = {"guid": uuid.uuid4().hex, "method": "sub",
                   "data": {"mode": "ltpc", "instrumentKeys": symbols}}  # fmt: skip
            await ws.recv()  # market_info
            await ws.send(json.dumps(sub).encode())
            await ws.recv()  # initial_feed
            parse = feed_response_class().FromString
            emit(event="ready")
            cpu = time.process_time()
            async for frame in ws:
                for key, feed in parse(frame).feeds.items():
                    ltpc = feed.ltpc
                    _ = key, ltpc.ltp, ltpc.ltt
                    count += 1
                if count >= ticks:
                    break
        emit(event="end", t=time.monotonic(), ticks=count, cpu=time.process_time() - cpu)


# -- the broker --------------------------------------------------------------------------


def _broker_fakes() -> ModuleType:
    """tests/integration/test_upstox_broker.py as a module (its FakeUpstox and TOKEN)."""
    return _load_module("tickguard_upstox_broker_fakes", BROKER_FAKES)


async def broker_main(layout: Layout) -> None:
    """The Upstox order API fake, standalone; it holds every guarded position (quantity 1)."""
    from aiohttp import web

    fakes = _broker_fakes()

    class Recording(fakes.FakeUpstox):  # type: ignore[name-defined,misc]
        """Stamps each place-order's arrival, with the arrival of the last positions read
        before it. The fake keeps its positions answer encoded while its ledger is unchanged;
        here an order's fill (one entry changed) has it encoded again right after the order
        is answered, not when the next exit's read asks for it: the fake's own cost stays
        out of the latency."""

        def __init__(self) -> None:
            super().__init__()
            self.placed: list[dict[str, Any]] = []
            self.reads: list[float] = []  # arrival of every positions read

        async def _positions(self, request: web.Request) -> web.StreamResponse:
            self.reads.append(self.arrivals[-1])  # stamped by the fake as the request came
            return await super()._positions(request)  # type: ignore[no-any-return]

        async def _place(self, request: web.Request) -> web.StreamResponse:
            arrived = self.arrivals[-1]
            body = await request.json()
            self.placed.append({"symbol": body.get("instrument_token"), "t": arrived,
                                "account_read": self.reads[-1] if self.reads else None})  # fmt: skip
            answer = await super()._place(request)
            asyncio.get_running_loop().call_soon(self._ledger_answer)  # once answered
            return answer  # type: ignore[no-any-return]

    fake = Recording()
    for symbol in layout.guarded + layout.markers:
        fake.set_position(symbol, 1, layout.prices[symbol])
    await fake.start()
    emit(event="listening", port=fake.port)
    async for command in commands():
        if command["cmd"] == "orders":
            emit(event="orders", orders=fake.placed, account_reads=fake.reads)
    await fake.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("role", choices=["feed", "bare", "broker"])
    parser.add_argument("layout", type=Path)
    parser.add_argument("rest", nargs="*")
    args = parser.parse_args()
    signal.alarm(int(MAX_CHILD_SECONDS))  # bounded in time, whatever the orchestrator does
    layout = Layout.read(args.layout)
    if args.role == "feed":
        asyncio.run(FeedServer(layout, args.rest[0]).serve())
    elif args.role == "bare":
        protocol, url, ticks = args.rest
        asyncio.run(bare_loop(layout, protocol, url, int(ticks)))
    else:
        asyncio.run(broker_main(layout))
    return 0


if __name__ == "__main__":
    sys.exit(main())
