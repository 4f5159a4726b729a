"""The API's listener: the aiohttp application on its own thread, behind connection,
time and log bounds.

**Its own thread and event loop.** The guard loop never parses a request,
writes a response or renders /metrics: the API runs on a thread of its own
(`tickguard-api`), reads the daemon through snapshots and hands actions to
the guard loop (tickguard.port, tickguard.control). The two threads share
Python's GIL: each time the guard loop gives it up (every socket write, every
store commit) it waits for the busy API thread to yield it, up to the switch
interval, 5 ms by default. An exit that commits a few times would wait tens
of milliseconds behind a flood, so while the API's thread runs the interval
is 1 ms (`SWITCH_INTERVAL`).

Measured with benchmarks/api_load.py (docs/benchmarks.md), 1,000 concurrent
requests mixed over health, metrics and positions, on the 2-core build
machine: handled on the guard loop itself, even with the same cheap
handlers, event-loop lag p99 was under 1 s (one loop turn accepts and parses
hundreds of connections), WATCHDOG=1 gaps reached 0.98 s and a crossed stop
was decided 41 ms late; on this thread with a 5 ms switch interval, lag p99
under 50 ms (worst probe under 100 ms); with 1 ms, under 25 ms (worst under
50 ms), watchdog on time, the stop decided within 1 ms.

No client, broken or hostile, may take from the daemon what it needs to guard
positions: descriptors for the feed, the poll and the broker, and the
journal's attention for `[SL]`/`[EXIT]` lines. So:

- **Connections are capped** at `HttpLimits.connections(nofile)`: at most half
  the process's descriptor limit, less the listen backlog (accept() takes up
  to that many at once before any is admitted), and never over
  `max_connections`; the other half is the daemon's. A connection over the cap
  evicts the oldest one with no request in flight (a slow or half-sent
  request head, an idle keep-alive); when every connection has a request in
  flight, the newcomer is closed at once. So a fresh `/healthz` or
  `tickguard close` gets through a flood of half-open connections, and a
  request in flight (an emergency close) is never cut.
- **A request head has `header_timeout` seconds** from the connection's start
  (or the end of the previous response) to arrive. That is aiohttp's
  keep-alive timer: it runs from `connection_made` and closes the connection
  if no complete request head is waiting (aiohttp 3.14, pinned; the default,
  3630 s, is what let slow headers hold descriptors). The body has
  `body_timeout` (the API answers 408).
- **accept() failures** (EMFILE and kin) are one rate-limited line, not
  asyncio's traceback per attempt.
- **aiohttp's request-error log carries no request bytes**: it goes to our
  logger (RequestHandler's documented `logger` argument), whose filter drops
  exception messages and tracebacks (aiohttp's parser errors quote up to 100
  bytes of the offending line: an over-long Authorization header, token
  included), keeps the exception's class name, makes a client's error a
  WARNING and rate-limits the lines (`log_limit.LogRateLimit`).

The listening socket is made here with `loop.create_server`, not with
`web.TCPSite`: TCPSite gives asyncio aiohttp's own protocol factory, and
counting connections needs one of ours in front of it. `web.AppRunner` still
owns the application's lifecycle and the graceful shutdown of connections;
all that is used of aiohttp is public (`AppRunner`, `runner.server` as the
per-connection protocol factory, `web.middleware`). `handler_cancellation`
stays False: a client hanging up never cancels a handler (an emergency close
runs to its end).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import resource
import sys
import threading
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any, cast

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from tickguard.log_limit import LogRateLimit

log = logging.getLogger(__name__)
# Lines clients cause, each kind rate-limited: the connection cap at work, accept() failures.
CLIENTS_LOG = logging.getLogger(f"{__name__}.clients")
CLIENTS_LOG.addFilter(LogRateLimit())
# What aiohttp logs about requests (bad request heads, unreadable bodies): see _RequestErrors.
REQUEST_LOG = logging.getLogger(f"{__name__}.requests")

HEADER_TIMEOUT = 10.0  # s for a request head to arrive; also how long an idle keep-alive lives
BODY_TIMEOUT = 10.0  # s for a request body to arrive once its head has
SWITCH_INTERVAL = 0.001  # s: how long the API's thread may keep the GIL from the guard loop
LINGERING_TIME = 2.0  # s an unread request body is drained before closing (aiohttp: 10)
MAX_CONNECTIONS = 1024  # API connections at most, whatever the descriptor limit (~10 MB)
MIN_CONNECTIONS = 4  # ...and at least, however low the descriptor limit
BACKLOG = 64  # listen backlog; also how many connections one accept() round takes
MAX_LINE_SIZE = 8190  # request line (aiohttp's default, made explicit)
MAX_FIELD_SIZE = 8190  # one header (aiohttp's default, made explicit)
MAX_HEADERS = 64  # headers per request (aiohttp: 128)
# What asyncio's accept loop reports when the process or the system is out of descriptors.
ACCEPT_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


@dataclass(frozen=True, slots=True)
class HttpLimits:
    """The API's bounds on connections and time (defaults above)."""

    header_timeout: float = HEADER_TIMEOUT
    body_timeout: float = BODY_TIMEOUT
    lingering_time: float = LINGERING_TIME
    max_connections: int = MAX_CONNECTIONS
    backlog: int = BACKLOG

    def connections(self, nofile: int) -> int:
        """Connections allowed under a descriptor limit of `nofile`: the API may use half."""
        return max(MIN_CONNECTIONS, min(self.max_connections, nofile // 2 - self.backlog))


DEFAULT_LIMITS = HttpLimits()
LIMITS: web.AppKey[HttpLimits] = web.AppKey("http_limits", HttpLimits)


def descriptor_limit() -> int:
    """This process's soft RLIMIT_NOFILE (a large number when unlimited)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return 1 << 20 if soft == resource.RLIM_INFINITY else soft


# -- connections ----------------------------------------------------------------------


@dataclass(slots=True)
class _Slot:
    in_flight: int = 0  # requests being handled on this connection


class ConnectionTable:
    """The open API connections, oldest first, and what the cap did to the others."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.evicted = 0
        self.refused = 0
        self._open: dict[asyncio.Transport, _Slot] = {}

    def __len__(self) -> int:
        return len(self._open)

    def snapshot(self) -> dict[str, int]:
        """For connection-health: open connections, those with a request in flight, the cap."""
        return {
            "connections": len(self._open),
            "in_flight": sum(1 for slot in self._open.values() if slot.in_flight),
            "limit": self.cap,
            "evicted": self.evicted,
            "refused": self.refused,
        }

    def admit(self, transport: asyncio.Transport) -> bool:
        """Take a new connection, evicting the oldest idle one at the cap; False: refuse it."""
        if len(self._open) >= self.cap:
            idle = next((t for t, slot in self._open.items() if not slot.in_flight), None)
            if idle is None:
                self.refused += 1
                CLIENTS_LOG.warning(
                    "[HTTP] %d connections, each with a request in flight (the limit):"
                    " closing new connections at once",
                    self.cap,
                )
                return False
            del self._open[idle]
            idle.abort()
            self.evicted += 1
            CLIENTS_LOG.warning(
                "[HTTP] %d connections open (the limit): closing the oldest idle one", self.cap
            )
        self._open[transport] = _Slot()
        return True

    def release(self, transport: asyncio.Transport) -> None:
        self._open.pop(transport, None)

    def slot(self, transport: asyncio.Transport | None) -> _Slot | None:
        return None if transport is None else self._open.get(transport)


CONNECTIONS: web.AppKey[ConnectionTable] = web.AppKey("http_connections", ConnectionTable)


class _Admitted(asyncio.Protocol):
    """One accepted connection: admitted by the table, then served by aiohttp's RequestHandler.

    The RequestHandler is made only once the connection is admitted, so a
    refused connection costs an accept() and a close, nothing else.
    """

    def __init__(self, table: ConnectionTable, handler: Callable[[], asyncio.Protocol]) -> None:
        self._table = table
        self._handler = handler
        self._inner: asyncio.Protocol | None = None
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport = cast(asyncio.Transport, transport)  # a TCP connection
        if not self._table.admit(transport):
            transport.abort()
            return
        self._inner = self._handler()
        self._inner.connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._transport is not None:
            self._table.release(self._transport)
        if self._inner is not None:
            self._inner.connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._inner is not None:
            self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received() if self._inner is not None else None

    def pause_writing(self) -> None:
        if self._inner is not None:
            self._inner.pause_writing()

    def resume_writing(self) -> None:
        if self._inner is not None:
            self._inner.resume_writing()


def _in_flight_marker(table: ConnectionTable) -> Callable[..., Awaitable[web.StreamResponse]]:
    """A middleware marking a connection busy while one of its requests is handled."""

    @web.middleware
    async def in_flight(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        slot = table.slot(request.transport)
        if slot is None:
            return await handler(request)
        slot.in_flight += 1
        try:
            return await handler(request)
        finally:
            slot.in_flight -= 1

    return in_flight


# -- logs -----------------------------------------------------------------------------


class _RequestErrors(logging.Filter):
    """aiohttp's request log made safe: no request bytes, no traceback, one line a record.

    aiohttp logs its own fixed texts here with the peer's address as the only
    argument; what may quote the request is the exception, so only its class
    name is kept. A client's fault (a malformed head, an unreadable body, a
    hang-up) is a WARNING, not an ERROR of the daemon.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        record.exc_info = None
        record.exc_text = None
        record.stack_info = None
        record.msg = f"[HTTP] {record.msg}"
        if exc is not None:
            record.msg += f": {type(exc).__name__}"
            if isinstance(exc, HttpProcessingError | web.RequestPayloadError | ConnectionError):
                record.levelno = min(record.levelno, logging.WARNING)
                record.levelname = logging.getLevelName(record.levelno)
        return True


REQUEST_LOG.addFilter(_RequestErrors())
REQUEST_LOG.addFilter(LogRateLimit())


def _accept_errors(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """The API loop's exception handler: accept() out of descriptors is one throttled line,
    no traceback (asyncio reports each failed accept(), up to `backlog` of them a round,
    each second); anything else goes to asyncio's default handler."""
    exc = context.get("exception")
    if (
        isinstance(exc, OSError)
        and exc.errno in ACCEPT_ERRNOS
        and "accept" in str(context.get("message", ""))
    ):
        CLIENTS_LOG.error(
            "[HTTP] cannot accept connections: %s (retried every second)", exc.strerror or exc
        )
        return
    loop.default_exception_handler(context)


# -- the server -----------------------------------------------------------------------


class ApiServer:
    """The API application served on host:port within `HttpLimits`."""

    def __init__(
        self,
        app: web.Application,
        host: str,
        port: int,
        *,
        shutdown_timeout: float,
        limits: HttpLimits | None = None,
    ) -> None:
        self.limits = limits or DEFAULT_LIMITS
        self.host, self.port = host, port
        self.table = ConnectionTable(self.limits.connections(descriptor_limit()))
        app[LIMITS] = self.limits
        app[CONNECTIONS] = self.table
        app.middlewares.insert(0, _in_flight_marker(self.table))
        self._shutdown_timeout = shutdown_timeout
        self._runner = web.AppRunner(
            app,
            handle_signals=False,
            access_log=None,
            shutdown_timeout=shutdown_timeout,
            handler_cancellation=False,
            keepalive_timeout=self.limits.header_timeout,
            lingering_time=self.limits.lingering_time,
            max_line_size=MAX_LINE_SIZE,
            max_field_size=MAX_FIELD_SIZE,
            max_headers=MAX_HEADERS,
            logger=REQUEST_LOG,
        )
        self._server: asyncio.Server | None = None
        self._loop = asyncio.new_event_loop()  # the API's own, run by `_thread`
        self._thread = threading.Thread(target=self._run, name="tickguard-api", daemon=True)
        self._switch_interval = sys.getswitchinterval()  # restored when the thread ends

    @property
    def addresses(self) -> list[tuple[str, int]]:
        """Where it listens, (host, port) per socket."""
        if self._server is None:
            return []
        return [sock.getsockname()[:2] for sock in self._server.sockets]

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.set_exception_handler(_accept_errors)
        try:
            self._loop.run_forever()
        finally:
            self._loop.close()

    async def _on_api_loop(self, work: Coroutine[Any, Any, None]) -> None:
        await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(work, self._loop))

    async def start(self) -> None:
        """Start the API's thread and listen; OSError (nothing left running) when the address
        cannot be bound."""
        self._switch_interval = sys.getswitchinterval()
        sys.setswitchinterval(min(self._switch_interval, SWITCH_INTERVAL))
        self._thread.start()
        try:
            await self._on_api_loop(self._start())
        except OSError:
            await self._stop_thread()
            raise
        log.info(
            "[HTTP] at most %d connections (descriptor limit %d); request heads within %gs,"
            " bodies within %gs",
            self.table.cap,
            descriptor_limit(),
            self.limits.header_timeout,
            self.limits.body_timeout,
        )

    async def _start(self) -> None:
        await self._runner.setup()
        handler = self._runner.server
        assert handler is not None
        try:
            self._server = await self._loop.create_server(
                lambda: _Admitted(self.table, handler),
                self.host,
                self.port,
                backlog=self.limits.backlog,
                reuse_address=True,
            )
        except OSError:
            await self._runner.cleanup()
            raise

    async def close(self) -> None:
        """Stop listening, let requests in flight finish (bounded), close every connection,
        end the API's thread."""
        if self._thread.is_alive():
            await self._on_api_loop(self._close())
            await self._stop_thread()

    async def _close(self) -> None:
        if self._server is not None:
            self._server.close()
        await self._runner.cleanup()
        if self._server is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._shutdown_timeout):
                    await self._server.wait_closed()
            self._server = None

    async def _stop_thread(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        await asyncio.to_thread(self._thread.join)
        sys.setswitchinterval(self._switch_interval)
