"""The upstox feed protocol: the `sub` frame, FeedResponse decoding, and the REST LTP body.

Well-formed frames are written by the protobuf runtime from the code generated
for Upstox's MarketDataFeedV3.proto, as Upstox's own encoder writes them.
What no encoder writes (wrong wire types, truncation, garbage) is built by
hand with the few raw-bytes helpers below.
"""

import json
import math
import struct
from collections.abc import Collection

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tickguard.feed import MarketDataFeedV3_pb2 as v3
from tickguard.feed import protocol as p
from tickguard.feed import upstox
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


# -- FeedResponse frames, written by the protobuf runtime --------------------------


def ltpc(ltp: float = 2500.5, ltt: int = LTT, ltq: int = 10, cp: float = 2490.0) -> v3.LTPC:
    return v3.LTPC(ltp=ltp, ltt=ltt, ltq=ltq, cp=cp)


def feed_ltpc(body: v3.LTPC) -> v3.Feed:
    return v3.Feed(ltpc=body)


def feed_market_ff(body: v3.LTPC) -> v3.Feed:
    depth = v3.MarketLevel(bidAskQuote=[v3.Quote(bidQ=5, bidP=2499.95, askQ=7, askP=2500.05)])
    market = v3.MarketFullFeed(ltpc=body, marketLevel=depth, atp=2499.9, vtt=123456)
    return v3.Feed(fullFeed=v3.FullFeed(marketFF=market), requestMode=v3.full_d5)


def feed_index_ff(body: v3.LTPC) -> v3.Feed:
    bars = v3.MarketOHLC(ohlc=[v3.OHLC(interval="1d", open=24000.0, close=24010.0)])
    index = v3.IndexFullFeed(ltpc=body, marketOHLC=bars)
    return v3.Feed(fullFeed=v3.FullFeed(indexFF=index), requestMode=v3.full_d5)


def feed_greeks(body: v3.LTPC) -> v3.Feed:
    greeks = v3.OptionGreeks(delta=0.5, theta=-1.25)
    first = v3.FirstLevelWithGreeks(ltpc=body, optionGreeks=greeks, oi=1e6)
    return v3.Feed(firstLevelWithGreeks=first, requestMode=v3.option_greeks)


def entry(key: str, feed: v3.Feed | bytes) -> bytes:
    """One feeds map entry as the runtime writes it (raw bytes for a broken Feed)."""
    if isinstance(feed, bytes):
        return raw_bytes(2, raw_bytes(1, key.encode()) + raw_bytes(2, feed))
    return v3.FeedResponse(feeds={key: feed}).SerializeToString()


def response(kind: int, *entries: bytes, current_ts: int = LTT + 5) -> bytes:
    """A FeedResponse with `entries` in this order: the runtime writes a map in hash order,
    so each entry is serialized alone, and concatenated messages are their merge."""
    head = v3.FeedResponse(type=kind).SerializeToString()
    return head + b"".join(entries) + v3.FeedResponse(currentTs=current_ts).SerializeToString()


def market_info() -> bytes:
    info = v3.MarketInfo(segmentStatus={"NSE_EQ": v3.NORMAL_OPEN, "NSE_FO": v3.NORMAL_CLOSE})
    return v3.FeedResponse(type=MARKET_INFO, marketInfo=info, currentTs=LTT).SerializeToString()


# -- raw wire bytes, for what the protobuf runtime never writes -------------------


def varint(value: int) -> bytes:
    """A varint; negative values as their 64-bit two's complement."""
    value &= (1 << 64) - 1
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def raw_varint(number: int, value: int) -> bytes:
    return varint(number << 3) + varint(value)


def raw_double(number: int, value: float) -> bytes:
    return varint(number << 3 | 1) + struct.pack("<d", value)


def raw_fixed32(number: int, value: bytes) -> bytes:
    return varint(number << 3 | 5) + value


def raw_bytes(number: int, value: bytes) -> bytes:
    return varint(number << 3 | 2) + varint(len(value)) + value


def raw_string(number: int, value: str) -> bytes:
    return raw_bytes(number, value.encode())


def decode(frame: str | bytes, known: Collection[str] = KNOWN) -> p.Decoded:
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


