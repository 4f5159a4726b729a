"""The feed connection supervisor: connect, subscribe, watch, reconnect, forever.

Our own loop rather than the websockets library's reconnect (see
shared/reference/ecosystem-notes.md): the backoff streak resets only after a
connection lived `stable_after`, each attempt may go to a different resolved
address, and a connection is declared dead two ways:

- black hole: our ping gets no pong within ping_timeout (keepalive);
- zombie: pongs come back but no data frame (tick or heartbeat) arrives for
  silence_timeout while the market is open.

Writes have deadlines too, for a server that stops reading its socket: each
frame we send (subscribe frames, our pings) must leave within ping_timeout, and
the bytes the library writes by itself (pongs) are capped by FeedConnection.
So is the rate of the server's pings: each costs the library a parse and a
pong on the event loop.

Either way the socket is aborted and the REST fallback takes over until a
live price arrives again (a reconnect alone does not end the fallback).
"""

from __future__ import annotations

import asyncio
import enum
import logging
import math
import ssl
import time
from collections.abc import Awaitable, Callable, Collection, Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from websockets.asyncio.client import ClientConnection, connect
from websockets.client import ClientProtocol
from websockets.exceptions import (
    ConnectionClosed,
    InvalidHandshake,
    InvalidStatus,
    InvalidURI,
    ProtocolError,
)
from websockets.frames import Frame, Opcode

from tickguard import __version__
from tickguard.config import FeedConfig
from tickguard.core.backoff import Backoff, BackoffPolicy, Uniform
from tickguard.core.prices import PriceBook, PriceSource
from tickguard.errors import FeedError
from tickguard.feed.dns import ResolverChain
from tickguard.feed.intake import OnPrices, PriceIntake
from tickguard.feed.protocol import TOO_LARGE, FeedProtocol
from tickguard.metrics import Metrics
from tickguard.status import FeedStatus

log = logging.getLogger(__name__)
# The websockets library's own logger for our connections. At DEBUG it logs the
# request line, and a feed URL can carry a one-time code or a token: never below INFO.
wire_log = logging.getLogger("tickguard.feed.wire")
wire_log.setLevel(logging.INFO)

MAX_FRAME_BYTES = 1 << 20
OPEN_TIMEOUT = 10.0  # TCP + TLS + WebSocket handshake of one address
ADDRESSES_PER_ATTEMPT = 3
# Our own send() and ping() wait while more than this is unsent (the library's
# default, named because the write deadlines below rest on it).
WRITE_LIMIT = 1 << 15
# Unsent bytes past which the connection is aborted. The library writes pongs
# without waiting, so WRITE_LIMIT does not bound them: a server that floods
# pings and never reads grew this buffer by tens of MB a second, for as long
# as it liked.
MAX_UNSENT_BYTES = 1 << 20
# Pings from the server per second past which the connection fails as `protocol`.
# The library parses each ping and answers it with a pong on the event loop,
# about 6 us apiece: a server flooding empty pings (2 bytes each) made one
# 256 KiB read cost 0.8 s of the loop, and one that also read our pongs never
# reached MAX_UNSENT_BYTES at all. Servers ping every few seconds.
MAX_PINGS_PER_SECOND = 100


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


