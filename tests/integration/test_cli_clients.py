"""`tickguard status` and `tickguard close` (SPEC section 1) as real subprocesses.

The daemon runs in this test's event loop (`app.build` + `app.serve`) on
127.0.0.1:0, fed by a tiny `json`-protocol WebSocket server the test
controls; the commands run as `python -m tickguard ...` against it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import socket
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from tickguard import app
from tickguard.config import parse_config

LOOPBACK = "127.0.0.1"
TOKEN = "cli-t0ken"
LISTENING_RE = re.compile(r"\[HTTP\] listening on 127\.0\.0\.1:(\d+)")
COMMAND_TIMEOUT = 30.0  # a subprocess: interpreter start, import, one request


async def eventually(predicate: Callable[[], object], timeout: float = 5.0, what: str = "") -> None:
    """Return once `predicate()` is true; fail if it is not within `timeout` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"not within {timeout:g}s: {what or predicate}")
        await asyncio.sleep(0.01)


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released): connections are refused."""
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        port: int = s.getsockname()[1]
    return port


async def tickguard(*args: str) -> tuple[int, str]:
    """Run `python -m tickguard ARGS`: (exit code, stdout)."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("TICKGUARD_CONFIG", "CREDENTIALS_DIRECTORY", "NOTIFY_SOCKET")
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tickguard",
        *args,
        env=env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with asyncio.timeout(COMMAND_TIMEOUT):
            out, err = await process.communicate()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    text = out.decode()
    print(f"$ tickguard {' '.join(args)}  -> {process.returncode}\n{text}{err.decode()}")
    assert process.returncode is not None
    return process.returncode, text


# ---------------------------------------------------------------------------
# A json-protocol feed and the daemon, in-process


class TickServer:
    """A `json` feed on 127.0.0.1:0: on subscribe it sends the known prices, then each change."""

    def __init__(self, prices: dict[str, float]) -> None:
        self.prices = prices
        self.port = 0
        self._server: Server | None = None

    @property
    def url(self) -> str:
        return f"ws://{LOOPBACK}:{self.port}/ws"

    async def start(self) -> None:
        self._server = await serve(self._handler, LOOPBACK, 0)
        self.port = next(iter(self._server.sockets)).getsockname()[1]

    async def _handler(self, ws: ServerConnection) -> None:
        with contextlib.suppress(ConnectionClosed):
            async for message in ws:
                symbols = json.loads(message).get("symbols", [])
                ticks = [
                    {"symbol": s, "price": self.prices[s]} for s in symbols if s in self.prices
                ]
                if ticks:
                    await ws.send(json.dumps({"type": "ticks", "ticks": ticks}))

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


@dataclass(eq=False)
class Running:
    daemon: app.Daemon
    url: str
    token_file: Path

    def connected_and_priced(self, *symbols: str) -> bool:
        """The socket is up, the fallback over, and every symbol priced."""
        sup = self.daemon.supervisor
        return (
            sup.connected
            and not sup.fallback_active
            and all(self.daemon.book.get(s) is not None for s in symbols)
        )


Start = Callable[..., Awaitable[Running]]


@pytest.fixture
async def start(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Start]:
    """`await start(prices, positions=[...])`: a daemon fed `prices` live (None: no feed at all)."""
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    logger = logging.getLogger("tickguard")
    level = logger.level
    logger.setLevel(logging.INFO)
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    servers: list[TickServer] = []
    running: list[tuple[asyncio.Event, asyncio.Task[int]]] = []

    async def start_daemon(
        prices: dict[str, float] | None, positions: list[dict[str, Any]] | None = None
    ) -> Running:
        if prices is None:
            feed_url = f"ws://{LOOPBACK}:{closed_port()}/ws"
        else:
            server = TickServer(prices)
            servers.append(server)
            await server.start()
            feed_url = server.url
        config = parse_config(
            {
                "daemon": {"state_dir": str(tmp_path / "state")},
                "http": {"listen": f"{LOOPBACK}:0", "token_file": str(token_file)},
                "feed": {
                    "url": feed_url,
                    "symbols": ["TCS"],
                    "reconnect": {"initial_delay": 0.05, "max_delay": 0.2},
                },
                "dns": {"fallback_servers": []},
                "market": {"always_open": True},
                "guard": {"sweep_interval": 0.05},
                "positions": positions or [],
            },
            env={},
        )
        daemon = await app.build(config)
        port: asyncio.Future[int] = asyncio.get_running_loop().create_future()

        class Watcher(logging.Handler):
            def emit(self, record: logging.LogRecord) -> None:
                found = LISTENING_RE.search(record.getMessage())
                if found is not None and not port.done():
                    port.set_result(int(found.group(1)))

        watcher = Watcher()
        logging.getLogger("tickguard.app").addHandler(watcher)
        stop = asyncio.Event()
        task = asyncio.create_task(app.serve(daemon, stop=stop))
        running.append((stop, task))
        try:
            await asyncio.wait([port, task], timeout=10.0, return_when=asyncio.FIRST_COMPLETED)
        finally:
            logging.getLogger("tickguard.app").removeHandler(watcher)
        assert port.done(), f"the daemon did not listen: {task}"
        return Running(daemon, f"http://{LOOPBACK}:{port.result()}", token_file)

    try:
        yield start_daemon
    finally:
        for stop, task in running:
            stop.set()
            async with asyncio.timeout(15.0):
                assert await task == 0
        for server in servers:
            await server.close()
        logger.setLevel(level)


