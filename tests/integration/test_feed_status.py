"""What the feed's parts say about themselves (`status()`), after real failures on real servers.

The feed supervisor, the resolver chain and the fallback poll each give a
frozen value (tickguard.status) that the API, the systemd STATUS line and the
metrics read instead of the live objects. Its counts are the supervisor's own,
and must equal what Prometheus has (read back here, in tests only). Servers are
real and on loopback port 0; tests await conditions instead of sleeping.
"""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry

from tickguard.config import parse_config
from tickguard.core.prices import PriceBook, PriceSource
from tickguard.errors import FeedError
from tickguard.feed.dns import ResolverChain
from tickguard.feed.json_protocol import JsonProtocol
from tickguard.feed.supervisor import FeedSupervisor
from tickguard.metrics import NETWORK_ERROR_KINDS, Metrics
from tickguard.status import DnsStatus, FeedStatus, PollStatus

if TYPE_CHECKING:
    from conftest import DnsServerFactory, Eventually, FeedFactory, FeedServer, FeedServerFactory
    from websockets.asyncio.server import ServerConnection

LIVE, POLL = PriceSource.LIVE, PriceSource.POLL
SUBSCRIBED = {"BOSCHLTD", "ADANIENT"}  # the feed fixture's default symbols
HOST = "feed.tickguard.test"  # a made-up name only our DNS servers know
RECORDS = {HOST: "127.0.0.1"}
LOOPBACK = "127.0.0.1"
TEST_TIMEOUT = 25.0  # no test runs longer than this
RECONNECTS = "tickguard_websocket_reconnect_attempts_total"
NETWORK_ERRORS = "tickguard_websocket_network_errors"


def network_errors_in(registry: CollectorRegistry) -> dict[str, float]:
    """Every kind's tickguard_websocket_network_errors_total, also kinds not in the known list."""
    return {
        sample.labels["kind"]: sample.value
        for family in registry.collect()
        if family.name == NETWORK_ERRORS
        for sample in family.samples
        if sample.name == f"{NETWORK_ERRORS}_total"
    }


async def test_feed_status_counts_equal_prometheus_after_real_failures(
    feed_server: FeedServerFactory, feed: FeedFactory, eventually: Eventually
) -> None:
    """Closed connections and an oversized frame: the status counts each failure once, as the
    counters do, and reports the connection that finally held."""

    async def script(
        server: FeedServer, ws: ServerConnection, index: int, symbols: list[str]
    ) -> None:
        if index == 0:
            await ws.close(1011, "first")
        elif index == 1:
            await ws.send(json.dumps({"type": "heartbeat", "pad": "x" * (1 << 20)}))
            await ws.wait_closed()
        elif index == 2:
            await ws.close(1001, "third")
        else:
            await server.stream_ticks(ws, index, symbols)

    async with asyncio.timeout(TEST_TIMEOUT):
        server = await feed_server(script)
        f = await feed(server.url())
        await eventually(
            lambda: len(f.failures) == 3 and f.symbols_since(0, LIVE) >= SUBSCRIBED,
            10.0,
            what="three failures, then live ticks",
        )
        sup = f.supervisor
        held = sup.status()

        by_kind = network_errors_in(f.registry)
        assert {k: v for k, v in by_kind.items() if v} == {"closed": 2, "protocol": 1}
        assert set(by_kind) == set(NETWORK_ERROR_KINDS)
        assert held.network_errors == sum(by_kind.values()) == 3
        assert held.reconnect_attempts == f.metric(RECONNECTS) == 3
        assert [x.kind for x in f.failures] == ["closed", "protocol", "closed"]
        assert held == FeedStatus(
            state="connected",
            connected=True,
            subscribed=len(SUBSCRIBED),
            reconnect_attempts=3,
            network_errors=3,
            streak=3,  # the connection has not lived stable_after (30 s) yet
            last_error="closed: closed with code 1001 third",
            address=LOOPBACK,
            last_frame_at=sup.last_frame_at,
            connected_since=sup.connected_since,
            fallback_active=False,
        )
        assert held.connected_since is not None and held.last_frame_at is not None
        assert held.last_frame_at >= held.connected_since

        await server.close()  # stop listening, close the connection: every attempt now fails
        await eventually(lambda: len(f.failures) >= 5, 10.0, what="two more failures")
        down = sup.status()
        by_kind = network_errors_in(f.registry)
        assert down.network_errors == sum(by_kind.values()) == len(f.failures)
        assert down.reconnect_attempts == f.metric(RECONNECTS) == len(f.failures)
        assert by_kind["connect"] == len(f.failures) - 4  # the close itself is one more "closed"
        assert not down.connected and down.state in ("backoff", "connecting")
        assert down.fallback_active and down.connected_since is None
        assert down.last_error.startswith("connect: ")
        assert held.connected and held.reconnect_attempts == 3  # a copy: it did not move


