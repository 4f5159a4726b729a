"""The SQLite store on real files: schema, positions, the exit journal, audit, paper fills."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from tickguard.core.exits import Exit, ExitState
from tickguard.core.orders import OrderReport, OrderStatus
from tickguard.core.positions import ExitReason, Position, PositionSpec, PositionState, Side
from tickguard.core.prices import PriceSource
from tickguard.errors import StoreError
from tickguard.store import DB_NAME, MIGRATIONS, SCHEMA_VERSION, Store

WALL = 1_767_765_256.0


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    store = Store.in_dir(tmp_path)
    yield store
    store.close()


def long_spec(symbol: str = "LONGCO") -> PositionSpec:
    return PositionSpec(symbol, Side.LONG, 10.0, 100.0, stop_loss=95.0, take_profit=120.0)


def short_spec(symbol: str = "SHORTCO") -> PositionSpec:
    return PositionSpec(symbol, Side.SHORT, 5.0, 200.0, stop_loss=210.0, take_profit=180.0)


def decide(position: Position, decided_at: float = WALL, seq: int = 1) -> tuple[Exit, Position]:
    """An exit for `position` and the position moved to exiting, as the guard makes them."""
    cid = f"tg-test-{position.id}-{seq}"
    exit = Exit(
        client_order_id=cid,
        position_id=position.id,
        symbol=position.symbol,
        side=position.side,
        quantity=position.spec.quantity,
        reason=ExitReason.STOP_LOSS,
        price_source=PriceSource.CACHE,
        trigger_price=94.0,
        decided_at=decided_at,
    )
    exiting = Position(position.id, position.spec, PositionState.EXITING, exit_seq=seq, exit_id=cid)
    return exit, exiting


def other_connection(store: Store) -> sqlite3.Connection:
    """A second, independent connection: sees only what the store committed."""
    db = sqlite3.connect(store.path)
    db.row_factory = sqlite3.Row
    return db


# -- schema ---------------------------------------------------------------


def test_new_store_is_migrated_wal_and_synchronous_full(tmp_path: Path) -> None:
    """A new store is created at SCHEMA_VERSION, in WAL mode, committing with synchronous=FULL."""
    store = Store.in_dir(tmp_path / "state")
    try:
        assert store.path == tmp_path / "state" / DB_NAME and store.path.is_file()
        assert store.schema_version() == SCHEMA_VERSION
        # synchronous is a per-connection setting: only the store's own connection shows it.
        assert store._db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
        db = other_connection(store)
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        db.close()
    finally:
        store.close()


def test_reopening_keeps_install_id_and_data(tmp_path: Path) -> None:
    """Reopening a store keeps its install_id and its positions; a new store gets a new id."""
    first = Store.in_dir(tmp_path / "a")
    install_id = first.install_id
    first.add_position(long_spec(), WALL)
    first.close()
    again = Store.in_dir(tmp_path / "a")
    other = Store.in_dir(tmp_path / "b")
    try:
        assert again.install_id == install_id and len(install_id) == 6
        assert again.schema_version() == SCHEMA_VERSION
        assert [p.symbol for p in again.positions()] == ["LONGCO"]
        assert other.install_id != install_id
    finally:
        again.close()
        other.close()


def test_newer_schema_is_refused_naming_both_versions(tmp_path: Path) -> None:
    """A database written by a newer tickguard is refused with its version and ours."""
    path = tmp_path / DB_NAME
    db = sqlite3.connect(path)
    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    db.close()
    with pytest.raises(StoreError) as caught:
        Store(path)
    message = str(caught.value)
    assert str(path) in message
    assert f"schema version {SCHEMA_VERSION + 1}" in message
    assert f"knows up to {SCHEMA_VERSION}" in message


def test_empty_file_is_a_v0_database_and_migrates(tmp_path: Path) -> None:
    """An empty database file (schema version 0) is migrated to the current schema."""
    path = tmp_path / DB_NAME
    path.touch()
    store = Store(path)
    try:
        assert store.schema_version() == SCHEMA_VERSION
        store.add_position(long_spec(), WALL)
        assert store.latest_position("LONGCO") is not None and store.install_id
    finally:
        store.close()


@pytest.mark.parametrize("version", range(1, SCHEMA_VERSION))
def test_older_database_migrates_keeping_its_rows(tmp_path: Path, version: int) -> None:
    """A database left at an older schema version is migrated up and keeps its install_id."""
    path = tmp_path / DB_NAME
    db = sqlite3.connect(path)
    for script in MIGRATIONS[:version]:
        db.executescript(script)
    db.execute("INSERT INTO meta (key, value) VALUES ('install_id', 'abc123')")
    db.execute(f"PRAGMA user_version = {version}")
    db.commit()
    db.close()
    store = Store(path)
    try:
        assert store.schema_version() == SCHEMA_VERSION and store.install_id == "abc123"
    finally:
        store.close()


def test_corrupt_file_raises_store_error(tmp_path: Path) -> None:
    """A state file that is not a database is refused with StoreError naming it."""
    path = tmp_path / DB_NAME
    path.write_bytes(b"this is not an sqlite database, just some bytes" * 100)
    with pytest.raises(StoreError, match="cannot open the state store") as caught:
        Store(path)
    assert str(path) in str(caught.value)


def test_unopenable_state_dir_raises_store_error_with_path(tmp_path: Path) -> None:
    """A state dir that is a file cannot hold the store: StoreError names the path."""
    state_dir = tmp_path / "state"
    state_dir.write_text("not a directory")
    with pytest.raises(StoreError, match="cannot open the state store") as caught:
        Store.in_dir(state_dir)
    assert str(state_dir / DB_NAME) in str(caught.value)


# -- positions ------------------------------------------------------------


def test_one_active_position_per_symbol(store: Store) -> None:
    """A second open or exiting position on a symbol is refused; a closed one blocks nothing."""
    first = store.add_position(long_spec(), WALL)
    with pytest.raises(StoreError, match="LONGCO already has an active position"):
        store.add_position(long_spec(), WALL)
    exit, exiting = decide(first)
    store.journal_exit(exit, exiting, WALL)
    with pytest.raises(StoreError, match="LONGCO"):
        store.add_position(long_spec(), WALL)
    store.save_positions([Position(first.id, first.spec, PositionState.CLOSED)], WALL)
    second = store.add_position(long_spec(), WALL + 1)
    assert second.id != first.id and second.state is PositionState.OPEN
    assert store.add_position(short_spec("LONGCO2"), WALL).symbol == "LONGCO2"


def test_positions_active_only_and_latest_position(store: Store) -> None:
    """positions() lists active positions (all with active_only=False); latest_position is the newest."""
    a = store.add_position(long_spec("A"), WALL)
    b = store.add_position(short_spec("B"), WALL)
    store.delete_position(a, WALL + 1)
    a2 = store.add_position(long_spec("A"), WALL + 2)
    assert [p.id for p in store.positions()] == [b.id, a2.id]
    everything = store.positions(active_only=False)
    assert [(p.id, p.state) for p in everything] == [
        (a.id, PositionState.CLOSED),
        (b.id, PositionState.OPEN),
        (a2.id, PositionState.OPEN),
    ]
    assert store.latest_position("A") == a2
    assert store.latest_position("B") == b and store.latest_position("Z") is None
    assert store.position(a.id) == Position(a.id, a.spec, PositionState.CLOSED)
    assert store.position(9999) is None


def test_position_fields_round_trip(store: Store) -> None:
    """A position's spec and its mutable state come back exactly as saved."""
    spec = PositionSpec(
        "T", Side.SHORT, 3.5, 50.25, stop_loss=None, take_profit=40.0, trailing_stop=1.5
    )
    stored = store.add_position(spec, WALL)
    moved = Position(
        stored.id, spec, PositionState.EXITING, trail_anchor=48.0, exit_seq=2, exit_id="x"
    )
    store.save_positions([moved], WALL)
    assert store.position(stored.id) == moved


