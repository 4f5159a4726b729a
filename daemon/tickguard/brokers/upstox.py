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

The account (docs/account.md): `positions()` reads `GET {api}/v2/portfolio/short-term-positions`
(one entry per instrument key and product, `quantity` net and signed) and
answers one `Holding` per instrument key, summed over the products that count.
Every counted entry is validated whole; one that is malformed fails the whole
call (BrokerUnavailable): dropping it would make a held position look flat,
and a flat look closes the guarded position as external. The read is made
right before every exit, so the answer (about 700 KB for 1,000 positions) is
decoded the fast way when it can be (`PositionsDecoder`: typed, checked in C,
with the checked path, `holdings_from`, for every answer it does not take).

The safety net (`SafetyNetBroker`, docs/safety-net.md) is Upstox GTT orders
on the API host (broker-protocols.md section 2): one SINGLE GTT per guarded
position whose ENTRY rule sells a long when the price falls to the trigger
(buys back a short when it rises to it). Its calls answer as the protocol says:
BrokerRejected when Upstox refused (a 4xx with its error body: nothing changed),
BrokerUnavailable when the outcome is unknown (429, 5xx, transport trouble, an
answer that cannot be read). What Upstox's docs leave open (the status strings
of a rule, the answer for cancelling a GTT that fired, whether the list without
an id lists every GTT) is read tolerantly and said at each place below.

The access token is sent only in the Authorization header; it is never logged
and is scrubbed from any broker text we repeat.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import re
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Annotated, Any, Literal, TypeGuard

import aiohttp
import msgspec

from tickguard import config
from tickguard.core import untrusted
from tickguard.core.account import Holding
from tickguard.core.orders import ExitOrder, OrderReport, OrderStatus
from tickguard.core.positions import Side
from tickguard.core.safety_net import BrokerStop, StopState
from tickguard.errors import BrokerBusy, BrokerError, BrokerRejected, BrokerUnavailable
from tickguard.replies import BadReply, read_body

log = logging.getLogger(__name__)

# The configuration's defaults (config.DEFAULTS, docs/config.md), not copies of them.
DEFAULT_API_URL: str = config.default("upstox.api_url", str)
DEFAULT_HFT_URL: str = config.default("upstox.hft_url", str)  # order place/modify/cancel
DEFAULT_PRODUCT: str = config.default("upstox.product", str)
DEFAULT_PRODUCTS: tuple[str, ...] = config.default("account.products", tuple)  # counted positions
DEFAULT_FILL_WAIT = 5.0  # seconds place_exit waits for an accepted order to complete
DETAILS_POLL_INTERVAL = 0.2  # seconds between order detail polls while waiting for the fill
REQUEST_TIMEOUT = 5.0  # seconds for one HTTP exchange with Upstox
POSITIONS_TIMEOUT = 2.0  # seconds for one positions call: it is made right before an exit
POSITIONS_PATH = "/v2/portfolio/short-term-positions"

FILLED_STATUSES = frozenset({"complete"})
REJECTED_STATUSES = frozenset({"rejected", "cancelled"})
_NOT_FOUND_HINTS = ("not found", "no order", "does not exist", "invalid order id")
_DETAIL_MAX = 300  # characters of broker text kept in a detail
_KEY_MAX = 64  # characters of an instrument key (`NSE_EQ|INE848E01016`); longer is not one
_ID_MAX = 64  # characters of a GTT or order id (`GTT-C25030300128840`); longer is not one

# The safety net's endpoints (broker-protocols.md section 2). GTTs are on the API host, not
# the HFT host of order place/modify/cancel; cancelling the order a fired GTT placed is an
# order cancel, on the HFT host.
GTT_PLACE_PATH = "/v3/order/gtt/place"
GTT_MODIFY_PATH = "/v3/order/gtt/modify"
GTT_CANCEL_PATH = "/v3/order/gtt/cancel"
GTT_PATH = "/v3/order/gtt"  # ?gtt_order_id= one GTT's details; without it, the list
ORDER_CANCEL_PATH = "/v3/order/cancel"
ORDER_DETAILS_PATH = "/v2/order/details"

# A stop closes its position: a long's sells once the price is at or below the trigger,
# a short's buys once it is at or above it.
_CLOSING: dict[Side, tuple[str, str]] = {
    Side.LONG: ("SELL", "BELOW"),
    Side.SHORT: ("BUY", "ABOVE"),
}
_CLOSED_BY = {transaction: side for side, (transaction, _) in _CLOSING.items()}

