"""Configuration: TOML (docs/config.md) parsed into frozen dataclasses.

`parse_config` turns the table `tomllib` gives into a `Config`, or raises
`ConfigError` carrying every problem found, each naming the dotted key, the
value and what was expected. Unknown keys are problems too. Every default is
written once, in `DEFAULTS`, shaped like the TOML file; the parser takes each
key's default from it by its dotted key (`default`), and
`packaging/config.example.toml` is tested to parse to exactly them.
`[account]` and `[[rules]]` are docs/account.md's; `[safety_net]` is docs/safety-net.md's;
`[store]` is docs/ha.md's.
"""

from __future__ import annotations

import datetime
import difflib
import ipaddress
import itertools
import os
import re
import tomllib
import types
import zoneinfo
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final, TypeVar
from urllib.parse import urlsplit

from tickguard.core import untrusted
from tickguard.core.account import ExitRule
from tickguard.core.guard import BlindPolicy
from tickguard.core.positions import (
    MISSING,
    POSITION_FIELDS,
    SYMBOL_EXPECTED,
    PositionSpec,
    parse_spec,
    valid_symbol,
)
from tickguard.errors import ConfigError, ConfigProblem
from tickguard.files import read_small

# Where the config file is looked for when `tickguard run` gets no --config.
CONFIG_PATH_ENV: Final = "TICKGUARD_CONFIG"
DEFAULT_CONFIG_PATH: Final = Path("/etc/tickguard/config.toml")

# systemd's StateDirectory= and LoadCredential= hand these to the service.
STATE_DIRECTORY_ENV: Final = "STATE_DIRECTORY"
CREDENTIALS_DIRECTORY_ENV: Final = "CREDENTIALS_DIRECTORY"
TOKEN_CREDENTIAL: Final = "api-token"
BROKER_TOKEN_CREDENTIAL: Final = "broker-token"

DEFAULT_DNS_PORT: Final = 53  # of a nameserver given without one
UPSTOX_PRODUCTS: Final = ("I", "D", "MTF")
# [[rules]]: each percentage is optional, at least one is required.
RULE_PERCENTAGES: Final = ("stop_loss_pct", "take_profit_pct", "trailing_stop_pct")
MAX_STOP_PCT: Final = 100.0  # stop_loss_pct and trailing_stop_pct: below it (a stop above 0)
MAX_TAKE_PROFIT_PCT: Final = 1000.0  # take_profit_pct: below it

LOG_LEVELS: Final = ("debug", "info", "warning", "error")
FEED_PROTOCOLS: Final = ("json", "upstox")
BROKER_KINDS: Final = ("paper", "upstox")
ACCOUNT_SOURCES: Final = ("config", "broker")
WEEKDAY_NAMES: Final = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")  # index = weekday()


def _frozen(table: Mapping[str, object]) -> Mapping[str, object]:
    return types.MappingProxyType(
        {k: _frozen(v) if isinstance(v, Mapping) else v for k, v in table.items()}
    )


# Every default, written here once and nowhere else, shaped like the TOML file
# (lists as tuples; docs/config.md explains each key). The parser knows exactly
# these keys plus `[[positions]]` and `[[rules]]`, which have no default.
DEFAULTS: Final[Mapping[str, object]] = _frozen(
    {
        "daemon": {
            "state_dir": "/var/lib/tickguard",  # when $STATE_DIRECTORY is not set
            "log_level": "info",
        },
        "http": {
            "listen": "127.0.0.1:8000",
            "token_file": "",  # $CREDENTIALS_DIRECTORY/api-token if it exists, else no token
        },
        "feed": {
            "protocol": "json",
            "url": "",  # required (but for upstox): the default is there to be rejected
            "symbols": (),
            "ping_interval": 5.0,
            "ping_timeout": 5.0,
            "silence_timeout": 10.0,
            "fallback_url": "",
            "poll_interval": 1.0,
            "reconnect": {
                "initial_delay": 0.5,
                "max_delay": 30.0,
                "multiplier": 2.0,
                "jitter": 0.5,
                "dns_check_every": 3,
                "stable_after": 30.0,
            },
        },
        "dns": {
            "servers": (),
            "fallback_servers": ("8.8.8.8", "1.1.1.1", "8.8.4.4", "1.0.0.1"),
            "timeout": 5.0,
        },
        "prices": {"cache_timeout": 300.0, "stale_warning": 30.0},
        "guard": {"sweep_interval": 1.0, "blind_policy": "hold", "blind_after": 300.0},
        "market": {
            "timezone": "Asia/Kolkata",
            "sessions": ("09:15-15:30",),
            "weekdays": ("mon", "tue", "wed", "thu", "fri"),
            "holidays": (),
            "always_open": False,
        },
        "broker": {"kind": "paper"},
        "upstox": {
            "api_url": "https://api.upstox.com",
            "hft_url": "https://api-hft.upstox.com",  # order placement
            "token_file": "",  # $CREDENTIALS_DIRECTORY/broker-token if it exists
            "product": "I",  # intraday
        },
        "account": {
            "source": "config",
            "reconcile_interval": 5.0,
            "confirm_within": 60.0,
            "products": ("I", "D", "MTF"),
        },
        "safety_net": {"enabled": False, "margin_pct": 1.0},
        "store": {"url": "", "takeover_settle": 12.0},  # "": SQLite in daemon.state_dir
    }
)

