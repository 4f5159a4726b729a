"""The whole mission with real processes: simulator and `tickguard run` as subprocesses.

A feed behind a DNS name whose primary resolver is dead; positions registered
through the API; the socket goes silent, then the network path is cut; a stop
fires on a poll price, then another on a cached price; every step is checked
in the health document, the exit journal and the metrics.
"""

from __future__ import annotations

import asyncio
import re
import signal
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

TOKEN = "e2e-secret-token"
FEED_HOST = "feed.tickguard.test"


class Daemon:
    """`tickguard run` as a subprocess, its stderr kept in a log file."""

    def __init__(self, config: Path, log: Path) -> None:
        self.config, self.log = config, log
        self.process: asyncio.subprocess.Process | None = None
        self.url = ""
        self.lines: list[str] = []
        self._reader: asyncio.Task[None] | None = None
        self._listening = asyncio.Event()
        self.http = aiohttp.ClientSession(
            headers={"Authorization": f"Bearer {TOKEN}"}, timeout=aiohttp.ClientTimeout(total=20)
        )

    async def start(self) -> None:
        self.process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "tickguard", "run", "--config", str(self.config),
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        self._reader = asyncio.create_task(self._read())
        async with asyncio.timeout(20):
            await self._listening.wait()

    async def _read(self) -> None:
        assert self.process is not None and self.process.stderr is not None
        with self.log.open("a", encoding="utf-8") as out:
            while line := (await self.process.stderr.readline()).decode(errors="replace"):
                out.write(line)
                self.lines.append(line.rstrip())
                if m := re.search(r"\[HTTP\] listening on 127\.0\.0\.1:(\d+)", line):
                    self.url = f"http://127.0.0.1:{m.group(1)}"
                    self._listening.set()

    async def get(self, path: str) -> Any:
        async with self.http.get(self.url + path) as r:
            assert r.status == 200, (path, r.status, await r.text())
            if path == "/metrics":
                return await r.text()
            return await r.json()

    async def post(self, path: str, body: object) -> tuple[int, Any]:
        async with self.http.post(self.url + path, json=body) as r:
            return r.status, await r.json()

    async def stop(self) -> int:
        assert self.process is not None
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
            async with asyncio.timeout(15):
                await self.process.wait()
        if self._reader is not None:
            await self._reader
        await self.http.close()
        assert self.process.returncode is not None
        return self.process.returncode


@pytest.fixture
async def daemon_factory(tmp_path: Path) -> AsyncIterator[Callable[[str], Any]]:
    started: list[Daemon] = []

    async def start(config_text: str) -> Daemon:
        config = tmp_path / "config.toml"
        config.write_text(config_text)
        daemon = Daemon(config, tmp_path / "daemon.log")
        started.append(daemon)
        await daemon.start()
        return daemon

    try:
        yield start
    finally:
        for d in started:
            if d.process is not None and d.process.returncode is None:
                d.process.kill()
                await d.process.wait()
            if not d.http.closed:
                await d.http.close()


async def filled_exits(d: Daemon, symbol: str) -> list[dict[str, Any]]:
    """The journal's exits for `symbol`, once one of them is filled."""
    async with asyncio.timeout(15):
        while True:
            exits = [e for e in (await d.get("/api/v1/exits"))["exits"] if e["symbol"] == symbol]
            if any(e["state"] == "filled" for e in exits):
                return exits
            await asyncio.sleep(0.05)


def metric(text: str, name: str, labels: dict[str, str] | None = None) -> float:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(
                sample.labels.get(k) == v for k, v in (labels or {}).items()
            ):
                return float(sample.value)
    raise AssertionError(f"{name}{labels or ''} not exported")


def assert_seed_health(h: dict[str, Any], *, connected: bool) -> None:
    """The fields and types the SPEC's seed example promises."""
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d\d:\d\d", h["timestamp"]), h[
        "timestamp"
    ]
    ws = h["websocket"]
    assert ws["connected"] is connected
    for key in ("subscribed_symbols", "reconnect_attempts", "network_errors"):
        assert isinstance(ws[key], int) and ws[key] >= 0, (key, ws[key])
    cache = h["price_cache"]
    assert cache["cached_symbols"] == len(cache["cache_entries"])
    for entry in cache["cache_entries"].values():
        assert set(entry) >= {"price", "age_seconds", "is_stale"}


