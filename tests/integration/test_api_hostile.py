"""The API against hostile and broken clients (issue 9: finding 3, the API items of finding 6).

What one request shows runs against the daemon in-process (`app.build` +
`app.serve` on 127.0.0.1:0), talking raw HTTP over asyncio streams where a
client library would refuse to send the bytes. Descriptor bounds run against
`python -m tickguard run` as a subprocess: a descriptor limit is a process's
own, so the daemon gets its RLIMIT_NOFILE from `preexec_fn` (or `prlimit`
while it runs), and the test counts its descriptors in /proc and its stderr
lines.

Time bounds come from `http_server.HttpLimits`, scaled small here by
replacing `http_server.DEFAULT_LIMITS`; assertions on them are "not before
the bound" (timers never fire early) and "within a generous multiple".
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import resource
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tickguard import app, http_server
from tickguard.config import parse_config
from tickguard.core.prices import PriceSource
from tickguard.http_server import HttpLimits
from tickguard.log_limit import LogRateLimit

LOOPBACK = "127.0.0.1"
TOKEN = "t0ken-for-hostile-tests"
STARTUP = 20.0  # seconds a daemon (a subprocess: interpreter, imports) may take to listen
LISTENING_RE = re.compile(r"\[HTTP\] listening on 127\.0\.0\.1:(\d+)")
# Loggers whose lines a client can cause.
HTTP_LOGGERS = ("tickguard.api", "tickguard.http_server", "aiohttp", "asyncio")
FORMAT = logging.Formatter("%(levelname)s %(name)s: %(message)s")
CLOSE = "/api/v1/monitoring/emergency-close-position"


def unused_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        port: int = s.getsockname()[1]
    return port


def strict_json(text: str | bytes) -> Any:
    """json.loads that refuses NaN and Infinity, which are not JSON (RFC 8259)."""

    def reject(constant: str) -> None:
        raise ValueError(f"not JSON: {constant}")

    return json.loads(text, parse_constant=reject)


def assert_error(answer: Answer, status: int, code: str) -> dict[str, Any]:
    """`answer` is a SPEC error with this status and code; its body, decoded."""
    assert answer.status == status, answer
    assert answer.headers.get("content-type", "").startswith("application/json"), answer
    body = strict_json(answer.body)
    assert body["status"] == "error" and body["error"] == code, body
    assert isinstance(body["message"], str) and body["message"], body
    return body  # type: ignore[no-any-return]


# ---------------------------------------------------------------------------
# Raw HTTP


@dataclass(frozen=True)
class Answer:
    """An HTTP response as received: status, headers (lower-cased names), body."""

    status: int
    headers: dict[str, str]
    body: bytes


def parse_answer(data: bytes) -> Answer:
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    assert lines[0].startswith("HTTP/1."), data[:200]
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return Answer(int(lines[0].split()[1]), headers, body)


async def exchange(port: int, request: bytes, timeout: float = 15.0) -> Answer:
    """Send `request` (it says `Connection: close`) on a new connection; the answer, read to EOF."""
    reader, writer = await asyncio.open_connection(LOOPBACK, port)
    try:
        writer.write(request)
        await writer.drain()
        async with asyncio.timeout(timeout):
            data = await reader.read()
    finally:
        writer.close()
    return parse_answer(data)


def post(path: str, body: bytes, *extra: bytes, token: bytes = TOKEN.encode()) -> bytes:
    """A complete POST with a bearer token, `extra` header lines and `Connection: close`."""
    lines = [
        f"POST {path} HTTP/1.1".encode(),
        b"Host: tickguard",
        b"Authorization: Bearer " + token,
        b"Content-Type: application/json",
        b"Content-Length: %d" % len(body),
        b"Connection: close",
        *extra,
    ]
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


# ---------------------------------------------------------------------------
# Log records


class Records(logging.Handler):
    """Every record that reaches the root logger's handlers, as they would be rendered."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []
        self.rendered: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)
        self.rendered.append(FORMAT.format(record))  # with the traceback, as stderr would show

    def clear(self) -> None:
        """Forget what came so far (the daemon's start-up lines)."""
        self.records.clear()
        self.rendered.clear()

    def http(self) -> list[str]:
        """Rendered records of the loggers a client can make write."""
        return [
            text
            for record, text in zip(self.records, self.rendered, strict=True)
            if record.name.startswith(HTTP_LOGGERS)
        ]

    def http_lines(self) -> int:
        """How many stderr lines those records would be (a traceback is many)."""
        return sum(len(text.splitlines()) for text in self.http())


