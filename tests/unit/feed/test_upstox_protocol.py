"""The upstox feed protocol: the `sub` frame, FeedResponse decoding, and the REST LTP body."""

import json
import math
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tickguard.feed import protobuf as pb
from tickguard.feed import protocol as p
from tickguard.feed.upstox import (
    INITIAL_FEED,
    LIVE_FEED,
    MARKET_INFO,
    TEXT,
    UpstoxProtocol,
    decode_ltp,
    ltp_request,
)

RELIANCE = "NSE_EQ|INE002A01018"
HDFC = "NSE_EQ|INE040A01034"
NIFTY = "NSE_INDEX|Nifty 50"
KNOWN = {RELIANCE, HDFC, NIFTY}
LTT = 1767765256123  # epoch ms


# -- FeedResponse encoding (MarketDataFeedV3.proto field numbers) ----------------


def ltpc(
    ltp: float | None = 2500.5, ltt: int | None = LTT, ltq: int = 10, cp: float = 2490.0
) -> bytes:
    out = b"" if ltp is None else pb.double_field(1, ltp)
    out += b"" if ltt is None else pb.varint_field(2, ltt)
    return out + pb.varint_field(3, ltq) + pb.double_field(4, cp)


def feed_ltpc(body: bytes) -> bytes:
    return pb.bytes_field(1, body)


def feed_market_ff(body: bytes) -> bytes:
    market_ff = pb.bytes_field(1, body) + pb.double_field(5, 2499.9) + pb.varint_field(6, 123456)
    return pb.bytes_field(2, pb.bytes_field(1, market_ff))


def feed_index_ff(body: bytes) -> bytes:
    ohlc = pb.string_field(1, "1d") + pb.double_field(2, 24000.0)
    index_ff = pb.bytes_field(1, body) + pb.bytes_field(2, pb.bytes_field(1, ohlc))
    return pb.bytes_field(2, pb.bytes_field(2, index_ff))


def feed_greeks(body: bytes) -> bytes:
    greeks = pb.double_field(1, 0.5) + pb.double_field(2, -1.25)
    first = pb.bytes_field(1, body) + pb.bytes_field(3, greeks) + pb.double_field(5, 1e6)
    return pb.bytes_field(3, first)


def entry(key: str, feed: bytes) -> bytes:
    return pb.bytes_field(2, pb.string_field(1, key) + pb.bytes_field(2, feed))


def response(kind: int, *entries: bytes, current_ts: int = LTT + 5) -> bytes:
    return pb.varint_field(1, kind) + b"".join(entries) + pb.varint_field(3, current_ts)


def market_info() -> bytes:
    status = pb.bytes_field(1, pb.string_field(1, "NSE_EQ") + pb.varint_field(2, 2))
    return response(MARKET_INFO, pb.bytes_field(4, status))


def decode(frame: str | bytes, known: set[str] = KNOWN) -> p.Decoded:
    return UpstoxProtocol().decode(frame, known)


# -- subscribing -------------------------------------------------------------------


def test_subscribe_frame_is_binary_json_sub_in_ltpc_mode() -> None:
    """One binary frame: the UTF-8 JSON `sub` request with a uuid4 guid, ltpc mode, every key."""
    protocol = UpstoxProtocol(guid=lambda: "0123456789abcdef0123456789abcdef")
    assert protocol.subscribe_frames([RELIANCE, NIFTY]) == [
        b'{"guid":"0123456789abcdef0123456789abcdef","method":"sub",'
        b'"data":{"mode":"ltpc","instrumentKeys":["NSE_EQ|INE002A01018","NSE_INDEX|Nifty 50"]}}'
    ]


def test_each_subscribe_has_a_fresh_uuid4_guid() -> None:
    """Without an injected guid each request carries a new uuid4 in hex."""
    protocol = UpstoxProtocol()
    guids = []
    for _ in range(2):
        (frame,) = protocol.subscribe_frames([RELIANCE])
        assert isinstance(frame, bytes)
        guids.append(json.loads(frame)["guid"])
    assert guids[0] != guids[1]
    assert all(len(g) == 32 and g[12] == "4" for g in guids)


def test_add_frames_subscribe_only_the_added_keys() -> None:
    """Extending a live subscription sends a `sub` naming just the new keys."""
    protocol = UpstoxProtocol(guid=lambda: "g")
    (frame,) = protocol.add_frames([HDFC, RELIANCE], [HDFC])
    assert isinstance(frame, bytes)
    assert json.loads(frame)["data"] == {"mode": "ltpc", "instrumentKeys": [HDFC]}