def test_a_map_written_whole_by_the_runtime_gives_every_entry() -> None:
    """A FeedResponse whose feeds map the runtime serialized at once: every key, each once."""
    prices = {f"NSE_EQ|INE{i:06d}A01018": 100.0 + i for i in range(50)}
    whole = v3.FeedResponse(type=LIVE_FEED, currentTs=LTT)
    for key, price in prices.items():
        whole.feeds[key].ltpc.CopyFrom(ltpc(price))
    out = decode(whole.SerializeToString(), set(prices))
    assert out.errors == []
    assert sorted(out.ticks, key=lambda t: t.symbol) == [
        p.Tick(key, price, LTT) for key, price in sorted(prices.items())
    ]


def test_ticks_keep_wire_order_and_a_repeated_key_gives_two_prices() -> None:
    """Entries are read in the order they arrived, each on its own, as the map's wire form is."""
    frame = response(
        LIVE_FEED,
        entry(NIFTY, feed_ltpc(ltpc(24000.0, LTT))),
        entry(RELIANCE, feed_ltpc(ltpc(2500.0, LTT + 1))),
        entry(NIFTY, feed_ltpc(ltpc(24001.0, LTT + 2))),
    )
    assert decode(frame).ticks == [
        p.Tick(NIFTY, 24000.0, LTT),
        p.Tick(RELIANCE, 2500.0, LTT + 1),
        p.Tick(NIFTY, 24001.0, LTT + 2),
    ]


def test_type_defaults_to_initial_feed_when_absent() -> None:
    """proto3 omits a zero enum: a response with only feeds still gives ticks."""
    out = decode(entry(RELIANCE, feed_ltpc(ltpc())))
    assert out.ticks == [p.Tick(RELIANCE, 2500.5, LTT)]


def test_market_info_is_a_heartbeat_without_prices() -> None:
    """A market_info frame proves liveness: heartbeat, no ticks, no errors."""
    assert decode(market_info()) == p.Decoded(heartbeat=True)


@pytest.mark.parametrize("ltt", [0, -5])
def test_a_missing_or_non_positive_trade_time_gives_no_exchange_time(ltt: int) -> None:
    """ltt absent (proto3's 0) or negative: the tick counts with exchange_ts None."""
    out = decode(response(LIVE_FEED, entry(RELIANCE, feed_ltpc(ltpc(ltt=ltt)))))
    assert out.ticks == [p.Tick(RELIANCE, 2500.5, None)]


def test_a_trade_time_past_any_epoch_ms_is_counted_bad_timestamp() -> None:
    """An ltt beyond 2**53 ms is no exchange time: the entry is dropped as bad_timestamp."""
    out = decode(response(LIVE_FEED, entry(RELIANCE, feed_ltpc(ltpc(ltt=1 << 62)))))
    assert out == p.Decoded(errors=[p.BAD_TIMESTAMP])


@pytest.mark.parametrize("ltp", [0.0, -0.0, -1.5, math.nan, math.inf, -math.inf, 1e300])
def test_a_bad_or_missing_ltp_is_counted_bad_price(ltp: float) -> None:
    """An entry whose ltp is absent (0), negative, not finite or absurd is dropped as bad_price."""
    frame = response(
        LIVE_FEED, entry(RELIANCE, feed_ltpc(ltpc(ltp))), entry(HDFC, feed_ltpc(ltpc(9.5)))
    )
    out = decode(frame)
    assert out.errors == [p.BAD_PRICE]
    assert out.ticks == [p.Tick(HDFC, 9.5, LTT)]


@pytest.mark.parametrize(
    "feed",
    [
        v3.Feed(requestMode=v3.full_d5),  # requestMode alone
        v3.Feed(),  # an empty value
        v3.Feed(fullFeed=v3.FullFeed()),  # neither marketFF nor indexFF
        v3.Feed(fullFeed=v3.FullFeed(marketFF=v3.MarketFullFeed(atp=1.0))),  # marketFF, no ltpc
        v3.Feed(firstLevelWithGreeks=v3.FirstLevelWithGreeks(oi=5.0)),  # no ltpc
    ],
    ids=["mode-only", "empty", "no-full-member", "no-market-ltpc", "no-greeks-ltpc"],
)
def test_a_feed_without_ltpc_is_counted_bad_price(feed: v3.Feed) -> None:
    """A feed entry carrying none of the LTPC-bearing shapes has no price."""
    out = decode(response(LIVE_FEED, entry(RELIANCE, feed), entry(HDFC, feed_ltpc(ltpc(9.5)))))
    assert out.errors == [p.BAD_PRICE]
    assert out.ticks == [p.Tick(HDFC, 9.5, LTT)]


