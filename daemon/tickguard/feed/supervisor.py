"""The feed connection supervisor: connect, subscribe, watch, reconnect, forever.

Our own loop rather than the websockets library's reconnect (see
shared/reference/ecosystem-notes.md): the backoff streak resets only after a
connection lived `stable_after`, each attempt may go to a different resolved
address, and a connection is declared dead two ways:

- black hole: our ping gets no pong within ping_timeout (keepalive);
- zombie: pongs come back but no data frame (tick or heartbeat) arrives for
  silence_timeout while the market is open.

Either way the socket is aborted and the REST fallback takes over until a
live price arrives again (a reconnect alone does not end the fallback).
"""

from __future__ import annotations

import asyncio
import enum
import logging
import ssl
import time
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass
from urllib.parse import urlsplit

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus, InvalidURI

from tickguard import __version__
from tickguard.config import FeedConfig
from tickguard.core.backoff import Backoff, BackoffPolicy, Uniform
from tickguard.core.prices import PriceBook, PriceSource
from tickguard.errors import FeedError
from tickguard.feed.dns import ResolverChain
from tickguard.feed.protocol import TOO_LARGE, FeedProtocol
from tickguard.metrics import Metrics

log = logging.getLogger(__name__)
# The websockets library's own logger for our connections. At DEBUG it logs the
# request line, and a feed URL can carry a one-time code or a token: never below INFO.
wire_log = logging.getLogger("tickguard.feed.wire")
wire_log.setLevel(logging.INFO)

MAX_FRAME_BYTES = 1 << 20
OPEN_TIMEOUT = 10.0  # TCP + TLS + WebSocket handshake of one address
ADDRESSES_PER_ATTEMPT = 3


class FeedState(enum.Enum):
    STARTING = "starting"
    CONNECTING = "connecting"
    CONNECTED = "connected"  # open and subscribed
    BACKOFF = "backoff"  # waiting before the next attempt
    AUTH_FAILED = "auth_failed"  # the handshake was refused with 401/403


@dataclass(frozen=True, slots=True)
class Failure:
    """Why a connection attempt or a connection ended."""

    kind: str  # a tickguard_websocket_network_errors_total kind
    detail: str
    auth: bool = False


OnPrices = Callable[[list[str], PriceSource], None]


