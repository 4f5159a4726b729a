"""A real Prometheus scrapes a running daemon and simulator on loopback.

Prometheus (Debian's package, from .cache/prometheus/bin or PATH) loads a copy
of grafana/alerts/tickguard.rules.yml with every `for:` cut to 0s, scrapes
`tickguard run` every 500 ms, and evaluates the rules every 500 ms. The test
drives the simulator through a live exit, a poll-priced exit (silent socket)
and a cut network path, checks the alerts in Prometheus's /api/v1/alerts, then
runs every dashboard query against Prometheus and expects data from each.
Without the prometheus binary the test skips.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import shutil
import signal
import socket
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

ROOT = Path(__file__).resolve().parents[2]
GRAFANA = ROOT / "grafana"
LOOPBACK = "127.0.0.1"
STARTUP = 20.0  # seconds a daemon or Prometheus may take to listen
STEP = 20.0  # seconds any one condition may take to come true
POLL = 0.1  # seconds between polls of a condition over HTTP
LISTENING_RE = re.compile(r"\[HTTP\] listening on 127\.0\.0\.1:(\d+)")

pytestmark = pytest.mark.slow


def prometheus_binary() -> str:
    """The prometheus server binary, or skip the test."""
    local = ROOT / ".cache" / "prometheus" / "bin" / "prometheus"
    if local.is_file():
        return str(local)
    found = shutil.which("prometheus")
    if found is None:
        pytest.skip("prometheus not found: run scripts/install-prometheus.sh")
    return found


def free_port() -> int:
    """A loopback port nothing listens on right now (bound, then released)."""
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        port: int = s.getsockname()[1]
    return port


def dashboard_queries(instance: str) -> Iterator[tuple[str, str]]:
    """(where, PromQL) for every dashboard query, Grafana's variables filled in for this run."""
    dash = json.loads((GRAFANA / "dashboards" / "tickguard.json").read_text(encoding="utf-8"))
    values = {
        "$__rate_interval": "1m",  # longer than the test: every event is in the window
        "$__interval": "1m",
        "$__range": "5m",
        "$instance": instance,  # a regex matching itself: dots match dots
    }

    def fill(expr: str) -> str:
        for name, value in values.items():
            expr = expr.replace(name, value)
        return expr

    def panels(items: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for p in items:
            yield p
            yield from panels(p.get("panels", []))

    for panel in panels(dash["panels"]):
        for target in panel.get("targets", []):
            yield f"panel {panel['title']!r} {target['refId']}", fill(target["expr"])
    for annotation in dash["annotations"]["list"]:
        if "expr" in annotation:
            yield f"annotation {annotation['name']!r}", fill(annotation["expr"])


async def until(check: Callable[[], Awaitable[Any]], what: str, timeout: float = STEP) -> Any:
    """Await `check()` every POLL seconds until it returns something truthy; fail after `timeout`."""
    last: Any = None
    try:
        async with asyncio.timeout(timeout):
            while True:
                if last := await check():
                    return last
                await asyncio.sleep(POLL)  # polling an HTTP API for a condition
    except TimeoutError:
        raise AssertionError(f"not within {timeout:g}s: {what} (last: {last!r})") from None


async def stop_process(process: asyncio.subprocess.Process) -> None:
    """SIGTERM, then SIGKILL after 10 s."""
    if process.returncode is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        async with asyncio.timeout(10):
            await process.wait()
    except TimeoutError:
        process.kill()
        await process.wait()


class Prometheus:
    """The prometheus server on a free loopback port, its data in `workdir`."""

    def __init__(self, binary: str, workdir: Path) -> None:
        self.binary, self.workdir = binary, workdir
        self.process: asyncio.subprocess.Process | None = None
        self.url = ""
        self.http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))

    async def start(self, config: Path) -> None:
        """Start on a free port; retried on another port if that one was taken meanwhile."""
        for _attempt in range(5):
            port = free_port()
            with (self.workdir / "prometheus.log").open("ab") as log:
                self.process = await asyncio.create_subprocess_exec(
                    self.binary,
                    f"--config.file={config}",
                    f"--storage.tsdb.path={self.workdir / 'tsdb'}",
                    f"--web.listen-address={LOOPBACK}:{port}",
                    "--log.level=warn",
                    stdout=asyncio.subprocess.DEVNULL,
                    stderr=log,
                )
            self.url = f"http://{LOOPBACK}:{port}"
            if await self._ready():
                return
            await stop_process(self.process)
        log_text = (self.workdir / "prometheus.log").read_text(errors="replace")[-3000:]
        raise RuntimeError(f"prometheus did not start:\n{log_text}")

    async def _ready(self) -> bool:
        assert self.process is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + STARTUP
        while loop.time() < deadline and self.process.returncode is None:
            with contextlib.suppress(aiohttp.ClientError):
                async with self.http.get(self.url + "/-/ready") as r:
                    if r.status == 200:
                        return True
            await asyncio.sleep(POLL)  # polling readiness of a starting server
        return False

    async def api(self, path: str, **params: str) -> Any:
        async with self.http.get(self.url + path, params=params) as r:
            body = await r.json()
            assert r.status == 200 and body["status"] == "success", (path, params, body)
            return body["data"]

    async def query(self, expr: str) -> list[dict[str, Any]]:
        data = await self.api("/api/v1/query", query=expr)
        result: list[dict[str, Any]] = data["result"]
        return result

    async def value(self, expr: str) -> float | None:
        """The value of a one-series query, None without data."""
        result = await self.query(expr)
        return float(result[0]["value"][1]) if result else None

    async def alerts(self, state: str | None = None) -> list[dict[str, Any]]:
        alerts: list[dict[str, Any]] = (await self.api("/api/v1/alerts"))["alerts"]
        return [a for a in alerts if state is None or a["state"] == state]

    async def firing(self, name: str, **labels: str) -> list[dict[str, Any]]:
        return [
            a
            for a in await self.alerts("firing")
            if a["labels"]["alertname"] == name
            and all(a["labels"].get(k) == v for k, v in labels.items())
        ]

    async def close(self) -> None:
        if self.process is not None:
            await stop_process(self.process)
        await self.http.close()