_T = TypeVar("_T")


def default(key: str, kind: type[_T]) -> _T:
    """The default of the dotted key `key` ("feed.reconnect.jitter"), checked to be a `kind`.

    KeyError for a key without a default; TypeError when it is not a `kind`.
    """
    value: object = DEFAULTS
    for name in key.split("."):
        if not isinstance(value, Mapping):
            raise KeyError(key)
        value = value[name]
    if not isinstance(value, kind):
        raise TypeError(f"the default of {key} is {value!r}, not a {kind.__name__}")
    return value


@dataclass(frozen=True, slots=True)
class DaemonConfig:
    state_dir: Path
    log_level: str  # one of LOG_LEVELS, lower case


@dataclass(frozen=True, slots=True)
class HttpConfig:
    host: str  # an IP literal (IPv6 without brackets) or "localhost"
    port: int  # 0 picks a free port
    token_file: str  # "" = no token configured (mutating routes answer 503)


@dataclass(frozen=True, slots=True)
class ReconnectConfig:
    initial_delay: float
    max_delay: float
    multiplier: float
    jitter: float
    dns_check_every: int
    stable_after: float


@dataclass(frozen=True, slots=True)
class FeedConfig:
    protocol: str
    url: str
    symbols: tuple[str, ...]
    ping_interval: float
    ping_timeout: float
    silence_timeout: float
    fallback_url: str  # "" = no REST fallback
    poll_interval: float
    reconnect: ReconnectConfig


@dataclass(frozen=True, slots=True)
class Nameserver:
    host: str  # an IP literal, normalised (IPv6 without brackets)
    port: int = DEFAULT_DNS_PORT

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == DEFAULT_DNS_PORT else f"{host}:{self.port}"


@dataclass(frozen=True, slots=True)
class DnsConfig:
    servers: tuple[Nameserver, ...]  # empty = the system resolver
    fallback_servers: tuple[Nameserver, ...]
    timeout: float


@dataclass(frozen=True, slots=True)
class PricesConfig:
    cache_timeout: float
    stale_warning: float


@dataclass(frozen=True, slots=True)
class GuardConfig:
    sweep_interval: float
    blind_policy: BlindPolicy
    blind_after: float


@dataclass(frozen=True, slots=True)
class MarketConfig:
    timezone: str
    sessions: tuple[tuple[datetime.time, datetime.time], ...]  # sorted, non-overlapping
    weekdays: frozenset[int]  # 0 = Monday, as datetime.weekday()
    holidays: frozenset[datetime.date]
    always_open: bool

    def zone(self) -> zoneinfo.ZoneInfo:
        """The market's time zone (validated when the config was parsed)."""
        return zoneinfo.ZoneInfo(self.timezone)


@dataclass(frozen=True, slots=True)
class BrokerConfig:
    kind: str


@dataclass(frozen=True, slots=True)
class UpstoxConfig:
    """Upstox access, used when feed.protocol or broker.kind is "upstox"."""

    api_url: str
    hft_url: str  # order placement
    token_file: str  # the access token (never logged)
    product: str  # I (intraday) | D (delivery) | MTF


@dataclass(frozen=True, slots=True)
class AccountConfig:
    """Whose positions are guarded and how the broker's account is reconciled (docs/account.md)."""

    source: str  # config | broker (also guard every broker position a [[rules]] entry matches)
    reconcile_interval: float  # seconds between reconciliations
    confirm_within: float  # seconds a registered position may go unseen at the broker
    products: tuple[str, ...]  # Upstox products whose positions count; non-empty, no repeats


@dataclass(frozen=True, slots=True)
class SafetyNetConfig:
    """The broker-held stop behind each guarded position (docs/safety-net.md)."""

    enabled: bool
    margin_pct: float  # how much further from the price than tickguard's own stop, in percent


@dataclass(frozen=True, slots=True)
class StoreConfig:
    """Where the state lives (docs/ha.md): "" SQLite in daemon.state_dir; a postgresql:// URL
    a store shared by two or more instances, one of them leading."""

    url: str
    # A new leader looks an exit in flight up only this long after its last journal write:
    # the previous leader's order for it may still be on its way (at least the order timeout).
    takeover_settle: float = 12.0

    @property
    def shared(self) -> bool:
        return bool(self.url)


@dataclass(frozen=True, slots=True)
class Config:
    daemon: DaemonConfig
    http: HttpConfig
    feed: FeedConfig
    dns: DnsConfig
    prices: PricesConfig
    guard: GuardConfig
    market: MarketConfig
    broker: BrokerConfig
    upstox: UpstoxConfig
    account: AccountConfig
    safety_net: SafetyNetConfig
    store: StoreConfig
    positions: tuple[PositionSpec, ...] = ()
    rules: tuple[ExitRule, ...] = ()  # for positions imported from the broker; first match wins


