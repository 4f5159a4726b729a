"""The Upstox feed end to end: the real FeedSupervisor and UpstoxProtocol against a fake Upstox.

The fake (conftest.py) authorizes single-use socket URLs, speaks protobuf
FeedResponses, and serves the REST LTP quote, all on loopback port 0.
Intervals are tens of milliseconds and tests await conditions.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from typing import TYPE_CHECKING

import aiohttp
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from tickguard.errors import FeedError
from tickguard.feed.supervisor import FeedState
from tickguard.feed.upstox import authorize, decode_ltp, ltp_request

if TYPE_CHECKING:
    from conftest import (
        UpstoxFeed,
        UpstoxFeedFactory,
        UpstoxFeedServerFactory,
    )

RELIANCE = "NSE_EQ|INE002A01018"
BEL = "NSE_EQ|INE263A01024"
SYMBOLS = (RELIANCE, BEL)
TOKEN = "eyJ0-upstox-feed-secret-token-5678"  # the fake's GOOD_TOKEN
WRONG_TOKEN = "eyJ0-wrong-token-0000-feed"
TEST_TIMEOUT = 20.0
SLACK = 1.0  # seconds of scheduling latency a bound allows on a loaded machine

_RECONNECT_RE = re.compile(r"\[RECONNECT\] attempt (\d+) in ([0-9.]+)s")


async def eventually(predicate: object, timeout: float = 5.0, what: str = "") -> None:
    """Return once `predicate()` is true; fail if it is not within `timeout` seconds."""
    assert callable(predicate)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"not within {timeout:g}s: {what}")
        await asyncio.sleep(0.01)


def ticked(feed: UpstoxFeed, since: int = 0) -> set[str]:
    return {r.symbol for r in feed.received[since:]}


def reconnect_delays(caplog: pytest.LogCaptureFixture) -> list[float]:
    return [
        float(m.group(2))
        for r in caplog.records
        if (m := _RECONNECT_RE.match(r.getMessage())) is not None
    ]


async def test_live_ticks_flow_with_exchange_times(
    upstox_feed_server: UpstoxFeedServerFactory, upstox_feed: UpstoxFeedFactory
) -> None:
    """After authorize, one ltpc `sub` and the snapshot, live prices arrive with their trade times."""
    async with asyncio.timeout(TEST_TIMEOUT):
        server = await upstox_feed_server()
        started_ms = int(time.time() * 1000)
        f = await upstox_feed(server, symbols=SYMBOLS)
        await eventually(lambda: len(f.received) >= 10, what="live ticks")

        assert f.supervisor.state is FeedState.CONNECTED
        assert server.authorizations == 1 and server.handshakes == 1 and server.rejected == 0
        assert [(s.mode, s.keys) for s in server.subs] == [("ltpc", tuple(sorted(SYMBOLS)))]
        assert ticked(f) == set(SYMBOLS)
        # The first price of each key is the initial_feed snapshot's.
        first = {s: next(r.price for r in f.received if r.symbol == s) for s in SYMBOLS}
        assert first == server.snapshots[0]
        now_ms = int(time.time() * 1000)
        for r in f.received:
            assert r.exchange_ts is not None
            assert started_ms - 1000 <= r.exchange_ts <= now_ms + 1000
        assert f.metric("tickguard_ticks_total", source="live") >= 10
        assert f.bad_messages() == {}  # market_info and snapshot decoded cleanly


async def test_a_reconnect_authorizes_again_and_resubscribes(
    upstox_feed_server: UpstoxFeedServerFactory, upstox_feed: UpstoxFeedFactory
) -> None:
    """When the server drops the socket, the next connect gets a fresh code and subscribes again."""
    async with asyncio.timeout(TEST_TIMEOUT):
        server = await upstox_feed_server()
        f = await upstox_feed(server, symbols=SYMBOLS)
        await eventually(lambda: ticked(f) == set(SYMBOLS), what="first ticks")

        await server.drop_connections()
        await eventually(lambda: len(server.subs) == 2, what="a second sub")
        mark = len(f.received)
        await eventually(lambda: ticked(f, mark) == set(SYMBOLS), what="ticks after reconnecting")

        assert server.authorizations == 2
        assert server.handshakes == 2 and server.rejected == 0  # no code was tried twice
        assert server.issued[0] != server.issued[1]
        assert [s.connection for s in server.subs] == [0, 1]
        assert server.subs[1].keys == tuple(sorted(SYMBOLS))
        assert server.subs[0].guid != server.subs[1].guid
        assert f.supervisor.state is FeedState.CONNECTED
        assert f.metric("tickguard_websocket_network_errors_total", kind="closed") == 1


async def test_a_used_or_unknown_code_is_refused_at_the_handshake(
    upstox_feed_server: UpstoxFeedServerFactory,
) -> None:
    """The fake holds Upstox's single-use rule: a second connect with one URL gets HTTP 403."""
    async with asyncio.timeout(TEST_TIMEOUT):
        server = await upstox_feed_server()
        async with aiohttp.ClientSession() as session:
            url = await authorize(session, server.api_url, TOKEN, timeout=2.0)
        async with connect(url, open_timeout=2.0) as ws:
            assert isinstance(await ws.recv(), bytes)  # market_info
        for reused in (url, server.ws_url + "?requestId=x&code=never-issued"):
            with pytest.raises(InvalidStatus) as refused:
                async with connect(reused, open_timeout=2.0):
                    pass
            assert refused.value.response.status_code == 403
        assert server.rejected == 2


