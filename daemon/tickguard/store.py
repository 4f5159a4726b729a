"""The state store: positions, the exit journal, the audit log, paper fills.

SQLite in WAL mode with `synchronous=FULL`, so a commit is on disk when it
returns: an exit is journalled (and durable) before it is sent. Used from
the event loop's thread only; every call is one short transaction.

The schema version lives in `PRAGMA user_version`; `MIGRATIONS[n]` takes a
database from version n to n+1. A database newer than this code is refused.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import sqlite3
import time
from collections.abc import AsyncIterator, Coroutine, Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

from tickguard.core.account import Holding, apply_trade
from tickguard.core.exits import Exit, ExitState
from tickguard.core.orders import OrderReport, OrderStatus
from tickguard.core.positions import ExitReason, Position, PositionSpec, PositionState, Side
from tickguard.core.prices import PriceSource
from tickguard.core.safety_net import BrokerStop, StopState
from tickguard.errors import PositionExists, StoreError
from tickguard.files import read_small

DB_NAME = "tickguard.sqlite3"

MIGRATIONS: tuple[str, ...] = (
    # 0 -> 1: the first schema.
    """
    CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    CREATE TABLE positions (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        symbol TEXT NOT NULL,
        side TEXT NOT NULL CHECK (side IN ('long', 'short')),
        quantity REAL NOT NULL,
        entry_price REAL NOT NULL,
        stop_loss REAL,
        take_profit REAL,
        trailing_stop REAL,
        state TEXT NOT NULL CHECK (state IN ('open', 'exiting', 'closed')),
        trail_anchor REAL,
        exit_seq INTEGER NOT NULL DEFAULT 0,
        exit_id TEXT,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL
    );
    CREATE INDEX positions_symbol ON positions (symbol, id);
    -- At most one open or exiting position per symbol, whatever the code does.
    CREATE UNIQUE INDEX positions_one_active ON positions (symbol) WHERE state != 'closed';
    CREATE TABLE exits (
        client_order_id TEXT PRIMARY KEY,
        position_id INTEGER NOT NULL REFERENCES positions (id),
        symbol TEXT NOT NULL,
        side TEXT NOT NULL,
        quantity REAL NOT NULL,
        reason TEXT NOT NULL,
        price_source TEXT NOT NULL,
        trigger_price REAL,
        decided_at REAL NOT NULL,
        state TEXT NOT NULL,
        attempts INTEGER NOT NULL,
        fill_price REAL,
        pnl REAL,
        broker_order_id TEXT,
        detail TEXT NOT NULL DEFAULT '',
        updated_at REAL NOT NULL
    );
    CREATE INDEX exits_position ON exits (position_id);
    -- Every state an exit passed through, with the broker's reply where there was one.
    CREATE TABLE exit_events (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        client_order_id TEXT NOT NULL REFERENCES exits (client_order_id),
        state TEXT NOT NULL,
        at REAL NOT NULL,
        detail TEXT NOT NULL DEFAULT '',
        reply TEXT
    );
    CREATE TABLE audit (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        at REAL NOT NULL,
        action TEXT NOT NULL,
        detail TEXT NOT NULL
    );
    -- One row per order the paper broker accepted. Like a real broker it does not
    -- deduplicate client order ids: a second row for one id is a duplicate exit.
    CREATE TABLE paper_fills (
        broker_order_id TEXT PRIMARY KEY,
        client_order_id TEXT NOT NULL,
        symbol TEXT NOT NULL,
        transaction_type TEXT NOT NULL,
        quantity REAL NOT NULL,
        price REAL NOT NULL,
        filled_at REAL NOT NULL
    );
    CREATE INDEX paper_fills_client_order_id ON paper_fills (client_order_id);
    """,
    # 1 -> 2: last-known-good addresses of the feed's hosts (DNS fallback).
    """
    CREATE TABLE dns_cache (
        host TEXT PRIMARY KEY,
        addresses TEXT NOT NULL,
        resolved_at REAL NOT NULL
    );
    """,
    # 2 -> 3: the paper broker's account (docs/account.md): every trade on it, tickguard's own
    # fills and trades made outside tickguard alike, and the net position they add up to.
    """
    CREATE TABLE paper_trades (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        symbol TEXT NOT NULL,
        side TEXT NOT NULL CHECK (side IN ('buy', 'sell')),
        quantity REAL NOT NULL CHECK (quantity > 0),
        price REAL NOT NULL,
        client_order_id TEXT,
        at REAL NOT NULL
    );
    CREATE TABLE paper_positions (
        symbol TEXT PRIMARY KEY,
        quantity REAL NOT NULL,
        average_price REAL,
        updated_at REAL NOT NULL
    );
    -- Who registered each position (docs/account.md: config, api, or broker by a [[rules]] entry).
    ALTER TABLE positions ADD COLUMN origin TEXT NOT NULL DEFAULT 'api'
        CHECK (origin IN ('config', 'api', 'broker'));
    -- How much of an exit filled (less than its quantity: partly; the rest is exited again).
    ALTER TABLE exits ADD COLUMN filled_quantity REAL;
    -- Whether the broker has shown it held (until then it is "unconfirmed").
    ALTER TABLE positions ADD COLUMN confirmed INTEGER NOT NULL DEFAULT 0;
    -- Positions closed outside tickguard: no order, no client order id (docs/account.md).
    CREATE TABLE external_closes (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        position_id INTEGER NOT NULL UNIQUE REFERENCES positions (id),
        symbol TEXT NOT NULL,
        side TEXT NOT NULL,
        quantity REAL NOT NULL,
        entry_price REAL NOT NULL,
        broker_quantity REAL NOT NULL,
        detail TEXT NOT NULL,
        at REAL NOT NULL
    );
    """,
    # 3 -> 4: the broker-held safety net (docs/safety-net.md). A stop's row is written
    # (`placing`, no stop id yet) before the broker is asked to place it, so that a crash
    # in between is followed by a search of the broker's list, never a second stop.
    """
    CREATE TABLE safety_net_stops (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        position_id INTEGER NOT NULL REFERENCES positions (id),
        symbol TEXT NOT NULL,
        side TEXT NOT NULL CHECK (side IN ('long', 'short')),
        quantity REAL NOT NULL,
        trigger_price REAL NOT NULL,
        stop_id TEXT,
        state TEXT NOT NULL
            CHECK (state IN ('placing', 'active', 'triggered', 'cancelled', 'not_placed')),
        order_id TEXT,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL
    );
    -- At most one stop per symbol that may be live at the broker, whatever the code does.
    CREATE UNIQUE INDEX safety_net_one_live ON safety_net_stops (symbol)
        WHERE state IN ('placing', 'active');
    -- The paper broker's stops (its simulation of a broker-held stop order).
    CREATE TABLE paper_stops (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        symbol TEXT NOT NULL,
        side TEXT NOT NULL CHECK (side IN ('long', 'short')),
        quantity REAL NOT NULL CHECK (quantity > 0),
        trigger_price REAL NOT NULL,
        state TEXT NOT NULL CHECK (state IN ('active', 'triggered', 'cancelled')),
        fill_price REAL,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL
    );
    """,
)
SCHEMA_VERSION = len(MIGRATIONS)
# Bounds on what a client can make the store grow by (docs/limits.md): the audit
# log and the rows of positions dropped through the API without an exit.
# Exits, their events and fills are money history and are kept.
KEEP_AUDIT = 50_000
KEEP_DROPPED = 10_000


@dataclass(frozen=True, slots=True)
class ExitRecord:
    """One row of the exit journal as the API reports it."""

    exit: Exit
    pnl: float | None
    updated_at: float


Row = Mapping[str, Any]


class StoreConflict(StoreError):
    """A write broke a uniqueness rule of the schema (a second active position in a symbol,
    a second live safety-net stop, a second external close of a position)."""


class Sql(Protocol):
    """One connection of a backend, as the store's logic speaks to it: SQL with `?`
    placeholders, the same text for SQLite and PostgreSQL (docs/ha.md)."""

    async def run(self, sql: str, args: Sequence[object] = ()) -> int:
        """Execute one statement; the rows it changed. StoreConflict, StoreError."""
        ...

    async def insert(self, sql: str, args: Sequence[object] = ()) -> int:
        """Execute one INSERT into a table with an `id` column; the new row's id."""
        ...

    async def rows(self, sql: str, args: Sequence[object] = ()) -> list[Row]:
        """The rows of one query, as mappings by column name."""
        ...

    def tx(self) -> AbstractAsyncContextManager[None]:
        """One durable transaction: committed when the block ends, rolled back on any error."""
        ...