class Daemon:
    """`tickguard run` as a subprocess; stderr to a log file."""

    def __init__(self, config: Path, log: Path) -> None:
        self.config, self.log = config, log
        self.process: asyncio.subprocess.Process | None = None
        self.port = 0
        self._listening = asyncio.Event()
        self._reader: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self.process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "tickguard", "run", "--config", str(self.config),
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        self._reader = asyncio.create_task(self._read())
        try:
            async with asyncio.timeout(STARTUP):
                await self._listening.wait()
        except TimeoutError:
            raise AssertionError(
                f"the daemon did not listen: {self.log.read_text(errors='replace')[-2000:]}"
            ) from None

    async def _read(self) -> None:
        assert self.process is not None and self.process.stderr is not None
        with self.log.open("a", encoding="utf-8") as out:
            while line := (await self.process.stderr.readline()).decode(errors="replace"):
                out.write(line)
                out.flush()
                if m := LISTENING_RE.search(line):
                    self.port = int(m.group(1))
                    self._listening.set()

    async def close(self) -> None:
        if self.process is not None:
            await stop_process(self.process)
        if self._reader is not None:
            await self._reader


@pytest.fixture
async def prometheus(tmp_path: Path) -> AsyncIterator[Callable[[Path], Awaitable[Prometheus]]]:
    """`await prometheus(config)`: a started Prometheus server, stopped at teardown."""
    binary = prometheus_binary()
    started: list[Prometheus] = []

    async def start(config: Path) -> Prometheus:
        server = Prometheus(binary, tmp_path)
        started.append(server)
        await server.start(config)
        return server

    try:
        yield start
    finally:
        for server in started:
            await server.close()


