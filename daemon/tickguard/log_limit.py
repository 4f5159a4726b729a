"""Bounds on log lines (docs/logs.md): a rate limit for lines that someone outside can
cause, and a cap on the lines one burst of events writes.

journald drops a service's lines once it writes more than its burst per
interval, whatever they say: a flood of bad requests would take `[SL]` and
`[EXIT]` lines down with it. A `LogRateLimit` attached to the logger of a
client-driven event lets `burst` records of each kind (logger, level, message
template) through per `interval`, counts the rest, and says how many it held
back on the next record of that kind it lets through:

    WARNING tickguard.http_server: [HTTP] ... (1234 more like this in the last 10s not logged)

The message template, not the formatted message, is the kind: one line per
interval covers every peer and every value.

A `Burst` caps the lines that name their subject in one burst of our own
events, such as a sweep in which the socket's drop turns every guarded
symbol's price into cache: the first `limit` are written, the rest are counted
by kind for one summary line each.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

THROTTLE_INTERVAL = 10.0  # seconds
THROTTLE_BURST = 1  # records of one kind let through per interval
MAX_KINDS = 256  # kinds remembered; the oldest windows are forgotten beyond it


@dataclass(slots=True)
class _Window:
    start: float
    passed: int = 1
    held: int = 0


class LogRateLimit(logging.Filter):
    """A logging filter: at most `burst` records of a kind per `interval` seconds, the rest counted."""

    def __init__(
        self,
        interval: float = THROTTLE_INTERVAL,
        burst: int = THROTTLE_BURST,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__()
        self.interval = interval
        self.burst = burst
        self.held_total = 0
        self._clock = clock
        self._windows: dict[tuple[str, int, str], _Window] = {}

    def reset(self) -> None:
        """Forget every window: the next record of each kind passes."""
        self._windows.clear()

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.name, record.levelno, str(record.msg))
        now = self._clock()
        window = self._windows.get(key)
        if window is None or now - window.start >= self.interval:
            if window is None and len(self._windows) >= MAX_KINDS:
                del self._windows[next(iter(self._windows))]
            self._windows.pop(key, None)  # re-inserted last: dict order is age order
            self._windows[key] = _Window(now)
            if window is not None and window.held:
                span = now - window.start
                _append(record, f"{window.held} more like this in the last {span:.0f}s not logged")
            return True
        if window.passed < self.burst:
            window.passed += 1
            return True
        window.held += 1
        self.held_total += 1
        return False


def _append(record: logging.LogRecord, note: str) -> None:
    """Add `(note)` to the record's message (formatted now: the note holds no %-fields)."""
    record.msg = f"{record.getMessage()} ({note})"
    record.args = None


class Burst:
    """At most `limit` lines of one burst name their subject; the rest are counted per kind.

    Used once per burst: `take(kind)` says whether the line is written, and
    `more` holds, per kind, how many were not (for one summary line each).
    """

    __slots__ = ("left", "more")

    def __init__(self, limit: int) -> None:
        self.left = limit
        self.more: dict[str, int] = {}

    def take(self, kind: str) -> bool:
        """True: write this line. False: it is counted in `more[kind]` instead."""
        if self.left > 0:
            self.left -= 1
            return True
        self.more[kind] = self.more.get(kind, 0) + 1
        return False