def test_delete_position_marks_it_closed(store: Store) -> None:
    """Deleting a position keeps its row, closed, and frees the symbol."""
    position = store.add_position(long_spec(), WALL)
    store.delete_position(position, WALL + 5)
    assert store.positions() == []
    latest = store.latest_position("LONGCO")
    assert latest is not None and latest.id == position.id
    assert latest.state is PositionState.CLOSED
    db = other_connection(store)
    row = db.execute(
        "SELECT state, updated_at FROM positions WHERE id = ?", (position.id,)
    ).fetchone()
    db.close()
    assert (row["state"], row["updated_at"]) == ("closed", WALL + 5)


# -- the exit journal -----------------------------------------------------


def test_journal_exit_is_one_durable_commit(store: Store) -> None:
    """journal_exit writes the exit, its first event and the exiting position in one commit."""
    position = store.add_position(long_spec(), WALL)
    exit, exiting = decide(position)
    statements: list[str] = []
    store._db.set_trace_callback(statements.append)
    store.journal_exit(exit, exiting, WALL + 1)
    store._db.set_trace_callback(None)
    assert [" ".join(s.split()[:3]) for s in statements] == [
        "BEGIN IMMEDIATE",
        "INSERT INTO exits",
        "INSERT INTO exit_events",
        "UPDATE positions SET",
        "COMMIT",
    ], statements

    db = other_connection(store)  # committed, so another connection sees all of it
    row = db.execute("SELECT * FROM exits").fetchone()
    assert row["client_order_id"] == exit.client_order_id and row["state"] == "pending"
    assert (row["reason"], row["price_source"], row["trigger_price"]) == (
        "stop_loss",
        "cache",
        94.0,
    )
    events = db.execute("SELECT state, reply FROM exit_events").fetchall()
    assert [tuple(e) for e in events] == [("pending", None)]
    prow = db.execute("SELECT state, exit_id, exit_seq FROM positions").fetchone()
    assert tuple(prow) == ("exiting", exit.client_order_id, 1)
    db.close()
    record = store.exit_record(exit.client_order_id)
    assert record is not None and record.exit == exit and record.pnl is None


