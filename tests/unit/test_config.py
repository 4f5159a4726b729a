"""Configuration parsing and validation (docs/config.md)."""

from __future__ import annotations

import dataclasses
import datetime
import inspect
import ipaddress
import math
import re
import tomllib
import zoneinfo
from collections.abc import Mapping
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tickguard import config as cfg
from tickguard.brokers.upstox import UpstoxBroker
from tickguard.config import (
    DEFAULTS,
    BlindPolicy,
    Config,
    ConfigFileError,
    Nameserver,
    config_path,
    load_config,
    parse_config,
    parse_listen,
    parse_nameserver,
    parse_session,
)
from tickguard.core.account import ExitRule
from tickguard.core.backoff import BackoffPolicy
from tickguard.core.positions import PositionSpec, Side
from tickguard.errors import ConfigError, ConfigProblem

EXAMPLE = Path(__file__).resolve().parents[2] / "packaging" / "config.example.toml"
EXAMPLE_URL = "wss://feed.example.com/ws"
URL = "wss://feed.test/ws"
NO_ENV: Mapping[str, str] = {}


def build(**overrides: object) -> dict[str, object]:
    """A config table with feed.url set plus `overrides`, keyed by dotted path (`__` for `.`)."""
    data: dict[str, object] = {"feed": {"url": URL}}
    for dotted, value in overrides.items():
        *tables, key = dotted.split("__")
        node = data
        for name in tables:
            child = node.setdefault(name, {})
            assert isinstance(child, dict)
            node = child
        node[key] = value
    return data


def with_key(dotted: str, value: object) -> dict[str, object]:
    """A config with feed.url set and one dotted key set to `value`."""
    return build(**{dotted.replace(".", "__"): value})


def problems(data: Mapping[str, object], env: Mapping[str, str] = NO_ENV) -> list[ConfigProblem]:
    """The problems parse_config reports for `data` (empty when it is valid)."""
    try:
        parse_config(data, env=env)
    except ConfigError as exc:
        assert exc.problems, "a ConfigError must carry at least one problem"
        return list(exc.problems)
    return []


def only_problem(data: Mapping[str, object]) -> ConfigProblem:
    """The single problem `data` has; fails when it has none or several."""
    found = problems(data)
    assert len(found) == 1, [str(p) for p in found]
    return found[0]


# --- defaults and the example file ---------------------------------------------------------

# Every default, written out here independently of tickguard.config (from docs/config.md
# and packaging/config.example.toml): changing a default in the code fails a test.
EXPECTED_DEFAULTS: dict[str, dict[str, object]] = {
    "daemon": {"state_dir": "/var/lib/tickguard", "log_level": "info"},
    "http": {"listen": "127.0.0.1:8000", "token_file": ""},
    "feed": {
        "protocol": "json",
        "url": "",
        "symbols": [],
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
        "servers": [],
        "fallback_servers": ["8.8.8.8", "1.1.1.1", "8.8.4.4", "1.0.0.1"],
        "timeout": 5.0,
    },
    "prices": {"cache_timeout": 300.0, "stale_warning": 30.0},
    "guard": {"sweep_interval": 1.0, "blind_policy": "hold", "blind_after": 300.0},
    "market": {
        "timezone": "Asia/Kolkata",
        "sessions": ["09:15-15:30"],
        "weekdays": ["mon", "tue", "wed", "thu", "fri"],
        "holidays": [],
        "always_open": False,
    },
    "broker": {"kind": "paper"},
    "upstox": {
        "api_url": "https://api.upstox.com",
        "hft_url": "https://api-hft.upstox.com",
        "token_file": "",
        "product": "I",
    },
    "account": {
        "source": "config",
        "reconcile_interval": 5.0,
        "confirm_within": 60.0,
        "products": ["I", "D", "MTF"],
    },
    "safety_net": {"enabled": False, "margin_pct": 1.0},  # SPEC 10
    "store": {"url": "", "takeover_settle": 12.0},  # SPEC 9
}


def expected_config(url: str = URL, state_dir: Path = Path("/var/lib/tickguard")) -> Config:
    """The Config a file holding only feed.url (and no environment) gives, written out."""
    return Config(
        daemon=cfg.DaemonConfig(state_dir, "info"),
        http=cfg.HttpConfig("127.0.0.1", 8000, ""),
        feed=cfg.FeedConfig(
            protocol="json",
            url=url,
            symbols=(),
            ping_interval=5.0,
            ping_timeout=5.0,
            silence_timeout=10.0,
            fallback_url="",
            poll_interval=1.0,
            reconnect=cfg.ReconnectConfig(0.5, 30.0, 2.0, 0.5, 3, 30.0),
        ),
        dns=cfg.DnsConfig(
            servers=(),
            fallback_servers=tuple(
                Nameserver(ip) for ip in ("8.8.8.8", "1.1.1.1", "8.8.4.4", "1.0.0.1")
            ),
            timeout=5.0,
        ),
        prices=cfg.PricesConfig(cache_timeout=300.0, stale_warning=30.0),
        guard=cfg.GuardConfig(1.0, BlindPolicy.HOLD, 300.0),
        market=cfg.MarketConfig(
            timezone="Asia/Kolkata",
            sessions=((datetime.time(9, 15), datetime.time(15, 30)),),
            weekdays=frozenset(range(5)),
            holidays=frozenset(),
            always_open=False,
        ),
        broker=cfg.BrokerConfig("paper"),
        upstox=cfg.UpstoxConfig("https://api.upstox.com", "https://api-hft.upstox.com", "", "I"),
        account=cfg.AccountConfig("config", 5.0, 60.0, ("I", "D", "MTF")),
        safety_net=cfg.SafetyNetConfig(enabled=False, margin_pct=1.0),
        store=cfg.StoreConfig("", 12.0),
    )


def test_defaults_are_the_documented_values() -> None:
    """DEFAULTS holds exactly the documented defaults, key for key and value for value."""
    assert _plain(DEFAULTS) == EXPECTED_DEFAULTS


def test_default_values_have_the_types_toml_gives() -> None:
    """Numbers written 5.0 are floats and counts ints, as tomllib reads them from the example."""

    def types_of(table: Mapping[str, object]) -> dict[str, object]:
        return {
            k: types_of(v) if isinstance(v, Mapping) else type(v).__name__ for k, v in table.items()
        }

    assert types_of(_plain(DEFAULTS)) == types_of(EXPECTED_DEFAULTS)


