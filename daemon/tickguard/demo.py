"""`tickguard demo`: the embedded default, end to end, in about a minute.

Starts the market simulator and the daemon (paper broker, SQLite in a
temporary state dir) as child processes, registers sample positions through
the API, then scripts a feed outage while a live view shows what the daemon
sees: the socket goes silent (a zombie), the REST poll takes over and a stop
fires on a poll price; the bot closes a position itself (a paper trade), the
daemon's reconciliation closes it as `external`, and when its stop then crosses
on the poll, no order goes out; then the network path is cut (black hole) and
the poll with it, so prices come from the cache, and an exit fires on a cached
price; finally the feed comes back. The safety net is on throughout: the
paper broker holds a stop behind each position (docs/safety-net.md), placed,
moved and cancelled in the `[SAFETY NET]` lines.

Ctrl-C (or SIGTERM, or a hangup) stops it at once in any scene: the script is
cancelled, the daemon and then the simulator are stopped within a bound, a short
"interrupted" summary is printed from what the demo already saw (no API call: the
daemon is going away), the temporary state is removed, and it exits 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import re
import secrets
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from types import FrameType
from typing import Any, TextIO

import aiohttp

DEFAULT_DURATION = 50.0
MIN_TIMELINE = 30.0  # the shortest run that still shows the whole outage
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
# Bounds of an interrupt: from the signal to exit 0 takes at most about their sum
# (under 3 s); they are rarely reached (a daemon stops in ~0.1 s), except by the
# simulator in the black-hole scene (see _terminate).
UNWIND_WAIT = 0.5  # seconds a cancelled script step or live view gets to unwind
DAEMON_STOP_WAIT = 1.2  # seconds a SIGTERMed daemon gets to close its API and store; then SIGKILL
SIM_STOP_WAIT = 0.3  # seconds a SIGTERMed simulator gets (it has nothing to save); then SIGKILL
TAIL_WAIT = 0.3  # seconds the daemon's log tail gets to read the last lines once it is gone
HTTP_TIMEOUT = 10.0  # seconds for any one API call of the demo (all of them loopback)
RECONCILE_INTERVAL = 1.0  # the demo daemon's [account] reconcile_interval
ACCOUNT_WAIT = 3 * RECONCILE_INTERVAL  # seconds the bot's trade gets to show as an [ACCOUNT] close
SEEN_WAIT = 2.0  # seconds the daemon gets to see a price the demo set (4 poll intervals)
SEEN_EVERY = 0.2  # seconds between the demo's looks at the daemon's price of it
PR_SET_PDEATHSIG = 1  # linux/prctl.h
EVENT_PREFIXES = (
    "[SL]",
    "[TP]",
    "[TRAIL]",
    "[BLIND]",
    "[EXIT]",
    "[FALLBACK]",
    "[RECONNECT]",
    "[DNS]",
    "[FEED]",
    "[ACCOUNT]",
    "[SAFETY NET]",
)
CONFIG = """\
[daemon]
state_dir = "{state}"
log_level = "info"

[http]
listen = "127.0.0.1:0"
token_file = "{token_file}"

[feed]
url = "ws://127.0.0.1:{port}/ws"
fallback_url = "http://127.0.0.1:{port}/prices"
symbols = ["TCS", "ADANIENT"]  # ADANIENT: its price still reaches the daemon once it is closed
ping_interval = 1.0
ping_timeout = 1.0
silence_timeout = 3.0
poll_interval = 0.5

[feed.reconnect]
initial_delay = 0.5
max_delay = 4.0
stable_after = 10.0

[dns]
servers = []
fallback_servers = []  # the demo never asks a public resolver
timeout = 2.0

[prices]
stale_warning = 5.0
cache_timeout = 60.0

[guard]
sweep_interval = 0.5

[market]
always_open = true

[account]
reconcile_interval = {reconcile_interval}

