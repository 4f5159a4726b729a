"""The `json` feed protocol v1 (docs/config.md): for custom feeds and the simulator.

A frame is decoded in one of two ways, with one result:

- the fast path: msgspec decodes the frame straight into `_Frame` and `Tick`
  structs, checking every entry's fields in C as it goes (the types in
  tickguard.feed.protocol). It takes only frames made of exactly the fields of
  the protocol, every one of them valid: the decoder stops at the first thing
  it does not like, whatever it is (a bad or missing field, a field it does not
  know, a NaN or Infinity literal, a lone surrogate, a number out of range);
- the checked path, for every frame the fast one refuses: `json.loads` and
  `Decoded.add` per entry, so each dropped entry is counted by its reason and
  the good entries of a batch are still taken.

Unknown fields send a frame to the checked path because msgspec skips them
without parsing them as `json.loads` would: a 5,000-digit integer or a nesting
too deep there is `not_json` for the checked path, and must stay so. A frame
both paths take gives both the same ticks (tests/unit/feed/test_json_protocol.py
holds them to it).

When the symbols known are a frozenset (the supervisor's subscription: replaced,
never changed), the fast decoder checks each symbol against them too, as a
`Literal`: a symbol not subscribed sends its frame to the checked path, which
counts it, and a symbol taken is the subscription's own string object, its hash
computed once, so every later dict lookup of it (the price book, the guard)
finds it by identity. A decoder for 5,000 symbols takes about 7 ms to build,
once per subscription. Otherwise (any other collection) the fast path looks
each symbol up in `known` in Python.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Collection, Sequence
from typing import Any, Literal

import msgspec

from tickguard.feed import protocol as p


class _Frame(msgspec.Struct, gc=False, forbid_unknown_fields=True):
    """A well-formed frame: any `type`, and the fields of a `tick` or a `ticks` frame."""

    type: str
    ticks: list[p.Tick] | None = None  # `ticks`
    symbol: p.Symbol | None = None  # `tick`, with price and ts
    price: p.Amount | None = None
    ts: p.EpochMs | None = None


FrameDecoder = Callable[[str], _Frame]
_decode_frame: FrameDecoder = msgspec.json.Decoder(_Frame).decode


def _decoder_for(known: frozenset[str]) -> FrameDecoder | None:
    """A fast decoder that takes only the symbols of `known` (see the module docstring);
    None for no symbols (a Literal needs one)."""
    names = tuple(s for s in known if s)  # an empty symbol is `no_symbol`, known or not
    if not names:
        return None
    symbol: Any = Literal[names]  # the decoder returns these very string objects
    tick = msgspec.defstruct(
        "Tick",
        [("symbol", symbol), ("price", p.Amount), ("exchange_ts", p.EpochMs | None, None)],
        bases=(p.Tick,),
        rename={"exchange_ts": "ts"},
        frozen=True,
        gc=False,
        forbid_unknown_fields=True,
    )
    frame = msgspec.defstruct(
        "Frame",
        [("ticks", list[tick] | None, None), ("symbol", symbol | None, None)],  # type: ignore[valid-type]
        bases=(_Frame,),
        gc=False,
        forbid_unknown_fields=True,
    )
    decoder: FrameDecoder = msgspec.json.Decoder(frame).decode  # type: ignore[assignment]
    return decoder


class JsonProtocol:
    name = "json"

    def __init__(self) -> None:
        self._known: frozenset[str] | None = None  # what _decode was built for
        self._decode: FrameDecoder | None = None

    def subscribe_frames(self, symbols: Sequence[str]) -> list[str | bytes]:
        return [json.dumps({"op": "subscribe", "symbols": list(symbols)})]

    def add_frames(self, symbols: Sequence[str], added: Sequence[str]) -> list[str | bytes]:
        # A json-protocol subscribe names the whole set.
        return self.subscribe_frames(symbols)

    def decode(self, frame: str | bytes, known: Collection[str]) -> p.Decoded:
        if isinstance(frame, str):
            if known is not self._known and isinstance(known, frozenset):
                self._decode, self._known = _decoder_for(known), known
            by_symbol = self._decode if known is self._known else None
            try:
                message = (by_symbol or _decode_frame)(frame)
            except (msgspec.DecodeError, RecursionError):  # ValidationError is a DecodeError
                pass
            else:
                fast = _well_formed(message, None if by_symbol else known)
                if fast is not None:
                    return fast
        return _checked(frame, known)


def _well_formed(message: _Frame, known: Collection[str] | None) -> p.Decoded | None:
    """What a frame the fast decoder took carried; None sends it to the checked path.
    `known`: the symbols to look each one up in, None when the decoder checked them."""
    kind = message.type
    if kind == "ticks":
        ticks = message.ticks
        if ticks is None:
            return None
    elif kind == "tick":
        symbol, price = message.symbol, message.price
        if symbol is None or price is None:
            return None
        ticks = [p.Tick(symbol, price, message.ts)]
    elif kind == "heartbeat":
        return p.Decoded(heartbeat=True)
    else:
        return p.Decoded()  # any other type is ignored (docs/config.md)
    if known is None or all(tick.symbol in known for tick in ticks):
        return p.Decoded(ticks)
    kept = [tick for tick in ticks if tick.symbol in known]
    return p.Decoded(kept, [p.UNKNOWN_SYMBOL] * (len(ticks) - len(kept)))


def _checked(frame: str | bytes, known: Collection[str]) -> p.Decoded:
    """Any frame, judged field by field: every dropped entry counted by its reason."""
    out = p.Decoded()
    if isinstance(frame, bytes):
        out.errors.append(p.BINARY)
        return out
    try:
        message = json.loads(frame, parse_constant=_reject_constant)
    except (ValueError, RecursionError):
        out.errors.append(p.NOT_JSON)
        return out
    if not isinstance(message, dict):
        out.errors.append(p.NOT_OBJECT)
        return out
    kind = message.get("type")
    if not isinstance(kind, str):
        out.errors.append(p.NO_TYPE)
    elif kind == "heartbeat":
        out.heartbeat = True
    elif kind == "tick":
        _entry(message, known, out)
    elif kind == "ticks":
        entries = message.get("ticks")
        if not isinstance(entries, list):
            out.errors.append(p.NOT_OBJECT)
        else:
            for entry in entries:
                _entry(entry, known, out)
    # any other type is ignored (docs/config.md)
    return out


def _reject_constant(name: str) -> float:
    # NaN, Infinity and -Infinity are not JSON numbers: refuse them as bad prices
    # rather than let them through as floats.
    return float("nan")


def _entry(entry: object, known: Collection[str], out: p.Decoded) -> None:
    if not isinstance(entry, dict):
        out.errors.append(p.NOT_OBJECT)
        return
    out.add(entry.get("symbol"), entry.get("price"), entry.get("ts"), known)


def decode_poll(body: object, known: Collection[str]) -> p.Decoded:
    """The REST fallback's answer: `{"prices": {"A": {"price": 1.0, "ts": 1767765256123}}}`."""
    out = p.Decoded()
    prices = body.get("prices") if isinstance(body, dict) else None
    if not isinstance(prices, dict):
        out.errors.append(p.NOT_OBJECT)
        return out
    for symbol, entry in prices.items():
        if isinstance(entry, dict):
            _entry({"symbol": symbol, **entry}, known, out)
        else:
            out.errors.append(p.NOT_OBJECT)
    return out


def poll_source(url: str) -> p.PollSource:
    """The `json` protocol's REST fallback: `GET <url>?symbols=A,B`."""
    return p.PollSource(url, lambda symbols: {"symbols": ",".join(symbols)}, decode_poll)
