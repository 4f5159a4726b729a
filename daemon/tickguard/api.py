"""The HTTP API (SPEC section 4): health, emergency close, positions, exits, metrics.

JSON in and out. Mutating routes need `Authorization: Bearer <token>`,
compared in constant time as bytes (a header that is not UTF-8 is just a wrong
token); with no token configured they answer 503. Every error has the SPEC's
shape `{"status": "error", "error": code, "message": ...}`: a body that cannot
be read or parsed (bad JSON, nested too deep, a bad Content-Encoding) is a 400,
one that does not arrive in time a 408, a state store that fails a 503
(`store_unavailable`; its path stays in the log). Every JSON answer goes through
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
from datetime import UTC, datetime
from importlib import resources
from typing import TYPE_CHECKING, Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from tickguard.brokers.paper import PaperBroker
from tickguard.core.exits import Exit, ExitState
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
from tickguard.guard_loop import CloseOutcome
from tickguard.http_server import CONNECTIONS, DEFAULT_LIMITS, LIMITS
from tickguard.log_limit import LogRateLimit
from tickguard.metrics import NETWORK_ERROR_KINDS

if TYPE_CHECKING:
    from tickguard.app import Daemon

log = logging.getLogger(__name__)
log.addFilter(LogRateLimit())  # every line here is caused by a request

DAEMON: web.AppKey[Daemon] = web.AppKey("daemon")
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
        token = request.app[DAEMON].token
        if not token:
            raise ApiError(503, "no_token", "no API token is configured (http.token_file)")
        # aiohttp decodes header bytes that are not UTF-8 as surrogates: back to the same bytes.
        given = request.headers.get("Authorization", "").encode("utf-8", "surrogateescape")
        scheme, _, value = given.partition(b" ")
        if scheme.lower() != b"bearer" or not hmac.compare_digest(value.strip(), token.encode()):
            raise ApiError(401, "unauthorized", "missing or wrong bearer token")
    return await handler(request)


def build_app(daemon: Daemon) -> web.Application:
    app = web.Application(
        middlewares=[errors_middleware, auth_middleware], client_max_size=MAX_BODY
    )
    app[DAEMON] = daemon
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
    r.add_get("/metrics", metrics)
    r.add_get("/healthz", healthz)
    r.add_get("/readyz", readyz)
    return app


# -- monitoring ---------------------------------------------------------------


async def connection_health(request: web.Request) -> web.Response:
    document = health(request.app[DAEMON])
    connections = request.app.get(CONNECTIONS)
    if connections is not None:  # served by http_server.ApiServer
        document["http"] = connections.snapshot()
    return json_response(document)


def health(d: Daemon) -> dict[str, Any]:
    """The connection-health document (SPEC 4 and 4c, plus our sections)."""
    now = d.monotonic()
    sup, m = d.supervisor, d.metrics
    cache = {}
    for symbol in sorted(d.book.symbols()):
        q = d.guard.quote(symbol, now)
        cache[symbol] = quote_json(q)
    guarded = [d.guard.quote(s, now) for s in d.guard.symbols()]
    positions = d.guard.positions()
    stale = sorted(q.symbol for q in guarded if q.freshness is not Freshness.FRESH)
    unusable = sorted(q.symbol for q in guarded if not q.usable)
    network_errors = sum(
        m.registry.get_sample_value("tickguard_websocket_network_errors_total", {"kind": k}) or 0
        for k in NETWORK_ERROR_KINDS
    )
    held_back = d.guard_loop.held_back  # config positions not armed: the store was lost
    unguarded = d.reconciler.unguarded()  # broker positions nobody guards
    degraded = (
        (not sup.connected)
        or sup.fallback_active
        or bool(stale)
        or bool(held_back)
        or bool(unguarded)
    )
    market_now = datetime.now(UTC)
    next_change = d.market.next_change(market_now)
    return {
        "timestamp": market_now.astimezone(d.market.tz).isoformat(timespec="seconds"),
        "status": "degraded" if degraded else "healthy",
        "websocket": {
            "connected": sup.connected,
            "state": sup.state.value,
            "subscribed_symbols": len(sup.subscribed) if sup.connected else len(d.subscriptions()),
            "reconnect_attempts": int(
                m.registry.get_sample_value("tickguard_websocket_reconnect_attempts_total") or 0
            ),
            "network_errors": int(network_errors),
            "current_streak": sup.streak(),
            "last_error": sup.last_error,
            "address": sup.address,
            "last_frame_age_seconds": _age(now, sup.last_frame_at),
            "connected_for_seconds": _age(now, sup.connected_since),
        },
        "price_cache": {"cached_symbols": len(cache), "cache_entries": cache},
        "dns": {
            "primary_failed": d.resolver.primary_failed,
            "last_stage": d.resolver.last.stage if d.resolver.last else None,
            "resolved_via": d.resolver.last.via if d.resolver.last else None,
            "last_error": d.resolver.last_error,
        },
        "fallback": {
            "active": sup.fallback_active,
            "configured": d.poller is not None,
            "polling": d.poller.polling if d.poller else False,
            "last_success_age_seconds": _age(now, d.poller.last_success) if d.poller else None,
            "last_error": d.poller.last_error if d.poller else "",
        },
        "market": {
            "open": d.guard_loop.market_open,
            "timezone": d.config.market.timezone,
            "next_change": next_change.astimezone(d.market.tz).isoformat(timespec="seconds")
            if next_change
            else None,
        },
        "positions": {
            "open": sum(1 for p in positions if p.state is PositionState.OPEN),
            "exiting": sum(1 for p in positions if p.state is PositionState.EXITING),
            "stale_symbols": stale,
            "unusable_symbols": unusable,
            "blind_symbols": sorted(s for s in d.guard.symbols() if d.guard.is_blind(s)),
            "held_back": held_back,
            "held_until_open": d.guard.held_for_open(),  # crossed while the market is closed
        },
        "account": {  # SPEC 8: the broker's positions as last reconciled
            "reconciled_at": _iso(d.reconciler.view.reconciled_at, d)
            if d.reconciler.view is not None
            else None,
            "last_error": d.reconciler.last_error,
            "unguarded": [{"symbol": h.symbol, "quantity": h.quantity} for h in unguarded],
        },
        "exits": {
            "in_flight": len(d.guard.exits_in_flight()),
            "retrying": sum(1 for e in d.guard.exits_in_flight() if e.state is ExitState.RETRY),
        },
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


async def healthz(request: web.Request) -> web.Response:
    d = request.app[DAEMON]
    last = d.guard_loop.last_sweep_at
    limit = max(5.0, 5 * d.guard_loop.sweep_interval)
    if last is None or d.monotonic() - last > limit:
        raise ApiError(503, "guard_stalled", f"the guard loop made no progress for over {limit:g}s")
    return json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    d = request.app[DAEMON]
    now = d.monotonic()
    reasons = []
    for symbol in d.guard.symbols():
        q = d.guard.quote(symbol, now)
        if not q.usable:
            age = "no price yet" if q.price is None else f"price {q.age:.0f}s old"
            reasons.append(f"{symbol}: no usable price ({age})")
    if d.guard_loop.held_back:
        held = ", ".join(d.guard_loop.held_back)
        reasons.append(f"config positions not armed, the state store was lost: {held}")
    if reasons:
        raise ApiError(503, "not_ready", "; ".join(reasons), reasons=reasons)
    return json_response({"status": "ready"})


async def metrics(request: web.Request) -> web.Response:
    body = generate_latest(request.app[DAEMON].metrics.registry)
    response = web.Response(body=body)
    response.content_type = CONTENT_TYPE_LATEST.split(";")[0]
    response.charset = "utf-8"
    return response


async def openapi(request: web.Request) -> web.Response:
    text = resources.files("tickguard").joinpath("openapi.json").read_text()
    return web.Response(text=text, content_type="application/json")


# -- closing ------------------------------------------------------------------


async def emergency_close_position(request: web.Request) -> web.Response:
    d = request.app[DAEMON]
    body = await _body(request)
    _only(body, ("symbol", "reason"))
    symbol = body.get("symbol")
    if not isinstance(symbol, str) or not symbol:
        raise ApiError(400, "bad_request", "symbol: expected a non-empty string")
    reason = _reason(body.get("reason", "emergency"))
    d.guard_loop.audit(
        "emergency_close", {"symbol": symbol, "reason": reason.value, "remote": request.remote}
    )
    result, status = await close_one(d, symbol, reason)
    return json_response(result, status=status)


async def emergency_close_all(request: web.Request) -> web.Response:
    d = request.app[DAEMON]
    body = await _body(request, optional=True)
    _only(body, ("reason",))
    reason = _reason(body.get("reason", "emergency"))
    symbols = [p.symbol for p in d.guard.positions() if p.state is PositionState.OPEN]
    d.guard_loop.audit(
        "emergency_close_all",
        {"symbols": symbols, "reason": reason.value, "remote": request.remote},
    )
    outcomes = await asyncio.gather(*(close_one(d, s, reason) for s in symbols))
    results = [result for result, _ in outcomes]
    ok = all(status == 200 for _, status in outcomes)
    return json_response({"status": "success" if ok else "partial", "results": results})


async def close_one(d: Daemon, symbol: str, reason: ExitReason) -> tuple[dict[str, Any], int]:
    """Close `symbol` and wait for the broker's first answer: (body, HTTP status)."""
    position = d.guard.position(symbol)
    if position is None:
        latest = d.store.latest_position(symbol)
        if latest is None:
            return _error(404, "not_found", f"no position for {symbol}", symbol=symbol)
        return _error(
            409,
            "conflict",
            f"{symbol} is already {latest.state.value}",
            symbol=symbol,
            state=latest.state.value,
        )
    if position.state is PositionState.EXITING:
        return _error(
            409, "conflict", f"{symbol} is already exiting", symbol=symbol, state="exiting"
        )
    outcome: CloseOutcome = d.guard_loop.close(symbol, reason)
    try:
        async with asyncio.timeout(d.close_wait):
            exit = await d.executor.first_outcome(outcome.exit.client_order_id)
    except TimeoutError:
        exit = d.guard.exit(outcome.exit.client_order_id) or outcome.exit
    return _close_result(outcome.position, exit)