# A GTT's state is its ENTRY rule's `status`, upper-cased. Upstox's docs do not list the
# strings (unconfirmed), so every plausible spelling is here, in this one table; a status
# not in it means "cannot tell": stop_state raises BrokerUnavailable, stops() skips it.
GTT_STATES: Mapping[str, StopState] = {
    **dict.fromkeys(("SCHEDULED", "PENDING", "ACTIVE", "OPEN"), StopState.ACTIVE),
    **dict.fromkeys(("TRIGGERED", "COMPLETED", "EXECUTED", "FILLED"), StopState.TRIGGERED),
    **dict.fromkeys(
        ("CANCELLED", "CANCELED", "EXPIRED", "DELETED", "REJECTED", "FAILED"),
        StopState.CANCELLED,
    ),
}
# An unknown GTT id's answer is unconfirmed: a 400/404 saying one of these is "no such GTT".
_GTT_NOT_FOUND_HINTS = (*_NOT_FOUND_HINTS, "invalid gtt")


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
        products: tuple[str, ...] = DEFAULT_PRODUCTS,
        positions_timeout: float = POSITIONS_TIMEOUT,
        request_timeout: float = REQUEST_TIMEOUT,
    ) -> None:
        self._session = session
        self._token = token
        self._api_url = api_url.rstrip("/")
        self._hft_url = hft_url.rstrip("/")
        self.product = product
        self.fill_wait = fill_wait
        self.poll_interval = poll_interval
        self.products = products
        self.positions_timeout = positions_timeout
        self.request_timeout = request_timeout  # every exchange but the positions read
        self._positions_decoder: PositionsDecoder | None = None

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

    async def positions(self) -> list[Holding]:
        """The account's open net positions in the counted products, one per instrument key.

        BrokerUnavailable when Upstox cannot say: unreachable, no answer within
        `positions_timeout`, any HTTP error (401/403 included: it says nothing
        about the account), a body that is not JSON, `status` other than
        "success", or any malformed entry of a counted product.
        """
        url = f"{self._api_url}{POSITIONS_PATH}"
        fail = self._positions_unavailable
        limit = self.positions_timeout
        try:
            async with asyncio.timeout(limit):  # a hard bound, the body's read included
                status, raw = await self._fetch("GET", url, fail, timeout=limit)
        except TimeoutError:
            raise fail(f"GET {_path(url)}: no answer within {limit:g}s") from None
        if status == 200:
            decoder = self._positions_decoder
            if decoder is None or decoder.products != self.products:
                decoder = self._positions_decoder = PositionsDecoder(self.products)
            holdings = decoder.holdings(raw)
            if holdings is not None:
                return holdings
        # Every answer the fast path did not take, judged as it always was.
        payload = _payload(status, self._unechoed(raw), "GET", url, fail)
        if status != 200:
            detail = f"GET {POSITIONS_PATH}: HTTP {status} {_errors_text(payload)}".rstrip()
            raise fail(f"{detail} (rate limited)" if status == 429 else detail)
        try:
            return holdings_from(payload, self.products)
        except ValueError as exc:
            raise fail(f"GET {POSITIONS_PATH}: {exc}") from None

    async def close(self) -> None:
        return None

    # -- the safety net (SafetyNetBroker): Upstox GTT orders --------------
    #
    # Failures are logged at debug only: the safety net counts each and logs it once
    # ([SAFETY NET]). `ref` in an error is the GTT id (the symbol for a place, the order
    # id for an order cancel).

    async def place_stop(
        self, symbol: str, position_side: Side, quantity: float, trigger: float
    ) -> BrokerStop:
        """One SINGLE GTT whose ENTRY rule closes `quantity` of the position at `trigger`."""
        what = f"GTT place {untrusted.shown(symbol)}"
        whole = self._stop_quantity(symbol, what, quantity)
        self._check_trigger(symbol, what, trigger)
        if not _is_instrument_key(symbol):
            raise self._stop_rejected(symbol, f"{what}: not an instrument key")
        transaction, _ = _CLOSING[position_side]
        body = {
            "type": "SINGLE",
            "quantity": whole,
            "product": self.product,
            "instrument_token": symbol,
            "transaction_type": transaction,
            "rules": [_entry_rule(position_side, trigger)],
        }
        url = f"{self._api_url}{GTT_PLACE_PATH}"
        status, payload = await self._stop_exchange(symbol, "POST", url, body)
        if not 200 <= status < 300:
            raise self._stop_failure(symbol, what, status, payload, refused=True)
        gtt_id = _placed_gtt_id(payload)
        if gtt_id is None:  # it may exist all the same: stops() finds it again
            shown = untrusted.shown(payload, _DETAIL_MAX)
            raise self._stop_unavailable(symbol, f"{what}: HTTP {status} without a GTT id: {shown}")
        log.debug(
            "upstox: GTT %s placed: %s %d %s at %s", gtt_id, transaction, whole, symbol, trigger
        )
        return BrokerStop(gtt_id, symbol, position_side, float(whole), trigger)

    async def modify_stop(self, stop: BrokerStop, quantity: float, trigger: float) -> BrokerStop:
        """The GTT's ENTRY rule moved to `trigger` for `quantity`; refused (BrokerRejected)
        when it is no longer active."""
        ref = stop.stop_id
        what = f"GTT modify {untrusted.shown(ref)}"
        self._check_id(ref, what)
        whole = self._stop_quantity(ref, what, quantity)
        self._check_trigger(ref, what, trigger)
        body = {
            "type": "SINGLE",
            "gtt_order_id": ref,
            "quantity": whole,
            "rules": [_entry_rule(stop.position_side, trigger)],
        }
        url = f"{self._api_url}{GTT_MODIFY_PATH}"
        status, payload = await self._stop_exchange(ref, "PUT", url, body)
        if not 200 <= status < 300:
            raise self._stop_failure(ref, what, status, payload, refused=True)
        if not _succeeded(payload):
            shown = untrusted.shown(payload, _DETAIL_MAX)
            raise self._stop_unavailable(ref, f"{what}: HTTP {status} without success: {shown}")
        log.debug("upstox: GTT %s moved: %d at %s", ref, whole, trigger)
        return replace(stop, quantity=float(whole), trigger=trigger, state=StopState.ACTIVE)

    async def cancel_stop(self, stop: BrokerStop) -> BrokerStop:
        """CANCELLED when Upstox cancels it; after a refusal, what the GTT is now: TRIGGERED
        or CANCELLED (BrokerRejected while it is still active, BrokerUnavailable when it
        cannot be found: a fired GTT taken for cancelled would let a second exit go)."""
        ref = stop.stop_id
        what = f"GTT cancel {untrusted.shown(ref)}"
        self._check_id(ref, what)
        url = f"{self._api_url}{GTT_CANCEL_PATH}"
        status, payload = await self._stop_exchange(ref, "DELETE", url, {"gtt_order_id": ref})
        if 200 <= status < 300 and _succeeded(payload):
            log.debug("upstox: GTT %s cancelled", ref)
            return replace(stop, state=StopState.CANCELLED)
        if status == 429 or not 200 <= status < 500:
            raise self._stop_failure(ref, what, status, payload, refused=False)
        # Refused (only a GTT not yet triggered can be cancelled; Upstox's answer for one that
        # fired, or was cancelled before, is unconfirmed), or a 2xx that does not say success:
        # what the GTT is now says what happened.
        refusal = _refusal(status, payload)
        try:
            now = await self.stop_state(stop)
        except BrokerUnavailable as exc:
            looked = exc.detail.removeprefix("upstox: ")
            raise self._stop_unavailable(ref, f"{what}: {refusal}; then {looked}") from None
        if now is None:
            raise self._stop_unavailable(
                ref, f"{what}: {refusal}; the GTT is not found: its state is unknown"
            )
        if now.state is StopState.ACTIVE:
            raise self._stop_rejected(ref, f"{what}: refused: {refusal}; the GTT is still active")
        log.debug("upstox: GTT %s not cancelled: it is %s", ref, now.state.value)
        return now

    async def stop_state(self, stop: BrokerStop) -> BrokerStop | None:
        """The GTT as `GET /v3/order/gtt?gtt_order_id=` lists it; None when Upstox has no such
        GTT (an empty list, or a 400/404 saying it is not found: the shape is unconfirmed)."""
        ref = stop.stop_id
        what = f"GTT details {untrusted.shown(ref)}"
        self._check_id(ref, what)
        url = f"{self._api_url}{GTT_PATH}"
        status, payload = await self._stop_exchange(ref, "GET", url, params={"gtt_order_id": ref})
        if not 200 <= status < 300:
            if status in (400, 404) and _says(payload, _GTT_NOT_FOUND_HINTS):
                return None
            raise self._stop_failure(ref, what, status, payload, refused=False)
        try:
            entries = _gtt_entries(payload)
        except ValueError as exc:
            raise self._stop_unavailable(ref, f"{what}: {exc}") from None
        for index, entry in enumerate(entries):
            if isinstance(entry, Mapping) and _gtt_id(entry.get("gtt_order_id")) == ref:
                try:
                    return _gtt_stop(entry)
                except ValueError as exc:
                    raise self._stop_unavailable(ref, f"{what}: data[{index}]: {exc}") from None
        return None

    async def stops(self) -> list[BrokerStop]:
        """Every GTT listed that is a stop: a SINGLE GTT with one ENTRY rule that sells BELOW
        (a long's) or buys ABOVE (a short's), in a state GTT_STATES knows. The others (a
        person's targets, MULTIPLE GTTs, malformed entries) are not ours and are skipped.

        Unconfirmed: that `GET /v3/order/gtt` without an id lists every GTT of the account
        (the docs describe it with one), and whether fired or cancelled GTTs stay listed.
        `data: null` is an unreadable answer, not an empty list: a stop missed here could
        be placed twice."""
        what = "GTT list"
        status, payload = await self._stop_exchange("", "GET", f"{self._api_url}{GTT_PATH}")
        if not 200 <= status < 300:
            raise self._stop_failure("", what, status, payload, refused=False)
        try:
            entries = _gtt_entries(payload)
        except ValueError as exc:
            raise self._stop_unavailable("", f"{what}: {exc}") from None
        found: list[BrokerStop] = []
        skipped: list[str] = []
        for index, entry in enumerate(entries):
            try:
                found.append(_gtt_stop(entry))
            except ValueError as exc:
                skipped.append(f"data[{index}]: {exc}")
        if skipped:
            first = self._scrub(skipped[0])
            log.debug(
                "upstox: GTT list: %d entries are not stops, the first: %s", len(skipped), first
            )
        return found

    async def cancel_order(self, order_id: str) -> bool:
        """`DELETE {hft}/v3/order/cancel`: True once cancelled; after a refusal, the order's
        details decide: cancelled or rejected before -> True, complete -> False, anything
        else (still open, unreadable) -> BrokerUnavailable."""
        what = f"order cancel {untrusted.shown(order_id)}"
        self._check_id(order_id, what)
        url = f"{self._hft_url}{ORDER_CANCEL_PATH}"
        params = {"order_id": order_id}
        status, payload = await self._stop_exchange(order_id, "DELETE", url, params=params)
        if 200 <= status < 300 and _succeeded(payload):
            log.debug("upstox: order %s cancelled", order_id)
            return True
        if status == 429 or not 200 <= status < 500:
            raise self._stop_failure(order_id, what, status, payload, refused=False)
        refusal = _refusal(status, payload)
        url = f"{self._api_url}{ORDER_DETAILS_PATH}"
        status, payload = await self._stop_exchange(order_id, "GET", url, params=params)
        state = _order_state(payload) if 200 <= status < 300 else None
        if state in REJECTED_STATUSES:
            return True
        if state in FILLED_STATUSES:
            return False
        said = untrusted.shown(state) if state is not None else _refusal(status, payload)
        raise self._stop_unavailable(order_id, f"{what}: {refusal}; then its details: {said}")

    async def _stop_exchange(
        self,
        ref: str,
        method: str,
        url: str,
        body: Mapping[str, Any] | None = None,
        params: Mapping[str, str] | None = None,
    ) -> tuple[int, Any]:
        return await self._exchange(
            method,
            url,
            lambda detail: self._stop_unavailable(ref, detail),
            body,
            params,
            timeout=self.request_timeout,
        )

    def _stop_quantity(self, ref: str, what: str, quantity: float) -> int:
        """Upstox quantities are whole numbers of shares: anything else is refused unsent."""
        number = untrusted.number(quantity)
        if number is None or not number.is_integer() or not 0 < number < untrusted.MAX_AMOUNT:
            raise self._stop_rejected(
                ref,
                f"{what}: quantity {untrusted.shown(quantity)} is not a positive whole number"
                " of shares",
            )
        return int(number)

    def _check_trigger(self, ref: str, what: str, trigger: float) -> None:
        if untrusted.amount(trigger) is None:
            raise self._stop_rejected(
                ref, f"{what}: trigger {untrusted.shown(trigger)} is not a price"
            )

    def _check_id(self, ref: str, what: str) -> None:
        if _gtt_id(ref) != ref:
            raise self._stop_rejected(ref, f"{what}: not an id")

    def _stop_failure(
        self, ref: str, what: str, status: int, payload: Any, *, refused: bool
    ) -> BrokerError:
        """A non-success answer: refused (nothing changed) when `refused` and it is a 4xx
        (but 429) with Upstox's error body; else the outcome is unknown."""
        errors = _errors_text(payload)
        detail = f"{what}: HTTP {status} {errors}".rstrip()
        if refused and 400 <= status < 500 and status != 429 and errors:
            return self._stop_rejected(ref, f"{detail} (refused)")
        if status == 429:  # Upstox refused it unseen: nothing changed
            return BrokerBusy(ref, self._scrub(f"upstox: {detail} (rate limited)"))
        return self._stop_unavailable(ref, detail)

    def _stop_rejected(self, ref: str, detail: str) -> BrokerRejected:
        detail = self._scrub(f"upstox: {detail}")
        log.debug("%s", detail)
        return BrokerRejected(ref, detail)

    def _stop_unavailable(self, ref: str, detail: str) -> BrokerUnavailable:
        detail = self._scrub(f"upstox: {detail}")
        log.debug("%s", detail)
        return BrokerUnavailable(ref, detail)

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
        return await self._exchange(
            method,
            url,
            lambda detail: self._unavailable(cid, detail),
            body,
            params,
            timeout=self.request_timeout,
        )

    async def _exchange(
        self,
        method: str,
        url: str,
        fail: Callable[[str], BrokerUnavailable],
        body: Mapping[str, Any] | None = None,
        params: Mapping[str, str] | None = None,
        *,
        timeout: float = REQUEST_TIMEOUT,
    ) -> tuple[int, Any]:
        """(HTTP status, decoded JSON or None, any token it repeats replaced); transport
        trouble and a bad 2xx body: `fail`."""
        status, raw = await self._fetch(method, url, fail, body, params, timeout=timeout)
        return status, _payload(status, self._unechoed(raw), method, url, fail)

    async def _fetch(
        self,
        method: str,
        url: str,
        fail: Callable[[str], BrokerUnavailable],
        body: Mapping[str, Any] | None = None,
        params: Mapping[str, str] | None = None,
        *,
        timeout: float = REQUEST_TIMEOUT,
    ) -> tuple[int, bytes]:
        """(HTTP status, the body as received); transport trouble and a 2xx body over the
        size limit: `fail` (a larger error body is read as empty)."""
        headers = {
            "Authorization": f"Bearer {self._token}",
            "Accept": "application/json",
            "Content-Type": "application/json",
        }
        try:
            async with self._session.request(
                method,
                url,
                json=body,
                params=params,
                headers=headers,
                timeout=aiohttp.ClientTimeout(total=timeout),
            ) as response:
                status = response.status
                raw = await read_body(response)
        except TimeoutError as exc:
            raise fail(f"{method} {_path(url)}: no answer within {timeout:g}s") from exc
        except (aiohttp.ClientError, OSError) as exc:
            detail = str(exc) or exc.__class__.__name__
            raise fail(f"{method} {_path(url)}: {detail}") from exc
        except BadReply as exc:
            if 200 <= status < 300:
                raise fail(f"{method} {_path(url)}: HTTP {status} with {exc}") from None
            raw = b""
        return status, raw

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

    def _positions_unavailable(self, detail: str) -> BrokerUnavailable:
        # Debug only: the caller counts the failure and logs it once per change of reason.
        detail = self._scrub(f"upstox: positions: {detail}")
        log.debug("%s", detail)
        return BrokerUnavailable("", detail)

    def _scrub(self, text: str) -> str:
        return text.replace(self._token, "<token>") if self._token else text

    def _unechoed(self, raw: bytes) -> bytes:
        """A body with any token the server repeats replaced, before it is decoded: text cut
        short for a message could otherwise keep part of it, which `_scrub` cannot find."""
        return raw.replace(self._token.encode(), b"<token>") if self._token else raw


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


