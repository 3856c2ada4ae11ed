"""Nurture sequences: turn due enrollment steps into queued outbox rows.

A step is queued only for a lead still in status `lead`, only inside the campaign's send
window in the lead's time zone (else it moves to the next open slot), and only once: the
outbox row's idempotency key is `nurture:<enrollment>:<step>`. The next step's delay
counts from the moment this one is queued, so later steps shift rather than pile up.
"""

from __future__ import annotations

import logging
from datetime import date, datetime
from functools import lru_cache

import holidays as holiday_calendars
from sqlalchemy import select
from sqlalchemy.orm import Session

from worker.app import App
from worker.campaigns import paused_campaigns, pick_variant
from worker.config import Campaign, Config
from worker.contexts import samples, unsubscribe_url
from worker.db import refresh_statistics
from worker.leads import lead_fields, record_event
from worker.models import (
    Enrollment,
    EnrollmentState,
    Lead,
    LeadStatus,
)
from worker.outbox import enqueue
from worker.pacing import touch_wait
from worker.rendering import Renderer
from worker.schedule import add_delay, next_open_slot
from worker.states import enrollments, move_enrollment
from worker.suppression import suppressed

logger = logging.getLogger(__name__)
BATCH = 500
STATS_AFTER = 1000
"""Steps queued in one call past which the planner's statistics are refreshed (see
`queue_due`)."""


def resume_paused(session: Session, now: datetime) -> int:
    """Paused enrollments whose resume time has come become active again; returns how many."""
    res = session.execute(
        enrollments(
            "resumed", Enrollment.paused_until.is_not(None), Enrollment.paused_until <= now
        ).values(paused_until=None, updated_at=now)
    )
    return int(getattr(res, "rowcount", 0) or 0)


@lru_cache(maxsize=256)
def public_holidays(country: str | None, year: int) -> frozenset[date]:
    """Public holidays of a country (ISO 3166 alpha-2) this year and next; empty if unknown."""
    if not country:
        return frozenset()
    try:
        return frozenset(holiday_calendars.country_holidays(country, years=[year, year + 1]))
    except NotImplementedError:  # a country the calendar does not know: no days off
        return frozenset()


def lead_zone(lead: Lead, campaign: Campaign) -> str:
    return lead.timezone or campaign.timezone


def queue_due(app: App, batch: int = BATCH) -> int:
    """Queue every step due now; returns how many were queued.

    One transaction per batch: each enrollment's advance and its outbox row commit together.
    """
    config = app.config
    now = app.now()
    queued = 0
    while True:
        with app.transaction() as s:
            resume_paused(s, now)
            q = (
                select(Enrollment, Lead)
                .join(Lead, Lead.id == Enrollment.lead_id)
                .where(Enrollment.state == EnrollmentState.ACTIVE, Enrollment.next_due <= now)
            )
            paused = paused_campaigns(s)
            if paused:  # a paused campaign's steps stay due; resume spreads them out
                q = q.where(Enrollment.campaign.not_in(sorted(paused)))
            due = s.execute(
                q.order_by(Enrollment.next_due, Enrollment.id)
                .limit(batch)
                .with_for_update(skip_locked=True, of=Enrollment)
            ).all()
            blocked = suppressed(s, [lead.email for _, lead in due])
            for enrollment, lead in due:
                if lead.email in blocked:
                    _suppress(s, enrollment, lead, blocked[lead.email], now)
                    continue
                queued += _queue_one(s, config, enrollment, lead, now)
        if len(due) < batch:
            break
    if queued:
        logger.info("queued %d nurture step(s)", queued)
    if queued >= STATS_AFTER:
        # A bulk enrollment's first steps: thousands of new outbox rows (and as many
        # leads, often). With statistics from when both were small, PostgreSQL found
        # each claimed row through the status index (`queued`), reading every queued
        # row per claim, and its lead through the lead status: fresh ones make both
        # lookups the primary key's.
        refresh_statistics(app.engine)
    return queued