class ConfigFileError(ConfigError):
    """The config file could not be read or is not valid TOML."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(())
        self.path = path
        self.reason = reason

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


# ---------------------------------------------------------------------------
# Entry points


def load_config(path: str | os.PathLike[str], *, env: Mapping[str, str] | None = None) -> Config:
    """Read and validate the TOML file at `path`.

    Raises ConfigFileError when it cannot be read or parsed, ConfigError listing
    every problem when it parses but is invalid.
    """
    path = Path(path)
    try:
        with path.open("rb") as file:
            data = tomllib.load(file)
    except OSError as exc:
        raise ConfigFileError(path, f"cannot read: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigFileError(path, f"not UTF-8 text: {exc.reason} at byte {exc.start}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigFileError(path, f"TOML syntax error: {exc}") from exc
    except ValueError as exc:  # e.g. an integer over Python's 4300-digit limit
        raise ConfigFileError(path, f"cannot parse: {untrusted.shown(str(exc))}") from exc
    return parse_config(data, env=env)


TOKEN_MAX_BYTES: Final = 4096  # a token file larger than this is a mistake (or /dev/zero)


def read_secret(path: str, key: str) -> str | None:
    """The token in the file at `path` (whitespace stripped); None for no path.

    Only a regular file of at most TOKEN_MAX_BYTES is read, never a FIFO or a
    device; ConfigError names `key` and the path (never the content).
    """
    if not path:
        return None
    expected = f"a readable regular file of at most {TOKEN_MAX_BYTES} bytes"
    try:
        raw = read_small(path, TOKEN_MAX_BYTES)
    except OSError as exc:
        raise ConfigError([ConfigProblem(key, path, f"{expected} ({exc.strerror})")]) from None
    try:
        token = raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise ConfigError([ConfigProblem(key, path, "a UTF-8 text file")]) from None
    if not token:
        raise ConfigError([ConfigProblem(key, path, "a file holding a non-empty token")])
    return token


def secret_files(config: Config) -> list[tuple[str, str]]:
    """(key, path) of every token file this configuration reads."""
    files = [("http.token_file", config.http.token_file)]
    if "upstox" in (config.feed.protocol, config.broker.kind):
        files.append(("upstox.token_file", config.upstox.token_file))
    return [(key, path) for key, path in files if path]


def check_secrets(config: Config) -> list[ConfigProblem]:
    """Every token file that `run` would refuse (check-config reports them too)."""
    problems: list[ConfigProblem] = []
    for key, path in secret_files(config):
        try:
            read_secret(path, key)
        except ConfigError as exc:
            problems.extend(exc.problems)
    return problems


def parse_config(data: Mapping[str, object], *, env: Mapping[str, str] | None = None) -> Config:
    """Validate a parsed TOML document into a Config, or raise ConfigError with every problem.

    `env` supplies $STATE_DIRECTORY and $CREDENTIALS_DIRECTORY (None: os.environ).
    """
    env = os.environ if env is None else env
    problems: list[ConfigProblem] = []
    root = _Table(data, "", problems)
    config = Config(
        daemon=_daemon(root.table("daemon"), env),
        http=_http(root.table("http"), env),
        feed=_feed(root.table("feed")),
        dns=_dns(root.table("dns")),
        prices=_prices(root.table("prices")),
        guard=_guard(root.table("guard")),
        market=_market(root.table("market")),
        broker=_broker(root.table("broker")),
        upstox=_upstox(root.table("upstox"), env),
        account=_account(root.table("account")),
        safety_net=_safety_net(root.table("safety_net")),
        store=_store(root.table("store")),
        positions=_positions(root),
        rules=_rules(root),
    )
    _check_upstox_token(root, config)
    _check_broker_source_has_rules(root, config)
    _check_shared_store_broker(root, config)
    root.finish()
    if problems:
        raise ConfigError(problems)
    return config


def config_path(
    explicit: str | os.PathLike[str] | None, env: Mapping[str, str] | None = None
) -> Path:
    """Where `tickguard run` reads its config: --config, else $TICKGUARD_CONFIG, else /etc."""
    env = os.environ if env is None else env
    if explicit is not None:
        return Path(explicit)
    return Path(env[CONFIG_PATH_ENV]) if env.get(CONFIG_PATH_ENV) else DEFAULT_CONFIG_PATH


# ---------------------------------------------------------------------------
# Value parsers shared with the CLI (they raise ValueError with the expectation)

_LISTEN_EXPECTED: Final = "HOST:PORT with HOST an IP address or localhost and PORT 0-65535"
_NAMESERVER_EXPECTED: Final = '"IP" or "IP:PORT" (IPv6 as "[IP]:PORT"), PORT 1-65535'
_SESSION_EXPECTED: Final = '"HH:MM-HH:MM" (24-hour clock) with start before end'
_SESSION_RE: Final = re.compile(r"(\d\d):(\d\d)-(\d\d):(\d\d)", re.ASCII)
_PORT_RE: Final = re.compile(r"\d{1,5}", re.ASCII)


def parse_listen(text: str) -> tuple[str, int]:
    """`HOST:PORT` → (host, port); IPv6 as `[::1]:8000`; host an IP literal or `localhost`."""
    host, sep, port_text = text.rpartition(":")
    if not sep:
        raise ValueError(_LISTEN_EXPECTED)
    host = _unbracket(host, _LISTEN_EXPECTED)
    if host != "localhost":
        host = _ip_literal(host, _LISTEN_EXPECTED)
    return host, _port(port_text, 0, _LISTEN_EXPECTED)


def parse_nameserver(text: str) -> Nameserver:
    """`IP`, `IP:PORT` or `[IPv6]:PORT` → Nameserver (port 53 when omitted)."""
    try:
        return Nameserver(str(ipaddress.ip_address(text)))
    except ValueError:
        pass
    if text.startswith("[") and text.endswith("]"):
        return Nameserver(_ip_literal(text[1:-1], _NAMESERVER_EXPECTED))
    host, sep, port_text = text.rpartition(":")
    if not sep:
        raise ValueError(_NAMESERVER_EXPECTED)
    host = _ip_literal(_unbracket(host, _NAMESERVER_EXPECTED), _NAMESERVER_EXPECTED)
    return Nameserver(host, _port(port_text, 1, _NAMESERVER_EXPECTED))


def parse_session(text: str) -> tuple[datetime.time, datetime.time]:
    """`"09:15-15:30"` → (start, end), start strictly before end."""
    match = _SESSION_RE.fullmatch(text)
    if match is None:
        raise ValueError(_SESSION_EXPECTED)
    h1, m1, h2, m2 = (int(g) for g in match.groups())
    try:
        start, end = datetime.time(h1, m1), datetime.time(h2, m2)
    except ValueError:
        raise ValueError(_SESSION_EXPECTED) from None
    if not start < end:
        raise ValueError(_SESSION_EXPECTED)
    return start, end


def _unbracket(host: str, expected: str) -> str:
    if host.startswith("[") or host.endswith("]"):
        if not (host.startswith("[") and host.endswith("]") and ":" in host):
            raise ValueError(expected)
        return host[1:-1]
    if ":" in host:  # a bare IPv6 address needs brackets before :PORT
        raise ValueError(expected)
    return host


def _ip_literal(host: str, expected: str) -> str:
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        raise ValueError(expected) from None


def _port(text: str, lowest: int, expected: str) -> int:
    if _PORT_RE.fullmatch(text) is None or not lowest <= int(text) <= 65535:
        raise ValueError(expected)
    return int(text)


# ---------------------------------------------------------------------------
# The table walker: collects problems, remembers which keys were read


_MISSING: Final = MISSING  # marks an absent required key; shown as <missing>
_DEFAULT: Final = object()  # `_Table.get` without a fallback: the key's default


class _Table:
    """One TOML table being read: its dotted path, the keys used, the problems found."""

    def __init__(self, data: Mapping[str, object], path: str, problems: list[ConfigProblem]):
        self.data = data
        self.path = path
        self.problems = problems
        self.used: set[str] = set()
        self.bad: set[str] = set()
        self.children: list[_Table] = []

    def dotted(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def get(self, key: str, fallback: object = _DEFAULT) -> object:
        """The value at `key`; when absent, `fallback`, else the key's default (DEFAULTS)."""
        self.used.add(key)
        if key in self.data:
            return self.data[key]
        return self.default(key, object) if fallback is _DEFAULT else fallback

    def default(self, key: str, kind: type[_T]) -> _T:
        return default(self.dotted(key), kind)

    def problem(self, key: str, value: object, expected: str) -> None:
        """Record a problem with `key` (or with an item of it, `key[3]`)."""
        self.bad.add(key.partition("[")[0])
        self.problems.append(ConfigProblem(self.dotted(key), value, expected))

    def ok(self, *keys: str) -> bool:
        """Whether none of these keys had a problem (cross-field checks need valid parts)."""
        return not self.bad.intersection(keys)

    def table(self, key: str) -> _Table:
        value = self.get(key, {})
        if not isinstance(value, Mapping):
            self.problem(key, value, "a table")
            value = {}
        child = _Table(value, self.dotted(key), self.problems)
        self.children.append(child)
        return child

    def finish(self) -> None:
        """Report every key nobody read, here and in the sub-tables."""
        known = sorted(self.used)
        for key, value in self.data.items():
            if key not in self.used:
                self.problem(key, value, _unknown_key_expectation(key, known))
        for child in self.children:
            child.finish()


