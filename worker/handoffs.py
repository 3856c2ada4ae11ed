"""Speed to lead: when a prospect was handed to a rep, when the rep answered, and what
twoway does while nobody has (one reminder, one escalation, the follow-up in the rep's name).

A `Handoff` row is opened per prospect and rep. The rep's first answer to the prospect
closes it (`answered_at`) and cancels whatever twoway still had queued for that prospect
(the follow-up, a reminder, an escalation). `run_due` is one step of the worker's pass: it
queues the reminder when the SLA passes and the escalation at the second threshold, each
once (the row's `reminded_at` / `escalated_at` and the outbox key commit together), and
only for handoffs still waiting. Every helper writes into the caller's session and never
commits, except `run_due`, which owns its transaction.
"""

from __future__ import annotations

import logging
import statistics
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from worker.app import App
from worker.config import Config, Delay, Rep
from worker.contexts import Kind, NudgeFacts
from worker.db import add_new
from worker.leads import cancel_queued, iso, lead_fields, lead_rows, record_event
from worker.models import Handoff as HandoffRow
from worker.models import Lead, LeadStatus
from worker.schedule import add_delay, next_open_slot

logger = logging.getLogger(__name__)

# What twoway still has queued for a prospect that the rep's answer makes pointless.
WAITING_KINDS = ("followup", "reminder", "escalation")
# Mail to the team: it never goes to a prospect and an answer to it is never a lead's reply.
INTERNAL_KINDS = ("handoff", "rep_copy", "reminder", "escalation")
_BATCH = 100
_FIGURES_DAYS = 30


NewRepHandoff = Callable[[Session, Lead, Rep, datetime, HandoffRow], None]
"""Hand a reassigned prospect to its new rep (the lifecycle's; passed in by the runner)."""


def rep_due(config: Config, rep: str, start: datetime, delay: Delay) -> datetime:
    """`start` plus `delay` counted in the rep's zone and business hours (aware UTC)."""
    return add_delay(start, delay, config.rep_timezone(rep), config.handoff.business_hours)


def in_business_hours(config: Config, rep: str, at: datetime) -> datetime:
    """The first instant at or after `at` inside the rep's business hours."""
    return next_open_slot(at, config.handoff.business_hours, config.rep_timezone(rep))


def open_handoff(
    s: Session,
    config: Config,
    lead: Lead,
    rep: str,
    now: datetime,
    inbound_id: int | None,
    *,
    escalate: bool = True,
) -> HandoffRow:
    """Start the speed-to-lead clock for `lead` with `rep` (its SLA and escalation times)."""
    h = config.handoff
    return add_new(
        s,
        HandoffRow,
        lead_id=lead.id,
        rep=rep,
        inbound_id=inbound_id,
        handed_at=now,
        sla_due=rep_due(config, rep, now, h.sla) if h.sla else None,
        escalate_due=(
            rep_due(config, rep, now, h.escalation_delay)
            if escalate and h.escalation_delay
            else None
        ),
    )


def rep_answered(
    s: Session, lead: Lead, who: str, at: datetime, now: datetime, inbound_id: int | None
) -> bool:
    """Record that `who` (a rep or a colleague) answered `lead`; True when it was news.

    The first answer after a handoff is its first response; the follow-up, reminder and
    escalation still queued for the lead are cancelled. Later answers change nothing.
    """
    waiting = s.scalars(
        select(HandoffRow).where(
            HandoffRow.lead_id == lead.id,
            HandoffRow.answered_at.is_(None),
            HandoffRow.closed_at.is_(None),
        )
    ).all()
    cancelled = sum(cancel_queued(s, lead.id, k, f"{who} answered") for k in WAITING_KINDS)
    for h in waiting:
        when = min(max(at, h.handed_at), now)
        h.answered_at, h.answered_by = when, who
        took = _duration(when - h.handed_at)
        record_event(
            s, lead, "rep_answered", f"{who} answered the prospect, {took} after the handoff",
            now, detail={"rep": who, "seconds": int((when - h.handed_at).total_seconds()),
                         "cancelled": cancelled}, inbound_id=inbound_id,
        )  # fmt: skip
    if not waiting and cancelled:
        record_event(
            s, lead, "followup_cancelled", f"{who} answered first", now,
            detail={"cancelled": cancelled}, inbound_id=inbound_id,
        )  # fmt: skip
    return bool(waiting or cancelled)


def cancel_followup(s: Session, lead: Lead, now: datetime, who: str) -> int:
    """`twoway leads followup cancel`: the queued follow-up in the rep's name is not sent."""
    n = cancel_queued(s, lead.id, "followup", f"cancelled by {who}")
    if n:
        record_event(s, lead, "followup_cancelled", f"cancelled by {who}", now)
    return n


def _duration(d: timedelta) -> str:
    minutes = int(d.total_seconds() // 60)
    if minutes < 60:
        return f"{minutes} min"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours} h {minutes:02d} min"
    return f"{hours // 24} days {hours % 24} h"