[safety_net]
enabled = true  # the paper broker holds a stop 1% beyond each of tickguard's own
"""


class Demo:
    def __init__(self, duration: float, out: TextIO) -> None:
        self.duration = duration
        self.out = out
        self.tty = out.isatty()
        self.started = time.monotonic()
        self.state = Path(tempfile.mkdtemp(prefix="tickguard-demo-"))
        self.token = secrets.token_urlsafe(24)
        self.sim: asyncio.subprocess.Process | None = None
        self.daemon: asyncio.subprocess.Process | None = None
        self.sim_url = ""
        self.api_url = ""
        self.http: aiohttp.ClientSession | None = None
        self.api_ready = asyncio.Event()
        self.block_lines = 0
        self.phase = "starting"
        self.tail: asyncio.Task[None] | None = None
        self.viewer: asyncio.Task[None] | None = None
        self.exits: list[str] = []  # [EXIT] and external-close lines, for an interrupted summary
        self.external: set[str] = set()  # symbols the daemon said were closed outside tickguard
        self.external_seen = asyncio.Event()  # set at each such line
        self.last_view = ""  # the live view's headline, likewise
        self.interrupted = asyncio.Event()
        self.caught: signal.Signals | None = None

    # -- output -----------------------------------------------------------

    def t(self) -> str:
        return f"{time.monotonic() - self.started:5.1f}s"

    def say(self, text: str) -> None:
        self._clear_block()
        print(f"{self.t()}  {text}", file=self.out, flush=True)

    def _clear_block(self) -> None:
        if self.tty and self.block_lines:
            self.out.write(f"\x1b[{self.block_lines}F\x1b[J")
            self.block_lines = 0

    def show(self, lines: list[str]) -> None:
        if self.tty:
            self._clear_block()
            self.out.write("\n".join(lines) + "\n")
            self.out.flush()
            self.block_lines = len(lines)
        else:
            print("\n".join(lines), file=self.out, flush=True)

    # -- processes --------------------------------------------------------

    async def start(self) -> None:
        self.say("starting the simulator and the daemon (Ctrl-C stops the demo)")
        self.sim = await _spawn(
            signal.SIGKILL, "simulate", "--listen", "127.0.0.1:0", "--symbols", "4", "--rate", "4", "--seed", "7",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
        assert self.sim.stdout is not None
        line = (await asyncio.wait_for(self.sim.stdout.readline(), 15)).decode()
        match = re.search(r"http://127\.0\.0\.1:(\d+)", line)
        if not match:
            raise RuntimeError(f"the simulator did not start: {line!r}")
        port = match.group(1)
        self.sim_url = f"http://127.0.0.1:{port}"
        token_file = self.state / "api-token"
        token_file.write_text(self.token)
        token_file.chmod(0o600)
        config = self.state / "config.toml"
        config.write_text(
            CONFIG.format(
                state=self.state / "state",
                token_file=token_file,
                port=port,
                reconcile_interval=RECONCILE_INTERVAL,
            )
        )
        env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC")}
        self.daemon = await _spawn(
            signal.SIGTERM, "run", "--config", str(config),
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE, env=env,
        )  # fmt: skip
        self.tail = asyncio.create_task(self._tail(self.daemon.stderr))
        await asyncio.wait_for(self.api_ready.wait(), 20)
        self.http = aiohttp.ClientSession(
            headers={"Authorization": f"Bearer {self.token}"},
            timeout=aiohttp.ClientTimeout(total=HTTP_TIMEOUT),
        )
        self.say(f"simulator  {self.sim_url}  (POST /faults, /prices/SYMBOL)")
        self.say(f"health     {self.api_url}/api/v1/monitoring/connection-health")
        self.say(f"metrics    {self.api_url}/metrics")
        self.say(
            f"API        {self.api_url}/api/v1/positions  (token in {self.state / 'api-token'})"
        )
        self.say(f"state and the daemon's log in {self.state} (removed at the end)")

    async def _tail(self, stream: asyncio.StreamReader | None) -> None:
        assert stream is not None
        with (self.state / "daemon.log").open("w", encoding="utf-8") as log:
            while line := (await stream.readline()).decode(errors="replace"):
                log.write(line)
                log.flush()
                text = line.rstrip()
                if m := re.search(r"\[HTTP\] listening on ([\d.]+):(\d+)", text):
                    self.api_url = f"http://{m.group(1)}:{m.group(2)}"
                    self.api_ready.set()
                message = text.split(": ", 1)[1] if ": " in text else text
                if message.startswith(EVENT_PREFIXES) or text.startswith(("ERROR", "CRITICAL")):
                    self.say(f"  tickguard | {message}")
                external = re.match(r"\[ACCOUNT\] (\S+) closed outside tickguard", message)
                if message.startswith("[EXIT]") or external:
                    self.exits.append(message)
                if external:
                    self.external.add(external.group(1))
                    self.external_seen.set()

    async def stop(self) -> None:
        """Stop the live view, then the daemon, then the simulator, each within a bound.

        Never raises and never leaves a child running: a child that does not stop on
        SIGTERM within its bound is killed. Safe at any point of `start`.
        """
        if self.viewer is not None:
            self.viewer.cancel()
            await asyncio.wait([self.viewer], timeout=UNWIND_WAIT)
        if self.http is not None:
            await self.http.close()
        await _terminate(self.daemon, DAEMON_STOP_WAIT)
        await _terminate(self.sim, SIM_STOP_WAIT)
        if self.tail is not None:  # reads on to the end of the daemon's stderr, then stops
            await asyncio.wait([self.tail], timeout=TAIL_WAIT)
            self.tail.cancel()
            await asyncio.wait([self.tail], timeout=TAIL_WAIT)

    # -- API helpers ------------------------------------------------------

    async def api(self, method: str, path: str, body: object = None) -> tuple[int, Any]:
        assert self.http is not None
        async with self.http.request(method, self.api_url + path, json=body) as r:
            return r.status, await r.json(content_type=None)

    async def sim_call(self, path: str, body: object) -> None:
        assert self.http is not None
        async with self.http.post(self.sim_url + path, json=body) as r:
            r.raise_for_status()

    async def sim_prices(self) -> dict[str, float]:
        assert self.http is not None
        async with self.http.get(self.sim_url + "/prices") as r:
            data = await r.json()
        return {s: float(v["price"]) for s, v in data["prices"].items()}

    # -- the script -------------------------------------------------------

    async def script(self) -> None:
        prices = await self.sim_prices()
        b, a, r = prices["BOSCHLTD"], prices["ADANIENT"], prices["RELIANCE"]
        positions = [
            {"symbol": "BOSCHLTD", "side": "long", "quantity": 10, "entry_price": round(b, 2),
             "stop_loss": round(b * 0.99, 2), "take_profit": round(b * 1.05, 2)},
            {"symbol": "ADANIENT", "side": "short", "quantity": 25, "entry_price": round(a, 2),
             "stop_loss": round(a * 1.03, 2), "trailing_stop": round(a * 0.02, 2)},
            {"symbol": "RELIANCE", "side": "long", "quantity": 40, "entry_price": round(r, 2),
             "stop_loss": round(r * 0.95, 2), "take_profit": round(r * 1.05, 2)},
        ]  # fmt: skip
        self.phase = "live"
        for p in positions:
            status, _ = await self.api("POST", "/api/v1/positions", p)
            self.say(
                f"registered {p['side']} {p['symbol']} x{p['quantity']} @ {p['entry_price']} (HTTP {status})"
            )
        steps: list[tuple[float, str, Callable[[], Awaitable[None]]]] = [
            (6, "the feed goes silent: a zombie socket that answers pings but sends no data",
             lambda: self.sim_call("/faults", {"mode": "silence"})),
            (14, "BOSCHLTD drops through its stop; only the REST poll can see it",
             lambda: self.sim_call("/prices/BOSCHLTD", {"price": round(b * 0.985, 2)})),
            (17, "the bot closes ADANIENT itself (a paper trade), then its stop crosses",
             lambda: self._closed_outside(positions[1])),
            (21, "the network path is cut (black hole): socket and poll both silent",
             lambda: self.sim_call("/faults", {"mode": "blackhole"})),
            (28, "the bot adds a RELIANCE long whose stop the last cached price already breaches",
             lambda: self._cached_exit(r)),
            (36, "the network comes back", lambda: self.sim_call("/faults", {"mode": "none"})),
        ]  # fmt: skip
        # The timeline is written for DEFAULT_DURATION; shorter runs squeeze it (down to
        # MIN_TIMELINE, below which the outage is simply cut short).
        scale = max(self.duration, MIN_TIMELINE) / DEFAULT_DURATION
        for at, text, action in steps:
            await self._until(at * scale)
            self.phase = text.split(":")[0]
            self.say(f"== {text}")
            await action()
        await self._until(self.duration)

    async def _closed_outside(self, position: dict[str, Any]) -> None:
        """The bot closes `position` on the paper account; once tickguard has reconciled it
        away, its stop crosses on the poll and tickguard sends nothing."""
        symbol, quantity, stop = position["symbol"], position["quantity"], position["stop_loss"]
        _, pos = await self.api("GET", "/api/v1/positions")
        if symbol not in {p["symbol"] for p in pos["positions"]}:
            self.say(f"  ({symbol} is no longer guarded: there is nothing for the bot to close)")
            return
        side = "buy" if position["side"] == "short" else "sell"
        status, after = await self.api(
            "POST", "/api/v1/paper/trades", {"symbol": symbol, "side": side, "quantity": quantity}
        )
        held = f": the paper account holds {after['quantity']:g}" if status == 201 else ""
        self.say(
            f"  the bot {side}s {quantity} {symbol} (POST /api/v1/paper/trades, HTTP {status}){held}"
        )
        if not await self._external(symbol, ACCOUNT_WAIT):
            self.say(
                f"  (no [ACCOUNT] line for {symbol} within {ACCOUNT_WAIT:g}s: its stop is left alone)"
            )
            return
        crossed = round(stop * (1.005 if position["side"] == "short" else 0.995), 2)
        await self.sim_call(f"/prices/{symbol}", {"price": crossed})
        self.say(f"  {symbol} moves to {crossed}, through its stop {stop}")
        source = await self._seen(symbol, crossed, SEEN_WAIT)
        seen = (
            f"sees {crossed} on the {source}"
            if source
            else f"has not seen {crossed} within {SEEN_WAIT:g}s"
        )
        self.say(f"  tickguard {seen} and sends nothing: {symbol} was closed outside tickguard")

    async def _external(self, symbol: str, within: float) -> bool:
        """Whether the daemon says, within `within` seconds, that it closed `symbol` as external."""
        try:
            async with asyncio.timeout(within):
                while symbol not in self.external:
                    self.external_seen.clear()
                    await self.external_seen.wait()
        except TimeoutError:
            return False
        return True

    async def _seen(self, symbol: str, price: float, within: float) -> str | None:
        """The source of the daemon's price of `symbol` once it is `price`; None if not within."""
        deadline = time.monotonic() + within
        while True:
            _, health = await self.api("GET", "/api/v1/monitoring/connection-health")
            quote = health["price_cache"]["cache_entries"].get(symbol) or {}
            if quote.get("price") == price:
                return str(quote["source"])
            if time.monotonic() >= deadline:
                return None
            await asyncio.sleep(SEEN_EVERY)

    async def _cached_exit(self, reliance_entry: float) -> None:
        status, _ = await self.api("DELETE", "/api/v1/positions/RELIANCE")
        self.say(f"  (dropped the old RELIANCE position without an order: HTTP {status})")
        _, health = await self.api("GET", "/api/v1/monitoring/connection-health")
        cached = health["price_cache"]["cache_entries"]["RELIANCE"]["price"] or reliance_entry
        body = {"symbol": "RELIANCE", "side": "long", "quantity": 40,
                "entry_price": round(cached * 1.02, 2), "stop_loss": round(cached * 1.01, 2)}  # fmt: skip
        status, _ = await self.api("POST", "/api/v1/positions", body)
        self.say(
            f"registered long RELIANCE x40 @ {body['entry_price']} SL {body['stop_loss']} (HTTP {status})"
        )

    async def _until(self, at: float) -> None:
        """Wait until `at` seconds after the start (a timeline, not synchronisation)."""
        await asyncio.sleep(max(0.0, at - (time.monotonic() - self.started)))

    async def live_view(self) -> None:
        every = 1.0 if self.tty else 3.0
        while True:
            await asyncio.sleep(every)
            with contextlib.suppress(
                aiohttp.ClientError, OSError, ValueError, KeyError, TimeoutError
            ):
                self.show(await self._view())

    async def _view(self) -> list[str]:
        _, h = await self.api("GET", "/api/v1/monitoring/connection-health")
        _, pos = await self.api("GET", "/api/v1/positions?state=all")
        ws, fb, net = h["websocket"], h["fallback"], h["safety_net"]
        feed = "CONNECTED" if ws["connected"] else ws["state"].upper()
        self.last_view = (
            f"feed {feed}  fallback {'ACTIVE' if fb['active'] else 'off'}"
            f"  reconnects {ws['reconnect_attempts']}  errors {ws['network_errors']}"
            f"  broker-held stops {net['positions']}/{net['guarded']}"
        )
        lines = [f"{self.t()}  [{self.phase}] {self.last_view}"]
        for p in pos["positions"][-6:]:
            q = p.get("price") or {}
            price = q.get("price")
            age = q.get("age_seconds")
            seen = (
                ""
                if price is None
                else f"{price:>10.2f} {q['source']:<5} {age:5.1f}s{' STALE' if q['is_stale'] else ''}"
            )
            rules = " ".join(
                f"{k} {p[v]:g}"
                for k, v in (("SL", "stop_loss"), ("TP", "take_profit"), ("trail", "trailing_stop"))
                if p[v] is not None
            )
            lines.append(
                f"        {p['symbol']:<9} {p['side']:<5} x{p['quantity']:<4g} @ {p['entry_price']:<9g} {rules:<28} {seen:<28} {p['state']}"
            )
        return lines

    async def play(self) -> None:
        """The whole demo: start, the script with its live view, the summary from the API."""
        await self.start()
        self.viewer = asyncio.create_task(self.live_view())
        try:
            async with asyncio.timeout(self.duration) as budget:
                await self.script()
        except TimeoutError:
            if not budget.expired():
                raise
        self.viewer.cancel()
        await self.summary()

    async def summary(self) -> None:
        _, exits = await self.api("GET", "/api/v1/exits")
        self.say("exits (from the journal):")
        for e in reversed(exits["exits"]):
            if e["client_order_id"] is None:  # closed outside tickguard: no order was sent
                self.say(
                    f"  {e['symbol']:<9} {e['reason']:<13} no order, no client order id -> {e['state']}: {e['detail']}"
                )
                continue
            price = "-" if e["exit_price"] is None else f"{e['exit_price']:.2f}"
            pnl = "-" if e["pnl"] is None else f"{e['pnl']:.2f}"
            self.say(
                f"  {e['symbol']:<9} {e['reason']:<13} on a {e['price_source']:<5} price -> {e['state']} at {price}, pnl {pnl}"
            )
        _, health = await self.api("GET", "/api/v1/monitoring/connection-health")
        ws = health["websocket"]
        self.say(
            f"feed: {ws['reconnect_attempts']} reconnects, {ws['network_errors']} network errors;"
            f" now {'connected' if ws['connected'] else ws['state']}"
        )
        self.say(f"(the API at {self.api_url} and /metrics stop with the demo)")

    def interrupt(self, sig: signal.Signals) -> None:
        """Note the first stop signal; `run` does the stopping."""
        if self.caught is None:
            self.caught = sig
            self.interrupted.set()

    def interrupted_summary(self) -> None:
        """What the demo saw before the signal: no API call, the daemon is gone by now."""
        name = self.caught.name if self.caught is not None else "a signal"
        self.say(f"interrupted by {name} during: {self.phase}")
        self.say(f"exits seen: {len(self.exits)}")
        for line in self.exits:
            self.say(f"  {line}")
        if self.last_view:
            self.say(f"last view: {self.last_view}")


