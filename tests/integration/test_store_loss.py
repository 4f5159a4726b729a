"""A state store lost under a running daemon, or between runs, never re-sells a closed position.

Issue 9, finding 5: a state dir deleted while running, or a 0-byte database,
was taken as a new store; the config's [[positions]] were armed again and a
position that had already exited was sold a second time.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import sqlite3
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tickguard.core.positions import PositionSpec, Side
from tickguard.errors import StoreError
from tickguard.store import DB_NAME, Store

LOOPBACK = "127.0.0.1"
STARTUP = 20.0
SPEC = PositionSpec("A", Side.LONG, 1.0, 100.0, stop_loss=90.0)


# -- the store on its own ---------------------------------------------------------


def test_a_deleted_database_is_noticed_and_salvaged(tmp_path: Path) -> None:
    """check() raises once the file is gone; salvage() writes the open database back."""
    store = Store.in_dir(tmp_path / "state")
    store.add_position(SPEC, 1.0)
    store.check()
    shutil.rmtree(tmp_path / "state")
    with pytest.raises(StoreError, match="vanished while running"):
        store.check()
    with pytest.raises(StoreError, match="vanished"):
        store.audit("x", {}, 2.0)  # no write goes into a file nobody will see again
    assert store.salvage()
    store.close()
    again = Store.in_dir(tmp_path / "state")
    assert again.lost is None and [p.symbol for p in again.positions()] == ["A"]
    again.close()


def test_an_emptied_or_replaced_database_is_noticed(tmp_path: Path) -> None:
    """Truncated to 0 bytes, or replaced by another file: check() raises, salvage() does nothing."""
    store = Store.in_dir(tmp_path)
    os.truncate(store.path, 0)
    with pytest.raises(StoreError, match="emptied"):
        store.check()
    assert not store.salvage()
    store.close()
    store = Store.in_dir(tmp_path / "b")
    replacement = tmp_path / "b" / "other"
    replacement.write_bytes(b"")
    replacement.replace(store.path)
    with pytest.raises(StoreError, match="replaced"):
        store.check()
    store.close()


def test_a_zero_byte_database_opens_as_a_lost_store(tmp_path: Path) -> None:
    """A 0-byte database is set aside, and the new store says it replaces a lost one."""
    (tmp_path / DB_NAME).write_bytes(b"")
    store = Store.in_dir(tmp_path)
    assert store.lost is not None and "was empty" in store.lost
    assert list(tmp_path.glob(f"{DB_NAME}.empty-*"))
    store.close()
    assert Store.in_dir(tmp_path).lost is None  # once set up again, it is the store


def test_a_store_whose_install_id_changed_is_lost(tmp_path: Path) -> None:
    """A database that vanished while the install id kept beside it stayed is a lost store."""
    first = Store.in_dir(tmp_path)
    first_id = first.install_id
    first.close()
    (tmp_path / DB_NAME).unlink()
    second = Store.in_dir(tmp_path)
    assert second.install_id != first_id
    assert second.lost is not None and first_id in second.lost
    second.close()


@pytest.mark.parametrize("kind", ["fifo", "huge", "directory"])
def test_a_hostile_install_id_file_is_ignored(tmp_path: Path, kind: str) -> None:
    """A FIFO, a huge file or a directory where the install id is kept never hangs or crashes."""
    id_path = tmp_path / "tickguard.install-id"
    if kind == "fifo":
        os.mkfifo(id_path)
    elif kind == "huge":
        id_path.write_bytes(b"x" * 1_000_000)
    else:
        id_path.mkdir()
    if kind == "directory":
        with pytest.raises(StoreError):  # cannot be replaced by the id file: a person must look
            Store.in_dir(tmp_path)
        return
    store = Store.in_dir(tmp_path)
    assert store.lost is None
    store.close()


def test_growth_from_add_and_drop_cycles_is_bounded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Audit entries and dropped positions beyond their bounds are pruned; the newest stay."""
    import tickguard.store as store_module

    monkeypatch.setattr(store_module, "KEEP_AUDIT", 20)
    monkeypatch.setattr(store_module, "KEEP_DROPPED", 10)
    store = Store.in_dir(tmp_path)
    for i in range(200):
        position = store.add_position(
            PositionSpec(f"S{i % 50}", Side.LONG, 1.0, 100.0, stop_loss=90.0), float(i)
        )
        store.audit("add_position", {"i": i}, float(i))
        store.delete_position(position, float(i))
    db = sqlite3.connect(store.path)
    (audits,) = db.execute("SELECT COUNT(*) FROM audit").fetchone()
    (rows,) = db.execute("SELECT COUNT(*) FROM positions").fetchone()
    db.close()
    assert audits == 20
    assert 50 <= rows <= 60  # each symbol's newest row, plus the newest 10 ids
    assert all(store.latest_position(f"S{i}") is not None for i in range(50))
    store.close()


# -- the daemon, as a process -------------------------------------------------------


class Run:
    """One `tickguard run` process, its stderr collected."""

    def __init__(self, config: Path, *args: str) -> None:
        self.config, self.args = config, args
        self.lines: list[str] = []
        self.url = ""
        self.process: asyncio.subprocess.Process | None = None
        self._listening = asyncio.Event()
        self._reader: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self.process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "tickguard", "run", "--config", str(self.config), *self.args,
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        self._reader = asyncio.create_task(self._read())
        async with asyncio.timeout(STARTUP):
            await self._listening.wait()

    async def _read(self) -> None:
        assert self.process is not None and self.process.stderr is not None
        while line := (await self.process.stderr.readline()).decode(errors="replace"):
            self.lines.append(line.rstrip())
            if m := re.search(r"\[HTTP\] listening on 127\.0\.0\.1:(\d+)", line):
                self.url = f"http://{LOOPBACK}:{m.group(1)}"
                self._listening.set()

    async def get(self, path: str) -> Any:
        async with aiohttp.ClientSession() as http, http.get(self.url + path) as r:
            assert r.status == 200, await r.text()
            return await r.json()

    async def wait(self, timeout: float = 20.0) -> int:
        assert self.process is not None
        async with asyncio.timeout(timeout):
            code = await self.process.wait()
            if self._reader is not None:
                await self._reader
        return code

    def kill(self) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.kill()