def test_minimal_config_is_the_defaults() -> None:
    """A file holding only feed.url gives the defaults, spelled out, for everything else."""
    assert parse_config(build(), env=NO_ENV) == expected_config()


def test_defaults_table_parses_to_the_defaults() -> None:
    """DEFAULTS written out in full (with a url) parses to what leaving every key out gives."""
    data = _plain(DEFAULTS)  # fresh dicts and lists
    data["feed"]["url"] = URL
    assert parse_config(data, env=NO_ENV) == expected_config()


def test_example_parses_to_exactly_the_defaults() -> None:
    """packaging/config.example.toml gives the defaults, feed.url aside."""
    assert load_config(EXAMPLE, env=NO_ENV) == expected_config(EXAMPLE_URL)


def test_example_spells_out_every_default() -> None:
    """Read as plain TOML, the example is DEFAULTS with its feed.url set and state_dir
    left commented out (so that $STATE_DIRECTORY applies)."""
    with EXAMPLE.open("rb") as file:
        data = tomllib.load(file)
    data["feed"]["url"] = ""
    data["daemon"]["state_dir"] = EXPECTED_DEFAULTS["daemon"]["state_dir"]
    assert data == _plain(DEFAULTS)


def test_example_defers_to_state_directory(tmp_path: Path) -> None:
    """The example leaves state_dir to $STATE_DIRECTORY, as the default does."""
    env = {"STATE_DIRECTORY": str(tmp_path)}
    loaded = load_config(EXAMPLE, env=env)
    assert loaded == expected_config(EXAMPLE_URL, state_dir=tmp_path)


def test_default_lookup() -> None:
    """config.default gives one key's default by its dotted key, checked against a type."""
    assert cfg.default("feed.reconnect.jitter", float) == 0.5
    assert cfg.default("account.products", tuple) == ("I", "D", "MTF")
    with pytest.raises(KeyError):
        cfg.default("feed.reconnect.jiter", float)
    with pytest.raises(KeyError):
        cfg.default("rules.symbols", tuple)  # [[rules]] and [[positions]] have no defaults
    with pytest.raises(KeyError):
        cfg.default("feed.url.host", str)
    with pytest.raises(TypeError, match=r"feed\.ping_interval"):
        cfg.default("feed.ping_interval", str)


def test_upstox_broker_defaults_are_the_configs() -> None:
    """UpstoxBroker's constructor defaults are the [upstox] and [account] defaults."""
    parameters = inspect.signature(UpstoxBroker).parameters
    defaults = {name: parameters[name].default for name in ("api_url", "hft_url", "product")}
    assert defaults == {k: v for k, v in EXPECTED_DEFAULTS["upstox"].items() if k in defaults}
    assert list(parameters["products"].default) == EXPECTED_DEFAULTS["account"]["products"]


def test_default_reconnect_is_a_valid_backoff_policy() -> None:
    """The parsed [feed.reconnect] defaults make the documented reconnect schedule."""
    policy = BackoffPolicy(*dataclasses.astuple(expected_config().feed.reconnect))
    assert [policy.base_delay(n) for n in range(1, 9)] == [0.5, 1, 2, 4, 8, 16, 30, 30]


def _flat_keys(table: Mapping[str, object], prefix: str = "") -> list[str]:
    keys: list[str] = []
    for key, value in table.items():
        if isinstance(value, Mapping):
            keys += _flat_keys(value, f"{prefix}{key}.")
        else:
            keys.append(f"{prefix}{key}")
    return keys


def _example_keys() -> dict[str, int]:
    """Each key the example sets, plus the commented-out state_dir, dotted, with its line index."""
    table, found = "", {}
    for i, line in enumerate(EXAMPLE.read_text().splitlines()):
        header = re.fullmatch(r"\[([a-z_.]+)\]", line)
        key = re.match(r"([a-z_]+) = |# (state_dir) = ", line)
        if header:
            table = header.group(1) + "."
        elif key:
            found[table + (key.group(1) or key.group(2))] = i
    return found


def test_example_documents_every_key() -> None:
    """Every key the parser knows appears in the example, right below a comment line."""
    lines = EXAMPLE.read_text().splitlines()
    keys = _example_keys()
    assert sorted(keys) == sorted(_flat_keys(DEFAULTS))
    for key, index in keys.items():
        above = lines[index - 1]
        assert above.startswith("# ") and not re.match(r"# [a-z_]+ = ", above), key


def _plain(table: Mapping[str, object]) -> dict[str, dict[str, object]]:
    """DEFAULTS as nested dicts with lists, the shape tomllib returns."""

    def convert(value: object) -> object:
        if isinstance(value, Mapping):
            return {k: convert(v) for k, v in value.items()}
        return list(value) if isinstance(value, tuple) else value

    result = convert(table)
    assert isinstance(result, dict)
    return result


def test_config_is_frozen() -> None:
    """Config values cannot be changed after parsing."""
    config = parse_config(build(), env=NO_ENV)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.feed.url = "wss://elsewhere/ws"  # type: ignore[misc]


def test_market_zone_loads() -> None:
    """MarketConfig.zone() is the configured zoneinfo time zone."""
    market = parse_config(with_key("market.timezone", "Europe/London"), env=NO_ENV).market
    assert market.zone() == zoneinfo.ZoneInfo("Europe/London")


# --- environment ---------------------------------------------------------------------------


def test_state_dir_from_environment() -> None:
    """Without daemon.state_dir, $STATE_DIRECTORY (its first entry) is the state directory."""
    env = {"STATE_DIRECTORY": "/run/state/a:/run/state/b"}
    assert parse_config(build(), env=env).daemon.state_dir == Path("/run/state/a")


def test_state_dir_in_config_beats_environment() -> None:
    """An explicit daemon.state_dir wins over $STATE_DIRECTORY."""
    config = parse_config(with_key("daemon.state_dir", "/srv/tg"), env={"STATE_DIRECTORY": "/x"})
    assert config.daemon.state_dir == Path("/srv/tg")


