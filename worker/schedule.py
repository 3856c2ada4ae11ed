"""Send-window and delay arithmetic: pure functions on aware datetimes.

Every function takes and returns aware datetimes in UTC; the lead's (or campaign's) IANA
time zone is passed by name and only used to decide what "Monday 09:00" or "three business
days later" means locally, so daylight-saving changes are handled by `zoneinfo`.
"""

from __future__ import annotations

from collections.abc import Collection
from datetime import UTC, date, datetime, time, timedelta
from zoneinfo import ZoneInfo

from worker.config import WEEKDAYS, Delay, SendWindow

# A window that never opens (no days, or every day a holiday) must not loop forever.
_SEARCH_DAYS = 800


def _check_aware(at: datetime, name: str) -> None:
    if at.tzinfo is None or at.utcoffset() is None:
        raise ValueError(f"{name} must be an aware datetime (UTC), got naive {at.isoformat()}")


def _local_instant(day: date, wall: time, zone: ZoneInfo) -> datetime:
    """The UTC instant of wall-clock `wall` on `day` in `zone`.

    A wall time skipped by a spring-forward change resolves to the same reading on the
    pre-change offset (02:30 becomes 03:30 summer time); an ambiguous autumn time takes
    its first occurrence. Either way the result is a real instant, never an error.
    """
    return datetime.combine(day, wall, tzinfo=zone).astimezone(UTC)


def _is_business_day(day: date) -> bool:
    return day.weekday() < 5


def add_delay(start: datetime, delay: Delay, tz: str, hours: SendWindow | None = None) -> datetime:
    """Return `start` moved on by `delay`, as an aware UTC datetime.

    - `d` (days): the same local wall-clock time `amount` calendar days later in `tz`
      (so a 09:00 send stays at 09:00 across a DST change, although 23 or 25 hours pass).
    - `bd` (business days): the same local time after `amount` Monday-to-Friday days; a
      start on a weekend counts the coming Monday as the first business day.
    - `bh` (business hours): `amount` hours counted only inside `hours` (default Monday to
      Friday, 09:00-17:00) in `tz`; the result is always inside those hours (a delay that
      ends exactly at closing time ends then, not at the next opening).
    - `h` / `m`: elapsed hours or minutes, independent of the time zone.

    Raises ValueError for a naive `start`.
    """
    _check_aware(start, "start")
    if delay.unit == "bh":
        return add_business_time(start, timedelta(hours=delay.amount), hours or SendWindow(), tz)
    if delay.unit == "h":
        return (start + timedelta(hours=delay.amount)).astimezone(UTC)
    if delay.unit == "m":
        return (start + timedelta(minutes=delay.amount)).astimezone(UTC)
    zone = ZoneInfo(tz)
    local = start.astimezone(zone)
    day = local.date()
    if delay.unit == "d":
        day += timedelta(days=delay.amount)
    else:
        remaining = delay.amount
        while remaining > 0:
            day += timedelta(days=1)
            if _is_business_day(day):
                remaining -= 1
    if day == local.date():
        return start.astimezone(UTC)
    return _local_instant(day, local.time().replace(tzinfo=None), zone)


def next_open_slot(
    at: datetime,
    window: SendWindow | None,
    tz: str,
    holidays: Collection[date] = (),
) -> datetime:
    """The earliest instant at or after `at` when sending is allowed, as aware UTC.

    Sending is allowed on the window's days, between `start` (inclusive) and `end`
    (exclusive) in local time of `tz`, on dates not in `holidays` (local dates). `at` itself
    is returned when it is already inside the window; otherwise the start of the next open
    window. `window=None` means any time of any non-holiday day.

    Raises ValueError for a naive `at`, or when the window never opens (no days).
    """
    _check_aware(at, "at")
    zone = ZoneInfo(tz)
    local = at.astimezone(zone)
    if window is None:
        days: Collection[str] = WEEKDAYS
        start, end = time(0, 0), None
    else:
        days, start, end = window.days, window.start, window.end
    wall = local.time().replace(tzinfo=None)

    day = local.date()
    for offset in range(_SEARCH_DAYS):
        candidate_day = day + timedelta(days=offset)
        if WEEKDAYS[candidate_day.weekday()] not in days or candidate_day in holidays:
            continue
        if offset == 0:
            if wall < start:
                return _local_instant(candidate_day, start, zone)
            if end is None or wall < end:
                return at.astimezone(UTC)
            continue  # today's window has closed
        return _local_instant(candidate_day, start, zone)
    raise ValueError(f"the send window {days} never opens (check its days and the holidays)")


def add_business_time(start: datetime, amount: timedelta, hours: SendWindow, tz: str) -> datetime:
    """`start` moved on by `amount` of time inside the business `hours` of `tz` (aware UTC).

    Time outside the hours does not count: two business hours from Friday 16:30 (hours
    09:00-17:00) is Monday 10:30. A zero `amount` gives the next instant inside the hours.
    Raises ValueError for a naive `start` or hours that never open.
    """
    _check_aware(start, "start")
    zone = ZoneInfo(tz)
    at = next_open_slot(start, hours, tz)
    left = amount
    for _ in range(_SEARCH_DAYS):
        local = at.astimezone(zone)
        close = _local_instant(local.date(), hours.end, zone)
        if at + left <= close:
            return (at + left).astimezone(UTC)
        left -= close - at
        at = next_open_slot(close, hours, tz)
    raise ValueError(f"{amount} of business hours does not fit in {_SEARCH_DAYS} days")


def business_seconds_between(start: datetime, end: datetime, hours: SendWindow, tz: str) -> int:
    """How many seconds of business `hours` (in `tz`) lie between `start` and `end`.

    Bounded: at most `_SEARCH_DAYS` days are walked (longer spans count as that much).
    """
    _check_aware(start, "start")
    _check_aware(end, "end")
    zone = ZoneInfo(tz)
    total = 0.0
    at = next_open_slot(start, hours, tz)
    for _ in range(_SEARCH_DAYS):
        if at >= end:
            break
        close = _local_instant(at.astimezone(zone).date(), hours.end, zone)
        total += (min(close, end) - at).total_seconds()
        at = next_open_slot(close, hours, tz)
    return int(total)
