"""The feed against servers that stop reading their socket or flood it with pings: write
deadlines, a cap on unsent bytes and one on the server's pings.

The hostile servers are raw TCP sockets on loopback port 0 (a small SO_RCVBUF,
so their kernel holds little for them) that complete the WebSocket handshake by
hand, take the subscribe frame, and then never call recv() again while they
send frames. websockets' own server would not do: it reads in a task of its
own. Every connection after a server's first is spliced to a healthy
`feed_server`, so the tests can see the feed reconnect and tick again.
Intervals come from config, loops are bounded in count, and tests await events.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import re
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING

import pytest

from tickguard.core.prices import PriceSource
from tickguard.feed import supervisor
from tickguard.feed.supervisor import MAX_PINGS_PER_SECOND, MAX_UNSENT_BYTES, WRITE_LIMIT

if TYPE_CHECKING:
    from conftest import Eventually, FeedFactory, FeedServerFactory

LIVE = PriceSource.LIVE
SUBSCRIBED = {"BOSCHLTD", "ADANIENT"}  # the feed fixture's default symbols
LOOPBACK = "127.0.0.1"
SLACK = 1.0  # seconds of scheduling latency a bound allows on a loaded machine
TEST_TIMEOUT = 25.0  # no test runs longer than this

SERVER_RCVBUF = 4096  # the kernel doubles it; either way a few KiB
GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"  # RFC 6455 section 1.3
PAYLOAD = b"p" * 125  # the largest control-frame payload: the fastest way to make us write
PING = bytes([0x89, len(PAYLOAD)]) + PAYLOAD  # FIN + ping, unmasked (server to client)
PONG_BYTES = 2 + 4 + len(PAYLOAD)  # our answer: header, mask key, the same payload
READ_CHUNK = 256 * 1024  # asyncio's socket transports read at most this much per data_received
# The pongs the client library writes for what one read brings in, unchecked until the read is done.
ONE_READ_OF_PONGS = READ_CHUNK // len(PING) * PONG_BYTES
FLOOD_CHUNK = PING * (65536 // len(PING))
EMPTY_PING = bytes([0x89, 0])  # FIN + ping, no payload: the most pings per byte
EMPTY_PONG_BYTES = 2 + 4  # our answer: header and mask key
EMPTY_FLOOD_CHUNK = EMPTY_PING * (65536 // len(EMPTY_PING))
FLOOD_CHUNKS = 512  # 32 MiB of pings at most: bounds what a feed without the cap could swallow
MAX_CONNECTIONS = 20  # accepted per server
MAX_READS = 100_000  # per socket, in the handshake reader and the splice
HEARTBEATS = 400  # at 50 ms: 20 s, longer than any test
UNSENT = re.compile(r"\((\d+) bytes unsent\)")


# ---------------------------------------------------------------------------
# A hand-made WebSocket server on a raw socket


def frame(payload: bytes, opcode: int = 0x1) -> bytes:
    """One unmasked server frame (payload under 126 bytes)."""
    assert len(payload) < 126
    return bytes([0x80 | opcode, len(payload)]) + payload


def client_frame(data: bytes) -> tuple[bytes, bytes] | None:
    """Split one masked client frame off `data`: (its unmasked payload, the rest), or None if incomplete."""
    if len(data) < 2:
        return None
    length, offset = data[1] & 0x7F, 2
    if length == 126:
        (length,), offset = struct.unpack_from("!H", data, 2), 4
    elif length == 127:
        (length,), offset = struct.unpack_from("!Q", data, 2), 10
    end = offset + 4 + length
    if len(data) < end:
        return None
    mask = data[offset : offset + 4]
    payload = bytes(b ^ mask[i % 4] for i, b in enumerate(data[offset + 4 : end]))
    return payload, data[end:]


Behaviour = Callable[["HostileServer", socket.socket], Awaitable[None]]


class HostileServer:
    """WebSocket on 127.0.0.1:0 over raw sockets: `behaviour` runs on the first connection after
    the subscribe frame; later connections are spliced to `healthy_port`."""

    def __init__(self, behaviour: Behaviour, healthy_port: int) -> None:
        self.behaviour = behaviour
        self.healthy_port = healthy_port
        self.port = 0
        self.connections = 0
        self.subscriptions: list[list[str]] = []
        self.subscribed = asyncio.Event()  # the first connection's subscribe frame arrived
        self._listener: socket.socket | None = None
        self._sockets: list[socket.socket] = []
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def url(self) -> str:
        return f"ws://{LOOPBACK}:{self.port}/ws"

    async def start(self) -> None:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SERVER_RCVBUF)  # inherited
        listener.bind((LOOPBACK, 0))
        listener.listen()
        listener.setblocking(False)
        self._listener = listener
        self._sockets.append(listener)
        self.port = listener.getsockname()[1]
        self._spawn(self._accept(listener))

    def _spawn(self, coro: Awaitable[None]) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _accept(self, listener: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        for index in range(MAX_CONNECTIONS):
            conn, _ = await loop.sock_accept(listener)
            conn.setblocking(False)
            self._sockets.append(conn)
            self.connections += 1
            self._spawn(self._serve(conn) if index == 0 else self._splice(conn))

    async def _serve(self, conn: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        with contextlib.suppress(OSError):  # the client aborted: the end of every behaviour
            data = b""
            for _ in range(MAX_READS):
                if b"\r\n\r\n" in data:
                    break
                data += await loop.sock_recv(conn, 4096)
            head, _, data = data.partition(b"\r\n\r\n")
            key = next(
                line.split(b":", 1)[1].strip()
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"sec-websocket-key:")
            )
            accept = base64.b64encode(hashlib.sha1(key + GUID).digest())
            await loop.sock_sendall(
                conn,
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept + b"\r\n\r\n",
            )
            parsed = client_frame(data)
            for _ in range(MAX_READS):
                if parsed is not None:
                    break
                data += await loop.sock_recv(conn, 4096)
                parsed = client_frame(data)
            assert parsed is not None
            self.subscriptions.append(json.loads(parsed[0])["symbols"])
            self.subscribed.set()
            # From here on this socket is never read again.
            await self.behaviour(self, conn)
            await asyncio.Future()  # hold the connection open until the server closes

    async def _splice(self, conn: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        upstream = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        upstream.setblocking(False)
        self._sockets.append(upstream)
        with contextlib.suppress(OSError):
            await loop.sock_connect(upstream, (LOOPBACK, self.healthy_port))
            await asyncio.gather(self._pump(conn, upstream), self._pump(upstream, conn))

    @staticmethod
    async def _pump(source: socket.socket, sink: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        try:
            for _ in range(MAX_READS):
                data = await loop.sock_recv(source, 65536)
                if not data:
                    break
                await loop.sock_sendall(sink, data)
        finally:
            with contextlib.suppress(OSError):
                sink.shutdown(socket.SHUT_WR)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for sock in self._sockets:
            sock.close()


HostileServerFactory = Callable[[Behaviour, int], Awaitable[HostileServer]]


@pytest.fixture
async def hostile_server() -> AsyncIterator[HostileServerFactory]:
    """`await hostile_server(behaviour, healthy_port)`: a started server, closed at teardown."""
    servers: list[HostileServer] = []

    async def start(behaviour: Behaviour, healthy_port: int) -> HostileServer:
        server = HostileServer(behaviour, healthy_port)
        servers.append(server)
        await server.start()
        return server

    try:
        yield start
    finally:
        for server in servers:
            await server.close()


async def flood(server: HostileServer, conn: socket.socket) -> None:
    """Pings as fast as the socket takes them (FLOOD_CHUNKS at most), never reading."""
    loop = asyncio.get_running_loop()
    for _ in range(FLOOD_CHUNKS):
        await loop.sock_sendall(conn, FLOOD_CHUNK)


@pytest.fixture
def no_ping_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    """MAX_PINGS_PER_SECOND out of the way: a ping flood then reaches the bounds behind it."""
    monkeypatch.setattr(supervisor, "MAX_PINGS_PER_SECOND", 1 << 40)


# ---------------------------------------------------------------------------


async def test_a_flood_of_empty_pings_is_failed_as_protocol_within_the_ping_bound(
    feed_server: FeedServerFactory,
    hostile_server: HostileServerFactory,
    feed: FeedFactory,
    eventually: Eventually,
) -> None:
    """A server that floods empty pings and reads our pongs (so no unsent bytes pile up) is failed as `protocol` after MAX_PINGS_PER_SECOND pongs, not left to stall the event loop, and the feed reconnects."""
    loop = asyncio.get_running_loop()
    drained = 0  # bytes the server read back from us: our pongs
    longest = 0.0  # the event loop's longest turn while the flood lasts (printed, not judged)

    async def flood_and_read(server: HostileServer, conn: socket.socket) -> None:
        async def drain() -> None:
            nonlocal drained
            for _ in range(MAX_READS):
                data = await loop.sock_recv(conn, 65536)
                if not data:
                    return
                drained += len(data)

        reader = asyncio.ensure_future(drain())
        try:
            for _ in range(FLOOD_CHUNKS):
                await loop.sock_sendall(conn, EMPTY_FLOOD_CHUNK)
        finally:
            reader.cancel()

    async def probe() -> None:
        nonlocal longest
        while True:
            before = loop.time()
            await asyncio.sleep(0.005)
            longest = max(longest, loop.time() - before - 0.005)

    async with asyncio.timeout(TEST_TIMEOUT):
        healthy = await feed_server()
        server = await hostile_server(flood_and_read, healthy.port)
        f = await feed(
            server.url,
            # Nothing but the ping bound may end this connection in time.
            config={"feed": {"ping_interval": 10.0, "silence_timeout": 30.0}},
        )
        await server.subscribed.wait()
        probing = asyncio.ensure_future(probe())
        try:
            await eventually(lambda: f.failures, 15.0, what="the flood noticed")
        finally:
            probing.cancel()
        mark = f.mark()
        await eventually(
            lambda: f.symbols_since(mark, LIVE) >= SUBSCRIBED, what="ticks from a healthy server"
        )

        failure = f.failures[0]
        pongs = drained // EMPTY_PONG_BYTES
        print(
            f"\nempty-ping flood: {failure.kind} ({failure.detail}) after {pongs} pongs;"
            f" the event loop's longest turn meanwhile {longest * 1000:.1f} ms"
        )
        assert failure.kind == "protocol"
        assert f"more than {MAX_PINGS_PER_SECOND} pings" in failure.detail
        # Counted per second: a flood straddling a window's end gets at most two windows' worth
        # (none at all when the first read held more than the bound: the abort drops them).
        assert pongs <= 2 * MAX_PINGS_PER_SECOND
        assert f.metric("tickguard_websocket_network_errors_total", kind="protocol") == 1
        assert f.supervisor.connected
        assert server.connections == 2
        f.assert_running()


@pytest.mark.usefixtures("no_ping_limit")
async def test_ping_flood_without_reading_is_capped_aborted_and_reconnected(
    feed_server: FeedServerFactory,
    hostile_server: HostileServerFactory,
    feed: FeedFactory,
    eventually: Eventually,
) -> None:
    """A server that floods pings and never reads is aborted as `protocol` once our unsent pongs pass MAX_UNSENT_BYTES (the ping bound out of the way), long before any keepalive ping is due, and the feed reconnects."""
    ping_interval = 10.0  # no keepalive ping before the cap must have acted
    async with asyncio.timeout(TEST_TIMEOUT):
        healthy = await feed_server()
        server = await hostile_server(flood, healthy.port)
        f = await feed(
            server.url,
            # A market-closed feed: nothing but the cap may end this connection in time.
            config={
                "feed": {
                    "ping_interval": ping_interval,
                    "ping_timeout": 0.2,
                    "silence_timeout": 3 * ping_interval,
                }
            },
        )
        await server.subscribed.wait()
        flooded = asyncio.get_running_loop().time()
        peak = 0

        def failed() -> bool:
            nonlocal peak
            peak = max(peak, f.supervisor.unsent_bytes)
            return bool(f.failures)

        await eventually(failed, ping_interval / 2, what="the flood noticed")
        detected = f.failures[0].at - flooded
        mark = f.mark()
        await eventually(
            lambda: f.symbols_since(mark, LIVE) >= SUBSCRIBED, what="ticks from a healthy server"
        )

        failure = f.failures[0]
        found = UNSENT.search(failure.detail)
        bound = MAX_UNSENT_BYTES + ONE_READ_OF_PONGS
        print(
            f"\nflood: aborted {detected:.3f}s after the subscribe, holding {failure.detail};"
            f" largest buffer sampled {peak} bytes (bound {bound})"
        )
        assert server.subscriptions == [sorted(SUBSCRIBED)]
        assert failure.kind == "protocol"
        assert "the server stopped reading" in failure.detail
        assert found is not None, failure.detail
        assert MAX_UNSENT_BYTES < int(found.group(1)) <= bound
        assert peak <= bound
        assert f.metric("tickguard_websocket_network_errors_total", kind="protocol") == 1
        assert f.supervisor.connected
        assert server.connections == 2
        assert healthy.subscriptions == [sorted(SUBSCRIBED)]
        f.assert_running()


@pytest.mark.usefixtures("no_ping_limit")  # its pings back our pongs up, past WRITE_LIMIT
async def test_server_that_stops_reading_is_caught_by_the_ping_deadline(
    feed_server: FeedServerFactory,
    hostile_server: HostileServerFactory,
    feed: FeedFactory,
    eventually: Eventually,
) -> None:
    """A server that takes the subscribe frame, then stops reading while it keeps sending data fails as `ping_timeout` within ping_interval + ping_timeout, even when our ping cannot be written, and the feed reconnects."""
    ping_interval, ping_timeout = 1.0, 0.2
    loop = asyncio.get_running_loop()
    paused = asyncio.Event()
    times: dict[str, float] = {}  # monotonic: loop.time() is time.monotonic()

    async def stop_reading(server: HostileServer, conn: socket.socket) -> None:
        """Pings until our pongs back up past the write limit (so ping() waits), then heartbeats only."""
        for _ in range(FLOOD_CHUNKS):
            if f.supervisor.unsent_bytes > WRITE_LIMIT:
                break
            await loop.sock_sendall(conn, FLOOD_CHUNK)
            await asyncio.sleep(0)  # one loop turn: the client reads what was sent
        else:
            raise AssertionError("the client's buffer never backed up")
        assert f.supervisor.connected_since is not None
        times.update(connected=f.supervisor.connected_since, backed_up=loop.time())
        paused.set()
        heartbeat = frame(json.dumps({"type": "heartbeat"}).encode())
        for _ in range(HEARTBEATS):  # data keeps coming: silence never fires
            await loop.sock_sendall(conn, heartbeat)
            await asyncio.sleep(0.05)

    async with asyncio.timeout(TEST_TIMEOUT):
        healthy = await feed_server()
        server = await hostile_server(stop_reading, healthy.port)
        f = await feed(
            server.url,
            config={"feed": {"ping_interval": ping_interval, "ping_timeout": ping_timeout}},
        )
        await paused.wait()
        bound = ping_interval + ping_timeout + SLACK
        await eventually(lambda: f.failures, bound, what="the stalled socket noticed")
        failure = f.failures[0]
        detected = failure.at - times["backed_up"]
        mark = f.mark()
        await eventually(
            lambda: f.symbols_since(mark, LIVE) >= SUBSCRIBED, what="ticks from a healthy server"
        )

        print(f"\nstopped reading: {failure.kind} after {detected:.3f}s ({failure.detail})")
        assert server.subscriptions == [sorted(SUBSCRIBED)]
        assert failure.kind == "ping_timeout"
        assert "the server stopped reading" in failure.detail
        assert detected <= bound
        if times["backed_up"] < times["connected"] + ping_interval:  # before the first ping was due
            assert failure.detail.startswith("our ping not sent within"), failure.detail
        assert f.metric("tickguard_websocket_network_errors_total", kind="ping_timeout") == 1
        assert f.metric("tickguard_websocket_network_errors_total", kind="silence") == 0
        assert f.supervisor.connected
        f.assert_running()
