"""The feed under real failures: kills, flapping servers, zombies, black holes, DNS, TLS, junk.

Every server is real and on loopback port 0 (the simulator subprocess, UDP DNS
servers, a TCP proxy, websockets servers); intervals are tens of milliseconds,
and tests await conditions instead of sleeping. Measured times are printed
(`pytest -s`). Bounds allow SLACK for a loaded 2-core machine.
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import trustme
from aiohttp import web
from websockets.asyncio.server import ServerConnection

from tickguard.config import ReconnectConfig
from tickguard.core.prices import PriceSource
from tickguard.feed.supervisor import FeedState
from tickguard.store import Store

if TYPE_CHECKING:
    from conftest import (
        DnsServerFactory,
        Eventually,
        FeedFactory,
        FeedServer,
        FeedServerFactory,
        SimulatorFactory,
        TcpProxyFactory,
    )

LIVE, POLL = PriceSource.LIVE, PriceSource.POLL
SUBSCRIBED = {"BOSCHLTD", "ADANIENT"}  # the feed fixture's default symbols
HOST = "feed.tickguard.test"  # a made-up name only our DNS servers know
RECORDS = {HOST: "127.0.0.1"}
SLACK = 1.0  # seconds of scheduling latency a bound allows on a loaded machine
TEST_TIMEOUT = 25.0  # no test runs longer than this


def most_connections(policy: ReconnectConfig, elapsed: float) -> int:
    """The most connection attempts the backoff allows in `elapsed` seconds from the first.

    Attempt n+1 comes at least sum(min_delay(1..n)) after the first, where
    min_delay(i) = min(max_delay, initial_delay * multiplier**(i-1)) * (1 - jitter).
    """
    attempts, earliest = 1, 0.0
    while True:
        base = min(policy.max_delay, policy.initial_delay * policy.multiplier ** (attempts - 1))
        earliest += base * (1 - policy.jitter)
        if earliest > elapsed:
            return attempts
        attempts += 1


def dns_config(primary: str, fallback: str, timeout: float) -> dict[str, Any]:
    return {"dns": {"servers": [primary], "fallback_servers": [fallback], "timeout": timeout}}


async def test_killed_and_restarted_server_is_reconnected_and_resubscribed(
    simulator: SimulatorFactory, feed: FeedFactory, eventually: Eventually
) -> None:
    """After the server process is killed and restarted, the feed reconnects and the subscribed symbols tick again."""
    async with asyncio.timeout(TEST_TIMEOUT):
        sim = await simulator()
        f = await feed(sim.ws_url)
        await eventually(lambda: f.symbols_since(0, LIVE) >= SUBSCRIBED, what="first live ticks")

        await sim.kill()
        await eventually(lambda: f.failures, what="the kill noticed")
        assert f.failures[0].kind == "closed"
        assert not f.supervisor.connected
        mark = f.mark()
        await sim.restart()
        restarted = time.monotonic()
        await eventually(
            lambda: f.symbols_since(mark, LIVE) >= SUBSCRIBED, what="ticks after the restart"
        )
        recovered = time.monotonic() - restarted

        reconnect = f.config.feed.reconnect
        bound = reconnect.max_delay * (1 + reconnect.jitter) + SLACK
        print(f"\nrestart -> subscribed ticks again: {recovered:.3f}s (bound {bound:.2f}s)")
        assert f.supervisor.connected
        assert f.metric("tickguard_websocket_connected") == 1
        assert await sim.connections_total() == 1  # one new connection, subscribed again
        assert recovered <= bound


async def test_accept_then_close_server_is_not_hammered(
    simulator: SimulatorFactory, feed: FeedFactory, eventually: Eventually
) -> None:
    """A server that accepts and closes at once gets no more connections than the backoff schedule allows."""
    async with asyncio.timeout(TEST_TIMEOUT):
        sim = await simulator()
        await sim.faults("drop")
        f = await feed(sim.ws_url)
        await eventually(lambda: len(f.failures) >= 8, 10.0, what="eight dropped connections")
        count = await sim.connections_total()
        elapsed = time.monotonic() - f.started_at

        bound = most_connections(f.config.feed.reconnect, elapsed)
        print(f"\ndrop: {count} connections in {elapsed:.2f}s, the backoff allows at most {bound}")
        assert {x.kind for x in f.failures} == {"closed"}
        assert len(f.failures) <= count <= bound
        delays = [x.delay for x in f.failures]
        assert delays[-1] > delays[0]  # the streak kept growing across accepted connections


async def test_zombie_connection_is_detected_by_silence(
    simulator: SimulatorFactory, feed: FeedFactory, eventually: Eventually
) -> None:
    """A connection that answers pings but carries no data fails as `silence` once silence_timeout has passed, and not before."""
    silence = 1.2  # large against SLACK, so detecting at twice the timeout fails
    async with asyncio.timeout(TEST_TIMEOUT):
        sim = await simulator()
        f = await feed(sim.ws_url, config={"feed": {"silence_timeout": silence}})
        await eventually(lambda: f.symbols_since(0, LIVE) >= SUBSCRIBED, what="live ticks")

        await sim.faults("silence")
        faulted = time.monotonic()
        await eventually(lambda: f.failures, 5.0, what="the silence noticed")

        failure = f.failures[0]
        assert failure.last_frame_at is not None
        quiet = failure.at - failure.last_frame_at
        detected = failure.at - faulted
        print(
            f"\nsilence: detected {quiet:.3f}s after the last frame, {detected:.3f}s after the fault"
        )
        assert failure.kind == "silence"
        assert f.metric("tickguard_websocket_network_errors_total", kind="silence") >= 1
        assert f.metric("tickguard_websocket_network_errors_total", kind="ping_timeout") == 0
        assert quiet >= silence
        # The receiver's timer is set to the silence deadline itself: no extra check interval.
        assert detected <= silence + SLACK


async def test_a_zombies_prices_age_from_its_last_data_frame_not_its_pongs(
    simulator: SimulatorFactory, feed: FeedFactory, eventually: Eventually
) -> None:
    """On a socket that answers pings but carries no data, ages run from the last data frame."""
    silence = 1.2
    async with asyncio.timeout(TEST_TIMEOUT):
        sim = await simulator()
        f = await feed(
            sim.ws_url, config={"feed": {"silence_timeout": silence, "ping_interval": 0.05}}
        )
        await eventually(lambda: f.symbols_since(0, LIVE) >= SUBSCRIBED, what="live ticks")
        await sim.faults("silence")  # the simulator keeps answering our pings
        await eventually(lambda: f.failures, 5.0, what="the silence noticed")
        failure = f.failures[0]
        assert failure.kind == "silence" and failure.last_frame_at is not None
        now = time.monotonic()
        for symbol in SUBSCRIBED:
            quote = f.book.quote(symbol, now)
            # Pongs arrived every 50 ms until the end: an age from them would be ~0.05 s.
            assert quote.source is PriceSource.CACHE
            assert quote.age >= now - failure.last_frame_at - 0.001, (symbol, quote.age)
            assert quote.age >= silence


async def test_black_hole_is_detected_by_ping_timeout(
    simulator: SimulatorFactory,
    tcp_proxy: TcpProxyFactory,
    feed: FeedFactory,
    eventually: Eventually,
) -> None:
    """A path that stops carrying bytes both ways fails as `ping_timeout` within ping_interval + ping_timeout, and recovers when it heals."""
    ping_interval, ping_timeout = 0.2, 0.6
    async with asyncio.timeout(TEST_TIMEOUT):
        sim = await simulator()
        proxy = await tcp_proxy("127.0.0.1", sim.port)
        f = await feed(
            f"ws://127.0.0.1:{proxy.port}/ws",
            config={
                "feed": {
                    "ping_interval": ping_interval,
                    "ping_timeout": ping_timeout,
                    "silence_timeout": 5.0,  # far later: only the keepalive can notice in time
                }
            },
        )
        await eventually(lambda: f.symbols_since(0, LIVE) >= SUBSCRIBED, what="live ticks")

        proxy.blackhole()
        cut = time.monotonic()
        await eventually(lambda: f.failures, 5.0, what="the black hole noticed")
        failure = f.failures[0]
        detected = failure.at - cut

        mark = f.mark()
        proxy.restore()
        restored = time.monotonic()
        await eventually(lambda: f.symbols_since(mark, LIVE) >= SUBSCRIBED, what="ticks again")
        recovered = time.monotonic() - restored

        print(
            f"\nblack hole: ping_timeout after {detected:.3f}s; healed path ticks after {recovered:.3f}s"
        )
        assert failure.kind == "ping_timeout"
        assert f.metric("tickguard_websocket_network_errors_total", kind="ping_timeout") >= 1
        # A ping is sent before the pong can be missed: never sooner than ping_timeout
        # (less the round trip of a ping that crossed just before the cut).
        assert ping_timeout - 0.2 <= detected <= ping_interval + ping_timeout + SLACK
        assert proxy.connections >= 2


async def test_dead_primary_dns_falls_back(
    simulator: SimulatorFactory,
    dns_server: DnsServerFactory,
    feed: FeedFactory,
    eventually: Eventually,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """With the primary resolver dead the feed host resolves through the fallback resolver, counted and logged."""
    caplog.set_level(logging.WARNING, logger="tickguard.feed.dns")
    async with asyncio.timeout(TEST_TIMEOUT):
        sim = await simulator()
        dead = await dns_server(RECORDS, dead=True)
        live = await dns_server(RECORDS, host="127.0.0.2")
        f = await feed(
            f"ws://{HOST}:{sim.port}/ws",
            config=dns_config(dead.nameserver, live.nameserver, 0.5),
        )
        await eventually(lambda: f.symbols_since(0, LIVE) >= SUBSCRIBED, what="live ticks")

        assert not f.failures  # the first attempt connected
        assert f.supervisor.address == "127.0.0.1"
        assert f.resolver.last is not None
        assert (f.resolver.last.stage, f.resolver.last.via) == ("fallback", live.nameserver)
        assert dead.queries >= 1
        assert live.queries >= 1
        assert f.metric("tickguard_dns_fallbacks_total") == 1
        lookups = "tickguard_dns_lookups_total"
        assert f.metric(lookups, resolver="primary", outcome="fail") == 1
        assert f.metric(lookups, resolver="fallback", outcome="ok") == 1
        lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("[DNS]")]
        assert any(HOST in line and f"resolved via {live.nameserver}" in line for line in lines), (
            lines
        )


async def test_all_dns_dead_uses_last_known_good_also_after_restart(
    simulator: SimulatorFactory,
    dns_server: DnsServerFactory,
    feed: FeedFactory,
    eventually: Eventually,
    tmp_path: Path,
) -> None:
    """Once every resolver is dead the feed connects to the last-known-good address, also from a fresh resolver chain and store on the same state dir."""
    state = tmp_path / "state"
    async with asyncio.timeout(TEST_TIMEOUT):
        sim = await simulator()
        primary = await dns_server(RECORDS)
        fallback = await dns_server(RECORDS, host="127.0.0.2", dead=True)
        url = f"ws://{HOST}:{sim.port}/ws"
        config = dns_config(primary.nameserver, fallback.nameserver, 0.3)
        lookups = "tickguard_dns_lookups_total"

        store = Store.in_dir(state)
        try:
            first = await feed(url, config=config, store=store)
            await eventually(lambda: first.symbols_since(0, LIVE) >= SUBSCRIBED, what="ticks")
            assert first.metric(lookups, resolver="primary", outcome="ok") == 1
            assert store.known_addresses(HOST) is not None

            primary.dead = True
            await sim.faults("drop")
            await eventually(lambda: first.failures, what="the drop noticed")
            mark = first.mark()
            await sim.faults("none")
            await eventually(
                lambda: first.symbols_since(mark, LIVE) >= SUBSCRIBED, 10.0, what="ticks again"
            )
            assert first.resolver.last is not None
            assert first.resolver.last.stage == "last_known_good"
            assert first.metric(lookups, resolver="primary", outcome="fail") >= 1
            assert first.metric(lookups, resolver="fallback", outcome="fail") >= 1
            assert first.metric(lookups, resolver="last_known_good", outcome="ok") >= 1
            assert first.metric("tickguard_dns_fallbacks_total") >= 1
            await first.stop()
        finally:
            store.close()

        store = Store.in_dir(state)  # the daemon restarted: new store, new chain, DNS still dead
        try:
            second = await feed(url, config=config, store=store)
            await eventually(lambda: second.symbols_since(0, LIVE) >= SUBSCRIBED, what="ticks")
            assert second.supervisor.address == "127.0.0.1"
            assert second.resolver.last is not None
            assert second.resolver.last.stage == "last_known_good"
            assert second.metric(lookups, resolver="primary", outcome="fail") == 1
            assert second.metric(lookups, resolver="fallback", outcome="fail") == 1
            assert second.metric(lookups, resolver="last_known_good", outcome="ok") == 1
            assert second.metric("tickguard_dns_fallbacks_total") == 1
            await second.stop()
        finally:
            store.close()


async def test_tls_via_fallback_resolved_address_verifies_the_host_name(
    feed_server: FeedServerFactory,
    dns_server: DnsServerFactory,
    feed: FeedFactory,
    eventually: Eventually,
) -> None:
    """A wss feed reached through a fallback-resolved IP is verified against the URL's host name; a certificate for another name fails as `tls`."""
    ca = trustme.CA()

    def server_context(name: str) -> ssl.SSLContext:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ca.issue_cert(name).configure_cert(context)
        return context

    client_context = ssl.create_default_context()
    ca.configure_trust(client_context)
    sni: list[str | None] = []
    good_context = server_context(HOST)
    good_context.sni_callback = lambda _sock, name, _ctx: sni.append(name)

    async with asyncio.timeout(TEST_TIMEOUT):
        good = await feed_server(ssl_context=good_context)
        wrong = await feed_server(ssl_context=server_context("other.tickguard.test"))
        dead = await dns_server(RECORDS, dead=True)
        live = await dns_server(RECORDS, host="127.0.0.2")
        config = dns_config(dead.nameserver, live.nameserver, 0.3)

        f = await feed(good.url(HOST), config=config, ssl_context=client_context)
        await eventually(lambda: f.symbols_since(0, LIVE) >= SUBSCRIBED, what="ticks over TLS")
        assert f.supervisor.address == "127.0.0.1"
        assert f.resolver.last is not None
        assert f.resolver.last.stage == "fallback"
        assert set(sni) == {HOST}  # the TLS server name is the URL's host, not the IP
        assert set(good.hosts) == {f"{HOST}:{good.port}"}
        await f.stop()

        g = await feed(wrong.url(HOST), config=config, ssl_context=client_context)
        await eventually(lambda: g.failures, what="the wrong certificate refused")
        assert g.failures[0].kind == "tls"
        assert "certificate" in g.failures[0].detail.lower()
        assert g.metric("tickguard_websocket_network_errors_total", kind="tls") >= 1
        assert not g.supervisor.connected
        assert wrong.connections == []


