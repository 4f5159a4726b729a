"""Answers from HTTP servers outside (the REST poll, the brokers): read bounded, parsed totally.

A server can answer with anything: a body of gigabytes, JSON nested a
million deep, integers of thousands of digits. `read_json` reads at most
`limit` bytes (after decompression) and turns every kind of bad body into
one `BadReply`, a ValueError, so callers handle a hostile answer as they
handle an unreachable server.
"""

from __future__ import annotations

import aiohttp

from tickguard.core import untrusted

MAX_REPLY_BYTES = 8 << 20  # a poll of 5,000 symbols answers about 0.4 MB
_CHUNK = 64 << 10


class BadReply(ValueError):
    """The body is too large or not JSON."""


async def read_body(response: aiohttp.ClientResponse, limit: int = MAX_REPLY_BYTES) -> bytes:
    """The whole body, or BadReply once it passes `limit` bytes (nothing more is read)."""
    if response.content_length is not None and response.content_length > limit:
        raise BadReply(f"a body of {response.content_length} bytes (limit {limit})")
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.content.iter_chunked(_CHUNK):
        size += len(chunk)
        if size > limit:
            raise BadReply(f"a body over {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def read_json(response: aiohttp.ClientResponse, limit: int = MAX_REPLY_BYTES) -> object:
    """The body as JSON (any value; None when empty), or BadReply."""
    raw = await read_body(response, limit)
    if not raw.strip():
        return None
    try:
        return untrusted.parse_json(raw)
    except ValueError as exc:
        raise BadReply(f"a body that is not JSON ({untrusted.shown(str(exc))})") from None
