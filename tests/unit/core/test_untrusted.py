"""Values from outside: every number check is total over any JSON value, of any size."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tickguard.core.positions import parse_spec
from tickguard.core.untrusted import (
    MAX_AMOUNT,
    MAX_EPOCH_MS,
    SHOWN_LIMIT,
    amount,
    epoch_ms,
    number,
    parse_json,
    shown,
)

HUGE = 10**400  # a valid JSON and TOML integer; float() of it raises OverflowError

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=10**300, max_value=10**1000)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)


@given(json_values)
def test_checks_are_total(value: object) -> None:
    """number, amount, epoch_ms and shown answer for any JSON value without raising."""
    n = number(value)
    assert n is None or math.isfinite(n)
    a = amount(value)
    assert a is None or 0 < a < MAX_AMOUNT
    ok, ms = epoch_ms(value)
    assert (ms is None) or (ok and 0 <= ms < MAX_EPOCH_MS)
    assert len(shown(value)) <= SHOWN_LIMIT


@pytest.mark.parametrize(
    "value", [HUGE, -HUGE, True, False, "1.0", float("nan"), float("inf"), None, [1.0], {"a": 1}]
)
def test_not_numbers(value: object) -> None:
    """Huge integers, bools, strings, NaN, infinities and containers are not numbers."""
    assert number(value) is None and amount(value) is None
    assert epoch_ms(value) == ((True, None) if value is None else (False, None))


def test_amounts_are_bounded() -> None:
    """An amount is > 0 and below MAX_AMOUNT; ints become floats."""
    assert amount(5) == 5.0 and isinstance(amount(5), float)
    assert amount(0) is None and amount(-1.0) is None
    assert amount(MAX_AMOUNT) is None and amount(1e308) is None
    assert amount(MAX_AMOUNT / 2) == MAX_AMOUNT / 2


def test_timestamps() -> None:
    """Epoch milliseconds are whole, non-negative and below 2**53."""
    assert epoch_ms(1767765256123) == (True, 1767765256123)
    assert epoch_ms(1.5) == (True, 1)
    assert epoch_ms(-1) == (False, None)
    assert epoch_ms(MAX_EPOCH_MS) == (False, None)


def test_parse_json_turns_every_failure_into_value_error() -> None:
    """Bad syntax, bad UTF-8, nesting past the recursion limit and 5,000-digit ints: ValueError."""
    for raw in (b"{", b"\xff\xfe", b"[" * 100_000 + b"]" * 100_000, b"9" * 5000):
        with pytest.raises(ValueError):
            parse_json(raw)
    assert parse_json(json.dumps({"price": HUGE})) == {"price": HUGE}


def test_shown_is_bounded() -> None:
    """Long values are cut; long integers are described by their digit count."""
    assert shown(HUGE) == "<an integer of 401 digits>"
    assert shown("x" * 500).endswith("...") and len(shown("x" * 500)) == SHOWN_LIMIT
    assert shown(1.5) == "1.5"


def test_a_position_with_a_huge_quantity_is_a_problem_not_a_crash() -> None:
    """parse_spec reports a 400-digit quantity as invalid, shown by its digit count."""
    spec, problems = parse_spec(
        {"symbol": "A", "side": "long", "quantity": HUGE, "entry_price": 1e308}
    )
    assert spec is None
    assert [p.field for p in problems] == ["quantity", "entry_price"]  # every problem at once
    assert str(problems[0]).startswith("quantity: <an integer of 401 digits> is invalid")
    spec, problems = parse_spec({"symbol": "A", "side": "long", "quantity": 1, "entry_price": 1e308})
    assert spec is None and [p.field for p in problems] == ["entry_price"]


def test_shown_survives_values_repr_cannot_render() -> None:
    """An integer past the int-to-text limit, or a list nested past the recursion limit, is named."""
    nested: list[object] = []
    inner = nested
    for _ in range(100_000):
        inner.append([])
        inner = inner[0]  # type: ignore[assignment]
    assert shown(nested) == "<list>"
    assert shown(10**5000) == "<int>"
