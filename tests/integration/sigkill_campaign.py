"""The randomized SIGKILL campaign of issue 9: the real daemon killed around its exits.

    python sigkill_campaign.py WORK_DIR [--seconds 60] [--min-runs 8] [--seed S] [--only-run R]
    python sigkill_campaign.py WORK_DIR --kill-in-sent

One simulator subprocess (`tickguard simulate`, loopback) is the feed of every
run. A run plans two to four positions (`[[positions]]` in its config, a fresh
state dir) and how and when each is exited: its stop loss or its take profit
crossed by pinning the simulator's price, or an emergency close through the
API. Then, two to four times on the same state dir, it starts the real daemon
(`tickguard run`: paper broker, SQLite; through paper_latency_daemon.py when
the run gives the paper broker a latency), asks for that cycle's exits and
SIGKILLs it after a random delay counted from one of three moments: the
daemon listening (its recovered exits are being looked up), the exits asked
for, or the daemon's decision log line (`[SL]`, `[TP]`, `[EXIT]`). With a
latency of L seconds the journal says `sent` for L seconds before the paper
broker holds the order, so many kills land there. A final clean run asks
again for every exit (a crossed price stays pinned; a close is sent again),
waits by polling the API (bounded) until nothing is in flight, stops with
SIGTERM, and the store is read, read-only, for the invariants:

- 0 stuck exits: no exit is still pending, sent or retry;
- 0 duplicate fills: at most one paper fill per position (hence per client
  order id), never more than its quantity, none without a journalled exit;
- 0 positions left unguarded: the final daemon guarded every position the
  store held open or exiting, and every position ends closed with exactly one
  filled exit (each was asked to exit in the final run, so one still open or
  exiting is one whose stop that daemon ignored).

It prints a line per run and the report
`sigkill campaign: N runs, K kills, 0 stuck exits, 0 duplicate fills, 0 positions left unguarded (seed S)`,
also written with every violation's details to WORK_DIR/report.txt. Exit
status 0 when every invariant held and at least --min-runs runs fitted in
--seconds, else 1. Runs stop when the next one would overrun --seconds.

Everything random comes from `random.Random(f"{seed}/{run}")`: a seed
reproduces every plan and delay (scheduling still varies from one machine to
another, so a reproduction may take a few tries; --only-run R replays one run).

--kill-in-sent is the deterministic case of the issue: a paper broker that
takes 30 s, one stop crossed, a SIGKILL as soon as the journal says `sent`
(the store, read after the kill, must hold the exit `sent` and no fill, or the
scenario is void), then the final run with a fast broker and the same checks.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import random
import re
import shutil
import signal
import sqlite3
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from tickguard.core.exits import ExitState
from tickguard.store import DB_NAME

HERE = Path(__file__).resolve().parent
LATENCY_DAEMON = HERE / "paper_latency_daemon.py"
LOOPBACK = "127.0.0.1"
TOKEN = "sigkill-campaign-token"
CLOSE_PATH = "/api/v1/monitoring/emergency-close-position"
IN_FLIGHT = frozenset(s.value for s in ExitState if s.in_flight)

DEFAULT_SECONDS = 60.0
DEFAULT_MIN_RUNS = 8
SIM_SYMBOLS = 16
LATENCIES = (0.0, 0.05, 0.15, 0.3, 0.5)  # the paper broker's, per run (0: plain `tickguard run`)
ACTIONS = ("stop_loss", "take_profit", "emergency")
ANCHORS = ("start", "asked", "decision", "decision")  # what a kill's delay counts from
SLOW_BROKER = 30.0  # --kill-in-sent: the journal says `sent` this long before the broker fills

# Bounds (seconds) on every wait; none of them is a synchronisation sleep.
STARTUP_TIMEOUT = 20.0  # a process prints where it listens
READY_TIMEOUT = 5.0  # /readyz answers 200 (every guarded symbol priced)
DECISION_TIMEOUT = 3.0  # the decision line follows a crossing or a close request
SENT_TIMEOUT = 10.0  # --kill-in-sent: the journal says `sent`
STOP_TIMEOUT = 15.0  # SIGTERM to exit (the daemon drains exits up to 5 s)
POLL_INTERVAL = 0.05  # polling the API for a condition


def settle_timeout(latency: float) -> float:
    """How long the final run may take to settle every exit (a lookup and a send each, on a busy box)."""
    return 10.0 + 4.0 * latency


# ---------------------------------------------------------------------------
# Processes


class Simulator:
    """`python -m tickguard simulate` on 127.0.0.1:0: the feed every run shares."""

    def __init__(self, log: Path) -> None:
        self.log = log
        self.base = ""
        self.symbols: list[str] = []
        self.process: asyncio.subprocess.Process | None = None
        self._http: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        with self.log.open("ab") as log:
            self.process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "tickguard", "simulate",
                "--listen", f"{LOOPBACK}:0", "--symbols", str(SIM_SYMBOLS),
                "--rate", "5", "--seed", "1",
                stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=log,
            )  # fmt: skip
        assert self.process.stdout is not None
        async with asyncio.timeout(STARTUP_TIMEOUT):
            line = (await self.process.stdout.readline()).decode(errors="replace")
        found = re.search(r"listening on (http://127\.0\.0\.1:\d+) .*symbols: ([^)]*)\)", line)
        if found is None:
            raise RuntimeError(f"the simulator did not start: {line!r}")
        self.base = found.group(1)
        self.symbols = [s.strip() for s in found.group(2).split(",")]
        self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))

    @property
    def ws_url(self) -> str:
        return self.base.replace("http://", "ws://") + "/ws"

    async def set_price(self, symbol: str, price: float) -> None:
        """Pin `symbol` at `price` (broadcast at once to the subscribed daemon)."""
        assert self._http is not None
        async with self._http.post(f"{self.base}/prices/{symbol}", json={"price": price}) as r:
            assert r.status == 200, (symbol, price, r.status, await r.text())

    async def close(self) -> None:
        if self._http is not None:
            await self._http.close()
        await _end(self.process)


async def _end(process: asyncio.subprocess.Process | None) -> int | None:
    """SIGTERM a process this module started, SIGKILL it if it lingers; its exit code."""
    if process is None:
        return None
    if process.returncode is None:
        process.terminate()
        try:
            async with asyncio.timeout(STOP_TIMEOUT):
                await process.wait()
        except TimeoutError:
            process.kill()
            await process.wait()
    return process.returncode


class DaemonProcess:
    """One incarnation of `tickguard run`, its stderr appended to a log and kept as lines."""

    def __init__(self, config: Path, log: Path, latency: float) -> None:
        self.config, self.log, self.latency = config, log, latency
        self.process: asyncio.subprocess.Process | None = None
        self.url = ""
        self.lines: list[str] = []
        self.http: aiohttp.ClientSession | None = None
        self._changed = asyncio.Condition()
        self._ended = False
        self._reader: asyncio.Task[None] | None = None
        self._requests: set[asyncio.Task[tuple[int, Any]]] = set()

    async def start(self) -> None:
        """Start it; return once it listens (RuntimeError if it does not)."""
        if self.latency:
            argv = [str(LATENCY_DAEMON), repr(self.latency), "run", "--config", str(self.config)]
        else:
            argv = ["-m", "tickguard", "run", "--config", str(self.config)]
        with self.log.open("a", encoding="utf-8") as out:
            out.write(f"=== tickguard run (paper broker latency {self.latency:g} s) ===\n")
        self.process = await asyncio.create_subprocess_exec(
            sys.executable, *argv,
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        self._reader = asyncio.create_task(self._read())
        found = await self.wait_line(
            r"\[HTTP\] listening on (127\.0\.0\.1:\d+)", 0, STARTUP_TIMEOUT
        )
        if found is None:
            raise RuntimeError(f"the daemon exited before listening: {self.lines[-3:]}")
        self.url = f"http://{found.group(1)}"
        self.http = aiohttp.ClientSession(
            headers={"Authorization": f"Bearer {TOKEN}"}, timeout=aiohttp.ClientTimeout(total=10)
        )

    async def _read(self) -> None:
        assert self.process is not None and self.process.stderr is not None
        with self.log.open("a", encoding="utf-8") as out:
            while line := (await self.process.stderr.readline()).decode(errors="replace"):
                out.write(line)
                async with self._changed:
                    self.lines.append(line.rstrip("\n"))
                    self._changed.notify_all()
        async with self._changed:
            self._ended = True
            self._changed.notify_all()

    async def wait_line(self, pattern: str, since: int, timeout: float) -> re.Match[str] | None:
        """The first line from index `since` on that matches; None if stderr ended first."""
        regex = re.compile(pattern)
        found: list[re.Match[str]] = []

        def seen() -> bool:
            nonlocal since
            for line in self.lines[since:]:
                if m := regex.search(line):
                    found.append(m)
                    return True
            since = len(self.lines)
            return self._ended

        async with asyncio.timeout(timeout), self._changed:
            await self._changed.wait_for(seen)
        return found[0] if found else None

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.returncode is None

    async def request(self, method: str, path: str, body: object = None) -> tuple[int, Any]:
        assert self.http is not None
        async with self.http.request(method, self.url + path, json=body) as r:
            text = await r.text()
            return r.status, json.loads(text) if r.content_type == "application/json" else text

    def request_in_background(self, method: str, path: str, body: object = None) -> None:
        """Send a request whose answer nobody awaits (the daemon may be killed first)."""
        task = asyncio.create_task(self.request(method, path, body))
        self._requests.add(task)

    async def until(self, path: str, accept: Any, timeout: float) -> bool:
        """Poll GET `path` until `accept(status, body)`; False if not within `timeout`."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        for _ in range(int(timeout / POLL_INTERVAL) + 1):
            status, body = await self.request("GET", path)
            if accept(status, body):
                return True
            if loop.time() >= deadline:
                break
            await asyncio.sleep(POLL_INTERVAL)  # the poll interval, not synchronisation
        return False

    async def kill(self) -> int | None:
        """SIGKILL (if it still runs); its exit code as it was before the kill (None: killed)."""
        assert self.process is not None
        code = self.process.returncode
        if code is None:
            self.process.send_signal(signal.SIGKILL)
        await self._finish()
        return code

    async def stop(self) -> int | None:
        """SIGTERM, bounded; its exit code."""
        code = await _end(self.process)
        await self._finish()
        return code

    async def _finish(self) -> None:
        if self.process is not None:
            async with asyncio.timeout(STOP_TIMEOUT):
                await self.process.wait()
        for task in self._requests:
            task.cancel()
        await asyncio.gather(*self._requests, return_exceptions=True)
        self._requests.clear()
        if self._reader is not None:
            async with asyncio.timeout(STOP_TIMEOUT):
                await self._reader
        if self.http is not None:
            await self.http.close()

    async def close(self) -> None:
        """Whatever happened: the process ended, the client closed."""
        if self.running:
            await self.kill()
        elif self.http is not None and not self.http.closed:
            await self._finish()


