"""The reconnect backoff schedule: growth, cap, jitter, DNS checks, streaks ([feed.reconnect])."""

import math
import random
from dataclasses import dataclass, field

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tickguard.core.backoff import Attempt, Backoff, BackoffPolicy


@dataclass
class FixedUniform:
    """A stand-in for random.Random whose uniform() always gives `value`."""

    value: float = 0.0
    calls: list[tuple[float, float]] = field(default_factory=list)

    def uniform(self, a: float, b: float) -> float:
        self.calls.append((a, b))
        return self.value


# The documented [feed.reconnect] defaults (docs/config.md); the policy has none of its own.
RECONNECT: dict[str, float] = {
    "initial_delay": 0.5,
    "max_delay": 30.0,
    "multiplier": 2.0,
    "jitter": 0.5,
    "dns_check_every": 3,
    "stable_after": 30.0,
}


def policy(**changes: float) -> BackoffPolicy:
    """The documented policy with `changes`."""
    return BackoffPolicy(**{**RECONNECT, **changes})  # type: ignore[arg-type]


def backoff(value: float = 0.0, **changes: float) -> Backoff:
    return Backoff(policy(**changes), FixedUniform(value))


def test_the_policy_has_no_defaults_of_its_own() -> None:
    """Every parameter is given: the defaults live in the configuration only."""
    with pytest.raises(TypeError):
        BackoffPolicy()  # type: ignore[call-arg]


def test_delays_grow_geometrically_up_to_the_cap() -> None:
    """Without jitter the delays are initial * multiplier**(n-1), capped at max_delay."""
    b = backoff()
    delays = [b.failure().delay for _ in range(8)]
    assert delays == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]


def test_a_long_streak_stays_at_the_cap_without_overflow() -> None:
    """Thousands of failures give max_delay rather than an OverflowError."""
    b = backoff()
    for _ in range(5000):
        attempt = b.failure()
    assert attempt == Attempt(number=5000, delay=30.0, recheck_dns=False)


def test_jitter_spreads_each_delay_by_its_fraction() -> None:
    """uniform(-1, 1) at its ends moves the delay by -jitter and +jitter of the base."""
    assert backoff(value=1.0).failure().delay == 0.75
    assert backoff(value=-1.0).failure().delay == 0.25


def test_jitter_asks_the_rng_for_a_symmetric_fraction() -> None:
    """The rng is asked for uniform(-1, 1), once per failure."""
    rng = FixedUniform()
    b = Backoff(policy(), rng)
    b.failure()
    b.auth_failure()
    assert rng.calls == [(-1.0, 1.0), (-1.0, 1.0)]


def test_full_jitter_never_goes_negative() -> None:
    """With jitter 1 the shortest delay is 0, never below."""
    assert backoff(value=-1.0, jitter=1.0).failure().delay == 0.0


def test_works_with_random_random() -> None:
    """A seeded random.Random is a valid source of jitter."""
    b = Backoff(policy(), random.Random(7))
    assert 0.25 <= b.failure().delay <= 0.75


def test_dns_is_rechecked_every_nth_failure_of_a_streak() -> None:
    """recheck_dns is set on the 3rd, 6th, ... failure of a streak."""
    b = backoff()
    assert [b.failure().recheck_dns for _ in range(7)] == [
        False,
        False,
        True,
        False,
        False,
        True,
        False,
    ]


def test_a_connection_closed_at_once_keeps_the_delay_growing() -> None:
    """A server that accepts then closes immediately does not reset the streak."""
    b = backoff()
    now = 0.0
    delays = []
    for _ in range(6):
        b.connected(now)
        now += 0.1
        b.disconnected(now)
        delays.append(b.failure().delay)
        now += delays[-1]
    assert delays == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0]
    assert b.streak(now) == 6


def test_a_stable_connection_ends_the_streak() -> None:
    """A connection that lived stable_after resets the streak to 0."""
    b = backoff()
    for _ in range(4):
        b.failure()
    b.connected(100.0)
    b.disconnected(130.0)
    assert b.streak(130.0) == 0
    assert b.failure() == Attempt(number=1, delay=0.5, recheck_dns=False)


def test_a_connection_just_short_of_stable_keeps_the_streak() -> None:
    """A connection ending a moment before stable_after leaves the streak as it was."""
    b = backoff()
    b.failure()
    b.connected(100.0)
    b.disconnected(129.999)
    assert b.failure().number == 2


def test_streak_reads_zero_while_a_live_connection_is_stable() -> None:
    """streak(now) counts failures until the live connection has lived stable_after."""
    b = backoff()
    b.failure()
    b.failure()
    b.connected(10.0)
    assert b.streak(10.0) == 2
    assert b.streak(39.9) == 2
    assert b.streak(40.0) == 0