class AsyncStore:
    """Everything the daemon keeps, on any backend: the logic, written once.

    `Store` runs it on SQLite (each call finishes at once: SQLite is called
    synchronously, see `run_now`); `tickguard.store_pg.PostgresStore` runs it on
    PostgreSQL, awaited.
    """

    def __init__(self, sql: Sql, install_id: str) -> None:
        self._sql = sql
        self.install_id = install_id
        # Why a store that opened as new is in fact a lost one (SQLite: see Store); None.
        self.lost: str | None = None
        # Every call finishes without yielding (SQLite): `run_now` may run it in place.
        self.immediate = False

    async def check(self) -> None:
        """StoreError when the store can no longer be trusted to keep what is written to it
        (SQLite: its file vanished, was replaced or emptied). The daemon then stops."""

    async def _rows(self, sql: str, *args: object) -> list[Row]:
        return await self._sql.rows(sql, args)

    # -- positions ------------------------------------------------------

    async def add_position(self, spec: PositionSpec, wall: float, origin: str = "api") -> Position:
        """Store a new open position; PositionExists if the symbol already has an active one,
        StoreError if the store cannot take it."""
        try:
            async with self._sql.tx():
                new_id = await self._sql.insert(
                    "INSERT INTO positions (symbol, side, quantity, entry_price, stop_loss,"
                    " take_profit, trailing_stop, state, created_at, updated_at, origin)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, 'open', ?, ?, ?)",
                    (
                        spec.symbol,
                        spec.side.value,
                        spec.quantity,
                        spec.entry_price,
                        spec.stop_loss,
                        spec.take_profit,
                        spec.trailing_stop,
                        wall,
                        wall,
                        origin,
                    ),
                )
        except StoreConflict as exc:
            raise PositionExists(spec.symbol) from exc
        return Position(new_id, spec, origin=origin, created_at=wall)

    async def save_positions(self, positions: Iterable[Position], wall: float) -> None:
        """Persist the mutable parts of positions (state, trailing anchor, exit ids)."""
        async with self._sql.tx():
            for position in positions:
                await _save_position(self._sql, position, wall)

    async def delete_position(self, position: Position, wall: float) -> None:
        """Stop guarding without an order: the row is kept, marked closed.

        Rows of positions dropped this way that never had an exit are pruned
        beyond the newest KEEP_DROPPED (each symbol's newest row always stays:
        it is what stops a config position from being armed again).
        """
        async with self._sql.tx():
            await self._sql.run(
                "UPDATE positions SET state = 'closed', updated_at = ? WHERE id = ?",
                (wall, position.id),
            )
            await self._sql.run(
                "DELETE FROM positions WHERE state = 'closed' AND exit_seq = 0"
                " AND id <= (SELECT MAX(id) FROM positions) - ?"
                " AND id NOT IN (SELECT MAX(id) FROM positions GROUP BY symbol)",
                (KEEP_DROPPED,),
            )

    async def positions(self, *, active_only: bool = True) -> list[Position]:
        sql = "SELECT * FROM positions"
        if active_only:
            sql += " WHERE state != 'closed'"
        return [_position(row) for row in await self._rows(sql + " ORDER BY id")]

    async def latest_position(self, symbol: str) -> Position | None:
        rows = await self._rows(
            "SELECT * FROM positions WHERE symbol = ? ORDER BY id DESC LIMIT 1", symbol
        )
        return _position(rows[0]) if rows else None

    async def closed_at(self, symbol: str) -> float | None:
        """When the newest position in `symbol` closed (wall clock), None if it is not closed."""
        rows = await self._rows(
            "SELECT state, updated_at FROM positions WHERE symbol = ? ORDER BY id DESC LIMIT 1",
            symbol,
        )
        return float(rows[0]["updated_at"]) if rows and rows[0]["state"] == "closed" else None

    async def position(self, position_id: int) -> Position | None:
        rows = await self._rows("SELECT * FROM positions WHERE id = ?", position_id)
        return _position(rows[0]) if rows else None

    # -- the exit journal -----------------------------------------------

    async def journal_exit(self, exit: Exit, position: Position, wall: float) -> None:
        """Record a decided exit and its position's move to exiting, durably, in one commit."""
        async with self._sql.tx():
            await self._sql.run(
                "INSERT INTO exits (client_order_id, position_id, symbol, side, quantity, reason,"
                " price_source, trigger_price, decided_at, state, attempts, detail, updated_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    exit.client_order_id,
                    exit.position_id,
                    exit.symbol,
                    exit.side.value,
                    exit.quantity,
                    exit.reason.value,
                    exit.price_source.value,
                    exit.trigger_price,
                    exit.decided_at,
                    exit.state.value,
                    exit.attempts,
                    exit.detail,
                    wall,
                ),
            )
            await _event(self._sql, exit, wall, None)
            await _save_position(self._sql, position, wall)

    async def update_exit(
        self,
        exit: Exit,
        wall: float,
        reply: OrderReport | None = None,
        position: Position | None = None,
    ) -> None:
        """Record an exit's new state (and its position's, when that changed) in one commit."""
        pnl = exit.pnl(position.spec.entry_price) if position is not None else None
        async with self._sql.tx():
            await self._sql.run(
                "UPDATE exits SET state = ?, quantity = ?, filled_quantity = ?, attempts = ?,"
                " fill_price = ?, pnl = COALESCE(?, pnl), broker_order_id = ?, detail = ?,"
                " updated_at = ? WHERE client_order_id = ?",
                (
                    exit.state.value,
                    exit.quantity,
                    exit.filled_quantity,
                    exit.attempts,
                    exit.fill_price,
                    pnl,
                    exit.broker_order_id,
                    exit.detail,
                    wall,
                    exit.client_order_id,
                ),
            )
            await _event(self._sql, exit, wall, reply)
            if position is not None:
                await _save_position(self._sql, position, wall)

    async def unfinished_exits(self) -> list[Exit]:
        placeholders = ", ".join("?" for s in ExitState if s.in_flight)
        rows = await self._rows(
            f"SELECT * FROM exits WHERE state IN ({placeholders}) ORDER BY decided_at",
            *(s.value for s in ExitState if s.in_flight),
        )
        return [_exit(row) for row in rows]

    async def exits(self, limit: int = 1000) -> list[ExitRecord]:
        rows = await self._rows(
            "SELECT * FROM exits ORDER BY decided_at DESC, rowid DESC LIMIT ?", limit
        )
        return [ExitRecord(_exit(r), r["pnl"], r["updated_at"]) for r in rows]

    async def exit_record(self, client_order_id: str) -> ExitRecord | None:
        rows = await self._rows("SELECT * FROM exits WHERE client_order_id = ?", client_order_id)
        return ExitRecord(_exit(rows[0]), rows[0]["pnl"], rows[0]["updated_at"]) if rows else None

    async def exit_events(self, client_order_id: str) -> list[dict[str, object]]:
        rows = await self._rows(
            "SELECT state, at, detail, reply FROM exit_events WHERE client_order_id = ? ORDER BY id",
            client_order_id,
        )
        return [
            {
                "state": r["state"],
                "at": r["at"],
                "detail": r["detail"],
                "reply": json.loads(r["reply"]) if r["reply"] else None,
            }
            for r in rows
        ]

    async def close_external(
        self, position: Position, broker_quantity: float, detail: str, wall: float
    ) -> None:
        """Journal a position closed outside tickguard (no order) and mark it closed, in one
        commit. Once per position: a second call for it is a StoreConflict (a StoreError)."""
        async with self._sql.tx():
            await self._sql.run(
                "INSERT INTO external_closes (position_id, symbol, side, quantity, entry_price,"
                " broker_quantity, detail, at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    position.id,
                    position.symbol,
                    position.side.value,
                    position.spec.quantity,
                    position.spec.entry_price,
                    broker_quantity,
                    detail,
                    wall,
                ),
            )
            await _save_position(self._sql, position, wall)

    async def external_closes(self, limit: int = 1000) -> list[dict[str, object]]:
        rows = await self._rows(
            "SELECT * FROM external_closes ORDER BY at DESC, id DESC LIMIT ?", limit
        )
        return [dict(r) for r in rows]

    # -- audit ----------------------------------------------------------

    async def audit(self, action: str, detail: Mapping[str, object], wall: float) -> None:
        """Record a mutating call; the log keeps the newest KEEP_AUDIT entries."""
        async with self._sql.tx():
            new_id = await self._sql.insert(
                "INSERT INTO audit (at, action, detail) VALUES (?, ?, ?)",
                (wall, action, json.dumps(detail, sort_keys=True, default=str)),
            )
            await self._sql.run("DELETE FROM audit WHERE id <= ?", (new_id - KEEP_AUDIT,))

    async def audit_log(self, limit: int = 100) -> list[dict[str, object]]:
        rows = await self._rows("SELECT * FROM audit ORDER BY id DESC LIMIT ?", limit)
        return [
            {"at": r["at"], "action": r["action"], "detail": json.loads(r["detail"])} for r in rows
        ]

    # -- paper broker fills ---------------------------------------------

    async def record_paper_fill(
        self, report: OrderReport, symbol: str, transaction: str, quantity: float, wall: float
    ) -> None:
        """Record an order the paper broker filled, and its trade on the paper account,
        in one commit."""
        async with self._sql.tx():
            assert report.fill_price is not None
            await _paper_trade(
                self._sql,
                symbol,
                transaction.lower(),
                quantity,
                report.fill_price,
                report.client_order_id,
                wall,
            )
            await self._sql.run(
                "INSERT INTO paper_fills (broker_order_id, client_order_id, symbol,"
                " transaction_type, quantity, price, filled_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    report.broker_order_id,
                    report.client_order_id,
                    symbol,
                    transaction,
                    quantity,
                    report.fill_price,
                    wall,
                ),
            )

    async def record_paper_trade(
        self, symbol: str, side: str, quantity: float, price: float, wall: float
    ) -> Holding | None:
        """A trade on the paper account made outside tickguard; the net position after it."""
        async with self._sql.tx():
            return await _paper_trade(self._sql, symbol, side, quantity, price, None, wall)

    async def paper_positions(self) -> list[Holding]:
        """The paper account's open positions."""
        rows = await self._rows("SELECT * FROM paper_positions ORDER BY symbol")
        return [Holding(r["symbol"], r["quantity"], r["average_price"]) for r in rows]

    async def paper_position(self, symbol: str) -> Holding | None:
        rows = await self._rows("SELECT * FROM paper_positions WHERE symbol = ?", symbol)
        return (
            Holding(rows[0]["symbol"], rows[0]["quantity"], rows[0]["average_price"])
            if rows
            else None
        )

    async def paper_fill(self, client_order_id: str) -> OrderReport | None:
        """The first paper fill of a client order id."""
        rows = await self._rows(
            "SELECT * FROM paper_fills WHERE client_order_id = ? ORDER BY rowid LIMIT 1",
            client_order_id,
        )
        if not rows:
            return None
        row = rows[0]
        return OrderReport(
            row["client_order_id"],
            row["broker_order_id"],
            OrderStatus.FILLED,
            row["price"],
            filled_quantity=row["quantity"],
        )

    async def paper_fill_count(self, client_order_id: str | None = None) -> int:
        if client_order_id is None:
            rows = await self._rows("SELECT COUNT(*) AS n FROM paper_fills")
        else:
            rows = await self._rows(
                "SELECT COUNT(*) AS n FROM paper_fills WHERE client_order_id = ?", client_order_id
            )
        return int(rows[0]["n"])

    # -- the safety net's stops (docs/safety-net.md) -------------------------

    async def net_intent(
        self, position: Position, quantity: float, trigger: float, wall: float
    ) -> int:
        """Journal a stop about to be placed for `position` (durably, before the broker is
        asked); its row id. PositionExists when the symbol has a live stop row already."""
        try:
            async with self._sql.tx():
                new_id = await self._sql.insert(
                    "INSERT INTO safety_net_stops (position_id, symbol, side, quantity,"
                    " trigger_price, state, created_at, updated_at)"
                    " VALUES (?, ?, ?, ?, ?, 'placing', ?, ?)",
                    (
                        position.id,
                        position.symbol,
                        position.side.value,
                        quantity,
                        trigger,
                        wall,
                        wall,
                    ),
                )
        except StoreConflict as exc:
            raise PositionExists(position.symbol) from exc
        return new_id

    async def net_update(
        self,
        row: int,
        state: str,
        wall: float,
        *,
        stop_id: str | None = None,
        quantity: float | None = None,
        trigger: float | None = None,
        order_id: str | None = None,
    ) -> None:
        """A stop's row after the broker answered: its state, and what changed."""
        async with self._sql.tx():
            await self._sql.run(
                "UPDATE safety_net_stops SET state = ?, stop_id = COALESCE(?, stop_id),"
                " quantity = COALESCE(?, quantity), trigger_price = COALESCE(?, trigger_price),"
                " order_id = COALESCE(?, order_id), updated_at = ? WHERE id = ?",
                (state, stop_id, quantity, trigger, order_id, wall, row),
            )

    async def net_live(self) -> list[NetRow]:
        """The stops that may be live at the broker: placed, or being placed."""
        rows = await self._rows(
            "SELECT * FROM safety_net_stops WHERE state IN ('placing', 'active') ORDER BY id"
        )
        return [_net_row(r) for r in rows]

    async def net_rows(self, limit: int = 1000) -> list[NetRow]:
        """Every stop's row, newest first."""
        rows = await self._rows("SELECT * FROM safety_net_stops ORDER BY id DESC LIMIT ?", limit)
        return [_net_row(r) for r in rows]

    # -- the paper broker's stops ----------------------------------------

    async def paper_stop_place(
        self, symbol: str, side: Side, quantity: float, trigger: float, wall: float
    ) -> BrokerStop:
        async with self._sql.tx():
            new_id = await self._sql.insert(
                "INSERT INTO paper_stops (symbol, side, quantity, trigger_price, state,"
                " created_at, updated_at) VALUES (?, ?, ?, ?, 'active', ?, ?)",
                (symbol, side.value, quantity, trigger, wall, wall),
            )
        return BrokerStop(f"{PAPER_STOP_PREFIX}{new_id}", symbol, side, quantity, trigger)

    async def paper_stop(self, stop_id: str) -> BrokerStop | None:
        rows = await self._rows("SELECT * FROM paper_stops WHERE id = ?", _paper_stop_row(stop_id))
        return _paper_stop(rows[0]) if rows else None

    async def paper_stops(self, limit: int = 10_000) -> list[BrokerStop]:
        """The paper broker's stops, active ones first, then the newest."""
        rows = await self._rows(
            "SELECT * FROM paper_stops ORDER BY state != 'active', id DESC LIMIT ?", limit
        )
        return [_paper_stop(r) for r in rows]

    async def paper_stop_change(
        self, stop_id: str, wall: float, *, quantity: float, trigger: float
    ) -> BrokerStop | None:
        """Move an active paper stop; the stop after (unchanged unless it was active)."""
        async with self._sql.tx():
            await self._sql.run(
                "UPDATE paper_stops SET quantity = ?, trigger_price = ?, updated_at = ?"
                " WHERE id = ? AND state = 'active'",
                (quantity, trigger, wall, _paper_stop_row(stop_id)),
            )
        return await self.paper_stop(stop_id)

    async def paper_stop_cancel(self, stop_id: str, wall: float) -> BrokerStop | None:
        """Cancel an active paper stop; the stop after (unchanged unless it was active)."""
        async with self._sql.tx():
            await self._sql.run(
                "UPDATE paper_stops SET state = 'cancelled', updated_at = ?"
                " WHERE id = ? AND state = 'active'",
                (wall, _paper_stop_row(stop_id)),
            )
        return await self.paper_stop(stop_id)

    async def paper_stop_fire(self, stop: BrokerStop, price: float, wall: float) -> None:
        """An active paper stop fired: it trades its quantity at `price` on the paper
        account, in the same commit as its state."""
        async with self._sql.tx():
            changed = await self._sql.run(
                "UPDATE paper_stops SET state = 'triggered', fill_price = ?, updated_at = ?"
                " WHERE id = ? AND state = 'active'",
                (price, wall, _paper_stop_row(stop.stop_id)),
            )
            if changed:
                side = "sell" if stop.position_side is Side.LONG else "buy"
                await _paper_trade(self._sql, stop.symbol, side, stop.quantity, price, None, wall)

    # -- last-known-good addresses ---------------------------------------

    async def remember_addresses(self, host: str, addresses: list[str], wall: float) -> None:
        """Keep the addresses `host` last resolved to (for when every resolver fails)."""
        async with self._sql.tx():
            await self._sql.run(
                "INSERT INTO dns_cache (host, addresses, resolved_at) VALUES (?, ?, ?)"
                " ON CONFLICT (host) DO UPDATE SET addresses = excluded.addresses,"
                " resolved_at = excluded.resolved_at",
                (host, json.dumps(addresses), wall),
            )

    async def known_addresses(self, host: str) -> tuple[list[str], float] | None:
        """The last-known-good addresses of `host` and when they were resolved."""
        rows = await self._rows("SELECT addresses, resolved_at FROM dns_cache WHERE host = ?", host)
        if not rows:
            return None
        return [str(a) for a in json.loads(rows[0]["addresses"])], float(rows[0]["resolved_at"])