# Each malformed frame with the reason it is counted under (SPEC 3).
JUNK: list[tuple[str | bytes, str]] = [
    ("not json at all", "not_json"),
    (b"\x00\xff binary junk", "binary"),
    ("[1, 2, 3]", "not_object"),
    ('{"symbol": "BOSCHLTD", "price": 1.0}', "no_type"),
    ('{"type": "tick", "price": 10.0}', "no_symbol"),
    ('{"type": "tick", "symbol": "BOSCHLTD", "price": NaN}', "bad_price"),
    ('{"type": "tick", "symbol": "BOSCHLTD", "price": Infinity}', "bad_price"),
    ('{"type": "tick", "symbol": "BOSCHLTD", "price": -Infinity}', "bad_price"),
    ('{"type": "tick", "symbol": "BOSCHLTD", "price": -5}', "bad_price"),
    ('{"type": "tick", "symbol": "BOSCHLTD", "price": 0}', "bad_price"),
    ('{"type": "tick", "symbol": "BOSCHLTD", "price": "12.5"}', "bad_price"),
    ('{"type": "tick", "symbol": "BOSCHLTD", "price": true}', "bad_price"),
    ('{"type": "tick", "symbol": "NOSUCHSYMBOL", "price": 10.0}', "unknown_symbol"),
]
BATCH = {
    "type": "ticks",
    "ticks": [
        {"symbol": "BOSCHLTD", "price": 101.0},
        {"symbol": "ADANIENT", "price": "x"},  # bad_price
        {"price": 5.0},  # no_symbol
        {"symbol": "ADANIENT", "price": 202.0},
    ],
}
SENTINEL = {"type": "tick", "symbol": "ADANIENT", "price": 303.0}


