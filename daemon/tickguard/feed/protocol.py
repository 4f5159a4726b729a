"""The seam between a feed's wire format and the rest of tickguard.

A protocol turns a symbol list into subscribe frames and each received frame
into ticks, a heartbeat, or counted errors. It never raises on bad input:
a malformed frame is reported by reason, dropped, and the connection stays.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Protocol

import msgspec

from tickguard.core import untrusted

# Bad-message reasons, the `reason` label of tickguard_feed_bad_messages_total.
BINARY = "binary"
NOT_JSON = "not_json"
NOT_OBJECT = "not_object"
NO_TYPE = "no_type"
NO_SYMBOL = "no_symbol"
BAD_PRICE = "bad_price"
BAD_TIMESTAMP = "bad_timestamp"
UNKNOWN_SYMBOL = "unknown_symbol"
TOO_LARGE = "too_large"
BAD_FRAME = "bad_frame"  # a frame the protocol cannot decode at all (e.g. bad protobuf)


# The checks of `Decoded.add` as types msgspec checks in C while it decodes (feed protocols
# that decode with msgspec use them): a symbol is a non-empty string; a price a number (not
# a bool) with 0 < x < MAX_AMOUNT, so finite; an exchange time an integer with
# 0 <= ms < MAX_EPOCH_MS. The bounds are untrusted's, so the two cannot drift apart.
Symbol = Annotated[str, msgspec.Meta(min_length=1)]
Amount = Annotated[float, msgspec.Meta(gt=0, lt=untrusted.MAX_AMOUNT)]
EpochMs = Annotated[int, msgspec.Meta(ge=0, lt=untrusted.MAX_EPOCH_MS)]


class Tick(msgspec.Struct, frozen=True, gc=False, forbid_unknown_fields=True):
    """One price entry. A msgspec struct: made in C, also by the decoder of a `json`
    protocol entry (`{"symbol", "price", "ts"}`, nothing else), which checks its fields
    against the types above as it makes it. Made from Python, its fields are not checked:
    `Decoded.add` does that.

    Ticks are equal when their fields are, whatever their class: a decoder may make
    them of a subclass that narrows `symbol` (tickguard.feed.json_protocol)."""

    symbol: Symbol
    price: Amount
    exchange_ts: EpochMs | None = msgspec.field(default=None, name="ts")  # epoch milliseconds

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Tick):
            return NotImplemented
        return (self.symbol, self.price, self.exchange_ts) == (
            other.symbol,
            other.price,
            other.exchange_ts,
        )

    def __hash__(self) -> int:
        return hash((self.symbol, self.price, self.exchange_ts))


class Decoded(msgspec.Struct, gc=False):
    """What one frame carried."""

    ticks: list[Tick] = []
    errors: list[str] = []  # one reason per dropped frame or entry
    heartbeat: bool = False  # a sign of life without prices

    def add(
        self, symbol: object, price: object, exchange_ts: object, known: Collection[str]
    ) -> None:
        """One price entry, as received: a tick, or its one counted reason for being dropped."""
        if not isinstance(symbol, str) or not symbol:
            self.errors.append(NO_SYMBOL)
            return
        value = untrusted.amount(price)
        if value is None:
            self.errors.append(BAD_PRICE)
            return
        ok, ts = untrusted.epoch_ms(exchange_ts)
        if not ok:
            self.errors.append(BAD_TIMESTAMP)
            return
        if symbol not in known:
            self.errors.append(UNKNOWN_SYMBOL)
            return
        self.ticks.append(Tick(symbol, value, ts))


class FeedProtocol(Protocol):
    name: str

    def subscribe_frames(self, symbols: Sequence[str]) -> list[str | bytes]:
        """Frames to send after connecting (and after every reconnect)."""
        ...

    def decode(self, frame: str | bytes, known: Collection[str]) -> Decoded:
        """One received frame; ticks for symbols outside `known` are dropped."""
        ...

    def add_frames(self, symbols: Sequence[str], added: Sequence[str]) -> list[str | bytes]:
        """Frames that extend a live subscription to `added` (`symbols` is the whole set)."""
        ...


@dataclass(frozen=True, slots=True)
class PollSource:
    """Where and how the REST fallback asks for prices, for one feed protocol."""

    url: str
    params: Callable[[Sequence[str]], dict[str, str]]  # query parameters for these symbols
    decode: Callable[[object, Collection[str]], Decoded]  # the JSON answer -> ticks and errors
    headers: Mapping[str, str] = field(default_factory=dict)  # e.g. Authorization (never logged)