def _unknown_key_expectation(key: str, known: Sequence[str]) -> str:
    where = f"one of the known keys ({', '.join(known)})" if known else "no keys here"
    close = difflib.get_close_matches(key, known, n=1)
    return f"{where}; did you mean {close[0]!r}?" if close else where


_SECONDS: Final = "a finite number of seconds > 0"


def _valid_number(
    t: _Table, key: str, expected: str, valid: Callable[[float], bool]
) -> float | None:
    """The number at `key`, or None when it is not one `valid` accepts (a problem, recorded)."""
    value = t.get(key)
    result = untrusted.number(value)
    if result is None or not valid(result):
        t.problem(key, value, expected)
        return None
    return result


def _number(t: _Table, key: str, expected: str, valid: Callable[[float], bool]) -> float:
    result = _valid_number(t, key, expected, valid)
    return t.default(key, float) if result is None else result


def _seconds(t: _Table, key: str) -> float:
    return _number(t, key, _SECONDS, lambda x: x > 0)


def _seconds_or_zero(t: _Table, key: str) -> float:
    return _number(t, key, "a finite number of seconds >= 0", lambda x: x >= 0)


def _string(t: _Table, key: str, expected: str = "a string") -> str:
    value = t.get(key)
    if not isinstance(value, str):
        t.problem(key, value, expected)
        return t.default(key, str)
    return value


