"""The `json` protocol's two decoding paths give one result (docs/config.md, the json protocol).

Well-formed frames are decoded by msgspec with the entry checks done in C (the
fast path); every other frame by json.loads and a check per entry (the
checked path), so each dropped entry is counted by its reason and the good
entries of a batch are still taken. Whatever the frame, `decode` must answer
what the checked path alone answers, and the documented bounds must hold
exactly: prices finite, > 0 and < 1e12; timestamps integers < 2**53 ms; huge
integers, NaN and Infinity refused.
"""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tickguard.feed import json_protocol
from tickguard.feed import protocol as p
from tickguard.feed.json_protocol import JsonProtocol

KNOWN = frozenset({"A", "B", "C"})
HUGE = "9" * 400  # valid JSON; float() of it overflows
DIGITS = "9" * 5000  # over Python's int-digits limit: json.loads refuses the frame
DEEP = "[" * 5000 + "]" * 5000  # deeper than json.loads recurses


def decode(frame: str | bytes) -> p.Decoded:
    return JsonProtocol().decode(frame, KNOWN)


# -- the two paths agree on anything ----------------------------------------

symbols = st.sampled_from(
    ['"A"', '"B"', '"C"', '"Z"', '""', "5", "null", "true", '"\\ud800"', '"A\\u0000"', '"\\u0041"']
)
prices = st.sampled_from(
    [
        "1", "1.5", "0", "-1", "-0.0", "0.0", "1e12", "1E12", "999999999999", "999999999999.9999",
        "1e400", "-1e400", "5e-324", "1e-400", "NaN", "Infinity", "-Infinity", "true", '"1"',
        "null", HUGE, "-" + HUGE, DIGITS, "[1]", "{}", "1e2", "0.1e1", "2500.55",
        "1.7976931348623157e308",
    ]
) | st.floats(min_value=0.0, max_value=2e12).map(repr)  # fmt: skip
stamps = st.sampled_from(
    [
        "0", "-0", "-1", "9007199254740991", "9007199254740992", "1.5", "1e3", "1767765256123",
        "1767765256123.0", "null", "true", '"x"', "9" * 30, DIGITS, "NaN",
    ]
) | st.integers(min_value=-5, max_value=2**54).map(str)  # fmt: skip
extras = st.sampled_from(['"volume": 5', f'"x": {DIGITS}', f'"x": {DEEP}', '"x": NaN', '"x": [1]'])


@st.composite
def entries(draw: st.DrawFn) -> str:
    """One price entry as JSON text: fields missing, repeated, extra, of any type."""
    fields = []
    if draw(st.integers(0, 9)):
        fields.append(f'"symbol": {draw(symbols)}')
    if draw(st.integers(0, 9)):
        fields.append(f'"price": {draw(prices)}')
    if draw(st.booleans()):
        fields.append(f'"ts": {draw(stamps)}')
    if not draw(st.integers(0, 9)):  # a key repeated: json.loads keeps the last one
        fields.append(
            draw(st.sampled_from([f'"price": {draw(prices)}', f'"symbol": {draw(symbols)}']))
        )
    if not draw(st.integers(0, 9)):
        fields.append(draw(extras))
    fields = draw(st.permutations(fields))
    if not draw(st.integers(0, 19)):
        return draw(st.sampled_from(["1", "null", "[]", '"x"']))
    return "{" + ", ".join(fields) + "}"


@st.composite
def frames(draw: st.DrawFn) -> str:
    kind = draw(st.sampled_from(["tick", "ticks", "ticks", "heartbeat", "other", "odd"]))
    if kind == "tick":
        body = draw(entries())
        if body.startswith("{") and body != "{}":
            text = '{"type": "tick", ' + body[1:]
        else:
            text = '{"type": "tick"}'
    elif kind == "ticks":
        listed = draw(st.lists(entries(), max_size=6))
        text = '{"type": "ticks", "ticks": [' + ", ".join(listed) + "]}"
    elif kind == "heartbeat":
        text = draw(st.sampled_from(['{"type": "heartbeat"}', '{"type": "heartbeat", "ts": 5}']))
    elif kind == "other":
        text = '{"type": "snapshot", "price": ' + draw(prices) + "}"
    else:
        text = draw(
            st.sampled_from(
                ['{"ticks": []}', '{"type": 5}', "[]", "5", "", "{", DEEP, '{"type": "ticks"}',
                 '{"type": "ticks", "ticks": 5}', '{"type": "ticks", "ticks": null}',
                 '{"type": "tick", "type": "ticks", "ticks": []}', '\ufeff{"type": "heartbeat"}']
            )
        )  # fmt: skip
    return draw(st.sampled_from(["", " ", "\n\t"])) + text + draw(st.sampled_from(["", " ", "x"]))


