"""Persistence without annoyance: how often one person may hear from our campaigns.

`sender.max_touches` caps nurture emails to one person within any window of `per`, across
every campaign; `sender.min_gap` keeps a least time between two of them. A step that would
break either waits until the earliest instant that breaks neither (`touch_wait`).
"""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from worker.config import Delay, SenderConfig
from worker.models import OutboundMessage

_TOUCHING = ("queued", "sending", "sent", "unknown")
"""Outbox states that are (or will be) a touch; failed and cancelled ones never reached anyone."""


def span(delay: Delay) -> timedelta:
    """A cap's window or gap as elapsed time (a day is 24 hours here)."""
    if delay.unit == "h":
        return timedelta(hours=delay.amount)
    if delay.unit == "m":
        return timedelta(minutes=delay.amount)
    if delay.unit == "bd":
        return timedelta(days=delay.amount * 7 / 5)
    return timedelta(days=delay.amount)


def touch_wait(
    s: Session,
    sender: SenderConfig,
    lead_id: int,
    now: datetime,
    *,
    exclude_row: int | None = None,
    sent_only: bool = False,
) -> tuple[datetime, str] | None:
    """When one more nurture email to this lead would respect the cap and the gap.

    None: it may go now. Else (the earliest allowed instant, why it waits). Touches are
    the lead's nurture rows that were sent (at `sent_at`) or are on their way (at
    `created_at`); `sent_only` counts sent ones only (the check right before SMTP, where
    rows still queued are the competition, not the past). `exclude_row` is the row asking.
    """
    cap, gap = sender.max_touches, sender.min_gap
    if cap is None and gap is None:
        return None
    longest = max(span(cap.per) if cap else timedelta(0), span(gap) if gap else timedelta(0))
    at = func.coalesce(OutboundMessage.sent_at, OutboundMessage.created_at)
    q = select(at).where(
        OutboundMessage.lead_id == lead_id,
        OutboundMessage.kind == "nurture",
        at > now - longest,
    )
    if sent_only:
        q = q.where(OutboundMessage.status.in_(("sending", "sent", "unknown")))
    else:
        q = q.where(OutboundMessage.status.in_(_TOUCHING))
    if exclude_row is not None:
        q = q.where(OutboundMessage.id != exclude_row)
    times = sorted(s.scalars(q.order_by(at.desc()).limit(500)), reverse=True)
    allowed, why = now, ""
    if cap is not None:
        window = span(cap.per)
        recent = [t for t in times if t > now - window]
        if len(recent) >= cap.count:
            # The touch that must leave the window before one more fits.
            until = recent[cap.count - 1] + window
            if until > allowed:
                allowed = until
                why = f"touch cap: {len(recent)} nurture email(s) in the last {cap.per} (max {cap.count})"
    if gap is not None and times:
        until = times[0] + span(gap)
        if until > allowed:
            allowed = until
            why = f"minimum gap of {gap} since the last nurture email"
    return (allowed, why) if allowed > now else None
