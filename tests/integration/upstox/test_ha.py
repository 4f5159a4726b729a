"""Two instances on one PostgreSQL store (SPEC 9, docs/ha.md), served in this event loop.

A real PostgreSQL (the session's throw-away cluster, a database per test), the
Upstox feed fake and broker fake shared by both daemons. The first to start
leads; the other stands by with its feed connected: `/readyz` 503 `standby`,
mutating routes 503 naming the leader, its writes refused by the store. When
the leader stops, the standby takes over (looks up the exits in flight,
reconciles the account) and guards: a crossing then sends one exit.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import aiohttp
import pytest

from tickguard import app
from tickguard.config import parse_config
from tickguard.errors import StoreError
from tickguard.leader import Role

KEY = "NSE_EQ|INE848E01016"
API_TOKEN = "api-token-for-the-ha-tests"
SETTLE = 15.0


async def eventually(predicate: Callable[[], object], timeout: float, what: str) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"not within {timeout:g}s: {what}")
        await asyncio.sleep(0.02)


class Instance:
    def __init__(self, daemon: app.Daemon, name: str) -> None:
        self.daemon = daemon
        self.name = name
        self.stop = asyncio.Event()
        self.task = asyncio.create_task(app.serve(daemon, stop=self.stop), name=name)

    @property
    def leading(self) -> bool:
        lead = self.daemon.leadership
        return lead is not None and lead.role is Role.LEADER

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.daemon.config.http.port}"


@pytest.fixture
async def instances(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    pg_url: str,
    upstox_feed_server: Any,
    fake_upstox: Any,
    upstox_broker_fakes: ModuleType,
) -> AsyncIterator[Callable[..., Any]]:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    token = upstox_broker_fakes.TOKEN
    feed = await upstox_feed_server(token=token)
    fake = await fake_upstox(feed)
    fake.set_position(KEY, 10, 100.0)
    (tmp_path / "upstox-token").write_text(token + "\n")
    (tmp_path / "api-token").write_text(API_TOKEN + "\n")
    started: list[Instance] = []

    async def start(name: str) -> Instance:
        tables: dict[str, Any] = {
            "daemon": {"state_dir": str(tmp_path / name)},
            "http": {
                "listen": f"127.0.0.1:{free_port()}",
                "token_file": str(tmp_path / "api-token"),
            },
            "store": {"url": pg_url, "takeover_settle": 0.5},  # the fakes answer at once
            "feed": {
                "protocol": "upstox",
                "symbols": [KEY],
                "poll_interval": 0.05,
                "silence_timeout": 60.0,
                "reconnect": {"initial_delay": 0.05, "max_delay": 0.2},
            },
            "upstox": {
                "api_url": fake.url,
                "hft_url": fake.url,
                "token_file": str(tmp_path / "upstox-token"),
            },
            "broker": {"kind": "upstox"},
            "dns": {"fallback_servers": []},
            "market": {"always_open": True},
            "guard": {"sweep_interval": 0.05},
            "account": {"reconcile_interval": 0.2},
            "positions": [
                {"symbol": KEY, "side": "long", "quantity": 10, "entry_price": 100.0,
                 "stop_loss": 95.0}
            ],
        }  # fmt: skip
        daemon = await app.build(parse_config(tables, env={}))
        instance = Instance(daemon, name)
        started.append(instance)
        return instance

    start.feed = feed  # type: ignore[attr-defined]
    start.fake = fake  # type: ignore[attr-defined]
    try:
        yield start
    finally:
        for instance in started:
            instance.stop.set()
        for instance in started:
            async with asyncio.timeout(20):
                await instance.task


async def test_one_leads_the_other_stands_by_then_takes_over(
    instances: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "tickguard")
    feed, fake = instances.feed, instances.fake
    a = await instances("a")
    await eventually(lambda: a.leading, SETTLE, "a leads")
    b = await instances("b")
    await eventually(lambda: b.daemon.supervisor.connected, SETTLE, "b's feed connected")
    assert b.daemon.leadership is not None and b.daemon.leadership.role is Role.STANDBY
    await eventually(lambda: b.daemon.leadership.leader == a.daemon.leadership.me, SETTLE,
                     "b knows who leads")  # fmt: skip
    assert a.daemon.guard.position(KEY) is not None
    assert b.daemon.guard.positions() == []  # a standby guards nothing
    assert b.daemon.metrics.leader._value.get() == 0
    # The standby's writes are refused by the store: it cannot journal, so it cannot send.
    with pytest.raises(StoreError):
        await b.daemon.state.audit("test", {}, 0.0)
    # The API of each.
    b_snapshot = b.daemon.snapshot()
    b.daemon.port.publish(b_snapshot)
    assert b_snapshot.ha is not None and b_snapshot.ha.standby

    # The leader stops; the standby takes over and guards.
    a.stop.set()
    async with asyncio.timeout(20):
        assert await a.task == 0
    await eventually(lambda: b.leading, SETTLE, "b leads")
    await eventually(lambda: b.daemon.guard.position(KEY) is not None, SETTLE, "b guards KEY")
    assert "[HA] leader: this instance now guards" in caplog.text
    # A crossing now: one exit, from b.
    feed.authorize_status = 503
    await feed.drop_connections()
    feed.prices[KEY] = 94.0
    await eventually(lambda: b.daemon.guard.position(KEY) is None, SETTLE, "the exit filled")
    assert len(fake.place_bodies) == 1
    assert b.daemon.metrics.leader._value.get() == 1


async def test_a_standbys_api_answers_503_and_names_the_leader(instances: Any) -> None:
    a = await instances("a")
    await eventually(lambda: a.leading, SETTLE, "a leads")
    b = await instances("b")
    await eventually(lambda: b.daemon.leadership.leader is not None, SETTLE, "b knows the leader")
    b.daemon.port.publish(b.daemon.snapshot())
    async with aiohttp.ClientSession() as http:
        base = b.base
        async with http.get(base + "/readyz") as response:
            assert response.status == 503
            body = await response.json()
            assert body["status"] == "standby" and body["reasons"][0] == "standby"
            assert body["leader"] == a.daemon.leadership.me
        headers = {"Authorization": f"Bearer {API_TOKEN}"}
        async with http.post(
            base + "/api/v1/monitoring/emergency-close-position",
            json={"symbol": KEY},
            headers=headers,
        ) as response:
            assert response.status == 503
            body = await response.json()
            assert body["error"] == "standby" and body["leader"] == a.daemon.leadership.me
        async with http.get(base + "/healthz") as response:
            assert response.status == 200
        async with http.get(base + "/api/v1/positions") as response:  # from the shared store
            rows = (await response.json())["positions"]
            assert [(p["symbol"], p["state"]) for p in rows] == [(KEY, "open")]
        async with http.get(base + "/api/v1/monitoring/connection-health") as response:
            ha = (await response.json())["ha"]
            assert ha["role"] == "standby" and ha["leader"] == a.daemon.leadership.me


def free_port() -> int:
    """A loopback port nothing listens on now (the daemon binds it a moment later)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])
