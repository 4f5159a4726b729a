"""The daemon wired for Upstox: authorize per connection, binary V3 ticks, the LTP poll."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from tickguard import app
from tickguard.brokers.paper import PaperBroker
from tickguard.brokers.upstox import UpstoxBroker
from tickguard.config import parse_config
from tickguard.core.prices import PriceSource

KEY = "NSE_EQ|INE848E01016"
Start = Callable[..., Any]


@pytest.fixture
async def daemon(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Start]:
    """`await daemon(api_url, token)`: the real daemon, served in this event loop."""
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    running: list[tuple[asyncio.Event, asyncio.Task[int]]] = []

    async def start(api_url: str, token: str, **tables: Any) -> app.Daemon:
        token_file = tmp_path / "upstox-token"
        token_file.write_text(token + "\n")
        config = parse_config(
            {
                "daemon": {"state_dir": str(tmp_path / "state")},
                "http": {"listen": "127.0.0.1:0"},
                "feed": {
                    "protocol": "upstox",
                    "poll_interval": 0.05,
                    "silence_timeout": 60.0,
                    "reconnect": {"initial_delay": 0.05, "max_delay": 0.2},
                },
                "upstox": {"api_url": api_url, "hft_url": api_url, "token_file": str(token_file)},
                "dns": {"fallback_servers": []},
                "market": {"always_open": True},
                "guard": {"sweep_interval": 0.05},
                "positions": [
                    {
                        "symbol": KEY,
                        "side": "long",
                        "quantity": 4,
                        "entry_price": 100.0,
                        "take_profit": 100.5,
                    }
                ],
                **tables,
            },
            env={},
        )
        d = await app.build(config)
        stop = asyncio.Event()
        running.append((stop, asyncio.create_task(app.serve(d, stop=stop))))
        return d

    try:
        yield start
    finally:
        for stop, task in running:
            stop.set()
            async with asyncio.timeout(15):
                assert await task == 0


async def test_take_profit_fires_on_upstox_live_ticks(
    upstox_feed_server: Any, daemon: Start, eventually: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """Rising V3 ticks reach the guard live and fire the take-profit once; no secret is logged."""
    caplog.set_level(logging.DEBUG)
    server = await upstox_feed_server()
    d: app.Daemon = await daemon(server.api_url, server.token)
    assert isinstance(d.broker, PaperBroker)
    await eventually(lambda: d.supervisor.connected, 10, what="connected")
    await eventually(lambda: d.guard.position(KEY) is None, 10, what="the take-profit filled")
    (record,) = d.store.exits()
    assert (
        record.exit.reason.value == "take_profit" and record.exit.price_source is PriceSource.LIVE
    )
    assert record.exit.fill_price is not None and record.exit.fill_price >= 100.5
    assert server.authorizations >= 1 and not server.errors
    for secret in server.secrets():
        assert secret not in caplog.text


async def test_poll_uses_the_ltp_endpoint_when_authorize_stalls(
    upstox_feed_server: Any, daemon: Start, eventually: Any
) -> None:
    """With the socket unreachable, prices come from the authenticated LTP endpoint, tagged poll."""
    server = await upstox_feed_server()
    server.authorize_stall = True
    server.prices[KEY] = 99.0
    d: app.Daemon = await daemon(server.api_url, server.token, guard={"sweep_interval": 0.05})
    await eventually(lambda: d.book.get(KEY) is not None, 10, what="a polled price")
    quote = d.guard.quote(KEY, d.monotonic())
    assert (
        quote.source is PriceSource.POLL and quote.price is not None and quote.price.value == 99.0
    )
    assert server.ltp_requests >= 1 and not d.supervisor.connected
    server.authorize_stall = False


async def test_upstox_broker_is_wired(upstox_feed_server: Any, tmp_path: Path) -> None:
    """broker.kind = "upstox" builds the Upstox order adapter with the token file's token."""
    token_file = tmp_path / "t"
    token_file.write_text("tok\n")
    config = parse_config(
        {
            "daemon": {"state_dir": str(tmp_path)},
            "feed": {"url": "ws://127.0.0.1:9/ws"},
            "broker": {"kind": "upstox"},
            "upstox": {"token_file": str(token_file)},
            "dns": {"fallback_servers": []},
        },
        env={},
    )
    d = await app.build(config)
    try:
        assert isinstance(d.broker, UpstoxBroker)
    finally:
        await d.session.close()
        d.store.close()