def _succeeded(payload: Any) -> bool:
    return isinstance(payload, Mapping) and payload.get("status") == "success"


def _refusal(status: int, payload: Any) -> str:
    """An answer that is no success, in a few words: its errors, or the body itself."""
    said = _errors_text(payload) or (untrusted.shown(payload) if payload is not None else "")
    return f"HTTP {status} {said}".rstrip()


def _entry_rule(side: Side, trigger: float) -> dict[str, Any]:
    """The ENTRY rule of a stop closing a position on `side`."""
    return {"strategy": "ENTRY", "trigger_type": _CLOSING[side][1], "trigger_price": trigger}


def _gtt_id(value: Any) -> str | None:
    """An id as Upstox gives it (a short printable string, or a whole number), else None."""
    if isinstance(value, str):
        fine = 0 < len(value) <= _ID_MAX and value.isprintable() and value.strip() == value
        return value if fine else None
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 10**_ID_MAX:
        return str(value)
    return None


def _placed_gtt_id(payload: Any) -> str | None:
    """The one id of a placed GTT (`data.gtt_order_ids`), else None."""
    if not isinstance(payload, Mapping) or payload.get("status", "success") != "success":
        return None
    data = payload.get("data")
    ids = data.get("gtt_order_ids") if isinstance(data, Mapping) else None
    if not isinstance(ids, list) or len(ids) != 1:  # one SINGLE GTT placed, one id
        return None
    return _gtt_id(ids[0])