def _choice(t: _Table, key: str, choices: Sequence[str]) -> str:
    expected = "one of " + " | ".join(repr(c) for c in choices)
    value = _string(t, key, expected)
    if value not in choices:
        t.problem(key, value, expected)
        return t.default(key, str)
    return value


def _bool(t: _Table, key: str) -> bool:
    value = t.get(key)
    if not isinstance(value, bool):
        t.problem(key, value, "true or false")
        return t.default(key, bool)
    return value


def _items(t: _Table, key: str, expected: str) -> Iterator[tuple[str, object]]:
    """(dotted key, item) for each item of an array; a non-array is one problem."""
    value = t.get(key)
    if not isinstance(value, list | tuple):
        t.problem(key, value, f"an array of {expected}")
        return
    for i, item in enumerate(value):
        yield f"{key}[{i}]", item


def _string_list(
    t: _Table, key: str, expected: str, convert: Callable[[str], _T]
) -> list[tuple[str, str, _T]]:
    """Each item of an array of strings as (key, text, converted value); bad and repeated
    items are problems and left out."""
    found: list[tuple[str, str, _T]] = []
    seen: dict[_T, str] = {}
    for item_key, item in _items(t, key, expected):
        if not isinstance(item, str):
            t.problem(item_key, item, expected)
            continue
        try:
            converted = convert(item)
        except ValueError:
            t.problem(item_key, item, expected)
            continue
        if converted in seen:
            t.problem(item_key, item, f"no repeat of {t.dotted(seen[converted])}")
            continue
        seen[converted] = item_key
        found.append((item_key, item, converted))
    return found


# ---------------------------------------------------------------------------
# The sections


def _default_state_dir(env: Mapping[str, str]) -> Path:
    # systemd joins several StateDirectory= entries with ':'; ours is the first.
    from_env = env.get(STATE_DIRECTORY_ENV, "").split(":")[0]
    return Path(from_env or default("daemon.state_dir", str))


def _credential_or_default(env: Mapping[str, str], credential: str, key: str) -> str:
    """$CREDENTIALS_DIRECTORY/`credential` when that file exists, else `key`'s default."""
    credentials = env.get(CREDENTIALS_DIRECTORY_ENV, "")
    if credentials:
        candidate = Path(credentials) / credential
        if candidate.is_file():
            return str(candidate)
    return default(key, str)


def _daemon(t: _Table, env: Mapping[str, str]) -> DaemonConfig:
    text = t.get("state_dir", "")  # absent: $STATE_DIRECTORY, else the default
    if isinstance(text, str) and text.strip():
        state_dir = Path(text)
    else:
        state_dir = _default_state_dir(env)
        if "state_dir" in t.data:
            t.problem("state_dir", text, "a non-empty directory path")
    return DaemonConfig(state_dir=state_dir, log_level=_choice(t, "log_level", LOG_LEVELS))


def _http(t: _Table, env: Mapping[str, str]) -> HttpConfig:
    listen = _string(t, "listen", _LISTEN_EXPECTED)
    try:
        host, port = parse_listen(listen)
    except ValueError:
        t.problem("listen", listen, _LISTEN_EXPECTED)
        host, port = parse_listen(t.default("listen", str))
    token_file = _string(t, "token_file", 'a file path, or "" for none') or (
        _credential_or_default(env, TOKEN_CREDENTIAL, "http.token_file")
    )
    return HttpConfig(host=host, port=port, token_file=token_file)


def _url(t: _Table, key: str, schemes: Sequence[str], *, required: bool) -> str:
    expected = "a URL with a host, starting " + " or ".join(f"{s}://" for s in schemes)
    expected = f"{expected} (required)" if required else f'{expected}, or "" for none'
    value = _string(t, key, expected)
    if not t.ok(key) or (not value and not required):
        return value
    try:
        parts = urlsplit(value)
        valid = parts.scheme in schemes and bool(parts.hostname)
        _ = parts.port  # raises ValueError on a bad port
    except ValueError:
        valid = False
    if not valid:
        t.problem(key, _redacted(value), expected)
        return t.default(key, str)
    return value


