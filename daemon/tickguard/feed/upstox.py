"""The `upstox` feed protocol: Upstox Market Data Feed V3, and its REST LTP fallback.

Facts from shared/reference/broker-protocols.md section 1. Symbols are Upstox
instrument keys (`NSE_EQ|INE848E01016`). The socket URL is single-use: every
connect calls `authorize` first (the supervisor's `endpoint` hook), with the
access token in a header; neither the token nor the URL's query (requestId,
code) is ever put in an exception or a log line.

Decoding is pure and never raises. A text frame counts `text`; bytes that are
not a FeedResponse count `bad_frame` once; each feeds entry is judged on its
own, as json ticks batches are (docs/config.md): an entry that is malformed counts
`bad_frame`, one without an LTP `bad_price`, one for a key not subscribed
`unknown_symbol`, and the good entries of the frame still count. A known
field arriving with another wire type is malformed (a schema change never
reuses a number that way); fields at numbers this decoder does not know are
skipped, so additive fields (call auction and the like) do no harm.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Collection, Mapping, Sequence
from urllib.parse import urlsplit

import aiohttp

from tickguard.errors import FeedError
from tickguard.feed import protobuf as pb
from tickguard.feed import protocol as p
from tickguard.replies import BadReply, read_body

TEXT = "text"  # bad-message reason: a text frame where Upstox sends only binary

# FeedResponse.type
INITIAL_FEED = 0
LIVE_FEED = 1
MARKET_INFO = 2

MODE = "ltpc"  # the smallest mode carrying the last price and trade time
AUTHORIZE_PATH = "/v3/feed/market-data-feed/authorize"
LTP_PATH = "/v3/market-quote/ltp"

# Field numbers of MarketDataFeedV3.proto, and the wire type each must have.
_RESPONSE = {1: pb.VARINT, 2: pb.LEN}  # type, feeds (map entries)
_MAP_ENTRY = {1: pb.LEN, 2: pb.LEN}  # key, value
_FEED = {1: pb.LEN, 2: pb.LEN, 3: pb.LEN}  # oneof: ltpc, fullFeed, firstLevelWithGreeks
_FULL_FEED = {1: pb.LEN, 2: pb.LEN}  # oneof: marketFF, indexFF
_HAS_LTPC = {1: pb.LEN}  # MarketFullFeed, IndexFullFeed, FirstLevelWithGreeks: ltpc
_LTPC = {1: pb.I64, 2: pb.VARINT}  # ltp, ltt


def _new_guid() -> str:
    return uuid.uuid4().hex


class UpstoxProtocol:
    name = "upstox"

    def __init__(self, guid: Callable[[], str] = _new_guid) -> None:
        self._guid = guid

    def subscribe_frames(self, symbols: Sequence[str]) -> list[str | bytes]:
        """One binary frame holding the JSON `sub` request in ltpc mode (none for no symbols)."""
        if not symbols:
            return []
        request = {
            "guid": self._guid(),
            "method": "sub",
            "data": {"mode": MODE, "instrumentKeys": list(symbols)},
        }
        return [json.dumps(request, separators=(",", ":"), ensure_ascii=False).encode()]

    def add_frames(self, symbols: Sequence[str], added: Sequence[str]) -> list[str | bytes]:
        # A `sub` adds to the subscription: name only the new keys.
        return self.subscribe_frames(added)

    def decode(self, frame: str | bytes, known: Collection[str]) -> p.Decoded:
        out = p.Decoded()
        if isinstance(frame, str):
            out.errors.append(TEXT)
            return out
        try:
            response = _fields(frame, _RESPONSE)
        except pb.MalformedMessage:
            out.errors.append(p.BAD_FRAME)
            return out
        kind = _last(response, 1)
        if kind == MARKET_INFO:
            out.heartbeat = True  # market status: a sign of life, no price
        for entry in response.get(2, []):
            if isinstance(entry, bytes):  # always: the schema says LEN
                _entry(entry, known, out)
        return out


def _known(data: bytes, schema: Mapping[int, int]) -> list[pb.Field]:
    """The schema's fields in wire order, others skipped; a wrong wire type is malformed."""
    found = []
    for field in pb.parse(data):
        wire_type = schema.get(field.number)
        if wire_type is None:
            continue
        if field.wire_type != wire_type:
            raise pb.MalformedMessage(0, f"field {field.number} has wire type {field.wire_type}")
        found.append(field)
    return found


def _fields(data: bytes, schema: Mapping[int, int]) -> dict[int, list[int | bytes]]:
    """The values of the schema's fields by number, in wire order."""
    found: dict[int, list[int | bytes]] = {}
    for field in _known(data, schema):
        found.setdefault(field.number, []).append(field.value)
    return found


def _last(found: Mapping[int, list[int | bytes]], number: int) -> int | bytes | None:
    values = found.get(number)
    return values[-1] if values else None


def _merged(found: Mapping[int, list[int | bytes]], number: int) -> bytes | None:
    """A singular sub-message: its occurrences concatenated parse as their merge."""
    values = found.get(number)
    if not values:
        return None
    return b"".join(v for v in values if isinstance(v, bytes))


def _oneof(data: bytes, schema: Mapping[int, int]) -> tuple[int, bytes] | None:
    """The member of a oneof of sub-messages that is set: the last one on the wire wins."""
    fields = _known(data, schema)
    if not fields:
        return None
    number = fields[-1].number
    return number, b"".join(
        f.value for f in fields if f.number == number and isinstance(f.value, bytes)
    )


