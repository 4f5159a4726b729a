"""Position validation, triggers and the trailing stop."""

import math

from hypothesis import given
from hypothesis import strategies as st

from tickguard.core.positions import (
    MISSING,
    ExitReason,
    Position,
    PositionSpec,
    Side,
    Trigger,
    check_triggers,
    parse_spec,
    valid_symbol,
)

LONG, SHORT = Side.LONG, Side.SHORT


def pos(side: Side = LONG, entry: float = 100.0, **kw: float) -> Position:
    return Position(id=1, spec=PositionSpec("A", side, 10.0, entry, **kw))


def test_valid_specs_have_no_problems() -> None:
    """A long with SL < TP and a short with SL > TP are valid, profit-side stops too."""
    assert PositionSpec("A", LONG, 1, 100, stop_loss=90, take_profit=120).problems() == []
    assert PositionSpec("A", SHORT, 1, 100, stop_loss=110, take_profit=80).problems() == []
    assert PositionSpec("A", LONG, 1, 100, stop_loss=105, take_profit=120).problems() == []


def test_invalid_specs_name_the_field_and_value() -> None:
    """Each broken rule names its field and the offending value."""
    cases = [
        (PositionSpec("A", LONG, 0, 100), "quantity", 0),
        (PositionSpec("A", LONG, 1, -5), "entry_price", -5),
        (PositionSpec("A", LONG, 1, math.nan), "entry_price", None),
        (PositionSpec("A", LONG, 1, 100, stop_loss=math.inf), "stop_loss", math.inf),
        (PositionSpec("A", LONG, 1, 100, trailing_stop=0), "trailing_stop", 0),
        (PositionSpec("A", LONG, 1, 100, stop_loss=120, take_profit=110), "stop_loss", 120),
        (PositionSpec("A", SHORT, 1, 100, stop_loss=90, take_profit=95), "stop_loss", 90),
        (PositionSpec("", LONG, 1, 100), "symbol", ""),
        (PositionSpec(" A", LONG, 1, 100), "symbol", " A"),
    ]
    for spec, field, value in cases:
        problems = spec.problems()
        assert len(problems) == 1, (spec, problems)
        assert problems[0].field == field
        if value is not None:
            assert problems[0].value == value


def test_long_triggers() -> None:
    """Long: SL at price <= SL, TP at price >= TP, nothing between."""
    p = pos(stop_loss=90, take_profit=120)
    assert check_triggers(p, 95) is None
    assert check_triggers(p, 90) == Trigger(ExitReason.STOP_LOSS, 90, 90)
    assert check_triggers(p, 120) == Trigger(ExitReason.TAKE_PROFIT, 120, 120)


def test_short_triggers_mirror() -> None:
    """Short: SL at price >= SL, TP at price <= TP."""
    p = pos(SHORT, stop_loss=110, take_profit=80)
    assert check_triggers(p, 100) is None
    assert check_triggers(p, 110) == Trigger(ExitReason.STOP_LOSS, 110, 110)
    assert check_triggers(p, 79) == Trigger(ExitReason.TAKE_PROFIT, 80, 79)


def test_trailing_ratchets_and_fires_long() -> None:
    """A long's trailing stop follows new highs and fires on the pullback."""
    p = pos(trailing_stop=5)
    assert p.trailing_level() == 95
    p = p.ratchet(110)
    assert p.trailing_level() == 105
    p = p.ratchet(104)
    assert p.trailing_level() == 105
    trig = check_triggers(p, 104)
    assert trig is not None and trig.reason is ExitReason.TRAILING_STOP and trig.level == 105


def test_trailing_short() -> None:
    """A short's trailing stop follows new lows."""
    p = pos(SHORT, trailing_stop=5).ratchet(90)
    assert p.trailing_level() == 95
    assert check_triggers(p, 96) == Trigger(ExitReason.TRAILING_STOP, 95, 96)


def test_no_trailing_means_no_level() -> None:
    """Without a trailing stop ratchet is a no-op."""
    p = pos()
    assert p.ratchet(1000) is p and p.trailing_level() is None


