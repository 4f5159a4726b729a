"""The `upstox` feed protocol: Upstox Market Data Feed V3, and its REST LTP fallback.

Facts from shared/reference/broker-protocols.md section 1. Symbols are Upstox
instrument keys (`NSE_EQ|INE848E01016`). The socket URL is single-use: every
connect calls `authorize` first (the supervisor's `endpoint` hook), with the
access token in a header; neither the token nor the URL's query (requestId,
code) is ever put in an exception or a log line.

Frames are decoded by the protobuf runtime (upb) with code generated from
Upstox's MarketDataFeedV3.proto and from upstox_wire.proto, which reads
FeedResponse's feeds map as the repeated entries it is on the wire (both
beside this file; scripts/gen-upstox-proto.sh regenerates the code,
benchmarks/upstox_decode.py measures it). Decoding is pure and never raises.
A text frame counts `text`; bytes that are not a FeedResponse count
`bad_frame` once; each feeds entry is judged on its own, as json ticks
batches are (docs/config.md): an entry that is malformed counts `bad_frame`,
one without an LTP `bad_price`, one for a key not subscribed
`unknown_symbol`, and the good entries of the frame still count. Entries
keep their wire order; two entries for one key are two prices.

Malformed is what the runtime refuses anywhere in the entry (framing, a
string that is not UTF-8, nesting too deep), and a field tickguard reads
that came with another wire type. Protobuf keeps such a field as an unknown
field and reads the message as if it were absent, so an entry that does
not make a tick is looked into before its reason is counted: the numbers
tickguard reads, from the entry down to its LTPC, are looked for among the
unknown fields (a schema change never reuses a number that way). An entry
that makes a tick is taken as protobuf reads it. Fields at numbers the
schema does not have are skipped, so additive fields (call auction and the
like) do no harm.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Collection, Sequence
from urllib.parse import urlsplit

import aiohttp
from google.protobuf.unknown_fields import UnknownFieldSet

from tickguard.core import untrusted
from tickguard.errors import FeedError
from tickguard.feed import MarketDataFeedV3_pb2 as v3
from tickguard.feed import protocol as p
from tickguard.feed import upstox_wire_pb2 as wire
from tickguard.replies import BadReply, read_body

TEXT = "text"  # bad-message reason: a text frame where Upstox sends only binary

# FeedResponse.type
INITIAL_FEED = v3.initial_feed
LIVE_FEED = v3.live_feed
MARKET_INFO = v3.market_info

MODE = "ltpc"  # the smallest mode carrying the last price and trade time
AUTHORIZE_PATH = "/v3/feed/market-data-feed/authorize"
LTP_PATH = "/v3/market-quote/ltp"

# The field numbers tickguard reads at each level of MarketDataFeedV3.proto.
_RESPONSE = frozenset({1, 2})  # FeedResponse: type, feeds
_ENTRY = frozenset({1, 2})  # a feeds entry: key, value
_FEED = frozenset({1, 2, 3})  # Feed's oneof: ltpc, fullFeed, firstLevelWithGreeks
_FULL_FEED = frozenset({1, 2})  # FullFeed's oneof: marketFF, indexFF
_HAS_LTPC = frozenset({1})  # MarketFullFeed, IndexFullFeed, FirstLevelWithGreeks: ltpc
_LTPC = frozenset({1, 2})  # LTPC: ltp, ltt

# Bounds within which Decoded.add takes a price and a trade time as they are
# (tickguard.core.untrusted): an entry inside them is a tick and needs no looking into.
_MAX_PRICE = untrusted.MAX_AMOUNT
_MAX_LTT = untrusted.MAX_EPOCH_MS


def _new_guid() -> str:
    return uuid.uuid4().hex


class UpstoxProtocol:
    name = "upstox"

    def __init__(self, guid: Callable[[], str] = _new_guid) -> None:
        self._guid = guid
        # The symbols a tick can name, each to itself, for the `known` they were taken from:
        # the supervisor's subscription, a frozenset replaced (never changed) when it
        # changes, so this is built once per subscription (under 1 ms for 5,000 keys).
        # Any other collection (a test's set) may change between calls: it is read afresh,
        # into a dict of its own, each time.
        self._known: frozenset[str] | None = None
        self._names: dict[str, str] = {}

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
        """One frame: its ticks in wire order, and the reason of each entry that made none.

        An entry of the ltpc mode (or of the full mode) that makes a tick is read
        and checked here, inline, and becomes a `Tick` at once: upb makes each
        value a Python object as it is read, and a double field reads as a float,
        an int64 as an int and a string as a str, so what is left to check is the
        ranges (a NaN fails every comparison) and the key, which `names` maps to
        the subscription's own string. The checks are `Decoded.add`'s for those
        types, and the Tick the one it would make; any other entry takes the long
        way (`_entry`), which counts its reason. A oneof member that is not set
        reads as an empty message, so a price found is one that is there.

        What it costs (benchmarks/upstox_decode.py measures it against the
        runtime's parse and the least reading of the entries anyone does; this
        decode is within about 1.1x of that reading):
        - per entry: upb's parse is the smallest part (about 0.2 µs in the ltpc
          mode). Reading the entry makes the wrappers of the entry, its Feed and
          its LTPC, the key's str, the price and the time: about 1 µs, as for
          any reader. The checks, the key's lookup (its hash computed) and the
          Tick add about a quarter to that. Through `Decoded.add` the checks
          alone were 2 µs;
        - per frame: the parse's setup, the look for misread fields among the
          response's unknown fields (an empty set: FeedEntries declares every
          field FeedResponse has), the Decoded: about 1.5 µs. The loop is
          inline here, not in a function of its own, and the entries are a
          slice of the container, not the container iterated (a sequence
          iterator, ended by an IndexError): each saves about 0.3 µs a frame.

        The key taken is the subscription's own string object (`names`): its
        hash was computed once, and the price book and the guard find it in
        their dicts by identity.
        """
        if isinstance(frame, str):
            return p.Decoded(errors=[TEXT])
        try:
            response: wire.FeedEntries = wire.FeedEntries.FromString(frame)
            unknown = UnknownFieldSet(response)  # none, as Upstox writes a frame
        except Exception:  # DecodeError, or anything else the runtime says of hostile bytes
            return _entry_by_entry(frame, known, p.Decoded())
        if unknown and any(field.field_number in _RESPONSE for field in unknown):
            # e.g. feeds as a varint: its entries would vanish
            return p.Decoded(errors=[p.BAD_FRAME])
        names = self._names if known is self._known else self._names_for(known)
        ticks: list[p.Tick] = []
        # A market_info frame (market status) is a sign of life, without prices.
        out = p.Decoded(ticks, heartbeat=response.type == MARKET_INFO)
        take, symbol_of, tick = ticks.append, names.get, p.Tick
        for entry in response.feeds[:]:
            feed = entry.value
            ltpc = feed.ltpc
            ltp = ltpc.ltp
            if not ltp:
                full = feed.fullFeed
                ltpc = full.marketFF.ltpc
                ltp = ltpc.ltp
                if not ltp:
                    ltpc = full.indexFF.ltpc
                    ltp = ltpc.ltp
            ltt = ltpc.ltt
            symbol = symbol_of(entry.key)
            if symbol is not None and 0.0 < ltp < _MAX_PRICE and 0 < ltt < _MAX_LTT:
                take(tick(symbol, ltp, ltt))
            elif symbol is None and 0.0 < ltp < _MAX_PRICE and 0 < ltt < _MAX_LTT and entry.key:
                # A tick but for its key, which is not subscribed: Upstox goes on sending a
                # key the subscription dropped (nothing unsubscribes it). `_entry`'s answer
                # without its reading the entry again (about 5 µs an entry instead of 9).
                out.errors.append(p.BAD_FRAME if _malformed(entry) else p.UNKNOWN_SYMBOL)
            else:
                _entry(entry, known, out)
        return out

    def _names_for(self, known: Collection[str]) -> dict[str, str]:
        """Each symbol of `known` that can make a tick (not the empty one: `no_symbol`), to
        itself; kept for the next frame when `known` is a frozenset."""
        names = {symbol: symbol for symbol in known if symbol}
        if isinstance(known, frozenset):
            self._names, self._known = names, known
        return names


def _entry_by_entry(frame: bytes, known: Collection[str], out: p.Decoded) -> p.Decoded:
    """A frame the runtime refused whole: split it into entries and judge each alone."""
    try:
        response: wire.FeedFrame = wire.FeedFrame.FromString(frame)
        malformed = _misread(response, _RESPONSE)
    except Exception:  # not even the frame around the entries is protobuf
        malformed = True
    if malformed:
        out.errors.append(p.BAD_FRAME)
        return out
    if response.type == MARKET_INFO:
        out.heartbeat = True
    for raw in response.feeds:
        try:
            entry: wire.FeedEntry = wire.FeedEntry.FromString(raw)
        except Exception:
            out.errors.append(p.BAD_FRAME)
            continue
        _entry(entry, known, out)
    return out


def _entry(entry: wire.FeedEntry, known: Collection[str], out: p.Decoded) -> None:
    """One feeds entry of any shape: its tick, or its one reason for being dropped.

    An entry that makes a tick is taken as protobuf reads it. Any other is
    looked into first: a field tickguard reads that came with another wire
    type, at any level on the way to the LTPC, makes it malformed.
    """
    key = entry.key
    ltpc = _ltpc_of(entry)
    ltp = ltpc.ltp if ltpc is not None else None
    ltt = ltpc.ltt if ltpc is not None else 0
    if not (
        ltp is not None and 0.0 < ltp < _MAX_PRICE and 0 < ltt < _MAX_LTT and key and key in known
    ) and _malformed(entry):
        out.errors.append(p.BAD_FRAME)
        return
    out.add(key, ltp, ltt if ltt > 0 else None, known)


def _ltpc_of(entry: wire.FeedEntry) -> v3.LTPC | None:
    """The LTPC of an entry, wherever its mode put it; None if it has none."""
    feed = entry.value  # an absent value reads as an empty Feed
    member = feed.WhichOneof("FeedUnion")
    if member == "ltpc":
        return feed.ltpc
    holder: v3.MarketFullFeed | v3.IndexFullFeed | v3.FirstLevelWithGreeks
    if member == "fullFeed":
        full = feed.fullFeed
        member = full.WhichOneof("FullFeedUnion")
        if member == "marketFF":
            holder = full.marketFF
        elif member == "indexFF":
            holder = full.indexFF
        else:
            return None
    elif member == "firstLevelWithGreeks":
        holder = feed.firstLevelWithGreeks
    else:
        return None
    return holder.ltpc if holder.HasField("ltpc") else None


def _malformed(entry: wire.FeedEntry) -> bool:
    """Whether a field tickguard reads, from the entry down to the LTPC, has another wire type.

    Protobuf keeps such a field as an unknown field (the message reads as if
    it were absent): at each level the numbers tickguard reads are looked for
    among the unknown fields. Only the message each oneof holds is looked into.
    """
    if _misread(entry, _ENTRY):
        return True
    if not entry.HasField("value"):
        return False
    feed = entry.value
    if _misread(feed, _FEED):
        return True
    member = feed.WhichOneof("FeedUnion")
    holder: v3.MarketFullFeed | v3.IndexFullFeed | v3.FirstLevelWithGreeks
    if member == "ltpc":
        return _misread(feed.ltpc, _LTPC)
    if member == "fullFeed":
        full = feed.fullFeed
        if _misread(full, _FULL_FEED):
            return True
        member = full.WhichOneof("FullFeedUnion")
        if member is None:
            return False
        holder = full.marketFF if member == "marketFF" else full.indexFF
    elif member == "firstLevelWithGreeks":
        holder = feed.firstLevelWithGreeks
    else:
        return False
    if _misread(holder, _HAS_LTPC):
        return True
    return holder.HasField("ltpc") and _misread(holder.ltpc, _LTPC)


def _misread(message: object, numbers: frozenset[int]) -> bool:
    """Whether one of `numbers` is among the message's unknown fields (a wrong wire type);
    unknown fields the runtime cannot list make the message malformed too. A message
    without unknown fields (the usual case) costs the empty set and nothing more."""
    try:
        unknown = UnknownFieldSet(message)
        return bool(unknown) and any(field.field_number in numbers for field in unknown)
    except Exception:
        return True


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