# ---------------------------------------------------------------------------
# Plans


@dataclass(frozen=True, slots=True)
class Planned:
    """A position a run registers, and how and in which cycle it is asked to exit."""

    symbol: str
    side: str  # long | short
    quantity: int
    entry: float
    action: str  # stop_loss | take_profit | emergency
    cycle: int  # the kill cycle that asks for the exit; == cycles: the final run

    @property
    def sign(self) -> int:
        return 1 if self.side == "long" else -1

    @property
    def stop_loss(self) -> float:
        return round(self.entry * (1 - self.sign * 0.02), 2)

    @property
    def take_profit(self) -> float:
        return round(self.entry * (1 + self.sign * 0.04), 2)

    @property
    def crossing(self) -> float:
        """A price beyond the planned rule (stop loss for an emergency close too)."""
        if self.action == "take_profit":
            return round(self.entry * (1 + self.sign * 0.05), 2)
        return round(self.entry * (1 - self.sign * 0.03), 2)

    def toml(self) -> str:
        return (
            f'[[positions]]\nsymbol = "{self.symbol}"\nside = "{self.side}"\n'
            f"quantity = {self.quantity}\nentry_price = {self.entry}\n"
            f"stop_loss = {self.stop_loss}\ntake_profit = {self.take_profit}\n"
        )

    def __str__(self) -> str:
        return (
            f"{self.symbol} {self.side} {self.quantity}@{self.entry:g} {self.action}@{self.cycle}"
        )