class _SqliteSql:
    """The `Sql` of a `Store`: its one SQLite connection, called synchronously. No call
    ever suspends, so `run_now` can run any `AsyncStore` call to its end at once."""

    def __init__(self, store: Store) -> None:
        self._store = store

    async def run(self, sql: str, args: Sequence[object] = ()) -> int:
        return self._execute(sql, args).rowcount

    async def insert(self, sql: str, args: Sequence[object] = ()) -> int:
        row = self._execute(sql + " RETURNING id", args).fetchone()
        return int(row[0])

    async def rows(self, sql: str, args: Sequence[object] = ()) -> list[Row]:
        cursor = self._execute(sql, args)
        cursor.row_factory = sqlite3.Row
        return list(cursor.fetchall())

    @asynccontextmanager
    async def tx(self) -> AsyncIterator[None]:
        with self._store._tx():
            yield

    def _execute(self, sql: str, args: Sequence[object]) -> sqlite3.Cursor:
        try:
            return self._store._db.execute(sql, tuple(args))
        except sqlite3.IntegrityError as exc:
            raise StoreConflict(f"state store {self._store.path}: {exc}") from exc
        except sqlite3.Error as exc:
            raise StoreError(f"state store {self._store.path}: {exc}") from exc


class _SqliteAsync(AsyncStore):
    """`Store.aio`: the store's logic on its SQLite connection."""

    def __init__(self, store: Store) -> None:
        super().__init__(_SqliteSql(store), store.install_id)
        self._store = store
        self.lost = store.lost
        self.immediate = True

    async def check(self) -> None:
        self._store.check()