def supervisor_for(url: str, symbols: Callable[[], set[str]]) -> FeedSupervisor:
    """A supervisor of `url` with test-sized intervals, subscribing what `symbols` returns."""
    config = parse_config(
        {
            "feed": {
                "url": url,
                "ping_interval": 0.1,
                "silence_timeout": 10.0,
                "reconnect": {"initial_delay": 0.05, "max_delay": 0.2, "stable_after": 30.0},
            },
            # Never the public defaults: no packet may leave this machine.
            "dns": {"servers": [], "fallback_servers": []},
            "market": {"always_open": True},
        },
        env={},
    )
    metrics = Metrics(CollectorRegistry())
    return FeedSupervisor(
        config.feed,
        protocol=JsonProtocol(),
        resolver=ResolverChain(config.dns, None, metrics),
        book=PriceBook(config.prices.stale_warning, config.prices.cache_timeout),
        metrics=metrics,
        symbols=symbols,
        on_prices=lambda symbols, source: None,
        market_open=lambda: True,
        rng=random.Random(3),
    )


async def test_feed_status_subscribed_is_the_open_connections_set_and_while_down_the_next(
    feed_server: FeedServerFactory, eventually: Eventually
) -> None:
    """Connected: the instruments subscribed on the open connection, not those wanted since.
    Down: the instruments the next connection will subscribe."""
    wanted = {"BOSCHLTD", "ADANIENT"}
    async with asyncio.timeout(TEST_TIMEOUT):
        server = await feed_server()
        sup = supervisor_for(server.url(), lambda: wanted)
        assert sup.status().subscribed == 2  # not started: what it will subscribe
        task = asyncio.create_task(sup.run(), name="feed supervisor")
        try:
            await eventually(lambda: sup.connected, what="connected")
            assert sup.status().subscribed == 2
            wanted.add("INFY")  # guarded since: subscribe_more was not called
            connected = sup.status()
            assert connected.connected and connected.subscribed == 2
            assert server.subscriptions == [sorted({"BOSCHLTD", "ADANIENT"})]

            await server.close()
            await eventually(lambda: sup.reconnect_attempts >= 2, what="down, failing")
            down = sup.status()
            assert not down.connected and down.subscribed == 3
            assert down.reconnect_attempts >= 2 and down.network_errors >= 2
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


PollAnswer = Callable[[web.Request], Awaitable[web.StreamResponse]]  # conftest's poll_server