def _gtt_entries(payload: Any) -> list[Any]:
    """The entries of a GTT answer (a details answer's one object is taken as a list of
    one); ValueError naming what is wrong."""
    if not isinstance(payload, Mapping):
        raise ValueError(f"the answer is not an object: {untrusted.shown(payload)}")
    status = payload.get("status")
    if status != "success":
        errors = _errors_text(payload)
        raise ValueError(f"status {untrusted.shown(status)}" + (f": {errors}" if errors else ""))
    if "data" not in payload:
        raise ValueError("data is missing")
    data = payload["data"]
    if isinstance(data, Mapping):
        return [data]
    if not isinstance(data, list):
        raise ValueError(f"data is not a list: {untrusted.shown(data)}")
    return data


def _gtt_stop(entry: Any) -> BrokerStop:
    """A GTT entry as the stop it is; ValueError when it is not a stop (a SINGLE GTT with one
    ENTRY rule that sells BELOW or buys ABOVE), is malformed, or has a status GTT_STATES
    does not know."""
    if not isinstance(entry, Mapping):
        raise ValueError(f"not an object: {untrusted.shown(entry)}")
    kind = entry.get("type")
    if kind != "SINGLE":
        raise ValueError(f"type {untrusted.shown(kind)} is not SINGLE")
    raw_id = entry.get("gtt_order_id")
    gtt_id = _gtt_id(raw_id)
    if gtt_id is None:
        raise ValueError(f"gtt_order_id {untrusted.shown(raw_id)} is not an id")
    key = entry.get("instrument_token")
    if not _is_instrument_key(key):
        raise ValueError(f"instrument_token {untrusted.shown(key)} is not an instrument key")
    raw_quantity = entry.get("quantity")
    quantity = untrusted.amount(raw_quantity)
    if quantity is None or not quantity.is_integer():
        raise ValueError(
            f"quantity {untrusted.shown(raw_quantity)} is not a positive whole number of shares"
        )
    rules = entry.get("rules")
    if not isinstance(rules, list):
        raise ValueError(f"rules {untrusted.shown(rules)} is not a list")
    entry_rules = [r for r in rules if isinstance(r, Mapping) and r.get("strategy") == "ENTRY"]
    if len(entry_rules) != 1:
        raise ValueError(f"{len(entry_rules)} ENTRY rules")
    (rule,) = entry_rules
    # On the rule in a details answer; on the GTT in a place body: either will do.
    transaction = rule.get("transaction_type") or entry.get("transaction_type")
    side = _CLOSED_BY.get(transaction) if isinstance(transaction, str) else None
    if side is None:
        raise ValueError(f"transaction_type {untrusted.shown(transaction)} is not BUY or SELL")
    trigger_type = rule.get("trigger_type")
    if trigger_type != _CLOSING[side][1]:
        raise ValueError(f"{transaction} {untrusted.shown(trigger_type)} is not a stop")
    raw_trigger = rule.get("trigger_price")
    trigger = _positive_float(raw_trigger)
    if trigger is None:
        raise ValueError(f"trigger_price {untrusted.shown(raw_trigger)} is not a price")
    raw_status = rule.get("status")
    state = None
    if isinstance(raw_status, str) and len(raw_status) <= _ID_MAX:
        state = GTT_STATES.get(raw_status.strip().upper())
    if state is None:
        raise ValueError(f"status {untrusted.shown(raw_status)} is not a state it knows")
    # The order it placed, when it says (a string or a number; anything else: not said).
    order_id = _gtt_id(rule.get("order_id"))
    return BrokerStop(gtt_id, key, side, quantity, trigger, state, order_id)


