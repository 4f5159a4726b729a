"""The HTTP API (docs/api.md): health, emergency close, positions, exits, metrics.

Handlers hold a `Port` (tickguard.port) and nothing else of the daemon: reads
come from its snapshots, changes are its actions, run on the guard loop. They
run on the API's own thread (tickguard.http_server), so no request, however
many, takes the guard loop's time beyond what the port bounds.

JSON in and out. Mutating routes need `Authorization: Bearer <token>`,
compared in constant time as bytes (a header that is not UTF-8 is just a wrong
token); with no token configured they answer 503. Every error has the documented
shape `{"status": "error", "error": code, "message": ...}`: a body that cannot
be read or parsed (bad JSON, nested too deep, a bad Content-Encoding) is a 400,
one that does not arrive in time a 408, a state store that fails a 503
(`store_unavailable`; its path stays in the log), more actions than the port
takes at once a 503 `overloaded` with Retry-After. Every JSON answer goes through
`dumps`: strict JSON (RFC 8259), a non-finite number becomes null. Every
mutating call is written to the audit log.

Lines a client can cause are rate-limited (`log_limit.LogRateLimit`) and quote
nothing from the request beyond a bounded `shown()` of the path.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import math
from collections.abc import Awaitable, Callable
from datetime import datetime, tzinfo
from functools import cache, lru_cache
from importlib import resources
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.aiohttp import make_aiohttp_handler

from tickguard.core.exits import ExitState
from tickguard.core.positions import (
    POSITION_FIELDS,
    SYMBOL_EXPECTED,
    ExitReason,
    Position,
    PositionSpec,
    PositionState,
    parse_spec,
    valid_symbol,
)
from tickguard.core.prices import Freshness, Quote
from tickguard.core.untrusted import amount, parse_json, shown
from tickguard.errors import BrokerRejected, PositionExists, StoreError
from tickguard.http_server import CONNECTIONS, DEFAULT_LIMITS, LIMITS
from tickguard.log_limit import LogRateLimit
from tickguard.port import Closing, NoPosition, NotPaper, Overloaded, Port, PositionExiting
from tickguard.status import Snapshot

log = logging.getLogger(__name__)
log.addFilter(LogRateLimit())  # every line here is caused by a request

PORT: web.AppKey[Port] = web.AppKey("port")
RETRY_AFTER = 1  # s, told to a client refused with 503 overloaded
MAX_BODY = 64 * 1024
CLOSE_REASONS = ("stop_loss", "take_profit", "emergency")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def dumps(data: object) -> str:
    """Strict JSON (no NaN or Infinity, which JSON has no words for): non-finite numbers are null."""
    try:
        return json.dumps(data, allow_nan=False)
    except ValueError:
        return json.dumps(_finite(data), allow_nan=False)


def _finite(value: object) -> object:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def json_response(
    data: object, *, status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    """`web.json_response` through `dumps`: every JSON answer of the API is made here."""
    return web.json_response(data, status=status, headers=headers, dumps=dumps)


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, **extra: object) -> None:
        super().__init__(status, code, message)
        self.status, self.code, self.message, self.extra = status, code, message, extra

    def __str__(self) -> str:
        return f"{self.status} {self.code}: {self.message}"

    def response(self) -> web.Response:
        body = {"status": "error", "error": self.code, "message": self.message, **self.extra}
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else None
        if self.code == "overloaded":
            headers = {"Retry-After": str(RETRY_AFTER)}
        response = json_response(body, status=self.status, headers=headers)
        if self.status == 408:
            response.force_close()  # the rest of the body may still come: not a next request
        return response


@web.middleware
async def errors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ApiError as exc:
        return exc.response()
    except PositionExists as exc:
        return ApiError(409, "conflict", str(exc), symbol=exc.symbol).response()
    except NoPosition as exc:
        return ApiError(404, "not_found", f"no open position for {exc.symbol}").response()
    except PositionExiting as exc:
        message = f"{exc.symbol} is exiting; it cannot be closed again or dropped"
        return ApiError(409, "conflict", message, symbol=exc.symbol, state="exiting").response()
    except NotPaper as exc:
        return ApiError(404, "not_found", str(exc)).response()
    except Overloaded as exc:
        return ApiError(503, "overloaded", str(exc)).response()
    except StoreError as exc:  # the message names the store's path: the log only
        log.error("API %s %s: state store failed: %s", request.method, shown(request.path), exc)
        return ApiError(
            503, "store_unavailable", "the state store is unavailable; see the daemon's log"
        ).response()
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = {404: "not_found", 405: "method_not_allowed", 413: "too_large"}.get(
            exc.status, "http_error"
        )
        response = ApiError(exc.status, code, exc.reason).response()
        if "Allow" in exc.headers:  # 405 must say what is allowed (RFC 9110)
            response.headers["Allow"] = exc.headers["Allow"]
        return response
    except Exception:
        log.exception("API %s %s failed", request.method, shown(request.path))
        return ApiError(500, "internal", "internal error; see the daemon's log").response()


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    if request.method in ("POST", "PUT", "PATCH", "DELETE") and request.path.startswith("/api/"):
        token = request.app[PORT].token
        if not token:
            raise ApiError(503, "no_token", "no API token is configured (http.token_file)")
        # aiohttp decodes header bytes that are not UTF-8 as surrogates: back to the same bytes.
        given = request.headers.get("Authorization", "").encode("utf-8", "surrogateescape")
        scheme, _, value = given.partition(b" ")
        if scheme.lower() != b"bearer" or not hmac.compare_digest(value.strip(), token.encode()):
            raise ApiError(401, "unauthorized", "missing or wrong bearer token")
        ha = request.app[PORT].latest().ha
        if ha is not None and ha.standby:  # docs/ha.md: only the leader acts
            leader = f"{ha.leader} leads" if ha.leader else "the leader is not known yet"
            raise ApiError(
                503,
                "standby",
                f"this instance is a standby ({ha.role}); {leader}",
                leader=ha.leader,
            )
    return await handler(request)


def build_app(port: Port, registry: CollectorRegistry) -> web.Application:
    app = web.Application(
        middlewares=[errors_middleware, auth_middleware], client_max_size=MAX_BODY
    )
    app[PORT] = port
    app.router.add_get("/metrics", _metrics(port, registry))

    r = app.router
    r.add_get("/api/v1/monitoring/connection-health", connection_health)
    r.add_post("/api/v1/monitoring/emergency-close-position", emergency_close_position)
    r.add_post("/api/v1/monitoring/emergency-close-all", emergency_close_all)
    r.add_get("/api/v1/positions", list_positions)
    r.add_post("/api/v1/positions", add_position)
    r.add_delete("/api/v1/positions/{symbol}", delete_position)
    r.add_get("/api/v1/exits", list_exits)
    r.add_get("/api/v1/account", account)
    r.add_post("/api/v1/paper/trades", paper_trade)
    r.add_get("/api/v1/openapi.json", openapi)
    r.add_get("/healthz", healthz)
    r.add_get("/readyz", readyz)
    return app


# -- monitoring ---------------------------------------------------------------


def _metrics(port: Port, registry: CollectorRegistry) -> Handler:
    """GET /metrics: client_python's own aiohttp handler (format negotiation, compression),
    rendered once for every scrape waiting, not once each.

    A scrape is answered with a rendering begun after it arrived; scrapes that
    arrive together wait for one snapshot (port.snapshot) and then share one
    rendering (the process collector alone reads five /proc files a time).
    """
    scrape = make_aiohttp_handler(registry)
    rendered: dict[tuple[str, ...], tuple[float, int, dict[str, str], bytes]] = {}

    async def metrics(request: web.Request) -> web.StreamResponse:
        arrived = port.now()
        await port.snapshot()  # fresh ages for the age collector, which reads port.latest()
        key = (request.headers.get("Accept", ""), request.query_string)
        cached = rendered.get(key)
        if cached is None or cached[0] < arrived:
            at = port.now()
            response = await scrape(request)
            assert isinstance(response, web.Response) and response.body is not None
            body = bytes(response.body)  # type: ignore[arg-type]
            rendered.clear()  # one variant kept: memory stays bounded whatever the keys
            rendered[key] = cached = (at, response.status, dict(response.headers), body)
        _, status, headers, body = cached
        response = web.Response(status=status, headers=headers, body=body)
        response.enable_compression()
        return response

    return metrics


async def connection_health(request: web.Request) -> web.Response:
    port = request.app[PORT]
    document = health(await port.snapshot(), port.now())
    connections = request.app.get(CONNECTIONS)
    if connections is not None:  # served by http_server.ApiServer
        document["http"] = connections.snapshot()
    return json_response(document)


def health(s: Snapshot, now: float) -> dict[str, Any]:
    """The connection-health document (docs/api.md) of snapshot `s`, ages at `now`."""
    feed, account = s.feed, s.account
    cache = {symbol: quote_json(s.quote(symbol, now)) for symbol in sorted(s.prices.symbols())}
    stale = s.stale_symbols(now)
    unusable = sorted(q.symbol for q in s.guarded_quotes(now) if not q.usable)
    degraded = (
        (not feed.connected)
        or feed.fallback_active
        or bool(stale)
        or bool(s.held_back)
        or bool(account.unguarded)
    )
    change = s.next_market_change
    return {
        "timestamp": datetime.now(s.tz).isoformat(timespec="seconds"),
        "status": "degraded" if degraded else "healthy",
        "websocket": {
            "connected": feed.connected,
            "state": feed.state,
            "subscribed_symbols": feed.subscribed,
            "reconnect_attempts": feed.reconnect_attempts,
            "network_errors": feed.network_errors,
            "current_streak": feed.streak,
            "last_error": feed.last_error,
            "address": feed.address,
            "last_frame_age_seconds": _age(now, feed.last_frame_at),
            "connected_for_seconds": _age(now, feed.connected_since),
        },
        "price_cache": {"cached_symbols": len(cache), "cache_entries": cache},
        "dns": {
            "primary_failed": s.dns.primary_failed,
            "last_stage": s.dns.last_stage,
            "resolved_via": s.dns.resolved_via,
            "last_error": s.dns.last_error,
        },
        "fallback": {
            "active": feed.fallback_active,
            "configured": s.poll is not None,
            "polling": s.poll.polling if s.poll else False,
            "last_success_age_seconds": _age(now, s.poll.last_success_at) if s.poll else None,
            "last_error": s.poll.last_error if s.poll else "",
        },
        "market": {
            "open": s.market_open,
            "timezone": str(s.tz),
            "next_change": change.astimezone(s.tz).isoformat(timespec="seconds")
            if change
            else None,
        },
        "positions": {
            "open": s.count(PositionState.OPEN),
            "exiting": s.count(PositionState.EXITING),
            "stale_symbols": stale,
            "unusable_symbols": unusable,
            "blind_symbols": sorted(s.guard.blind),
            "held_back": list(s.held_back),  # config positions not armed: the store was lost
            "held_until_open": list(s.guard.held_for_open),  # crossed while the market is closed
        },
        "account": {  # docs/account.md: the broker's positions as last reconciled
            "reconciled_at": _iso(account.reconciled_at, s),
            "last_error": account.last_error,
            "unguarded": [{"symbol": h.symbol, "quantity": h.quantity} for h in account.unguarded],
        },
        "exits": {
            "in_flight": len(s.exits.in_flight),
            "retrying": s.exits.retrying,
        },
        "safety_net": _safety_net(s),
        "ha": _ha(s),
    }


def _ha(s: Snapshot) -> dict[str, Any] | None:
    """docs/ha.md: null for a lone instance (SQLite); else who leads, as this one sees it."""
    if s.ha is None:
        return None
    return {
        "role": s.ha.role,
        "instance": s.ha.me,
        "leader": s.ha.leader,
        "epoch": s.ha.epoch,
        "changes": s.ha.changes,
    }


def _safety_net(s: Snapshot) -> dict[str, Any]:
    """docs/safety-net.md: the broker-held stops, and how many guarded positions they cover."""
    net = s.safety_net
    if net is None:
        return {"enabled": False}
    return {
        "enabled": True,
        "margin_pct": net.margin_pct,
        "positions": net.covered,
        "guarded": len(s.guard.positions),
        "failures": net.failures,
        "last_error": net.last_error,
        "stops": [
            {
                "symbol": n.symbol,
                "stop_id": n.stop_id,
                "trigger": n.trigger,
                "quantity": n.quantity,
                "state": n.state,
            }
            for n in net.stops
        ],
    }


def quote_json(q: Quote) -> dict[str, Any]:
    return {
        "price": q.price.value if q.price else None,
        "age_seconds": _round(q.age),
        "is_stale": q.freshness is not Freshness.FRESH,  # stale or unusable
        "freshness": q.freshness.value,
        "source": q.source.value,
        "exchange_ts": q.price.exchange_ts if q.price else None,
    }


def _age(now: float, then: float | None) -> float | None:
    return None if then is None else _round(max(0.0, now - then))


def _round(value: float) -> float | None:
    return round(value, 3) if math.isfinite(value) else None


def _iso(wall: float | None, s: Snapshot) -> str | None:
    return None if wall is None else _iso_in(wall, s.tz)


@lru_cache(maxsize=256)  # one reconciliation time shown on every position of a list
def _iso_in(wall: float, tz: tzinfo) -> str:
    return datetime.fromtimestamp(wall, tz).isoformat(timespec="milliseconds")


async def healthz(request: web.Request) -> web.Response:
    port = request.app[PORT]
    s = await port.snapshot()
    limit = max(5.0, 5 * s.sweep_interval)
    if s.last_sweep_at is None or port.now() - s.last_sweep_at > limit:
        raise ApiError(503, "guard_stalled", f"the guard loop made no progress for over {limit:g}s")
    return json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    port = request.app[PORT]
    s = await port.snapshot()
    if s.ha is not None and s.ha.standby:  # docs/ha.md: ready means guarding
        leader = f"{s.ha.leader} leads" if s.ha.leader else "no leader known"
        return json_response(
            {"status": "standby", "reasons": ["standby", leader], "leader": s.ha.leader},
            status=503,
        )
    reasons = []
    for q in s.guarded_quotes(port.now()):
        if not q.usable:
            age = "no price yet" if q.price is None else f"price {q.age:.0f}s old"
            reasons.append(f"{q.symbol}: no usable price ({age})")
    if s.held_back:
        held = ", ".join(s.held_back)
        reasons.append(f"config positions not armed, the state store was lost: {held}")
    if reasons:
        raise ApiError(503, "not_ready", "; ".join(reasons), reasons=reasons)
    return json_response({"status": "ready"})


@cache
def _openapi() -> bytes:
    return resources.files("tickguard").joinpath("openapi.json").read_bytes()


async def openapi(request: web.Request) -> web.Response:
    return web.Response(body=_openapi(), content_type="application/json")


# -- closing ------------------------------------------------------------------


async def emergency_close_position(request: web.Request) -> web.Response:
    port = request.app[PORT]
    body = await _body(request)
    _only(body, ("symbol", "reason"))
    symbol = body.get("symbol")
    if not isinstance(symbol, str) or not symbol:
        raise ApiError(400, "bad_request", "symbol: expected a non-empty string")
    reason = _reason(body.get("reason", "emergency"))
    try:
        closing = await port.close(symbol, reason, request.remote)
    except NoPosition as exc:
        result, status = _not_closable(exc)
        return json_response(result, status=status)
    result, status = _close_result(closing)
    return json_response(result, status=status)


async def emergency_close_all(request: web.Request) -> web.Response:
    port = request.app[PORT]
    body = await _body(request, optional=True)
    _only(body, ("reason",))
    reason = _reason(body.get("reason", "emergency"))
    outcomes = [_close_result(c) for c in await port.close_all(reason, request.remote)]
    results = [result for result, _ in outcomes]
    ok = all(status == 200 for _, status in outcomes)
    return json_response({"status": "success" if ok else "partial", "results": results})


def _not_closable(exc: NoPosition) -> tuple[dict[str, Any], int]:
    """A close of a symbol not guarded: never seen (404), or already closed (409)."""
    symbol = exc.symbol
    if exc.state is None:
        return _error(404, "not_found", f"no position for {symbol}", symbol=symbol)
    state = exc.state.value
    return _error(409, "conflict", f"{symbol} is already {state}", symbol=symbol, state=state)


def _close_result(closing: Closing) -> tuple[dict[str, Any], int]:
    position, exit = closing.position, closing.exit
    symbol = position.symbol
    if exit.state is ExitState.FILLED and exit.fill_price is not None:
        return {
            "status": "success",
            "symbol": symbol,
            "entry_price": position.spec.entry_price,
            "exit_price": exit.fill_price,
            "pnl": position.pnl(exit.fill_price),
            "reason": exit.reason.value,
            "client_order_id": exit.client_order_id,
        }, 200
    if exit.state is ExitState.CANCELLED:
        return _error(
            409,
            "not_held",
            f"the account holds no {position.side.value} {symbol}: nothing was sent",
            symbol=symbol,
            client_order_id=exit.client_order_id,
            state=exit.state.value,
        )
    if exit.state is ExitState.REJECTED:
        return _error(
            502,
            "broker_rejected",
            f"the broker refused the exit of {symbol}: {exit.detail}; the position stays open and guarded",
            symbol=symbol,
            client_order_id=exit.client_order_id,
        )
    # Unknown outcome: the order may exist. It is never sent twice: the exit
    # keeps its client order id and is looked up before any resend.
    return _error(
        502,
        "broker_unavailable",
        f"the broker did not confirm the exit of {symbol} ({exit.detail or 'no answer yet'});"
        " it stays guarded and the exit is retried with the same client order id",
        symbol=symbol,
        client_order_id=exit.client_order_id,
        state=exit.state.value,
    )


def _error(status: int, code: str, message: str, **extra: object) -> tuple[dict[str, Any], int]:
    return {"status": "error", "error": code, "message": message, **extra}, status


def _reason(value: object) -> ExitReason:
    if value not in CLOSE_REASONS:
        raise ApiError(
            400,
            "bad_request",
            f"reason: {value!r} is invalid; expected one of {', '.join(CLOSE_REASONS)}",
        )
    return ExitReason(value)


# -- positions and exits ------------------------------------------------------


async def list_positions(request: web.Request) -> web.Response:
    port = request.app[PORT]
    state = request.query.get("state", "active")
    if state not in ("active", "all"):
        raise ApiError(400, "bad_request", f"state: {state!r} is invalid; expected all")
    s = await port.snapshot()
    if state == "all":
        rows = await port.positions()
    elif s.ha is not None and s.ha.standby:  # guarding nothing: the shared store's (docs/ha.md)
        rows = [p for p in await port.positions() if p.state is not PositionState.CLOSED]
    else:
        rows = sorted(s.guard.positions.values(), key=lambda p: p.id)
    now = port.now()
    return json_response({"positions": [position_json(p, s, now) for p in rows]})


def position_json(p: Position, s: Snapshot, now: float) -> dict[str, Any]:
    spec = p.spec
    data: dict[str, Any] = {"id": p.id, **{f: getattr(spec, f) for f in POSITION_FIELDS}}
    data["side"] = spec.side.value
    data["state"] = p.state.value
    data["trailing_level"] = p.trailing_level()
    data["exit_id"] = p.exit_id
    data["origin"] = p.origin
    holdings = s.account.holdings
    data["broker_quantity"] = None  # signed; null while the account is unknown
    data["reconciled_at"] = None
    if holdings is not None and p.state is not PositionState.CLOSED:
        holding = holdings.get(p.symbol)
        data["broker_quantity"] = holding.quantity if holding is not None else 0.0
        data["reconciled_at"] = _iso(s.account.reconciled_at, s)
    if p.state is not PositionState.CLOSED:
        q = s.quote(p.symbol, now)
        data["price"] = quote_json(q)
        data["unrealized_pnl"] = p.pnl(q.price.value) if q.price else None
        data["blind"] = p.symbol in s.guard.blind
    return data


async def add_position(request: web.Request) -> web.Response:
    port = request.app[PORT]
    spec = _spec(await _body(request))
    # PositionExists (already guarded, or a duplicate the store caught) is a 409;
    # any other StoreError a 503.
    position = await port.add(spec, request.remote)
    s = await port.snapshot()
    return json_response(position_json(position, s, port.now()), status=201)


def _spec(body: dict[str, Any]) -> PositionSpec:
    _only(body, POSITION_FIELDS)
    spec, problems = parse_spec(body)
    if spec is None:
        raise ApiError(400, "bad_request", "; ".join(str(p) for p in problems))
    return spec


async def delete_position(request: web.Request) -> web.Response:
    port = request.app[PORT]
    symbol = request.match_info["symbol"]
    removed = await port.remove(symbol, request.remote)
    return json_response(
        {"status": "success", "symbol": symbol, "id": removed.id, "state": "closed"}
    )


async def list_exits(request: web.Request) -> web.Response:
    """The exit journal, newest first: exits sent, and positions closed outside tickguard
    (reason `external`, no client order id: docs/account.md)."""
    port = request.app[PORT]
    journal = await port.journal()
    tz = port.latest().tz
    out: list[tuple[float, dict[str, Any]]] = []
    for c in journal.external:
        entry = {
            "symbol": c.symbol,
            "position_id": c.position_id,
            "reason": "external",
            "price_source": "none",
            "client_order_id": None,
            "state": "closed",
            "decided_at": datetime.fromtimestamp(c.at, tz).isoformat(timespec="milliseconds"),
            "quantity": c.quantity,
            "filled_quantity": None,
            "trigger_price": None,
            "exit_price": None,
            "pnl": None,
            "attempts": 0,
            "broker_order_id": None,
            "detail": c.detail,
        }
        out.append((c.at, entry))
    for record, live in journal.exits:
        e = record.exit
        entry = {
            "symbol": e.symbol,
            "position_id": e.position_id,
            "reason": e.reason.value,
            "price_source": e.price_source.value,
            "client_order_id": e.client_order_id,
            "state": live.state.value,
            "decided_at": datetime.fromtimestamp(e.decided_at, tz).isoformat(
                timespec="milliseconds"
            ),
            "trigger_price": e.trigger_price,
            "exit_price": live.fill_price,
            "pnl": record.pnl,
            "attempts": live.attempts,
            "broker_order_id": live.broker_order_id,
            "detail": live.detail,
            "quantity": live.quantity,
            "filled_quantity": live.filled_quantity,
        }
        out.append((e.decided_at, entry))
    out.sort(key=lambda item: item[0], reverse=True)
    return json_response({"exits": [entry for _, entry in out]})


# -- the account (docs/account.md) ----------------------------------------------------------


async def account(request: web.Request) -> web.Response:
    s = await request.app[PORT].snapshot()
    holdings = sorted((s.account.holdings or {}).values(), key=lambda h: h.symbol)
    return json_response(
        {
            "reconciled_at": _iso(s.account.reconciled_at, s),
            "last_error": s.account.last_error,
            "positions": [
                {
                    "symbol": h.symbol,
                    "quantity": h.quantity,
                    "average_price": h.average_price,
                    "guarded": h.symbol in s.guard.positions,
                }
                for h in holdings
            ],
        }
    )


PAPER_TRADE_FIELDS = ("symbol", "side", "quantity", "price")


async def paper_trade(request: web.Request) -> web.Response:
    """A trade made outside tickguard on the paper account (a bot, a person): docs/account.md."""
    port = request.app[PORT]
    body = await _body(request)
    _only(body, PAPER_TRADE_FIELDS)
    symbol, side = body.get("symbol"), body.get("side")
    quantity, price = amount(body.get("quantity")), body.get("price")
    problems = []
    if not isinstance(symbol, str) or not valid_symbol(symbol):
        problems.append(f"symbol: {shown(symbol)} is invalid; expected {SYMBOL_EXPECTED}")
    if side not in ("buy", "sell"):
        problems.append(f"side: {shown(side)} is invalid; expected 'buy' or 'sell'")
    if quantity is None:
        problems.append(
            f"quantity: {shown(body.get('quantity'))} is invalid; expected a number > 0"
        )
    if price is not None and amount(price) is None:
        problems.append(f"price: {shown(price)} is invalid; expected a price > 0, or none")
    if problems:
        raise ApiError(400, "bad_request", "; ".join(problems))
    assert isinstance(symbol, str) and isinstance(side, str) and quantity is not None
    try:
        after = await port.paper_trade(symbol, side, quantity, amount(price))
    except BrokerRejected as exc:
        raise ApiError(409, "no_price", f"{exc.detail}; give a price") from None
    position = {"symbol": symbol, "quantity": 0.0, "average_price": None}
    if after is not None:
        position = {
            "symbol": symbol,
            "quantity": after.quantity,
            "average_price": after.average_price,
        }
    return json_response(position, status=201)


# -- request helpers ----------------------------------------------------------


async def _body(request: web.Request, *, optional: bool = False) -> dict[str, Any]:
    """The JSON object in the body: 400 unreadable or not one, 408 not here in time, 413 too big."""
    timeout = request.app.get(LIMITS, DEFAULT_LIMITS).body_timeout
    try:
        async with asyncio.timeout(timeout):
            raw = await request.read()
    except TimeoutError:
        raise ApiError(408, "timeout", f"the body did not arrive within {timeout:g}s") from None
    except (web.RequestPayloadError, ConnectionError):  # a bad Content-Encoding, a cut body
        raise ApiError(400, "bad_body", "the body could not be read") from None
    if not raw.strip() and optional:
        return {}
    try:
        body = parse_json(raw)
    except ValueError:  # bad syntax or UTF-8, nested too deep, huge integers
        raise ApiError(400, "bad_json", "the body is not valid JSON") from None
    if not isinstance(body, dict):
        raise ApiError(400, "bad_request", "the body must be a JSON object")
    return body


def _only(body: dict[str, Any], allowed: tuple[str, ...]) -> None:
    unknown = sorted(set(body) - set(allowed))
    if unknown:
        raise ApiError(
            400,
            "bad_request",
            f"unknown field(s) {', '.join(unknown)}; expected {', '.join(allowed)}",
        )
