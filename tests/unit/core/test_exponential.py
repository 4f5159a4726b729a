"""The one capped exponential backoff, and every schedule built on it, pinned to its numbers."""

from __future__ import annotations

import dataclasses
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tickguard.core.backoff import BackoffPolicy, Exponential
from tickguard.core.exits import retry_delay
from tickguard.core.guard import REJECT_HOLD, BlindPolicy, ExitDecided, Guard
from tickguard.core.positions import Position, PositionSpec, Side
from tickguard.core.prices import PriceBook, PriceSource


def test_doubles_from_initial_up_to_the_cap() -> None:
    """delay(n) is initial * multiplier**(n-1), capped."""
    schedule = Exponential(initial=0.5, cap=8.0)
    assert [schedule.delay(n) for n in range(1, 8)] == [0.5, 1.0, 2.0, 4.0, 8.0, 8.0, 8.0]


def test_counts_below_one_give_the_first_delay() -> None:
    """No failure yet (0) or a negative count waits the initial delay, never less."""
    schedule = Exponential(initial=0.5, cap=8.0)
    assert schedule.delay(0) == schedule.delay(-3) == 0.5


def test_other_multipliers() -> None:
    """The multiplier is the growth per failure; 1 is a constant delay."""
    assert [Exponential(1.0, 100.0, 3.0).delay(n) for n in (1, 2, 3, 4, 5)] == [
        1.0,
        3.0,
        9.0,
        27.0,
        81.0,
    ]
    assert Exponential(2.0, 2.0, 1.0).delay(10**9) == 2.0


@pytest.mark.parametrize("failures", [1_100, 5_000, 10**18])
def test_huge_counts_give_the_cap_without_overflow(failures: int) -> None:
    """A count whose growth overflows a float gives the cap rather than raising."""
    assert Exponential(initial=0.5, cap=30.0).delay(failures) == 30.0
    assert Exponential(initial=1e300, cap=1e308, multiplier=1e10).delay(3) == 1e308


@pytest.mark.parametrize(
    ("changes", "name"),
    [
        ({"initial": 0.0}, "initial"),
        ({"initial": -1.0}, "initial"),
        ({"initial": math.nan}, "initial"),
        ({"initial": math.inf}, "initial"),
        ({"cap": 0.1}, "cap"),
        ({"cap": math.inf}, "cap"),
        ({"cap": math.nan}, "cap"),
        ({"multiplier": 0.9}, "multiplier"),
        ({"multiplier": math.inf}, "multiplier"),
        ({"multiplier": math.nan}, "multiplier"),
    ],
)
def test_rejects_invalid_schedules(changes: dict[str, float], name: str) -> None:
    """A schedule that would shrink, never start or never stop is refused, naming the field."""
    with pytest.raises(ValueError, match=f"^{name} = "):
        Exponential(**{"initial": 0.5, "cap": 8.0, **changes})


def test_is_frozen() -> None:
    """A schedule is a value: it cannot be changed once made."""
    with pytest.raises(dataclasses.FrozenInstanceError):
        Exponential(0.5, 8.0).cap = 9.0  # type: ignore[misc]


finite = {"allow_nan": False, "allow_infinity": False}


@st.composite
def schedules(draw: st.DrawFn) -> Exponential:
    initial = draw(st.floats(min_value=1e-9, max_value=1e6, **finite))
    cap = draw(st.floats(min_value=initial, max_value=1e9, **finite))
    return Exponential(initial, cap, draw(st.floats(min_value=1.0, max_value=1e6, **finite)))


@given(schedules(), st.integers(min_value=-10, max_value=10**6))
def test_delays_stay_between_initial_and_cap(schedule: Exponential, failures: int) -> None:
    """Every delay lies in [initial, cap], for any count."""
    assert schedule.initial <= schedule.delay(failures) <= schedule.cap


@given(schedules(), st.integers(min_value=1, max_value=10**4))
def test_delays_never_shrink(schedule: Exponential, failures: int) -> None:
    """One more failure never shortens the delay."""
    assert schedule.delay(failures + 1) >= schedule.delay(failures)