# --- reminders and escalations -----------------------------------------------------------


def run_due(app: App, queue_handoff: NewRepHandoff | None = None) -> int:
    """Queue the reminders and escalations that are due now; returns how many.

    One transaction. `queue_handoff(s, lead, rep, now, h)` hands a reassigned prospect to
    its new rep (the lifecycle's; passed in to keep the modules apart).
    """
    config = app.config
    now = app.now()
    done = 0
    with app.transaction() as s:
        q = (
            select(HandoffRow)
            .where(HandoffRow.answered_at.is_(None), HandoffRow.closed_at.is_(None))
            .where(
                ((HandoffRow.reminded_at.is_(None)) & (HandoffRow.sla_due <= now))
                | ((HandoffRow.escalated_at.is_(None)) & (HandoffRow.escalate_due <= now))
            )
            .order_by(HandoffRow.id)
            .limit(_BATCH)
            .with_for_update(skip_locked=True)
        )
        for h in s.scalars(q).all():
            lead = s.get(Lead, h.lead_id)
            if lead is None or lead.status in ("unsubscribed", "bounced", "disqualified"):
                h.closed_at, h.closed_reason = now, "the lead left"
                continue
            if h.reminded_at is None and h.sla_due is not None and h.sla_due <= now:
                _remind(s, config, lead, h, now)
                done += 1
            if h.escalated_at is None and h.escalate_due is not None and h.escalate_due <= now:
                _escalate(s, app, lead, h, now, queue_handoff)
                done += 1
    return done


def _queue(
    s: Session, config: Config, lead: Lead, kind: Kind, key: str, template: str, to: str,
    due: datetime, now: datetime, facts: NudgeFacts,
) -> None:  # fmt: skip
    from worker.outbox import enqueue  # the outbox asks this module whether the rep answered

    enqueue(s, config, kind, key, lead, template, now, to_addr=to, due=due, facts=facts)


def _brief(config: Config, lead: Lead, h: HandoffRow, now: datetime) -> NudgeFacts:
    rep = config.rep(h.rep)
    return {
        "prospect": lead_fields(lead),
        "rep": {"name": rep.name if rep else h.rep, "email": h.rep},
        "handed_at": iso(h.handed_at),
        "waited": _duration(now - h.handed_at),
        "sla": str(config.handoff.sla) if config.handoff.sla else "",
    }


def _remind(s: Session, config: Config, lead: Lead, h: HandoffRow, now: datetime) -> None:
    h.reminded_at = now
    _queue(
        s, config, lead, "reminder", f"reminder:{h.id}", config.handoff.reminder_template,
        h.rep, in_business_hours(config, h.rep, now), now, _brief(config, lead, h, now),
    )  # fmt: skip
    record_event(
        s, lead, "reminder_queued",
        f"{h.rep} has not answered within {config.handoff.sla}: one reminder", now,
    )  # fmt: skip


def _escalate(
    s: Session, app: App, lead: Lead, h: HandoffRow, now: datetime,
    queue_handoff: NewRepHandoff | None,
) -> None:  # fmt: skip
    from worker.assign import assign

    config = app.config
    h.escalated_at = now
    target = config.handoff.escalate_to
    context = _brief(config, lead, h, now)
    if target == "reassign":
        a = assign(s, lead, config, now, exclude=frozenset({h.rep}))
        if a.rep is None:
            record_event(
                s, lead, "escalation_failed", f"nobody to reassign to: {a.reason}", now
            )  # fmt: skip
            return
        h.closed_at, h.closed_reason = now, f"reassigned to {a.rep.email}"
        lead.owner = a.rep.email
        record_event(
            s, lead, "reassigned",
            f"{h.rep} did not answer within {config.handoff.escalation_delay}: now {a.rep.name}'s",
            now, detail={"rep": a.rep.email, "from": h.rep, "reason": a.reason},
        )  # fmt: skip
        new = open_handoff(s, config, lead, a.rep.email, now, h.inbound_id, escalate=False)
        s.flush()
        if queue_handoff is not None:
            queue_handoff(s, lead, a.rep, now, new)
        context["new_rep"] = {"name": a.rep.name, "email": a.rep.email}
        to = h.rep  # the first rep hears that the prospect moved on
    else:
        assert target is not None
        to = target
        record_event(s, lead, "escalated", f"{h.rep} has not answered: {target} told", now)
    _queue(
        s, config, lead, "escalation", f"escalation:{h.id}", config.handoff.escalation_template,
        to, in_business_hours(config, h.rep, now), now, context,
    )  # fmt: skip


# --- figures -----------------------------------------------------------------------------


def _percentile(values: list[float], p: float) -> float:
    """The nearest-rank percentile (p in 0..100) of a non-empty list."""
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * p // 100))
    return ordered[int(rank) - 1]


