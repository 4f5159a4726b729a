"""Market hours: sessions, weekdays, holidays, time zones and DST ([market])."""

from datetime import UTC, date, datetime, time, timedelta, timezone
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tickguard.core.market import SEARCH_DAYS, MarketCalendar

KOLKATA = ZoneInfo("Asia/Kolkata")
NEW_YORK = ZoneInfo("America/New_York")
MON_FRI = frozenset(range(5))
EVERY_DAY = frozenset(range(7))


def calendar(
    tz: ZoneInfo = KOLKATA,
    sessions: tuple[tuple[time, time], ...] = ((time(9, 15), time(15, 30)),),
    weekdays: frozenset[int] = MON_FRI,
    holidays: frozenset[date] = frozenset(),
    always_open: bool = False,
) -> MarketCalendar:
    return MarketCalendar(tz, sessions, weekdays, holidays, always_open)


def ist(*args: int) -> datetime:
    return datetime(*args, tzinfo=KOLKATA)  # type: ignore[arg-type, misc]


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)  # type: ignore[arg-type, misc]


# 2026-01-05 is a Monday.


def test_session_start_is_inclusive_and_end_exclusive() -> None:
    """The market opens at the session's first instant and is closed at its end."""
    nse = calendar()
    assert not nse.is_open(ist(2026, 1, 5, 9, 14, 59))
    assert nse.is_open(ist(2026, 1, 5, 9, 15))
    assert nse.is_open(ist(2026, 1, 5, 15, 29, 59))
    assert not nse.is_open(ist(2026, 1, 5, 15, 30))


def test_closed_on_weekends() -> None:
    """Inside session hours on a Saturday or Sunday the market is closed."""
    nse = calendar()
    assert not nse.is_open(ist(2026, 1, 10, 11, 0))
    assert not nse.is_open(ist(2026, 1, 11, 11, 0))


def test_closed_on_holidays() -> None:
    """A listed holiday closes an otherwise open weekday, and only that day."""
    nse = calendar(holidays=frozenset({date(2026, 1, 26)}))
    assert not nse.is_open(ist(2026, 1, 26, 11, 0))
    assert nse.is_open(ist(2026, 1, 27, 11, 0))


def test_always_open_ignores_sessions_and_days() -> None:
    """An always-open market is open on a Sunday night and never changes."""
    venue = calendar(weekdays=frozenset(), always_open=True)
    assert venue.is_open(ist(2026, 1, 11, 3, 0))
    assert venue.next_change(ist(2026, 1, 11, 3, 0)) is None


def test_several_sessions_leave_a_break_closed() -> None:
    """With a lunch break the market is closed between its two sessions."""
    venue = calendar(sessions=((time(9, 0), time(11, 30)), (time(12, 30), time(15, 0))))
    assert venue.is_open(ist(2026, 1, 5, 11, 0))
    assert not venue.is_open(ist(2026, 1, 5, 12, 0))
    assert venue.is_open(ist(2026, 1, 5, 13, 0))
    assert venue.next_change(ist(2026, 1, 5, 11, 0)) == ist(2026, 1, 5, 11, 30)
    assert venue.next_change(ist(2026, 1, 5, 12, 0)) == ist(2026, 1, 5, 12, 30)


def test_touching_sessions_are_one_open_stretch() -> None:
    """Where one session ends as the next starts, nothing changes."""
    venue = calendar(sessions=((time(9, 0), time(12, 0)), (time(12, 0), time(15, 0))))
    assert venue.is_open(ist(2026, 1, 5, 12, 0))
    assert venue.next_change(ist(2026, 1, 5, 10, 0)) == ist(2026, 1, 5, 15, 0)


def test_weekday_is_judged_in_the_market_zone() -> None:
    """A Sunday evening in UTC is Monday in Kolkata, so a session just after midnight is open."""
    night = calendar(sessions=((time(0, 15), time(6, 0)),))
    sunday_utc = utc(2026, 1, 4, 19, 0)  # Monday 00:30 IST
    assert sunday_utc.weekday() == 6
    assert night.is_open(sunday_utc)
    assert not night.is_open(utc(2026, 1, 9, 19, 0))  # Friday in UTC, Saturday 00:30 IST


def test_any_aware_zone_is_converted() -> None:
    """An instant given in another zone is judged at the same moment in the market's zone."""
    tokyo = timezone(timedelta(hours=9))
    nse = calendar()
    assert nse.is_open(datetime(2026, 1, 5, 12, 45, tzinfo=tokyo))  # 09:15 IST
    assert not nse.is_open(datetime(2026, 1, 5, 12, 44, tzinfo=tokyo))


def test_naive_datetimes_are_refused() -> None:
    """A datetime without a zone is ambiguous, so both methods refuse it."""
    nse = calendar()
    with pytest.raises(ValueError, match="naive"):
        nse.is_open(datetime(2026, 1, 5, 11, 0))
    with pytest.raises(ValueError, match="naive"):
        nse.next_change(datetime(2026, 1, 5, 11, 0))


def test_next_change_from_before_during_and_after_a_session() -> None:
    """Before the open it is the open, inside the session the close, after it the next open."""
    nse = calendar()
    assert nse.next_change(ist(2026, 1, 5, 8, 0)) == ist(2026, 1, 5, 9, 15)
    assert nse.next_change(ist(2026, 1, 5, 9, 15)) == ist(2026, 1, 5, 15, 30)
    assert nse.next_change(ist(2026, 1, 5, 15, 30)) == ist(2026, 1, 6, 9, 15)