# -- the schedules built on it, with today's numbers --------------------------------


def test_reconnect_policy_grows_along_its_exponential() -> None:
    """BackoffPolicy's base delay is its Exponential's (initial_delay, max_delay, multiplier)."""
    policy = BackoffPolicy(0.5, 30.0, 2.0, 0.5, 3, 30.0)
    assert policy.growth == Exponential(0.5, 30.0, 2.0)
    assert [policy.base_delay(n) for n in range(1, 9)] == [
        0.5,
        1.0,
        2.0,
        4.0,
        8.0,
        16.0,
        30.0,
        30.0,
    ]


def test_reconnect_policy_names_its_own_fields_when_invalid() -> None:
    """A bad growth parameter is named as the policy (and the config) names it."""
    with pytest.raises(ValueError, match=r"^max_delay = 0\.1; expected a finite number >= "):
        BackoffPolicy(0.5, 0.1, 2.0, 0.5, 3, 30.0)


def test_policies_compare_by_their_parameters() -> None:
    """The derived schedule takes no part in equality or repr; replace() rebuilds it."""
    policy = BackoffPolicy(0.5, 30.0, 2.0, 0.5, 3, 30.0)
    assert policy == BackoffPolicy(0.5, 30.0, 2.0, 0.5, 3, 30.0)
    assert "growth" not in repr(policy)
    assert dataclasses.replace(policy, max_delay=4.0).growth == Exponential(0.5, 4.0, 2.0)


def test_exit_retries_wait_half_a_second_doubling_to_eight() -> None:
    """Exit retries: 0.5 s, 1 s, 2 s, 4 s, then 8 s for good, and no overflow."""
    assert [retry_delay(n) for n in range(0, 8)] == [0.5, 0.5, 1.0, 2.0, 4.0, 8.0, 8.0, 8.0]
    assert retry_delay(10**6) == 8.0


def test_reject_hold_is_one_second_doubling_to_a_minute() -> None:
    """The hold after a refused exit: 1 s, 2 s, 4 s, ... 32 s, then 60 s."""
    assert [REJECT_HOLD.delay(n) for n in range(1, 9)] == [1, 2, 4, 8, 16, 32, 60, 60]


def _refused_at(exit_seq: int, now: float) -> Guard:
    """A guard whose position's `exit_seq`-th exit (a stop) was refused at `now`."""
    g = Guard(
        PriceBook(stale_warning=30.0, cache_timeout=300.0),
        blind_policy=BlindPolicy.HOLD,
        blind_after=60.0,
        install_id="t",
    )
    spec = PositionSpec("A", Side.LONG, 10.0, 100.0, stop_loss=95.0)
    g.add(Position(1, spec, exit_seq=exit_seq - 1), 0.0)
    g.book.update("A", 94.0, None, PriceSource.POLL, now)
    events = g.evaluate("A", now, 0.0, market_open=True)
    (decided,) = [e for e in events if isinstance(e, ExitDecided)]
    assert decided.position.exit_seq == exit_seq
    cid = decided.exit.client_order_id
    g.exit_sending(cid)
    g.exit_rejected(cid, "refused", now)
    return g


@pytest.mark.parametrize(("exit_seq", "hold"), [(1, 1.0), (3, 4.0), (7, 60.0), (5_000, 60.0)])
def test_a_refused_exit_is_held_on_the_schedule(exit_seq: int, hold: float) -> None:
    """The guard re-arms the rule after REJECT_HOLD.delay(exit_seq), capped, without overflow."""
    g = _refused_at(exit_seq, now=10.0)
    just_before = 10.0 + hold - 0.01
    g.book.update("A", 94.0, None, PriceSource.POLL, just_before)
    assert not [e for e in g.sweep(just_before, 0.0, True) if isinstance(e, ExitDecided)]
    assert [e for e in g.sweep(10.0 + hold, 0.0, True) if isinstance(e, ExitDecided)]