def test_no_symbols_means_no_subscribe_frame() -> None:
    """An empty key list sends nothing (Upstox refuses an empty `sub`)."""
    assert UpstoxProtocol().subscribe_frames([]) == []


# -- decoding ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "shape", [feed_ltpc, feed_market_ff, feed_index_ff, feed_greeks], ids=lambda f: f.__name__
)
def test_each_feed_shape_gives_its_ltp_and_trade_time(shape: object) -> None:
    """LTPC is found at feed.ltpc, fullFeed.marketFF/indexFF.ltpc and firstLevelWithGreeks.ltpc."""
    assert callable(shape)
    out = decode(response(LIVE_FEED, entry(RELIANCE, shape(ltpc(2500.5, LTT)))))
    assert out == p.Decoded(ticks=[p.Tick(RELIANCE, 2500.5, LTT)])


def test_initial_feed_snapshot_gives_every_subscribed_key() -> None:
    """The snapshot after a `sub` is a FeedResponse of type initial_feed with one entry per key."""
    frame = response(
        INITIAL_FEED,
        entry(RELIANCE, feed_ltpc(ltpc(2500.5))),
        entry(HDFC, feed_market_ff(ltpc(1650.25, LTT + 1))),
        entry(NIFTY, feed_index_ff(ltpc(24010.0, LTT + 2))),
    )
    out = decode(frame)
    assert out.errors == []
    assert out.ticks == [
        p.Tick(RELIANCE, 2500.5, LTT),
        p.Tick(HDFC, 1650.25, LTT + 1),
        p.Tick(NIFTY, 24010.0, LTT + 2),
    ]


def test_type_defaults_to_initial_feed_when_absent() -> None:
    """proto3 omits a zero enum: a response with only feeds still gives ticks."""
    out = decode(entry(RELIANCE, feed_ltpc(ltpc())))
    assert out.ticks == [p.Tick(RELIANCE, 2500.5, LTT)]


def test_market_info_is_a_heartbeat_without_prices() -> None:
    """A market_info frame proves liveness: heartbeat, no ticks, no errors."""
    assert decode(market_info()) == p.Decoded(heartbeat=True)


@pytest.mark.parametrize("ltt", [None, 0, -5])
def test_a_missing_or_non_positive_trade_time_gives_no_exchange_time(ltt: int | None) -> None:
    """ltt absent, 0 or negative: the tick counts with exchange_ts None."""
    out = decode(response(LIVE_FEED, entry(RELIANCE, feed_ltpc(ltpc(ltt=ltt)))))
    assert out.ticks == [p.Tick(RELIANCE, 2500.5, None)]


@pytest.mark.parametrize("ltp", [None, 0.0, -1.5, math.nan, math.inf, -math.inf])
def test_a_bad_or_missing_ltp_is_counted_bad_price(ltp: float | None) -> None:
    """An entry whose ltp is absent, zero, negative or not finite is dropped as bad_price."""
    frame = response(
        LIVE_FEED, entry(RELIANCE, feed_ltpc(ltpc(ltp))), entry(HDFC, feed_ltpc(ltpc(9.5)))
    )
    out = decode(frame)
    assert out.errors == [p.BAD_PRICE]
    assert out.ticks == [p.Tick(HDFC, 9.5, LTT)]


def test_a_feed_without_ltpc_is_counted_bad_price() -> None:
    """A feed entry carrying none of the LTPC-bearing shapes has no price."""
    only_mode = pb.varint_field(4, 1)  # requestMode alone
    out = decode(response(LIVE_FEED, entry(RELIANCE, only_mode), entry(HDFC, b"")))
    assert out.errors == [p.BAD_PRICE, p.BAD_PRICE]


def test_keys_not_subscribed_are_counted_unknown_symbol() -> None:
    """Ticks for instrument keys outside `known` are dropped as unknown_symbol."""
    frame = response(LIVE_FEED, entry("BSE_EQ|INE000X00000", feed_ltpc(ltpc())))
    assert decode(frame) == p.Decoded(errors=[p.UNKNOWN_SYMBOL])


def test_an_entry_without_a_key_is_counted_no_symbol() -> None:
    """A map entry whose key is absent (proto3's empty string) is dropped as no_symbol."""
    frame = response(LIVE_FEED, pb.bytes_field(2, pb.bytes_field(2, feed_ltpc(ltpc()))))
    assert decode(frame) == p.Decoded(errors=[p.NO_SYMBOL])