async def _spawn(
    orphaned: signal.Signals, *args: str, **options: Any
) -> asyncio.subprocess.Process:
    """Start `python -m tickguard ARGS` as a child that only the demo stops.

    Each child leads a session (and so a process group) of its own, off the
    terminal: a terminal's Ctrl-C signals the foreground group, which is now the
    demo alone, so the demo decides when and in which order its children stop
    (the daemon first, while its feed is still up, then the simulator), the same
    way whether the SIGINT came from a terminal, `timeout -s INT` or `kill -INT`,
    and a child still starting up gets a silent SIGTERM rather than a
    KeyboardInterrupt. The price is that nothing else stops them, so the demo must
    always do it (`Demo.stop`, in `run`'s finally) and, should the demo itself die
    (SIGKILL, a crash), the kernel sends them `orphaned` (PR_SET_PDEATHSIG, Linux):
    SIGTERM for the daemon, SIGKILL for the simulator (see `_terminate`).
    """
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tickguard", *args,
        stdin=asyncio.subprocess.DEVNULL, start_new_session=True,
        preexec_fn=_follow_parent(orphaned), **options,
    )  # fmt: skip


def _follow_parent(orphaned: signal.Signals) -> Callable[[], None] | None:
    """A preexec_fn asking Linux to send the child `orphaned` when the demo dies (None elsewhere).

    libc is looked up here, in the parent: between fork and exec the child only
    makes one foreign call (no import, no lock).
    """
    if not sys.platform.startswith("linux"):
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    parent = os.getpid()

    def follow() -> None:
        prctl(PR_SET_PDEATHSIG, orphaned)
        if os.getppid() != parent:  # the demo died before prctl: follow it now
            os._exit(1)

    return follow


