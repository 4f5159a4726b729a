"""The `json` feed protocol v1 (docs/config.md): for custom feeds and the simulator."""

from __future__ import annotations

import json
from collections.abc import Collection, Sequence

from tickguard.feed import protocol as p


class JsonProtocol:
    name = "json"

    def subscribe_frames(self, symbols: Sequence[str]) -> list[str | bytes]:
        return [json.dumps({"op": "subscribe", "symbols": list(symbols)})]

    def add_frames(self, symbols: Sequence[str], added: Sequence[str]) -> list[str | bytes]:
        # A json-protocol subscribe names the whole set.
        return self.subscribe_frames(symbols)

    def decode(self, frame: str | bytes, known: Collection[str]) -> p.Decoded:
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