class FeedConnection(ClientConnection):
    """A client connection with caps on its unsent bytes and on the server's pings, that keeps
    why we aborted it.

    The cap is checked in data_received, after the library's own: what the
    library writes unasked (pongs, the answer to a close frame) it writes there,
    into the transport, without waiting. Checked once the read is handled, the
    buffer never holds more than MAX_UNSENT_BYTES plus the pongs for one read
    (asyncio reads at most 256 KiB at a time). Over TLS the transport counts
    what waits to be encrypted and sent, so the same check holds.
    A timer armed by pause_writing was the other candidate: it would time what
    the keepalive already times (no ping of ours leaves, or is answered, while
    the server does not read), and memory would still grow until it fired.

    The server's pings are counted where the library answers them, one pong
    each (the protocol's send_frame, which the parser calls for every ping as
    it parses the read), so a flood is stopped inside the read that brings it:
    past MAX_PINGS_PER_SECOND the connection is aborted and the rest of the
    read is discarded unparsed. Data frames never pass there: the tick path
    pays nothing. A smaller read size was the other candidate: it would have
    shortened each stall, not ended the flood.
    """

    failure: Failure | None = None  # why we aborted it, when we did

    def __init__(self, protocol: ClientProtocol, **kwargs: Any) -> None:
        super().__init__(protocol, **kwargs)
        self._pings = 0  # answered since _pings_since (loop time)
        self._pings_since = -math.inf
        send_frame = protocol.send_frame  # the library's: every frame it sends, our own too

        def counted(frame: Frame, pong: Opcode = Opcode.PONG) -> None:
            if frame.opcode is pong:  # the library answering a ping: we never send one
                self._ping_received()
            send_frame(frame)

        protocol.send_frame = counted  # type: ignore[method-assign]

    def _ping_received(self) -> None:
        now = self.loop.time()
        if now - self._pings_since >= 1.0:
            self._pings, self._pings_since = 0, now
        self._pings += 1
        if self._pings > MAX_PINGS_PER_SECOND:
            self.fail(Failure("protocol", f"more than {MAX_PINGS_PER_SECOND} pings in 1s"))
            # Raised in the library's parser (no pong is queued): it stops, and drops the
            # rest of the read. Our abort above has ended the connection already.
            raise ProtocolError("too many pings")

    @property
    def unsent(self) -> int:
        """Bytes written to this connection that the kernel has not taken yet."""
        return self.transport.get_write_buffer_size()

    def stalled(self) -> str:
        """A note for a failure's detail when bytes are waiting: the server is not reading."""
        unsent = self.unsent
        return f"the server stopped reading ({unsent} bytes unsent)" if unsent else ""

    def fail(self, failure: Failure) -> Failure:
        """Abort the connection for `failure`; return the first failure given (the reason kept)."""
        if self.failure is None:
            self.failure = failure
        self.transport.abort()  # wakes recv() and pending pings with ConnectionClosed
        return self.failure

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.failure is None and self.unsent > MAX_UNSENT_BYTES:
            self.fail(Failure("protocol", self.stalled()))


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
        on_connected: Callable[[], None] | None = None,
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
        self._intake = PriceIntake(book, metrics, on_prices, PriceSource.LIVE)
        self._market_open = market_open
        self._endpoint = endpoint
        self._on_connected = on_connected  # told after every (re)connect (the account is re-read)
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
        # No live price yet since start: the first connect is not an outage, and is
        # not logged as a fallback (its poll, if any, is the start-up's, not a rescue).
        self.starting = True
        self.fallback_changed = asyncio.Event()
        # Since start, counted where the Prometheus counters are (run): status() reports
        # these, never values read back from the registry.
        self.reconnect_attempts = 0  # tickguard_websocket_reconnect_attempts_total
        self.network_errors = 0  # tickguard_websocket_network_errors_total, every kind
        self._ws: FeedConnection | None = None
        self._recheck_dns = False
        self.metrics.fallback_active.set(1)

    # -- public ---------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self.state is FeedState.CONNECTED

    @property
    def unsent_bytes(self) -> int:
        """Bytes written to the live socket that the kernel has not taken yet (0 while down)."""
        ws = self._ws
        return 0 if ws is None else ws.unsent

    def streak(self) -> int:
        return self.backoff.streak(self._mono())

    def status(self) -> FeedStatus:
        """What the supervisor says about itself now, as a frozen value (tickguard.status)."""
        connected = self.connected
        return FeedStatus(
            state=self.state.value,
            connected=connected,
            # While down: what the next connection will subscribe.
            subscribed=len(self.subscribed) if connected else len(self._symbols()),
            reconnect_attempts=self.reconnect_attempts,
            network_errors=self.network_errors,
            streak=self.streak(),
            last_error=self.last_error,
            address=self.address,
            last_frame_at=self.last_frame_at,
            connected_since=self.connected_since,
            fallback_active=self.fallback_active,
        )

    async def run(self) -> None:
        """Connect and reconnect until cancelled. Never gives up."""
        while True:
            failure = await self._attempt()
            self.last_error = f"{failure.kind}: {failure.detail}"
            self.metrics.network_errors.labels(failure.kind).inc()
            self.network_errors += 1
            attempt = self.backoff.auth_failure() if failure.auth else self.backoff.failure()
            self._recheck_dns = attempt.recheck_dns
            self.state = FeedState.AUTH_FAILED if failure.auth else FeedState.BACKOFF
            self.metrics.reconnect_attempts.inc()
            self.reconnect_attempts += 1
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
        if await self._send(ws, self.protocol.add_frames(sorted(wanted), added)) is not None:
            return  # the receiver reports the failure; the next connection subscribes everything
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
                    write_limit=WRITE_LIMIT,
                    create_connection=FeedConnection,
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
            assert isinstance(ws, FeedConnection)  # create_connection above
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

    async def _live(self, ws: FeedConnection, host: str) -> Failure:
        symbols = sorted(self._symbols())
        failure = await self._send(ws, self.protocol.subscribe_frames(symbols))
        if failure is not None:
            if failure.kind == "closed":
                return Failure("closed", f"closed while subscribing ({failure.detail})")
            return failure
        now = self._mono()
        self._ws = ws
        self.subscribed = frozenset(symbols)
        self.state = FeedState.CONNECTED
        self.connected_since = self.last_frame_at = now
        self._keepalive_failed = False
        self.backoff.connected(now)
        if self._on_connected is not None:
            self._on_connected()
        self.book.channel_up(PriceSource.LIVE, now)
        self.metrics.websocket_connected.set(1)
        log.info(
            "[FEED] connected to %s via %s, %d symbols subscribed",
            host,
            self.address,
            len(symbols),
        )
        keepalive = asyncio.create_task(self._keepalive(ws), name="feed keepalive")
        silence = asyncio.create_task(self._watch_silence(ws), name="feed silence")
        try:
            return await self._receive(ws)
        finally:
            keepalive.cancel()
            silence.cancel()
            self.state = FeedState.BACKOFF
            self.connected_since = None
            self.backoff.disconnected(self._mono())
            # The receiver keeps only last_frame_at per frame: the book learns of the
            # session's last sign of life here, before its prices turn into cache.
            self.book.channel_alive(PriceSource.LIVE, self.last_frame_at)
            self.book.channel_down(PriceSource.LIVE)
            self.metrics.websocket_connected.set(0)
            task = asyncio.current_task()
            stopping = task is not None and task.cancelling() > 0  # shutdown, not an outage
            self._set_fallback(True, "socket down", quiet=stopping)

    async def _send(self, ws: FeedConnection, frames: Iterable[str | bytes]) -> Failure | None:
        """Send each frame within ping_timeout, or abort the connection; the failure that ended it."""
        timeout = self.config.ping_timeout
        for frame in frames:
            try:
                # send() returns once the frame is handed to the kernel, or waits
                # (drain) while more than WRITE_LIMIT is unsent.
                async with asyncio.timeout(timeout):
                    await ws.send(frame)
            except TimeoutError:
                note = ws.stalled() or "the server stopped reading"
                detail = f"a frame not sent within {timeout:g}s: {note}"
                return ws.fail(Failure("ping_timeout", detail))
            except ConnectionClosed as exc:
                return ws.failure or Failure("closed", _closed(exc))
        return None

    async def _receive(self, ws: FeedConnection) -> Failure:
        """Take frames until the connection ends; the failure that ended it.

        The hot loop: per frame a clock read, the protocol's decode and the
        intake (tickguard.feed.intake). No deadline is set around recv(): the
        silence deadline is watched by a task of its own (`_watch_silence`), and
        ends the connection by aborting it, as the keepalive does.
        """
        decode, take, mono = self.protocol.decode, self._intake.take, self._mono
        while True:
            try:
                frame = await ws.recv()
            except ConnectionClosed as exc:
                if ws.failure is not None:  # we aborted it, and said why
                    return ws.failure
                if _too_large(exc):
                    self.metrics.bad_messages.labels(TOO_LARGE).inc()
                    return Failure("protocol", "a frame over the size limit")
                return Failure("closed", _closed(exc))
            now = mono()
            # Any frame is a sign of life (the book hears of the last one when the session ends).
            self.last_frame_at = now
            decoded = decode(frame, self.subscribed)
            if decoded.ticks and self.fallback_active:
                # A tick ends the fallback, even one the book refuses.
                self._set_fallback(False, "live prices are back")
            take(decoded, now)

    async def _watch_silence(self, ws: FeedConnection) -> None:
        """Abort `ws` as `silence` (a zombie) once no data frame has come for
        silence_timeout while the market is open; past the deadline with the
        market closed, look again at least every second.

        A task rather than a deadline around each recv(): asyncio.timeout per frame
        cost a timer scheduled and cancelled per frame. This sleeps until the
        deadline of the last frame it saw, so it wakes about once per
        silence_timeout while frames flow, and detects at the deadline itself.
        """
        silence = self.config.silence_timeout
        while True:
            assert self.last_frame_at is not None
            wait = self.last_frame_at + silence - self._mono()
            if wait > 0:
                await asyncio.sleep(wait)
            elif self._market_open():
                ws.fail(Failure("silence", f"no data for {silence:g}s"))  # wakes the receiver
                return
            else:
                await asyncio.sleep(min(silence, 1.0))

    async def _keepalive(self, ws: FeedConnection) -> None:
        timeout = self.config.ping_timeout
        while True:
            await asyncio.sleep(self.config.ping_interval)
            pong: Awaitable[float] | None = None
            try:
                # Sending the ping is inside the deadline: ping() waits (drain)
                # while the server is not reading what we write.
                async with asyncio.timeout(timeout):
                    pong = await ws.ping()
                    await pong
            except TimeoutError:
                what = "no pong" if pong is not None else "our ping not sent"
                note = ws.stalled()
                detail = f"{what} within {timeout:g}s" + (f": {note}" if note else "")
                ws.fail(Failure("ping_timeout", detail))  # wakes the receiver
                return
            except ConnectionClosed:
                return
            # A pong proves the network path, not the data: it never refreshes a
            # price's age (see tickguard.core.prices). Only data frames do (_receive).

    def _set_fallback(self, active: bool, why: str, *, quiet: bool = False) -> None:
        if active == self.fallback_active:
            return
        self.fallback_active = active
        self.metrics.fallback_active.set(1 if active else 0)
        self.fallback_changed.set()
        if self.starting:  # the first live prices since start: not the end of an outage
            self.starting = False
            log.info("[FEED] live prices arriving")
            return
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