@settings(max_examples=600, deadline=None)
@given(frames())
def test_every_frame_decodes_as_the_checked_path_decodes_it(frame: str) -> None:
    """The fast path takes a frame only when it gives what the per-entry checks give, with
    the symbols checked by the decoder (a frozenset) or looked up after it (a set)."""
    expected = json_protocol._checked(frame, KNOWN)
    assert decode(frame) == expected
    assert JsonProtocol().decode(frame, set(KNOWN)) == expected


@settings(max_examples=300, deadline=None)
@given(st.floats(min_value=0.0, max_value=1e13, allow_subnormal=True), st.integers(0, 2**53 - 1))
def test_numbers_parse_to_the_same_doubles(price: float, ts: int) -> None:
    """msgspec's number parsing gives the doubles and integers json.loads gives."""
    for text in (repr(price), f"{price:.17g}", f"{price:.3f}", f"{price:e}"):
        frame = f'{{"type": "ticks", "ticks": [{{"symbol": "A", "price": {text}, "ts": {ts}}}]}}'
        assert decode(frame) == json_protocol._checked(frame, KNOWN)


# -- the documented bounds, exactly --------------------------------------------


def tick(price: str, ts: str | None = None) -> str:
    stamp = "" if ts is None else f', "ts": {ts}'
    return f'{{"type": "tick", "symbol": "A", "price": {price}{stamp}}}'


def batch(*entries: str) -> str:
    return '{"type": "ticks", "ticks": [' + ", ".join(entries) + "]}"


@pytest.mark.parametrize(
    ("frame", "expected"),
    [
        (tick("575.25", "1767765256123"), p.Decoded([p.Tick("A", 575.25, 1767765256123)])),
        (tick("575"), p.Decoded([p.Tick("A", 575.0, None)])),
        (tick("999999999999.99"), p.Decoded([p.Tick("A", 999999999999.99, None)])),
        (tick("5e-324"), p.Decoded([p.Tick("A", 5e-324, None)])),
        (tick("1e12"), p.Decoded(errors=[p.BAD_PRICE])),
        (tick("1000000000000"), p.Decoded(errors=[p.BAD_PRICE])),
        (tick("0"), p.Decoded(errors=[p.BAD_PRICE])),
        (tick("-0.0"), p.Decoded(errors=[p.BAD_PRICE])),
        (tick("1e-400"), p.Decoded(errors=[p.BAD_PRICE])),  # rounds to 0
        (tick("-1"), p.Decoded(errors=[p.BAD_PRICE])),
        (tick("1e308"), p.Decoded(errors=[p.BAD_PRICE])),
        (tick("1e400"), p.Decoded(errors=[p.BAD_PRICE])),  # infinity
        (tick("NaN"), p.Decoded(errors=[p.BAD_PRICE])),
        (tick("Infinity"), p.Decoded(errors=[p.BAD_PRICE])),
        (tick("-Infinity"), p.Decoded(errors=[p.BAD_PRICE])),
        (tick(HUGE), p.Decoded(errors=[p.BAD_PRICE])),
        (tick("-" + HUGE), p.Decoded(errors=[p.BAD_PRICE])),
        (tick(DIGITS), p.Decoded(errors=[p.NOT_JSON])),  # json.loads refuses the frame
        (tick("true"), p.Decoded(errors=[p.BAD_PRICE])),
        (tick('"575.0"'), p.Decoded(errors=[p.BAD_PRICE])),
        (tick("null"), p.Decoded(errors=[p.BAD_PRICE])),
        (tick("1", "9007199254740991"), p.Decoded([p.Tick("A", 1.0, 2**53 - 1)])),
        (tick("1", "9007199254740992"), p.Decoded(errors=[p.BAD_TIMESTAMP])),
        (tick("1", "0"), p.Decoded([p.Tick("A", 1.0, 0)])),
        (tick("1", "-1"), p.Decoded(errors=[p.BAD_TIMESTAMP])),
        (tick("1", "1767765256123.0"), p.Decoded([p.Tick("A", 1.0, 1767765256123)])),
        (tick("1", "1.9"), p.Decoded([p.Tick("A", 1.0, 1)])),  # a float is truncated, as before
        (tick("1", HUGE), p.Decoded(errors=[p.BAD_TIMESTAMP])),
        (tick("1", "NaN"), p.Decoded(errors=[p.BAD_TIMESTAMP])),
        (tick("1", "true"), p.Decoded(errors=[p.BAD_TIMESTAMP])),
        (tick("1", "null"), p.Decoded([p.Tick("A", 1.0, None)])),
        ('{"type": "tick", "symbol": "Z", "price": 1}', p.Decoded(errors=[p.UNKNOWN_SYMBOL])),
        ('{"type": "tick", "symbol": "", "price": 1}', p.Decoded(errors=[p.NO_SYMBOL])),
        ('{"type": "tick", "price": 1}', p.Decoded(errors=[p.NO_SYMBOL])),
        ('{"type": "tick", "symbol": "A"}', p.Decoded(errors=[p.BAD_PRICE])),
        (
            batch(
                '{"symbol": "A", "price": 1}',
                '{"symbol": "B", "price": NaN}',
                '{"symbol": "Z", "price": 1}',
                '{"symbol": "C", "price": 2, "ts": 1.5e3}',
                "7",
                '{"symbol": "B", "price": 3, "volume": 9}',
            ),
            p.Decoded(
                [p.Tick("A", 1.0, None), p.Tick("C", 2.0, 1500), p.Tick("B", 3.0, None)],
                [p.BAD_PRICE, p.UNKNOWN_SYMBOL, p.NOT_OBJECT],
            ),
        ),
        ('{"type": "heartbeat"}', p.Decoded(heartbeat=True)),
        ('{"type": "snapshot", "price": NaN}', p.Decoded()),
        ('{"type": 5}', p.Decoded(errors=[p.NO_TYPE])),
        ('{"type": "ticks", "ticks": 5}', p.Decoded(errors=[p.NOT_OBJECT])),
        ("[]", p.Decoded(errors=[p.NOT_OBJECT])),
        ("nope", p.Decoded(errors=[p.NOT_JSON])),
        (DEEP, p.Decoded(errors=[p.NOT_JSON])),
        ('{"type": "heartbeat", "x": ' + DEEP + "}", p.Decoded(errors=[p.NOT_JSON])),
        ('{"type": "heartbeat", "x": ' + DIGITS + "}", p.Decoded(errors=[p.NOT_JSON])),
        (b'{"type": "heartbeat"}', p.Decoded(errors=[p.BINARY])),
    ],
)
def test_bounds_and_reasons_are_exactly_as_documented(
    frame: str | bytes, expected: p.Decoded
) -> None:
    assert decode(frame) == expected