def reset_throttles() -> None:
    """Forget the rate-limit windows of every logger (each test starts with a fresh budget)."""
    for logger in logging.Logger.manager.loggerDict.values():
        for f in getattr(logger, "filters", []):
            if isinstance(f, LogRateLimit):
                f.reset()


@pytest.fixture
def records() -> Iterator[Records]:
    """A Records handler on the root logger at INFO, removed at teardown."""
    handler = Records()
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.INFO)
    root.addHandler(handler)
    reset_throttles()
    try:
        yield handler
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


# ---------------------------------------------------------------------------
# The daemon, in-process


class _ListenWatcher(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.port: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    def emit(self, record: logging.LogRecord) -> None:
        found = LISTENING_RE.search(record.getMessage())
        if found is not None and not self.port.done():
            self.port.set_result(int(found.group(1)))


@dataclass(eq=False)
class Served:
    """A daemon served in this event loop."""

    daemon: app.Daemon
    state_dir: Path
    port: int
    stop_event: asyncio.Event
    task: asyncio.Task[int]
    http: aiohttp.ClientSession = field(default_factory=aiohttp.ClientSession)

    @property
    def base(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    async def call(self, method: str, path: str, body: Any = None) -> tuple[int, str]:
        """(status, body text) of a request with the token."""
        async with self.http.request(
            method,
            self.base + path,
            json=body,
            headers={"Authorization": f"Bearer {TOKEN}"},
            timeout=aiohttp.ClientTimeout(total=15),
        ) as response:
            return response.status, await response.text()

    async def stop(self) -> int:
        self.stop_event.set()
        await self.http.close()
        async with asyncio.timeout(15):
            return await self.task


Serve = Callable[..., Awaitable[Served]]


@pytest.fixture
async def serve(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Serve]:
    """`await serve(limits=HttpLimits(...))`: a daemon on 127.0.0.1:0 whose feed nobody serves."""
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    logger = logging.getLogger("tickguard")
    monkeypatch.setattr(logger, "level", logging.INFO)  # the `[HTTP] listening on` line
    started: list[Served] = []
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)

    async def start(limits: HttpLimits | None = None) -> Served:
        if limits is not None:
            monkeypatch.setattr(http_server, "DEFAULT_LIMITS", limits)
        state = tmp_path / "state"
        config = parse_config(
            {
                "daemon": {"state_dir": str(state)},
                "http": {"listen": f"{LOOPBACK}:0", "token_file": str(token_file)},
                "feed": {
                    "url": f"ws://{LOOPBACK}:{unused_port()}/ws",
                    "reconnect": {"initial_delay": 1.0, "max_delay": 2.0},
                },
                "dns": {"fallback_servers": []},
                "market": {"always_open": True},
                "guard": {"sweep_interval": 0.05},
            },
            env={},
        )
        daemon = await app.build(config)
        watcher = _ListenWatcher()
        logging.getLogger("tickguard.app").addHandler(watcher)
        stop_event = asyncio.Event()
        task = asyncio.create_task(app.serve(daemon, stop=stop_event))
        try:
            await asyncio.wait(
                [watcher.port, task], timeout=STARTUP, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            logging.getLogger("tickguard.app").removeHandler(watcher)
        if not watcher.port.done():
            stop_event.set()
            raise AssertionError(f"the daemon did not listen: {task}")
        served = Served(daemon, state, watcher.port.result(), stop_event, task)
        started.append(served)
        return served

    try:
        yield start
    finally:
        for served in started:
            if not served.task.done():
                assert await served.stop() == 0
            else:
                await served.http.close()


# ---------------------------------------------------------------------------
# Finding 6: one request each


async def test_non_utf8_authorization_is_a_401(serve: Serve, records: Records) -> None:
    """An Authorization header that is not UTF-8 is a wrong token: 401, no traceback."""
    d = await serve()
    records.clear()
    answer = await exchange(d.port, post(CLOSE, b'{"symbol": "X"}', token=b"\xff\xfe\x80token"))
    assert_error(answer, 401, "unauthorized")
    assert not [r for r in records.records if r.exc_info], records.http()
    assert not [r for r in records.records if r.levelno >= logging.ERROR], records.http()


async def test_oversized_authorization_never_reaches_the_log(
    serve: Serve, records: Records
) -> None:
    """A header over 8 KB is refused with 400 and logged as one WARNING quoting none of its bytes."""
    d = await serve()
    records.clear()
    huge = TOKEN.encode() + b"A" * 9000
    answer = await exchange(d.port, post(CLOSE, b"{}", token=huge))
    assert answer.status == 400, answer
    logged = records.http()
    assert logged, "the bad request left no line at all"
    assert not any(TOKEN in text or "AAAA" in text for text in logged), logged
    assert records.http_lines() == len(logged) == 1, logged  # one line: no traceback
    assert [r.levelno for r in records.records if r.name.startswith(HTTP_LOGGERS)] == [
        logging.WARNING
    ]


async def test_a_flood_of_malformed_requests_costs_a_few_log_lines(
    serve: Serve, records: Records
) -> None:
    """300 malformed requests of three kinds write one line per kind, no traceback, no request bytes."""
    d = await serve()
    records.clear()
    kinds = [
        b"GET / HTTP/1.1\r\nHost: x\r\nBad Header Secret-Value\r\nConnection: close\r\n\r\n",
        b"GET /" + b"x" * 9000 + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        post(CLOSE, b"{}", token=TOKEN.encode() + b"B" * 9000),
    ]
    for i in range(300):
        answer = await exchange(d.port, kinds[i % 3])
        assert answer.status == 400, answer
    logged = records.http()
    print(f"{len(logged)} log lines for 300 malformed requests: {logged}")
    assert 1 <= records.http_lines() <= 3, logged
    text = "\n".join(logged)
    assert "Secret-Value" not in text and "xxxx" not in text and TOKEN not in text, text


async def test_deeply_nested_json_is_a_400(serve: Serve, records: Records) -> None:
    """A body nested 20,000 deep (within the size limit) is a 400 bad_json, not a 500."""
    d = await serve()
    records.clear()
    body = b"[" * 20_000 + b"]" * 20_000
    for path in (CLOSE, "/api/v1/positions", "/api/v1/monitoring/emergency-close-all"):
        assert_error(await exchange(d.port, post(path, body)), 400, "bad_json")
    assert not [r for r in records.records if r.exc_info], records.http()


async def test_a_400_digit_quantity_is_a_400(serve: Serve, records: Records) -> None:
    """A quantity or price of 400 digits (valid JSON, no float) is a 400 naming the field."""
    d = await serve()
    records.clear()
    body = (
        b'{"symbol": "A", "side": "long", "quantity": ' + b"9" * 400 + b', "entry_price": 1e400}'
    )
    answer = await exchange(d.port, post("/api/v1/positions", body))
    message = assert_error(answer, 400, "bad_request")["message"]
    assert message.startswith("quantity: <an integer of 400 digits> is invalid"), message
    assert len(message) < 300, message
    assert not [r for r in records.records if r.exc_info], records.http()


async def test_a_body_that_is_not_gzip_is_a_400(serve: Serve, records: Records) -> None:
    """`Content-Encoding: gzip` on a body that is not gzip is a 400 bad_body, with no traceback."""
    d = await serve()
    records.clear()
    for path in (CLOSE, "/api/v1/positions"):
        request = post(path, b"garbage, not gzip at all", b"Content-Encoding: gzip")
        assert_error(await exchange(d.port, request), 400, "bad_body")
    assert not [r for r in records.records if r.exc_info], records.http()
    assert not [r for r in records.records if r.levelno >= logging.ERROR], records.http()


async def test_non_finite_numbers_are_null_in_every_answer(serve: Serve) -> None:
    """A price whose pnl overflows to infinity answers strict JSON with null, not `Infinity`."""
    d = await serve()
    status, text = await d.call(
        "POST",
        "/api/v1/positions",
        {"symbol": "BOSCHLTD", "side": "long", "quantity": 38, "entry_price": 735.0},
    )
    assert status == 201, text
    # In range for a double, past it times 38. Put straight into the book: whatever bounds
    # the feed applies at input, the answer must be JSON.
    d.daemon.book.update("BOSCHLTD", 1e308, None, PriceSource.LIVE, d.daemon.monotonic())
    status, text = await d.call("GET", "/api/v1/positions")
    assert status == 200, text
    (position,) = strict_json(text)["positions"]
    assert position["unrealized_pnl"] is None, position
    assert position["price"]["price"] == 1e308, position
    for path in ("/api/v1/monitoring/connection-health", "/api/v1/positions?state=all"):
        status, text = await d.call("GET", path)
        assert status == 200, text
        strict_json(text)


async def test_a_failing_store_is_a_503_and_only_a_duplicate_is_a_409(serve: Serve) -> None:
    """A store that cannot write answers 503 store_unavailable without its path; a duplicate 409."""
    d = await serve()
    spec = {"symbol": "BOSCHLTD", "side": "long", "quantity": 38, "entry_price": 735.0}
    assert (await d.call("POST", "/api/v1/positions", spec))[0] == 201
    status, text = await d.call("POST", "/api/v1/positions", spec)
    assert status == 409 and strict_json(text)["error"] == "conflict", text

    db = d.daemon.store._db  # the store's own connection: SQLite now refuses every write
    db.execute("PRAGMA query_only = ON")
    try:
        status, text = await d.call("POST", "/api/v1/positions", {**spec, "symbol": "TCS"})
    finally:
        db.execute("PRAGMA query_only = OFF")
    assert status == 503, text
    body = strict_json(text)
    assert body["error"] == "store_unavailable", body
    assert str(d.state_dir) not in text and "sqlite" not in text.lower(), body
    assert (await d.call("POST", "/api/v1/positions", {**spec, "symbol": "TCS"}))[0] == 201


async def test_an_emergency_close_goes_out_when_the_audit_log_cannot_be_written(
    serve: Serve,
) -> None:
    """The audit log refusing its entry (as on a full disk) never stops a close or an add."""
    d = await serve()
    db = d.daemon.store._db  # SQLite itself refuses every audit entry from now on
    db.execute(
        "CREATE TEMP TRIGGER audit_full BEFORE INSERT ON main.audit"
        " BEGIN SELECT RAISE(FAIL, 'database or disk is full'); END"
    )
    spec = {"symbol": "BOSCHLTD", "side": "long", "quantity": 38, "entry_price": 735.0}
    assert (await d.call("POST", "/api/v1/positions", spec))[0] == 201
    d.daemon.book.update("BOSCHLTD", 700.0, None, PriceSource.POLL, d.daemon.monotonic())
    status, text = await d.call(
        "POST", CLOSE, {"symbol": "BOSCHLTD", "reason": "emergency"}
    )
    assert status == 200, text
    assert strict_json(text)["exit_price"] == 700.0
    assert d.daemon.store.paper_fill_count() == 1


def test_throttle_lets_one_line_through_and_counts_the_rest() -> None:
    """A LogRateLimit passes one record per kind per interval and reports the held-back count after."""
    now = [0.0]
    throttle = LogRateLimit(interval=10.0, burst=1, clock=lambda: now[0])
    kept: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            kept.append(record.getMessage())

    logger = logging.getLogger("tickguard.tests.throttle")
    logger.propagate = False
    logger.addHandler(Keep())
    logger.addFilter(throttle)
    for i in range(100):
        logger.warning("[HTTP] bad request from %s", f"10.0.0.{i}")
    logger.warning("[HTTP] another kind of line")
    now[0] = 9.9
    logger.warning("[HTTP] bad request from %s", "10.0.0.200")
    now[0] = 10.0
    logger.warning("[HTTP] bad request from %s", "10.0.0.201")
    assert kept == [
        "[HTTP] bad request from 10.0.0.0",
        "[HTTP] another kind of line",
        "[HTTP] bad request from 10.0.0.201 (100 more like this in the last 10s not logged)",
    ]
    assert throttle.held_total == 100


# ---------------------------------------------------------------------------
# Finding 3, in-process: time bounds and the connection cap


async def test_a_slow_request_head_is_closed_after_the_header_timeout(serve: Serve) -> None:
    """Half a request line, or a head without its end, is closed once `header_timeout` has run out."""
    limits = HttpLimits(header_timeout=0.5)
    d = await serve(limits)
    loop = asyncio.get_running_loop()
    for partial in (b"GET /heal", b"GET /healthz HTTP/1.1\r\nHost: x\r\n"):
        reader, writer = await asyncio.open_connection(LOOPBACK, d.port)
        opened = loop.time()
        writer.write(partial)
        async with asyncio.timeout(10 * limits.header_timeout + 5):
            assert await reader.read() == b""  # closed, and nothing answered
        held = loop.time() - opened
        writer.close()
        print(f"{partial!r}: closed after {held:.2f}s (header_timeout {limits.header_timeout}s)")
        assert held >= limits.header_timeout * 0.9  # loop clocks may differ by a tick
    answer = await exchange(
        d.port, b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    assert answer.status == 200


async def test_a_slow_body_is_a_408(serve: Serve) -> None:
    """A body that stops coming is answered 408 once `body_timeout` has run out, and closed."""
    d = await serve(HttpLimits(body_timeout=0.5))
    reader, writer = await asyncio.open_connection(LOOPBACK, d.port)
    body = b'{"symbol": "NOSUCH", "reason": "emergency"}'
    head = post(CLOSE, body).replace(b"Content-Length: %d" % len(body), b"Content-Length: 500")
    writer.write(head)  # 500 announced, 43 sent
    try:
        async with asyncio.timeout(15):
            answer = parse_answer(await reader.read())
    finally:
        writer.close()
    assert_error(answer, 408, "timeout")


async def test_over_the_cap_the_oldest_idle_connection_makes_room(
    serve: Serve, monkeypatch: pytest.MonkeyPatch, eventually: Any
) -> None:
    """40 idle connections against a cap of 8: /healthz still answers, a request in flight is not cut."""
    tables: list[http_server.ConnectionTable] = []

    class Recorded(http_server.ConnectionTable):
        def __init__(self, cap: int) -> None:
            super().__init__(cap)
            tables.append(self)

    monkeypatch.setattr(http_server, "ConnectionTable", Recorded)
    d = await serve(HttpLimits(max_connections=8))
    (table,) = tables
    # A request in flight: its head is in, its body not yet.
    busy_reader, busy_writer = await asyncio.open_connection(LOOPBACK, d.port)
    body = b'{"symbol": "NOSUCH"}'
    request = post(CLOSE, body)
    busy_writer.write(request[: -len(body)])
    await busy_writer.drain()
    # Its head reached the handler before the flood (else, still idle, it is the oldest).
    await eventually(lambda: table.snapshot()["in_flight"] == 1, what="the request in flight")
    flood = [await asyncio.open_connection(LOOPBACK, d.port) for _ in range(40)]
    try:
        for _ in range(5):
            async with d.http.get(d.base + "/healthz") as response:
                assert response.status == 200

        def closed() -> int:
            return sum(r.at_eof() or r.exception() is not None for r, _ in flood)

        await eventually(lambda: closed() >= 40 - 8, what="idle connections closed")
        print(f"idle connections closed by the daemon: {closed()} of 40")
        busy_writer.write(body)  # the in-flight request was kept: it completes
        async with asyncio.timeout(15):
            answer = parse_answer(await busy_reader.read())
        assert_error(answer, 404, "not_found")
    finally:
        busy_writer.close()
        for _, writer in flood:
            writer.close()


async def test_when_every_connection_has_a_request_in_flight_newcomers_are_closed(
    serve: Serve, monkeypatch: pytest.MonkeyPatch, eventually: Any
) -> None:
    """With every slot busy a new connection is closed at once; a slot freed takes one again."""
    tables: list[http_server.ConnectionTable] = []

    class Recorded(http_server.ConnectionTable):
        def __init__(self, cap: int) -> None:
            super().__init__(cap)
            tables.append(self)

    monkeypatch.setattr(http_server, "ConnectionTable", Recorded)
    d = await serve(HttpLimits(max_connections=4))
    (table,) = tables
    body = b'{"symbol": "NOSUCH"}'
    busy = []
    for _ in range(4):
        reader, writer = await asyncio.open_connection(LOOPBACK, d.port)
        writer.write(post(CLOSE, body)[: -len(body)])
        await writer.drain()
        busy.append((reader, writer))
    try:
        # Every request reached its handler (which waits for the body) before the newcomer.
        await eventually(lambda: table.snapshot()["in_flight"] == 4, what="4 requests in flight")
        reader, writer = await asyncio.open_connection(LOOPBACK, d.port)
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        async with asyncio.timeout(10):
            # Closed unanswered: an EOF, or a reset when the request was already sent.
            with contextlib.suppress(ConnectionResetError):
                assert await reader.read() == b""
        writer.close()
        reader, writer = busy.pop()
        writer.write(body)
        async with asyncio.timeout(15):
            assert parse_answer(await reader.read()).status == 404
        writer.close()
        answer = await exchange(
            d.port, b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        assert answer.status == 200
    finally:
        for _, writer in busy:
            writer.close()
    assert table.refused >= 1, table.snapshot()


# ---------------------------------------------------------------------------
# Finding 3: the daemon as a subprocess under a descriptor limit


def daemon_env() -> dict[str, str]:
    """This environment without what systemd would set."""
    skip = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "CREDENTIALS_DIRECTORY")
    return {k: v for k, v in os.environ.items() if k not in skip and k != "TICKGUARD_CONFIG"}


@dataclass(eq=False)
class Daemon:
    """`python -m tickguard run` with its stderr lines collected as they come."""

    process: asyncio.subprocess.Process
    lines: list[str] = field(default_factory=list)
    _line: asyncio.Event = field(default_factory=asyncio.Event)
    _reader: asyncio.Task[None] | None = None

    @classmethod
    async def start(cls, config: Path, nofile: int | None = None) -> Daemon:
        def limit() -> None:  # in the child, before exec
            if nofile is not None:
                resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "tickguard",
            "run",
            "--config",
            str(config),
            env=daemon_env(),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
            preexec_fn=limit,
        )
        started = cls(process)
        started._reader = asyncio.create_task(started._read())
        return started

    async def _read(self) -> None:
        assert self.process.stderr is not None
        while line := await self.process.stderr.readline():
            self.lines.append(line.decode(errors="replace").rstrip("\n"))
            self._line.set()

    async def wait_line(self, pattern: str, timeout: float, start: int = 0) -> re.Match[str]:
        """The first stderr line from index `start` on matching `pattern`."""
        async with asyncio.timeout(timeout):
            while True:
                for line in self.lines[start:]:
                    if found := re.search(pattern, line):
                        return found
                self._line.clear()
                await self._line.wait()

    def descriptors(self) -> int:
        return len(os.listdir(f"/proc/{self.process.pid}/fd"))

    async def stop(self) -> int:
        """SIGTERM; the exit code (the stderr read to its end)."""
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
        async with asyncio.timeout(20):
            code = await self.process.wait()
            if self._reader is not None:
                await self._reader
        return code

    async def kill(self) -> None:
        if self.process.returncode is None:
            self.process.kill()
            await self.process.wait()
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader


@pytest.fixture
async def daemons() -> AsyncIterator[list[Daemon]]:
    """Daemons a test appends here are killed at teardown if still running."""
    started: list[Daemon] = []
    try:
        yield started
    finally:
        for d in started:
            await d.kill()


def write_config(tmp_path: Path, feed_url: str, *, feed: str = "", extra: str = "") -> Path:
    """A config for `tickguard run` on `feed_url` (`feed`: more [feed] keys; `extra`: more tables)."""
    token = tmp_path / "token"
    token.write_text(TOKEN)
    path = tmp_path / "config.toml"
    path.write_text(
        f"""
[daemon]
state_dir = "{tmp_path / "state"}"
[http]
listen = "{LOOPBACK}:0"
token_file = "{token}"
[feed]
url = "{feed_url}"
symbols = ["BOSCHLTD"]
{feed}
ping_interval = 1.0
ping_timeout = 2.0
silence_timeout = 5.0
[feed.reconnect]
initial_delay = 0.2
max_delay = 1.0
[dns]
fallback_servers = []
[market]
always_open = true
[guard]
sweep_interval = 0.05
{extra}
"""
    )
    return path


class Flood:
    """Connections that send half a request head and then nothing, held open by this side."""

    CONNECT_TIMEOUT = 10.0  # a loopback connect waits only when nobody accept()s

    def __init__(self, port: int) -> None:
        self.port = port
        self.writers: list[asyncio.StreamWriter] = []

    async def open(self, count: int) -> None:
        """Open `count` more; AssertionError as soon as the daemon stops accepting connections."""
        for _ in range(count):
            try:
                async with asyncio.timeout(self.CONNECT_TIMEOUT):
                    _, writer = await asyncio.open_connection(LOOPBACK, self.port)
            except TimeoutError:
                raise AssertionError(
                    f"the daemon stopped accepting connections after {len(self.writers)}"
                ) from None
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
            self.writers.append(writer)

    def close(self) -> None:
        for writer in self.writers:
            writer.close()


async def until(check: Callable[[], Awaitable[bool]], timeout: float, what: str) -> None:
    """Return once `await check()` is true, asking every 50 ms; fail after `timeout` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not await check():
        if loop.time() > deadline:
            raise AssertionError(f"not within {timeout:g}s: {what}")
        await asyncio.sleep(0.05)


async def get_json(http: aiohttp.ClientSession, url: str, timeout: float = 10.0) -> tuple[int, Any]:
    async with http.get(url, timeout=aiohttp.ClientTimeout(total=timeout)) as response:
        return response.status, strict_json(await response.text())


@pytest.mark.slow
async def test_a_connection_flood_past_the_descriptor_limit_leaves_the_guard_working(
    tmp_path: Path, simulator: Any, daemons: list[Daemon]
) -> None:
    """Under RLIMIT_NOFILE 256, 500 half-open connections leave /healthz, feed, poll and a stop working, in few lines."""
    sim = await simulator(symbols=3)
    await sim.set_price("BOSCHLTD", 1000.0)
    position = """
[[positions]]
symbol = "BOSCHLTD"
side = "long"
quantity = 10
entry_price = 1000.0
stop_loss = 900.0
"""
    feed = f'fallback_url = "{sim.prices_url}"\npoll_interval = 0.2'
    config = write_config(tmp_path, sim.ws_url, feed=feed, extra=position)
    d = await Daemon.start(config, nofile=256)
    daemons.append(d)
    port = int((await d.wait_line(LISTENING_RE.pattern, STARTUP))[1])
    base = f"http://{LOOPBACK}:{port}"
    flood = Flood(port)
    most = 0  # the daemon's descriptors, sampled while the flood holds

    # A new connection per request: what must get through the flood is a new client.
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as http:

        async def answers(path: str, ok: Callable[[Any], bool] = lambda _: True) -> bool:
            nonlocal most
            most = max(most, d.descriptors())
            status, body = await get_json(http, base + path)
            return status == 200 and ok(body)

        await until(lambda: answers("/readyz"), STARTUP, "a price for BOSCHLTD")
        before = len(d.lines)
        try:
            await flood.open(300)  # more than the daemon has descriptors
            assert await answers("/healthz")

            # The feed goes down (each reconnect needs a descriptor), the poll takes over
            # (each poll may need one), and the stop is crossed while the flood holds on.
            await sim.faults("drop")
            await flood.open(100)
            crossed = time.monotonic()
            await sim.set_price("BOSCHLTD", 850.0)

            def filled(body: Any) -> bool:
                return any(e["state"] == "filled" for e in body["exits"])

            await until(lambda: answers("/api/v1/exits", filled), 30.0, "the stop acted on")
            acted = time.monotonic() - crossed
            _, body = await get_json(http, base + "/api/v1/exits")
            (done,) = body["exits"]
            assert done["symbol"] == "BOSCHLTD" and done["reason"] == "stop_loss", done

            await sim.faults("none")  # the feed reconnects through the flood
            await flood.open(100)

            def connected(body: Any) -> bool:
                return bool(body["websocket"]["connected"])

            health = "/api/v1/monitoring/connection-health"
            await until(lambda: answers(health, connected), 30.0, "the feed reconnected")
            assert await answers("/healthz")
            _, body = await get_json(http, base + health)
            connections = body["http"]
        finally:
            flood.close()
    assert await d.stop() == 0, "\n".join(d.lines[-30:])
    during = d.lines[before:]
    print(
        f"{len(flood.writers)} flood connections; the daemon held at most {most} descriptors"
        f" (limit 256); API connections {connections}; the stop acted on {acted:.2f}s after"
        f" the crossing (price_source {done['price_source']}); {len(during)} log lines:"
    )
    print("\n".join(during))
    assert connections["limit"] == 256 // 2 - http_server.BACKLOG, connections
    assert connections["connections"] <= connections["limit"] and connections["evicted"] > 0
    assert most <= 256 - 64, most  # the API kept to its half: the rest stayed free
    assert not [line for line in during if "Traceback" in line or "Too many open" in line]
    assert any("[EXIT] BOSCHLTD closed at" in line for line in during), during
    assert len(during) <= 80, during


async def test_accept_out_of_descriptors_is_one_line_not_a_traceback_each(
    tmp_path: Path, simulator: Any, daemons: list[Daemon]
) -> None:
    """With no descriptor left, failing accept()s log one line per interval, and serving resumes after."""
    sim = await simulator(symbols=3)
    d = await Daemon.start(write_config(tmp_path, sim.ws_url))
    daemons.append(d)
    port = int((await d.wait_line(LISTENING_RE.pattern, STARTUP))[1])
    base = f"http://{LOOPBACK}:{port}"
    async with aiohttp.ClientSession() as http:
        status, _ = await get_json(http, base + "/healthz")
        assert status == 200
    await d.wait_line(r"websocket|\[FEED\]|subscribed|connected", STARTUP)
    pid = d.process.pid
    original = resource.prlimit(pid, resource.RLIMIT_NOFILE)
    used = {int(fd) for fd in os.listdir(f"/proc/{pid}/fd")}
    lowest_free = next(n for n in range(len(used) + 1) if n not in used)
    before = len(d.lines)
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (lowest_free, original[1]))
    pending = []
    try:
        for _ in range(20):  # the kernel completes them; the daemon cannot accept them
            pending.append(await asyncio.open_connection(LOOPBACK, port))
        await d.wait_line(r"accept", 10.0, start=before)
        await asyncio.sleep(3.0)  # the observation window: asyncio retries every second
        during = d.lines[before:]
    finally:
        resource.prlimit(pid, resource.RLIMIT_NOFILE, original)
    try:
        async with aiohttp.ClientSession() as http:
            status, _ = await get_json(http, base + "/healthz", timeout=15.0)
            assert status == 200  # accept() resumed once descriptors were there again
    finally:
        for _, writer in pending:
            writer.close()
    assert await d.stop() == 0
    print(f"{len(during)} lines in 3 s without descriptors: {during}")
    accept_lines = [line for line in during if "accept" in line]
    assert 1 <= len(accept_lines) <= 2, during
    assert not [line for line in during if "Traceback" in line], during
    assert len(during) <= 5, during
