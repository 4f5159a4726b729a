"""The safety net's pure decisions: where a broker-held stop belongs, what to ask next."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tickguard.core.positions import Position, PositionSpec, PositionState, Side
from tickguard.core.safety_net import (
    Action,
    BrokerStop,
    RateLimit,
    net_level,
    plan,
    wanted,
)


def position(
    side: Side = Side.LONG,
    stop_loss: float | None = 90.0,
    trailing_stop: float | None = None,
    anchor: float | None = None,
    symbol: str = "A",
    quantity: float = 10,
    state: PositionState = PositionState.OPEN,
) -> Position:
    spec = PositionSpec(
        symbol, side, quantity, 100.0, stop_loss=stop_loss, trailing_stop=trailing_stop
    )
    return Position(1, spec, state=state, trail_anchor=anchor)


def stop(symbol: str = "A", trigger: float = 89.1, quantity: float = 10) -> BrokerStop:
    return BrokerStop(f"gtt-{symbol}", symbol, Side.LONG, quantity, trigger)


def test_a_longs_net_sits_the_margin_below_its_stop_rounded_down_to_the_step() -> None:
    assert net_level(position(stop_loss=90.0), 1.0) == 89.1
    assert net_level(position(stop_loss=698.25), 1.0) == 691.25  # 691.2675 -> down to 0.05


def test_a_shorts_net_sits_the_margin_above_its_stop_rounded_up_to_the_step() -> None:
    assert net_level(position(Side.SHORT, stop_loss=110.0), 1.0) == 111.1
    assert net_level(position(Side.SHORT, stop_loss=698.25), 1.0) == 705.25  # 705.2325 -> up


def test_the_tighter_of_stop_loss_and_trailing_level_is_followed() -> None:
    trailing = position(stop_loss=90.0, trailing_stop=5.0, anchor=120.0)  # trail at 115
    assert net_level(trailing, 0.0) == 115.0
    loose_trail = position(stop_loss=90.0, trailing_stop=50.0, anchor=120.0)  # trail at 70
    assert net_level(loose_trail, 0.0) == 90.0
    short = position(Side.SHORT, stop_loss=110.0, trailing_stop=5.0, anchor=95.0)  # at 100
    assert net_level(short, 0.0) == 100.0


def test_a_position_without_a_stop_gets_no_net() -> None:
    assert net_level(position(stop_loss=None), 1.0) is None
    assert wanted(position(stop_loss=None), 1.0) is None


@given(
    st.floats(min_value=1.0, max_value=100_000.0),
    st.floats(min_value=0.0, max_value=20.0),
    st.sampled_from(list(Side)),
)
def test_the_net_is_never_nearer_the_price_than_the_margin(
    level: float, margin: float, side: Side
) -> None:
    net = net_level(position(side, stop_loss=level), margin)
    assert net is not None
    steps = round(net / 0.05)
    assert abs(net - steps * 0.05) < 1e-6  # on the step
    if side is Side.LONG:
        assert net <= level * (1 - margin / 100) + 1e-6 or net == 0.05
    else:
        assert net >= level * (1 + margin / 100) - 1e-6


def test_an_open_position_without_a_stop_at_the_broker_gets_one_placed() -> None:
    steps = plan({"A": position()}, {}, 1.0, {}, now=0.0, move_every=5.0)
    assert [(s.action, s.symbol, s.trigger, s.quantity) for s in steps] == [
        (Action.PLACE, "A", 89.1, 10)
    ]


def test_a_stop_in_place_asks_nothing() -> None:
    assert plan({"A": position()}, {"A": stop()}, 1.0, {}, now=0.0, move_every=5.0) == []


def test_a_tightened_trail_moves_the_stop_at_most_every_move_every() -> None:
    tightened = position(stop_loss=90.0, trailing_stop=5.0, anchor=120.0)
    positions, stops = {"A": tightened}, {"A": stop()}
    assert plan(positions, stops, 0.0, {"A": 10.0}, now=12.0, move_every=5.0) == []
    (step,) = plan(positions, stops, 0.0, {"A": 10.0}, now=15.0, move_every=5.0)
    assert (step.action, step.trigger, step.stop) == (Action.MOVE, 115.0, stops["A"])


def test_a_changed_quantity_moves_the_stop() -> None:
    (step,) = plan({"A": position(quantity=5)}, {"A": stop()}, 1.0, {}, now=0.0, move_every=5)
    assert (step.action, step.quantity) == (Action.MOVE, 5)


def test_a_stop_whose_position_closed_or_vanished_is_cancelled_first() -> None:
    closed = position(symbol="A", state=PositionState.CLOSED)
    steps = plan(
        {"A": closed, "B": position(symbol="B")},
        {"A": stop("A"), "C": stop("C")},
        1.0,
        {},
        now=0.0,
        move_every=5.0,
    )
    assert [(s.action, s.symbol) for s in steps] == [
        (Action.CANCEL, "A"),
        (Action.CANCEL, "C"),
        (Action.PLACE, "B"),
    ]


def test_an_exiting_positions_stop_is_left_to_the_executor() -> None:
    exiting = position(state=PositionState.EXITING)
    assert plan({"A": exiting}, {"A": stop()}, 1.0, {}, now=0.0, move_every=5.0) == []
    assert plan({"A": exiting}, {}, 1.0, {}, now=0.0, move_every=5.0) == []


def test_a_stop_no_longer_wanted_is_cancelled() -> None:
    unstopped = dataclasses.replace(position(), spec=position(stop_loss=None).spec)
    (step,) = plan({"A": unstopped}, {"A": stop()}, 1.0, {}, now=0.0, move_every=5.0)
    assert step.action is Action.CANCEL


def test_the_rate_limit_allows_a_burst_then_the_refill_rate() -> None:
    limit = RateLimit(per_second=2.0, burst=3)
    assert [limit.take(0.0) for _ in range(4)] == [True, True, True, False]
    assert limit.take(0.4) is False  # 0.8 of a token
    assert limit.take(0.5) is True
    assert limit.take(100.0) and limit.take(100.0) and limit.take(100.0)
    assert limit.take(100.0) is False  # never more than the burst


def test_a_rate_limit_needs_a_rate_and_a_burst() -> None:
    with pytest.raises(ValueError):
        RateLimit(0.0, 1)
    with pytest.raises(ValueError):
        RateLimit(1.0, 0)


def test_a_stop_on_the_other_side_is_cancelled_before_a_new_one() -> None:
    """A stop left from an earlier short, with a long now in the symbol."""
    short_stop = dataclasses.replace(stop(), position_side=Side.SHORT)
    (step,) = plan({"A": position()}, {"A": short_stop}, 1.0, {}, 0.0, 5.0)
    assert (step.action, step.stop) == (Action.CANCEL, short_stop)


def test_moves_go_furthest_behind_first() -> None:
    positions = {s: position(symbol=s, stop_loss=sl) for s, sl in (("A", 91.0), ("B", 95.0))}
    stops = {"A": stop("A", 89.1), "B": stop("B", 89.1)}
    steps = plan(positions, stops, 1.0, {}, 0.0, 5.0)
    assert [s.symbol for s in steps] == ["B", "A"]


def test_the_memo_gives_the_plan_a_fresh_look_would() -> None:
    """A position replaced (its trail tightened) is judged again; the same object is not."""
    memo: dict[str, tuple[Position, tuple[float, float] | None]] = {}
    held = {"A": stop("A", 89.1)}
    before = {"A": position(trailing_stop=5.0, anchor=96.0)}  # trail 91: tighter than 90
    assert plan(before, held, 1.0, {}, 0.0, 5.0, memo) == plan(before, held, 1.0, {}, 0.0, 5.0)
    after = {"A": dataclasses.replace(before["A"], trail_anchor=99.0)}  # trail 94
    fresh = plan(after, held, 1.0, {}, 0.0, 5.0)
    assert plan(after, held, 1.0, {}, 0.0, 5.0, memo) == fresh
    assert fresh[0].trigger == pytest.approx(93.05)