def _order_state(payload: Any) -> str | None:
    """An order details answer's `status`, lower-cased; None when it does not say one."""
    if not _succeeded(payload):
        return None
    data = payload.get("data")
    if isinstance(data, list):  # as _wait_for_fill reads it: the newest entry
        data = data[-1] if data else None
    status = data.get("status") if isinstance(data, Mapping) else None
    if not isinstance(status, str) or len(status) > _ID_MAX:
        return None
    return status.strip().lower()


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
    return _says(payload, _NOT_FOUND_HINTS)


def _says(payload: Any, hints: tuple[str, ...]) -> bool:
    text = _errors_text(payload).lower()
    return any(hint in text for hint in hints)


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


def _payload(
    status: int, raw: bytes, method: str, url: str, fail: Callable[[str], BrokerUnavailable]
) -> Any:
    """A body as JSON (None when empty); one that is not JSON is `fail` in a 2xx answer and
    None otherwise (replies.read_json's judgement, on a body already read)."""
    if not raw.strip():
        return None
    try:
        return untrusted.parse_json(raw)
    except ValueError as exc:
        if 200 <= status < 300:
            bad = f"a body that is not JSON ({untrusted.shown(str(exc))})"
            raise fail(f"{method} {_path(url)}: HTTP {status} with {bad}") from None
        return None


