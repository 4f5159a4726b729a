"""Capped exponential backoff: the one schedule every growing delay uses.

`Exponential` is the schedule: `initial` after the first failure in a row,
times `multiplier` after each further one, never above `cap`. It paces feed
reconnects (`BackoffPolicy`, [feed.reconnect] in docs/config.md), exit retries
(`core.exits.retry_delay`) and the hold after a refused exit (`core.guard`).

For reconnects, delays grow along a *streak* of failed attempts, each
randomised by `jitter`. A streak ends only when a connection has lived
`stable_after` seconds: a server that accepts and then closes at once keeps
the delay growing instead of being hammered.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Protocol


class Uniform(Protocol):
    """A source of uniform random floats; `random.Random` is one."""

    def uniform(self, a: float, b: float) -> float: ...


_Rule = tuple[str, object, bool, str]  # (name, value, whether valid, what is expected)


def _require(*rules: _Rule) -> None:
    """Raise ValueError naming the first rule that is broken."""
    for name, value, ok, expected in rules:
        if not ok:
            raise ValueError(f"{name} = {value!r}; expected {expected}")


def _growth_rules(
    names: tuple[str, str, str], initial: float, cap: float, multiplier: float
) -> tuple[_Rule, ...]:
    """The rules of a capped exponential schedule, named as its owner names the three."""
    initial_name, cap_name, multiplier_name = names
    return (
        (initial_name, initial, 0 < initial < math.inf, "a finite number > 0"),
        (cap_name, cap, initial <= cap < math.inf, f"a finite number >= {initial_name}"),
        (multiplier_name, multiplier, 1 <= multiplier < math.inf, "a finite number >= 1"),
    )


@dataclass(frozen=True, slots=True)
class Exponential:
    """A capped exponential delay: `initial`, then times `multiplier` per failure, up to `cap`."""

    initial: float  # seconds after the first failure
    cap: float  # seconds: no delay is longer
    multiplier: float = 2.0

    def __post_init__(self) -> None:
        _require(
            *_growth_rules(
                ("initial", "cap", "multiplier"), self.initial, self.cap, self.multiplier
            )
        )

    def delay(self, failures: int) -> float:
        """The delay after the `failures`-th failure in a row (1-based; 0 or less counts as 1).

        Never raises: a count so large that the growth overflows gives `cap`.
        """
        try:
            grown = self.initial * self.multiplier ** max(0, failures - 1)
        except OverflowError:  # float ** int raises instead of giving inf
            return self.cap
        return min(self.cap, grown)


@dataclass(frozen=True, slots=True)
class BackoffPolicy:
    """The reconnect schedule's parameters ([feed.reconnect]; config.DEFAULTS holds the
    defaults, docs/config.md explains them)."""

    initial_delay: float
    max_delay: float
    multiplier: float
    jitter: float  # fraction of each delay randomised, 0..1
    dns_check_every: int  # re-check DNS health on every N-th failure of a streak
    stable_after: float  # a connection that lives this long ends the streak
    growth: Exponential = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        _require(
            *_growth_rules(
                ("initial_delay", "max_delay", "multiplier"),
                self.initial_delay,
                self.max_delay,
                self.multiplier,
            ),
            ("jitter", self.jitter, 0 <= self.jitter <= 1, "a number from 0 to 1"),
            ("dns_check_every", self.dns_check_every, self.dns_check_every >= 1, "an integer >= 1"),
            (
                "stable_after",
                self.stable_after,
                0 <= self.stable_after < math.inf,
                "a finite number >= 0",
            ),
        )
        growth = Exponential(self.initial_delay, self.max_delay, self.multiplier)
        object.__setattr__(self, "growth", growth)  # frozen: set once, here

    def base_delay(self, number: int) -> float:
        """The delay before jitter after the `number`-th failure of a streak (1-based)."""
        return self.growth.delay(number)


@dataclass(frozen=True, slots=True)
class Attempt:
    """What to do after a failure: wait `delay` seconds, maybe re-check DNS first."""

    number: int  # position in the current streak, 1-based
    delay: float
    recheck_dns: bool


class Backoff:
    """Tracks the failure streak of one feed connection and hands out delays.

    Call `failure()` after each failed connect attempt and after a connection
    ended (following `disconnected(now)`); `now` is monotonic seconds.
    """

    def __init__(self, policy: BackoffPolicy, rng: Uniform) -> None:
        self.policy = policy
        self._rng = rng
        self._streak = 0
        self._up_since: float | None = None
        self.attempts = 0  # every failure since start, across streaks

    def failure(self) -> Attempt:
        """Counts a failure and gives the jittered, geometrically grown delay."""
        return self._fail(self.policy.base_delay(self._streak + 1))

    def auth_failure(self) -> Attempt:
        """Counts a handshake refused with 401/403 and gives a delay at max_delay."""
        return self._fail(self.policy.max_delay)

    def connected(self, now: float) -> None:
        """A connection came up at `now`."""
        self._up_since = now

    def disconnected(self, now: float) -> None:
        """The connection ended at `now`; the streak ends if it lived stable_after."""
        if self._lived_stable(now):
            self._streak = 0
        self._up_since = None

    def streak(self, now: float) -> int:
        """Failed attempts since the last stable connection (0 while one is up and stable)."""
        return 0 if self._lived_stable(now) else self._streak

    def _lived_stable(self, now: float) -> bool:
        up = self._up_since
        return up is not None and now - up >= self.policy.stable_after

    def _fail(self, base: float) -> Attempt:
        # A failure means no connection is up, even if `disconnected` was not called.
        self._up_since = None
        self._streak += 1
        self.attempts += 1
        spread = self.policy.jitter * self._rng.uniform(-1.0, 1.0)
        return Attempt(
            number=self._streak,
            delay=max(0.0, base * (1.0 + spread)),
            recheck_dns=self._streak % self.policy.dns_check_every == 0,
        )
