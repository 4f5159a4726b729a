"""`tickguard check-config` and the CLI skeleton, run as real subprocesses (SPEC section 1)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import tickguard
from tickguard import cli

EXAMPLE = Path(__file__).resolve().parents[2] / "packaging" / "config.example.toml"
SCRIPT = Path(sys.executable).parent / "tickguard"
URL = 'url = "wss://feed.test/ws"'
LONG = 'symbol = "BOSCHLTD"\nside = "long"\nquantity = 38\nentry_price = 735.0'
RULE = "[[rules]]\nsymbols = ['*']\ntrailing_stop_pct = 1.5"


def tickguard_run(*args: str, cwd: Path, script: bool = False) -> subprocess.CompletedProcess[str]:
    """Run `python -m tickguard ARGS` (or the console script) and capture its output."""
    command = [str(SCRIPT)] if script else [sys.executable, "-m", "tickguard"]
    env = {
        k: v for k, v in os.environ.items() if k not in {"STATE_DIRECTORY", "CREDENTIALS_DIRECTORY"}
    }
    return subprocess.run(
        [*command, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=60, check=False
    )


def check(tmp_path: Path, toml: str, *, script: bool = False) -> subprocess.CompletedProcess[str]:
    """check-config on a file holding `toml`."""
    path = tmp_path / "config.toml"
    path.write_text(toml)
    return tickguard_run("check-config", str(path), cwd=tmp_path, script=script)


# (config text, dotted key, value as printed): each config has exactly this one problem.
BROKEN = [
    ("[daemon]\nlog_level = 'info'\n", "feed.url", "''"),
    (f"[daemon]\nlog_level = 'verbose'\n[feed]\n{URL}\n", "daemon.log_level", "'verbose'"),
    (f"[http]\nlisten = 'localhost'\n[feed]\n{URL}\n", "http.listen", "'localhost'"),
    (f"[http]\nlisten = '127.0.0.1:65536'\n[feed]\n{URL}\n", "http.listen", "'127.0.0.1:65536'"),
    ("[feed]\nurl = 'http://feed.test/ws'\n", "feed.url", "'http://feed.test/ws'"),
    (f"[feed]\n{URL}\nping_interval = 0\n", "feed.ping_interval", "0"),
    (f"[feed]\n{URL}\nsymbols = ['A', 'B', 'A']\n", "feed.symbols[2]", "'A'"),
    (f"[feed]\n{URL}\n[feed.reconnect]\njitter = 1.5\n", "feed.reconnect.jitter", "1.5"),
    (
        f"[feed]\n{URL}\n[feed.reconnect]\ninitial_delay = 10.0\nmax_delay = 5.0\n",
        "feed.reconnect.max_delay",
        "5.0",
    ),
    (
        f"[feed]\n{URL}\n[feed.reconnect]\ndns_check_every = 2.5\n",
        "feed.reconnect.dns_check_every",
        "2.5",
    ),
    (f"[feed]\n{URL}\n[feed.reconect]\nmax_delay = 5.0\n", "feed.reconect", "{'max_delay': 5.0}"),
    (f"[feed]\n{URL}\n[dns]\nservers = ['dns.google']\n", "dns.servers[0]", "'dns.google'"),
    (f"[feed]\n{URL}\n[dns]\ntimeout = -1\n", "dns.timeout", "-1"),
    (f"[feed]\n{URL}\n[prices]\ncache_timeout = 10.0\n", "prices.cache_timeout", "10.0"),
    (f"[feed]\n{URL}\n[guard]\nblind_policy = 'panic'\n", "guard.blind_policy", "'panic'"),
    (f"[feed]\n{URL}\n[market]\ntimezone = 'Mars/Olympus'\n", "market.timezone", "'Mars/Olympus'"),
    (
        f"[feed]\n{URL}\n[market]\nsessions = ['09:15-12:00', '11:00-15:30']\n",
        "market.sessions[1]",
        "'11:00-15:30'",
    ),
    (f"[feed]\n{URL}\n[market]\nholidays = ['2026-13-01']\n", "market.holidays[0]", "'2026-13-01'"),
    (f"[feed]\n{URL}\n[market]\nweekdays = ['mon', 'funday']\n", "market.weekdays[1]", "'funday'"),
    (f"[feed]\n{URL}\n[broker]\nkind = 'zerodha'\n", "broker.kind", "'zerodha'"),
    (
        f"[feed]\n{URL}\n[[positions]]\n{LONG}\nstop_loss = 820.0\ntake_profit = 800.0\n",
        "positions[0].stop_loss",
        "820.0",
    ),
    (
        f"[feed]\n{URL}\n[[positions]]\n{LONG}\n[[positions]]\n{LONG}\n",
        "positions[1].symbol",
        "'BOSCHLTD'",
    ),
    (f"[feed]\n{URL}\n[[positions]]\n{LONG}\nqty = 3\n", "positions[0].qty", "3"),
    (
        f"[feed]\n{URL}\n[[positions]]\nsymbol = 'A'\nside = 'long'\nquantity = {'9' * 400}\n"
        "entry_price = 1.0\n",
        "positions[0].quantity",
        "<an integer of 400 digits>",
    ),
    (
        f"[feed]\n{URL}\nping_interval = {'9' * 400}\n",
        "feed.ping_interval",
        "<an integer of 400 digits>",
    ),
    (f"[feed]\n{URL}\n[dns]\ntimeout = inf\n", "dns.timeout", "inf"),
    (f"[feed]\n{URL}\n[account]\nsource = 'broker'\n", "rules", "[]"),
    (f"[feed]\n{URL}\n[account]\nsource = 'ledger'\n", "account.source", "'ledger'"),
    (f"[feed]\n{URL}\n[account]\nreconcile_interval = 0\n", "account.reconcile_interval", "0"),
    (
        f"[feed]\n{URL}\n[account]\nconfirm_within = {'9' * 400}\n",
        "account.confirm_within",
        "<an integer of 400 digits>",
    ),
    (f"[feed]\n{URL}\n[account]\nproducts = ['I', 'CNC']\n", "account.products[1]", "'CNC'"),
    (f"[feed]\n{URL}\n[account]\nproducts = []\n", "account.products", "[]"),
    (f"[feed]\n{URL}\n{RULE}\n[[rules]]\nsymbols = ['A']\n", "rules[1]", "{'symbols': ['A']}"),
    (
        f"[feed]\n{URL}\n{RULE}\n[[rules]]\nsymbols = ['']\nstop_loss_pct = 1.0\n",
        "rules[1].symbols[0]",
        "''",
    ),
    (f"[feed]\n{URL}\n{RULE}\nstop_loss_pct = 100\n", "rules[0].stop_loss_pct", "100"),
    (f"[feed]\n{URL}\n{RULE}\ntake_profit_pct = 1000.0\n", "rules[0].take_profit_pct", "1000.0"),
]


@pytest.mark.parametrize(("toml", "key", "shown"), BROKEN, ids=[b[1] for b in BROKEN])
def test_broken_config_exits_2_naming_key_and_value(
    tmp_path: Path, toml: str, key: str, shown: str
) -> None:
    """check-config on a broken config exits 2 with one line naming the dotted key and value."""
    result = check(tmp_path, toml)
    assert result.returncode == 2, result
    lines = result.stdout.splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"{key}: {shown} is invalid; expected "), lines[0]
    assert result.stderr == ""


def test_every_problem_gets_its_own_line(tmp_path: Path) -> None:
    """A config with several problems prints one line for each."""
    toml = (
        "[daemon]\nlog_level = 'loud'\n[feed]\nurl = 'ftp://x'\nping_timeout = 0\n"
        "[broker]\nkind = 'x'\n"
    )
    result = check(tmp_path, toml)
    assert result.returncode == 2
    keys = sorted(line.split(":", 1)[0] for line in result.stdout.splitlines())
    assert keys == ["broker.kind", "daemon.log_level", "feed.ping_timeout", "feed.url"]


def test_example_config_is_ok(tmp_path: Path) -> None:
    """The shipped example config passes: `ok` and exit 0."""
    result = tickguard_run("check-config", str(EXAMPLE), cwd=tmp_path)
    assert (result.returncode, result.stdout) == (0, "ok\n")


def test_broker_source_with_a_rule_is_ok(tmp_path: Path) -> None:
    """account.source = broker with one [[rules]] entry passes check-config."""
    result = check(tmp_path, f"[feed]\n{URL}\n[account]\nsource = 'broker'\n{RULE}\n")
    assert (result.returncode, result.stdout) == (0, "ok\n")


def test_console_script_checks_config(tmp_path: Path) -> None:
    """The installed `tickguard` console script behaves like `python -m tickguard`."""
    assert SCRIPT.exists(), f"{SCRIPT} missing: run scripts/bootstrap.sh --dev"
    good = check(tmp_path, f"[feed]\n{URL}\n", script=True)
    assert (good.returncode, good.stdout) == (0, "ok\n")
    bad = check(tmp_path, f"[feed]\n{URL}\npoll_interval = -2\n", script=True)
    assert bad.returncode == 2
    assert bad.stdout.startswith("feed.poll_interval: -2 is invalid")


def test_toml_syntax_error_exits_2(tmp_path: Path) -> None:
    """A file that is not TOML is exit 2 with one line naming the file and the syntax error."""
    result = check(tmp_path, "[feed\nurl = 'wss://x/ws'\n")
    assert result.returncode == 2
    assert result.stdout.startswith(f"{tmp_path / 'config.toml'}: TOML syntax error")
    assert len(result.stdout.splitlines()) == 1


def test_integer_beyond_the_parser_limit_exits_2(tmp_path: Path) -> None:
    """An integer of 5,000 digits (over Python's int-parsing limit) is exit 2 with one line."""
    result = check(tmp_path, f"[feed]\n{URL}\nping_interval = {'9' * 5000}\n")
    assert result.returncode == 2, result
    assert result.stdout.startswith(f"{tmp_path / 'config.toml'}: cannot parse"), result.stdout
    assert len(result.stdout.splitlines()) == 1 and len(result.stdout) < 400
    assert result.stderr == ""


def test_unreadable_file_exits_2(tmp_path: Path) -> None:
    """A missing config file is exit 2 with a line saying it cannot be read."""
    missing = tmp_path / "nope.toml"
    result = tickguard_run("check-config", str(missing), cwd=tmp_path)
    assert result.returncode == 2
    assert result.stdout == f"{missing}: cannot read: No such file or directory\n"


def test_version(tmp_path: Path) -> None:
    """`tickguard --version` prints `tickguard <version>` and exits 0."""
    result = tickguard_run("--version", cwd=tmp_path)
    assert (result.returncode, result.stdout) == (0, f"tickguard {tickguard.__version__}\n")


# --- in process: the parser skeleton and logging -------------------------------------------


@pytest.fixture(autouse=True)
def _restore_root_logger() -> Iterator[None]:
    """main() configures the root logger; leave it as it was for other tests."""
    root = logging.getLogger()
    level, installed = root.level, cli._log_handler
    yield
    root.setLevel(level)
    if cli._log_handler is not installed and cli._log_handler is not None:
        root.removeHandler(cli._log_handler)
        cli._log_handler = installed


def test_logging_is_one_line_without_timestamp(capsys: pytest.CaptureFixture[str]) -> None:
    """configure_logging writes `LEVEL logger: message` lines to stderr, once however often called."""
    cli.configure_logging("warning")
    cli.configure_logging("debug")
    logging.getLogger("tickguard.feed").debug("attempt %d", 5)
    logging.getLogger("tickguard.feed").log(5, "below debug: dropped")
    assert capsys.readouterr().err == "DEBUG tickguard.feed: attempt 5\n"


def test_status_of_a_closed_port_is_unreachable(capsys: pytest.CaptureFixture[str]) -> None:
    """status against a URL where nothing listens exits 2 and says unreachable."""
    assert cli.main(["status", "--url", "http://127.0.0.1:9"]) == 2
    assert "unreachable" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["simulate"],
        ["simulate", "--listen", "nowhere"],
        ["simulate", "--listen", "127.0.0.1:1", "--symbols", "0"],
        ["demo", "--duration", "-1"],
        ["demo", "--duration", "soon"],
        ["close", "BOSCHLTD", "--reason", "boredom"],
        ["frobnicate"],
    ],
)
def test_usage_errors_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    """A missing command or a malformed option is a usage error: exit 2 with a message."""
    assert cli.main(argv) == 2
    assert "error" in capsys.readouterr().err


