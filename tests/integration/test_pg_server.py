"""The throw-away PostgreSQL server (pg_cluster.py) through psycopg's async API.

It pins what the PostgreSQL store and the failover tests build on: a server of
our own on loopback, a database per test, and the session advisory lock that
elects the leader (held by one session, refused to every other, released when
the holding session ends).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import psycopg
import pytest

if TYPE_CHECKING:
    from pg_cluster import PgServer

LEADER_LOCK = 42  # any bigint; the store will pick its own
RELEASE_TIMEOUT = 5  # seconds a closed session's backend may take to exit (lock_timeout)


async def try_lock(conn: psycopg.AsyncConnection[tuple[object, ...]]) -> bool:
    cursor = await conn.execute("SELECT pg_try_advisory_lock(%s)", (LEADER_LOCK,))
    row = await cursor.fetchone()
    assert row is not None
    return row[0] is True


async def test_async_connection_runs_a_query(pg_url: str) -> None:
    """psycopg.AsyncConnection connects to the test's database on loopback and answers SELECT 1."""
    async with await psycopg.AsyncConnection.connect(pg_url) as conn:
        cursor = await conn.execute("SELECT 1, current_database(), inet_server_addr()::text")
        assert await cursor.fetchone() == (1, pg_url.rsplit("/", 1)[1], "127.0.0.1/32")


async def test_advisory_lock_is_held_by_one_session_until_it_ends(pg_url: str) -> None:
    """pg_try_advisory_lock is granted to one session, refused to another, and passes to
    that other once the first connection closes."""
    first = await psycopg.AsyncConnection.connect(pg_url, autocommit=True)
    second = await psycopg.AsyncConnection.connect(pg_url, autocommit=True)
    third = await psycopg.AsyncConnection.connect(pg_url, autocommit=True)
    try:
        assert await try_lock(first)
        assert not await try_lock(second)
        assert await try_lock(first)  # re-entrant for its holder, as session locks are
        await first.close()
        # The lock is released when the closed session's backend exits, an instant after
        # the close: wait for it in the lock queue, bounded by the server.
        await second.execute(f"SET lock_timeout = '{RELEASE_TIMEOUT:g}s'")
        await second.execute("SELECT pg_advisory_lock(%s)", (LEADER_LOCK,))
        assert await try_lock(second)
        assert not await try_lock(third)
    finally:
        for conn in (first, second, third):
            await conn.close()


def test_each_test_gets_its_own_database(pg_server: PgServer, pg_url: str) -> None:
    """pg_url is a fresh database on the session's server, different from the next one."""
    other = pg_server.new_database()
    assert other != pg_url
    assert pg_url.startswith(f"postgresql://tickguard@127.0.0.1:{pg_server.port}/")
    assert pg_server.port != 5432
    with psycopg.connect(other) as conn:
        row = conn.execute("SELECT current_database()").fetchone()
    assert row is not None and other.endswith("/" + row[0])


def test_server_stops_and_starts_on_the_same_port(pg_server: PgServer, pg_url: str) -> None:
    """stop() refuses connections and start() brings the server back with its databases."""
    pg_server.stop()
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(pg_url, connect_timeout=5).close()
    pg_server.start()
    with psycopg.connect(pg_url) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_terminate_ends_one_session(pg_server: PgServer, pg_url: str) -> None:
    """terminate(pid) ends that session (its next query fails) and leaves others alone."""
    with psycopg.connect(pg_url) as victim, psycopg.connect(pg_url) as bystander:
        assert pg_server.terminate(victim.info.backend_pid)
        with pytest.raises(psycopg.OperationalError):
            victim.execute("SELECT 1")
        assert bystander.execute("SELECT 1").fetchone() == (1,)
