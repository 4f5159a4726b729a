"""Daemon parts that the end-to-end tests do not reach: promtool on /metrics, 429 handling,
restarting a crashed background task."""

from __future__ import annotations

import asyncio
import random
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest

from tickguard import app
from tickguard.config import parse_config
from tickguard.core.positions import PositionSpec, Side
from tickguard.core.prices import PriceBook, PriceSource
from tickguard.feed.dns import ResolverChain
from tickguard.feed.json_protocol import JsonProtocol, poll_source
from tickguard.feed.poller import FallbackPoller
from tickguard.feed.supervisor import FeedSupervisor
from tickguard.metrics import Metrics

ROOT = Path(__file__).resolve().parents[2]


def promtool() -> str:
    local = ROOT / ".cache" / "prometheus" / "bin" / "promtool"
    if local.is_file():
        return str(local)
    found = shutil.which("promtool")
    if found is None:
        pytest.skip("promtool not found: run scripts/install-prometheus.sh")
    return found


@pytest.fixture
async def daemon(tmp_path: Path) -> AsyncIterator[app.Daemon]:
    config = parse_config(
        {
            "daemon": {"state_dir": str(tmp_path)},
            "http": {"listen": "127.0.0.1:0"},
            "feed": {"url": "ws://127.0.0.1:9/ws", "symbols": ["TCS"]},
            "dns": {"fallback_servers": []},
            "market": {"always_open": True},
        },
        env={},
    )
    d = await app.build(config)
    try:
        yield d
    finally:
        await d.session.close()
        d.store.close()  # closing twice is harmless