def test_next_change_skips_weekends_and_holidays() -> None:
    """After Friday's close, with Monday a holiday, the next open is Tuesday's."""
    nse = calendar(holidays=frozenset({date(2026, 1, 12)}))
    assert nse.next_change(ist(2026, 1, 9, 16, 0)) == ist(2026, 1, 13, 9, 15)


def test_next_change_is_in_utc() -> None:
    """next_change answers in UTC, safe to subtract from any aware instant."""
    change = calendar().next_change(ist(2026, 1, 5, 8, 0))
    assert change is not None and change.tzinfo is UTC
    assert change == utc(2026, 1, 5, 3, 45)


def test_never_opening_calendars_have_no_next_change() -> None:
    """With no weekdays, or no sessions, next_change is None rather than a loop."""
    assert calendar(weekdays=frozenset()).next_change(ist(2026, 1, 5, 8, 0)) is None
    assert calendar(sessions=()).next_change(ist(2026, 1, 5, 8, 0)) is None


def test_next_change_looks_no_further_than_its_bound() -> None:
    """An open day beyond SEARCH_DAYS is not found; one just within it is."""
    start = date(2026, 1, 5)
    mondays = {start + timedelta(weeks=w) for w in range(SEARCH_DAYS // 7 + 1)}
    far = calendar(weekdays=frozenset({0}), holidays=frozenset(mondays))
    assert far.next_change(ist(2026, 1, 5, 8, 0)) is None
    near = calendar(weekdays=frozenset({0}), holidays=frozenset(mondays - {max(mondays)}))
    assert near.next_change(ist(2026, 1, 5, 8, 0)) == datetime.combine(
        max(mondays), time(9, 15), tzinfo=KOLKATA
    )


def test_dst_moves_the_open_in_utc() -> None:
    """New York opens at 09:30 local: 14:30 UTC in winter, 13:30 UTC once DST starts."""
    nyse = calendar(tz=NEW_YORK, sessions=((time(9, 30), time(16, 0)),))
    assert nyse.is_open(utc(2024, 3, 8, 14, 30))
    assert not nyse.is_open(utc(2024, 3, 8, 14, 29))
    assert not nyse.is_open(utc(2024, 3, 11, 13, 29))
    assert nyse.is_open(utc(2024, 3, 11, 13, 30))
    assert nyse.next_change(utc(2024, 3, 8, 21, 0)) == utc(2024, 3, 11, 13, 30)
    assert nyse.next_change(utc(2024, 11, 1, 19, 0)) == utc(2024, 11, 1, 20, 0)
    assert nyse.next_change(utc(2024, 11, 1, 20, 0)) == utc(2024, 11, 4, 14, 30)


def test_a_session_edge_in_the_skipped_hour_falls_an_hour_later() -> None:
    """A 02:30 open on the day New York skips 02:00-03:00 is read as 03:30 EDT (fold=0)."""
    odd = calendar(tz=NEW_YORK, sessions=((time(2, 30), time(4, 0)),), weekdays=EVERY_DAY)
    assert not odd.is_open(utc(2024, 3, 10, 7, 15))  # 03:15 EDT
    assert odd.is_open(utc(2024, 3, 10, 7, 30))  # 03:30 EDT
    assert odd.next_change(utc(2024, 3, 10, 6, 0)) == utc(2024, 3, 10, 7, 30)


def test_a_repeated_hour_opens_once() -> None:
    """A session ending at 01:30 on the day 01:00-02:00 repeats ends at its first 01:30."""
    odd = calendar(tz=NEW_YORK, sessions=((time(0, 30), time(1, 30)),), weekdays=EVERY_DAY)
    assert odd.is_open(utc(2024, 11, 3, 5, 15))  # 01:15 EDT
    assert not odd.is_open(utc(2024, 11, 3, 6, 15))  # 01:15 EST, the repeat
    assert odd.next_change(utc(2024, 11, 3, 5, 0)) == utc(2024, 11, 3, 5, 30)
    assert odd.next_change(utc(2024, 11, 3, 5, 30)) == utc(2024, 11, 4, 5, 30)  # 00:30 EST


@pytest.mark.parametrize(
    ("sessions", "weekdays", "message"),
    [
        (((time(15, 30), time(9, 15)),), MON_FRI, "before end"),
        (((time(9, 15), time(9, 15)),), MON_FRI, "before end"),
        (((time(9, 15), time(15, 30)),), frozenset({7}), "weekdays"),
    ],
)
def test_rejects_invalid_calendars(
    sessions: tuple[tuple[time, time], ...], weekdays: frozenset[int], message: str
) -> None:
    """Empty or reversed sessions and weekdays outside 0-6 are refused."""
    with pytest.raises(ValueError, match=message):
        calendar(sessions=sessions, weekdays=weekdays)


@given(
    st.datetimes(
        min_value=datetime(2020, 1, 1), max_value=datetime(2030, 1, 1), timezones=st.just(UTC)
    )
)
def test_next_change_is_where_is_open_flips(at: datetime) -> None:
    """The state holds until next_change, which is the first instant it differs."""
    nyse = calendar(
        tz=NEW_YORK,
        sessions=((time(9, 30), time(12, 0)), (time(13, 0), time(16, 0))),
        holidays=frozenset({date(2024, 12, 25), date(2025, 1, 1)}),
    )
    change = nyse.next_change(at)
    assert change is not None and change > at
    tick = timedelta(microseconds=1)
    before = (change - tick, at + (change - at) / 2)
    assert all(nyse.is_open(t) == nyse.is_open(at) for t in before)
    assert nyse.is_open(change) != nyse.is_open(at)