def test_token_file_from_credentials_directory(tmp_path: Path) -> None:
    """With no token_file, $CREDENTIALS_DIRECTORY/api-token is used when that file exists."""
    (tmp_path / "api-token").write_text("secret\n")
    config = parse_config(build(), env={"CREDENTIALS_DIRECTORY": str(tmp_path)})
    assert config.http.token_file == str(tmp_path / "api-token")


def test_token_file_absent_credential_means_none(tmp_path: Path) -> None:
    """A credentials directory without api-token leaves the token unconfigured."""
    config = parse_config(build(), env={"CREDENTIALS_DIRECTORY": str(tmp_path)})
    assert config.http.token_file == ""


def test_token_file_in_config_beats_credentials(tmp_path: Path) -> None:
    """An explicit http.token_file wins over the systemd credential."""
    (tmp_path / "api-token").write_text("secret\n")
    data = with_key("http.token_file", "/etc/tickguard/token")
    config = parse_config(data, env={"CREDENTIALS_DIRECTORY": str(tmp_path)})
    assert config.http.token_file == "/etc/tickguard/token"


def test_config_path_resolution() -> None:
    """--config, else $TICKGUARD_CONFIG, else /etc/tickguard/config.toml."""
    env = {"TICKGUARD_CONFIG": "/env/c.toml"}
    assert config_path("/cli/c.toml", env) == Path("/cli/c.toml")
    assert config_path(None, env) == Path("/env/c.toml")
    assert config_path(None, {}) == Path("/etc/tickguard/config.toml")


# --- accepted values -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("dotted", "value", "attribute", "parsed"),
    [
        ("feed.ping_interval", 3, "feed.ping_interval", 3.0),
        ("feed.reconnect.jitter", 0, "feed.reconnect.jitter", 0.0),
        ("feed.reconnect.jitter", 1.0, "feed.reconnect.jitter", 1.0),
        ("feed.reconnect.multiplier", 1, "feed.reconnect.multiplier", 1.0),
        ("feed.reconnect.stable_after", 0, "feed.reconnect.stable_after", 0.0),
        ("guard.blind_after", 0.0, "guard.blind_after", 0.0),
        ("guard.blind_policy", "close", "guard.blind_policy", BlindPolicy.CLOSE),
        ("http.listen", "0.0.0.0:0", "http.port", 0),
        ("http.listen", "[::1]:8080", "http.host", "::1"),
        ("http.listen", "localhost:65535", "http.host", "localhost"),
        ("feed.url", "ws://127.0.0.1:9000/ws", "feed.url", "ws://127.0.0.1:9000/ws"),
        ("feed.fallback_url", "https://api.test/p", "feed.fallback_url", "https://api.test/p"),
        ("feed.symbols", ["BOSCHLTD", "ADANIENT"], "feed.symbols", ("BOSCHLTD", "ADANIENT")),
        ("feed.protocol", "upstox", "feed.protocol", "upstox"),
        ("broker.kind", "upstox", "broker.kind", "upstox"),
        ("daemon.log_level", "debug", "daemon.log_level", "debug"),
        ("market.weekdays", ["sun", "sat"], "market.weekdays", frozenset({5, 6})),
        (
            "market.holidays",
            ["2026-01-26", datetime.date(2026, 3, 4)],
            "market.holidays",
            frozenset({datetime.date(2026, 1, 26), datetime.date(2026, 3, 4)}),
        ),
        (
            "market.sessions",
            ["13:00-15:30", "09:15-13:00"],
            "market.sessions",
            (
                (datetime.time(9, 15), datetime.time(13, 0)),
                (datetime.time(13, 0), datetime.time(15, 30)),
            ),
        ),
        (
            "dns.servers",
            ["9.9.9.9", "10.0.0.1:5353", "[::1]:5353", "2001:db8::1", "[fe80::1]"],
            "dns.servers",
            (
                Nameserver("9.9.9.9"),
                Nameserver("10.0.0.1", 5353),
                Nameserver("::1", 5353),
                Nameserver("2001:db8::1", 53),
                Nameserver("fe80::1", 53),
            ),
        ),
        ("dns.fallback_servers", [], "dns.fallback_servers", ()),
        ("account.reconcile_interval", 0.05, "account.reconcile_interval", 0.05),
        ("account.confirm_within", 1, "account.confirm_within", 1.0),
        ("account.products", ["MTF", "D"], "account.products", ("MTF", "D")),
        ("safety_net.enabled", True, "safety_net.enabled", True),
        ("safety_net.margin_pct", 0.25, "safety_net.margin_pct", 0.25),
    ],
)
def test_accepted_value(dotted: str, value: object, attribute: str, parsed: object) -> None:
    """A valid value parses to the expected typed value."""
    data = with_key(dotted, value)
    if value == "upstox":  # Upstox needs its access token
        data["upstox"] = {"token_file": "/run/credentials/upstox-token"}
    node: object = parse_config(data, env=NO_ENV)
    for name in attribute.split("."):
        node = getattr(node, name)
    assert node == parsed


def test_a_shared_store_with_a_broker_every_instance_reaches() -> None:
    """A postgresql:// store (SPEC 9) with Upstox; with the paper broker, refused."""
    url = "postgresql://tg@db.example:5433/tickguard?connect_timeout=5"
    data = build(store__url=url, broker__kind="upstox")
    data["upstox"] = {"token_file": "/run/credentials/upstox-token"}
    assert parse_config(data, env=NO_ENV).store == cfg.StoreConfig(url)
    (problem,) = problems(build(store__url=url))
    assert (problem.key, problem.value) == ("broker.kind", "paper")
    assert "one process" in problem.expected


def test_empty_sessions_fine_when_always_open() -> None:
    """An always-open market needs no sessions or weekdays."""
    data = build(market__always_open=True, market__sessions=[], market__weekdays=[])
    assert parse_config(data, env=NO_ENV).market.always_open is True


# --- rejected values -----------------------------------------------------------------------

