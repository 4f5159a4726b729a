"""The `tickguard` command line (docs/cli.md).

Each subcommand is a `cmd_*` function taking the parsed arguments and
returning the exit code. Logging is configured here and nowhere else.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import math
import sys
from collections.abc import Callable
from typing import TextIO

from tickguard import __version__
from tickguard.config import check_secrets, config_path, load_config, parse_listen
from tickguard.errors import ConfigError

LOG_FORMAT = "%(levelname)s %(name)s: %(message)s"  # no timestamps: journald adds them

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_CONFIG = 2  # also: usage errors, and check-config's "invalid"


class _StderrHandler(logging.StreamHandler[TextIO]):
    """Writes to whatever sys.stderr is when a record comes (tests swap it)."""

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr
        super().emit(record)


class _OneLineFormatter(logging.Formatter):
    """LOG_FORMAT, one line per record: the line breaks of a message or a traceback become " | ".

    journald stores each line of stderr as an entry and rate-limits entries, so a
    20-line traceback would cost 20 of the burst that `[SL]`/`[EXIT]` lines need;
    and no value quoted in a message can start a line of its own (a forged `[EXIT]`).
    """

    def format(self, record: logging.LogRecord) -> str:
        return " | ".join(super().format(record).splitlines())


_log_handler: logging.Handler | None = None


def configure_logging(level: str | int = "info") -> None:
    """Send log records to stderr, one line each; calling again only changes the level."""
    global _log_handler  # noqa: PLW0603 - the one handler this process installs
    root = logging.getLogger()
    if _log_handler is None:
        _log_handler = _StderrHandler()
        _log_handler.setFormatter(_OneLineFormatter(LOG_FORMAT))
        root.addHandler(_log_handler)
    root.setLevel(level.upper() if isinstance(level, str) else level)


def cmd_check_config(args: argparse.Namespace) -> int:
    """`tickguard check-config PATH`: `ok` and 0, or one line per problem and 2."""
    try:
        problems = check_secrets(load_config(args.path))
        if problems:
            raise ConfigError(problems)
    except ConfigError as exc:  # its str() has one line per problem
        print(exc)
        return EXIT_CONFIG
    print("ok")
    return EXIT_OK


def cmd_run(args: argparse.Namespace) -> int:
    """`tickguard run [--config PATH]`: 0 clean stop, 2 config error, 1 other fatal error."""
    from tickguard import app
    from tickguard.errors import StoreError

    path = config_path(args.config)
    try:
        config = load_config(path)
    except ConfigError as exc:
        print(f"tickguard: invalid configuration {path}:", file=sys.stderr)
        for line in str(exc).splitlines():
            print(f"  {line}", file=sys.stderr)
        return EXIT_CONFIG
    configure_logging(config.daemon.log_level)
    try:
        return asyncio.run(app.run(config, rearm=args.rearm))
    except ConfigError as exc:
        for line in str(exc).splitlines():
            print(f"tickguard: {line}", file=sys.stderr)
        return EXIT_CONFIG
    except StoreError as exc:
        logging.getLogger("tickguard").critical("%s", exc)
        return EXIT_FAILURE


def cmd_demo(args: argparse.Namespace) -> int:
    """`tickguard demo [--duration SECONDS]`: 0, also when interrupted (docs/cli.md)."""
    try:
        from tickguard import demo

        return asyncio.run(demo.run(args.duration))
    except KeyboardInterrupt:  # Ctrl-C before the demo's own handlers are in place
        print("demo interrupted", file=sys.stderr)
        return EXIT_OK


def cmd_simulate(args: argparse.Namespace) -> int:
    """`tickguard simulate --listen HOST:PORT [--symbols N]` (args.listen is (host, port))."""
    from tickguard.simulator import serve

    configure_logging("info")
    host, port = args.listen
    try:
        asyncio.run(serve(host, port, args.symbols or 5, rate=args.rate, seed=args.seed))
    except KeyboardInterrupt:
        pass
    except OSError as exc:
        print(f"tickguard simulate: cannot listen on {host}:{port}: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    return EXIT_OK


def cmd_status(args: argparse.Namespace) -> int:
    """`tickguard status [--url URL]`: 0 healthy, 1 degraded, 2 unreachable."""
    from tickguard import api_client as client

    return client.status(client.api_url(args.url))


def cmd_close(args: argparse.Namespace) -> int:
    """`tickguard close SYMBOL [--reason R] [--url URL] [--token-file F]`: 0, 1 or 2."""
    from tickguard import api_client as client

    token = client.read_token(args.token_file)
    return client.close(client.api_url(args.url), args.symbol, args.reason, token)


def _listen_address(text: str) -> tuple[str, int]:
    try:
        return parse_listen(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r}: expected {exc}") from None


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"{text!r}: expected a finite number > 0")
    return value


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a whole number >= 1")
    return int(text)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser; each subcommand sets `handler` to its `cmd_*` function."""
    parser = argparse.ArgumentParser(
        prog="tickguard",
        description="Guards open trading positions when the market-data feed fails.",
    )
    parser.add_argument("--version", action="version", version=f"tickguard {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    def command(
        name: str, handler: Callable[[argparse.Namespace], int], help_: str
    ) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_, description=help_)
        sub.set_defaults(handler=handler)
        return sub

    run = command("run", cmd_run, "run the daemon in the foreground")
    run.add_argument(
        "--config",
        metavar="PATH",
        help="config file (default: $TICKGUARD_CONFIG, else /etc/tickguard/config.toml)",
    )
    run.add_argument(
        "--rearm",
        action="store_true",
        help="arm the config's [[positions]] even though the state store was lost"
        " (check the account first: a position that already exited would be sold again)",
    )

    check = command("check-config", cmd_check_config, "validate a config file")
    check.add_argument("path", metavar="PATH")

    demo = command("demo", cmd_demo, "simulator + daemon + a scripted feed outage")
    demo.add_argument("--duration", type=_positive_float, metavar="SECONDS")

    simulate = command("simulate", cmd_simulate, "standalone market simulator")
    simulate.add_argument("--listen", required=True, type=_listen_address, metavar="HOST:PORT")
    simulate.add_argument("--symbols", type=_positive_int, metavar="N", help="default 5")
    simulate.add_argument(
        "--rate", type=_positive_float, default=5.0, help="price moves per second (default 5)"
    )
    simulate.add_argument("--seed", type=int, help="random seed, for repeatable runs")

    status = command("status", cmd_status, "print connection health")
    status.add_argument("--url", metavar="URL", help="API base URL")

    close = command("close", cmd_close, "emergency-close one position")
    close.add_argument("symbol", metavar="SYMBOL")
    close.add_argument(
        "--reason", choices=("stop_loss", "take_profit", "emergency"), default="emergency"
    )
    close.add_argument("--url", metavar="URL", help="API base URL")
    close.add_argument("--token-file", metavar="F", help="file holding the API bearer token")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `tickguard` console script and `python -m tickguard`."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, usage errors: argparse has printed
        return exc.code if isinstance(exc.code, int) else EXIT_OK
    if args.command is None:
        parser.print_usage(sys.stderr)
        print("tickguard: error: a command is required", file=sys.stderr)
        return EXIT_CONFIG
    configure_logging()
    handler: Callable[[argparse.Namespace], int] = args.handler
    return handler(args)