def test_unknown_fields_at_new_numbers_are_skipped_at_every_level() -> None:
    """Additive fields of any wire type, in the response, entry, feed, shapes and LTPC, do no harm."""
    extras = (
        pb.varint_field(15, 3)
        + pb.double_field(16, 1.0)
        + pb.string_field(17, "CAS")
        + pb.fixed32_field(18, b"\x00\x00\x80?")
        + pb.bytes_field(1000, b"\x08\x01")
    )
    body = extras + ltpc(2500.5, LTT) + extras
    market_ff = extras + pb.bytes_field(1, body) + pb.bytes_field(11, b"iep")
    full = extras + pb.bytes_field(1, market_ff)
    feed = extras + pb.bytes_field(2, full) + pb.varint_field(4, 1)
    map_entry = pb.string_field(1, RELIANCE) + extras + pb.bytes_field(2, feed)
    frame = extras + pb.varint_field(1, LIVE_FEED) + pb.bytes_field(2, map_entry) + extras
    assert decode(frame) == p.Decoded(ticks=[p.Tick(RELIANCE, 2500.5, LTT)])


def test_unknown_type_values_still_give_ticks() -> None:
    """A response type this decoder does not know (an open enum) is decoded, not a heartbeat."""
    out = decode(response(7, entry(RELIANCE, feed_ltpc(ltpc()))))
    assert out == p.Decoded(ticks=[p.Tick(RELIANCE, 2500.5, LTT)])


def test_repeated_singular_fields_merge_as_protobuf_does() -> None:
    """The last scalar wins, and two ltpc occurrences merge (ltt from the first, ltp from the second)."""
    first = pb.double_field(1, 1.0) + pb.varint_field(2, LTT)
    second = pb.double_field(1, 2.0)
    feed = feed_ltpc(first) + feed_ltpc(second)
    out = decode(response(LIVE_FEED, entry(RELIANCE, feed)))
    assert out.ticks == [p.Tick(RELIANCE, 2.0, LTT)]


def test_the_last_oneof_member_on_the_wire_wins() -> None:
    """A feed carrying ltpc and then fullFeed is read as the fullFeed, as protobuf sets a oneof."""
    feed = feed_ltpc(ltpc(1.0)) + feed_market_ff(ltpc(3.0))
    out = decode(response(LIVE_FEED, entry(RELIANCE, feed)))
    assert out.ticks == [p.Tick(RELIANCE, 3.0, LTT)]


def test_a_text_frame_is_counted_text() -> None:
    """Upstox sends only binary frames: a text frame is dropped as `text`."""
    assert decode('{"type":"live_feed"}') == p.Decoded(errors=[TEXT])


@pytest.mark.parametrize(
    "frame",
    [
        response(LIVE_FEED, entry(RELIANCE, feed_ltpc(ltpc())))[:-3],  # truncated
        b"\x12\xff\xff\xff\xff\x0f",  # a 4 GiB length
        b"\x0b\x0c",  # groups
        b"\xff" * 12,  # an endless varint
        pb.double_field(1, 1.0),  # type with the wrong wire type
        pb.varint_field(2, 5),  # feeds with the wrong wire type
        b"hello, world",
    ],
    ids=["truncated", "huge-length", "groups", "varint", "type-wire", "feeds-wire", "text-bytes"],
)
def test_bytes_that_are_not_a_feed_response_count_one_bad_frame(frame: bytes) -> None:
    """Truncated or garbage bytes drop the whole frame as one bad_frame."""
    assert decode(frame) == p.Decoded(errors=[p.BAD_FRAME])


def test_a_malformed_entry_counts_bad_frame_and_the_good_entries_still_count() -> None:
    """A feeds entry whose inner bytes are broken is dropped alone, like a bad tick in a batch."""
    broken_ltpc = pb.bytes_field(1, b"\x09\x00")  # ltp: I64 with 1 byte
    wrong_wire = pb.bytes_field(1, pb.varint_field(1, 2500))  # ltp as a varint
    bad_key = pb.bytes_field(2, pb.bytes_field(1, b"\xff\xfe") + pb.bytes_field(2, b""))
    frame = response(
        LIVE_FEED,
        entry(RELIANCE, broken_ltpc),
        entry(NIFTY, feed_ltpc(wrong_wire)),
        bad_key,
        entry(HDFC, feed_greeks(ltpc(1650.0))),
    )
    out = decode(frame)
    assert out.errors == [p.BAD_FRAME, p.BAD_FRAME, p.BAD_FRAME]
    assert out.ticks == [p.Tick(HDFC, 1650.0, LTT)]