async def test_malformed_frames_are_counted_and_dropped_and_an_oversized_one_reconnects(
    feed_server: FeedServerFactory, feed: FeedFactory, eventually: Eventually
) -> None:
    """Malformed frames are dropped and counted by reason on the same connection; a frame over 1 MiB is counted as too_large and the feed reconnects."""
    send_huge = asyncio.Event()

    async def script(
        server: FeedServer, ws: ServerConnection, index: int, symbols: list[str]
    ) -> None:
        if index > 0:
            await server.stream_ticks(ws, index, symbols)
            return
        for frame, _ in JUNK:
            await ws.send(frame)
        await ws.send(json.dumps(BATCH))
        await ws.send(json.dumps(SENTINEL))
        await send_huge.wait()
        await ws.send(json.dumps({"type": "heartbeat", "pad": "x" * (1 << 20)}))

    expected = Counter(reason for _, reason in JUNK) + Counter(["bad_price", "no_symbol"])
    async with asyncio.timeout(TEST_TIMEOUT):
        server = await feed_server(script)
        f = await feed(server.url(), config={"feed": {"silence_timeout": 5.0}})
        await eventually(
            lambda: (p := f.book.get("ADANIENT")) is not None and p.value == 303.0,
            what="the frame after the junk",
        )
        counted = {
            reason: f.metric("tickguard_feed_bad_messages_total", reason=reason)
            for reason in [*expected, "too_large"]
        }
        assert counted == {**expected, "too_large": 0}
        assert f.metric("tickguard_ticks_total", source="live") == 3  # two from the batch
        assert any(e.values == {"BOSCHLTD": 101.0, "ADANIENT": 202.0} for e in f.prices)
        assert f.supervisor.connected
        assert len(server.connections) == 1
        assert not f.failures
        f.assert_running()

        mark = f.mark()
        send_huge.set()
        await eventually(lambda: f.symbols_since(mark, LIVE) >= SUBSCRIBED, what="reconnected")
        assert [x.kind for x in f.failures] == ["protocol"]
        assert f.metric("tickguard_feed_bad_messages_total", reason="too_large") == 1
        assert len(server.connections) == 2
        assert server.subscriptions[1] == sorted(SUBSCRIBED)
        f.assert_running()