async def _terminate(proc: asyncio.subprocess.Process | None, wait: float) -> None:
    """SIGTERM a child, give it `wait` seconds, then SIGKILL it; return once it is reaped.

    The bound matters: in the black-hole scene the simulator holds the daemon's
    poll and socket handshake open, and aiohttp's graceful shutdown waits up to
    60 s for such handlers, so a SIGTERMed simulator would not exit (the old 12 s).
    """
    if proc is None or proc.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.terminate()
    try:
        await asyncio.wait_for(proc.wait(), wait)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()


async def run(duration: float | None, out: TextIO = sys.stdout) -> int:
    """Run the demo; 0 when it ran its course or was interrupted (SIGINT, SIGTERM, SIGHUP).

    The signal handlers are plain `signal.signal` ones that hand over to the loop,
    not `loop.add_signal_handler`: the loop would put back Python's SIGINT handler
    when asyncio.run closes it, and a second Ctrl-C in the last milliseconds would
    then raise KeyboardInterrupt (a traceback). This is the process's main: on the
    way out the stop signals are left ignored, since it is exiting anyway.
    """
    demo = Demo(duration or DEFAULT_DURATION, out)
    loop = asyncio.get_running_loop()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        loop.call_soon_threadsafe(demo.interrupt, signal.Signals(signum))

    for sig in STOP_SIGNALS:
        signal.signal(sig, on_signal)
    try:
        play = asyncio.create_task(demo.play())
        interrupted = asyncio.create_task(demo.interrupted.wait())
        await asyncio.wait([play, interrupted], return_when=asyncio.FIRST_COMPLETED)
        interrupted.cancel()
        if demo.caught is not None:
            demo.say(f"{demo.caught.name}: stopping the daemon and the simulator")
            play.cancel()
            await asyncio.wait([play], timeout=UNWIND_WAIT)
            if play.done() and not play.cancelled():
                play.exception()  # whatever it was, the stop request wins
        else:
            await play  # raises what the demo raised
    finally:
        await demo.stop()
        shutil.rmtree(demo.state, ignore_errors=True)
        for sig in STOP_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)
    if demo.caught is not None:
        demo.interrupted_summary()
        print("demo interrupted; the temporary state was removed", file=out, flush=True)
    else:
        print("demo finished; the temporary state was removed", file=out)
    return 0