def as_async(store: Store | AsyncStore) -> AsyncStore:
    """The awaitable store of either kind (the daemon's parts take both)."""
    return store.aio if isinstance(store, Store) else store


_T = TypeVar("_T")


def run_now(call: Coroutine[Any, Any, _T]) -> _T:
    """Run a call of a SQLite `Store`'s `AsyncStore` to its end, here and now (also any
    coroutine that awaits nothing else: the guard loop's sweep on SQLite, in tests).

    Its awaits never suspend (`_SqliteSql` calls SQLite synchronously), so the
    coroutine ends on its first step: no event loop is needed, and none is
    yielded to in the middle of a transaction (as before the logic was shared
    with PostgreSQL)."""
    try:
        call.send(None)
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]
    call.close()
    raise RuntimeError("a SQLite store call suspended")


class Store:
    """The daemon's durable state in `<state_dir>/tickguard.sqlite3`.

    Losing it must never look like a first start: config positions would be
    armed again, and one that already exited would be sold a second time.
    So the store's install id is also kept beside it (`tickguard.install-id`);
    `lost` says why a store opened as new is in fact a lost one (its file
    emptied, or its id changed), and the caller then holds the config's
    positions back. While running, `check()` notices the file vanishing,
    being replaced or emptied (the daemon then stops, and `salvage()` writes
    the open database back where it was).
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.lost: str | None = None
        self._id_path = path.with_suffix(".install-id")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            if path.exists() and path.stat().st_size == 0:
                aside = path.with_name(f"{path.name}.empty-{int(time.time())}")
                path.rename(aside)
                self.lost = f"{path} was empty (0 bytes; set aside as {aside.name})"
            previous_id = _read_install_id(self._id_path)
            self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=True)
            self._identity = _identity(os.stat(path))
        except (OSError, sqlite3.Error) as exc:
            raise StoreError(f"cannot open the state store {path}: {exc}") from exc
        try:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("PRAGMA foreign_keys=ON")
            self._db.execute("PRAGMA busy_timeout=5000")
            self._migrate()
        except (OSError, sqlite3.Error, StoreError) as exc:
            self._db.close()
            if isinstance(exc, StoreError):
                raise
            raise StoreError(f"cannot open the state store {path}: {exc}") from exc
        self.install_id = self._install_id()
        if previous_id is not None and previous_id != self.install_id and self.lost is None:
            self.lost = f"its install id is {self.install_id}, but {previous_id} was kept beside it"
        try:
            if previous_id != self.install_id:
                _write_install_id(self._id_path, self.install_id)
        except OSError as exc:
            self._db.close()
            raise StoreError(f"cannot open the state store {path}: {exc}") from exc
        self.aio: AsyncStore = _SqliteAsync(self)  # the same store, awaitable

    @classmethod
    def in_dir(cls, state_dir: Path) -> Store:
        return cls(state_dir / DB_NAME)

    def close(self) -> None:
        self._db.close()

    def check(self) -> None:
        """StoreError if the database file vanished, was replaced or emptied under us."""
        try:
            now = os.stat(self.path)
        except FileNotFoundError:
            raise StoreError(f"the state store {self.path} vanished while running") from None
        except OSError as exc:
            raise StoreError(f"the state store {self.path}: {exc}") from exc
        if _identity(now) != self._identity:
            raise StoreError(f"the state store {self.path} was replaced while running")
        if now.st_size == 0:
            raise StoreError(f"the state store {self.path} was emptied while running")

    def salvage(self) -> bool:
        """If the database file vanished, write the open database back there; True if done."""
        if self.path.exists():
            return False
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            copy = sqlite3.connect(self.path)
            try:
                self._db.backup(copy)
            finally:
                copy.close()
            _write_install_id(self._id_path, self.install_id)
        except (OSError, sqlite3.Error):
            return False
        return True

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """One durable transaction; any SQLite failure surfaces as StoreError.

        The file is checked first: a write into a vanished or emptied database
        would be lost with it.
        """
        self.check()
        try:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
                self._db.execute("COMMIT")
            except BaseException:
                # A failed statement or COMMIT (a full disk) may have rolled back
                # already, or left the transaction open: never leave it open.
                if self._db.in_transaction:
                    with contextlib.suppress(sqlite3.Error):
                        self._db.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:
            raise StoreError(f"state store {self.path}: {exc}") from exc

    def _migrate(self) -> None:
        (version,) = self._db.execute("PRAGMA user_version").fetchone()
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"{self.path} has schema version {version}; this tickguard knows up to"
                f" {SCHEMA_VERSION} (downgrade is not supported)"
            )
        for target in range(version, SCHEMA_VERSION):
            with self._tx() as db:
                for statement in statements(MIGRATIONS[target]):
                    db.execute(statement)
                db.execute(f"PRAGMA user_version = {target + 1}")

    def schema_version(self) -> int:
        return int(self._db.execute("PRAGMA user_version").fetchone()[0])

    def _install_id(self) -> str:
        """A random id of this state store: part of every client order id, so ids never
        repeat across a wiped state directory."""
        row = self._db.execute("SELECT value FROM meta WHERE key = 'install_id'").fetchone()
        if row:
            return str(row[0])
        new = new_install_id()
        with self._tx() as db:
            db.execute("INSERT INTO meta (key, value) VALUES ('install_id', ?)", (new,))
        return new

    # -- the store's calls, run here and now (see `run_now`) --------------------------

    def add_position(self, spec: PositionSpec, wall: float, origin: str = "api") -> Position:
        return run_now(self.aio.add_position(spec, wall, origin))

    def save_positions(self, positions: Iterable[Position], wall: float) -> None:
        return run_now(self.aio.save_positions(positions, wall))

    def delete_position(self, position: Position, wall: float) -> None:
        return run_now(self.aio.delete_position(position, wall))

    def positions(self, *, active_only: bool = True) -> list[Position]:
        return run_now(self.aio.positions(active_only=active_only))

    def latest_position(self, symbol: str) -> Position | None:
        return run_now(self.aio.latest_position(symbol))

    def closed_at(self, symbol: str) -> float | None:
        return run_now(self.aio.closed_at(symbol))

    def position(self, position_id: int) -> Position | None:
        return run_now(self.aio.position(position_id))

    def journal_exit(self, exit: Exit, position: Position, wall: float) -> None:
        return run_now(self.aio.journal_exit(exit, position, wall))

    def update_exit(
        self,
        exit: Exit,
        wall: float,
        reply: OrderReport | None = None,
        position: Position | None = None,
    ) -> None:
        return run_now(self.aio.update_exit(exit, wall, reply, position))

    def unfinished_exits(self) -> list[Exit]:
        return run_now(self.aio.unfinished_exits())

    def exits(self, limit: int = 1000) -> list[ExitRecord]:
        return run_now(self.aio.exits(limit))

    def exit_record(self, client_order_id: str) -> ExitRecord | None:
        return run_now(self.aio.exit_record(client_order_id))

    def exit_events(self, client_order_id: str) -> list[dict[str, object]]:
        return run_now(self.aio.exit_events(client_order_id))

    def close_external(
        self, position: Position, broker_quantity: float, detail: str, wall: float
    ) -> None:
        return run_now(self.aio.close_external(position, broker_quantity, detail, wall))

    def external_closes(self, limit: int = 1000) -> list[dict[str, object]]:
        return run_now(self.aio.external_closes(limit))

    def audit(self, action: str, detail: Mapping[str, object], wall: float) -> None:
        return run_now(self.aio.audit(action, detail, wall))

    def audit_log(self, limit: int = 100) -> list[dict[str, object]]:
        return run_now(self.aio.audit_log(limit))

    def record_paper_fill(
        self, report: OrderReport, symbol: str, transaction: str, quantity: float, wall: float
    ) -> None:
        return run_now(self.aio.record_paper_fill(report, symbol, transaction, quantity, wall))

    def record_paper_trade(
        self, symbol: str, side: str, quantity: float, price: float, wall: float
    ) -> Holding | None:
        return run_now(self.aio.record_paper_trade(symbol, side, quantity, price, wall))

    def paper_positions(self) -> list[Holding]:
        return run_now(self.aio.paper_positions())

    def paper_position(self, symbol: str) -> Holding | None:
        return run_now(self.aio.paper_position(symbol))

    def paper_fill(self, client_order_id: str) -> OrderReport | None:
        return run_now(self.aio.paper_fill(client_order_id))

    def paper_fill_count(self, client_order_id: str | None = None) -> int:
        return run_now(self.aio.paper_fill_count(client_order_id))

    def net_intent(self, position: Position, quantity: float, trigger: float, wall: float) -> int:
        return run_now(self.aio.net_intent(position, quantity, trigger, wall))

    def net_update(
        self,
        row: int,
        state: str,
        wall: float,
        *,
        stop_id: str | None = None,
        quantity: float | None = None,
        trigger: float | None = None,
        order_id: str | None = None,
    ) -> None:
        return run_now(
            self.aio.net_update(
                row,
                state,
                wall,
                stop_id=stop_id,
                quantity=quantity,
                trigger=trigger,
                order_id=order_id,
            )
        )

    def net_live(self) -> list[NetRow]:
        return run_now(self.aio.net_live())

    def net_rows(self, limit: int = 1000) -> list[NetRow]:
        return run_now(self.aio.net_rows(limit))

    def paper_stop_place(
        self, symbol: str, side: Side, quantity: float, trigger: float, wall: float
    ) -> BrokerStop:
        return run_now(self.aio.paper_stop_place(symbol, side, quantity, trigger, wall))

    def paper_stop(self, stop_id: str) -> BrokerStop | None:
        return run_now(self.aio.paper_stop(stop_id))

    def paper_stops(self, limit: int = 10000) -> list[BrokerStop]:
        return run_now(self.aio.paper_stops(limit))

    def paper_stop_change(
        self, stop_id: str, wall: float, *, quantity: float, trigger: float
    ) -> BrokerStop | None:
        return run_now(
            self.aio.paper_stop_change(stop_id, wall, quantity=quantity, trigger=trigger)
        )

    def paper_stop_cancel(self, stop_id: str, wall: float) -> BrokerStop | None:
        return run_now(self.aio.paper_stop_cancel(stop_id, wall))

    def paper_stop_fire(self, stop: BrokerStop, price: float, wall: float) -> None:
        return run_now(self.aio.paper_stop_fire(stop, price, wall))

    def remember_addresses(self, host: str, addresses: list[str], wall: float) -> None:
        return run_now(self.aio.remember_addresses(host, addresses, wall))

    def known_addresses(self, host: str) -> tuple[list[str], float] | None:
        return run_now(self.aio.known_addresses(host))

    # -- helpers --------------------------------------------------------

    def _rows(self, sql: str, *args: object) -> list[sqlite3.Row]:
        cursor = self._db.execute(sql, args)
        cursor.row_factory = sqlite3.Row
        return list(cursor.fetchall())


INSTALL_ID_MAX = 64  # bytes read from the install-id file (it holds 6 hex digits)


@dataclass(frozen=True, slots=True)
class NetRow:
    """One safety-net stop as journalled (docs/safety-net.md)."""

    row: int
    position_id: int
    symbol: str
    side: Side
    quantity: float
    trigger: float
    created_at: float  # wall clock
    stop_id: str | None = None  # None while being placed (or never placed)
    state: str = "placing"  # placing | active | triggered | cancelled | not_placed
    order_id: str | None = None


def _net_row(r: Row) -> NetRow:
    return NetRow(
        r["id"],
        r["position_id"],
        r["symbol"],
        Side(r["side"]),
        r["quantity"],
        r["trigger_price"],
        r["created_at"],
        r["stop_id"],
        r["state"],
        r["order_id"],
    )


PAPER_STOP_PREFIX = "paper-stop-"


def _paper_stop_row(stop_id: str) -> int:
    """The row of a paper stop id (-1, no row, for any other text)."""
    number = stop_id.removeprefix(PAPER_STOP_PREFIX)
    return int(number) if stop_id.startswith(PAPER_STOP_PREFIX) and number.isdigit() else -1


def _paper_stop(r: Row) -> BrokerStop:
    state = StopState(r["state"])
    return BrokerStop(
        f"{PAPER_STOP_PREFIX}{r['id']}",
        r["symbol"],
        Side(r["side"]),
        r["quantity"],
        r["trigger_price"],
        state,
        f"{PAPER_STOP_PREFIX}{r['id']}-order" if state is StopState.TRIGGERED else None,
    )


def _identity(st: os.stat_result) -> tuple[int, int]:
    return st.st_dev, st.st_ino


def _read_install_id(path: Path) -> str | None:
    """The install id kept beside the database, or None (no file, or not a small regular file)."""
    try:
        text = read_small(path, INSTALL_ID_MAX).decode("ascii", "replace").strip()
    except OSError:  # missing, unreadable, or not a small regular file
        return None
    return text or None


def _write_install_id(path: Path, install_id: str) -> None:
    """Atomically and durably: a crash leaves the old file or the new one."""
    tmp = path.with_suffix(".install-id.tmp")
    with tmp.open("w", encoding="ascii") as f:
        f.write(install_id + "\n")
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


async def _paper_trade(
    sql: Sql,
    symbol: str,
    side: str,
    quantity: float,
    price: float,
    client_order_id: str | None,
    wall: float,
) -> Holding | None:
    """Record one paper trade and move the paper account's net position by it."""
    await sql.run(
        "INSERT INTO paper_trades (symbol, side, quantity, price, client_order_id, at)"
        " VALUES (?, ?, ?, ?, ?, ?)",
        (symbol, side, quantity, price, client_order_id, wall),
    )
    rows = await sql.rows(
        "SELECT quantity, average_price FROM paper_positions WHERE symbol = ?", (symbol,)
    )
    before = Holding(symbol, rows[0]["quantity"], rows[0]["average_price"]) if rows else None
    after = apply_trade(before, symbol, quantity if side == "buy" else -quantity, price)
    if after is None:
        await sql.run("DELETE FROM paper_positions WHERE symbol = ?", (symbol,))
    else:
        await sql.run(
            "INSERT INTO paper_positions (symbol, quantity, average_price, updated_at)"
            " VALUES (?, ?, ?, ?) ON CONFLICT (symbol) DO UPDATE SET quantity = excluded.quantity,"
            " average_price = excluded.average_price, updated_at = excluded.updated_at",
            (symbol, after.quantity, after.average_price, wall),
        )
    return after