def test_the_fast_path_takes_well_formed_frames(monkeypatch: pytest.MonkeyPatch) -> None:
    """A well-formed frame of subscribed symbols never reaches json.loads; with the symbols
    known as a plain set, one of unknown symbols neither (they are looked up in Python)."""

    def checked(frame: str | bytes, known: object) -> p.Decoded:
        raise AssertionError(f"the checked path decoded {frame!r}")

    monkeypatch.setattr(json_protocol, "_checked", checked)
    entries = [
        {"symbol": s, "price": 10.5 + i, "ts": 1767765256123 + i} for i, s in enumerate("ABZ")
    ]
    known = decode(json.dumps({"type": "ticks", "ticks": entries[:2]}))
    assert known == p.Decoded([p.Tick("A", 10.5, 1767765256123), p.Tick("B", 11.5, 1767765256124)])
    assert decode(json.dumps({"type": "tick", **entries[0]})).ticks == [
        p.Tick("A", 10.5, 1767765256123)
    ]
    assert decode('{"type": "heartbeat"}') == p.Decoded(heartbeat=True)
    as_set = JsonProtocol().decode(json.dumps({"type": "ticks", "ticks": entries}), set(KNOWN))
    assert as_set == p.Decoded(
        [p.Tick("A", 10.5, 1767765256123), p.Tick("B", 11.5, 1767765256124)], [p.UNKNOWN_SYMBOL]
    )


def test_a_symbol_not_subscribed_is_counted_and_the_others_taken() -> None:
    """With the subscription as a frozenset the fast decoder refuses an unknown symbol; the
    checked path then counts it and takes the rest of the batch."""
    frame = batch('{"symbol": "A", "price": 1}', '{"symbol": "Z", "price": 2}')
    assert decode(frame) == p.Decoded([p.Tick("A", 1.0, None)], [p.UNKNOWN_SYMBOL])


def test_symbols_are_the_subscriptions_own_and_follow_its_changes() -> None:
    """A decoded symbol is the subscription's string object (found by identity in the book
    and the guard); a new subscription is decoded against at once."""
    protocol = JsonProtocol()
    first = frozenset({"".join(["A", "B"]), "C"})
    (tick,) = protocol.decode(batch('{"symbol": "AB", "price": 1}'), first).ticks
    assert any(tick.symbol is symbol for symbol in first)
    assert protocol.decode(batch('{"symbol": "D", "price": 1}'), first).errors == [p.UNKNOWN_SYMBOL]
    second = first | {"D"}
    assert protocol.decode(batch('{"symbol": "D", "price": 1}'), second).ticks == [
        p.Tick("D", 1.0, None)
    ]
    assert protocol.decode(batch('{"symbol": "D", "price": 1}'), frozenset()).errors == [
        p.UNKNOWN_SYMBOL
    ]
    assert protocol.decode(batch('{"symbol": "", "price": 1}'), frozenset({"", "A"})).errors == [
        p.NO_SYMBOL
    ]