async def test_the_first_connect_is_not_logged_as_a_fallback(
    simulator: SimulatorFactory,
    feed: FeedFactory,
    eventually: Eventually,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Before any outage the log says connecting, never [FALLBACK]; a real drop says [FALLBACK]."""
    caplog.set_level(logging.INFO, "tickguard")
    async with asyncio.timeout(TEST_TIMEOUT):
        sim = await simulator()
        f = await feed(
            sim.ws_url, config={"feed": {"fallback_url": sim.prices_url}}, poll=True
        )
        poller = f.poller
        assert poller is not None
        await eventually(
            lambda: f.symbols_since(0, LIVE) >= SUBSCRIBED and not poller.polling,
            what="live prices, the start-up poll stopped",
        )
        start = [r.getMessage() for r in caplog.records]
        assert not [m for m in start if "[FALLBACK]" in m], start
        assert any("[FEED] live prices arriving" in m for m in start), start

        await sim.faults("drop")
        await eventually(lambda: poller.polling, what="the poll after the drop")
        later = [r.getMessage() for r in caplog.records][len(start):]
        assert any(m.startswith("[FALLBACK]") for m in later), later


async def test_poll_runs_while_the_socket_is_down_and_stops_when_live_data_is_back(
    simulator: SimulatorFactory, feed: FeedFactory, eventually: Eventually
) -> None:
    """With the socket down, polled prices tagged `poll` arrive within poll_interval; once live prices are back the poll stops."""
    poll_interval = 0.2
    async with asyncio.timeout(TEST_TIMEOUT):
        sim = await simulator()
        f = await feed(
            sim.ws_url,
            config={"feed": {"fallback_url": sim.prices_url, "poll_interval": poll_interval}},
            poll=True,
        )
        poller = f.poller
        assert poller is not None
        await eventually(
            lambda: (
                f.symbols_since(0, LIVE) >= SUBSCRIBED
                and not f.supervisor.fallback_active
                and not poller.polling
            ),
            what="live ticks and no poll",
        )

        await sim.faults("drop")
        await eventually(lambda: f.failures, what="the drop noticed")
        down = f.failures[0].at
        await eventually(lambda: any(e.at >= down for e in f.since(0, POLL)), what="polled prices")
        first_poll = next(e.at for e in f.since(0, POLL) if e.at >= down) - down
        assert poller.polling
        assert f.metric("tickguard_fallback_active") == 1
        await sim.set_price("BOSCHLTD", 575.0)
        pinned = time.monotonic()
        await eventually(
            lambda: any(e.values.get("BOSCHLTD") == 575.0 for e in f.since(0, POLL)),
            what="the pinned price polled",
        )
        pinned_seen = time.monotonic() - pinned
        quote = f.book.get("BOSCHLTD")
        assert quote is not None
        assert quote.source is POLL

        await sim.faults("none")
        await eventually(
            lambda: not f.supervisor.fallback_active and not poller.polling,
            what="the poll stopped",
        )
        stopped = time.monotonic()
        polls = f.metric("tickguard_ticks_total", source="poll")
        mark = f.mark()
        await eventually(
            lambda: any(e.at >= stopped + 3 * poll_interval for e in f.since(mark, LIVE)),
            what="live ticks over three poll intervals",
        )

        print(
            f"\npoll: first polled prices {first_poll:.3f}s after the socket went down,"
            f" a pinned price polled after {pinned_seen:.3f}s"
        )
        assert first_poll <= poll_interval + SLACK
        assert pinned_seen <= poll_interval + SLACK
        assert f.since(mark, POLL) == []
        assert f.metric("tickguard_ticks_total", source="poll") == polls
        assert f.metric("tickguard_fallback_active") == 0


async def test_a_drop_while_the_poll_waits_out_its_interval_is_polled_at_once(
    feed_server: FeedServerFactory,
    poll_server: Callable[..., Awaitable[str]],
    feed: FeedFactory,
    eventually: Eventually,
) -> None:
    """A socket drop while the poll waits out its interval (an hour here) is polled at once, and the poll then keeps its interval while the outage lasts."""
    polls: list[float] = []
    dropped = asyncio.Event()

    async def prices(request: web.Request) -> web.Response:
        polls.append(time.monotonic())
        symbols = request.query.get("symbols", "").split(",")
        return web.json_response({"prices": {s: {"price": 100.0} for s in symbols if s}})

    async def script(
        server: FeedServer, ws: ServerConnection, index: int, symbols: list[str]
    ) -> None:
        if index > 0:  # subscribed, then closed: no live price, the outage lasts
            await ws.close()
            return
        ticking = asyncio.create_task(server.stream_ticks(ws, index, symbols))
        try:
            await dropped.wait()
        finally:
            ticking.cancel()
        ws.transport.abort()

    async with asyncio.timeout(TEST_TIMEOUT):
        url = await poll_server(prices)
        server = await feed_server(script)
        f = await feed(
            server.url(), config={"feed": {"fallback_url": url, "poll_interval": 3600.0}}, poll=True
        )
        # The start-up poll went out before or while live prices arrived: the poll now
        # waits out its hour (or, fixed, waits for the fallback to start again).
        await eventually(
            lambda: f.symbols_since(0, LIVE) >= SUBSCRIBED and not f.supervisor.fallback_active,
            what="live prices",
        )
        before = len(polls)
        mark = f.mark()
        dropped.set()
        await eventually(lambda: len(polls) > before, 10.0, what="a poll after the drop")
        await eventually(lambda: f.symbols_since(mark, POLL) >= SUBSCRIBED, what="polled prices")
        # Reconnects that bring no live price end nothing: no poll before the hour is over.
        await eventually(lambda: len(f.failures) >= 4, 10.0, what="three more reconnects")
        assert f.supervisor.fallback_active
        assert len(polls) == before + 1
        f.assert_running()


@pytest.mark.parametrize("status", [401, 403])
async def test_refused_handshake_waits_max_delay(
    simulator: SimulatorFactory, feed: FeedFactory, eventually: Eventually, status: int
) -> None:
    """A handshake refused with 401 or 403 puts the feed in auth_failed with its next attempt at max_delay, not the initial delay."""
    max_delay, jitter = 5.0, 0.2
    async with asyncio.timeout(TEST_TIMEOUT):
        sim = await simulator()
        await sim.faults("refuse", status=status)
        f = await feed(
            sim.ws_url,
            config={"feed": {"reconnect": {"max_delay": max_delay, "jitter": jitter}}},
        )
        await eventually(lambda: f.failures, what="the refusal")

        failure = f.failures[0]
        assert failure.kind == "handshake"
        assert str(status) in failure.detail
        assert f.supervisor.state is FeedState.AUTH_FAILED
        assert failure.number == 1
        # logged with 0.1 s resolution
        assert max_delay * (1 - jitter) - 0.05 <= failure.delay <= max_delay * (1 + jitter) + 0.05
        assert f.metric("tickguard_websocket_reconnect_attempts_total") == 1


async def test_supervisor_stops_when_cancelled_amid_a_flood_of_frames(
    feed_server: FeedServerFactory, feed: FeedFactory, eventually: Eventually
) -> None:
    """Cancelling the supervisor while frames keep arriving ends it, every time (no swallowed cancellation)."""

    async def flood(
        server: FeedServer, ws: ServerConnection, index: int, symbols: list[str]
    ) -> None:
        frame = json.dumps({"type": "heartbeat"})
        while True:
            await ws.send(frame)
            await asyncio.sleep(0)

    async with asyncio.timeout(TEST_TIMEOUT):
        server = await feed_server(flood)
        for round_ in range(20):
            f = await feed(server.url())
            await eventually(lambda f=f: f.supervisor.connected, what=f"connected, round {round_}")
            (task,) = f.tasks
            task.cancel()
            done, _ = await asyncio.wait([task], timeout=2.0)
            assert done, f"round {round_}: the supervisor ignored its cancellation"
            await f.stop()