async def test_a_bad_token_is_auth_failed_and_not_hammered(
    upstox_feed_server: UpstoxFeedServerFactory,
    upstox_feed: UpstoxFeedFactory,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A 401 at authorize puts the feed in auth_failed and every retry waits max_delay, not initial_delay."""
    caplog.set_level(logging.INFO, logger="tickguard")
    async with asyncio.timeout(TEST_TIMEOUT):
        server = await upstox_feed_server()
        config = {
            "feed": {
                "reconnect": {
                    "initial_delay": 0.01,
                    "multiplier": 1.0,
                    "max_delay": 0.5,
                    "jitter": 0.0,
                }
            }
        }
        f = await upstox_feed(server, symbols=SYMBOLS, token=WRONG_TOKEN, config=config)
        await eventually(lambda: server.authorizations >= 1, what="an authorize")
        watched = time.monotonic()
        await asyncio.sleep(1.2)  # the behaviour under test is what does NOT happen meanwhile
        elapsed = time.monotonic() - watched

        assert f.supervisor.state is FeedState.AUTH_FAILED
        assert (
            f.supervisor.last_error
            == "handshake: authorize at 127.0.0.1 answered HTTP 401 (UDAPI100050)"
        )
        delays = reconnect_delays(caplog)
        assert delays and all(d == 0.5 for d in delays)
        # initial_delay would allow ~100 attempts in this window; max_delay allows 1 + elapsed/0.5.
        assert server.authorizations <= 2 + int(elapsed / 0.5)
        assert server.handshakes == 0  # no socket without a URL
        assert f.metric("tickguard_websocket_network_errors_total", kind="handshake") == len(delays)
        assert f.received == []


async def test_neither_the_token_nor_the_socket_codes_reach_logs_or_errors(
    upstox_feed_server: UpstoxFeedServerFactory,
    upstox_feed: UpstoxFeedFactory,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Through connects, a reconnect and refused authorizes, no log line or error text holds a secret."""
    caplog.set_level(logging.DEBUG, logger="tickguard")
    caplog.set_level(logging.INFO)
    async with asyncio.timeout(TEST_TIMEOUT):
        server = await upstox_feed_server()
        f = await upstox_feed(server, symbols=SYMBOLS)
        await eventually(lambda: ticked(f) == set(SYMBOLS), what="first ticks")
        await server.drop_connections()
        await eventually(lambda: len(server.subs) == 2, what="a second sub")
        bad = await upstox_feed(server, symbols=SYMBOLS, token=WRONG_TOKEN)
        await eventually(lambda: bad.supervisor.state is FeedState.AUTH_FAILED, what="auth_failed")
        texts = [f.supervisor.last_error, bad.supervisor.last_error]
        async with aiohttp.ClientSession() as session:
            for status in (403, 500):
                server.authorize_status = status
                with pytest.raises(FeedError) as failed:
                    await authorize(session, server.api_url, TOKEN, timeout=2.0)
                texts.append(str(failed.value))
        server.authorize_status = 200

    logged = caplog.text + "\n".join(texts)
    assert "[RECONNECT]" in logged and "[FEED] connected" in logged  # the logs were captured
    for secret in [*server.secrets(), WRONG_TOKEN]:
        assert secret not in logged


@pytest.mark.parametrize(
    ("status", "body", "kind"),
    [
        (403, b'{"status":"error","errors":[{"errorCode":"UDAPI100067"}]}', "auth"),
        (500, b"", "handshake"),
        (429, b'{"status":"error","errors":[{"errorCode":"UDAPI10005"}]}', "handshake"),
        (200, b"<html>maintenance</html>", "handshake"),
        (200, b'{"status":"success","data":{}}', "handshake"),
        (
            200,
            b'{"status":"success","data":{"authorized_redirect_uri":"https://x/?code=1"}}',
            "handshake",
        ),
        (
            200,
            b'{"status":"error","data":{"authorized_redirect_uri":"wss://x/?code=1"}}',
            "handshake",
        ),
    ],
    ids=["403", "500", "429", "html", "no-uri", "not-ws", "not-success"],
)
async def test_authorize_failures_map_to_feed_error_kinds(
    upstox_feed_server: UpstoxFeedServerFactory, status: int, body: bytes, kind: str
) -> None:
    """Refusals are `auth`, other HTTP errors and bodies without a ws(s) URL are `handshake`."""
    async with asyncio.timeout(TEST_TIMEOUT):
        server = await upstox_feed_server()
        server.authorize_status, server.authorize_body = status, body
        async with aiohttp.ClientSession() as session:
            with pytest.raises(FeedError) as failed:
                await authorize(session, server.api_url, TOKEN, timeout=2.0)
        assert failed.value.kind == kind
        assert f"HTTP {status}" in str(failed.value) or "without a ws(s) URL" in str(failed.value)
        assert TOKEN not in str(failed.value) and "code=1" not in str(failed.value)


async def test_authorize_that_cannot_reach_the_host_is_a_connect_error(
    upstox_feed_server: UpstoxFeedServerFactory,
) -> None:
    """A stalled authorize times out and a closed port is refused: both are `connect`, retried by backoff."""
    async with asyncio.timeout(TEST_TIMEOUT):
        server = await upstox_feed_server()
        server.authorize_stall = True
        async with aiohttp.ClientSession() as session:
            started = time.monotonic()
            with pytest.raises(FeedError) as stalled:
                await authorize(session, server.api_url, TOKEN, timeout=0.2)
            assert time.monotonic() - started < 0.2 + SLACK
            assert stalled.value.kind == "connect" and "within 0.2s" in stalled.value.detail

            closed = await upstox_feed_server()
            url = closed.api_url
            await closed.close()
            with pytest.raises(FeedError) as refused:
                await authorize(session, url, TOKEN, timeout=2.0)
            assert refused.value.kind == "connect"
        for failed in (stalled, refused):
            assert TOKEN not in str(failed.value) and "Bearer" not in str(failed.value)


async def test_an_unsendable_token_is_an_auth_error_without_a_request(
    upstox_feed_server: UpstoxFeedServerFactory,
) -> None:
    """An empty token or one with a line break is refused locally and never echoed."""
    async with asyncio.timeout(TEST_TIMEOUT):
        server = await upstox_feed_server()
        async with aiohttp.ClientSession() as session:
            for token in ("", "eyJ0-secret\r\nX-Injected: 1"):
                with pytest.raises(FeedError) as failed:
                    await authorize(session, server.api_url, token, timeout=2.0)
                assert failed.value.kind == "auth"
                assert "eyJ0" not in str(failed.value)
        assert server.authorizations == 0


async def test_rest_ltp_answer_decodes_by_instrument_token(
    upstox_feed_server: UpstoxFeedServerFactory,
) -> None:
    """The LTP quote from the fake, keyed by trading names, decodes into ticks for the pipe-form keys."""
    async with asyncio.timeout(TEST_TIMEOUT):
        server = await upstox_feed_server()
        server.prices[RELIANCE] = 2500.5
        url, params = ltp_request(server.api_url, [*SYMBOLS, "NSE_EQ|INE000X00001"])
        headers = {"Authorization": f"Bearer {TOKEN}", "Accept": "application/json"}
        async with aiohttp.ClientSession() as session:
            async with session.get(url, params=params, headers=headers) as response:
                assert response.status == 200
                body = await response.json()
            async with session.get(url, params=params) as response:
                assert response.status == 401
                refused = await response.json()

        assert RELIANCE not in body["data"]  # keyed by name, not by instrument key
        decoded = decode_ltp(body, set(SYMBOLS))
        assert {(t.symbol, t.price, t.exchange_ts) for t in decoded.ticks} == {
            (RELIANCE, 2500.5, None),
            (BEL, 100.0, None),
        }
        assert decoded.errors == ["unknown_symbol"]
        assert decode_ltp(refused, set(SYMBOLS)).ticks == []
        assert server.ltp_requests == 2


async def test_a_stale_socket_code_is_retried_not_auth_failed(
    upstox_feed_server: UpstoxFeedServerFactory, upstox_feed: UpstoxFeedFactory
) -> None:
    """A 403 at the socket after a good authorize is a stale code: a normal retry, not auth_failed."""
    async with asyncio.timeout(TEST_TIMEOUT):
        server = await upstox_feed_server()
        stale = f"{server.ws_url}?requestId=spent&code=spent"
        server.authorize_body = (
            b'{"status":"success","data":{"authorized_redirect_uri":"' + stale.encode() + b'"}}'
        )
        config = {"feed": {"reconnect": {"initial_delay": 0.01, "max_delay": 5.0, "jitter": 0.0}}}
        f = await upstox_feed(server, symbols=SYMBOLS, config=config)
        await eventually(lambda: server.rejected >= 2, what="two refused sockets")
        assert f.supervisor.state is not FeedState.AUTH_FAILED
        assert f.supervisor.streak() < 5  # retried on the 10 ms schedule, not max_delay
        server.authorize_body = None  # fresh codes again
        await eventually(lambda: f.supervisor.connected, what="connected with a fresh code")
