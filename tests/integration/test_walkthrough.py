"""The README's "Try it by hand", run as written: simulator, config, daemon, status, curl.

Each block of the walkthrough is marked in README.md by a line `<!-- try: NAME -->`
right before its fence, and is read from there, so the README and this test
cannot drift. The only changes made to the text are explicit substitutions:
the fixed ports become port 0 (the real ones are read from the servers' own
`listening on` lines and put into the later commands) and /tmp/tickguard-try
becomes a per-test directory. Everything binds 127.0.0.1; the config keeps
DNS on the machine (`fallback_servers = []`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import tomllib
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tickguard.simulator import Simulator, symbol_names

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
BLOCK = re.compile(r"^<!-- try: ([\w-]+) -->\n```(\w+)\n(.*?)^```$", re.M | re.S)
BLOCKS = {  # name -> fence info string, in README order
    "simulator": "sh",
    "config": "sh",
    "run": "sh",
    "status": "sh",
    "stop": "sh",
    "stop-log": "text",
    "exits": "sh",
    "silence": "sh",
    "silence-log": "text",
    "recover": "sh",
    "recover-log": "text",
}
# What the README fixes and the test replaces.
SIM_ADDRESS = "127.0.0.1:9001"
API_ADDRESS = "127.0.0.1:8000"
TRY_DIR = "/tmp/tickguard-try"
ANY_PORT = "127.0.0.1:0"

HEREDOC = re.compile(r"<<'EOF'\n(.*?)^EOF$", re.M | re.S)
CURL = re.compile(r"curl -s (?:-X (POST) )?(http://\S+)(?: -d '([^']*)')?")
SIM_SYMBOLS = 5  # `tickguard simulate` without --symbols
TRIPPED = re.compile(r"\[(SL|TP|TRAIL|BLIND|EXIT)\]")
STEP_TIMEOUT = 20.0  # seconds any one step may take
STOP_TIMEOUT = 10.0  # seconds a process may take to end after Ctrl-C
# The shell of a person who just cloned: none of the daemon's environment settings.
ENV = {
    k: v
    for k, v in os.environ.items()
    if k not in ("TICKGUARD_CONFIG", "CREDENTIALS_DIRECTORY", "STATE_DIRECTORY")
}


def walkthrough() -> dict[str, str]:
    """The marked blocks of README.md by name; fails if one is missing, extra or mistyped."""
    found = BLOCK.findall(README.read_text())
    assert [(name, info) for name, info, _ in found] == list(BLOCKS.items()), found
    return {name: text for name, _, text in found}


def place(text: str, *pairs: tuple[str, str]) -> str:
    """`text` with each (old, new) replaced; every `old` must be there."""
    for old, new in pairs:
        assert old in text, f"{old!r} is not in the README block:\n{text}"
        text = text.replace(old, new)
    return text


def written_config(config_block: str) -> dict[str, Any]:
    """The TOML that the config block's heredoc writes."""
    found = HEREDOC.search(config_block)
    assert found is not None, config_block
    return tomllib.loads(found.group(1))


def seed_of(simulator_block: str) -> int:
    found = re.search(r"--seed (\d+)", simulator_block)
    assert found is not None, "the walkthrough's simulator needs a fixed --seed"
    assert "--symbols" not in simulator_block  # SIM_SYMBOLS is the default
    return int(found.group(1))


def assert_bracketed(positions: list[dict[str, Any]], prices: dict[str, float]) -> None:
    """Every long position's stop is below and its target above the symbol's price."""
    assert positions
    for p in positions:
        assert p["side"] == "long", p
        assert p["stop_loss"] < prices[p["symbol"]] < p["take_profit"], (p, prices)


async def sh(text: str, timeout: float = STEP_TIMEOUT) -> tuple[int, str]:
    """Run a README block with bash in the clone; (exit code, stdout and stderr)."""
    process = await asyncio.create_subprocess_exec(
        "bash", "-c", text, cwd=ROOT, env=ENV,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    try:
        async with asyncio.timeout(timeout):
            out, _ = await process.communicate()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode is not None
    return process.returncode, out.decode(errors="replace")


async def curl(command: str) -> dict[str, Any]:
    """A README curl line run as written (or, without curl, the same method, URL and body)."""
    found = CURL.fullmatch(command.strip())
    assert found is not None, f"not a curl line this test knows: {command!r}"
    method, url, body = found.group(1) or "GET", found.group(2), found.group(3)
    if shutil.which("curl"):
        code, out = await sh(command)
        assert code == 0, out
    else:
        async with aiohttp.ClientSession() as http, http.request(method, url, data=body) as r:
            out = await r.text()
    answer: dict[str, Any] = json.loads(out)
    assert "error" not in answer, answer
    return answer


class Terminal:
    """A long-running README block (simulator, daemon) whose output lines are collected."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.lines: list[str] = []
        self.process: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self.process = await asyncio.create_subprocess_exec(
            "bash", "-c", self.text, cwd=ROOT, env=ENV, start_new_session=True,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.process is not None and self.process.stdout is not None
        while line := await self.process.stdout.readline():
            self.lines.append(line.decode(errors="replace").rstrip("\n"))

    async def wait_for(self, pattern: str, *, after: int = 0) -> re.Match[str]:
        """The first output line from index `after` on that matches `pattern` (awaited)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + STEP_TIMEOUT
        while True:
            for line in self.lines[after:]:
                if found := re.search(pattern, line):
                    return found
            assert self.process is not None
            if self.process.returncode is not None or loop.time() > deadline:
                tail = "\n".join(self.lines[-40:])
                raise AssertionError(f"no line matching {pattern!r} in:\n{tail}")
            await asyncio.sleep(0.02)

    async def interrupt(self) -> int | None:
        """Ctrl-C (SIGINT to its process group); the exit code, or None if it had to be killed."""
        if self.process is None:
            return None
        code = self.process.returncode
        if code is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGINT)
            try:
                async with asyncio.timeout(STOP_TIMEOUT):
                    code = await self.process.wait()
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.process.pid, signal.SIGKILL)
                await self.process.wait()
                code = None
        if self._reader is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(STOP_TIMEOUT):
                    await self._reader
        return code


