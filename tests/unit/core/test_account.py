"""The account's arithmetic (SPEC 8): trades into net positions, rules into levels, exit sizes."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tickguard.core.account import (
    ExitRule,
    Holding,
    Verdict,
    apply_trade,
    exit_size,
    first_rule,
    held_on_side,
    reconcile,
    signed_quantity,
    to_judge,
)
from tickguard.core.positions import Position, PositionSpec, PositionState, Side

trades = st.lists(
    st.tuples(
        st.integers(min_value=-50, max_value=50).filter(bool),
        st.floats(min_value=1.0, max_value=1000.0, allow_nan=False),
    ),
    max_size=30,
)


@given(trades)
def test_the_net_is_the_sum_of_the_trades(sequence: list[tuple[int, float]]) -> None:
    """Whatever the trades, the net quantity is their sum, flat is None, and the average is positive."""
    holding: Holding | None = None
    for delta, price in sequence:
        holding = apply_trade(holding, "A", float(delta), price)
        if holding is not None:
            assert holding.quantity != 0
            assert holding.average_price is not None and holding.average_price > 0
    total = sum(d for d, _ in sequence)
    assert (holding.quantity if holding else 0) == total


def test_average_cost_rules() -> None:
    """Adding averages by quantity; reducing keeps the average; crossing zero starts at the price."""
    h = apply_trade(None, "A", 10, 100.0)
    assert h == Holding("A", 10, 100.0)
    h = apply_trade(h, "A", 10, 110.0)
    assert h is not None and h.quantity == 20 and h.average_price == pytest.approx(105.0)
    h = apply_trade(h, "A", -5, 90.0)
    assert h is not None and h.quantity == 15 and h.average_price == pytest.approx(105.0)
    h = apply_trade(h, "A", -20, 80.0)
    assert h is not None and h.quantity == -5 and h.average_price == 80.0
    assert apply_trade(h, "A", 5, 70.0) is None


def test_rule_levels_come_from_the_average_price() -> None:
    """A long's stop sits below its average, its target above; a short's the other way."""
    rule = ExitRule(("*",), stop_loss_pct=2.0, take_profit_pct=4.0, trailing_stop_pct=1.5)
    long = rule.spec_for(Holding("A", 10, 100.0))
    assert long is not None and long.side is Side.LONG and long.quantity == 10
    assert (long.stop_loss, long.take_profit, long.trailing_stop) == (98.0, 104.0, 1.5)
    short = rule.spec_for(Holding("A", -3, 200.0))
    assert short is not None and short.side is Side.SHORT and short.quantity == 3
    assert (short.stop_loss, short.take_profit) == (204.0, 192.0)
    assert rule.spec_for(Holding("A", 10, None)) is None  # no average: no levels
    assert ExitRule(("B",), stop_loss_pct=1.0).spec_for(Holding("B", 0, 5.0)) is None


def test_the_first_matching_rule_wins() -> None:
    """Rules are tried in order; `*` matches any symbol; no match is None."""
    a, star = ExitRule(("A",), stop_loss_pct=1.0), ExitRule(("*",), stop_loss_pct=5.0)
    assert first_rule((a, star), "A") is a
    assert first_rule((a, star), "B") is star
    assert first_rule((a,), "B") is None


def test_an_exit_never_takes_the_account_through_zero() -> None:
    """An exit is at most what the broker holds on the position's side; unknown: the guarded size."""
    position = Position(1, PositionSpec("A", Side.LONG, 10, 100.0))
    assert signed_quantity(position) == 10
    assert exit_size(position, Holding("A", 10, 100.0), known=True) == 10
    assert exit_size(position, Holding("A", 4, 100.0), known=True) == 4
    assert exit_size(position, Holding("A", 25, 100.0), known=True) == 10
    assert exit_size(position, None, known=True) == 0
    assert exit_size(position, Holding("A", -5, 100.0), known=True) == 0
    assert exit_size(position, None, known=False) == 10
    short = Position(2, PositionSpec("A", Side.SHORT, 10, 100.0))
    assert signed_quantity(short) == -10
    assert held_on_side(Side.SHORT, Holding("A", -6, 1.0)) == 6
    assert exit_size(short, Holding("A", 6, 1.0), known=True) == 0


positions = st.lists(
    st.builds(
        lambda i, side, quantity, state, confirmed: Position(
            i, PositionSpec(f"S{i % 4}", side, quantity, 100.0), state, confirmed=confirmed
        ),
        st.integers(0, 7),
        st.sampled_from(Side),
        st.sampled_from([1.0, 5.0, 10.0, 2.5]),
        st.sampled_from(PositionState),
        st.booleans(),
    ),
    max_size=8,
)
holdings = st.dictionaries(
    st.sampled_from([f"S{i}" for i in range(5)]),
    st.sampled_from([-10.0, -5.0, -1.0, 0.0, 1.0, 2.5, 5.0, 10.0, 12.0]),
    max_size=5,
).map(lambda held: {s: Holding(s, q, 100.0) for s, q in held.items()})


@given(positions, holdings)
def test_a_read_judges_every_position_it_may_change(
    guarded: list[Position], held: dict[str, Holding]
) -> None:
    """`to_judge` passes over exactly the positions a read leaves as they are: open,
    confirmed and held as guarded (HELD); it keeps every other open one, in order."""
    expected = [
        p
        for p in guarded
        if p.state is PositionState.OPEN
        and not (
            p.confirmed
            and reconcile(p, held.get(p.symbol), age=0.0, confirm_within=60.0).verdict
            is Verdict.HELD
        )
    ]
    assert to_judge(guarded, held) == expected
