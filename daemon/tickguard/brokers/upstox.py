"""The Upstox broker: exit orders over Upstox's REST order APIs.

An exit is one MARKET order, `POST {hft}/v3/order/place`, carrying our client
order id as its `tag`; that tag is how the order is found again when a reply
was lost (`GET /v2/order/history?tag=`). After an accepted place, the order's
details are polled for up to `fill_wait` seconds; an order still open then is
reported WORKING and the executor keeps looking it up by tag.

Outcomes are mapped by what the caller must do:
- HTTP 400/401/403/404 (and any other 4xx but 429) on place: the request was
  refused, no order exists -> BrokerRejected.
- 429 (UDAPI10005, no Retry-After), 5xx, network errors, timeouts, a 2xx
  without an order id: the order may exist -> BrokerUnavailable.
- Once the broker gave an order id, a failing detail poll never raises: the
  order exists, so it is reported WORKING and found again by tag.
- A lookup (`find_order`) never raises BrokerRejected: failing to see an order
  says nothing about whether it exists, so every failure other than "no such
  order" is BrokerUnavailable.

The access token is sent only in the Authorization header; it is never logged
and is scrubbed from any broker text we repeat.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import Any

import aiohttp

from tickguard.brokers.base import ExitOrder, OrderReport, OrderStatus
from tickguard.core import untrusted
from tickguard.errors import BrokerRejected, BrokerUnavailable
from tickguard.replies import BadReply, read_json

log = logging.getLogger(__name__)

DEFAULT_API_URL = "https://api.upstox.com"
DEFAULT_HFT_URL = "https://api-hft.upstox.com"  # order place/modify/cancel
DEFAULT_PRODUCT = "I"  # intraday
DEFAULT_FILL_WAIT = 5.0  # seconds place_exit waits for an accepted order to complete
DETAILS_POLL_INTERVAL = 0.2  # seconds between order detail polls while waiting for the fill
REQUEST_TIMEOUT = 5.0  # seconds for one HTTP exchange with Upstox

FILLED_STATUSES = frozenset({"complete"})
REJECTED_STATUSES = frozenset({"rejected", "cancelled"})
_NOT_FOUND_HINTS = ("not found", "no order", "does not exist", "invalid order id")
_DETAIL_MAX = 300  # characters of broker text kept in a detail


class UpstoxBroker:
    """Places exit orders at Upstox and finds them again by tag (our client order id).

    The session belongs to the caller, who closes it; `close()` leaves it open.
    """

    name = "upstox"

    def __init__(
        self,
        session: aiohttp.ClientSession,
        *,
        token: str,
        api_url: str = DEFAULT_API_URL,
        hft_url: str = DEFAULT_HFT_URL,
        product: str = DEFAULT_PRODUCT,
        fill_wait: float = DEFAULT_FILL_WAIT,
        poll_interval: float = DETAILS_POLL_INTERVAL,
    ) -> None:
        self._session = session
        self._token = token
        self._api_url = api_url.rstrip("/")
        self._hft_url = hft_url.rstrip("/")
        self.product = product
        self.fill_wait = fill_wait
        self.poll_interval = poll_interval
        self._timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT)

    # -- the Broker protocol ---------------------------------------------

    async def place_exit(self, order: ExitOrder) -> OrderReport:
        cid = order.client_order_id
        body = self.place_body(order)
        log.info(
            "upstox: placing exit %s: %s %d %s",
            cid,
            body["transaction_type"],
            body["quantity"],
            order.symbol,
        )
        status, payload = await self._request(cid, "POST", f"{self._hft_url}/v3/order/place", body)
        if status in (200, 201, 202):
            order_id = _placed_order_id(payload)
            if order_id is None:
                raise self._unavailable(cid, f"HTTP {status} without an order id: {payload!r}")
        else:
            raise self._failure(cid, status, payload, refused=True)
        log.info("upstox: exit %s accepted as order %s", cid, order_id)
        return await self._wait_for_fill(cid, order_id)

    async def find_order(self, client_order_id: str) -> OrderReport | None:
        cid = client_order_id
        status, payload = await self._request(
            cid, "GET", f"{self._api_url}/v2/order/history", params={"tag": cid}
        )
        if status != 200:
            if status in (400, 404) and _says_not_found(payload):
                log.info("upstox: no order tagged %s (%s)", cid, _errors_text(payload))
                return None
            raise self._failure(cid, status, payload, refused=False)
        if not isinstance(payload, Mapping) or "data" not in payload:
            # A lookup we cannot read is no proof the order is absent: never resend on it.
            raise self._unavailable(cid, f"order history: unreadable answer {payload!r:.200}")
        try:
            orders = _current_orders(payload["data"], cid)
        except ValueError as exc:
            raise self._unavailable(cid, f"order history: {exc}") from None
        if not orders:
            log.info("upstox: no order tagged %s", cid)
            return None
        reports = [self._report(cid, entry) for entry in orders]
        if len(reports) > 1:
            log.error(
                "upstox: %d orders carry tag %s: %s",
                len(reports),
                cid,
                ", ".join(f"{r.broker_order_id}={r.status.value}" for r in reports),
            )
        report = _most_final(reports)
        log.info(
            "upstox: order tagged %s is %s (order %s)",
            cid,
            report.status.value,
            report.broker_order_id,
        )
        return report

    async def close(self) -> None:
        return None

    # -- requests --------------------------------------------------------

    def place_body(self, order: ExitOrder) -> dict[str, Any]:
        """The documented v3 place body for a MARKET exit; refuses fractional quantities."""
        quantity = order.quantity
        if not float(quantity).is_integer() or quantity <= 0:
            raise BrokerRejected(
                order.client_order_id,
                f"upstox: quantity {quantity!r} is not a positive whole number of shares",
            )
        return {
            "quantity": int(quantity),
            "product": self.product,
            "validity": "DAY",
            "price": 0,
            "tag": order.client_order_id,
            "instrument_token": order.symbol,
            "order_type": "MARKET",
            "transaction_type": order.transaction,
            "disclosed_quantity": 0,
            "trigger_price": 0,
            "is_amo": False,
            "slice": False,
        }

    async def _request(
        self,
        cid: str,
        method: str,
        url: str,
        body: Mapping[str, Any] | None = None,
        params: Mapping[str, str] | None = None,
    ) -> tuple[int, Any]:
        """One exchange: (HTTP status, decoded JSON or None). Transport trouble is Unavailable."""
        headers = {
            "Authorization": f"Bearer {self._token}",
            "Accept": "application/json",
            "Content-Type": "application/json",
        }
        try:
            async with self._session.request(
                method, url, json=body, params=params, headers=headers, timeout=self._timeout
            ) as response:
                status = response.status
                payload: Any = await read_json(response)
        except TimeoutError as exc:
            raise self._unavailable(cid, f"{method} {_path(url)}: no answer in time") from exc
        except (aiohttp.ClientError, OSError) as exc:
            detail = str(exc) or exc.__class__.__name__
            raise self._unavailable(cid, f"{method} {_path(url)}: {detail}") from exc
        except BadReply as exc:
            payload = None
            if 200 <= status < 300:
                raise self._unavailable(
                    cid, f"{method} {_path(url)}: HTTP {status} with {exc}"
                ) from None
        return status, payload

    async def _wait_for_fill(self, cid: str, order_id: str) -> OrderReport:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.fill_wait
        last = OrderReport(cid, order_id, OrderStatus.WORKING, detail="accepted")
        while True:
            try:
                status, payload = await self._request(
                    cid,
                    "GET",
                    f"{self._api_url}/v2/order/details",
                    params={"order_id": order_id},
                )
            except BrokerUnavailable as exc:
                last = OrderReport(cid, order_id, OrderStatus.WORKING, detail=exc.detail)
                log.warning("upstox: exit %s (order %s): %s", cid, order_id, exc.detail)
            else:
                data = payload.get("data") if isinstance(payload, Mapping) else None
                if isinstance(data, list):
                    data = data[-1] if data else None
                if status == 200 and isinstance(data, Mapping):
                    last = self._report(cid, data, order_id)
                    if last.status is not OrderStatus.WORKING:
                        self._log_final(last)
                        return last
                else:
                    detail = self._scrub(f"order details: HTTP {status} {_errors_text(payload)}")
                    last = OrderReport(cid, order_id, OrderStatus.WORKING, detail=detail)
                    log.warning("upstox: exit %s (order %s): %s", cid, order_id, detail)
            remaining = deadline - loop.time()
            if remaining <= 0:
                log.warning(
                    "upstox: exit %s (order %s) not filled after %gs (%s): still working",
                    cid,
                    order_id,
                    self.fill_wait,
                    last.detail,
                )
                return last
            await asyncio.sleep(min(self.poll_interval, remaining))

    # -- answers ---------------------------------------------------------

    def _report(self, cid: str, entry: Mapping[str, Any], order_id: str = "") -> OrderReport:
        """One order's state from its details (or newest history entry)."""
        broker_id = str(entry.get("order_id") or order_id)
        status = str(entry.get("status") or "").strip().lower()
        message = self._scrub(str(entry.get("status_message") or "")[:_DETAIL_MAX])
        if status in FILLED_STATUSES:
            price = _positive_float(entry.get("average_price"))
            if price is None:
                # Market fills carry an average price; without one, ask again later.
                return OrderReport(
                    cid, broker_id, OrderStatus.WORKING, detail="complete, no average_price yet"
                )
            return OrderReport(cid, broker_id, OrderStatus.FILLED, price, detail=status)
        if status in REJECTED_STATUSES:
            detail = f"upstox: order {broker_id} {status}" + (f": {message}" if message else "")
            return OrderReport(cid, broker_id, OrderStatus.REJECTED, detail=detail)
        return OrderReport(cid, broker_id, OrderStatus.WORKING, detail=status or "no status")

    def _log_final(self, report: OrderReport) -> None:
        if report.status is OrderStatus.FILLED:
            log.info(
                "upstox: exit %s filled at %s (order %s)",
                report.client_order_id,
                report.fill_price,
                report.broker_order_id,
            )
        else:
            log.error("upstox: exit %s refused: %s", report.client_order_id, report.detail)

    def _failure(
        self, cid: str, status: int, payload: Any, *, refused: bool
    ) -> BrokerRejected | BrokerUnavailable:
        """The error for a non-success HTTP answer; `refused` when a 4xx means no order exists."""
        detail = f"HTTP {status} {_errors_text(payload)}".rstrip()
        if refused and 400 <= status < 500 and status != 429:
            detail = self._scrub(f"upstox: refused: {detail}")
            log.error("upstox: exit %s %s", cid, detail)
            return BrokerRejected(cid, detail)
        if status == 429:
            detail = f"{detail} (rate limited)"
        return self._unavailable(cid, detail)

    def _unavailable(self, cid: str, detail: str) -> BrokerUnavailable:
        detail = self._scrub(f"upstox: {detail}")
        log.warning("upstox: order %s: %s", cid, detail)
        return BrokerUnavailable(cid, detail)

    def _scrub(self, text: str) -> str:
        return text.replace(self._token, "<token>") if self._token else text


