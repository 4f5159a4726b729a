"""One store, two backends (docs/ha.md): the same tests on SQLite and on a real PostgreSQL.

Every call goes through `AsyncStore`, the logic both backends share: SQLite's
`Store.aio` and `PostgresStore`. The PostgreSQL server is the session's
throw-away cluster (`pg_server`); each test gets a database of its own.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import psycopg
import pytest

import tickguard.store as store_module
from tickguard.core.exits import Exit, ExitState
from tickguard.core.orders import OrderReport, OrderStatus
from tickguard.core.positions import ExitReason, Position, PositionSpec, PositionState, Side
from tickguard.core.prices import PriceSource
from tickguard.core.safety_net import StopState
from tickguard.errors import PositionExists, StoreError
from tickguard.store import SCHEMA_VERSION, AsyncStore, Store, StoreConflict
from tickguard.store_pg import PostgresStore

SPEC = PositionSpec("INFY", Side.LONG, 10.0, 1500.0, stop_loss=1470.0, trailing_stop=20.0)
WALL = 1_800_000_000.0


@pytest.fixture(params=["sqlite", "postgresql"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[AsyncStore]:
    if request.param == "sqlite":
        sqlite = Store.in_dir(tmp_path)
        yield sqlite.aio
        sqlite.close()
        return
    url = request.getfixturevalue("pg_url")
    pg = await PostgresStore.open(url)
    yield pg
    await pg.close()


def decided(position: Position, price: float = 1469.0) -> Exit:
    return Exit(
        client_order_id=f"tg-x-{position.id}-1",
        position_id=position.id,
        symbol=position.symbol,
        side=position.side,
        quantity=position.spec.quantity,
        reason=ExitReason.STOP_LOSS,
        price_source=PriceSource.LIVE,
        trigger_price=price,
        decided_at=WALL,
    )


async def test_positions_round_trip(store: AsyncStore) -> None:
    position = await store.add_position(SPEC, WALL, "config")
    assert position.id > 0 and position.origin == "config"
    with pytest.raises(PositionExists):
        await store.add_position(SPEC, WALL)
    moved = Position(
        position.id, SPEC, state=PositionState.OPEN, trail_anchor=1520.0, confirmed=True
    )
    await store.save_positions([moved], WALL + 1)
    (back,) = await store.positions()
    assert (back.trail_anchor, back.confirmed, back.spec) == (1520.0, True, SPEC)
    assert back.created_at == WALL
    assert (await store.latest_position("INFY")) == back
    assert await store.closed_at("INFY") is None
    await store.delete_position(back, WALL + 2)
    assert await store.positions() == []
    assert await store.closed_at("INFY") == WALL + 2
    assert len(await store.positions(active_only=False)) == 1
    again = await store.add_position(SPEC, WALL + 3)  # closed: the symbol is free again
    assert again.id > position.id
    assert await store.position(again.id) == again


async def test_the_exit_journal(store: AsyncStore) -> None:
    position = await store.add_position(SPEC, WALL)
    exit = decided(position)
    exiting = Position(position.id, SPEC, state=PositionState.EXITING, exit_id=exit.client_order_id)
    await store.journal_exit(exit, exiting, WALL + 1)
    assert [e.client_order_id for e in await store.unfinished_exits()] == [exit.client_order_id]
    (latest,) = await store.positions()
    assert latest.state is PositionState.EXITING and latest.exit_id == exit.client_order_id
    sent = exit.sending()
    await store.update_exit(sent, WALL + 2)
    report = OrderReport(
        exit.client_order_id, "B-1", OrderStatus.FILLED, 1468.5, filled_quantity=10
    )
    filled = sent.filled(1468.5, "B-1", 10.0)
    closed = Position(position.id, SPEC, state=PositionState.CLOSED, exit_id=exit.client_order_id)
    await store.update_exit(filled, WALL + 3, report, closed)
    assert await store.unfinished_exits() == []
    record = await store.exit_record(exit.client_order_id)
    assert record is not None
    assert record.exit.state is ExitState.FILLED and record.exit.fill_price == 1468.5
    assert record.pnl == pytest.approx((1468.5 - 1500.0) * 10)
    events = await store.exit_events(exit.client_order_id)
    assert [e["state"] for e in events] == ["pending", "sent", "filled"]
    assert events[-1]["reply"] == report.as_reply()
    assert [r.exit.client_order_id for r in await store.exits()] == [exit.client_order_id]


async def test_an_external_close_is_journalled_once(store: AsyncStore) -> None:
    position = await store.add_position(SPEC, WALL)
    closed = Position(position.id, SPEC, state=PositionState.CLOSED)
    await store.close_external(closed, 0.0, "broker holds 0", WALL + 1)
    with pytest.raises(StoreConflict):
        await store.close_external(closed, 0.0, "again", WALL + 2)
    (row,) = await store.external_closes()
    assert (row["symbol"], row["detail"], row["broker_quantity"]) == ("INFY", "broker holds 0", 0.0)
    assert await store.positions() == []


async def test_the_audit_log_keeps_the_newest(
    store: AsyncStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(store_module, "KEEP_AUDIT", 5)
    for i in range(8):
        await store.audit("close", {"symbol": f"S{i}", "n": i}, WALL + i)
    log = await store.audit_log(100)
    assert [entry["detail"]["n"] for entry in log] == [7, 6, 5, 4, 3]


async def test_the_paper_account(store: AsyncStore) -> None:
    await store.record_paper_trade("INFY", "buy", 10, 1500.0, WALL)
    report = OrderReport("tg-1", "paper-tg-1-1", OrderStatus.FILLED, 1490.0, filled_quantity=4)
    await store.record_paper_fill(report, "INFY", "SELL", 4, WALL + 1)
    holding = await store.paper_position("INFY")
    assert holding is not None and holding.quantity == 6 and holding.average_price == 1500.0
    assert [h.symbol for h in await store.paper_positions()] == ["INFY"]
    assert await store.paper_fill("tg-1") == report
    assert await store.paper_fill("tg-2") is None
    assert (await store.paper_fill_count(), await store.paper_fill_count("tg-1")) == (1, 1)
    assert await store.record_paper_trade("INFY", "sell", 6, 1480.0, WALL + 2) is None
    assert await store.paper_positions() == []


async def test_safety_net_rows_and_paper_stops(store: AsyncStore) -> None:
    position = await store.add_position(SPEC, WALL)
    row = await store.net_intent(position, 10.0, 1455.3, WALL)
    with pytest.raises(PositionExists):  # one live stop per symbol, whatever the code does
        await store.net_intent(position, 10.0, 1455.3, WALL)
    (placing,) = await store.net_live()
    assert (placing.row, placing.state, placing.stop_id) == (row, "placing", None)
    await store.net_update(row, "active", WALL + 1, stop_id="GTT-1", trigger=1460.0)
    (active,) = await store.net_live()
    assert (active.stop_id, active.trigger, active.quantity) == ("GTT-1", 1460.0, 10.0)
    await store.net_update(row, "triggered", WALL + 2, order_id="O-1")
    assert await store.net_live() == []
    assert (await store.net_rows())[0].order_id == "O-1"

    stop = await store.paper_stop_place("INFY", Side.LONG, 10.0, 1455.3, WALL)
    assert await store.paper_stop(stop.stop_id) == stop
    moved = await store.paper_stop_change(stop.stop_id, WALL, quantity=8.0, trigger=1460.0)
    assert moved is not None and (moved.quantity, moved.trigger) == (8.0, 1460.0)
    await store.record_paper_trade("INFY", "buy", 8, 1500.0, WALL)
    await store.paper_stop_fire(moved, 1459.0, WALL + 1)
    fired = await store.paper_stop(stop.stop_id)
    assert fired is not None and fired.state is StopState.TRIGGERED and fired.order_id
    assert await store.paper_position("INFY") is None  # it sold the 8
    cancelled = await store.paper_stop_cancel(stop.stop_id, WALL + 2)  # fired: stays fired
    assert cancelled is not None and cancelled.state is StopState.TRIGGERED
    assert await store.paper_stop("not-a-paper-stop") is None
    assert [s.stop_id for s in await store.paper_stops()] == [stop.stop_id]


async def test_known_addresses(store: AsyncStore) -> None:
    assert await store.known_addresses("feed.example") is None
    await store.remember_addresses("feed.example", ["192.0.2.1", "2001:db8::1"], WALL)
    await store.remember_addresses("feed.example", ["192.0.2.2"], WALL + 1)
    assert await store.known_addresses("feed.example") == (["192.0.2.2"], WALL + 1)


async def test_a_failed_transaction_leaves_nothing(store: AsyncStore) -> None:
    """A write that breaks a rule rolls its whole transaction back."""
    position = await store.add_position(SPEC, WALL)
    closed = Position(position.id, SPEC, state=PositionState.CLOSED)
    await store.close_external(closed, 0.0, "first", WALL)
    reopened = Position(position.id, SPEC, state=PositionState.OPEN)
    await store.save_positions([reopened], WALL + 1)
    with pytest.raises(StoreConflict):  # its INSERT fails after nothing else ran...
        await store.close_external(closed, 0.0, "second", WALL + 2)
    (still,) = await store.positions()  # ...and the position's UPDATE never happened
    assert still.state is PositionState.OPEN


# -- PostgreSQL only: migrations, concurrency ------------------------------------------


async def test_postgresql_migrates_once_and_refuses_a_newer_schema(pg_url: str) -> None:
    first, second = await asyncio.gather(PostgresStore.open(pg_url), PostgresStore.open(pg_url))
    try:
        assert await first.schema_version() == SCHEMA_VERSION
        assert first.install_id == second.install_id  # one store, whoever migrated it
    finally:
        await first.close()
        await second.close()
    async with await psycopg.AsyncConnection.connect(pg_url, autocommit=True) as conn:
        await conn.execute(
            "UPDATE meta SET value = %s WHERE key = 'schema_version'", (str(SCHEMA_VERSION + 1),)
        )
    with pytest.raises(StoreError, match=f"schema version {SCHEMA_VERSION + 1}"):
        await PostgresStore.open(pg_url)


async def test_postgresql_transactions_do_not_interleave(pg_url: str) -> None:
    """Tasks sharing the one connection: each transaction is whole (a symbol's positions are
    written and read back in order, 50 tasks at once)."""
    pg = await PostgresStore.open(pg_url)
    try:
        specs = [PositionSpec(f"S{i:02d}", Side.LONG, 1.0, 100.0) for i in range(50)]
        added = await asyncio.gather(*(pg.add_position(s, WALL) for s in specs))
        assert sorted(p.symbol for p in added) == [s.symbol for s in specs]
        assert len({p.id for p in added}) == 50
        await asyncio.gather(*(pg.audit("a", {"i": i}, WALL) for i in range(50)))
        assert len(await pg.audit_log(100)) == 50
    finally:
        await pg.close()


async def test_an_unreachable_postgresql_is_a_store_error() -> None:
    with socket.socket() as probe:  # a port nothing listens on (closed again at once)
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"postgresql://tickguard@127.0.0.1:{port}/postgres?connect_timeout=2"
    with pytest.raises(StoreError, match="cannot open the state store"):
        await PostgresStore.open(url)


async def test_postgresql_reads_survive_the_reader_ending(pg_url: str) -> None:
    """Reads use a connection of their own, which the server may end (an idle_session_timeout):
    the next read connects again; writes stay on the session connection."""
    pg = await PostgresStore.open(pg_url)
    try:
        await pg.add_position(SPEC, WALL)
        assert [p.symbol for p in await pg.positions()] == ["INFY"]  # on the reader
        reader = pg._pg._reader.info.backend_pid
        async with await psycopg.AsyncConnection.connect(pg_url, autocommit=True) as admin:
            await admin.execute("SELECT pg_terminate_backend(%s)", (reader,))
        assert [p.symbol for p in await pg.positions()] == ["INFY"]
        assert pg._pg._reader.info.backend_pid != reader
        await pg.audit("still", {}, WALL)  # the session connection was left alone
    finally:
        await pg.close()
