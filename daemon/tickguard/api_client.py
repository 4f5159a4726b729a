"""`tickguard status` and `tickguard close`: the API for a person at a terminal."""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from tickguard.config import (
    CREDENTIALS_DIRECTORY_ENV,
    TOKEN_CREDENTIAL,
    config_path,
    load_config,
    read_secret,
)
from tickguard.errors import ConfigError

DEFAULT_URL = "http://127.0.0.1:8000"
TIMEOUT = 30.0  # an emergency close waits for the broker

HEALTHY, DEGRADED, UNREACHABLE = 0, 1, 2
CLOSED, REFUSED = 0, 1


def _config_or_none(path: str | None) -> Any:
    try:
        return load_config(config_path(path))
    except ConfigError:
        return None


def api_url(explicit: str | None, config_file: str | None = None) -> str:
    """--url, else the config's http.listen, else http://127.0.0.1:8000."""
    if explicit:
        return explicit.rstrip("/")
    config = _config_or_none(config_file)
    if config is None:
        return DEFAULT_URL
    host = config.http.host
    host = "127.0.0.1" if host in ("0.0.0.0", "") else host
    host = f"[{host}]" if ":" in host else host
    return f"http://{host}:{config.http.port}"


def read_token(explicit: str | None, config_file: str | None = None) -> str | None:
    candidates: list[str] = []
    if explicit:
        candidates.append(explicit)
    else:
        config = _config_or_none(config_file)
        if config is not None and config.http.token_file:
            candidates.append(config.http.token_file)
        creds = os.environ.get(CREDENTIALS_DIRECTORY_ENV)
        if creds:
            candidates.append(str(Path(creds) / TOKEN_CREDENTIAL))
    for candidate in candidates:
        try:
            token = read_secret(candidate, "--token-file")
        except ConfigError:
            continue
        if token:
            return token
    return None


def request(
    method: str, url: str, body: object | None = None, token: str | None = None
) -> tuple[int, Any]:
    """(HTTP status, decoded JSON body); OSError when unreachable."""
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method)
    req.add_header("Accept", "application/json")
    if data is not None:
        req.add_header("Content-Type", "application/json")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=TIMEOUT) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as exc:
        try:
            payload = json.loads(exc.read() or b"null")
        except ValueError:
            payload = None
        return exc.code, payload


def status(url: str) -> int:
    try:
        code, health = request("GET", f"{url}/api/v1/monitoring/connection-health")
    except (OSError, ValueError) as exc:
        print(f"tickguard at {url} is unreachable: {getattr(exc, 'reason', exc)}")
        return UNREACHABLE
    if code != 200 or not isinstance(health, dict):
        print(f"tickguard at {url} answered HTTP {code}")
        return UNREACHABLE
    print(render_health(health))
    return DEGRADED if health.get("status") != "healthy" else HEALTHY


def render_health(h: dict[str, Any]) -> str:
    ws, fb, pos = h["websocket"], h.get("fallback", {}), h.get("positions", {})
    lines = [f"tickguard: {h.get('status', '?').upper()}  ({h['timestamp']})"]
    state = "connected" if ws["connected"] else ws.get("state", "down")
    lines.append(
        f"  feed      {state}; {ws['subscribed_symbols']} symbols; {ws['reconnect_attempts']} reconnects,"
        f" {ws['network_errors']} network errors; streak {ws.get('current_streak', 0)}"
    )
    if ws.get("last_error"):
        lines.append(f"            last error: {ws['last_error']}")
    if fb:
        lines.append(f"  fallback  {_fallback_text(fb)}")
    market = h.get("market", {})
    if market:
        lines.append(
            f"  market    {'open' if market.get('open') else 'closed'} ({market.get('timezone')})"
        )
    if pos.get("held_until_open"):
        held = ", ".join(pos["held_until_open"])
        lines.append(f"            crossed, held until the open (no order while closed): {held}")
    lines.append(
        f"  positions {pos.get('open', 0)} open, {pos.get('exiting', 0)} exiting;"
        f" stale: {', '.join(pos.get('stale_symbols', [])) or 'none'}"
    )
    unguarded = h.get("account", {}).get("unguarded", [])
    if unguarded:
        listed = ", ".join(f"{u['symbol']} {u['quantity']:g}" for u in unguarded)
        lines.append(f"            UNGUARDED at the broker: {listed}")
    if pos.get("held_back"):
        lines.append(
            f"            NOT ARMED (the state store was lost): {', '.join(pos['held_back'])}"
        )
    ha = h.get("ha")
    if ha:  # docs/ha.md
        leader = "this instance" if ha.get("role") == "leader" else ha.get("leader") or "unknown"
        lines.append(
            f"  ha        {ha.get('role')} ({ha.get('instance')}); leader: {leader},"
            f" epoch {ha.get('epoch')}"
        )
    net = h.get("safety_net", {})
    if net.get("enabled"):  # docs/safety-net.md
        lines.append(
            f"  safety net {net.get('positions', 0)} of {net.get('guarded', 0)} positions covered"
            f" by a broker-held stop ({net.get('margin_pct', 0):g}% beyond tickguard's)"
        )
        for stop in net.get("stops", []):
            if stop.get("state") != "active":
                lines.append(f"            {stop['symbol']}: broker-held stop {stop['state']}")
        if net.get("last_error"):
            lines.append(f"            last error: {net['last_error']}")
    entries = h["price_cache"]["cache_entries"]
    for symbol, e in sorted(entries.items()):
        age = e["age_seconds"]
        age_text = "no price" if age is None else f"{age:.1f}s"
        price = "-" if e["price"] is None else f"{e['price']:.2f}"
        flag = " STALE" if e["is_stale"] else ""
        lines.append(f"    {symbol:<12} {price:>12}  {e.get('source', ''):<5} {age_text}{flag}")
    return "\n".join(lines)


def _fallback_text(fb: dict[str, Any]) -> str:
    if not fb.get("active"):
        return "off"
    if not fb.get("configured"):
        return "ACTIVE: prices from the cache (no REST poll configured)"
    if fb.get("last_error"):
        return f"ACTIVE: prices from the cache (the REST poll fails: {fb['last_error']})"
    if fb.get("polling"):
        return "ACTIVE: prices from the REST poll"
    return "ACTIVE: prices from the cache (the REST poll is idle)"


def close(url: str, symbol: str, reason: str, token: str | None) -> int:
    try:
        code, body = request(
            "POST",
            f"{url}/api/v1/monitoring/emergency-close-position",
            {"symbol": symbol, "reason": reason},
            token,
        )
    except (OSError, ValueError) as exc:
        print(f"tickguard at {url} is unreachable: {getattr(exc, 'reason', exc)}")
        return UNREACHABLE
    if code == 200 and isinstance(body, dict):
        print(
            f"{body['symbol']} closed at {body['exit_price']:.2f} (entry {body['entry_price']:.2f}),"
            f" pnl {body['pnl']:.2f} ({body['reason']})"
        )
        return CLOSED
    message = body.get("message") if isinstance(body, dict) else None
    print(f"close {symbol} refused: HTTP {code}: {message or body}")
    return REFUSED