def test_an_entry_without_a_value_is_counted_bad_price() -> None:
    """A map entry with a key and no value at all has no price."""
    frame = response(LIVE_FEED, raw_bytes(2, raw_string(1, RELIANCE)))
    assert decode(frame) == p.Decoded(errors=[p.BAD_PRICE])


def test_keys_not_subscribed_are_counted_unknown_symbol() -> None:
    """Ticks for instrument keys outside `known` are dropped as unknown_symbol."""
    frame = response(LIVE_FEED, entry("BSE_EQ|INE000X00000", feed_ltpc(ltpc())))
    assert decode(frame) == p.Decoded(errors=[p.UNKNOWN_SYMBOL])


def test_an_entry_without_a_key_is_counted_no_symbol() -> None:
    """A map entry whose key is absent or empty (proto3's empty string) is dropped as no_symbol."""
    absent = raw_bytes(2, raw_bytes(2, feed_ltpc(ltpc()).SerializeToString()))
    empty = entry("", feed_ltpc(ltpc()))
    assert decode(response(LIVE_FEED, absent, empty)) == p.Decoded(
        errors=[p.NO_SYMBOL, p.NO_SYMBOL]
    )


def test_unknown_fields_at_new_numbers_are_skipped_at_every_level() -> None:
    """Additive fields of any wire type, in the response, entry, feed, shapes and LTPC, do no harm."""
    extras = (
        raw_varint(15, 3)
        + raw_double(16, 1.0)
        + raw_string(17, "CAS")
        + raw_fixed32(18, b"\x00\x00\x80?")
        + raw_bytes(1000, b"\x08\x01")
    )
    body = extras + ltpc(2500.5, LTT).SerializeToString() + extras
    market_ff = extras + raw_bytes(1, body) + raw_bytes(11, b"iep")
    full = extras + raw_bytes(1, market_ff)
    feed = extras + raw_bytes(2, full) + raw_varint(4, 1)
    map_entry = raw_string(1, RELIANCE) + extras + raw_bytes(2, feed)
    frame = extras + raw_varint(1, LIVE_FEED) + raw_bytes(2, map_entry) + extras
    assert decode(frame) == p.Decoded(ticks=[p.Tick(RELIANCE, 2500.5, LTT)])


def test_unknown_type_values_still_give_ticks() -> None:
    """A response type this decoder does not know (an open enum) is decoded, not a heartbeat."""
    out = decode(response(7, entry(RELIANCE, feed_ltpc(ltpc()))))
    assert out == p.Decoded(ticks=[p.Tick(RELIANCE, 2500.5, LTT)])


def test_repeated_singular_fields_merge_as_protobuf_does() -> None:
    """The last scalar wins, and two ltpc occurrences merge (ltt from the first, ltp from the second)."""
    first = v3.Feed(ltpc=v3.LTPC(ltp=1.0, ltt=LTT)).SerializeToString()
    second = v3.Feed(ltpc=v3.LTPC(ltp=2.0)).SerializeToString()
    out = decode(response(LIVE_FEED, entry(RELIANCE, first + second)))
    assert out.ticks == [p.Tick(RELIANCE, 2.0, LTT)]


def test_the_last_oneof_member_on_the_wire_wins() -> None:
    """A feed carrying ltpc and then fullFeed is read as the fullFeed, as protobuf sets a oneof."""
    feed = feed_ltpc(ltpc(1.0)).SerializeToString() + feed_market_ff(ltpc(3.0)).SerializeToString()
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
        b"\x0b\x0c",  # type as an (empty) group
        b"\xff" * 12,  # an endless varint
        b"\x00\x01",  # field number 0
        raw_double(1, 1.0),  # type with the wrong wire type
        raw_varint(2, 5),  # feeds with the wrong wire type: its entry would vanish
        response(LIVE_FEED, entry(RELIANCE, feed_ltpc(ltpc()))) + raw_fixed32(2, b"\0" * 4),
        b"hello, world",
        b"\x7b" * 100_000 + b"\x7c" * 100_000,  # groups nested 100,000 deep
    ],
    ids=[
        "truncated",
        "huge-length",
        "groups",
        "varint",
        "field-0",
        "type-wire",
        "feeds-wire",
        "feeds-wire-after-a-good-entry",
        "text-bytes",
        "deep-nesting",
    ],
)
def test_bytes_that_are_not_a_feed_response_count_one_bad_frame(frame: bytes) -> None:
    """Truncated or garbage bytes drop the whole frame as one bad_frame."""
    assert decode(frame) == p.Decoded(errors=[p.BAD_FRAME])