def new_install_id() -> str:
    """A random id for a new store (part of every client order id: docs/api.md)."""
    return secrets.token_hex(3)


def statements(script: str) -> list[str]:
    """Split a migration script into statements (no semicolons inside our statements)."""
    lines = [line for line in script.splitlines() if not line.strip().startswith("--")]
    return [s.strip() for s in "\n".join(lines).split(";") if s.strip()]


async def _save_position(sql: Sql, position: Position, wall: float) -> None:
    await sql.run(
        "UPDATE positions SET state = ?, trail_anchor = ?, exit_seq = ?, exit_id = ?,"
        " quantity = ?, entry_price = ?, confirmed = ?, updated_at = ? WHERE id = ?",
        (
            position.state.value,
            position.trail_anchor,
            position.exit_seq,
            position.exit_id,
            position.spec.quantity,
            position.spec.entry_price,
            int(position.confirmed),
            wall,
            position.id,
        ),
    )


async def _event(sql: Sql, exit: Exit, wall: float, reply: OrderReport | None) -> None:
    await sql.run(
        "INSERT INTO exit_events (client_order_id, state, at, detail, reply) VALUES (?, ?, ?, ?, ?)",
        (
            exit.client_order_id,
            exit.state.value,
            wall,
            exit.detail,
            json.dumps(reply.as_reply()) if reply is not None else None,
        ),
    )


