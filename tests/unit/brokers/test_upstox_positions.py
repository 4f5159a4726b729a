"""Upstox's positions answer has one reading, whichever path decodes it (docs/account.md).

The read made right before every exit decodes the answer (about 700 KB for
1,000 positions) the fast way when it can: msgspec, typed, the checks of a
counted entry done in C (`PositionsDecoder`). Every answer it does not take
goes to the checked path, `parse_json` then `holdings_from`, which names the
first thing malformed. The fast path may refuse any answer, but what it takes
the checked path must take too, with the same Holdings: a malformed counted
entry is a failed read, never a partial one.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tickguard.brokers.upstox import DEFAULT_PRODUCTS, PositionsDecoder, holdings_from
from tickguard.core import untrusted
from tickguard.core.account import Holding

DIGITS = "9" * 5000  # over Python's int-digits limit: json.loads refuses the answer
LONG_DIGITS = "9" * 3000  # under it: json.loads takes it (the fast path may leave it alone)
DEEP = "[" * 5000 + "]" * 5000  # deeper than either decoder recurses
KEY = "NSE_EQ|INE848E01016"


def checked(raw: bytes, products: tuple[str, ...]) -> list[Holding] | str:
    """What the checked path makes of `raw`: Holdings, or the ValueError's message."""
    try:
        return holdings_from(untrusted.parse_json(raw), products)
    except ValueError as exc:
        return str(exc)


def entry(**fields: Any) -> dict[str, Any]:
    """An entry in the documented shape (fields nobody reads included), with `fields`."""
    base: dict[str, Any] = {
        "exchange": "NSE",
        "multiplier": 1.0,
        "value": -1005.0,
        "pnl": -65.0,
        "product": "I",
        "instrument_token": KEY,
        "average_price": 100.5,
        "buy_value": 1005.0,
        "overnight_quantity": 10,
        "day_buy_quantity": 0,
        "quantity": 10,
        "last_price": 94.0,
        "trading_symbol": "SBIN",
        "close_price": 94.0,
    }
    return {**base, **fields}


def answer(*entries: Any, status: str = "success") -> bytes:
    return json.dumps({"status": status, "data": list(entries)}).encode()


# -- the two paths agree on anything ----------------------------------------

keys = st.sampled_from(
    [
        '"NSE_EQ|INE848E01016"', '"NSE_EQ|INE002A01018"', '"BSE_EQ|INE467B01029"',
        '"NSE_EQ|\\u00e9t\\u00e9"', '"NSE_EQ| "', '"NSE_EQ|  x "', '" |x"', '"|x"', '"x|"',
        '"x||"', '"RELIANCE"', '""', '"NSE_EQ|x\\n"', '"NSE_EQ|\\u0000"', '"NSE_EQ|\\u00a0"',
        '"NSE_EQ|\\ud800"', '"NSE_EQ|' + "9" * 57 + '"', '"NSE_EQ|' + "9" * 58 + '"', "12345",
        "null", '["x|y"]',
    ]
)  # fmt: skip
quantities = st.sampled_from(
    [
        "0", "-0", "1", "-3", "10", "2.0", "2.5", "1e2", '"4"', "true", "null", "NaN",
        "999999999999", "1000000000000", "-999999999999", "-1000000000000", "9" * 30, DIGITS,
        "[4]",
    ]
) | st.integers(-(10**13), 10**13).map(str)  # fmt: skip
averages = st.sampled_from(
    [
        "null", "0", "0.0", "-0.0", "-1", "100.5", "735", '"735.5"', "true", "1e12",
        "999999999999.99", "1e-400", "1e400", "NaN", "Infinity", "9" * 400, DIGITS, "{}",
    ]
) | st.floats(min_value=0.0, max_value=2e12).map(repr)  # fmt: skip
products = st.sampled_from(['"I"', '"D"', '"MTF"', '"CO"', '"OCO"', '"ZZ"', '"i"', "5", "null"])
extras = st.sampled_from(
    [
        '"pnl": 12.5', f'"pnl": {DIGITS}', f'"pnl": {LONG_DIGITS}', f'"x": {DEEP}', '"x": NaN',
        '"x": "\\ud800"', '"x": [1, {"a": null}]', '"x": 1e999',
    ]
)  # fmt: skip