@dataclass(frozen=True, slots=True)
class Kill:
    """When a kill cycle's SIGKILL lands: `delay` seconds after `anchor`."""

    anchor: str  # start (listening) | asked (exits asked for) | decision (its log line) | sent
    delay: float

    def __str__(self) -> str:
        return f"{self.anchor}+{self.delay:.3f}s"


@dataclass(frozen=True, slots=True)
class RunPlan:
    index: int
    seed: str
    latency: float
    positions: tuple[Planned, ...]
    kills: tuple[Kill, ...]

    def asked_in(self, cycle: int) -> list[Planned]:
        return [p for p in self.positions if p.cycle == cycle]


def plan_run(rng: random.Random, index: int, seed: str, symbols: Sequence[str]) -> RunPlan:
    """Positions, exits and kill moments of one run, all drawn from `rng`."""
    latency = rng.choice(LATENCIES)
    cycles = rng.randint(2, 4)
    positions = []
    for symbol in rng.sample(list(symbols), rng.randint(2, 4)):
        positions.append(
            Planned(
                symbol=symbol,
                side=rng.choice(("long", "short")),
                quantity=rng.randint(1, 50),
                entry=round(rng.uniform(200.0, 3000.0), 2),
                action=rng.choice(ACTIONS),
                cycle=rng.randint(0, cycles),
            )
        )
    kills = []
    for cycle in range(cycles):
        asking = any(p.cycle == cycle for p in positions)
        anchor = rng.choice(ANCHORS) if asking else "start"
        # Spread over the window where the journal says `sent` and the broker has nothing yet.
        spread = {"start": latency + 0.3, "asked": 2 * latency + 0.1, "decision": 1.5 * latency}
        kills.append(Kill(anchor, rng.uniform(0.0, spread[anchor] + 0.02)))
    return RunPlan(index, seed, latency, tuple(positions), tuple(kills))