# -- positions (strict: a counted entry is valid whole, or the whole answer fails) --


@dataclass(frozen=True, slots=True)
class _Entry:
    """One counted entry of a positions answer: an instrument key's net in one product."""

    key: str
    product: str
    quantity: int  # net, signed
    average_price: float | None


def holdings_from(payload: Any, products: tuple[str, ...]) -> list[Holding]:
    """The Holdings of a positions answer, one per instrument key, sorted; ValueError naming
    the first thing malformed.

    Entries of products outside `products` are left out unread (beyond their
    `product`). The counted entries of one instrument key are summed into one
    Holding; a net of 0 is flat and left out. Its average price is the
    quantity-weighted average of the entries' averages when every entry still
    open is on the net's side and says its average; otherwise None, "the broker
    does not say" (an average across a long and a short means nothing, and a
    guessed one would put stops in the wrong place). Its product is the one
    product holding it, "" when several do (no one product to exit in).
    """
    if not isinstance(payload, Mapping):
        raise ValueError(f"the answer is not an object: {untrusted.shown(payload)}")
    status = payload.get("status")
    if status != "success":
        errors = _errors_text(payload)
        raise ValueError(f"status {untrusted.shown(status)}" + (f": {errors}" if errors else ""))
    if "data" not in payload:
        raise ValueError("data is missing")
    data = payload["data"]
    if not isinstance(data, list):
        raise ValueError(f"data is not a list: {untrusted.shown(data)}")
    by_key: dict[str, list[_Entry]] = {}
    for index, raw in enumerate(data):
        entry = _counted_entry(index, raw, products)
        if entry is None:
            continue
        same = by_key.setdefault(entry.key, [])
        if any(e.product == entry.product for e in same):
            # One entry per key and product is documented; summing twins could double a
            # position and size an exit through zero.
            raise ValueError(
                f"data[{index}]: a second entry for {entry.key} in product {entry.product}"
            )
        same.append(entry)
    holdings = [_net(key, entries) for key, entries in sorted(by_key.items())]
    return [h for h in holdings if h is not None]


def _counted_entry(index: int, raw: Any, products: tuple[str, ...]) -> _Entry | None:
    """The entry at data[index] if its product counts, None if not; ValueError if malformed."""
    where = f"data[{index}]"
    if not isinstance(raw, Mapping):
        raise ValueError(f"{where} is not an object: {untrusted.shown(raw)}")
    product = _field(raw, where, "product")
    if not isinstance(product, str):
        raise ValueError(f"{where}.product: {untrusted.shown(product)} is not a product code")
    if product not in products:
        return None
    key = _field(raw, where, "instrument_token")
    if not _is_instrument_key(key):
        raise ValueError(
            f"{where}.instrument_token: {untrusted.shown(key)} is not an instrument key"
        )
    raw_quantity = _field(raw, where, "quantity")
    quantity = untrusted.number(raw_quantity)
    if quantity is None or not quantity.is_integer() or abs(quantity) >= untrusted.MAX_AMOUNT:
        raise ValueError(
            f"{where}.quantity: {untrusted.shown(raw_quantity)} is not a whole number of shares"
        )
    raw_average = _field(raw, where, "average_price")
    average = untrusted.number(raw_average)
    if raw_average is not None and (average is None or not 0 <= average < untrusted.MAX_AMOUNT):
        raise ValueError(f"{where}.average_price: {untrusted.shown(raw_average)} is not a price")
    return _Entry(key, product, int(quantity), average or None)  # 0: not said