async def test_metrics_output_passes_promtool_check_metrics(daemon: app.Daemon) -> None:
    """The daemon's exposition, with guarded symbols and exits, is clean under `promtool check metrics`."""
    await daemon.guard_loop.add(
        PositionSpec("BOSCHLTD", Side.LONG, 10, 735.0, stop_loss=700.0), source="test"
    )
    await daemon.guard_loop.add(PositionSpec("ADANIENT", Side.SHORT, 5, 200.0), source="test")
    daemon.book.update("BOSCHLTD", 720.0, None, PriceSource.POLL, daemon.monotonic())
    await daemon.guard_loop.sweep()
    daemon.metrics.order_seconds.observe(0.05)
    daemon.port.publish(daemon.snapshot())  # the age collector reads the newest snapshot
    text = generate_latest(daemon.metrics.registry)
    assert b'tickguard_price_age_seconds{symbol="BOSCHLTD"}' in text
    assert b'symbol="TCS"' not in text  # subscribed but not guarded: no per-symbol series
    check = await asyncio.create_subprocess_exec(
        promtool(), "check", "metrics",
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    async with asyncio.timeout(60):
        out, _ = await check.communicate(text)
    assert check.returncode == 0 and not out.strip(), out


async def test_exposition_has_no_created_series(daemon: app.Daemon) -> None:
    """No `_created` series: each counter and histogram child exports only its own samples."""
    daemon.metrics.exits.labels("stop_loss", "live").inc()
    daemon.metrics.order_seconds.observe(0.05)
    daemon.metrics.network_errors.labels("dns").inc()
    text = generate_latest(daemon.metrics.registry).decode()
    assert "_created" not in text, [line for line in text.splitlines() if "_created" in line]


async def test_poll_waits_out_retry_after_on_429() -> None:
    """A 429 with Retry-After parks the poll for that long before it asks again."""
    loop = asyncio.get_running_loop()
    hits: list[float] = []

    async def prices(request: web.Request) -> web.Response:
        hits.append(loop.time())
        if len(hits) == 1:
            return web.json_response(
                {"error": "slow down"}, status=429, headers={"Retry-After": "1"}
            )
        return web.json_response({"prices": {"TCS": {"price": 3500.5, "ts": 1}}})

    server = web.Application()
    server.router.add_get("/prices", prices)
    runner = web.AppRunner(server)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    config = parse_config(
        {
            "feed": {"url": "ws://127.0.0.1:9/ws", "poll_interval": 0.05},
            "dns": {"fallback_servers": []},
        },
        env={},
    )
    metrics = Metrics(CollectorRegistry())
    book = PriceBook(30, 300)
    supervisor = FeedSupervisor(
        config.feed,
        protocol=JsonProtocol(),
        resolver=ResolverChain(config.dns, None, metrics),
        book=book,
        metrics=metrics,
        symbols=lambda: {"TCS"},
        on_prices=lambda symbols, source: None,
        market_open=lambda: True,
        rng=random.Random(1),
    )  # never run: its fallback is active from the start
    polled = asyncio.Event()
    async with aiohttp.ClientSession() as session:
        poller = FallbackPoller(
            poll_source(f"http://127.0.0.1:{port}/prices"),
            0.05,
            session=session,
            supervisor=supervisor,
            book=book,
            metrics=metrics,
            symbols=lambda: {"TCS"},
            on_prices=lambda symbols, source: polled.set(),
        )
        task = asyncio.create_task(poller.run())
        try:
            async with asyncio.timeout(10):
                await polled.wait()
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await runner.cleanup()
    assert len(hits) == 2
    assert hits[1] - hits[0] >= 1.0  # Retry-After honoured, not poll_interval (0.05 s)
    price = book.get("TCS")
    assert price is not None and price.value == 3500.5


async def test_crashed_task_is_logged_counted_and_restarted(
    daemon: app.Daemon, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A background task that crashes is restarted; one that keeps crashing ends the daemon."""
    monkeypatch.setattr(app, "CRASH_PAUSE", 0.001)
    runs = 0

    async def flaky() -> None:
        nonlocal runs
        runs += 1
        if runs < 3:
            raise RuntimeError("boom")

    failed = asyncio.Event()
    await app._keep_running(daemon, "flaky", flaky, failed)
    assert runs == 3 and not failed.is_set()
    registry = daemon.metrics.registry
    assert registry.get_sample_value("tickguard_task_crashes_total", {"task": "flaky"}) == 2
    assert "task flaky crashed" in caplog.text

    async def broken() -> None:
        raise RuntimeError("always")

    await app._keep_running(daemon, "broken", broken, failed)
    assert failed.is_set()
    assert (
        registry.get_sample_value("tickguard_task_crashes_total", {"task": "broken"})
        == app.CRASHES_TOLERATED + 1
    )


async def test_an_exit_the_journal_cannot_hold_is_not_sent(daemon: app.Daemon) -> None:
    """When the journal write fails, the exit is not sent and the daemon is told to stop (exit 1)."""
    await daemon.guard_loop.add(
        PositionSpec("BOSCHLTD", Side.LONG, 10, 735.0, stop_loss=700.0), source="test"
    )
    daemon.store.close()  # every write now fails
    daemon.book.update("BOSCHLTD", 690.0, None, PriceSource.POLL, daemon.monotonic())
    daemon.guard_loop.evaluate(["BOSCHLTD"])
    async with asyncio.timeout(10):
        await daemon.guard_loop.fatal.wait()
    assert await daemon.executor.drain(10.0)  # its task ended at the journal...
    (exit,) = daemon.guard.exits_in_flight()
    assert exit.attempts == 0  # ...never sent


async def test_trailing_stop_survives_a_restart(daemon: app.Daemon) -> None:
    """A ratcheted trailing stop is stored by the sweep and comes back tight after a restart."""
    await daemon.guard_loop.add(
        PositionSpec("TCS", Side.LONG, 1, 100.0, trailing_stop=5.0), source="test"
    )
    daemon.book.channel_up(PriceSource.LIVE, daemon.monotonic())
    daemon.book.update("TCS", 130.0, None, PriceSource.LIVE, daemon.monotonic())
    daemon.guard_loop.evaluate(["TCS"])
    await daemon.guard_loop.sweep()
    await daemon.session.close()
    daemon.store.close()
    again = await app.build(daemon.config)
    try:
        await again.guard_loop.recover([])
        position = again.guard.position("TCS")
        assert position is not None and position.trailing_level() == 125.0
    finally:
        await again.session.close()
        again.store.close()