def speed_to_lead(s: Session, config: Config, now: datetime) -> dict[str, Any]:
    """`status --json`'s `speed_to_lead`: per rep over the last 30 days and who waits.

    A breach is a handoff answered after its SLA, or still unanswered past it.
    """
    since = now - timedelta(days=_FIGURES_DAYS)
    per: dict[str, dict[str, Any]] = {}
    for h in s.scalars(select(HandoffRow).where(HandoffRow.handed_at >= since)):
        r = per.setdefault(h.rep, {"handoffs": 0, "answered": 0, "breaches": 0, "times": []})
        r["handoffs"] += 1
        if h.answered_at is not None and h.answered_by is not None:
            r["answered"] += 1
            r["times"].append((h.answered_at - h.handed_at).total_seconds())
        end = h.answered_at or h.closed_at or now
        if h.sla_due is not None and end > h.sla_due:
            r["breaches"] += 1
    reps = []
    for email in sorted(per):
        r = per[email]
        times: list[float] = r.pop("times")
        rep = config.rep(email)
        reps.append(
            {
                "rep": email,
                "name": rep.name if rep else email,
                **r,
                "median_seconds": int(statistics.median(times)) if times else None,
                "p90_seconds": int(_percentile(times, 90)) if times else None,
            }
        )
    return {"days": _FIGURES_DAYS, "sla": str(config.handoff.sla or "") or None,
            "reps": reps, "waiting": waiting(s, now)}  # fmt: skip


def waiting(s: Session, now: datetime, limit: int = 200) -> list[dict[str, Any]]:
    """Prospects still waiting for their rep's first answer, oldest first."""
    rows = s.execute(
        select(HandoffRow, Lead)
        .join(Lead, Lead.id == HandoffRow.lead_id)
        .where(HandoffRow.answered_at.is_(None), HandoffRow.closed_at.is_(None))
        .where(Lead.status == LeadStatus.PROSPECT)
        .order_by(HandoffRow.handed_at, HandoffRow.id)
        .limit(limit)
    ).all()
    return [
        {
            "email": lead.email,
            "name": " ".join(x for x in (lead.first_name, lead.last_name) if x),
            "company": lead.company,
            "rep": h.rep,
            "since": iso(h.handed_at),
            "waiting_seconds": int((now - h.handed_at).total_seconds()),
            "sla_due": iso(h.sla_due),
            "breached": h.sla_due is not None and now > h.sla_due,
            "reminded": h.reminded_at is not None,
            "escalated": h.escalated_at is not None,
        }
        for h, lead in rows
    ]


def waiting_leads(s: Session, now: datetime, limit: int = 200) -> list[dict[str, Any]]:
    """`leads list --waiting --json`: the waiting prospects with their lead fields."""
    rows = waiting(s, now, limit)
    leads = s.scalars(select(Lead).where(Lead.email.in_([r["email"] for r in rows])))
    fields = {f["email"]: f for f in lead_rows(s, list(leads))}
    return [
        {
            **fields[r["email"]],
            **{k: v for k, v in r.items() if k not in ("email", "name", "company")},
        }
        for r in rows
    ]


def answered(s: Session, lead_id: int) -> bool:
    """Whether the lead's rep has answered (no handoff of theirs is still waiting)."""
    return (
        s.scalar(
            select(HandoffRow.id).where(
                HandoffRow.lead_id == lead_id,
                HandoffRow.answered_at.is_not(None),
            )
        )
        is not None
    )


def answered_among(s: Session, lead_ids: list[int]) -> set[int]:
    """Which of these leads' reps have answered (`answered`, for many leads at once)."""
    found = select(HandoffRow.lead_id).where(
        HandoffRow.lead_id.in_(sorted(set(lead_ids))), HandoffRow.answered_at.is_not(None)
    )
    return set(s.scalars(found))


# --- what the prospect asked -------------------------------------------------------------

# Words by which a reply asks for something, in the languages our corpus covers; matched
# as plain substrings of the lower-cased new text (linear, bounded by `_SCAN`).
_ASKS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("pricing", ("pricing", "price", "cost", "quote", "budget", "precio", "presupuesto",
                 "coste", "cuánto", "prix", "tarif", "devis", "preis", "kosten", "angebot",
                 "prezzo", "preventivo", "preço", "orçamento", "prijs", "offerte")),
    ("demo", ("demo", "trial", "a call", "meeting", "walkthrough", "demostración", "reunión",
              "llamada", "démonstration", "rendez-vous", "vorführung", "termin", "dimostrazione",
              "demonstração", "reunião")),
)  # fmt: skip
_SCAN = 20_000


def reply_asks(text: str, intent: str | None) -> list[str]:
    """What the prospect's new text asks for: any of `pricing`, `demo`, `referral`,
    `question`, in that order (empty: nothing specific)."""
    low = text[:_SCAN].lower()
    out = [name for name, words in _ASKS if any(w in low for w in words)]
    if intent == "referral":
        out.append("referral")
    if not out and "?" in low:
        out.append("question")
    return out