def write_config(run_dir: Path, sim: Simulator, positions: Iterable[Planned]) -> Path:
    """A new run dir with the run's token file and config (loopback only, small intervals)."""
    run_dir.mkdir(parents=True)
    token = run_dir / "token"
    token.write_text(TOKEN + "\n")
    config = run_dir / "config.toml"
    config.write_text(
        f"""
[daemon]
state_dir = {json.dumps(str(run_dir / "state"))}
[http]
listen = "127.0.0.1:0"
token_file = {json.dumps(str(token))}
[feed]
url = "{sim.ws_url}"
ping_interval = 0.5
ping_timeout = 1.0
silence_timeout = 3.0
[feed.reconnect]
initial_delay = 0.05
max_delay = 0.5
[dns]
servers = []
fallback_servers = []
timeout = 0.5
[guard]
sweep_interval = 0.05
[market]
always_open = true
"""
        + "".join(p.toml() for p in positions)
    )
    return config


# ---------------------------------------------------------------------------
# The store, read-only


@dataclass(slots=True)
class Findings:
    stuck: list[str] = field(default_factory=list)
    duplicates: list[str] = field(default_factory=list)
    unguarded: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # anything else that went wrong
    notes: list[str] = field(default_factory=list)  # printed, never a failure

    @property
    def ok(self) -> bool:
        return not (self.stuck or self.duplicates or self.unguarded or self.problems)

    def add(self, other: Findings) -> None:
        self.stuck += other.stuck
        self.duplicates += other.duplicates
        self.unguarded += other.unguarded
        self.problems += other.problems
        self.notes += other.notes

    def summary(self) -> str:
        return (
            f"{len(self.stuck)} stuck exits, {len(self.duplicates)} duplicate fills,"
            f" {len(self.unguarded)} positions left unguarded"
        )