def _redacted(url: str) -> str:
    """The URL without a password or query, which may carry credentials (docs/logs.md)."""
    url = re.sub(r"(//[^/@:]*):[^/@]*@", r"\1:***@", url)
    base, sep, _ = url.partition("?")
    return f"{base}?***" if sep else base


def _symbol(text: str) -> str:
    if not valid_symbol(text):
        raise ValueError(text)
    return text


def _feed(t: _Table) -> FeedConfig:
    symbols = _string_list(
        t, "symbols", SYMBOL_EXPECTED.replace("a printable symbol", "printable symbols"), _symbol
    )
    protocol = _choice(t, "protocol", FEED_PROTOCOLS)
    return FeedConfig(
        protocol=protocol,
        # Upstox hands out a single-use socket URL per connection (authorize).
        url=_url(t, "url", ("ws", "wss"), required=protocol != "upstox"),
        symbols=tuple(text for _, text, _ in symbols),
        ping_interval=_seconds(t, "ping_interval"),
        ping_timeout=_seconds(t, "ping_timeout"),
        silence_timeout=_seconds(t, "silence_timeout"),
        fallback_url=_url(t, "fallback_url", ("http", "https"), required=False),
        poll_interval=_seconds(t, "poll_interval"),
        reconnect=_reconnect(t.table("reconnect")),
    )


def _reconnect(t: _Table) -> ReconnectConfig:
    dns_check_every = t.get("dns_check_every")
    if (
        isinstance(dns_check_every, bool)
        or not isinstance(dns_check_every, int)
        or dns_check_every < 1
    ):
        t.problem("dns_check_every", dns_check_every, "a whole number >= 1")
        dns_check_every = t.default("dns_check_every", int)
    config = ReconnectConfig(
        initial_delay=_seconds(t, "initial_delay"),
        max_delay=_seconds(t, "max_delay"),
        multiplier=_number(t, "multiplier", "a finite number >= 1", lambda x: x >= 1),
        jitter=_number(t, "jitter", "a fraction from 0 to 1", lambda x: 0 <= x <= 1),
        dns_check_every=dns_check_every,
        stable_after=_seconds_or_zero(t, "stable_after"),
    )
    _check_max_delay(t, config)
    return config


def _check_max_delay(t: _Table, config: ReconnectConfig) -> None:
    """The backoff cap cannot be below the first delay."""
    if t.ok("initial_delay", "max_delay") and config.max_delay < config.initial_delay:
        t.problem(
            "max_delay",
            config.max_delay,
            f">= {t.dotted('initial_delay')} ({config.initial_delay:g})",
        )


def _dns(t: _Table) -> DnsConfig:
    def servers(key: str) -> tuple[Nameserver, ...]:
        found = _string_list(t, key, _NAMESERVER_EXPECTED, parse_nameserver)
        return tuple(ns for _, _, ns in found)

    return DnsConfig(
        servers=servers("servers"),
        fallback_servers=servers("fallback_servers"),
        timeout=_seconds(t, "timeout"),
    )


def _prices(t: _Table) -> PricesConfig:
    config = PricesConfig(
        cache_timeout=_seconds(t, "cache_timeout"),
        stale_warning=_seconds(t, "stale_warning"),
    )
    _check_cache_outlives_stale(t, config)
    return config


def _check_cache_outlives_stale(t: _Table, config: PricesConfig) -> None:
    """A price turns stale before it turns unusable, never after."""
    if t.ok("cache_timeout", "stale_warning") and config.cache_timeout < config.stale_warning:
        t.problem(
            "cache_timeout",
            config.cache_timeout,
            f">= {t.dotted('stale_warning')} ({config.stale_warning:g})",
        )


def _guard(t: _Table) -> GuardConfig:
    policy = _choice(t, "blind_policy", [p.value for p in BlindPolicy])
    return GuardConfig(
        sweep_interval=_seconds(t, "sweep_interval"),
        blind_policy=BlindPolicy(policy),
        blind_after=_seconds_or_zero(t, "blind_after"),
    )


def _timezone(t: _Table) -> str:
    expected = 'an IANA time zone name such as "Asia/Kolkata"'
    name = _string(t, "timezone", expected)
    try:
        zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError, OSError):
        t.problem("timezone", name, expected)
        return t.default("timezone", str)
    return name


def _weekday(text: str) -> int:
    return WEEKDAY_NAMES.index(text)  # ValueError when unknown


def _holidays(t: _Table) -> frozenset[datetime.date]:
    expected = 'dates "YYYY-MM-DD"'
    found: dict[datetime.date, str] = {}
    for key, item in _items(t, "holidays", expected):
        day: datetime.date | None = None
        if isinstance(item, datetime.date) and not isinstance(item, datetime.datetime):
            day = item  # a bare TOML date
        elif isinstance(item, str) and re.fullmatch(r"\d{4}-\d\d-\d\d", item, re.ASCII):
            try:
                day = datetime.date.fromisoformat(item)
            except ValueError:
                day = None
        if day is None:
            t.problem(key, item, 'a date "YYYY-MM-DD"')
        elif day in found:
            t.problem(key, item, f"no repeat of {t.dotted(found[day])}")
        else:
            found[day] = key
    return frozenset(found)