def _suppress(s: Session, en: Enrollment, lead: Lead, why: str, now: datetime) -> None:
    """A suppressed lead's enrollment stops (with an event) instead of queueing a step."""
    move_enrollment(en, "stopped")
    en.next_due, en.waiting, en.updated_at = None, None, now
    record_event(s, lead, "suppressed", f"{en.campaign}: not sent, {why}", now,
                 detail={"campaign": en.campaign})  # fmt: skip


def _queue_one(s: Session, config: Config, en: Enrollment, lead: Lead, now: datetime) -> int:
    try:
        campaign = config.campaign(en.campaign)
    except KeyError:
        # The campaign left the config: keep the enrollment, but stop looking at it.
        move_enrollment(en, "stopped")
        en.next_due, en.updated_at = None, now
        return 0
    if lead.status != LeadStatus.LEAD:
        move_enrollment(en, "stopped")
        en.next_due, en.updated_at = None, now
        return 0
    if en.step >= len(campaign.steps):
        move_enrollment(en, "completed")
        en.next_due, en.updated_at = None, now
        return 0
    tz = lead_zone(lead, campaign)
    days_off = public_holidays(lead.country, now.year) if campaign.skip_holidays else frozenset()
    slot = next_open_slot(now, campaign.send_window, tz, days_off)
    if slot > now:
        en.next_due, en.updated_at = slot, now
        return 0
    pacing = config.sender.max_touches or config.sender.min_gap
    if pacing and s.get_bind().dialect.name != "sqlite":
        # Lock the person: two workers queueing two campaigns for one lead must not both
        # see room under the cap. Locked elsewhere: try again on the next pass.
        mine = select(Lead.id).where(Lead.id == lead.id).with_for_update(skip_locked=True)
        if s.scalar(mine) is None:
            return 0
    wait = touch_wait(s, config.sender, lead.id, now) if pacing else None
    if wait is not None:
        # Too soon for this person: wait for the first allowed instant in the window.
        until, why = wait
        en.next_due = next_open_slot(until, campaign.send_window, tz, days_off)
        en.waiting, en.updated_at = f"{why}: waits until {en.next_due.isoformat()}", now
        return 0
    step = campaign.steps[en.step]
    variant = pick_variant(campaign.name, en.step, lead.id, len(step.templates))
    en.waiting = None
    enqueue(
        s, config, "nurture", f"nurture:{en.id}:{en.step}", lead, step.templates[variant], now,
        mailbox=campaign.mailbox, enrollment_id=en.id, campaign=campaign.name, step=en.step,
        variant=variant if step.variants else None,
    )  # fmt: skip
    en.step += 1
    en.updated_at = now
    if en.step < len(campaign.steps):
        en.next_due = add_delay(now, campaign.steps[en.step].delay, tz)
    else:
        move_enrollment(en, "completed")
        en.next_due = None
    return 1


def lint_enrolled(
    s: Session, renderer: Renderer, config: Config
) -> tuple[int, dict[str, list[str]]]:
    """`templates lint --leads`: render every step of each enrolled lead's campaign with
    that lead's own data and unsubscribe link. Returns the number of steps rendered and,
    per problem, the addresses of the leads it concerns (in order, with repeats)."""
    checked = 0
    problems: dict[str, list[str]] = {}
    pairs = s.execute(select(Lead, Enrollment).join(Enrollment, Enrollment.lead_id == Lead.id))
    for lead, en in pairs.tuples():
        try:
            camp = config.campaign(en.campaign)
        except KeyError:  # a campaign since removed from the config
            continue
        unsubscribe = unsubscribe_url(config.sender, lead.reply_token)
        for i, step in enumerate(camp.steps):
            ctx = samples(config.sender, lead_fields(lead), camp, i + 1, unsubscribe)
            for e in renderer.lint(ctx["nurture"], list(step.templates)):
                problems.setdefault(str(e), []).append(lead.email)
            checked += 1
    return checked, problems