def read_store(state_dir: Path) -> dict[str, list[dict[str, Any]]]:
    """Positions, exits and paper fills, read through a read-only connection."""
    db = sqlite3.connect(f"file:{state_dir / DB_NAME}?mode=ro", uri=True)
    db.row_factory = sqlite3.Row
    try:
        return {
            table: [dict(row) for row in db.execute(f"SELECT * FROM {table} ORDER BY rowid")]
            for table in ("positions", "exits", "paper_fills")
        }
    finally:
        db.close()


def unsent_window(tables: dict[str, list[dict[str, Any]]]) -> set[str]:
    """Exits the journal says are `sent` while the broker holds no order for them."""
    filled = {f["client_order_id"] for f in tables["paper_fills"]}
    return {
        e["client_order_id"]
        for e in tables["exits"]
        if e["state"] == ExitState.SENT.value and e["client_order_id"] not in filled
    }


def check_store(state_dir: Path, planned: Sequence[Planned]) -> Findings:
    """The three invariants, from the store of a stopped daemon."""
    tables = read_store(state_dir)
    found = Findings()
    exits = {e["client_order_id"]: e for e in tables["exits"]}
    for e in tables["exits"]:
        if e["state"] in IN_FLIGHT:
            found.stuck.append(f"{e['symbol']}: exit {e['client_order_id']} still {e['state']}")
    positions = {p["id"]: p for p in tables["positions"]}
    fills: dict[int, list[dict[str, Any]]] = {pid: [] for pid in positions}
    closing = {(p["symbol"], "SELL" if p["side"] == "long" else "BUY") for p in positions.values()}
    for fill in tables["paper_fills"]:
        exit = exits.get(fill["client_order_id"])
        if exit is not None:
            fills.setdefault(exit["position_id"], []).append(fill)
        elif (fill["symbol"], fill["transaction_type"]) in closing:  # opening trades aside
            found.duplicates.append(
                f"{fill['symbol']}: fill {fill['broker_order_id']} of an order no exit journalled"
            )
    for pid, position in positions.items():
        symbol, quantity = position["symbol"], position["quantity"]
        mine = fills.get(pid, [])
        for extra in mine[1:]:
            found.duplicates.append(
                f"{symbol}: fill {extra['broker_order_id']} after {mine[0]['broker_order_id']}"
            )
        if len(mine) == 1 and mine[0]["quantity"] > quantity:
            found.duplicates.append(f"{symbol}: filled {mine[0]['quantity']:g} of {quantity:g}")
        filled = [e for e in exits.values() if e["position_id"] == pid and e["state"] == "filled"]
        if position["state"] != "closed":
            found.unguarded.append(f"{symbol}: still {position['state']} after the final run")
        elif not filled or not mine:
            found.unguarded.append(f"{symbol}: closed without a filled exit: the account holds it")
        elif len(filled) > 1 and len(mine) <= 1:
            found.problems.append(f"{symbol}: {len(filled)} filled exits, {len(mine)} fills")
    for p in planned:
        count = sum(1 for row in positions.values() if row["symbol"] == p.symbol)
        if count != 1:
            found.problems.append(f"{p.symbol}: {count} positions in the store, not 1")
    return found


def crash_lines(lines: Sequence[str]) -> list[str]:
    """The daemon's own words on why an exit went wrong (first few, deduplicated)."""
    picked: list[str] = []
    for line in lines:
        if ("cannot " in line or "Error:" in line or "crashed" in line) and line not in picked:
            picked.append(line)
    return picked[:4]


# ---------------------------------------------------------------------------
# Runs


@dataclass(slots=True)
class RunResult:
    plan: RunPlan
    findings: Findings = field(default_factory=Findings)
    kills: list[str] = field(default_factory=list)  # what each kill interrupted
    in_window: int = 0  # kills that left an exit `sent` with no order at the broker
    seconds: float = 0.0
    log: Path | None = None


async def ask(d: DaemonProcess, sim: Simulator, p: Planned) -> None:
    """Ask for `p`'s exit without waiting for it: cross its rule, or request a close."""
    if p.action == "emergency":
        d.request_in_background("POST", CLOSE_PATH, {"symbol": p.symbol, "reason": "emergency"})
    else:
        await sim.set_price(p.symbol, p.crossing)