@given(st.binary(max_size=300))
def test_decode_never_raises_on_arbitrary_bytes(data: bytes) -> None:
    """Any bytes give a Decoded (ticks, errors or nothing), never an exception."""
    out = decode(data)
    assert all(t.symbol in KNOWN and t.price > 0 for t in out.ticks)


_VALID = response(
    LIVE_FEED,
    entry(RELIANCE, feed_market_ff(ltpc())),
    entry(NIFTY, feed_index_ff(ltpc(24000.0))),
    entry(HDFC, feed_greeks(ltpc(1650.0))),
)


@given(st.integers(0, len(_VALID) - 1), st.integers(0, 255), st.integers(0, len(_VALID)))
def test_decode_never_raises_on_a_corrupted_valid_frame(at: int, byte: int, cut: int) -> None:
    """A real frame with one byte changed and then cut anywhere still decodes without raising."""
    frame = (_VALID[:at] + bytes([byte]) + _VALID[at + 1 :])[:cut]
    out = decode(frame)
    assert all(math.isfinite(t.price) and t.price > 0 for t in out.ticks)


# -- the REST LTP fallback -------------------------------------------------------


def test_ltp_request_names_every_key_comma_separated() -> None:
    """The LTP quote is GET {api_url}/v3/market-quote/ltp?instrument_key=A,B."""
    assert ltp_request("https://api.upstox.com/", [RELIANCE, NIFTY]) == (
        "https://api.upstox.com/v3/market-quote/ltp",
        {"instrument_key": f"{RELIANCE},{NIFTY}"},
    )


def test_decode_ltp_matches_on_instrument_token_not_the_map_key() -> None:
    """The data map's keys (`NSE_EQ:RELIANCE`) are ignored; instrument_token names the symbol."""
    body = {
        "status": "success",
        "data": {
            "NSE_EQ:RELIANCE": {
                "last_price": 2500.5,
                "instrument_token": RELIANCE,
                "ltq": 3,
                "volume": 12345,
                "cp": 2490.0,
            },
            "NSE_INDEX:Nifty 50": {"last_price": 24000, "instrument_token": NIFTY},
        },
    }
    assert decode_ltp(body, KNOWN) == p.Decoded(
        ticks=[p.Tick(RELIANCE, 2500.5, None), p.Tick(NIFTY, 24000.0, None)]
    )


def test_decode_ltp_counts_each_bad_quote() -> None:
    """Quotes that are not objects, lack instrument_token, have a bad price or are unknown are counted."""
    body = {
        "status": "success",
        "data": {
            "a": [],
            "b": {"last_price": 1.0},
            "c": {"last_price": "1.0", "instrument_token": RELIANCE},
            "d": {"last_price": True, "instrument_token": RELIANCE},
            "e": {"last_price": 1.0, "instrument_token": "NSE_EQ|INE999Z99999"},
            "f": {"last_price": 5.0, "instrument_token": HDFC},
        },
    }
    out = decode_ltp(body, KNOWN)
    assert out.errors == [p.NOT_OBJECT, p.NO_SYMBOL, p.BAD_PRICE, p.BAD_PRICE, p.UNKNOWN_SYMBOL]
    assert out.ticks == [p.Tick(HDFC, 5.0, None)]


@pytest.mark.parametrize(
    "body",
    [
        None,
        [],
        {"status": "error", "errors": [{"errorCode": "UDAPI100050"}]},
        {"status": "success", "data": []},
        {"data": {}},
    ],
)
def test_decode_ltp_refuses_bodies_that_are_not_a_success(body: object) -> None:
    """An error body or one without a data object is one not_object and no ticks."""
    assert decode_ltp(body, KNOWN) == p.Decoded(errors=[p.NOT_OBJECT])


def test_float32_bytes_in_an_unknown_field_do_not_shift_the_ltp() -> None:
    """An I32 field before ltp is skipped by its 4 bytes exactly."""
    body = pb.fixed32_field(9, struct.pack("<f", 7.0)) + ltpc(12.5)
    assert decode(response(LIVE_FEED, entry(RELIANCE, feed_ltpc(body)))).ticks == [
        p.Tick(RELIANCE, 12.5, LTT)
    ]