async def test_outage_end_to_end(
    tmp_path: Path, simulator: Any, dns_server: Any, eventually: Any, daemon_factory: Any
) -> None:
    """Silence then black hole: one exit on a poll price, one on a cached price, all visible."""
    sim = await simulator(symbols=4, rate=20, seed=3)
    dead = await dns_server({FEED_HOST: "127.0.0.1"}, dead=True)
    alive = await dns_server({FEED_HOST: "127.0.0.1"})
    token_file = tmp_path / "token"
    token_file.write_text(f"  {TOKEN}\n")
    d = await daemon_factory(f"""
[daemon]
state_dir = "{tmp_path / "state"}"
[http]
listen = "127.0.0.1:0"
token_file = "{token_file}"
[feed]
url = "ws://{FEED_HOST}:{sim.port}/ws"
fallback_url = "http://{FEED_HOST}:{sim.port}/prices"
symbols = ["TCS"]
ping_interval = 0.3
ping_timeout = 0.5
silence_timeout = 1.0
poll_interval = 0.2
[feed.reconnect]
initial_delay = 0.1
max_delay = 1.0
stable_after = 30.0
[dns]
servers = ["{dead.nameserver}"]
fallback_servers = ["{alive.nameserver}"]
timeout = 0.5
[prices]
stale_warning = 1.0
cache_timeout = 120.0
[guard]
sweep_interval = 0.1
[market]
always_open = true
""")

    # Live: connected through the fallback resolver, prices flowing.
    async def health() -> dict[str, Any]:
        h: dict[str, Any] = await d.get("/api/v1/monitoring/connection-health")
        return h

    h: dict[str, Any] = {}

    async def until(pred: Callable[[dict[str, Any]], bool], what: str, timeout: float = 15) -> None:
        nonlocal h
        async with asyncio.timeout(timeout):
            while True:  # polling the API for a condition, not synchronisation
                h = await health()
                if pred(h):
                    return
                await asyncio.sleep(0.05)

    await until(
        lambda h: h["websocket"]["connected"] and "TCS" in h["price_cache"]["cache_entries"],
        "connected",
    )
    assert_seed_health(h, connected=True)
    prices = await (await d.http.get(sim.prices_url)).json()
    boschltd = prices["prices"]["BOSCHLTD"]["price"]
    status, body = await d.post("/api/v1/positions", {
        "symbol": "BOSCHLTD", "side": "long", "quantity": 10,
        "entry_price": boschltd, "stop_loss": round(boschltd * 0.98, 2),
    })  # fmt: skip
    assert status == 201 and body["state"] == "open", body
    await until(lambda h: "BOSCHLTD" in h["price_cache"]["cache_entries"], "BOSCHLTD subscribed")
    assert h["websocket"]["subscribed_symbols"] == 2
    assert h["price_cache"]["cache_entries"]["BOSCHLTD"]["is_stale"] is False

    # Silence: the socket is declared dead, the poll takes over.
    await sim.faults("silence")
    await until(lambda h: h["fallback"]["active"] and h["fallback"]["polling"]
                and h["price_cache"]["cache_entries"]["BOSCHLTD"]["source"] == "poll", "polling")  # fmt: skip
    assert h["websocket"]["reconnect_attempts"] >= 1 and h["websocket"]["network_errors"] >= 1

    # A poll price crosses the stop: exactly one exit, priced by the poll.
    await sim.set_price("BOSCHLTD", round(boschltd * 0.97, 2))
    exits = await filled_exits(d, "BOSCHLTD")
    assert (
        len(exits) == 1 and exits[0]["price_source"] == "poll" and exits[0]["reason"] == "stop_loss"
    )
    assert exits[0]["exit_price"] == round(boschltd * 0.97, 2) and exits[0]["pnl"] < 0

    # Black hole: socket and poll both cut; prices come from the cache and turn stale.
    await sim.faults("blackhole")
    await until(lambda h: h["price_cache"]["cache_entries"]["TCS"]["source"] == "cache"
                and h["price_cache"]["cache_entries"]["TCS"]["is_stale"], "stale cache")  # fmt: skip
    assert_seed_health(h, connected=False)
    tcs = h["price_cache"]["cache_entries"]["TCS"]["price"]
    age_before = h["price_cache"]["cache_entries"]["TCS"]["age_seconds"]
    # A position whose stop the stale cached price is already beyond closes at once, on the cache.
    status, body = await d.post("/api/v1/positions", {
        "symbol": "TCS", "side": "short", "quantity": 3,
        "entry_price": round(tcs * 0.99, 2), "stop_loss": round(tcs * 0.995, 2),
    })  # fmt: skip
    assert status == 201, body
    tcs_exits = await filled_exits(d, "TCS")
    assert len(tcs_exits) == 1 and tcs_exits[0]["price_source"] == "cache"
    assert (
        tcs_exits[0]["exit_price"] == tcs and tcs_exits[0]["pnl"] < 0
    )  # a short stopped out above entry
    h = await health()
    assert h["price_cache"]["cache_entries"]["TCS"]["age_seconds"] >= age_before

    text = await d.get("/metrics")
    assert metric(text, "tickguard_websocket_reconnect_attempts_total") >= 1
    assert metric(text, "tickguard_dns_fallbacks_total") >= 1
    assert (
        metric(text, "tickguard_dns_lookups_total", {"resolver": "primary", "outcome": "fail"}) >= 1
    )
    assert (
        metric(text, "tickguard_exits_total", {"reason": "stop_loss", "price_source": "poll"}) == 1
    )
    assert (
        metric(text, "tickguard_exits_total", {"reason": "stop_loss", "price_source": "cache"}) == 1
    )
    assert metric(text, "tickguard_fallback_active") == 1
    assert metric(text, "tickguard_websocket_connected") == 0
    assert any("[DNS]" in line and "resolved via" in line for line in d.lines)
    assert any("[SL] BOSCHLTD" in line and "(FALLBACK)" in line for line in d.lines)
    assert any(line.endswith("(stop_loss, cache)") and "[EXIT] TCS" in line for line in d.lines)

    # The network returns: live again, fallback over.
    await sim.faults("none")
    await until(
        lambda h: h["websocket"]["connected"] and not h["fallback"]["active"], "recovered", 20
    )
    assert await d.stop() == 0
    assert any("STOPPING" in line or "shutting down" in line for line in d.lines)
    # SPEC 6: exactly one `closed at` line per completed exit.
    closed = sorted(line.split()[3] for line in d.lines if " closed at " in line and "[EXIT]" in line)
    assert closed == ["BOSCHLTD", "TCS"], [line for line in d.lines if "[EXIT]" in line]