def _close_result(position: Position, exit: Exit) -> tuple[dict[str, Any], int]:
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
    d = request.app[DAEMON]
    state = request.query.get("state", "active")
    if state not in ("active", "all"):
        raise ApiError(400, "bad_request", f"state: {state!r} is invalid; expected all")
    now = d.monotonic()
    guarded = {p.id: p for p in d.guard.positions()}
    rows = d.store.positions(active_only=state != "all")
    out = [position_json(guarded.get(p.id, p), d, now) for p in rows]
    return json_response({"positions": out})


def position_json(p: Position, d: Daemon, now: float) -> dict[str, Any]:
    spec = p.spec
    data: dict[str, Any] = {"id": p.id, **{f: getattr(spec, f) for f in POSITION_FIELDS}}
    data["side"] = spec.side.value
    data["state"] = p.state.value
    data["trailing_level"] = p.trailing_level()
    data["exit_id"] = p.exit_id
    data["origin"] = p.origin
    view = d.reconciler.view
    data["broker_quantity"] = None  # signed; null while the account is unknown
    data["reconciled_at"] = None
    if view is not None and p.state is not PositionState.CLOSED:
        holding = view.holdings.get(p.symbol)
        data["broker_quantity"] = holding.quantity if holding is not None else 0.0
        data["reconciled_at"] = _iso(view.reconciled_at, d)
    if p.state is not PositionState.CLOSED:
        q = d.guard.quote(p.symbol, now)
        data["price"] = quote_json(q)
        data["unrealized_pnl"] = p.pnl(q.price.value) if q.price else None
        data["blind"] = d.guard.is_blind(p.symbol)
    return data


