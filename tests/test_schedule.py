"""Send windows and step delays, checked as exact UTC instants for leads in three zones."""

from __future__ import annotations

from datetime import UTC, date, datetime, time

import pytest

from worker.config import Delay, SendWindow
from worker.schedule import add_delay, next_open_slot

OFFICE_HOURS = SendWindow(days=("mon", "tue", "wed", "thu", "fri"), start=time(9), end=time(17))
NEW_YORK, BERLIN, TOKYO = "America/New_York", "Europe/Berlin", "Asia/Tokyo"


def utc(year: int, month: int, day: int, hour: int = 0, minute: int = 0) -> datetime:
    return datetime(year, month, day, hour, minute, tzinfo=UTC)


@pytest.mark.parametrize(
    ("tz", "due"),
    [
        (NEW_YORK, utc(2026, 12, 1, 15, 0)),  # Tue 10:00 EST
        (BERLIN, utc(2026, 12, 1, 9, 30)),  # Tue 10:30 CET
        (TOKYO, utc(2026, 12, 1, 7, 59)),  # Tue 16:59 JST
    ],
)
def test_it_sends_at_once_inside_the_window(tz: str, due: datetime) -> None:
    assert next_open_slot(due, OFFICE_HOURS, tz) == due


@pytest.mark.parametrize(
    ("tz", "due", "expected"),
    [
        # Friday evening local time -> Monday 09:00 local time.
        (NEW_YORK, utc(2026, 12, 4, 23, 0), utc(2026, 12, 7, 14, 0)),  # Fri 18:00 EST
        (BERLIN, utc(2026, 12, 4, 16, 30), utc(2026, 12, 7, 8, 0)),  # Fri 17:30 CET
        (TOKYO, utc(2026, 12, 4, 11, 0), utc(2026, 12, 7, 0, 0)),  # Fri 20:00 JST
    ],
)
def test_it_moves_a_friday_evening_send_to_monday_morning(
    tz: str, due: datetime, expected: datetime
) -> None:
    assert next_open_slot(due, OFFICE_HOURS, tz) == expected


@pytest.mark.parametrize(
    ("tz", "expected"),
    [
        (NEW_YORK, utc(2026, 12, 7, 14, 0)),  # Sat 07:00 EST -> Mon 09:00 EST
        (BERLIN, utc(2026, 12, 7, 8, 0)),  # Sat 13:00 CET -> Mon 09:00 CET
        (TOKYO, utc(2026, 12, 7, 0, 0)),  # Sat 21:00 JST -> Mon 09:00 JST
    ],
)
def test_it_skips_the_weekend(tz: str, expected: datetime) -> None:
    assert next_open_slot(utc(2026, 12, 5, 12, 0), OFFICE_HOURS, tz) == expected


def test_it_judges_the_day_in_the_leads_time_zone_not_in_utc() -> None:
    sunday_evening_utc = utc(2026, 12, 6, 23, 30)  # already Monday 08:30 in Tokyo
    assert next_open_slot(sunday_evening_utc, OFFICE_HOURS, TOKYO) == utc(2026, 12, 7, 0, 0)
    assert next_open_slot(sunday_evening_utc, OFFICE_HOURS, NEW_YORK) == utc(2026, 12, 7, 14, 0)
    monday_morning_tokyo = utc(2026, 12, 7, 0, 30)  # Monday 09:30 JST
    assert next_open_slot(monday_morning_tokyo, OFFICE_HOURS, TOKYO) == monday_morning_tokyo


def test_it_waits_for_the_window_to_open_later_the_same_day() -> None:
    early = utc(2026, 12, 7, 6, 0)  # Monday 07:00 CET
    assert next_open_slot(early, OFFICE_HOURS, BERLIN) == utc(2026, 12, 7, 8, 0)


def test_it_treats_the_end_of_the_window_as_closed() -> None:
    five_pm = utc(2026, 12, 1, 16, 0)  # Tuesday 17:00 CET
    assert next_open_slot(five_pm, OFFICE_HOURS, BERLIN) == utc(2026, 12, 2, 8, 0)