def decision_pattern(asked: Sequence[Planned]) -> str:
    symbols = "|".join(re.escape(p.symbol) for p in asked)
    return rf"\[(?:SL|TP|EXIT)\] (?:{symbols}): "


def ready(status: int, body: Any) -> bool:
    return status == 200


async def kill_cycle(
    plan: RunPlan, cycle: int, sim: Simulator, run_dir: Path, result: RunResult
) -> set[str]:
    """Start the daemon, ask for this cycle's exits, SIGKILL it as planned; the `sent` window."""
    kill = plan.kills[cycle]
    asked = plan.asked_in(cycle)
    d = DaemonProcess(run_dir / "config.toml", run_dir / "daemon.log", plan.latency)
    try:
        await d.start()
        if kill.anchor == "start":
            for p in asked:
                await ask(d, sim, p)
        else:
            if not await d.until("/readyz", ready, READY_TIMEOUT):
                result.findings.notes.append(f"cycle {cycle}: /readyz not 200 within 5 s")
            mark = len(d.lines)
            for p in asked:
                await ask(d, sim, p)
            if kill.anchor == "decision":
                try:
                    await d.wait_line(decision_pattern(asked), mark, DECISION_TIMEOUT)
                except TimeoutError:
                    result.findings.notes.append(f"cycle {cycle}: no decision line within 3 s")
        await asyncio.sleep(kill.delay)  # the randomized moment of the kill
        code = await d.kill()
        if code is not None:
            result.findings.problems.append(f"cycle {cycle}: the daemon had exited ({code})")
    finally:
        await d.close()
    return unsent_window(read_store(run_dir / "state"))


async def final_run(
    plan: RunPlan, latency: float, sim: Simulator, run_dir: Path, found: Findings
) -> None:
    """Start cleanly, ask for every exit again, wait until all settle, stop with SIGTERM."""
    d = DaemonProcess(run_dir / "config.toml", run_dir / "daemon.log", latency)
    try:
        await d.start()
        if not await d.until("/readyz", ready, READY_TIMEOUT):
            found.notes.append("final run: /readyz not 200 within 5 s")
        _, listing = await d.request("GET", "/api/v1/positions")
        active = [p["symbol"] for p in listing["positions"] if p["state"] != "closed"]
        _, metrics = await d.request("GET", "/metrics")
        guarded = re.search(r"^tickguard_open_positions (\S+)$", metrics, re.MULTILINE)
        if guarded is None or float(guarded.group(1)) != len(active):
            found.problems.append(
                f"final run: the store holds {len(active)} active positions ({', '.join(active)}),"
                f" the daemon guards {guarded.group(1) if guarded else 'none'}"
            )
        closes = []
        for p in plan.positions:
            if p.action == "emergency":
                closes.append((p, d.request("POST", CLOSE_PATH, {"symbol": p.symbol})))
            else:
                await sim.set_price(p.symbol, p.crossing)
        for p, answer in zip(
            (p for p, _ in closes), await asyncio.gather(*(c for _, c in closes)), strict=True
        ):
            status, body = answer
            if status not in (200, 409):  # 409: already exiting or closed
                found.problems.append(f"final run: closing {p.symbol} answered {status} {body}")

        def settled(status: int, body: Any) -> bool:
            return status == 200 and all(e["state"] not in IN_FLIGHT for e in body["exits"])

        def closed(status: int, body: Any) -> bool:
            return status == 200 and all(p["state"] == "closed" for p in body["positions"])

        timeout = settle_timeout(latency)
        done = await d.until("/api/v1/exits", settled, timeout) and await d.until(
            "/api/v1/positions?state=all", closed, timeout
        )
        if done:
            code = await d.stop()
            if code != 0:
                found.problems.append(f"final run: exit code {code} after SIGTERM")
        else:  # it failed already; a SIGTERM would wait for the stuck exits to drain
            found.notes.extend(f"the daemon said: {line}" for line in crash_lines(d.lines))
            await d.kill()
    finally:
        await d.close()