async def test_poll_status_follows_real_failures_successes_and_the_stop(
    feed_server: FeedServerFactory,
    poll_server: Callable[[PollAnswer], Awaitable[str]],
    feed: FeedFactory,
    eventually: Eventually,
) -> None:
    """A failing poll says why; a success clears it and is timed; live prices stop the poll."""
    failing = True
    live = asyncio.Event()

    async def prices(request: web.Request) -> web.Response:
        if failing:
            return web.json_response({"error": "down"}, status=503)
        return web.json_response(
            {"prices": {"BOSCHLTD": {"price": 101.0}, "ADANIENT": {"price": 202.0}}}
        )

    async def script(
        server: FeedServer, ws: ServerConnection, index: int, symbols: list[str]
    ) -> None:
        await live.wait()  # connected, but no price yet: the poll stands in
        await server.stream_ticks(ws, index, symbols)

    async with asyncio.timeout(TEST_TIMEOUT):
        server = await feed_server(script)
        url = await poll_server(prices)
        f = await feed(
            server.url(),
            config={"feed": {"fallback_url": url, "poll_interval": 0.05}},
            poll=True,
        )
        poller = f.poller
        assert poller is not None
        await eventually(lambda: poller.last_error, what="a failed poll")
        failed = poller.status()
        assert failed == PollStatus(
            polling=True, last_success_at=None, last_error=poller.last_error
        )
        assert "503" in failed.last_error

        failing = False
        await eventually(lambda: f.symbols_since(0, POLL) >= SUBSCRIBED, what="polled prices")
        ok = poller.status()
        assert ok == PollStatus(polling=True, last_success_at=poller.last_success, last_error="")
        assert ok.last_success_at is not None

        failing = True
        await eventually(lambda: poller.last_error, what="the poll failing again")
        again = poller.status()
        assert again.polling and "503" in again.last_error
        assert again.last_success_at is not None and again.last_success_at >= ok.last_success_at
        assert ok.last_error == ""  # a copy: it did not move

        live.set()
        await eventually(lambda: not poller.polling, what="the poll stopped by live prices")
        stopped = poller.status()
        assert stopped == PollStatus(
            polling=False, last_success_at=poller.last_success, last_error=poller.last_error
        )
        assert not f.supervisor.status().fallback_active


async def test_dns_status_follows_the_chain_through_real_resolver_failures(
    dns_server: DnsServerFactory,
) -> None:
    """Primary, then fallback once the primary is dead, then nothing: the status names the
    stage and server of the last answer and why the latest lookup failed."""
    async with asyncio.timeout(TEST_TIMEOUT):
        primary = await dns_server(RECORDS)
        fallback = await dns_server(RECORDS, host="127.0.0.2")
        config = parse_config(
            {
                "feed": {"url": f"ws://{HOST}:8080/ws"},
                "dns": {
                    "servers": [primary.nameserver],
                    "fallback_servers": [fallback.nameserver],
                    "timeout": 0.3,
                },
            },
            env={},
        )
        chain = ResolverChain(config.dns, None, Metrics(CollectorRegistry()))
        assert chain.status() == DnsStatus(
            primary_failed=False, last_stage=None, resolved_via=None, last_error=""
        )

        await chain.resolve(HOST, 8080)
        by_primary = DnsStatus(False, "primary", f"resolver {primary.nameserver}", "")
        assert chain.status() == by_primary

        primary.dead = True
        await chain.resolve(HOST, 8080)
        by_fallback = chain.status()
        assert (by_fallback.primary_failed, by_fallback.last_stage, by_fallback.resolved_via) == (
            True,
            "fallback",
            fallback.nameserver,
        )
        why = f"resolver {primary.nameserver} failed for {HOST}: timed out"
        assert by_fallback.last_error.startswith(why), by_fallback.last_error

        fallback.dead = True
        with pytest.raises(FeedError):
            await chain.resolve(HOST, 8080)  # no store: no last-known-good address
        failed = chain.status()
        assert failed == DnsStatus(True, "fallback", fallback.nameserver, chain.last_error)
        assert failed.last_error.startswith(f"fallback resolvers failed for {HOST}")

        primary.dead = False
        await chain.resolve(HOST, 8080, health_check=True)
        assert chain.status() == by_primary
        assert by_fallback.primary_failed and failed.last_stage == "fallback"  # copies