@pytest.mark.parametrize(
    ("tz", "due", "expected"),
    [
        # US clocks spring forward on Sun 8 March 2026: Monday 09:00 is EDT (UTC-4).
        (NEW_YORK, utc(2026, 3, 6, 22, 0), utc(2026, 3, 9, 13, 0)),
        # EU clocks spring forward on Sun 29 March 2026: Monday 09:00 is CEST (UTC+2).
        (BERLIN, utc(2026, 3, 27, 16, 0), utc(2026, 3, 30, 7, 0)),
        # US clocks fall back on Sun 1 November 2026: Monday 09:00 is EST (UTC-5).
        (NEW_YORK, utc(2026, 10, 30, 21, 30), utc(2026, 11, 2, 14, 0)),
        # Tokyo has no DST: the same weekend is just a weekend.
        (TOKYO, utc(2026, 3, 6, 22, 0), utc(2026, 3, 9, 0, 0)),
    ],
)
def test_it_keeps_nine_oclock_local_across_a_dst_change(
    tz: str, due: datetime, expected: datetime
) -> None:
    assert next_open_slot(due, OFFICE_HOURS, tz) == expected


def test_it_skips_holidays() -> None:
    christmas = {date(2026, 12, 24), date(2026, 12, 25)}
    wednesday_evening = utc(2026, 12, 23, 17, 0)  # 18:00 CET
    assert next_open_slot(wednesday_evening, OFFICE_HOURS, BERLIN, christmas) == utc(
        2026, 12, 28, 8, 0
    )


def test_it_sends_any_time_without_a_window() -> None:
    saturday_night = utc(2026, 12, 5, 23, 0)
    assert next_open_slot(saturday_night, None, BERLIN) == saturday_night


def test_it_refuses_a_window_that_never_opens() -> None:
    never = SendWindow(days=(), start=time(9), end=time(17))
    with pytest.raises(ValueError, match="never opens"):
        next_open_slot(utc(2026, 12, 1, 12, 0), never, BERLIN)


def test_it_refuses_naive_datetimes() -> None:
    with pytest.raises(ValueError, match="aware"):
        next_open_slot(datetime(2026, 12, 1, 12, 0), OFFICE_HOURS, BERLIN)
    with pytest.raises(ValueError, match="aware"):
        add_delay(datetime(2026, 12, 1, 12, 0), Delay(1, "d"), BERLIN)


# --- delays --------------------------------------------------------------------------------


def test_it_counts_business_days_over_the_weekend() -> None:
    thursday_9am_new_york = utc(2026, 12, 3, 14, 0)
    # Fri, Mon, Tue: three business days later is Tuesday at the same local time.
    assert add_delay(thursday_9am_new_york, Delay(3, "bd"), NEW_YORK) == utc(2026, 12, 8, 14, 0)
    assert add_delay(thursday_9am_new_york, Delay(1, "bd"), NEW_YORK) == utc(2026, 12, 4, 14, 0)
    assert add_delay(thursday_9am_new_york, Delay(2, "bd"), NEW_YORK) == utc(2026, 12, 7, 14, 0)
    assert add_delay(thursday_9am_new_york, Delay(5, "bd"), NEW_YORK) == utc(2026, 12, 10, 14, 0)


def test_it_starts_business_days_on_monday_when_enrolled_at_the_weekend() -> None:
    saturday = utc(2026, 12, 5, 10, 0)  # 11:00 CET
    assert add_delay(saturday, Delay(1, "bd"), BERLIN) == utc(2026, 12, 7, 10, 0)


def test_it_counts_business_days_in_the_leads_time_zone() -> None:
    instant = utc(2026, 12, 4, 23, 30)  # Friday 18:30 in New York, Saturday 08:30 in Tokyo
    assert add_delay(instant, Delay(1, "bd"), NEW_YORK) == utc(2026, 12, 7, 23, 30)  # Mon 18:30 EST
    assert add_delay(instant, Delay(1, "bd"), TOKYO) == utc(2026, 12, 6, 23, 30)  # Mon 08:30 JST


def test_it_keeps_the_local_time_for_calendar_days_across_dst() -> None:
    saturday_9am_est = utc(2026, 3, 7, 14, 0)
    # Only 47 hours pass, but the lead sees 09:00 again (now EDT).
    assert add_delay(saturday_9am_est, Delay(2, "d"), NEW_YORK) == utc(2026, 3, 9, 13, 0)
    # Hours are elapsed time: 48 hours later it is 10:00 EDT.
    assert add_delay(saturday_9am_est, Delay(48, "h"), NEW_YORK) == utc(2026, 3, 9, 14, 0)


def test_it_adds_minutes_and_nothing_for_a_zero_delay() -> None:
    start = utc(2026, 12, 1, 10, 0)
    assert add_delay(start, Delay(90, "m"), TOKYO) == utc(2026, 12, 1, 11, 30)
    assert add_delay(start, Delay(0, "d"), TOKYO) == start
    assert add_delay(start, Delay(0, "bd"), TOKYO) == start
