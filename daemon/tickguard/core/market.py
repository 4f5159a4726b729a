"""Market hours ([market]): whether the market is open at an instant, and when that changes.

Sessions are wall-clock times in the market's time zone, on its weekdays that
are not holidays, all judged in the market's local date. Each session of a
day becomes one interval of instants, start inclusive, end exclusive; a wall
time the clock skips or repeats at a DST change is read as `datetime` does by
default (PEP 495 fold=0): a skipped time falls the jump's length later, a
repeated one means its first occurrence. The tzinfo comes from the caller.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta, tzinfo

SEARCH_DAYS = 370  # next_change looks no further ahead than this
_DAY = timedelta(days=1)


@dataclass(frozen=True, slots=True)
class MarketCalendar:
    """When the market is open: sessions on weekdays (0 = Monday) minus holidays."""

    tz: tzinfo
    sessions: tuple[tuple[time, time], ...]
    weekdays: frozenset[int]
    holidays: frozenset[date]
    always_open: bool

    def __post_init__(self) -> None:
        for start, end in self.sessions:
            if not start < end:
                raise ValueError(f"session {start}-{end}: start must be before end")
        if not self.weekdays <= frozenset(range(7)):
            raise ValueError(f"weekdays {sorted(self.weekdays)}: expected 0 (Monday) to 6")

    def is_open(self, at: datetime) -> bool:
        """Whether the market is open at the aware instant `at`."""
        instant = _utc(at)
        if self.always_open:
            return True
        return any(start <= instant < end for start, end in self._around(instant))

    def next_change(self, at: datetime) -> datetime | None:
        """The first instant after `at` (in UTC) when the market opens or closes.

        None when always open, or when nothing changes within SEARCH_DAYS.
        Returned in UTC: subtracting two aware datetimes that share one zone
        ignores DST, one in UTC and one in any zone does not.
        """
        instant = _utc(at)
        if self.always_open:
            return None
        was_open = self.is_open(instant)
        first = instant.astimezone(self.tz).date() - _DAY
        for offset in range(SEARCH_DAYS + 2):
            sessions = self._sessions_on(first + offset * _DAY)
            for edge in sorted(edge for session in sessions for edge in session):
                if edge > instant and self.is_open(edge) != was_open:
                    return edge
        return None

    def _around(self, instant: datetime) -> list[tuple[datetime, datetime]]:
        # Neighbouring days too: a session of one local date may reach into the
        # next where a zone moves its clock across midnight.
        day = instant.astimezone(self.tz).date()
        return [s for d in (day - _DAY, day, day + _DAY) for s in self._sessions_on(d)]

    def _sessions_on(self, day: date) -> list[tuple[datetime, datetime]]:
        """The sessions of local date `day` as UTC instants; none on a closed day."""
        if day.weekday() not in self.weekdays or day in self.holidays:
            return []
        return [
            (self._instant(day, start), self._instant(day, end)) for start, end in self.sessions
        ]

    def _instant(self, day: date, wall: time) -> datetime:
        return datetime.combine(day, wall, tzinfo=self.tz).astimezone(UTC)


def _utc(at: datetime) -> datetime:
    if at.utcoffset() is None:
        raise ValueError(f"{at.isoformat()} is a naive datetime; expected an aware one")
    return at.astimezone(UTC)