BROKEN: list[tuple[str, object, str, object]] = [
    # (dotted key set, value, key named in the problem, value named in the problem)
    ("daemon", 3, "daemon", 3),
    ("daemon.state_dir", "", "daemon.state_dir", ""),
    ("daemon.state_dir", 5, "daemon.state_dir", 5),
    ("daemon.log_level", "verbose", "daemon.log_level", "verbose"),
    ("daemon.log_level", "INFO", "daemon.log_level", "INFO"),
    ("http.listen", "127.0.0.1", "http.listen", "127.0.0.1"),
    ("http.listen", "127.0.0.1:70000", "http.listen", "127.0.0.1:70000"),
    ("http.listen", "127.0.0.1:", "http.listen", "127.0.0.1:"),
    ("http.listen", "127.0.0.1:+80", "http.listen", "127.0.0.1:+80"),
    ("http.listen", "example.com:80", "http.listen", "example.com:80"),
    ("http.listen", "::1:8000", "http.listen", "::1:8000"),
    ("http.listen", "[127.0.0.1]:80", "http.listen", "[127.0.0.1]:80"),
    ("http.listen", 8000, "http.listen", 8000),
    ("http.token_file", 3, "http.token_file", 3),
    ("http.port", 8000, "http.port", 8000),
    ("feed.protocol", "fix", "feed.protocol", "fix"),
    ("feed.url", "", "feed.url", ""),
    ("feed.url", "http://feed.test/ws", "feed.url", "http://feed.test/ws"),
    ("feed.url", "wss://", "feed.url", "wss://"),
    ("feed.url", "wss://feed.test:99999/ws", "feed.url", "wss://feed.test:99999/ws"),
    ("feed.url", 42, "feed.url", 42),
    ("feed.fallback_url", "ftp://x.test/", "feed.fallback_url", "ftp://x.test/"),
    ("feed.fallback_url", "https://", "feed.fallback_url", "https://"),
    ("feed.symbols", "BOSCHLTD", "feed.symbols", "BOSCHLTD"),
    ("feed.symbols", ["A", "B", "A"], "feed.symbols[2]", "A"),
    ("feed.symbols", ["A", ""], "feed.symbols[1]", ""),
    ("feed.symbols", [" A"], "feed.symbols[0]", " A"),
    ("feed.symbols", [7], "feed.symbols[0]", 7),
    ("feed.ping_interval", 0, "feed.ping_interval", 0),
    ("feed.ping_interval", -1.5, "feed.ping_interval", -1.5),
    ("feed.ping_interval", math.inf, "feed.ping_interval", math.inf),
    ("feed.ping_interval", True, "feed.ping_interval", True),
    ("feed.ping_interval", "5", "feed.ping_interval", "5"),
    ("feed.ping_timeout", 0.0, "feed.ping_timeout", 0.0),
    ("feed.silence_timeout", -10, "feed.silence_timeout", -10),
    ("feed.poll_interval", 0, "feed.poll_interval", 0),
    ("feed.reconnect", 5, "feed.reconnect", 5),
    ("feed.reconnect.initial_delay", 0, "feed.reconnect.initial_delay", 0),
    ("feed.reconnect.max_delay", -1, "feed.reconnect.max_delay", -1),
    ("feed.reconnect.multiplier", 0.5, "feed.reconnect.multiplier", 0.5),
    ("feed.reconnect.jitter", 1.5, "feed.reconnect.jitter", 1.5),
    ("feed.reconnect.jitter", -0.1, "feed.reconnect.jitter", -0.1),
    ("feed.reconnect.dns_check_every", 0, "feed.reconnect.dns_check_every", 0),
    ("feed.reconnect.dns_check_every", 2.5, "feed.reconnect.dns_check_every", 2.5),
    ("feed.reconnect.dns_check_every", True, "feed.reconnect.dns_check_every", True),
    ("feed.reconnect.stable_after", -1, "feed.reconnect.stable_after", -1),
    ("feed.reconect", {"x": 1}, "feed.reconect", {"x": 1}),
    ("dns.servers", ["dns.google"], "dns.servers[0]", "dns.google"),
    ("dns.servers", ["8.8.8.8:0"], "dns.servers[0]", "8.8.8.8:0"),
    ("dns.servers", ["8.8.8.8", "8.8.8.8:53"], "dns.servers[1]", "8.8.8.8:53"),
    ("dns.servers", ["[8.8.8.8]:53"], "dns.servers[0]", "[8.8.8.8]:53"),
    ("dns.fallback_servers", "8.8.8.8", "dns.fallback_servers", "8.8.8.8"),
    ("dns.timeout", 0, "dns.timeout", 0),
    ("prices.stale_warning", 0, "prices.stale_warning", 0),
    ("prices.cache_timeout", math.nan, "prices.cache_timeout", math.nan),
    ("guard.sweep_interval", 0, "guard.sweep_interval", 0),
    ("guard.blind_policy", "panic", "guard.blind_policy", "panic"),
    ("guard.blind_after", -1, "guard.blind_after", -1),
    ("market.timezone", "Mars/Olympus", "market.timezone", "Mars/Olympus"),
    ("market.timezone", "", "market.timezone", ""),
    ("market.timezone", "../../etc/passwd", "market.timezone", "../../etc/passwd"),
    ("market.sessions", ["9:15-15:30"], "market.sessions[0]", "9:15-15:30"),
    ("market.sessions", ["15:30-09:15"], "market.sessions[0]", "15:30-09:15"),
    ("market.sessions", ["10:00-10:00"], "market.sessions[0]", "10:00-10:00"),
    ("market.sessions", ["09:15-24:00"], "market.sessions[0]", "09:15-24:00"),
    ("market.sessions", ["09:60-10:00"], "market.sessions[0]", "09:60-10:00"),
    ("market.sessions", ["०९:१५-१५:३०"], "market.sessions[0]", "०९:१५-१५:३०"),
    ("market.weekdays", ["monday"], "market.weekdays[0]", "monday"),
    ("market.weekdays", ["mon", "mon"], "market.weekdays[1]", "mon"),
    ("market.holidays", ["2026-02-30"], "market.holidays[0]", "2026-02-30"),
    ("market.holidays", ["26-01-2026"], "market.holidays[0]", "26-01-2026"),
    ("market.holidays", ["20260126"], "market.holidays[0]", "20260126"),
    (
        "market.holidays",
        [datetime.datetime(2026, 1, 26, 9, 0)],
        "market.holidays[0]",
        datetime.datetime(2026, 1, 26, 9, 0),
    ),
    (
        "market.holidays",
        ["2026-01-26", datetime.date(2026, 1, 26)],
        "market.holidays[1]",
        datetime.date(2026, 1, 26),
    ),
    ("market.always_open", "yes", "market.always_open", "yes"),
    ("broker.kind", "zerodha", "broker.kind", "zerodha"),
    ("broker.api_key", "k", "broker.api_key", "k"),
    ("position", [{}], "position", [{}]),
    ("positions", {"symbol": "A"}, "positions", {"symbol": "A"}),
    ("account", 3, "account", 3),
    ("account.source", "upstox", "account.source", "upstox"),
    ("account.source", "Broker", "account.source", "Broker"),
    ("account.source", 1, "account.source", 1),
    ("account.reconcile_interval", 0, "account.reconcile_interval", 0),
    ("account.reconcile_interval", -5.0, "account.reconcile_interval", -5.0),
    ("account.reconcile_interval", "5", "account.reconcile_interval", "5"),
    ("account.reconcile_interval", True, "account.reconcile_interval", True),
    ("account.confirm_within", 0.0, "account.confirm_within", 0.0),
    ("account.confirm_within", math.inf, "account.confirm_within", math.inf),
    ("account.confirm_within", math.nan, "account.confirm_within", math.nan),
    ("account.products", "I", "account.products", "I"),
    ("account.products", [], "account.products", []),
    ("account.products", ["i"], "account.products[0]", "i"),
    ("account.products", ["I", "CNC"], "account.products[1]", "CNC"),
    ("account.products", ["D", "D"], "account.products[1]", "D"),
    ("account.products", [1], "account.products[0]", 1),
    ("account.interval", 5.0, "account.interval", 5.0),
    ("safety_net.enabled", "yes", "safety_net.enabled", "yes"),
    ("safety_net.margin_pct", 0, "safety_net.margin_pct", 0),
    ("safety_net.margin_pct", 50, "safety_net.margin_pct", 50),
    ("safety_net.margin_pct", math.nan, "safety_net.margin_pct", math.nan),
    ("safety_net.margin", 1.0, "safety_net.margin", 1.0),
    ("store.url", "mysql://db/x", "store.url", "mysql://db/x"),
    ("store.url", "postgresql:///local", "store.url", "postgresql:///local"),
    (
        "store.url",
        "postgresql://u:hunter2@db:99999/x",
        "store.url",
        "postgresql://u:***@db:99999/x",
    ),
    ("store.url", 5, "store.url", 5),
    ("rules", {"symbols": ["*"]}, "rules", {"symbols": ["*"]}),
]