def _field(raw: Mapping[str, Any], where: str, name: str) -> Any:
    if name not in raw:
        raise ValueError(f"{where}.{name} is missing")
    return raw[name]


def _is_instrument_key(value: Any) -> TypeGuard[str]:
    """`SEGMENT|identifier`, printable and short: what the feed subscribes and orders name."""
    if not isinstance(value, str) or len(value) > _KEY_MAX or not value.isprintable():
        return False
    segment, bar, identifier = value.partition("|")
    return bool(segment and bar and identifier.strip())


def _net(key: str, entries: list[_Entry]) -> Holding | None:
    """One Holding for an instrument key's counted entries (see `holdings_from`); None if flat."""
    net = sum(e.quantity for e in entries)
    if net == 0:
        return None
    if abs(net) >= untrusted.MAX_AMOUNT:
        raise ValueError(f"{key}: a net quantity of {untrusted.shown(net)} is not a position")
    open_ = [e for e in entries if e.quantity != 0]
    average: float | None = None
    if all((e.quantity > 0) == (net > 0) and e.average_price is not None for e in open_):
        weighted = sum(abs(e.quantity) * (e.average_price or 0.0) for e in open_)
        average = weighted / abs(net)
    product = open_[0].product if len(open_) == 1 else ""
    return Holding(key, float(net), average, product)


# -- positions, the fast way: decoded and checked in C, the checked path for the rest --
#
# `holdings_from` above is the definition. `PositionsDecoder` gives the same Holdings for
# every answer it takes, and takes only answers that `untrusted.parse_json` and
# `holdings_from` would take: anything else (a malformed counted entry, a field it does not
# know how to judge in C, a product code it does not know) it leaves to them, so a failed
# read still names its first problem, and is still a failed read.

# Upstox's product codes: those counted are decoded (`_Counted`), the others only named.
# An entry of a product outside this list sends its answer to the checked path.
KNOWN_PRODUCTS = ("I", "D", "MTF", "CO", "OCO")
_WHOLE_LIMIT = int(untrusted.MAX_AMOUNT) - 1  # |quantity| < MAX_AMOUNT, as a whole number
# An instrument key's shape after its characters are known printable (`_is_instrument_key`):
# a segment without a bar, a bar, and an identifier that is not only spaces (the only
# printable white space). One line per key, so one match checks every key of an answer.
_KEYS = re.compile(r"(?:[^|\n]+\| *[^ \n][^\n]*\n)*")


class _Counted(msgspec.Struct, frozen=True, gc=False, tag_field="product"):
    """An entry of a counted product, checked as `_counted_entry` checks it (the key's
    characters and shape apart: `_keys_valid` checks them for the whole answer). Frozen:
    equal entries hash alike, so an unchanged entry finds its Holding of the last read."""

    instrument_token: Annotated[str, msgspec.Meta(max_length=_KEY_MAX)]
    quantity: Annotated[int, msgspec.Meta(ge=-_WHOLE_LIMIT, le=_WHOLE_LIMIT)]
    average_price: Annotated[float, msgspec.Meta(ge=0, lt=untrusted.MAX_AMOUNT)] | None


class _Ignored(msgspec.Struct, frozen=True, gc=False, tag_field="product"):
    """An entry of a product that does not count: its other fields are skipped unread."""


@functools.lru_cache(maxsize=8)
def _reply_decoder(products: tuple[str, ...]) -> tuple[Any, dict[type, str]]:
    """A decoder of the whole answer for `products`, and each counted class's product."""
    kinds: list[type] = []
    product_of: dict[type, str] = {}
    for product in dict.fromkeys(products + KNOWN_PRODUCTS):  # the counted ones first
        counted = product in products
        kind = msgspec.defstruct(
            f"{'Counted' if counted else 'Ignored'}_{product}",
            [],
            bases=(_Counted if counted else _Ignored,),
            tag=product,
            tag_field="product",
            frozen=True,
            gc=False,
        )
        kinds.append(kind)
        if counted:
            product_of[kind] = product
    entry: Any = kinds[0]
    for kind in kinds[1:]:
        entry = entry | kind
    reply = msgspec.defstruct(
        "PositionsReply",
        [("status", Literal["success"]), ("data", list[entry])],
        gc=False,
    )
    return msgspec.json.Decoder(reply).decode, product_of