def test_simulate_listen_is_parsed() -> None:
    """simulate --listen hands the command a (host, port) pair."""
    args = cli.build_parser().parse_args(["simulate", "--listen", "[::1]:9000"])
    assert args.listen == ("::1", 9000)
    assert args.symbols is None


@pytest.mark.parametrize("kind", ["missing", "empty", "fifo", "dev-zero", "huge", "directory"])
def test_check_config_refuses_a_token_file_run_would_refuse(tmp_path: Path, kind: str) -> None:
    """A missing, empty, FIFO, endless, oversized or directory token file: exit 2, never a hang."""
    token = tmp_path / "token"
    if kind == "empty":
        token.write_text(" \n")
    elif kind == "fifo":
        os.mkfifo(token)
    elif kind == "dev-zero":
        token = Path("/dev/zero")
    elif kind == "huge":
        token.write_bytes(b"x" * 100_000)
    elif kind == "directory":
        token.mkdir()
    result = check(tmp_path, f'[http]\ntoken_file = "{token}"\n[feed]\n{URL}\n')
    assert result.returncode == 2, result
    assert result.stdout.startswith(f"http.token_file: '{token}' is invalid; expected "), result
    assert len(result.stdout.splitlines()) == 1 and result.stderr == ""


def test_check_config_accepts_a_readable_token_file(tmp_path: Path) -> None:
    """A regular file holding a token passes."""
    token = tmp_path / "token"
    token.write_text("  secret\n")
    result = check(tmp_path, f'[http]\ntoken_file = "{token}"\n[feed]\n{URL}\n')
    assert (result.returncode, result.stdout) == (0, "ok\n")


def test_every_problem_of_one_position_entry_is_named(tmp_path: Path) -> None:
    """Inside one [[positions]] entry, a bad side and a negative quantity are both reported."""
    toml = (
        f"[feed]\n{URL}\n[[positions]]\nsymbol = 'A'\nside = 'sideways'\nquantity = -1\n"
        "entry_price = 100.0\n"
    )
    result = check(tmp_path, toml)
    assert result.returncode == 2
    keys = [line.split(":", 1)[0] for line in result.stdout.splitlines()]
    assert keys == ["positions[0].side", "positions[0].quantity"]
