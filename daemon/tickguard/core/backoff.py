"""The reconnect backoff schedule ([feed.reconnect]).

Delays grow geometrically along a *streak* of failed attempts, capped at
`max_delay`, each randomised by `jitter`. A streak ends only when a connection
has lived `stable_after` seconds: a server that accepts and then closes at
once keeps the delay growing instead of being hammered.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol


class Uniform(Protocol):
    """A source of uniform random floats; `random.Random` is one."""

    def uniform(self, a: float, b: float) -> float: ...


@dataclass(frozen=True, slots=True)
class BackoffPolicy:
    """The schedule's parameters; defaults are SPEC section 2's."""

    initial_delay: float = 0.5
    max_delay: float = 30.0
    multiplier: float = 2.0
    jitter: float = 0.5  # fraction of each delay randomised, 0..1
    dns_check_every: int = 3  # re-check DNS health on every N-th failure of a streak
    stable_after: float = 30.0  # a connection that lives this long ends the streak

    def __post_init__(self) -> None:
        rules = (
            ("initial_delay", 0 < self.initial_delay < math.inf, "a finite number > 0"),
            (
                "max_delay",
                self.initial_delay <= self.max_delay < math.inf,
                "a finite number >= initial_delay",
            ),
            ("multiplier", 1 <= self.multiplier < math.inf, "a finite number >= 1"),
            ("jitter", 0 <= self.jitter <= 1, "a number from 0 to 1"),
            ("dns_check_every", self.dns_check_every >= 1, "an integer >= 1"),
            ("stable_after", 0 <= self.stable_after < math.inf, "a finite number >= 0"),
        )
        for name, ok, expected in rules:
            if not ok:
                raise ValueError(f"{name} = {getattr(self, name)!r}; expected {expected}")

    def base_delay(self, number: int) -> float:
        """The delay before jitter after the `number`-th failure of a streak (1-based)."""
        try:
            grown = self.initial_delay * self.multiplier ** (number - 1)
        except OverflowError:  # float ** int raises instead of giving inf
            return self.max_delay
        return min(self.max_delay, grown)


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