@pytest.mark.parametrize(("dotted", "value", "key", "shown"), BROKEN)
def test_rejected_value(dotted: str, value: object, key: str, shown: object) -> None:
    """An invalid value is one problem naming its dotted key and the value."""
    problem = only_problem(with_key(dotted, value))
    assert problem.key == key
    if isinstance(shown, float) and math.isnan(shown):
        assert isinstance(problem.value, float) and math.isnan(problem.value)
    else:
        assert problem.value == shown
    assert problem.expected


def test_problem_line_names_key_value_and_expectation() -> None:
    """The printed form of a problem is one line with key, value and expectation."""
    problem = only_problem(with_key("feed.reconnect.jitter", 1.5))
    assert str(problem) == "feed.reconnect.jitter: 1.5 is invalid; expected a fraction from 0 to 1"


def test_missing_url_is_a_problem() -> None:
    """feed.url is required: an empty document is invalid and says so."""
    problem = only_problem({})
    assert (problem.key, problem.value) == ("feed.url", "")
    assert "ws://" in problem.expected and "required" in problem.expected


def test_unknown_key_suggests_the_close_one() -> None:
    """A misspelt key is named and the known key it resembles is suggested."""
    problem = only_problem(with_key("feed.reconnect.intial_delay", 1.0))
    assert problem.key == "feed.reconnect.intial_delay"
    assert "did you mean 'initial_delay'?" in problem.expected


def test_unknown_key_lists_keys_not_given() -> None:
    """The known keys offered for a typo include ones the file did not set."""
    problem = only_problem(with_key("daemon.state_dr", "/x"))
    assert "did you mean 'state_dir'?" in problem.expected


def test_url_credentials_are_not_echoed() -> None:
    """A rejected URL is shown without its password or query string."""
    problem = only_problem(with_key("feed.url", "https://user:hunter2@feed.test/ws?token=abc123"))
    assert "hunter2" not in str(problem) and "abc123" not in str(problem)
    assert "feed.test" in str(problem)


def test_every_problem_reported_at_once() -> None:
    """parse_config lists all problems, not just the first."""
    data = build(
        daemon__log_level="loud",
        feed__ping_interval=-1,
        dns__timeout=0,
        market__timezone="Nowhere/Else",
        broker__kind="x",
    )
    keys = [p.key for p in problems(data)]
    assert sorted(keys) == sorted(
        ["daemon.log_level", "feed.ping_interval", "dns.timeout", "market.timezone", "broker.kind"]
    )


# --- cross-field checks --------------------------------------------------------------------


def test_max_delay_below_initial_delay() -> None:
    """feed.reconnect.max_delay must be at least initial_delay."""
    problem = only_problem(build(feed__reconnect={"initial_delay": 10, "max_delay": 5}))
    assert (problem.key, problem.value) == ("feed.reconnect.max_delay", 5.0)
    assert "feed.reconnect.initial_delay" in problem.expected


def test_max_delay_equal_to_initial_delay_is_fine() -> None:
    """A constant backoff (max_delay == initial_delay) is valid."""
    config = parse_config(build(feed__reconnect={"initial_delay": 2, "max_delay": 2}), env=NO_ENV)
    assert config.feed.reconnect.max_delay == 2.0


def test_cache_timeout_below_stale_warning() -> None:
    """prices.cache_timeout below stale_warning is rejected, naming both keys."""
    problem = only_problem(build(prices__cache_timeout=10))
    assert (problem.key, problem.value) == ("prices.cache_timeout", 10.0)
    assert "prices.stale_warning" in problem.expected


def test_cross_check_skipped_when_a_part_is_invalid() -> None:
    """An invalid part reports itself only, not a second confusing cross-field problem."""
    found = problems(build(prices__cache_timeout=10, prices__stale_warning=-1))
    assert [p.key for p in found] == ["prices.stale_warning"]