BOSCH_LONG = {
    "symbol": "BOSCHLTD",
    "side": "long",
    "quantity": 38,
    "entry_price": 735.0,
    "stop_loss": 500.0,
}


# ---------------------------------------------------------------------------
# tickguard status


async def test_status_healthy_then_degraded_by_an_unpriced_symbol(start: Start) -> None:
    """`status` exits 0 on a live feed with fresh prices, and 1 once a guarded symbol has no price."""
    d = await start({"TCS": 3000.0, "BOSCHLTD": 575.0}, positions=[BOSCH_LONG])
    await eventually(lambda: d.connected_and_priced("TCS", "BOSCHLTD"), what="live and priced")

    code, out = await tickguard("status", "--url", d.url)
    assert code == 0
    assert "HEALTHY" in out and "connected" in out
    assert re.search(r"BOSCHLTD\s+575\.00\s+live", out), out
    assert "STALE" not in out

    spec = {"symbol": "ADANIENT", "side": "short", "quantity": 1, "entry_price": 2000.0}
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            d.url + "/api/v1/positions", json=spec, headers={"Authorization": f"Bearer {TOKEN}"}
        ) as response,
    ):
        assert response.status == 201
    code, out = await tickguard("status", "--url", d.url)
    assert code == 1
    assert "DEGRADED" in out and "ADANIENT" in out


async def test_status_degraded_while_the_feed_is_down(start: Start) -> None:
    """`status` exits 1 and says so while the daemon cannot reach its feed."""
    d = await start(None, positions=[BOSCH_LONG])
    await eventually(lambda: d.daemon.supervisor.last_error, what="a failed connect")
    code, out = await tickguard("status", "--url", d.url)
    assert code == 1
    assert "DEGRADED" in out
    assert "fallback  ACTIVE: prices from the cache (no REST poll configured)" in out
    assert "(poll" not in out  # not "fallback ACTIVE (poll polling)"
    assert "last error: connect" in out


async def test_status_unreachable_exits_2() -> None:
    """`status` exits 2 when nothing answers at the URL."""
    code, out = await tickguard("status", "--url", f"http://{LOOPBACK}:{closed_port()}")
    assert code == 2
    assert "unreachable" in out


# ---------------------------------------------------------------------------
# tickguard close


async def test_close_prints_exit_price_and_pnl(start: Start) -> None:
    """`close` exits 0 with the exit price and pnl, then 1 when the position is already closed."""
    d = await start({"BOSCHLTD": 575.0}, positions=[BOSCH_LONG])
    await eventually(lambda: d.connected_and_priced("BOSCHLTD"), what="BOSCHLTD priced")
    args = ("--url", d.url, "--token-file", str(d.token_file))

    code, out = await tickguard("close", "BOSCHLTD", "--reason", "stop_loss", *args)
    assert code == 0
    assert re.search(r"BOSCHLTD closed at 575\.00 .*pnl -6080\.00 \(stop_loss\)", out), out
    assert d.daemon.store.paper_fill_count() == 1

    code, out = await tickguard("close", "BOSCHLTD", *args)
    assert code == 1
    assert "409" in out and "closed" in out
    assert d.daemon.store.paper_fill_count() == 1


async def test_close_refused_exits_1(start: Start, tmp_path: Path) -> None:
    """`close` exits 1 for a symbol never guarded (404) and for a wrong token (401)."""
    d = await start({"BOSCHLTD": 575.0}, positions=[BOSCH_LONG])
    code, out = await tickguard(
        "close", "NOSUCH", "--url", d.url, "--token-file", str(d.token_file)
    )
    assert code == 1
    assert "404" in out

    wrong = tmp_path / "wrong-token"
    wrong.write_text("not-the-token\n")
    code, out = await tickguard("close", "BOSCHLTD", "--url", d.url, "--token-file", str(wrong))
    assert code == 1
    assert "401" in out
    assert d.daemon.guard.position("BOSCHLTD") is not None
    assert d.daemon.store.paper_fill_count() == 0


async def test_close_unreachable_exits_2(tmp_path: Path) -> None:
    """`close` exits 2 when nothing answers at the URL."""
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    url = f"http://{LOOPBACK}:{closed_port()}"
    code, out = await tickguard("close", "BOSCHLTD", "--url", url, "--token-file", str(token_file))
    assert code == 2
    assert "unreachable" in out