async def execute(plan: RunPlan, sim: Simulator, run_dir: Path) -> RunResult:
    """One run: the kill cycles on one state dir, the final run, the store checked."""
    started = time.monotonic()
    result = RunResult(plan, log=run_dir / "daemon.log")
    for p in plan.positions:
        await sim.set_price(p.symbol, p.entry)
    write_config(run_dir, sim, plan.positions)
    window: set[str] = set()
    try:
        for cycle, kill in enumerate(plan.kills):
            now_in_window = await kill_cycle(plan, cycle, sim, run_dir, result)
            landed = "in the sent window" if now_in_window - window else "elsewhere"
            result.in_window += bool(now_in_window - window)
            result.kills.append(f"{kill} ({landed})")
            window = now_in_window
        await final_run(plan, plan.latency, sim, run_dir, result.findings)
        result.findings.add(check_store(run_dir / "state", plan.positions))
        result.findings.problems.extend(repeated_closed_lines(run_dir / "daemon.log"))
    except Exception as exc:  # a harness failure is a finding too, with the run's seed
        result.findings.problems.append(f"run aborted: {type(exc).__name__}: {exc}")
    result.seconds = time.monotonic() - started
    return result


CLOSED_LINE = re.compile(r"\[EXIT\] (\S+) closed at ")


def repeated_closed_lines(log: Path) -> list[str]:
    """Symbols with more than one `[EXIT] ... closed at` line over all of a run's processes
    (SPEC 6: one per completed exit; each position here exits once)."""
    text = log.read_text(encoding="utf-8", errors="replace") if log.exists() else ""
    counts = collections.Counter(CLOSED_LINE.findall(text))
    return [f"{symbol}: {n} `closed at` lines" for symbol, n in sorted(counts.items()) if n > 1]


def describe(result: RunResult) -> str:
    plan = result.plan
    verdict = "ok" if result.findings.ok else result.findings.summary()
    if result.findings.problems:
        verdict += f", {len(result.findings.problems)} other problems"
    return (
        f"run {plan.index} (seed {plan.seed}): paper latency {plan.latency:g} s,"
        f" positions [{'; '.join(map(str, plan.positions))}],"
        f" kills [{', '.join(result.kills)}], {result.seconds:.1f} s: {verdict}"
    )


def details(f: Findings, log: Path | None) -> list[str]:
    lines = [f"  {kind}: {what}" for kind, items in (
        ("stuck", f.stuck), ("duplicate", f.duplicates),
        ("unguarded", f.unguarded), ("problem", f.problems), ("note", f.notes),
    ) for what in items]  # fmt: skip
    if not f.ok and log is not None:
        lines.append(f"  daemon log: {log}")
    return lines


# ---------------------------------------------------------------------------
# The campaign and the deterministic case


def report_line(runs: int, kills: int, found: Findings, seed: object) -> str:
    return f"sigkill campaign: {runs} runs, {kills} kills, {found.summary()} (seed {seed})"


async def campaign(
    work: Path, seconds: float, min_runs: int, seed: int, only_run: int | None, keep: bool
) -> int:
    started = time.monotonic()
    sim = Simulator(work / "simulator.log")
    total = Findings()
    out: list[str] = []
    runs = kills = in_window = 0
    longest = 0.0
    try:
        await sim.start()
        index = only_run or 0
        while runs == 0 or (only_run is None and time.monotonic() - started + longest < seconds):
            run_seed = f"{seed}/{index}"
            plan = plan_run(random.Random(run_seed), index, run_seed, sim.symbols)
            run_dir = work / f"run-{index:04d}"
            result = await execute(plan, sim, run_dir)
            runs += 1
            kills += len(plan.kills)
            in_window += result.in_window
            longest = max(longest, result.seconds)
            total.add(result.findings)
            print(describe(result), *details(result.findings, result.log), sep="\n", flush=True)
            if not result.findings.ok:
                out += [describe(result), *details(result.findings, result.log)]
            elif not keep:
                shutil.rmtree(run_dir, ignore_errors=True)
            index += 1
    finally:
        await sim.close()
    elapsed = time.monotonic() - started
    report = report_line(runs, kills, total, seed)
    summary = [
        report,
        f"{in_window} of {kills} kills left an exit `sent` with no order at the broker;"
        f" {elapsed:.1f} s ({seconds:g} s budget)",
    ]
    # Runs with stuck exits are slow (each waits out its settle bound): then only they count.
    too_slow = total.ok and only_run is None and runs < min_runs
    if too_slow:
        summary.append(f"too slow: {runs} runs within {seconds:g} s, at least {min_runs} wanted")
    text = "\n".join([*summary, *out])
    (work / "report.txt").write_text(text + "\n")
    print("\n".join(summary), flush=True)
    return 0 if total.ok and not too_slow else 1