async def status_until(api: str, block: str, want_code: int, want: str) -> str:
    """Run the status block until it exits `want_code` with a line matching `want`."""
    command = place(block, (API_ADDRESS, api))
    loop = asyncio.get_running_loop()
    deadline = loop.time() + STEP_TIMEOUT
    while True:
        code, out = await sh(command)
        if code == want_code and re.search(want, out, re.M):
            return out
        assert loop.time() < deadline, (code, out)
        await asyncio.sleep(0.2)  # a polling interval: the condition is awaited


def test_the_walkthrough_levels_bracket_the_seeded_prices() -> None:
    """The walkthrough's and the minimal config's levels bracket the seeded simulator's start."""
    blocks = walkthrough()
    start = Simulator(symbol_names(SIM_SYMBOLS), seed=seed_of(blocks["simulator"])).prices
    assert f"BOSCHLTD starts at {start['BOSCHLTD']:.2f}" in README.read_text()
    assert_bracketed(written_config(blocks["config"])["positions"], start)
    configuration = README.read_text().split("\n## Configuration\n", 1)[1]
    minimal = re.search(r"```toml\n(.*?)^```$", configuration, re.M | re.S)
    assert minimal is not None
    assert_bracketed(tomllib.loads(minimal.group(1))["positions"], start)


@pytest.mark.slow
async def test_the_walkthrough_runs_as_written(tmp_path: Path) -> None:
    """The README's walkthrough, pasted: nothing trips until the price moves, then one stop fills."""
    blocks = walkthrough()
    assert (ROOT / ".venv/bin/tickguard").exists(), "the walkthrough runs .venv/bin/tickguard"
    try_dir = str(tmp_path / "try")
    simulator = Terminal(place(blocks["simulator"], (SIM_ADDRESS, ANY_PORT)))
    daemon = Terminal(place(blocks["run"], (TRY_DIR, try_dir)))
    try:
        await simulator.start()
        port = (await simulator.wait_for(r"\[SIM\] listening on http://127\.0\.0\.1:(\d+) "))[1]
        sim = f"127.0.0.1:{port}"

        config_block = place(blocks["config"], (SIM_ADDRESS, sim), (API_ADDRESS, ANY_PORT))
        code, out = await sh(place(config_block, (TRY_DIR, try_dir)))
        assert code == 0 and out.splitlines()[-1] == "ok", out
        config = tomllib.loads(await asyncio.to_thread(Path(try_dir, "config.toml").read_text))
        # Nothing leaves the machine (the default fallback resolvers are public), at any hour.
        assert config["dns"]["fallback_servers"] == [], config
        assert config["market"]["always_open"] is True, config
        assert config["feed"]["url"] == f"ws://{sim}/ws", config
        assert config["feed"]["fallback_url"] == f"http://{sim}/prices", config

        await daemon.start()
        port = (await daemon.wait_for(r"\[HTTP\] listening on 127\.0\.0\.1:(\d+)$"))[1]
        api = f"127.0.0.1:{port}"
        out = await status_until(api, blocks["status"], 0, r"^ +BOSCHLTD +[\d.]+ +live ")
        assert "HEALTHY" in out and "1 open" in out, out
        assert re.search(r"^ +ADANIENT +[\d.]+ +live ", out, re.M), out

        # Nothing tripped: the levels bracket the simulator's prices, no exit was decided.
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://{sim}/prices") as r:
                prices = {s: e["price"] for s, e in (await r.json())["prices"].items()}
            async with http.get(f"http://{api}/api/v1/exits") as r:
                assert (await r.json())["exits"] == []
        assert_bracketed(config["positions"], prices)
        assert not [line for line in daemon.lines if TRIPPED.search(line)], daemon.lines

        mark = len(daemon.lines)
        await curl(place(blocks["stop"], (SIM_ADDRESS, sim)))
        for line in blocks["stop-log"].splitlines():
            await daemon.wait_for(f"^{re.escape(line)}$", after=mark)
        exits = (await curl(place(blocks["exits"], (API_ADDRESS, api))))["exits"]
        assert [(e["symbol"], e["reason"], e["state"]) for e in exits] == [
            ("BOSCHLTD", "stop_loss", "filled")
        ], exits

        mark = len(daemon.lines)
        await curl(place(blocks["silence"], (SIM_ADDRESS, sim)))
        for line in blocks["silence-log"].splitlines():
            await daemon.wait_for(f"^{re.escape(line)}$", after=mark)
        out = await status_until(api, blocks["status"], 1, r"^ +ADANIENT +[\d.]+ +poll ")
        assert "DEGRADED" in out and "fallback  ACTIVE" in out, out

        mark = len(daemon.lines)
        await curl(place(blocks["recover"], (SIM_ADDRESS, sim)))
        for line in blocks["recover-log"].splitlines():
            await daemon.wait_for(f"^{re.escape(line)}$", after=mark)
    finally:
        daemon_code = await daemon.interrupt()
        simulator_code = await simulator.interrupt()
    assert (daemon_code, simulator_code) == (0, 0), daemon.lines[-20:] + simulator.lines[-20:]
    assert len([line for line in daemon.lines if "[EXIT] BOSCHLTD closed at " in line]) == 1
    assert not [line for line in daemon.lines if re.search(r"\[(TP|TRAIL|BLIND)\]", line)]
