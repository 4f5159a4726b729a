"""The built-in market simulator: a real feed server for the demo and the tests.

Serves the `json` feed protocol at `/ws` and the REST fallback at `/prices`
(docs/config.md, the `json` feed protocol), moves prices by a random walk, and takes scripted faults:

    POST /faults {"mode": "none" | "drop" | "silence" | "blackhole" | "refuse" | "garbage",
                  "poll": "ok" | "error" | "ratelimit" | "blackhole",   (optional)
                  "status": 401}                                        (optional, refuse)
    POST /prices/{symbol} {"price": 575.0}    pins a price (the walk leaves it alone)
    POST /prices/{symbol} {"walk": true}      lets it walk again

Fault modes on the socket: `drop` closes every connection and closes new
ones right after the handshake; `silence` keeps connections up and answers
pings but sends no data; `blackhole` sends nothing and answers nothing, the
REST poll included (a cut network path); `refuse` fails handshakes with an
HTTP status (503 unless told); `garbage` mixes malformed frames into the data.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import random
import signal
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from aiohttp import WSMsgType, web

log = logging.getLogger(__name__)

NAMES = (
    "BOSCHLTD", "ADANIENT", "RELIANCE", "TCS", "INFY", "HDFCBANK", "ICICIBANK", "SBIN",
    "ITC", "LT", "AXISBANK", "MARUTI", "TITAN", "WIPRO", "ONGC", "NTPC",
)  # fmt: skip
MODES = ("none", "drop", "silence", "blackhole", "refuse", "garbage")
POLL_MODES = ("ok", "error", "ratelimit", "blackhole")
GARBAGE = (
    "not json at all",
    b"\x00\xff binary junk",
    "[1, 2, 3]",
    '{"symbol": "X", "price": 1.0}',
    '{"type": "tick", "price": 10.0}',
    '{"type": "tick", "symbol": "%s", "price": NaN}',
    '{"type": "tick", "symbol": "%s", "price": -5}',
    '{"type": "tick", "symbol": "%s", "price": "12.5"}',
    '{"type": "tick", "symbol": "NOSUCHSYMBOL", "price": 10.0}',
)


def symbol_names(count: int) -> list[str]:
    return [NAMES[i] if i < len(NAMES) else f"SYM{i:03d}" for i in range(count)]


@dataclass(eq=False)  # hashed by identity
class _Client:
    ws: web.WebSocketResponse
    symbols: set[str] = field(default_factory=set)


class Simulator:
    """Prices, connections and faults; `app()` is the aiohttp application serving them."""

    def __init__(
        self,
        symbols: list[str],
        *,
        rate: float = 5.0,
        heartbeat: float = 1.0,
        seed: int | None = None,
    ) -> None:
        self._rng = random.Random(seed)
        self.prices: dict[str, float] = {s: round(self._rng.uniform(100, 3000), 2) for s in symbols}
        self.stamps: dict[str, int] = {s: _now_ms() for s in symbols}
        self.pinned: set[str] = set()
        self.rate = rate
        self.heartbeat = heartbeat
        self.mode = "none"
        self.poll_mode = "ok"
        self.refuse_status = 503
        self._clients: set[_Client] = set()
        self._unblock = asyncio.Event()
        self._unblock.set()
        self.connections_total = 0

    # -- application ----------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/ws", self._ws)
        app.router.add_get("/prices", self._get_prices)
        app.router.add_post("/prices/{symbol}", self._set_price)
        app.router.add_get("/faults", self._get_faults)
        app.router.add_post("/faults", self._set_faults)
        app.cleanup_ctx.append(self._background)
        return app

    async def _background(self, app: web.Application) -> AsyncIterator[None]:
        task = asyncio.create_task(self._run(), name="simulator ticker")
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        for client in list(self._clients):
            await client.ws.close()

    async def _run(self) -> None:
        interval = 1.0 / self.rate if self.rate > 0 else 1.0
        quiet = 0.0
        while True:
            await asyncio.sleep(interval)
            moved = self._walk() if self.rate > 0 else []
            sent = await self._broadcast(moved)
            quiet = 0.0 if sent else quiet + interval
            if quiet >= self.heartbeat:
                quiet = 0.0
                await self._send_all(lambda _c: [json.dumps({"type": "heartbeat"})])

    def _walk(self) -> list[str]:
        moved = []
        for symbol, price in self.prices.items():
            if symbol in self.pinned or self._rng.random() < 0.5:
                continue
            step = price * self._rng.gauss(0, 0.0008)
            self.prices[symbol] = round(max(0.05, price + step), 2)
            self.stamps[symbol] = _now_ms()
            moved.append(symbol)
        return moved

    def _tick(self, symbol: str) -> dict[str, object]:
        return {"symbol": symbol, "price": self.prices[symbol], "ts": self.stamps[symbol]}

    async def _broadcast(self, symbols: list[str]) -> bool:
        def frames(client: _Client) -> list[str | bytes]:
            ticks = [self._tick(s) for s in symbols if s in client.symbols]
            return [json.dumps({"type": "ticks", "ticks": ticks})] if ticks else []

        return await self._send_all(frames)

    async def _send_all(self, frames_for: Callable[[_Client], list[str | bytes]]) -> bool:
        if self.mode in ("silence", "blackhole", "drop"):
            return False
        sent = False
        for client in list(self._clients):
            frames = frames_for(client)
            if self.mode == "garbage" and frames:
                frames.insert(0, self._garbage(client))
            for frame in frames:
                sent = True
                try:
                    if isinstance(frame, bytes):
                        await client.ws.send_bytes(frame)
                    else:
                        await client.ws.send_str(frame)
                except (ConnectionError, RuntimeError):
                    self._clients.discard(client)
                    break
        return sent

    def _garbage(self, client: _Client) -> str | bytes:
        junk = self._rng.choice(GARBAGE)
        if isinstance(junk, str) and "%s" in junk:
            junk = junk % (next(iter(client.symbols), "X"),)
        return junk

    # -- the feed socket --------------------------------------------------

    async def _ws(self, request: web.Request) -> web.StreamResponse:
        if self.mode == "refuse":
            return web.json_response({"error": "refused"}, status=self.refuse_status)
        if self.mode == "blackhole":
            await self._unblock.wait()  # the handshake never completes while cut
        ws = web.WebSocketResponse(autoping=False, max_msg_size=1 << 20)
        await ws.prepare(request)
        self.connections_total += 1
        if self.mode == "drop":
            await ws.close(code=1011, message=b"dropped")
            return ws
        client = _Client(ws)
        self._clients.add(client)
        try:
            async for msg in ws:
                if self.mode == "blackhole":
                    continue  # swallow everything, pings included
                if msg.type is WSMsgType.PING:
                    await ws.pong(msg.data)
                elif msg.type is WSMsgType.TEXT:
                    await self._on_text(client, msg.data)
        finally:
            self._clients.discard(client)
        return ws

    async def _on_text(self, client: _Client, data: str) -> None:
        try:
            message = json.loads(data)
        except ValueError:
            return
        if not isinstance(message, dict) or message.get("op") != "subscribe":
            return
        wanted = message.get("symbols")
        if not isinstance(wanted, list):
            return
        client.symbols = {s for s in wanted if isinstance(s, str) and s in self.prices}
        if self.mode in ("none", "garbage"):
            snapshot = [self._tick(s) for s in sorted(client.symbols)]
            await client.ws.send_str(json.dumps({"type": "ticks", "ticks": snapshot}))

    # -- REST -------------------------------------------------------------

    async def _get_prices(self, request: web.Request) -> web.Response:
        if self.poll_mode == "blackhole":
            await self._unblock.wait()
        if self.poll_mode == "error":
            return web.json_response({"error": "unavailable"}, status=503)
        if self.poll_mode == "ratelimit":
            return web.json_response(
                {"error": "slow down"}, status=429, headers={"Retry-After": "1"}
            )
        wanted = request.query.get("symbols", "")
        names = [s for s in wanted.split(",") if s] or list(self.prices)
        prices = {s: self._tick(s) for s in names if s in self.prices}
        for entry in prices.values():
            entry.pop("symbol")
        return web.json_response({"prices": prices})

    async def _set_price(self, request: web.Request) -> web.Response:
        symbol = request.match_info["symbol"]
        body = await _json_body(request)
        if symbol not in self.prices:
            return web.json_response({"error": f"unknown symbol {symbol}"}, status=404)
        if body.get("walk") is True:
            self.pinned.discard(symbol)
            return web.json_response({"symbol": symbol, "walk": True})
        price = body.get("price")
        if (
            isinstance(price, bool)
            or not isinstance(price, int | float)
            or not math.isfinite(price)
            or price <= 0
        ):
            return web.json_response({"error": "price must be a number > 0"}, status=400)
        self.prices[symbol] = float(price)
        self.stamps[symbol] = _now_ms()
        self.pinned.add(symbol)
        await self._broadcast([symbol])
        return web.json_response({"symbol": symbol, "price": float(price)})

    async def _get_faults(self, request: web.Request) -> web.Response:
        return web.json_response(self._faults())

    async def _set_faults(self, request: web.Request) -> web.Response:
        body = await _json_body(request)
        mode = body.get("mode", self.mode)
        poll = body.get("poll", "blackhole" if mode == "blackhole" else "ok")
        status = body.get("status", 503)
        if mode not in MODES or poll not in POLL_MODES:
            return web.json_response(
                {"error": f"mode must be one of {MODES}, poll one of {POLL_MODES}"}, status=400
            )
        if not isinstance(status, int) or not 400 <= status <= 599:
            return web.json_response({"error": "status must be an HTTP error code"}, status=400)
        self.set_faults(mode, poll, status)
        if mode == "drop":
            for client in list(self._clients):
                await client.ws.close(code=1011, message=b"dropped")
        return web.json_response(self._faults())

    def set_faults(self, mode: str, poll: str = "ok", status: int = 503) -> None:
        self.mode, self.poll_mode, self.refuse_status = mode, poll, status
        if "blackhole" in (mode, poll):
            self._unblock.clear()
        else:
            self._unblock.set()
        log.info("[SIM] faults: mode=%s poll=%s", mode, poll)

    def _faults(self) -> dict[str, object]:
        return {
            "mode": self.mode,
            "poll": self.poll_mode,
            "connections": len(self._clients),
            "connections_total": self.connections_total,
        }


async def _json_body(request: web.Request) -> dict[str, object]:
    try:
        body = await request.json()
    except ValueError:
        raise web.HTTPBadRequest(
            text='{"error": "body must be JSON"}', content_type="application/json"
        ) from None
    if not isinstance(body, dict):
        raise web.HTTPBadRequest(
            text='{"error": "body must be a JSON object"}', content_type="application/json"
        )
    return body


def _now_ms() -> int:
    return int(time.time() * 1000)


async def serve(
    host: str, port: int, symbols: int, *, rate: float = 5.0, seed: int | None = None
) -> None:
    """Run the simulator until cancelled; prints where it listens."""
    sim = Simulator(symbol_names(symbols), rate=rate, seed=seed)
    runner = web.AppRunner(sim.app(), handle_signals=False, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound = runner.addresses[0][1]
    print(
        f"[SIM] listening on http://{host}:{bound} (feed ws://{host}:{bound}/ws,"
        f" {symbols} symbols: {', '.join(sim.prices)})",
        flush=True,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()