@pytest.fixture
async def daemon(tmp_path: Path) -> AsyncIterator[Callable[[str], Awaitable[Daemon]]]:
    """`await daemon(config_text)`: a started `tickguard run`, stopped at teardown."""
    started: list[Daemon] = []

    async def start(config_text: str) -> Daemon:
        config = tmp_path / "tickguard.toml"
        config.write_text(config_text)
        d = Daemon(config, tmp_path / "daemon.log")
        started.append(d)
        await d.start()
        return d

    try:
        yield start
    finally:
        for d in started:
            await d.close()


def fast_rules(workdir: Path) -> Path:
    """A copy of the alert rules with every `for:` cut to 0s (Prometheus evaluates every 500 ms)."""
    text = (GRAFANA / "alerts" / "tickguard.rules.yml").read_text(encoding="utf-8")
    fast, count = re.subn(r"^(\s+)for: \S+$", r"\1for: 0s", text, flags=re.MULTILINE)
    assert count >= 4, "the rules file changed shape: no `for:` found"
    path = workdir / "tickguard.rules.yml"
    path.write_text(fast)
    return path


async def test_prometheus_scrapes_the_daemon_and_fires_the_alerts(
    tmp_path: Path, simulator: Any, daemon: Any, prometheus: Any
) -> None:
    """Prometheus scraping a live daemon: healthy means no alert, exits and a cut feed fire theirs, every dashboard query has data."""
    sim = await simulator(symbols=4, rate=20, seed=1)  # BOSCHLTD ADANIENT RELIANCE TCS
    async with aiohttp.ClientSession() as http, http.get(sim.prices_url) as r:
        start = {s: p["price"] for s, p in (await r.json())["prices"].items()}
    # Long positions with stops far below the walking prices; the test pins a price
    # under a stop to fire an exit.
    positions = "".join(
        f"""
[[positions]]
symbol = "{symbol}"
side = "long"
quantity = 10
entry_price = {start[symbol]}
stop_loss = {round(start[symbol] * 0.5, 2)}
"""
        for symbol in ("BOSCHLTD", "ADANIENT", "RELIANCE")
    )
    d = await daemon(f"""
[daemon]
state_dir = "{tmp_path / "state"}"
[http]
listen = "127.0.0.1:0"
[feed]
url = "{sim.ws_url}"
fallback_url = "{sim.prices_url}"
symbols = ["TCS"]
ping_interval = 0.2
ping_timeout = 0.5
silence_timeout = 1.0
poll_interval = 0.2
[feed.reconnect]
initial_delay = 0.1
max_delay = 0.5
[dns]
servers = []
fallback_servers = []   # never the public defaults: nothing leaves this machine
timeout = 0.5
[prices]
stale_warning = 1.0
cache_timeout = 2.0
[guard]
sweep_interval = 0.1
[market]
always_open = true
{positions}""")
    instance = f"{LOOPBACK}:{d.port}"
    config = tmp_path / "prometheus.yml"
    config.write_text(f"""
global:
  scrape_interval: 500ms
  scrape_timeout: 400ms
  evaluation_interval: 500ms
rule_files:
  - {fast_rules(tmp_path)}
scrape_configs:
  - job_name: tickguard
    static_configs:
      - targets: ["{instance}"]
""")
    prom = await prometheus(config)

    # Prometheus loaded every rule, and each evaluates without error.
    await until(
        lambda: prom.value(f'up{{job="tickguard", instance="{instance}"}} == 1'), "target up"
    )

    async def rules_healthy() -> list[dict[str, Any]] | None:
        groups = (await prom.api("/api/v1/rules"))["groups"]
        rules = [r for g in groups for r in g["rules"]]
        return rules if rules and all(r.get("health") == "ok" for r in rules) else None

    rules = await until(rules_healthy, "every rule evaluated without error")
    assert len(rules) == 16
    for rule in rules:
        assert rule["labels"]["severity"] in ("critical", "warning"), rule["name"]
        assert rule["annotations"]["runbook_url"].endswith(f"#{rule['name'].lower()}")

    # Healthy: connected, every guarded symbol fresh, no alert pending or firing.
    await until(lambda: prom.value("tickguard_websocket_connected == 1"), "feed connected")
    assert await prom.value("tickguard_open_positions") == 3
    assert await prom.value("tickguard_price_stale_threshold_seconds") == 1.0
    assert await prom.value("tickguard_price_cache_timeout_seconds") == 2.0
    await until(
        lambda: prom.query('tickguard_ticks_total{source="live"} > 0'), "live ticks scraped"
    )

    async def no_alerts() -> bool:
        return not await prom.alerts()

    await until(no_alerts, "no alert while healthy")

    # A live price crosses BOSCHLTD's stop: a live exit.
    await sim.set_price("BOSCHLTD", round(start["BOSCHLTD"] * 0.4, 2))
    await until(
        lambda: prom.value('tickguard_exits_total{reason="stop_loss", price_source="live"} == 1'),
        "a live exit scraped",
    )

    # The socket goes silent: the poll takes over, and a poll price crosses ADANIENT's stop.
    await sim.faults("silence")
    await until(lambda: prom.value("tickguard_fallback_active == 1"), "fallback active")
    await sim.set_price("ADANIENT", round(start["ADANIENT"] * 0.4, 2))
    [fallback_exit] = await until(
        lambda: prom.firing("TickguardFallbackExit", price_source="poll"),
        "TickguardFallbackExit firing",
    )
    assert fallback_exit["labels"]["reason"] == "stop_loss"
    assert fallback_exit["labels"]["severity"] == "warning"
    assert "stop_loss exit on a poll price" in fallback_exit["annotations"]["summary"]

    # The network path is cut (socket and poll): disconnected, then RELIANCE stale, then unusable.
    await sim.faults("blackhole")
    [disconnected] = await until(
        lambda: prom.firing("TickguardFeedDisconnected", instance=instance),
        "TickguardFeedDisconnected firing",
    )
    assert disconnected["labels"]["severity"] == "warning"
    assert instance in disconnected["annotations"]["summary"]
    assert "tickguard_websocket_connected = 0" in disconnected["annotations"]["description"]
    [stale] = await until(
        lambda: prom.firing("TickguardPricesStale", symbol="RELIANCE"),
        "TickguardPricesStale firing for RELIANCE",
    )
    assert "RELIANCE" in stale["annotations"]["summary"]
    [unguarded] = await until(
        lambda: prom.firing("TickguardPositionsUnguarded", symbol="RELIANCE"),
        "TickguardPositionsUnguarded firing for RELIANCE",
    )
    assert "tickguard close RELIANCE" in unguarded["annotations"]["description"]
    assert unguarded["labels"]["severity"] == "critical"
    # The closed positions have no age series, so no staleness alerts name them.
    assert not await prom.firing("TickguardPricesStale", symbol="BOSCHLTD")
    assert not await prom.firing("TickguardDown")

    # Every dashboard query returns data from this Prometheus.
    empty = [
        f"{where}: {expr}"
        for where, expr in dashboard_queries(instance)
        if not await prom.query(expr)
    ]
    assert not empty, "dashboard queries without data:\n" + "\n".join(empty)
    instances = await prom.api(
        "/api/v1/label/instance/values", **{"match[]": "tickguard_build_info"}
    )
    assert instances == [instance]  # the dashboard's $instance variable

    # Over the whole run, no other alert fired (Prometheus's own ALERTS series).
    history = await prom.query(
        'count by (alertname) (count_over_time(ALERTS{alertstate="firing"}[5m]))'
    )
    fired = {series["metric"]["alertname"] for series in history}
    expected = {
        "TickguardFallbackExit",
        "TickguardFeedDisconnected",
        "TickguardPricesStale",
        "TickguardPositionsUnguarded",
    }
    tolerated = {
        "TickguardDown",  # absent(up) before the first scrape, with `for:` cut to 0s
        "TickguardReconnectStorm",  # the black hole: an attempt every 0.5 s
        "TickguardEventLoopLag",  # a loaded test machine
    }
    assert expected <= fired <= expected | tolerated, sorted(fired)

    await sim.faults("none")  # the simulator stops at once only without a black hole