@pytest.mark.parametrize(
    ("spec", "fill", "pnl"),
    [
        (long_spec(), 94.0, -60.0),
        (long_spec(), 112.5, 125.0),
        (short_spec(), 211.0, -55.0),
        (short_spec(), 178.0, 110.0),
    ],
    ids=["long-loss", "long-profit", "short-loss", "short-profit"],
)
def test_update_exit_appends_events_and_computes_pnl(
    store: Store, spec: PositionSpec, fill: float, pnl: float
) -> None:
    """update_exit appends an event with the broker's reply and stores pnl signed by side."""
    position = store.add_position(spec, WALL)
    exit, exiting = decide(position)
    store.journal_exit(exit, exiting, WALL)
    sent = exit.sending()
    store.update_exit(sent, WALL + 1)
    cid = exit.client_order_id
    report = OrderReport(cid, "B-1", OrderStatus.FILLED, fill, "done")
    filled = sent.filled(fill, "B-1")
    closed = Position(position.id, spec, PositionState.CLOSED, exit_seq=1, exit_id=cid)
    store.update_exit(filled, WALL + 2, report, closed)

    events = store.exit_events(cid)
    assert [(e["state"], e["at"]) for e in events] == [
        ("pending", WALL),
        ("sent", WALL + 1),
        ("filled", WALL + 2),
    ]
    assert events[0]["reply"] is None and events[1]["reply"] is None
    assert events[2]["reply"] == {
        "broker_order_id": "B-1",
        "status": "filled",
        "fill_price": fill,
        "filled_quantity": None,
        "detail": "done",
    }
    record = store.exit_record(cid)
    assert record is not None and record.pnl == pnl and record.updated_at == WALL + 2
    assert record.exit == filled and record.exit.attempts == 1
    assert store.position(position.id) == closed
    assert store.unfinished_exits() == []