def test_a_malformed_entry_counts_bad_frame_and_the_good_entries_still_count() -> None:
    """A feeds entry whose inner bytes are broken is dropped alone, like a bad tick in a batch."""
    broken_ltpc = raw_bytes(1, b"\x09\x00")  # ltp: I64 with 1 byte
    wrong_wire = raw_bytes(1, raw_varint(1, 2500))  # ltp as a varint
    bad_key = raw_bytes(2, raw_bytes(1, b"\xff\xfe") + raw_bytes(2, b""))  # not UTF-8
    frame = response(
        LIVE_FEED,
        entry(RELIANCE, broken_ltpc),
        entry(NIFTY, wrong_wire),
        bad_key,
        entry(HDFC, feed_greeks(ltpc(1650.0))),
    )
    out = decode(frame)
    assert out.errors == [p.BAD_FRAME, p.BAD_FRAME, p.BAD_FRAME]
    assert out.ticks == [p.Tick(HDFC, 1650.0, LTT)]


def test_broken_bytes_anywhere_in_an_entry_make_it_malformed() -> None:
    """The runtime checks the whole entry, parts tickguard does not read too: a depth level
    cut short drops its entry, and the other entries of the frame still count."""
    good = feed_market_ff(ltpc(2500.5)).SerializeToString()
    depth = raw_bytes(2, raw_bytes(1, b"\x08\x05\x11\x00"))  # marketLevel: a bidP of 1 byte
    market = raw_bytes(1, ltpc(2500.5).SerializeToString()) + depth
    broken = raw_bytes(2, raw_bytes(1, market))
    frame = response(LIVE_FEED, entry(RELIANCE, broken), entry(HDFC, good))
    assert decode(frame) == p.Decoded(errors=[p.BAD_FRAME], ticks=[p.Tick(HDFC, 2500.5, LTT)])


@pytest.mark.parametrize(
    "feed",
    [
        raw_bytes(1, raw_varint(1, 2500) + raw_varint(2, LTT)),  # ltp as a varint
        raw_bytes(1, raw_double(1, 2500.5) + raw_double(2, 1.0)),  # ltt as a double
        raw_varint(1, 3),  # ltpc as a varint
        raw_bytes(2, raw_double(1, 2.0)),  # marketFF as a double
        raw_bytes(2, raw_bytes(2, raw_varint(1, 1))),  # indexFF's ltpc as a varint
        raw_bytes(3, raw_fixed32(1, b"\0" * 4)),  # firstLevelWithGreeks' ltpc as an I32
        raw_fixed32(3, b"\0" * 4),  # firstLevelWithGreeks as an I32
    ],
    ids=["ltp", "ltt", "ltpc", "marketFF", "indexFF-ltpc", "greeks-ltpc", "greeks"],
)
def test_a_field_read_with_another_wire_type_makes_the_entry_malformed(feed: bytes) -> None:
    """A field on the way to the LTPC that came with another wire type is not taken as absent
    (bad_price, or no exchange time): the entry is malformed."""
    out = decode(response(LIVE_FEED, entry(RELIANCE, feed), entry(HDFC, feed_ltpc(ltpc(9.5)))))
    assert out == p.Decoded(errors=[p.BAD_FRAME], ticks=[p.Tick(HDFC, 9.5, LTT)])


def test_a_key_with_another_wire_type_makes_the_entry_malformed() -> None:
    """A key sent as a varint is not an absent key (no_symbol): the entry is malformed."""
    value = raw_bytes(2, feed_ltpc(ltpc()).SerializeToString())
    frame = response(LIVE_FEED, raw_bytes(2, raw_varint(1, 7) + value))
    assert decode(frame) == p.Decoded(errors=[p.BAD_FRAME])