good = {
    "product": st.sampled_from(['"I"', '"D"', '"MTF"', '"CO"']),
    "instrument_token": st.sampled_from([f'"NSE_EQ|K{i}"' for i in range(12)]),
    "quantity": st.integers(-20, 20).map(str),
    "average_price": st.sampled_from(["null", "0", "100.5", "735"])
    | st.floats(min_value=0.0, max_value=1e6).map(repr),
}
anything = {
    "product": products,
    "instrument_token": keys,
    "quantity": quantities,
    "average_price": averages,
}


@st.composite
def entries(draw: st.DrawFn) -> str:
    """One entry as JSON text: mostly well formed, else with fields missing, repeated,
    extra, of any type, in any order."""
    fields = []
    corrupt = draw(st.integers(0, 3)) == 0
    for name, fine in good.items():
        if corrupt and not draw(st.integers(0, 9)):
            continue  # missing
        values = anything[name] if corrupt and draw(st.booleans()) else fine
        fields.append(f'"{name}": {draw(values)}')
    if not draw(st.integers(0, 9)):  # a key repeated: json.loads keeps the last one
        name = draw(st.sampled_from(["product", "quantity", "instrument_token"]))
        fields.append(f'"{name}": {draw(anything[name] if corrupt else good[name])}')
    for _ in range(draw(st.integers(0, 2))):
        fields.append(draw(extras) if corrupt else '"pnl": 12.5')
    fields = draw(st.permutations(fields))
    if corrupt and not draw(st.integers(0, 9)):
        return draw(st.sampled_from(["1", "null", "[]", '"x"']))
    return "{" + ", ".join(fields) + "}"


@st.composite
def answers(draw: st.DrawFn) -> bytes:
    listed = draw(st.lists(entries(), max_size=6))
    data = "[" + ", ".join(listed) + "]"
    shape = draw(st.integers(0, 19))
    if shape == 0:
        text = draw(
            st.sampled_from(
                ['{"status": "success"}', '{"data": []}', "[]", "5", "", "{", DEEP,
                 '{"status": "error", "data": []}', '{"status": "success", "data": null}',
                 '\ufeff{"status": "success", "data": []}']
            )
        )  # fmt: skip
    elif shape == 1:
        text = f'{{"data": {data}, "status": "success", "data": []}}'  # the last one counts
    else:
        text = f'{{"status": "success", "data": {data}, "metadata": {{"latency": 21}}}}'
    raw = text.encode()
    if not draw(st.integers(0, 19)):  # bytes that are not UTF-8, in a field nobody reads
        raw = raw.replace(b'"metadata"', b'"m\xff\xfe"')
    return raw


@settings(max_examples=1000, deadline=None)
@given(answers(), st.sampled_from([DEFAULT_PRODUCTS, ("I",), ("D", "MTF"), ("CO",)]))
def test_what_the_fast_path_takes_the_checked_path_reads_alike(
    raw: bytes, counted: tuple[str, ...]
) -> None:
    """Whatever the answer, the fast path either leaves it to the checked path or gives the
    very Holdings the checked path gives; it never takes an answer the checked path fails."""
    fast = PositionsDecoder(counted).holdings(raw)
    if fast is not None:
        assert fast == checked(raw, counted)


@settings(max_examples=300, deadline=None)
@given(
    st.floats(min_value=0.0, max_value=1e13, allow_subnormal=True),
    st.integers(-(10**12), 10**12),
)
def test_numbers_parse_to_the_same_values(price: float, quantity: int) -> None:
    """msgspec's numbers are json.loads's, and the bounds are the same on both paths."""
    for text in (repr(price), f"{price:.17g}", f"{price:.3f}", f"{price:e}"):
        raw = answer().replace(
            b"[]",
            f'[{{"product": "I", "instrument_token": "{KEY}", "quantity": {quantity},'
            f' "average_price": {text}}}]'.encode(),
        )
        fast = PositionsDecoder(DEFAULT_PRODUCTS).holdings(raw)
        expected = checked(raw, DEFAULT_PRODUCTS)
        assert fast == expected or (fast is None and isinstance(expected, str))


# -- the answers it takes -----------------------------------------------------