def test_update_exit_without_position_keeps_pnl(store: Store) -> None:
    """An update without a position leaves the position row and an earlier pnl untouched."""
    position = store.add_position(long_spec(), WALL)
    exit, exiting = decide(position)
    store.journal_exit(exit, exiting, WALL)
    store.update_exit(exit.sending().unavailable("timed out", 5.0), WALL + 1)
    record = store.exit_record(exit.client_order_id)
    assert record is not None and record.pnl is None
    assert record.exit.state is ExitState.RETRY and record.exit.detail == "timed out"
    assert record.exit.retry_at is None  # monotonic: never persisted
    assert store.position(position.id) == exiting
    assert store.exit_record("nope") is None and store.exit_events("nope") == []


def test_unfinished_exits_are_exactly_pending_sent_retry(store: Store) -> None:
    """unfinished_exits returns the pending, sent and retry exits, oldest decision first."""
    states: dict[str, ExitState] = {}
    for i, state in enumerate(
        [ExitState.FILLED, ExitState.RETRY, ExitState.PENDING, ExitState.REJECTED, ExitState.SENT]
    ):
        position = store.add_position(long_spec(f"S{i}"), WALL)
        exit, exiting = decide(position, decided_at=WALL + 10 - i)
        store.journal_exit(exit, exiting, WALL)
        if state is ExitState.SENT:
            exit = exit.sending()
        elif state is ExitState.RETRY:
            exit = exit.sending().unavailable("down", 0.0)
        elif state is ExitState.FILLED:
            exit = exit.sending().filled(94.0, "B")
        elif state is ExitState.REJECTED:
            exit = exit.sending().rejected("no")
        store.update_exit(exit, WALL)
        states[exit.client_order_id] = state
    unfinished = store.unfinished_exits()
    assert [e.state for e in unfinished] == [ExitState.SENT, ExitState.PENDING, ExitState.RETRY]
    assert {e.client_order_id: e.state for e in unfinished} == {
        cid: s for cid, s in states.items() if s.in_flight
    }
    assert [r.exit.state for r in store.exits()] == [
        ExitState.FILLED,
        ExitState.RETRY,
        ExitState.PENDING,
        ExitState.REJECTED,
        ExitState.SENT,
    ]


# -- audit and paper fills ------------------------------------------------


def test_audit_round_trip(store: Store) -> None:
    """Audit entries come back newest first with their detail decoded."""
    store.audit("position.add", {"symbol": "A", "quantity": 10}, WALL)
    store.audit("close", {"symbol": "A", "path": Path("/x")}, WALL + 1)
    assert store.audit_log() == [
        {"at": WALL + 1, "action": "close", "detail": {"symbol": "A", "path": "/x"}},
        {"at": WALL, "action": "position.add", "detail": {"symbol": "A", "quantity": 10}},
    ]
    assert len(store.audit_log(limit=1)) == 1


def test_paper_fills_are_counted_per_client_order_id(store: Store) -> None:
    """Paper fills are kept per order: duplicates of one client order id are counted, not merged."""
    for broker_id, cid, price in [("p-1", "A", 94.0), ("p-2", "A", 95.0), ("p-3", "B", 211.0)]:
        report = OrderReport(cid, broker_id, OrderStatus.FILLED, price)
        store.record_paper_fill(report, "SYM", "SELL", 10.0, WALL)
    assert store.paper_fill_count("A") == 2
    assert store.paper_fill_count("B") == 1
    assert store.paper_fill_count("C") == 0
    assert store.paper_fill_count() == 3
    assert store.paper_fill("A") == OrderReport(
        "A", "p-1", OrderStatus.FILLED, 94.0, filled_quantity=10.0
    )
    assert store.paper_fill("C") is None