async def add_position(request: web.Request) -> web.Response:
    d = request.app[DAEMON]
    body = await _body(request)
    spec = _spec(body)
    if d.guard.position(spec.symbol) is not None:
        raise ApiError(409, "conflict", f"{spec.symbol} already has an open position")
    # PositionExists (a duplicate the store caught) is a 409; any other StoreError a 503.
    position = d.guard_loop.add(spec, source=f"api {request.remote}")
    await d.supervisor.subscribe_more()
    return json_response(position_json(position, d, d.monotonic()), status=201)


def _spec(body: dict[str, Any]) -> PositionSpec:
    _only(body, POSITION_FIELDS)
    spec, problems = parse_spec(body)
    if spec is None:
        raise ApiError(400, "bad_request", "; ".join(str(p) for p in problems))
    return spec


async def delete_position(request: web.Request) -> web.Response:
    d = request.app[DAEMON]
    symbol = request.match_info["symbol"]
    position = d.guard.position(symbol)
    if position is None:
        raise ApiError(404, "not_found", f"no open position for {symbol}")
    if position.state is PositionState.EXITING:
        raise ApiError(
            409, "conflict", f"{symbol} is exiting; it cannot be dropped", state="exiting"
        )
    removed = d.guard_loop.remove(symbol, source=f"api {request.remote}")
    return json_response(
        {"status": "success", "symbol": symbol, "id": removed.id, "state": "closed"}
    )