async def kill_in_sent(work: Path) -> int:
    """SIGKILL while the journal says `sent` and the broker holds nothing; restart; check."""
    sim = Simulator(work / "simulator.log")
    found = Findings()
    run_dir = work / "kill-in-sent"
    try:
        await sim.start()
        p = Planned(sim.symbols[0], "long", 10, 1000.0, "stop_loss", cycle=0)
        plan = RunPlan(0, "kill-in-sent", SLOW_BROKER, (p,), (Kill("sent", 0.0),))
        await sim.set_price(p.symbol, p.entry)
        write_config(run_dir, sim, plan.positions)
        d = DaemonProcess(run_dir / "config.toml", run_dir / "daemon.log", SLOW_BROKER)
        try:
            await d.start()
            if not await d.until("/readyz", ready, READY_TIMEOUT):
                found.notes.append("/readyz not 200 within 5 s")
            await sim.set_price(p.symbol, p.crossing)

            def sent(status: int, body: Any) -> bool:
                return any(e["state"] == ExitState.SENT.value for e in body["exits"])

            if not await d.until("/api/v1/exits", sent, SENT_TIMEOUT):
                raise RuntimeError("the exit never showed `sent`")
            await d.kill()
        finally:
            await d.close()
        tables = read_store(run_dir / "state")
        window = unsent_window(tables)
        print(
            f"after the kill the store holds exits"
            f" {[(e['client_order_id'], e['state']) for e in tables['exits']]}"
            f" and {len(tables['paper_fills'])} paper fills",
            flush=True,
        )
        if not window:
            raise RuntimeError("the kill missed the window: no exit `sent` without a fill")
        await final_run(plan, 0.05, sim, run_dir, found)
        found.add(check_store(run_dir / "state", plan.positions))
    except Exception as exc:
        found.problems.append(f"aborted: {type(exc).__name__}: {exc}")
    finally:
        await sim.close()
    text = "\n".join(
        [report_line(1, 1, found, "kill-in-sent"), *details(found, run_dir / "daemon.log")]
    )
    (work / "report.txt").write_text(text + "\n")
    print(text, flush=True)
    return 0 if found.ok else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("work_dir", type=Path, help="runs, logs and report.txt go here")
    parser.add_argument("--seconds", type=float, default=DEFAULT_SECONDS, help="wall-time budget")
    parser.add_argument("--min-runs", type=int, default=DEFAULT_MIN_RUNS)
    parser.add_argument("--seed", type=int, default=None, help="default: a fresh one, printed")
    parser.add_argument("--only-run", type=int, default=None, help="replay one run of --seed")
    parser.add_argument("--keep", action="store_true", help="keep the dirs of passing runs")
    parser.add_argument("--kill-in-sent", action="store_true", help="the deterministic case")
    args = parser.parse_args(argv)
    args.work_dir.mkdir(parents=True, exist_ok=True)
    if args.kill_in_sent:
        return asyncio.run(kill_in_sent(args.work_dir))
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1 << 32)
    print(f"sigkill campaign: seed {seed}, budget {args.seconds:g} s", flush=True)
    return asyncio.run(
        campaign(args.work_dir, args.seconds, args.min_runs, seed, args.only_run, args.keep)
    )


if __name__ == "__main__":
    sys.exit(main())