def config_text(tmp_path: Path, feed_url: str) -> str:
    return f"""
[daemon]
state_dir = "{tmp_path / "state"}"
[http]
listen = "127.0.0.1:0"
[feed]
url = "{feed_url}"
ping_interval = 0.5
[dns]
fallback_servers = []
[guard]
sweep_interval = 0.1
[market]
always_open = true
[[positions]]
symbol = "BOSCHLTD"
side = "long"
quantity = 5
entry_price = 700.0
stop_loss = 600.0
"""


def fills(state: Path) -> int:
    db = sqlite3.connect(f"file:{state / DB_NAME}?mode=ro", uri=True)
    try:
        (count,) = db.execute("SELECT COUNT(*) FROM paper_fills").fetchone()
    finally:
        db.close()
    return int(count)


async def exited(run: Run) -> list[dict[str, Any]]:
    """The journal's exits once one is filled."""
    async with asyncio.timeout(20):
        while True:  # polling the API for a condition, not synchronisation
            exits: list[dict[str, Any]] = (await run.get("/api/v1/exits"))["exits"]
            if any(e["state"] == "filled" for e in exits):
                return exits
            await asyncio.sleep(0.05)


@pytest.mark.slow
async def test_state_dir_deleted_while_running_stops_and_nothing_is_sold_again(
    tmp_path: Path, simulator: Any
) -> None:
    """Deleted under the daemon: exit 1, the store written back, and a restart sells nothing."""
    sim = await simulator(symbols=2, rate=20)
    await sim.set_price("BOSCHLTD", 550.0)  # below the stop: the position exits at once
    config = tmp_path / "config.toml"
    config.write_text(config_text(tmp_path, sim.ws_url))
    first = Run(config)
    try:
        await first.start()
        await exited(first)
        assert fills(tmp_path / "state") == 1
        shutil.rmtree(tmp_path / "state")
        assert await first.wait() == 1
    finally:
        first.kill()
    assert any("vanished while running" in line for line in first.lines), first.lines
    assert any("written back to" in line for line in first.lines), first.lines

    second = Run(config)
    try:
        await second.start()
        positions = (await second.get("/api/v1/positions?state=all"))["positions"]
        assert [(p["symbol"], p["state"]) for p in positions] == [("BOSCHLTD", "closed")]
        assert (await second.get("/api/v1/positions"))["positions"] == []
        assert fills(tmp_path / "state") == 1
    finally:
        second.kill()
        await second.wait()


@pytest.mark.slow
async def test_a_lost_store_holds_config_positions_back_until_rearm(
    tmp_path: Path, simulator: Any
) -> None:
    """After the database was emptied, config positions are not armed; `run --rearm` arms them."""
    sim = await simulator(symbols=2, rate=20)
    config = tmp_path / "config.toml"
    config.write_text(config_text(tmp_path, sim.ws_url))
    first = Run(config)
    try:
        await first.start()
        assert [p["symbol"] for p in (await first.get("/api/v1/positions"))["positions"]] == [
            "BOSCHLTD"
        ]
    finally:
        first.kill()
        await first.wait()
    os.truncate(tmp_path / "state" / DB_NAME, 0)
    for suffix in ("-wal", "-shm"):
        (tmp_path / "state" / f"{DB_NAME}{suffix}").unlink(missing_ok=True)

    held = Run(config)
    try:
        await held.start()
        assert (await held.get("/api/v1/positions"))["positions"] == []
        health = await held.get("/api/v1/monitoring/connection-health")
        assert health["positions"]["held_back"] == ["BOSCHLTD"]
        assert health["status"] == "degraded"
        async with aiohttp.ClientSession() as http, http.get(held.url + "/readyz") as r:
            assert r.status == 503 and "BOSCHLTD" in (await r.json())["message"]
    finally:
        held.kill()
        await held.wait()
    assert any("NOT armed" in line and "BOSCHLTD" in line for line in held.lines), held.lines

    # The operator checked the account and says so once.
    (tmp_path / "state" / DB_NAME).unlink()
    rearmed = Run(config, "--rearm")
    try:
        await rearmed.start()
        positions = (await rearmed.get("/api/v1/positions"))["positions"]
        assert [p["symbol"] for p in positions] == ["BOSCHLTD"]
    finally:
        rearmed.kill()
        await rearmed.wait()


def test_a_full_store_fails_one_write_and_recovers(tmp_path: Path) -> None:
    """A write refused as full says so, leaves no transaction open, and the next write works."""
    store = Store.in_dir(tmp_path)
    (pages,) = store._db.execute("PRAGMA page_count").fetchone()
    store._db.execute(f"PRAGMA max_page_count = {pages}")  # SQLITE_FULL, as on a full disk
    with pytest.raises(StoreError, match="full"):
        for i in range(1000):
            store.audit("fill", {"padding": "x" * 1000, "i": i}, float(i))
    assert not store._db.in_transaction
    store._db.execute("PRAGMA max_page_count = 1073741823")
    store.add_position(SPEC, 1.0)
    assert [p.symbol for p in store.positions()] == ["A"]
    store.close()