def _market(t: _Table) -> MarketConfig:
    sessions = _string_list(t, "sessions", _SESSION_EXPECTED, parse_session)
    weekdays = _string_list(t, "weekdays", " | ".join(WEEKDAY_NAMES), _weekday)
    config = MarketConfig(
        timezone=_timezone(t),
        sessions=tuple(sorted(s for _, _, s in sessions)),
        weekdays=frozenset(d for _, _, d in weekdays),
        holidays=_holidays(t),
        always_open=_bool(t, "always_open"),
    )
    _check_sessions_disjoint(t, sessions)
    _check_market_opens(t, config)
    return config


_Session = tuple[datetime.time, datetime.time]


def _check_sessions_disjoint(t: _Table, sessions: Sequence[tuple[str, str, _Session]]) -> None:
    """Two sessions of one day may touch but not overlap."""
    ordered = sorted(sessions, key=lambda s: s[2])
    for (prev_key, prev_text, prev), (key, text, this) in itertools.pairwise(ordered):
        if this[0] < prev[1]:
            expected = f"a session not overlapping {t.dotted(prev_key)} ({prev_text!r})"
            t.problem(key, text, expected)


def _check_market_opens(t: _Table, config: MarketConfig) -> None:
    """Unless always open, the market needs at least one session and one weekday."""
    if config.always_open:
        return
    for key, value in (("sessions", config.sessions), ("weekdays", config.weekdays)):
        if not value and t.ok(key):
            t.problem(key, [], "at least one entry unless market.always_open = true")


def _broker(t: _Table) -> BrokerConfig:
    return BrokerConfig(kind=_choice(t, "kind", BROKER_KINDS))


def _upstox(t: _Table, env: Mapping[str, str]) -> UpstoxConfig:
    token_file = _string(t, "token_file", 'a file path, or ""') or (
        _credential_or_default(env, BROKER_TOKEN_CREDENTIAL, "upstox.token_file")
    )
    return UpstoxConfig(
        api_url=_url(t, "api_url", ("https", "http"), required=True),
        hft_url=_url(t, "hft_url", ("https", "http"), required=True),
        token_file=token_file,
        product=_choice(t, "product", UPSTOX_PRODUCTS),
    )


def _check_upstox_token(root: _Table, config: Config) -> None:
    """Upstox needs an access token: from upstox.token_file or the broker-token credential."""
    uses = config.feed.protocol == "upstox" or config.broker.kind == "upstox"
    if uses and not config.upstox.token_file:
        root.problem(
            "upstox.token_file",
            config.upstox.token_file,
            "a file holding the Upstox access token (or the broker-token credential"
            " in $CREDENTIALS_DIRECTORY) when feed.protocol or broker.kind is upstox",
        )


def _positions(root: _Table) -> tuple[PositionSpec, ...]:
    value = root.get("positions", [])
    if not isinstance(value, list):
        root.problem("positions", value, "an array of tables [[positions]]")
        return ()
    specs: list[PositionSpec] = []
    seen: dict[str, str] = {}
    for i, entry in enumerate(value):
        key = f"positions[{i}]"
        if not isinstance(entry, Mapping):
            root.problem(key, entry, "a table with " + ", ".join(POSITION_FIELDS))
            continue
        table = _Table(entry, key, root.problems)
        spec = _position(table)
        table.finish()
        if spec is None:
            continue
        if spec.symbol in seen:
            table.problem(
                "symbol", spec.symbol, f"a symbol not already used by {seen[spec.symbol]}"
            )
            continue
        seen[spec.symbol] = key
        specs.append(spec)
    return tuple(specs)


def _position(t: _Table) -> PositionSpec | None:
    """The entry as a PositionSpec, or None when it has problems (all of them recorded)."""
    t.used.update(POSITION_FIELDS)  # finish() then names only unknown keys
    spec, problems = parse_spec(t.data)
    for problem in problems:
        t.problem(problem.field, problem.value, problem.expected)
    return spec


def _account(t: _Table) -> AccountConfig:
    products = _string_list(t, "products", " | ".join(UPSTOX_PRODUCTS), _upstox_product)
    config = AccountConfig(
        source=_choice(t, "source", ACCOUNT_SOURCES),
        reconcile_interval=_seconds(t, "reconcile_interval"),
        confirm_within=_seconds(t, "confirm_within"),
        products=tuple(p for _, _, p in products),
    )
    _check_products_given(t, config)
    return config


def _safety_net(t: _Table) -> SafetyNetConfig:
    return SafetyNetConfig(
        enabled=_bool(t, "enabled"),
        margin_pct=_number(t, "margin_pct", "a percentage > 0 and below 50", lambda x: 0 < x < 50),
    )


STORE_SCHEMES = ("postgresql", "postgres")