def test_a_misread_field_is_reported_before_what_else_the_entry_lacks() -> None:
    """An entry without a key whose ltp also came as a varint counts bad_frame, not no_symbol."""
    value = raw_bytes(2, raw_bytes(1, raw_varint(1, 5)))
    assert decode(response(LIVE_FEED, raw_bytes(2, value))) == p.Decoded(errors=[p.BAD_FRAME])


def test_an_entry_that_makes_a_tick_is_taken_as_protobuf_reads_it() -> None:
    """A whole LTPC is a tick even beside a stray copy of ltp with another wire type:
    protobuf keeps that copy as an unknown field, and nothing is missing to look into."""
    body = ltpc(2500.5).SerializeToString() + raw_varint(1, 1)
    out = decode(response(LIVE_FEED, entry(RELIANCE, raw_bytes(1, body))))
    assert out == p.Decoded(ticks=[p.Tick(RELIANCE, 2500.5, LTT)])


def test_an_unsubscribed_key_is_looked_into_before_it_counts_unknown_symbol() -> None:
    """A whole LTPC for a key not subscribed is unknown_symbol, unless a field tickguard reads
    was misread (a stray copy of ltp as a varint): then it is malformed, as for any entry
    that makes no tick."""
    stray = raw_bytes(1, ltpc(2500.5).SerializeToString() + raw_varint(1, 1))
    other = "BSE_EQ|INE000X00000"
    frame = response(
        LIVE_FEED,
        entry(other, feed_ltpc(ltpc())),
        entry(other, stray),
        entry(RELIANCE, stray),
    )
    for known in (KNOWN, frozenset(KNOWN)):
        assert decode(frame, known) == p.Decoded(
            ticks=[p.Tick(RELIANCE, 2500.5, LTT)], errors=[p.UNKNOWN_SYMBOL, p.BAD_FRAME]
        )