def _ltpc_of(feed: bytes) -> bytes | None:
    """The LTPC message of a Feed, wherever its mode put it."""
    member = _oneof(feed, _FEED)
    if member is None:
        return None
    number, body = member
    if number == 1:  # ltpc
        return body
    if number == 2:  # fullFeed -> marketFF | indexFF
        full = _oneof(body, _FULL_FEED)
        if full is None:
            return None
        body = full[1]
    return _merged(_fields(body, _HAS_LTPC), 1)


def _entry(data: bytes, known: Collection[str], out: p.Decoded) -> None:
    try:
        entry = _fields(data, _MAP_ENTRY)
        raw_key = _last(entry, 1)
        symbol = pb.utf8(raw_key) if isinstance(raw_key, bytes) else ""
        feed = _merged(entry, 2)
        ltpc = _ltpc_of(feed) if feed is not None else None
        values = _fields(ltpc, _LTPC) if ltpc is not None else {}
    except pb.MalformedMessage:
        out.errors.append(p.BAD_FRAME)
        return
    raw_ltp = _last(values, 1)
    price = pb.double(raw_ltp) if isinstance(raw_ltp, bytes) else None
    raw_ltt = _last(values, 2)
    ltt = pb.int64(raw_ltt) if isinstance(raw_ltt, int) else 0
    out.add(symbol, price, ltt if ltt > 0 else None, known)


# -- the single-use socket URL -------------------------------------------------


async def authorize(
    session: aiohttp.ClientSession, api_url: str, token: str, *, timeout: float
) -> str:
    """A fresh single-use feed URL; raises FeedError (kind auth, handshake or connect).

    `auth` (401/403, or a token that cannot be sent) is not worth retrying soon:
    the supervisor waits max_delay. The token and the returned URL's query stay
    out of every message.
    """
    if not token or not token.isascii() or not token.isprintable():
        raise FeedError("auth", "the Upstox access token is empty or not printable ASCII")
    url = api_url.rstrip("/") + AUTHORIZE_PATH
    host = urlsplit(api_url).hostname or "?"
    headers = {"Authorization": f"Bearer {token}", "Accept": "application/json"}
    try:
        async with session.get(
            url,
            headers=headers,
            timeout=aiohttp.ClientTimeout(total=timeout),
            allow_redirects=False,  # never forward the token elsewhere
        ) as response:
            status = response.status
            raw = await read_body(response)
    except BadReply as exc:
        raise FeedError("handshake", f"authorize at {host}: {exc}") from None
    except TimeoutError:
        raise FeedError("connect", f"authorize at {host}: no answer within {timeout:g}s") from None
    except (aiohttp.ClientError, OSError) as exc:
        raise FeedError("connect", f"authorize at {host}: {exc.__class__.__name__}") from None
    if status in (401, 403):
        raise FeedError("auth", f"authorize at {host} answered HTTP {status}{_error_code(raw)}")
    if status != 200:
        raise FeedError(
            "handshake", f"authorize at {host} answered HTTP {status}{_error_code(raw)}"
        )
    socket_url = _redirect_uri(raw)
    if socket_url is None:
        raise FeedError("handshake", f"authorize at {host} answered without a ws(s) URL")
    return socket_url


def _body(raw: bytes) -> dict[str, object] | None:
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError):
        return None
    return body if isinstance(body, dict) else None


def _redirect_uri(raw: bytes) -> str | None:
    body = _body(raw)
    data = body.get("data") if body is not None and body.get("status") == "success" else None
    uri = data.get("authorized_redirect_uri") if isinstance(data, dict) else None
    if not isinstance(uri, str):
        return None
    try:
        parts = urlsplit(uri)
        ok = parts.scheme in ("ws", "wss") and bool(parts.hostname) and parts.port != 0
    except ValueError:  # a bad port
        return None
    return uri if ok else None


def _error_code(raw: bytes) -> str:
    """` (UDAPI100050)` from an Upstox error body, or "" (the code only, never free text)."""
    body = _body(raw)
    errors = body.get("errors") if body is not None else None
    first = errors[0] if isinstance(errors, list) and errors else None
    code = first.get("errorCode") if isinstance(first, dict) else None
    if isinstance(code, str) and 0 < len(code) <= 32 and code.isascii() and code.isalnum():
        return f" ({code})"
    return ""


# -- the REST fallback ----------------------------------------------------------


def ltp_request(api_url: str, symbols: Sequence[str]) -> tuple[str, dict[str, str]]:
    """(URL, query params) of the LTP quote for `symbols` (instrument keys)."""
    return api_url.rstrip("/") + LTP_PATH, {"instrument_key": ",".join(symbols)}


def decode_ltp(body: object, known: Collection[str]) -> p.Decoded:
    """An LTP answer: `data` maps names (not instrument keys) to quotes with `instrument_token`.

    The body carries no exchange time, so every tick's is None.
    """
    out = p.Decoded()
    ok = isinstance(body, dict) and body.get("status") == "success"
    data = body.get("data") if ok and isinstance(body, dict) else None
    if not isinstance(data, dict):
        out.errors.append(p.NOT_OBJECT)
        return out
    for quote in data.values():
        if not isinstance(quote, dict):
            out.errors.append(p.NOT_OBJECT)
            continue
        # The map's keys are not instrument keys: `instrument_token` is.
        out.add(quote.get("instrument_token"), quote.get("last_price"), None, known)
    return out


def poll_source(api_url: str, token: str) -> p.PollSource:
    """The REST fallback for Upstox: the LTP quote of the subscribed instrument keys."""
    url, _ = ltp_request(api_url, [])
    return p.PollSource(
        url,
        lambda symbols: ltp_request(api_url, symbols)[1],
        decode_ltp,
        {"Authorization": f"Bearer {token}", "Accept": "application/json"},
    )