def test_overlapping_sessions() -> None:
    """Two sessions that overlap are rejected, naming the later one and the earlier."""
    problem = only_problem(with_key("market.sessions", ["09:15-12:00", "11:00-15:30"]))
    assert (problem.key, problem.value) == ("market.sessions[1]", "11:00-15:30")
    assert "market.sessions[0]" in problem.expected


@pytest.mark.parametrize("key", ["sessions", "weekdays"])
def test_market_that_never_opens(key: str) -> None:
    """Without always_open, empty sessions or weekdays (a market never open) is rejected."""
    problem = only_problem(with_key(f"market.{key}", []))
    assert (problem.key, problem.value) == (f"market.{key}", [])


# --- positions -----------------------------------------------------------------------------

LONG = {"symbol": "BOSCHLTD", "side": "long", "quantity": 38, "entry_price": 735.0}


def test_positions_parse() -> None:
    """[[positions]] entries become PositionSpecs, ints accepted as numbers."""
    entries = [
        {**LONG, "stop_loss": 698.25, "take_profit": 800, "trailing_stop": 20},
        {"symbol": "ADANIENT", "side": "short", "quantity": 5, "entry_price": 100},
    ]
    config = parse_config(build(positions=entries), env=NO_ENV)
    assert config.positions == (
        PositionSpec("BOSCHLTD", Side.LONG, 38.0, 735.0, 698.25, 800.0, 20.0),
        PositionSpec("ADANIENT", Side.SHORT, 5.0, 100.0),
    )


def test_stop_on_profit_side_is_valid() -> None:
    """A long's stop above its entry (a locked-in profit) is valid, as the example says."""
    entry = {**LONG, "stop_loss": 750.0, "take_profit": 800.0}
    assert parse_config(build(positions=[entry]), env=NO_ENV).positions[0].stop_loss == 750.0


@pytest.mark.parametrize(
    ("changes", "key", "shown"),
    [
        ({"stop_loss": 820.0, "take_profit": 800.0}, "positions[0].stop_loss", 820.0),
        (
            {"side": "short", "stop_loss": 700.0, "take_profit": 800.0},
            "positions[0].stop_loss",
            700.0,
        ),
        ({"quantity": 0}, "positions[0].quantity", 0.0),
        ({"quantity": True}, "positions[0].quantity", True),
        ({"entry_price": -1}, "positions[0].entry_price", -1.0),
        ({"entry_price": "735"}, "positions[0].entry_price", "735"),
        ({"trailing_stop": 0}, "positions[0].trailing_stop", 0.0),
        ({"take_profit": math.inf}, "positions[0].take_profit", math.inf),
        ({"side": "buy"}, "positions[0].side", "buy"),
        ({"symbol": ""}, "positions[0].symbol", ""),
        ({"symbol": 5}, "positions[0].symbol", 5),
        ({"sl": 700.0}, "positions[0].sl", 700.0),
    ],
)
def test_rejected_position(changes: dict[str, object], key: str, shown: object) -> None:
    """A bad [[positions]] field is named positions[i].field with its value."""
    problem = only_problem(build(positions=[{**LONG, **changes}]))
    assert (problem.key, problem.value) == (key, shown)


def test_position_missing_field() -> None:
    """A missing required position field is named and shown as <missing>."""
    entry = {k: v for k, v in LONG.items() if k != "side"}
    problem = only_problem(build(positions=[entry]))
    assert problem.key == "positions[0].side"
    assert str(problem).startswith("positions[0].side: <missing> is invalid; expected")


def test_position_entry_not_a_table() -> None:
    """An entry of positions that is not a table is named by its index."""
    problem = only_problem(build(positions=[LONG, "BOSCHLTD"]))
    assert (problem.key, problem.value) == ("positions[1]", "BOSCHLTD")


def test_two_positions_on_one_symbol() -> None:
    """Two config positions on one symbol are an error on the second."""
    problem = only_problem(build(positions=[LONG, {**LONG, "side": "short"}]))
    assert (problem.key, problem.value) == ("positions[1].symbol", "BOSCHLTD")
    assert "positions[0]" in problem.expected


# --- [account] and [[rules]] (docs/account.md) ---------------------------------------------

RULE = {"symbols": ["*"], "stop_loss_pct": 2.0}
HUGE = int("9" * 400)  # a double cannot hold it: float(HUGE) raises OverflowError


def test_rules_parse_in_order() -> None:
    """[[rules]] entries become ExitRules in file order, ints as floats, absent levels None."""
    entries = [
        {
            "symbols": ["BOSCHLTD", "NSE_EQ|INE848E01016"],
            "take_profit_pct": 4,
            "trailing_stop_pct": 1.5,
        },
        {"symbols": ["*"], "stop_loss_pct": 2, "take_profit_pct": 999.5},
    ]
    config = parse_config(build(rules=entries), env=NO_ENV)
    assert config.rules == (
        ExitRule(("BOSCHLTD", "NSE_EQ|INE848E01016"), None, 4.0, 1.5),
        ExitRule(("*",), 2.0, 999.5, None),
    )
    levels = [r.stop_loss_pct for r in config.rules] + [r.take_profit_pct for r in config.rules]
    assert all(type(level) is float for level in levels if level is not None)


def test_broker_source_with_rules_is_valid() -> None:
    """account.source = broker with a [[rules]] entry parses, with its other keys at defaults."""
    config = parse_config(build(account__source="broker", rules=[RULE]), env=NO_ENV)
    assert config.account == cfg.AccountConfig("broker", 5.0, 60.0, ("I", "D", "MTF"))
    assert config.rules == (ExitRule(("*",), stop_loss_pct=2.0),)


@pytest.mark.parametrize("rules", [None, []])
def test_broker_source_needs_a_rule(rules: list[object] | None) -> None:
    """account.source = broker without [[rules]] (absent or empty) is one problem naming rules."""
    data = build(account__source="broker")
    if rules is not None:
        data["rules"] = rules
    problem = only_problem(data)
    assert (problem.key, problem.value) == ("rules", [])
    assert problem.expected == "at least one [[rules]] entry when account.source is broker"


def test_broker_source_with_broken_rules_reports_them_only() -> None:
    """A rules value that is not an array is named once, not again as missing rules."""
    problem = only_problem(build(account__source="broker", rules="*"))
    assert (problem.key, problem.value) == ("rules", "*")