class PositionsDecoder:
    """A positions answer (the raw body of a 200) to Holdings, the fast way, for one set of
    counted products; None for an answer it does not take (`holdings_from` then judges it).

    msgspec decodes the answer into typed entries, checking every counted field in C as
    it goes (the bounds are `untrusted`'s, as in `_counted_entry`) and skipping the fields
    nobody reads, and every field of an entry whose product does not count. What is left
    is checked per answer, not per entry: no instrument key twice (a set), and only then,
    for a key in several products, the sums. An entry equal to one of the last read keeps
    its Holding (the same object); only the others have their keys checked (printable, of
    the right shape: one `isprintable` and one regex match for all of them) and a Holding
    made. An answer byte for byte the last one is the last one's Holdings.

    What it takes, `parse_json` takes: the body is valid UTF-8 and has no run of digits
    as long as the interpreter's limit for an integer (`sys.get_int_max_str_digits`).
    One difference remains, at the edge of the interpreter's stack: in a field nobody
    reads, msgspec allows a few levels more nesting than the json module, about a
    thousand deep, where the json module's own limit depends on how deep its caller is.
    """

    def __init__(self, products: tuple[str, ...]) -> None:
        self.products = products
        self._decode, self._product_of = _reply_decoder(products)
        self._known: dict[_Counted, Holding | None] = {}  # entries seen (None: flat)
        self._last: tuple[bytes, list[Holding]] | None = None  # the last answer taken

    def holdings(self, raw: bytes) -> list[Holding] | None:
        """The Holdings of `raw`, as `holdings_from` reads it; None: not taken here."""
        last = self._last
        if last is not None and raw == last[0]:
            return list(last[1])
        holdings = self._holdings(raw)
        self._last = (raw, holdings) if holdings is not None else None
        return list(holdings) if holdings is not None else None

    def _holdings(self, raw: bytes) -> list[Holding] | None:
        body = _valid_text(raw)
        if body is None:
            return None
        try:
            reply = self._decode(body)
        except (msgspec.DecodeError, RecursionError):  # ValidationError is a DecodeError
            return None
        counted: list[_Counted] = reply.data
        try:
            keys = list(map(_token, counted))
        except AttributeError:  # an entry of a product that does not count: left out
            counted = [e for e in counted if isinstance(e, _Counted)]
            keys = list(map(_token, counted))
        if len(set(keys)) != len(keys):
            return self._grouped(counted, keys)
        known = self._known
        if len(known) > 2 * len(counted) + 64:  # entries of past reads: forget them
            current = set(counted)
            known = self._known = {e: h for e, h in known.items() if e in current}
        fresh = [e for e in counted if e not in known]
        if fresh:
            if not _keys_valid(list(map(_token, fresh))):
                return None
            product_of = self._product_of
            for entry in fresh:
                quantity, average = entry.quantity, entry.average_price or None  # 0: not said
                if not quantity:
                    known[entry] = None  # flat
                    continue
                if average is not None:  # as `_net` weighs it, to the last bit
                    average = abs(quantity) * average / abs(quantity)
                known[entry] = Holding(
                    entry.instrument_token, float(quantity), average, product_of[type(entry)]
                )
        counted.sort(key=_token)
        return [h for h in map(known.__getitem__, counted) if h is not None]

    def _grouped(self, counted: list[_Counted], keys: list[str]) -> list[Holding] | None:
        """An instrument key in several counted products: summed as `holdings_from` sums them."""
        if not _keys_valid(keys):
            return None
        by_key: dict[str, list[_Entry]] = {}
        for entry in counted:
            same = by_key.setdefault(entry.instrument_token, [])
            product = self._product_of[type(entry)]
            if any(e.product == product for e in same):
                return None  # a second entry in one product: the checked path names it
            average = entry.average_price or None
            same.append(_Entry(entry.instrument_token, product, entry.quantity, average))
        try:
            holdings = [_net(key, entries) for key, entries in sorted(by_key.items())]
        except ValueError:
            return None
        return [h for h in holdings if h is not None]


def _token(entry: _Counted) -> str:
    return entry.instrument_token


def _valid_text(raw: bytes) -> bytes | str | None:
    """`raw` for msgspec if `parse_json` would take its text as such: valid UTF-8 (msgspec
    does not check it in the fields it skips), and no run of digits that could be an
    integer over the interpreter's limit (msgspec skips those too); else None."""
    if not raw.isascii():
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            return None
        return text if _short_digits(raw) else None
    return raw if _short_digits(raw) else None


def _short_digits(raw: bytes) -> bool:
    """False if `raw` may hold a run of more digits than an int may have (conservative).

    A run of more than 2k digits covers a whole window [i*k, i*k + k] for some i, so
    windows k apart, each cut off at its first non-digit, find every such run."""
    limit = sys.get_int_max_str_digits()
    if not limit or len(raw) <= limit:
        return True
    step = limit // 2
    return not any(raw[i : i + step + 1].isdigit() for i in range(0, len(raw) - step, step))


def _keys_valid(keys: list[str]) -> bool:
    """Every key as `_is_instrument_key` wants it (their lengths msgspec checked)."""
    if not "".join(keys).isprintable():
        return False
    lines = "\n".join(keys) + "\n" if keys else ""
    return _KEYS.fullmatch(lines) is not None
