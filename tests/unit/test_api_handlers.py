"""The API's handlers against a fake port: no daemon, no feed, no store.

The handlers hold a `tickguard.port.Port` and nothing else of the daemon, so a
port that answers from a snapshot built here is all they need. The app is
served for real (aiohttp's TestServer on 127.0.0.1, port 0).
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Iterable
from datetime import UTC
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer
from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from tickguard.api import build_app
from tickguard.core.account import Holding
from tickguard.core.guard import GuardView
from tickguard.core.positions import ExitReason, Position, PositionSpec, PositionState, Side
from tickguard.core.prices import Price, PriceSource, PriceView
from tickguard.port import Closing, Journal, NoPosition, Overloaded
from tickguard.status import (
    AccountStatus,
    DnsStatus,
    ExecutorStatus,
    FeedStatus,
    PollStatus,
    Snapshot,
)

TOKEN = "fake-port-token"
NOW = 1000.0  # the fake's monotonic clock


def make_snapshot(**changes: Any) -> Snapshot:
    position = Position(1, PositionSpec("BOSCHLTD", Side.LONG, 10, 735.0, stop_loss=700.0))
    price = Price(720.0, None, NOW - 40.0, PriceSource.POLL, 1, NOW - 40.0)
    snapshot = Snapshot(
        taken_at=NOW,
        wall=1767765000.0,
        prices=PriceView({"BOSCHLTD": price}, {PriceSource.LIVE: None, PriceSource.POLL: None}, 30.0, 300.0),
        guard=GuardView({"BOSCHLTD": position}, {"BOSCHLTD": NOW - 60.0}, frozenset(), ()),
        exits=ExecutorStatus((), 0),
        feed=FeedStatus("backoff", False, 1, 7, 5, 3, "connect: refused", None, None, None, True),
        dns=DnsStatus(False, "primary", "system", ""),
        poll=PollStatus(True, NOW - 40.0, ""),
        account=AccountStatus({"BOSCHLTD": Holding("BOSCHLTD", 10.0, 735.0)}, 1767764990.0, "", ()),
        market_open=True,
        next_market_change=None,
        tz=UTC,
        held_back=(),
        sweeps=10,
        sweep_interval=1.0,
        last_sweep_at=NOW - 0.5,
    )  # fmt: skip
    return dataclasses.replace(snapshot, **changes)


class FakePort:
    """A Port whose answers the test sets: a snapshot, and what each action does."""

    def __init__(self, snapshot: Snapshot) -> None:
        self.current = snapshot
        self.clock = NOW  # the daemon's monotonic clock, as far as handlers can see
        self.snapshots_asked = 0
        self.hold = asyncio.Event()  # snapshot() waits on it (set: it does not wait)
        self.hold.set()
        self.asked = asyncio.Event()  # set when `expected` snapshots were asked for
        self.expected = 0
        self.close_result: Closing | Exception = Overloaded("closes", 64)

    @property
    def token(self) -> str | None:
        return TOKEN

    def now(self) -> float:
        return self.clock

    def latest(self) -> Snapshot:
        return self.current

    async def snapshot(self) -> Snapshot:
        self.snapshots_asked += 1
        if self.snapshots_asked >= self.expected:
            self.asked.set()
        await self.hold.wait()
        return self.current

    async def close(self, symbol: str, reason: ExitReason, remote: str | None) -> Closing:
        if isinstance(self.close_result, Exception):
            raise self.close_result
        return self.close_result

    async def close_all(self, reason: ExitReason, remote: str | None) -> list[Closing]:
        return []

    async def add(self, spec: PositionSpec, remote: str | None) -> Position:
        raise NotImplementedError

    async def remove(self, symbol: str, remote: str | None) -> Position:
        raise NoPosition(symbol)

    async def positions(self) -> list[Position]:
        return list(self.current.guard.positions.values())

    async def journal(self) -> Journal:
        return Journal([], [])

    async def paper_trade(
        self, symbol: str, side: str, quantity: float, price: float | None
    ) -> Holding | None:
        return None


class CountingCollector(Collector):
    def __init__(self) -> None:
        self.collected = 0

    def collect(self) -> Iterable[GaugeMetricFamily]:
        self.collected += 1
        yield GaugeMetricFamily("fake_collected", "times collected", value=self.collected)


@pytest.fixture
def port() -> FakePort:
    return FakePort(make_snapshot())


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
async def http(port: FakePort, registry: CollectorRegistry) -> AsyncIterator[aiohttp.ClientSession]:
    server = TestServer(build_app(port, registry), host="127.0.0.1", port=0)
    await server.start_server()
    async with aiohttp.ClientSession(base_url=str(server.make_url(""))) as session:
        yield session
    await server.close()


async def get(http: aiohttp.ClientSession, path: str) -> tuple[int, Any]:
    async with http.get(path) as response:
        return response.status, await response.json()


async def test_health_is_the_snapshot(http: aiohttp.ClientSession) -> None:
    """Counters, ages and sources come from the snapshot: nothing is read elsewhere."""
    status, body = await get(http, "/api/v1/monitoring/connection-health")
    assert status == 200
    assert body["status"] == "degraded"
    ws = body["websocket"]
    assert (ws["connected"], ws["state"], ws["reconnect_attempts"], ws["network_errors"]) == (
        False,
        "backoff",
        7,
        5,
    )
    entry = body["price_cache"]["cache_entries"]["BOSCHLTD"]
    assert (entry["price"], entry["age_seconds"], entry["source"], entry["freshness"]) == (
        720.0,
        40.0,
        "cache",
        "stale",
    )
    assert body["positions"]["stale_symbols"] == ["BOSCHLTD"]
    assert body["fallback"] == {
        "active": True,
        "configured": True,
        "polling": True,
        "last_success_age_seconds": 40.0,
        "last_error": "",
    }


async def test_a_guard_loop_that_stopped_sweeping_fails_healthz(
    http: aiohttp.ClientSession, port: FakePort
) -> None:
    assert (await get(http, "/healthz"))[0] == 200
    port.current = make_snapshot(last_sweep_at=NOW - 6.0)
    status, body = await get(http, "/healthz")
    assert (status, body["error"]) == (503, "guard_stalled")


async def test_an_overloaded_port_is_a_fast_503_with_retry_after(
    http: aiohttp.ClientSession,
) -> None:
    async with http.post(
        "/api/v1/monitoring/emergency-close-position",
        json={"symbol": "BOSCHLTD"},
        headers={"Authorization": f"Bearer {TOKEN}"},
    ) as response:
        body = await response.json()
        assert (response.status, body["error"]) == (503, "overloaded"), body
        assert response.headers["Retry-After"] == "1"


@pytest.mark.parametrize(
    ("state", "expected"), [(None, 404), (PositionState.CLOSED, 409)], ids=["never", "closed"]
)
async def test_closing_what_is_not_guarded(
    http: aiohttp.ClientSession, port: FakePort, state: PositionState | None, expected: int
) -> None:
    port.close_result = NoPosition("TCS", state)
    async with http.post(
        "/api/v1/monitoring/emergency-close-position",
        json={"symbol": "TCS"},
        headers={"Authorization": f"Bearer {TOKEN}"},
    ) as response:
        body = await response.json()
        assert response.status == expected, body
        assert body.get("state") == (state.value if state else None)


async def test_concurrent_scrapes_share_one_rendering(
    http: aiohttp.ClientSession, port: FakePort, registry: CollectorRegistry
) -> None:
    """Scrapes that wait together for a snapshot are answered by one rendering."""
    counting = CountingCollector()
    registry.register(counting)
    port.hold.clear()
    port.expected = 20
    scrapes = [asyncio.create_task(http.get("/metrics")) for _ in range(20)]
    await asyncio.wait_for(port.asked.wait(), 10)  # every scrape waits for its snapshot
    port.hold.set()
    responses = await asyncio.gather(*scrapes)
    bodies = {await r.text() for r in responses}
    assert [r.status for r in responses] == [200] * 20
    assert counting.collected == 1 and len(bodies) == 1
    port.clock += 0.001
    async with http.get("/metrics") as later:  # one that arrives after it: rendered anew
        assert "fake_collected 2.0" in await later.text()