def test_tighter_stop_wins_when_both_crossed() -> None:
    """With SL and trailing both crossed, the tighter one is reported; SL wins ties."""
    p = pos(stop_loss=90, trailing_stop=5).ratchet(110)  # trail at 105
    trig = check_triggers(p, 80)
    assert trig is not None and trig.reason is ExitReason.TRAILING_STOP
    p = pos(stop_loss=95, trailing_stop=5)  # trail at 95 too
    trig = check_triggers(p, 80)
    assert trig is not None and trig.reason is ExitReason.STOP_LOSS
    s = pos(SHORT, stop_loss=110, trailing_stop=5).ratchet(90)  # trail at 95
    trig = check_triggers(s, 120)
    assert trig is not None and trig.reason is ExitReason.TRAILING_STOP


def test_pnl_sign() -> None:
    """pnl is (exit - entry) x qty for a long and the reverse for a short."""
    assert pos(entry=735).pnl(575) == -1600.0
    assert pos(SHORT, entry=735).pnl(575) == 1600.0


def test_describe_matches_log_format() -> None:
    """Trigger descriptions read like the SPEC's log lines."""
    assert Trigger(ExitReason.STOP_LOSS, 698.25, 575).describe(LONG) == "price 575.00 <= SL 698.25"
    assert Trigger(ExitReason.TAKE_PROFIT, 80, 79).describe(SHORT) == "price 79.00 <= TP 80.00"
    assert Trigger(ExitReason.TAKE_PROFIT, 80, 81).describe(LONG) == "price 81.00 >= TP 80.00"
    assert Trigger(ExitReason.TRAILING_STOP, 95, 96).describe(SHORT) == "price 96.00 >= TRAIL 95.00"


prices = st.floats(1.0, 1000.0)


@given(st.sampled_from([LONG, SHORT]), st.floats(0.1, 50.0), st.lists(prices, max_size=50))
def test_trailing_stop_never_loosens(side: Side, distance: float, path: list[float]) -> None:
    """Along any price path the trailing level only moves in the favourable direction."""
    p = pos(side, trailing_stop=distance)
    level = p.trailing_level()
    assert level is not None
    for price in path:
        p = p.ratchet(price)
        new = p.trailing_level()
        assert new is not None
        assert new >= level if side is LONG else new <= level
        level = new


def test_parse_spec_from_user_input() -> None:
    """User input parses to a spec with ints as floats and nulls as absent, or names every problem."""
    spec, problems = parse_spec(
        {"symbol": "A", "side": "short", "quantity": 3, "entry_price": 10, "stop_loss": None}
    )
    assert problems == [] and spec == PositionSpec("A", Side.SHORT, 3.0, 10.0)
    spec, problems = parse_spec({"symbol": 5, "side": "up", "quantity": True, "take_profit": "9"})
    assert spec is None
    assert [(p.field, p.value) for p in problems] == [
        ("symbol", 5),
        ("side", "up"),
        ("quantity", True),
        ("entry_price", MISSING),
        ("take_profit", "9"),
    ]
    assert repr(MISSING) == "<missing>"
    spec, problems = parse_spec(
        {
            "symbol": "A",
            "side": "long",
            "quantity": 1,
            "entry_price": 10,
            "stop_loss": 12,
            "take_profit": 11,
        }
    )
    assert spec is None and [p.field for p in problems] == ["stop_loss"]


def test_symbols_and_amounts_have_sane_bounds() -> None:
    """Control characters, lone surrogates, huge symbols and absurd amounts are refused."""
    assert valid_symbol("NSE_EQ|INE848E01016") and valid_symbol("Nifty 50")
    for bad in ("", " A", "A\\x00", "A\\nB", "\\ud800", "X" * 65):
        assert not valid_symbol(bad.encode().decode("unicode_escape")), bad
    (problem,) = PositionSpec("A", Side.LONG, 1e13, 100).problems()
    assert problem.field == "quantity" and "below" in problem.expected


def test_parse_spec_names_every_problem_of_an_entry() -> None:
    """A bad side and a negative quantity in one entry are both named, not just the first."""
    spec, problems = parse_spec(
        {"symbol": "A", "side": "sideways", "quantity": -1, "entry_price": 100.0}
    )
    assert spec is None
    assert [p.field for p in problems] == ["side", "quantity"]
    spec, problems = parse_spec(
        {"symbol": " A", "side": "long", "quantity": "ten", "entry_price": 100.0,
         "stop_loss": 120.0, "take_profit": 110.0}
    )  # fmt: skip
    assert spec is None
    assert [p.field for p in problems] == ["quantity", "symbol", "stop_loss"]