def test_the_documented_answer_of_a_thousand_positions_is_taken() -> None:
    """An answer in the documented shape is decoded by the fast path, as the checked path
    reads it: long and short, flat left out, sorted by key, products summed."""
    data = [
        entry(instrument_token=f"NSE_EQ|G{i:05d}", quantity=(i % 7) - 3, average_price=100.0 + i)
        for i in range(1000)
    ]
    data += [
        entry(instrument_token="NSE_EQ|G00001", product="D", quantity=5),
        entry(instrument_token="BSE_EQ|X", product="CO", quantity="lots"),  # not counted
    ]
    raw = answer(*data)
    fast = PositionsDecoder(DEFAULT_PRODUCTS).holdings(raw)
    assert fast is not None
    assert fast == checked(raw, DEFAULT_PRODUCTS)
    assert len(fast) == 857 and fast[0].symbol == "NSE_EQ|G00000"


def test_an_unchanged_entry_keeps_its_holding() -> None:
    """Between two reads, an entry that did not change keeps its Holding (the same object),
    one that changed gets a new one; the same bytes again give the same Holdings, in a
    list of their own."""
    decoder = PositionsDecoder(DEFAULT_PRODUCTS)
    first = decoder.holdings(answer(entry(), entry(instrument_token="NSE_EQ|B", quantity=-2)))
    second = decoder.holdings(answer(entry(), entry(instrument_token="NSE_EQ|B", quantity=-1)))
    assert first is not None and second is not None
    assert second[1] is first[1] and second[1].symbol == KEY
    assert second[0] == Holding("NSE_EQ|B", -1.0, 100.5, "I") and second[0] is not first[0]
    raw = answer(entry())
    again = decoder.holdings(raw)
    assert again is not None and again == decoder.holdings(raw)
    assert decoder.holdings(raw) is not decoder.holdings(raw)


def test_entries_of_products_that_do_not_count_are_not_read() -> None:
    """A malformed entry of a product that does not count is skipped unread: the answer is
    still taken. One of a product code nobody knows is left to the checked path."""
    decoder = PositionsDecoder(("I",))
    raw = answer(entry(), entry(product="D", quantity="lots", instrument_token=None))
    assert decoder.holdings(raw) == [Holding(KEY, 10.0, 100.5, "I")] == checked(raw, ("I",))
    unknown = answer(entry(), entry(product="XYZ"))
    assert decoder.holdings(unknown) is None
    assert checked(unknown, ("I",)) == [Holding(KEY, 10.0, 100.5, "I")]


@pytest.mark.parametrize(
    ("raw", "why"),
    [
        (answer(entry()).replace(b'"NSE"', b'"N\xffE"'), "not UTF-8, in a field nobody reads"),
        (answer(entry()).replace(b"-65.0", DIGITS.encode()), "an integer json.loads refuses"),
        (answer(entry(quantity=2.5)), "a quantity that is not whole"),
        (answer(entry(quantity=4.0)), "a whole quantity written as a float"),
        (answer(entry(), entry(quantity=3)), "a key twice in one product"),
        (answer(entry(instrument_token="NSE_EQ|X\n")), "a key with a line feed"),
        (answer(entry(average_price=float("nan"))), "NaN"),
        (answer(entry(), status="error"), "status error"),
        (b'{"status": "success", "data": [' + json.dumps(entry()).encode() + b"]", "cut short"),
    ],
)
def test_answers_the_fast_path_leaves_to_the_checked_path(raw: bytes, why: str) -> None:
    """The fast path does not take these (the checked path fails some, takes others)."""
    assert PositionsDecoder(DEFAULT_PRODUCTS).holdings(raw) is None, why


def test_keys_beyond_ascii_are_read_alike() -> None:
    """A printable key beyond ASCII is taken by the fast path, as the checked path takes it;
    one with a no-break space only after its bar is refused by both."""
    raw = answer(entry(instrument_token="NSE_EQ|été"))
    assert PositionsDecoder(DEFAULT_PRODUCTS).holdings(raw) == checked(raw, DEFAULT_PRODUCTS)
    assert PositionsDecoder(DEFAULT_PRODUCTS).holdings(raw) is not None
    bad = answer(entry(instrument_token="NSE_EQ|\u00a0"))
    assert PositionsDecoder(DEFAULT_PRODUCTS).holdings(bad) is None
    assert isinstance(checked(bad, DEFAULT_PRODUCTS), str)