@pytest.mark.parametrize(
    ("changes", "key", "shown"),
    [
        ({"symbols": []}, "rules[0].symbols", []),
        ({"symbols": "*"}, "rules[0].symbols", "*"),
        ({"symbols": [""]}, "rules[0].symbols[0]", ""),
        ({"symbols": ["A", 5]}, "rules[0].symbols[1]", 5),
        ({"symbols": ["A\n"]}, "rules[0].symbols[0]", "A\n"),
        ({"symbols": [" A"]}, "rules[0].symbols[0]", " A"),
        ({"symbols": ["*", "A", "A"]}, "rules[0].symbols[2]", "A"),
        ({"stop_loss_pct": 0}, "rules[0].stop_loss_pct", 0),
        ({"stop_loss_pct": -2.0}, "rules[0].stop_loss_pct", -2.0),
        ({"stop_loss_pct": 100}, "rules[0].stop_loss_pct", 100),
        ({"stop_loss_pct": math.inf}, "rules[0].stop_loss_pct", math.inf),
        ({"stop_loss_pct": True}, "rules[0].stop_loss_pct", True),
        ({"stop_loss_pct": "2"}, "rules[0].stop_loss_pct", "2"),
        ({"stop_loss_pct": HUGE}, "rules[0].stop_loss_pct", HUGE),
        ({"trailing_stop_pct": 100.0}, "rules[0].trailing_stop_pct", 100.0),
        ({"trailing_stop_pct": 0.0}, "rules[0].trailing_stop_pct", 0.0),
        ({"take_profit_pct": 1000}, "rules[0].take_profit_pct", 1000),
        ({"take_profit_pct": 0}, "rules[0].take_profit_pct", 0),
        ({"take_profit_pct": -math.inf}, "rules[0].take_profit_pct", -math.inf),
        ({"stop_loss": 2.0}, "rules[0].stop_loss", 2.0),
    ],
)
def test_rejected_rule(changes: dict[str, object], key: str, shown: object) -> None:
    """A bad [[rules]] field is one problem named rules[i].field (or .field[j]) with its value."""
    problem = only_problem(build(rules=[{**RULE, **changes}]))
    assert (problem.key, problem.value) == (key, shown)
    assert problem.expected


def test_nan_percentage_rejected() -> None:
    """A NaN percentage is not a level."""
    problem = only_problem(build(rules=[{**RULE, "stop_loss_pct": math.nan}]))
    assert problem.key == "rules[0].stop_loss_pct"


def test_percentage_bounds_are_spelled_out() -> None:
    """The expectations name each percentage's range: below 100 for stops, 1000 for targets."""
    stop = only_problem(build(rules=[{**RULE, "trailing_stop_pct": 150}]))
    target = only_problem(build(rules=[{**RULE, "take_profit_pct": 1500}]))
    assert "> 0 and below 100 " in stop.expected
    assert "> 0 and below 1000 " in target.expected


def test_percentages_just_inside_the_bounds() -> None:
    """Levels just inside the ranges (99.99 for stops, 999.99 for targets) are accepted."""
    entry = {"symbols": ["A"], "stop_loss_pct": 99.99, "take_profit_pct": 999.99}
    config = parse_config(build(rules=[{**entry, "trailing_stop_pct": 99.99}]), env=NO_ENV)
    assert config.rules == (ExitRule(("A",), 99.99, 999.99, 99.99),)


def test_rule_without_a_level_is_named_with_its_table() -> None:
    """A rule setting none of the three percentages is a problem on rules[i], valued the table."""
    problem = only_problem(build(rules=[RULE, {"symbols": ["A", "B"]}]))
    assert (problem.key, problem.value) == ("rules[1]", {"symbols": ["A", "B"]})
    assert problem.expected == "at least one of stop_loss_pct, take_profit_pct, trailing_stop_pct"


def test_rule_with_only_a_bad_level_reports_that_level_only() -> None:
    """A rule whose one percentage is invalid names that key, not also a missing level."""
    problem = only_problem(build(rules=[{"symbols": ["*"], "take_profit_pct": 0}]))
    assert problem.key == "rules[0].take_profit_pct"


def test_rule_missing_symbols() -> None:
    """symbols is required in a rule, shown as <missing>."""
    problem = only_problem(build(rules=[{"stop_loss_pct": 2.0}]))
    assert problem.key == "rules[0].symbols"
    assert str(problem).startswith("rules[0].symbols: <missing> is invalid; expected an array")


def test_rule_entry_not_a_table() -> None:
    """An entry of rules that is not a table is named by its index."""
    problem = only_problem(build(rules=[RULE, "*"]))
    assert (problem.key, problem.value) == ("rules[1]", "*")


def test_rule_typo_suggests_the_key() -> None:
    """A misspelt percentage in a rule is named and the known key suggested."""
    problem = only_problem(build(rules=[{**RULE, "take_profit_pc": 4.0}]))
    assert problem.key == "rules[0].take_profit_pc"
    assert "did you mean 'take_profit_pct'?" in problem.expected


@pytest.mark.parametrize(
    ("data", "key"),
    [
        (with_key("account.reconcile_interval", HUGE), "account.reconcile_interval"),
        (with_key("account.confirm_within", -HUGE), "account.confirm_within"),
        (build(rules=[{**RULE, "take_profit_pct": HUGE}]), "rules[0].take_profit_pct"),
    ],
)
def test_400_digit_integer_is_a_problem_not_a_crash(data: dict[str, object], key: str) -> None:
    """A 400-digit integer (beyond a double) is a problem naming the key, shown in bounded space."""
    problem = only_problem(data)
    assert problem.key == key
    assert "<an integer of 400 digits>" in str(problem)
    assert len(str(problem)) < 200


def test_400_digit_integer_in_a_file(tmp_path: Path) -> None:
    """Read from TOML, a 400-digit reconcile_interval is a ConfigError, not an OverflowError."""
    path = tmp_path / "c.toml"
    path.write_text(f'[feed]\nurl = "{URL}"\n[account]\nreconcile_interval = {"9" * 400}\n')
    with pytest.raises(ConfigError) as caught:
        load_config(path, env=NO_ENV)
    assert str(caught.value) == (
        "account.reconcile_interval: <an integer of 400 digits> is invalid;"
        " expected a finite number of seconds > 0"
    )