def test_attempts_count_every_failure_across_streaks() -> None:
    """`attempts` is cumulative and survives a streak reset."""
    b = backoff()
    b.failure()
    b.failure()
    b.connected(0.0)
    b.disconnected(60.0)
    b.failure()
    b.auth_failure()
    assert b.attempts == 4
    assert b.streak(60.0) == 2


def test_auth_refusals_wait_max_delay() -> None:
    """A 401/403 handshake refusal waits max_delay, jittered, and counts in the streak."""
    assert backoff().auth_failure() == Attempt(number=1, delay=30.0, recheck_dns=False)
    assert backoff(value=-1.0).auth_failure().delay == 15.0


def test_disconnect_without_connect_is_harmless() -> None:
    """disconnected() with no connection up leaves the streak alone."""
    b = backoff()
    b.failure()
    b.disconnected(1000.0)
    assert b.streak(1000.0) == 1


def test_a_failure_ends_a_connection_still_marked_up() -> None:
    """failure() without disconnected() first no longer counts the old connection as up."""
    b = backoff()
    b.connected(0.0)
    b.failure()
    assert b.streak(100.0) == 1


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("initial_delay", 0.0),
        ("initial_delay", math.nan),
        ("initial_delay", math.inf),
        ("max_delay", 0.1),
        ("max_delay", math.inf),
        ("multiplier", 0.9),
        ("multiplier", math.inf),
        ("jitter", -0.1),
        ("jitter", 1.5),
        ("dns_check_every", 0),
        ("stable_after", -1.0),
        ("stable_after", math.nan),
    ],
)
def test_rejects_invalid_policies(name: str, value: float) -> None:
    """A policy value out of range is refused with its name in the message."""
    with pytest.raises(ValueError, match=name):
        policy(**{name: value})


# -- properties -----------------------------------------------------------------

finite = {"allow_nan": False, "allow_infinity": False}


@st.composite
def policies(draw: st.DrawFn, jitter: float | None = None) -> BackoffPolicy:
    initial = draw(st.floats(min_value=1e-6, max_value=1e4, **finite))
    return BackoffPolicy(
        initial_delay=initial,
        max_delay=draw(st.floats(min_value=initial, max_value=1e6, **finite)),
        multiplier=draw(st.floats(min_value=1.0, max_value=100.0, **finite)),
        jitter=draw(st.floats(min_value=0.0, max_value=1.0)) if jitter is None else jitter,
        dns_check_every=draw(st.integers(min_value=1, max_value=10)),
        stable_after=draw(st.floats(min_value=0.0, max_value=1e4, **finite)),
    )


gaps = st.floats(min_value=0.0, max_value=1e4, **finite)
events = st.lists(
    st.tuples(st.sampled_from(["failure", "auth", "connected", "disconnected"]), gaps),
    max_size=60,
)


@given(policies(), st.randoms(use_true_random=False), events)
def test_delays_stay_within_bounds(
    policy: BackoffPolicy, rng: random.Random, steps: list[tuple[str, float]]
) -> None:
    """Every delay lies in [0, max_delay * (1 + jitter)], whatever the event order."""
    b = Backoff(policy, rng)
    now = 0.0
    for kind, gap in steps:
        now += gap
        if kind == "connected":
            b.connected(now)
        elif kind == "disconnected":
            b.disconnected(now)
        else:
            attempt = b.failure() if kind == "failure" else b.auth_failure()
            assert 0.0 <= attempt.delay <= policy.max_delay * (1 + policy.jitter)


# A reconnect cycle: some failures, then a connection living `life` seconds.
cycles = st.lists(st.tuples(st.integers(min_value=0, max_value=5), gaps), min_size=1, max_size=12)


@given(policies(jitter=0.0), cycles)
def test_unjittered_delays_never_shrink_within_a_streak(
    policy: BackoffPolicy, steps: list[tuple[int, float]]
) -> None:
    """Without jitter each failure of a streak waits at least as long as the one before."""
    b = Backoff(policy, FixedUniform())
    now, previous = 0.0, Attempt(0, 0.0, False)
    for failures, life in steps:
        for _ in range(failures):
            attempt = b.failure()
            if attempt.number > 1:
                assert attempt.delay >= previous.delay
            previous = attempt
        b.connected(now)
        now += life
        b.disconnected(now)


@given(policies(), cycles)
def test_streak_resets_only_after_a_stable_connection(
    policy: BackoffPolicy, steps: list[tuple[int, float]]
) -> None:
    """A streak restarts at 1 only after a connection lived stable_after; else it counts on."""
    b = Backoff(policy, FixedUniform())
    now, expected = 0.0, 0
    for failures, life in steps:
        for _ in range(failures):
            expected += 1
            assert b.failure().number == expected
        up, now = now, now + life
        b.connected(up)
        stable = now - up >= policy.stable_after
        assert b.streak(now) == (0 if stable else expected)
        b.disconnected(now)
        if stable:
            expected = 0
        assert b.streak(now) == expected