def _position(row: Row) -> Position:
    spec = PositionSpec(
        symbol=row["symbol"],
        side=Side(row["side"]),
        quantity=row["quantity"],
        entry_price=row["entry_price"],
        stop_loss=row["stop_loss"],
        take_profit=row["take_profit"],
        trailing_stop=row["trailing_stop"],
    )
    return Position(
        id=row["id"],
        spec=spec,
        state=PositionState(row["state"]),
        trail_anchor=row["trail_anchor"],
        exit_seq=row["exit_seq"],
        exit_id=row["exit_id"],
        origin=row["origin"],
        confirmed=bool(row["confirmed"]),
        created_at=row["created_at"],
    )


def _exit(row: Row) -> Exit:
    return Exit(
        client_order_id=row["client_order_id"],
        position_id=row["position_id"],
        symbol=row["symbol"],
        side=Side(row["side"]),
        quantity=row["quantity"],
        reason=ExitReason(row["reason"]),
        price_source=PriceSource(row["price_source"]),
        trigger_price=row["trigger_price"],
        decided_at=row["decided_at"],
        state=ExitState(row["state"]),
        attempts=row["attempts"],
        fill_price=row["fill_price"],
        filled_quantity=row["filled_quantity"],
        broker_order_id=row["broker_order_id"],
        detail=row["detail"],
    )