def test_every_account_and_rule_problem_reported_at_once() -> None:
    """Problems across [account] and several [[rules]] are all listed, each under its own key."""
    data = build(
        account__source="brokers",
        account__confirm_within=0,
        account__products=["I", "I", "X"],
        rules=[
            {"symbols": ["*"]},
            {"symbols": ["", "A"], "take_profit_pct": 0, "stop_loss_pct": 100, "extra": 1},
            "not a table",
        ],
    )
    assert [p.key for p in problems(data)] == [
        "account.products[1]",
        "account.products[2]",
        "account.source",
        "account.confirm_within",
        "rules[0]",
        "rules[1].symbols[0]",
        "rules[1].stop_loss_pct",
        "rules[1].take_profit_pct",
        "rules[1].extra",
        "rules[2]",
    ]


def test_example_rules_block_is_valid() -> None:
    """The commented-out [[rules]] example in packaging/, uncommented, parses as documented."""
    lines = EXAMPLE.read_text().splitlines()
    start = lines.index("# [[rules]]")
    end = lines.index("", start)
    block = "\n".join(line.removeprefix("# ") for line in lines[start:end])
    data = tomllib.loads(f'[feed]\nurl = "{URL}"\n[account]\nsource = "broker"\n{block}\n')
    config = parse_config(data, env=NO_ENV)
    assert config.rules == (ExitRule(("*",), 2.0, 4.0, 1.5),)


# --- value parsers -------------------------------------------------------------------------


def test_parse_listen_brackets_ipv6() -> None:
    """parse_listen splits HOST:PORT and unwraps a bracketed IPv6 host."""
    assert parse_listen("[::]:0") == ("::", 0)
    assert parse_listen("127.0.0.1:8000") == ("127.0.0.1", 8000)
    with pytest.raises(ValueError, match="HOST:PORT"):
        parse_listen("127.0.0.1")


def test_parse_session_bounds() -> None:
    """A session runs from its start to its end on one day."""
    assert parse_session("00:00-23:59") == (datetime.time(0, 0), datetime.time(23, 59))
    with pytest.raises(ValueError, match="HH:MM-HH:MM"):
        parse_session("09:15 - 15:30")


@given(
    ip=st.ip_addresses(),
    port=st.integers(min_value=1, max_value=65535),
)
def test_nameserver_round_trips(
    ip: ipaddress.IPv4Address | ipaddress.IPv6Address, port: int
) -> None:
    """str(Nameserver) parses back to the same nameserver, for any IP and port."""
    server = Nameserver(str(ip), port)
    assert parse_nameserver(str(server)) == server


@given(seconds=st.floats(min_value=0, exclude_min=True, allow_infinity=False))
def test_any_positive_interval_accepted(seconds: float) -> None:
    """Every finite positive number of seconds is kept exactly."""
    config = parse_config(with_key("guard.sweep_interval", seconds), env=NO_ENV)
    assert config.guard.sweep_interval == seconds


@given(
    seconds=st.one_of(
        st.floats(max_value=0),
        st.just(math.inf),
        st.just(math.nan),
        st.integers(max_value=0),
    )
)
def test_any_non_positive_interval_rejected(seconds: float) -> None:
    """Zero, negative, infinite or NaN seconds are rejected, naming the key."""
    problem = only_problem(with_key("guard.sweep_interval", seconds))
    assert problem.key == "guard.sweep_interval"


# --- files ---------------------------------------------------------------------------------


def test_load_config_reads_toml(tmp_path: Path) -> None:
    """load_config parses a TOML file, bare TOML dates included."""
    path = tmp_path / "c.toml"
    path.write_text(f'[feed]\nurl = "{URL}"\n[market]\nholidays = [2026-01-26]\n')
    config = load_config(path, env=NO_ENV)
    assert config.market.holidays == frozenset({datetime.date(2026, 1, 26)})


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"[feed\nurl = 1\n", "TOML syntax error"),
        (b'[feed]\nurl = "\xff"\n', "not UTF-8"),
    ],
)
def test_load_config_bad_file(tmp_path: Path, content: bytes, reason: str) -> None:
    """An unparsable file is a ConfigFileError naming the file and why."""
    path = tmp_path / "c.toml"
    path.write_bytes(content)
    with pytest.raises(ConfigFileError) as caught:
        load_config(path, env=NO_ENV)
    assert str(caught.value).startswith(f"{path}: {reason}")
    assert isinstance(caught.value, ConfigError)


def test_load_config_missing_file(tmp_path: Path) -> None:
    """A missing file is a ConfigFileError saying it cannot be read."""
    path = tmp_path / "absent.toml"
    with pytest.raises(ConfigFileError, match="cannot read"):
        load_config(path, env=NO_ENV)


def test_example_is_valid_toml_without_the_parser() -> None:
    """The example is plain TOML whose tables are exactly the known sections."""
    with EXAMPLE.open("rb") as file:
        data = tomllib.load(file)
    assert sorted(data) == sorted(DEFAULTS)


def test_upstox_needs_a_token_and_no_feed_url() -> None:
    """With the upstox protocol feed.url may be empty, but a token file is required."""
    data: dict[str, object] = {"feed": {"protocol": "upstox"}}
    (problem,) = problems(data)
    assert problem.key == "upstox.token_file" and "Upstox access token" in problem.expected
    data["upstox"] = {"token_file": "/etc/credstore/t", "product": "D"}
    config = parse_config(data, env=NO_ENV)
    assert config.feed.url == "" and config.upstox.product == "D"
    assert [p.key for p in problems({"feed": {"url": "ws://x"}, "upstox": {"product": "X"}})] == [
        "upstox.product"
    ]


def test_upstox_token_defaults_to_the_broker_credential(tmp_path: Path) -> None:
    """$CREDENTIALS_DIRECTORY/broker-token is the default Upstox token file when it exists."""
    (tmp_path / "broker-token").write_text("secret")
    config = parse_config(
        {"feed": {"url": "ws://x"}, "broker": {"kind": "upstox"}},
        env={"CREDENTIALS_DIRECTORY": str(tmp_path)},
    )
    assert config.upstox.token_file == str(tmp_path / "broker-token")