# -- parsing (tolerant: the shapes below are as documented, extra fields ignored) --


def _placed_order_id(payload: Any) -> str | None:
    """The order id of a successful place (v3 `order_ids`, or v2 `order_id`)."""
    if not isinstance(payload, Mapping) or payload.get("status", "success") != "success":
        return None
    data = payload.get("data")
    if not isinstance(data, Mapping):
        return None
    ids = data.get("order_ids")
    if isinstance(ids, list) and ids and ids[0]:
        return str(ids[0])
    single = data.get("order_id")
    return str(single) if single else None


def _current_orders(data: Any, tag: str) -> list[Mapping[str, Any]]:
    """The newest entry of each order in a history answer (entries come oldest first)."""
    if data is None:
        return []
    entries = data if isinstance(data, list) else [data]
    newest: dict[str, Mapping[str, Any]] = {}
    for entry in entries:
        if not isinstance(entry, Mapping):
            raise ValueError(f"history entry is not an object: {entry!r:.100}")
        entry_tag = entry.get("tag")
        if entry_tag not in (None, "", tag):
            continue  # another order's entry: never settle an exit on it
        key = str(entry.get("order_id") or "")
        newest.pop(key, None)
        newest[key] = entry
    return list(newest.values())


def _most_final(reports: list[OrderReport]) -> OrderReport:
    """One report for a tag: a fill wins, then a working order, then a refusal."""
    for status in (OrderStatus.FILLED, OrderStatus.WORKING):
        for report in reports:
            if report.status is status:
                return report
    return reports[-1]


def _errors(payload: Any) -> list[Mapping[str, Any]]:
    if not isinstance(payload, Mapping):
        return []
    errors = payload.get("errors")
    return [e for e in errors if isinstance(e, Mapping)] if isinstance(errors, list) else []


def _errors_text(payload: Any) -> str:
    """`UDAPI…: message` for each error in an Upstox error body."""
    parts = [
        f"{e.get('errorCode') or e.get('error_code') or '?'}: {e.get('message') or ''}".strip()
        for e in _errors(payload)
    ]
    return "; ".join(parts)[:_DETAIL_MAX]


def _says_not_found(payload: Any) -> bool:
    text = _errors_text(payload).lower()
    return any(hint in text for hint in _NOT_FOUND_HINTS)


def _positive_float(value: Any) -> float | None:
    """A price as Upstox sends it (a JSON number, sometimes a numeric string), else None."""
    if isinstance(value, str) and len(value) <= 32:
        try:
            value = float(value)
        except ValueError:
            return None
    return untrusted.amount(value)


def _path(url: str) -> str:
    return url.split("://", 1)[-1].split("?", 1)[0]
