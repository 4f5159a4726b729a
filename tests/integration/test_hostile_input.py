"""Hostile numbers and bodies from the feed and the REST poll: counted and dropped, never a crash.

A 400-digit integer is valid JSON; `float()` of it raises OverflowError. Sent
as a price or a timestamp on every connection or in every poll answer, it used
to crash the feed or poll task until the daemon gave up (issue 9, finding 1).
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import pytest
from aiohttp import web

from tickguard.core.prices import PriceSource
from tickguard.replies import MAX_REPLY_BYTES

if TYPE_CHECKING:
    from tests.integration.conftest import (
        Eventually,
        FeedFactory,
        FeedServer,
        FeedServerFactory,
    )
    from websockets.asyncio.server import ServerConnection

HUGE = "9" * 400
TEST_TIMEOUT = 30.0
LOOPBACK = "127.0.0.1"


def dead_url() -> str:
    """A ws:// URL on a loopback port nothing listens on."""
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        port = s.getsockname()[1]
    return f"ws://{LOOPBACK}:{port}/ws"


async def test_oversized_numbers_on_the_feed_are_counted_and_the_socket_stays(
    feed_server: FeedServerFactory, feed: FeedFactory, eventually: Eventually
) -> None:
    """A price or timestamp of 400 digits, or 1e308, is dropped and counted; the good tick counts."""

    async def hostile(
        server: FeedServer, ws: ServerConnection, index: int, symbols: list[str]
    ) -> None:
        while True:
            await ws.send(f'{{"type": "tick", "symbol": "BOSCHLTD", "price": {HUGE}}}')
            await ws.send(f'{{"type": "tick", "symbol": "BOSCHLTD", "price": 1.0, "ts": {HUGE}}}')
            await ws.send(f'{{"type": "tick", "symbol": "BOSCHLTD", "price": -{HUGE}}}')
            await ws.send('{"type": "tick", "symbol": "BOSCHLTD", "price": 1e308}')
            await ws.send('{"type": "tick", "symbol": "BOSCHLTD", "price": %s}' % ("9" * 5000))
            await ws.send('{"type": "ticks", "ticks": [{"symbol": "ADANIENT", "price": 575.0}]}')
            await asyncio.sleep(0.02)

    async with asyncio.timeout(TEST_TIMEOUT):
        server = await feed_server(hostile)
        f = await feed(server.url())
        await eventually(
            lambda: (
                f.metric("tickguard_feed_bad_messages_total", reason="bad_price") >= 30
                and f.metric("tickguard_feed_bad_messages_total", reason="bad_timestamp") >= 10
                and f.metric("tickguard_feed_bad_messages_total", reason="not_json") >= 10
            ),
            timeout=TEST_TIMEOUT,
            what="hostile entries counted",
        )
        f.assert_running()
        assert len(server.connections) == 1 and f.supervisor.connected
        assert f.failures == []
        price = f.book.get("ADANIENT")
        assert price is not None and price.value == 575.0
        assert f.book.get("BOSCHLTD") is None


PollAnswer = Callable[[web.Request], Awaitable[web.StreamResponse]]  # conftest's poll_server


async def test_oversized_numbers_in_the_poll_are_counted_and_the_poll_goes_on(
    poll_server: Callable[[PollAnswer], Awaitable[str]], feed: FeedFactory, eventually: Eventually
) -> None:
    """A poll answer with 400-digit prices and timestamps counts them and keeps the good price."""
    answers = 0

    async def hostile(request: web.Request) -> web.Response:
        nonlocal answers
        answers += 1
        body = (
            f'{{"prices": {{"BOSCHLTD": {{"price": {HUGE}}}, "ADANIENT": {{"price": 575.0, "ts": {HUGE}}},'
            ' "INFY": {"price": 1500.5, "ts": 1767765256123}}}'
        )
        return web.Response(text=body, content_type="application/json")

    async with asyncio.timeout(TEST_TIMEOUT):
        url = await poll_server(hostile)
        f = await feed(
            dead_url(),
            symbols=("BOSCHLTD", "ADANIENT", "INFY"),
            config={"feed": {"fallback_url": url, "poll_interval": 0.05}},
            poll=True,
        )
        await eventually(lambda: answers >= 5, timeout=TEST_TIMEOUT, what="five poll answers")
        await eventually(
            lambda: (
                f.metric("tickguard_feed_bad_messages_total", reason="bad_price") >= 4
                and f.metric("tickguard_feed_bad_messages_total", reason="bad_timestamp") >= 4
            ),
            what="hostile entries counted",
        )
        f.assert_running()
        assert f.symbols_since(0, PriceSource.POLL) == {"INFY"}
        assert f.poller is not None and f.poller.last_error == ""


@pytest.mark.parametrize(
    "body",
    [
        "[" * 100_000 + "]" * 100_000,  # deeper than the parser's recursion limit
        '{"prices": {"INFY": {"price": %s}}}' % ("9" * 5000),  # over the int-digits limit
        " " * (MAX_REPLY_BYTES + 1),  # over the size bound
    ],
    ids=["deep", "digits", "huge"],
)
async def test_a_hostile_poll_body_is_a_failed_poll(
    poll_server: Callable[[PollAnswer], Awaitable[str]],
    feed: FeedFactory,
    eventually: Eventually,
    body: str,
) -> None:
    """A poll answer too deep, with too many digits or too large is one failed poll; polling goes on."""
    answers = 0

    async def hostile(request: web.Request) -> web.Response:
        nonlocal answers
        answers += 1
        return web.Response(text=body, content_type="application/json")

    async with asyncio.timeout(TEST_TIMEOUT):
        url = await poll_server(hostile)
        f = await feed(
            dead_url(), symbols=("INFY",), config={"feed": {"fallback_url": url}}, poll=True
        )
        await eventually(lambda: answers >= 3, timeout=TEST_TIMEOUT, what="three poll answers")
        f.assert_running()
        assert f.poller is not None and f.poller.last_error
        assert len(f.poller.last_error) < 300
        assert f.since(0, PriceSource.POLL) == []