async def list_exits(request: web.Request) -> web.Response:
    """The exit journal, newest first: exits sent, and positions closed outside tickguard
    (reason `external`, no client order id: SPEC 8)."""
    d = request.app[DAEMON]
    tz = d.market.tz
    out: list[tuple[float, dict[str, Any]]] = []
    for row in d.store.external_closes():
        at = float(row["at"])  # type: ignore[arg-type]
        out.append(
            (
                at,
                {
                    "symbol": row["symbol"],
                    "position_id": row["position_id"],
                    "reason": "external",
                    "price_source": "none",
                    "client_order_id": None,
                    "state": "closed",
                    "decided_at": datetime.fromtimestamp(at, tz).isoformat(timespec="milliseconds"),
                    "quantity": row["quantity"],
                    "filled_quantity": None,
                    "trigger_price": None,
                    "exit_price": None,
                    "pnl": None,
                    "attempts": 0,
                    "broker_order_id": None,
                    "detail": row["detail"],
                },
            )
        )
    for record in d.store.exits():
        e = record.exit
        live = d.guard.exit(e.client_order_id) or e
        out.append(
            (
                e.decided_at,
                {
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
                },
            )
        )
    out.sort(key=lambda item: item[0], reverse=True)
    return json_response({"exits": [entry for _, entry in out]})


# -- the account (SPEC 8) ----------------------------------------------------------


def _iso(wall: float, d: Daemon) -> str:
    return datetime.fromtimestamp(wall, d.market.tz).isoformat(timespec="milliseconds")


async def account(request: web.Request) -> web.Response:
    d = request.app[DAEMON]
    view = d.reconciler.view
    guarded = set(d.guard.symbols())
    holdings = sorted(view.holdings.values(), key=lambda h: h.symbol) if view else []
    return json_response(
        {
            "reconciled_at": _iso(view.reconciled_at, d) if view else None,
            "last_error": d.reconciler.last_error,
            "positions": [
                {
                    "symbol": h.symbol,
                    "quantity": h.quantity,
                    "average_price": h.average_price,
                    "guarded": h.symbol in guarded,
                }
                for h in holdings
            ],
        }
    )


PAPER_TRADE_FIELDS = ("symbol", "side", "quantity", "price")


async def paper_trade(request: web.Request) -> web.Response:
    """A trade made outside tickguard on the paper account (a bot, a person): SPEC 8."""
    d = request.app[DAEMON]
    if not isinstance(d.broker, PaperBroker):
        raise ApiError(404, "not_found", "paper trades exist only with broker.kind = paper")
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
    d.guard_loop.audit("paper_trade", {k: body.get(k) for k in PAPER_TRADE_FIELDS})
    try:
        after = d.broker.trade(symbol, side, quantity, amount(price))
    except BrokerRejected as exc:
        raise ApiError(409, "no_price", f"{exc.detail}; give a price") from None
    d.reconciler.trigger()
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