class FeedSupervisor:
    def __init__(
        self,
        config: FeedConfig,
        *,
        protocol: FeedProtocol,
        resolver: ResolverChain,
        book: PriceBook,
        metrics: Metrics,
        symbols: Callable[[], Collection[str]],
        on_prices: OnPrices,
        market_open: Callable[[], bool],
        rng: Uniform,
        endpoint: Callable[[], Awaitable[str]] | None = None,
        headers: Callable[[], dict[str, str]] | None = None,
        ssl_context: ssl.SSLContext | None = None,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.protocol = protocol
        self.resolver = resolver
        self.book = book
        self.metrics = metrics
        self._symbols = symbols
        self._on_prices = on_prices
        self._market_open = market_open
        self._endpoint = endpoint
        self._headers = headers
        self._ssl = ssl_context
        self._mono = monotonic
        r = config.reconnect
        self.backoff = Backoff(
            BackoffPolicy(
                r.initial_delay,
                r.max_delay,
                r.multiplier,
                r.jitter,
                r.dns_check_every,
                r.stable_after,
            ),
            rng,
        )
        self.state = FeedState.STARTING
        self.address: str | None = None
        self.last_error = ""
        self.subscribed: frozenset[str] = frozenset()
        self.connected_since: float | None = None
        self.last_frame_at: float | None = None
        # The poll runs from the moment the socket is down or silent until a
        # live price arrives again; at start no live price has arrived yet.
        self.fallback_active = True
        self.fallback_changed = asyncio.Event()
        self._ws: ClientConnection | None = None
        self._recheck_dns = False
        self._keepalive_failed = False
        self.metrics.fallback_active.set(1)

    # -- public ---------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self.state is FeedState.CONNECTED

    def streak(self) -> int:
        return self.backoff.streak(self._mono())

    async def run(self) -> None:
        """Connect and reconnect until cancelled. Never gives up."""
        while True:
            failure = await self._attempt()
            self.last_error = f"{failure.kind}: {failure.detail}"
            self.metrics.network_errors.labels(failure.kind).inc()
            attempt = self.backoff.auth_failure() if failure.auth else self.backoff.failure()
            self._recheck_dns = attempt.recheck_dns
            self.state = FeedState.AUTH_FAILED if failure.auth else FeedState.BACKOFF
            self.metrics.reconnect_attempts.inc()
            log.warning(
                "[RECONNECT] attempt %d in %.1fs (%s)",
                attempt.number,
                attempt.delay,
                self.last_error,
            )
            await asyncio.sleep(attempt.delay)

    async def subscribe_more(self) -> None:
        """Extend the live subscription to symbols guarded since it was made."""
        ws = self._ws
        wanted = frozenset(self._symbols())
        added = sorted(wanted - self.subscribed)
        if ws is None or not self.connected or not added:
            return
        try:
            for frame in self.protocol.add_frames(sorted(wanted), added):
                await ws.send(frame)
        except ConnectionClosed:
            return  # the next connection subscribes everything
        self.subscribed = wanted
        log.info("[FEED] subscribed %s", ", ".join(added))

    # -- one attempt and the life of its connection -----------------------

    async def _attempt(self) -> Failure:
        self.state = FeedState.CONNECTING
        try:
            url = await self._endpoint() if self._endpoint is not None else self.config.url
        except FeedError as exc:  # e.g. Upstox's authorize step
            if exc.kind == "auth":  # refused credentials: a handshake failure, not retried soon
                return Failure("handshake", exc.detail, auth=True)
            return Failure(exc.kind, exc.detail)
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = parts.port or (443 if parts.scheme == "wss" else 80)
        try:
            resolved = await self.resolver.resolve(host, port, health_check=self._recheck_dns)
        except FeedError as exc:
            return Failure("dns", exc.detail)
        failure = Failure("connect", "no address")
        for address in resolved.addresses[:ADDRESSES_PER_ATTEMPT]:
            try:
                ws = await connect(
                    url,
                    host=address,
                    port=port,
                    ssl=self._tls_context() if parts.scheme == "wss" else None,
                    open_timeout=OPEN_TIMEOUT,
                    ping_interval=None,  # our keepalive, so pongs are seen
                    ping_timeout=None,
                    close_timeout=1.0,
                    max_size=MAX_FRAME_BYTES,
                    compression=None,
                    proxy=None,
                    user_agent_header=f"tickguard/{__version__}",
                    logger=wire_log,
                    additional_headers=self._headers() if self._headers else None,
                )
            except InvalidStatus as exc:
                status = exc.response.status_code
                # 401/403 means bad credentials, unless the URL came from an endpoint
                # (Upstox's authorize) that just accepted them: then it is a stale
                # single-use code, and a normal retry authorizes afresh.
                auth = status in (401, 403) and self._endpoint is None
                return Failure("handshake", f"HTTP {status} at the handshake", auth=auth)
            except ssl.SSLError as exc:  # before OSError: SSLError is one
                return Failure("tls", _short(exc))
            except InvalidURI:  # its message holds the URL, which may carry a one-time code
                return Failure("handshake", "the socket URL is invalid")
            except InvalidHandshake as exc:
                return Failure("handshake", _short(exc))
            except (OSError, TimeoutError) as exc:
                failure = Failure("connect", f"{address}: {_short(exc) or 'timed out'}")
                continue
            self.address = address
            try:
                return await self._live(ws, host)
            finally:
                self._ws = None
                ws.transport.abort()
        return failure

    def _tls_context(self) -> ssl.SSLContext:
        if self._ssl is None:
            self._ssl = ssl.create_default_context()  # verification on, hostname checked
        return self._ssl

    async def _live(self, ws: ClientConnection, host: str) -> Failure:
        symbols = sorted(self._symbols())
        try:
            for frame in self.protocol.subscribe_frames(symbols):
                await ws.send(frame)
        except ConnectionClosed as exc:
            return Failure("closed", f"closed while subscribing ({_closed(exc)})")
        now = self._mono()
        self._ws = ws
        self.subscribed = frozenset(symbols)
        self.state = FeedState.CONNECTED
        self.connected_since = self.last_frame_at = now
        self._keepalive_failed = False
        self.backoff.connected(now)
        self.book.channel_up(PriceSource.LIVE, now)
        self.metrics.websocket_connected.set(1)
        log.info(
            "[FEED] connected to %s via %s, %d symbols subscribed",
            host,
            self.address,
            len(symbols),
        )
        keepalive = asyncio.create_task(self._keepalive(ws), name="feed keepalive")
        try:
            return await self._receive(ws)
        finally:
            keepalive.cancel()
            self.state = FeedState.BACKOFF
            self.connected_since = None
            self.backoff.disconnected(self._mono())
            self.book.channel_down(PriceSource.LIVE)
            self.metrics.websocket_connected.set(0)
            task = asyncio.current_task()
            stopping = task is not None and task.cancelling() > 0  # shutdown, not an outage
            self._set_fallback(True, "socket down", quiet=stopping)

    async def _receive(self, ws: ClientConnection) -> Failure:
        silence = self.config.silence_timeout
        while True:
            assert self.last_frame_at is not None
            wait = max(0.0, self.last_frame_at + silence - self._mono())
            try:
                # Past the deadline (market closed): look again at least every second.
                timeout = wait if wait > 0 else min(silence, 1.0)
                # Not wait_for: on 3.11 it swallows a cancellation that arrives as
                # recv() completes, and the supervisor would then never stop.
                async with asyncio.timeout(timeout):
                    frame = await ws.recv()
            except TimeoutError:
                if self._market_open() and self._mono() - self.last_frame_at >= silence:
                    return Failure("silence", f"no data for {silence:g}s")
                continue
            except ConnectionClosed as exc:
                if self._keepalive_failed:
                    timeout = self.config.ping_timeout
                    return Failure("ping_timeout", f"no pong within {timeout:g}s")
                if _too_large(exc):
                    self.metrics.bad_messages.labels(TOO_LARGE).inc()
                    return Failure("protocol", "a frame over the size limit")
                return Failure("closed", _closed(exc))
            now = self._mono()
            self.last_frame_at = now
            self.book.channel_alive(PriceSource.LIVE, now)
            decoded = self.protocol.decode(frame, self.subscribed)
            for reason in decoded.errors:
                self.metrics.bad_messages.labels(reason).inc()
            if not decoded.ticks:
                continue
            updated = [
                t.symbol
                for t in decoded.ticks
                if self.book.update(t.symbol, t.price, t.exchange_ts, PriceSource.LIVE, now)
            ]
            self.metrics.ticks.labels("live").inc(len(decoded.ticks))
            self.metrics.last_tick_timestamp.set(time.time())
            self._set_fallback(False, "live prices are back")
            if updated:
                self._on_prices(updated, PriceSource.LIVE)

    async def _keepalive(self, ws: ClientConnection) -> None:
        while True:
            await asyncio.sleep(self.config.ping_interval)
            try:
                pong = await ws.ping()
                async with asyncio.timeout(self.config.ping_timeout):
                    await pong
            except TimeoutError:
                self._keepalive_failed = True
                ws.transport.abort()  # wakes the receiver with ConnectionClosed
                return
            except ConnectionClosed:
                return
            self.book.channel_alive(PriceSource.LIVE, self._mono())

    def _set_fallback(self, active: bool, why: str, *, quiet: bool = False) -> None:
        if active == self.fallback_active:
            return
        self.fallback_active = active
        self.metrics.fallback_active.set(1 if active else 0)
        self.fallback_changed.set()
        if quiet:
            return
        if active:
            log.warning("[FALLBACK] %s: prices now come from the poll and the cache", why)
        else:
            log.info("[FALLBACK] %s: fallback ended", why)


def _too_large(exc: ConnectionClosed) -> bool:
    return any(frame is not None and frame.code == 1009 for frame in (exc.sent, exc.rcvd))


def _closed(exc: ConnectionClosed) -> str:
    frame = exc.rcvd or exc.sent
    if frame is None:
        return "connection lost without a close frame"
    reason = f" {frame.reason}" if frame.reason else ""
    return f"closed with code {frame.code}{reason}"


def _short(exc: BaseException) -> str:
    text = str(exc) or exc.__class__.__name__
    return text if len(text) <= 200 else text[:197] + "..."