def _store(t: _Table) -> StoreConfig:
    expected = '"" (SQLite in daemon.state_dir) or a postgresql://USER@HOST[:PORT]/DATABASE URL'
    settle = _seconds_or_zero(t, "takeover_settle")
    value = t.get("url")
    if not isinstance(value, str):
        t.problem("url", value, expected)
        return StoreConfig(t.default("url", str), settle)
    if not value:
        return StoreConfig("", settle)
    try:
        parts = urlsplit(value)
        valid = parts.scheme in STORE_SCHEMES and bool(parts.hostname) and parts.port != 0
    except ValueError:  # a bad port
        valid = False
    if not valid:
        t.problem("url", _without_password(value), expected)
        return StoreConfig("", settle)
    return StoreConfig(value, settle)


def _without_password(url: str) -> str:
    """A URL as it may be shown: a password in it (never logged) replaced by ***."""
    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
    except ValueError:
        return url.split("@", 1)[-1] if "@" in url else url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return parts._replace(netloc=netloc).geturl()


def _check_shared_store_broker(root: _Table, config: Config) -> None:
    """The paper broker's account lives in one process: instances sharing a store cannot
    share it, and a takeover would find another account."""
    if config.store.shared and config.broker.kind == "paper" and root.ok("broker"):
        root.problem(
            "broker.kind",
            "paper",
            "a broker the instances sharing store.url can all reach (upstox); the paper"
            " account lives inside one process",
        )


def _upstox_product(text: str) -> str:
    if text not in UPSTOX_PRODUCTS:
        raise ValueError(text)
    return text


def _check_products_given(t: _Table, config: AccountConfig) -> None:
    """With no product counted, every broker position would be ignored."""
    if not config.products and t.ok("products"):
        t.problem("products", [], "at least one of " + " | ".join(UPSTOX_PRODUCTS))


_RULE_SYMBOLS_EXPECTED: Final = (
    SYMBOL_EXPECTED.replace("a printable symbol", "printable symbols") + ', or "*" for any'
)


def _rules(root: _Table) -> tuple[ExitRule, ...]:
    value = root.get("rules", [])
    if not isinstance(value, list):
        root.problem("rules", value, "an array of tables [[rules]]")
        return ()
    rules: list[ExitRule] = []
    for i, entry in enumerate(value):
        key = f"rules[{i}]"
        if not isinstance(entry, Mapping):
            expected = "a table with symbols and " + ", ".join(RULE_PERCENTAGES)
            root.problem(key, entry, expected)
            continue
        table = _Table(entry, key, root.problems)
        rule = _rule(table)
        table.finish()
        _check_rule_has_a_level(root, table, rule)
        rules.append(rule)
    return tuple(rules)


def _rule(t: _Table) -> ExitRule:
    stop = f"a finite number > 0 and below {MAX_STOP_PCT:g} (percent of the average price)"
    target = f"a finite number > 0 and below {MAX_TAKE_PROFIT_PCT:g} (percent of the average price)"
    return ExitRule(
        symbols=_rule_symbols(t),
        stop_loss_pct=_optional_number(t, "stop_loss_pct", stop, lambda x: 0 < x < MAX_STOP_PCT),
        take_profit_pct=_optional_number(
            t, "take_profit_pct", target, lambda x: 0 < x < MAX_TAKE_PROFIT_PCT
        ),
        trailing_stop_pct=_optional_number(
            t, "trailing_stop_pct", stop, lambda x: 0 < x < MAX_STOP_PCT
        ),
    )


def _rule_symbols(t: _Table) -> tuple[str, ...]:
    if t.get("symbols", _MISSING) is _MISSING:
        t.problem("symbols", _MISSING, f"an array of {_RULE_SYMBOLS_EXPECTED} (required)")
        return ()
    found = _string_list(t, "symbols", _RULE_SYMBOLS_EXPECTED, _symbol)
    if not found and t.ok("symbols"):
        t.problem("symbols", [], 'at least one symbol or instrument key, or "*" for any')
    return tuple(text for _, text, _ in found)


def _optional_number(
    t: _Table, key: str, expected: str, valid: Callable[[float], bool]
) -> float | None:
    """The number at `key`, or None when it is absent (or has a problem, recorded)."""
    if t.get(key, None) is None:
        return None
    return _valid_number(t, key, expected, valid)


def _check_rule_has_a_level(root: _Table, t: _Table, rule: ExitRule) -> None:
    """A rule must set at least one exit level, or it would guard nothing.

    Named as the rule itself (`rules[0]`), with the whole table as the value.
    """
    levels = (rule.stop_loss_pct, rule.take_profit_pct, rule.trailing_stop_pct)
    if all(level is None for level in levels) and t.ok(*RULE_PERCENTAGES):
        root.problem(t.path, t.data, "at least one of " + ", ".join(RULE_PERCENTAGES))


def _check_broker_source_has_rules(root: _Table, config: Config) -> None:
    """account.source = broker imports positions through [[rules]]: with none, nothing could be."""
    if config.account.source == "broker" and not config.rules and root.ok("rules"):
        root.problem("rules", [], "at least one [[rules]] entry when account.source is broker")


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)