def test_a_frame_the_runtime_refuses_is_split_into_its_entries(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Whatever the runtime raises on the whole frame (not only DecodeError), the entries are
    judged one by one; if it raises on those too, each is one bad_frame; never an exception."""
    frame = response(
        MARKET_INFO, entry(RELIANCE, feed_ltpc(ltpc())), entry(HDFC, feed_ltpc(ltpc(9.5)))
    )

    class Refusing:
        @staticmethod
        def FromString(data: bytes) -> None:
            raise RuntimeError("the runtime failed")

    class Wire:
        FeedEntries = Refusing
        FeedFrame = upstox.wire.FeedFrame
        FeedEntry = upstox.wire.FeedEntry

    monkeypatch.setattr(upstox, "wire", Wire)
    assert decode(frame) == p.Decoded(
        ticks=[p.Tick(RELIANCE, 2500.5, LTT), p.Tick(HDFC, 9.5, LTT)], heartbeat=True
    )
    Wire.FeedEntry = Refusing
    assert decode(frame) == p.Decoded(errors=[p.BAD_FRAME, p.BAD_FRAME], heartbeat=True)
    Wire.FeedFrame = Refusing
    assert decode(frame) == p.Decoded(errors=[p.BAD_FRAME])


def test_a_large_frame_of_garbage_is_one_bad_frame() -> None:
    """A megabyte of bytes that only start like a FeedResponse is one bad_frame."""
    frame = response(LIVE_FEED, entry(RELIANCE, feed_ltpc(ltpc()))) + b"\x12\x80" * 500_000
    assert decode(frame) == p.Decoded(errors=[p.BAD_FRAME])


def test_a_tick_names_the_subscriptions_own_string() -> None:
    """With the subscription as a frozenset (as the supervisor passes it), a tick's symbol is
    the subscription's own string object, not an equal copy: dict lookups find it by identity."""
    known = frozenset("NSE_EQ|INE002A0101" + digit for digit in "0123456789")
    own = next(iter(known))
    frame = response(LIVE_FEED, entry(own, feed_ltpc(ltpc())), entry(own, feed_ltpc(ltpc(2.5))))
    protocol = UpstoxProtocol()
    for _ in range(2):  # the first frame builds the lookup, the second uses it
        out = protocol.decode(frame, known)
        assert out.ticks == [p.Tick(own, 2500.5, LTT), p.Tick(own, 2.5, LTT)]
        assert all(tick.symbol is own for tick in out.ticks)


def test_a_new_subscription_and_a_changed_set_are_read_afresh() -> None:
    """A frozenset replaced by another, or a set changed between two frames, decides the next
    frame's unknown_symbol: nothing is kept of the symbols known before."""
    frame = response(LIVE_FEED, entry(HDFC, feed_ltpc(ltpc())))
    protocol = UpstoxProtocol()
    assert protocol.decode(frame, frozenset({RELIANCE})).errors == [p.UNKNOWN_SYMBOL]
    assert protocol.decode(frame, frozenset({RELIANCE, HDFC})).errors == []
    known = {RELIANCE}
    assert protocol.decode(frame, known).errors == [p.UNKNOWN_SYMBOL]
    known.add(HDFC)
    assert protocol.decode(frame, known).ticks == [p.Tick(HDFC, 2500.5, LTT)]
    known.discard(HDFC)
    assert protocol.decode(frame, known).errors == [p.UNKNOWN_SYMBOL]


@pytest.mark.parametrize("kind", [set, frozenset])
def test_an_empty_key_is_no_symbol_even_if_known(kind: type) -> None:
    """An empty key is no instrument key: no_symbol, whatever the subscription holds."""
    frame = response(LIVE_FEED, entry("", feed_ltpc(ltpc())))
    assert decode(frame, kind({"", RELIANCE})) == p.Decoded(errors=[p.NO_SYMBOL])


@pytest.mark.parametrize(
    "extra",
    [
        raw_bytes(3, b"\x01\x02"),  # currentTs as bytes
        raw_double(3, 1.0),  # currentTs as a double
        raw_varint(4, 7),  # marketInfo as a varint
        raw_bytes(4, b"\xff\xff\xff"),  # marketInfo that is not a MarketInfo
    ],
    ids=["currentTs-bytes", "currentTs-double", "marketInfo-varint", "marketInfo-garbage"],
)
def test_current_ts_and_market_info_are_never_read(extra: bytes) -> None:
    """currentTs and marketInfo, which tickguard does not read, harm no tick, whatever they
    carry and however they come (only their framing counts)."""
    frame = response(LIVE_FEED, entry(RELIANCE, feed_ltpc(ltpc()))) + extra
    assert decode(frame) == p.Decoded(ticks=[p.Tick(RELIANCE, 2500.5, LTT)])


# -- properties --------------------------------------------------------------------

_KEYS = st.sampled_from([RELIANCE, HDFC, NIFTY, "BSE_EQ|INE000X00000", ""])
_PRICES = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0.0, 2500.5, 1e12, 1e12 - 1, 5e-324]),
)
_LTTS = st.one_of(st.integers(-(1 << 63), (1 << 63) - 1), st.sampled_from([0, LTT, 1 << 53]))
_SHAPES = st.sampled_from([feed_ltpc, feed_market_ff, feed_index_ff, feed_greeks])


@given(
    st.lists(st.tuples(_KEYS, _PRICES, _LTTS, _SHAPES), max_size=12),
    st.integers(0, 7),
    st.sampled_from([set, frozenset]),
)
def test_a_well_formed_frame_is_one_add_per_entry_in_wire_order(
    entries: list[tuple[str, float, int, object]], kind: int, collection: type
) -> None:
    """Any frame the runtime writes decodes as Decoded.add of each entry's key, ltp and ltt
    (None unless positive), in order: the same ticks and reasons, nothing more, whether
    the symbols known are a set or (as the supervisor passes them) a frozenset."""
    frames = []
    expected = p.Decoded(heartbeat=kind == MARKET_INFO)
    for key, ltp, ltt, shape in entries:
        assert callable(shape)
        frames.append(entry(key, shape(ltpc(ltp, ltt))))
        expected.add(key, ltp, ltt if ltt > 0 else None, KNOWN)
    assert decode(response(kind, *frames), collection(KNOWN)) == expected


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
    body = raw_fixed32(9, struct.pack("<f", 7.0)) + ltpc(12.5).SerializeToString()
    assert decode(response(LIVE_FEED, entry(RELIANCE, raw_bytes(1, body)))).ticks == [
        p.Tick(RELIANCE, 12.5, LTT)
    ]
