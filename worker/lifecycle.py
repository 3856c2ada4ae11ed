"""What an inbound message does to its lead: promotion, suppression, pauses, handoff.

Every helper here writes into the caller's session and never commits: the inbound
message, its effects and the mailbox progress commit together (one unit of work).
Every status change is a LeadEvent with its cause.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime, time, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from sqlalchemy import func, insert, select, update
from sqlalchemy.orm import Session

from worker.app import App
from worker.assign import CONSUMER_DOMAINS, assign, note_assignment
from worker.classify import Classification, strip_reply_prefixes
from worker.compose import new_message_id
from worker.config import Rep
from worker.leads import (
    MOVES,
    cancel_queued,
    enroll,
    lead_fields,
    new_token,
    normalise_email,
    record_created,
    record_event,
    stop_nurture,
    transition,
)
from worker.match import Match
from worker.models import (
    LIVE_ENROLLMENT,
    Enrollment,
    EnrollmentState,
    InboundMessage,
    Lead,
    LeadEvent,
    LeadStatus,
    OutboundMessage,
    OutboxState,
)
from worker.parsing import ParsedMessage
from worker.qualify import LeadFacts, qualify
from worker.webhooks import emit

logger = logging.getLogger(__name__)

NURTURED = (LeadStatus.LEAD, LeadStatus.HELD)
"""Statuses whose soft bounces still count towards suppressing the address."""


def _cause(row: InboundMessage) -> str:
    return f"inbound message <{row.message_id}> ({row.kind})"


def apply_inbound(
    s: Session, app: App, row: InboundMessage, msg: ParsedMessage, cls: Classification, match: Match
) -> None:
    """Apply one freshly recorded inbound message to its lead. Runs once per message."""
    now = app.now()
    if cls.kind == "ours" or (
        match.lead_id is None and match.method is None and _from_rep(app, msg)
    ):
        _rep_answered(s, app, msg, row, now)
        return
    # Lock the lead: two workers reading two replies of one lead must not both promote it.
    lead = None
    if match.lead_id is not None:
        # PostgreSQL: re-read under a row lock. SQLite's BEGIN IMMEDIATE already
        # serialises writers, so the copy matching loaded is current.
        locking = s.get_bind().dialect.name != "sqlite"
        lead = s.get(Lead, match.lead_id, with_for_update=locking, populate_existing=locking)
    if lead is None:
        if cls.kind == "reply" and app.config.unknown_senders == "create_lead" and msg.from_addr:
            _inbound_lead(s, app, msg, row, now)
        return
    cause = _cause(row)
    kind = cls.kind
    if kind in ("unsubscribe", "complaint"):
        why = "a spam complaint (ARF)" if kind == "complaint" else "asked to stop"
        transition(s, lead, "unsubscribed", f"{cause}: {why}", now, inbound_id=row.id)
        stop_nurture(s, lead.id, now, "the lead unsubscribed")
        _cancel_followups(s, lead.id, "the lead unsubscribed")
    elif kind == "bounce" and cls.bounce is not None:
        _bounce(s, app, lead, cls, row, now)
    elif kind == "auto_reply":
        _reset_soft_bounces(s, lead, now, row)
        _auto_reply(s, app, lead, cls, row, now)
    elif kind == "reply":
        _reset_soft_bounces(s, lead, now, row)
        _reply(s, app, lead, msg, cls, match, row, now)


# --- bounces -----------------------------------------------------------------------------


def bounce_lead(
    s: Session, lead: Lead, now: datetime, cause: str, inbound_id: int | None = None
) -> None:
    """Suppress a lead whose address is dead (hard bounce, 5.1.1 at SMTP, soft limit)."""
    if not transition(s, lead, "bounced", cause, now, inbound_id=inbound_id):
        return
    stop_nurture(s, lead.id, now, "the lead's address bounced")


def _bounce(
    s: Session, app: App, lead: Lead, cls: Classification, row: InboundMessage, now: datetime
) -> None:
    assert cls.bounce is not None
    b = cls.bounce
    detail = {
        "type": b.type,
        "reason": b.reason,
        "status": b.status,
        "recipients": list(b.recipients),
    }
    code = f"{b.status} " if b.status else ""
    if b.type == "hard":
        bounce_lead(s, lead, now, f"{_cause(row)}: hard bounce {code}({b.reason})", row.id)
        return
    record_event(
        s,
        lead,
        "soft_bounce",
        f"{_cause(row)}: soft bounce {code}({b.reason})",
        now,
        detail=detail,
        inbound_id=row.id,
    )
    s.flush()
    window = now - timedelta(days=app.config.bounces.soft_window_days)
    last_reset = s.scalar(
        select(func.max(LeadEvent.at)).where(
            LeadEvent.lead_id == lead.id, LeadEvent.type == "bounce_reset"
        )
    )
    since = max(window, last_reset) if last_reset else window
    count = (
        s.scalar(
            select(func.count()).where(
                LeadEvent.lead_id == lead.id, LeadEvent.type == "soft_bounce", LeadEvent.at >= since
            )
        )
        or 0
    )
    if count >= app.config.bounces.soft_limit:
        bounce_lead(
            s, lead, now,
            f"{count} soft bounces within {app.config.bounces.soft_window_days} days (limit {app.config.bounces.soft_limit})",
            row.id,
        )  # fmt: skip


def _reset_soft_bounces(s: Session, lead: Lead, now: datetime, row: InboundMessage) -> None:
    """Genuine mail from the address proves it works: soft bounces start counting again."""
    if lead.status not in NURTURED:
        return  # soft bounces only count towards suppressing a lead still being nurtured
    has_soft = s.scalar(
        select(LeadEvent.id)
        .where(LeadEvent.lead_id == lead.id, LeadEvent.type == "soft_bounce")
        .limit(1)
    )
    if has_soft:
        record_event(
            s, lead, "bounce_reset", f"{_cause(row)}: mail from the address", now, inbound_id=row.id
        )


# --- auto-replies ------------------------------------------------------------------------


def _auto_reply(
    s: Session, app: App, lead: Lead, cls: Classification, row: InboundMessage, now: datetime
) -> None:
    max_days = app.config.auto_reply.max_pause_days
    if cls.return_date is None or max_days <= 0:
        record_event(
            s,
            lead,
            "auto_reply",
            f"{_cause(row)}: no return date, nurture goes on",
            now,
            inbound_id=row.id,
        )
        return
    zone = ZoneInfo(lead.timezone) if lead.timezone else UTC
    back = datetime.combine(cls.return_date, time(0, 0), zone).astimezone(UTC)
    cap = now + timedelta(days=max_days)
    until = min(back, cap)
    if until <= now:
        record_event(
            s,
            lead,
            "auto_reply",
            f"{_cause(row)}: return date {cls.return_date} already past",
            now,
            inbound_id=row.id,
        )
        return
    res = s.execute(
        update(Enrollment)
        .where(Enrollment.lead_id == lead.id, Enrollment.state.in_(LIVE_ENROLLMENT))
        .values(state=EnrollmentState.PAUSED, paused_until=until, updated_at=now)
    )
    capped = " (capped by auto_reply.max_pause_days)" if until < back else ""
    record_event(
        s, lead, "paused",
        f"{_cause(row)}: out of office until {cls.return_date}{capped}",
        now, detail={"until": until.isoformat(), "enrollments": getattr(res, "rowcount", 0)}, inbound_id=row.id,
    )  # fmt: skip


# --- replies -----------------------------------------------------------------------------


def _reply(
    s: Session, app: App, lead: Lead, msg: ParsedMessage, cls: Classification, match: Match,
    row: InboundMessage, now: datetime,
) -> None:  # fmt: skip
    cause = _cause(row)
    first = not s.scalar(
        select(LeadEvent.id)
        .where(LeadEvent.lead_id == lead.id, LeadEvent.type == "engaged")
        .limit(1)
    )
    if first:
        record_event(
            s, lead, "engaged", f"{cause}: two-way — {match.explanation}", now,
            detail={"match": match.method, "intent": cls.intent}, inbound_id=row.id,
        )  # fmt: skip
    if cls.intent == "negative":
        transition(s, lead, "disqualified", f"{cause}: not interested", now, inbound_id=row.id)
        stop_nurture(s, lead.id, now, "the lead is not interested")
        return
    if cls.intent == "referral" and cls.referral_email:
        _referral(s, app, lead, cls.referral_email, row, now)
        if app.config.referrals.referrer == "stop":
            stop_nurture(s, lead.id, now, "the lead pointed to a colleague")
            return
    if lead.status not in MOVES["promoted"].sources:
        if lead.status in (LeadStatus.PROSPECT, LeadStatus.CUSTOMER):
            record_event(s, lead, "replied", f"{cause}: another reply", now, inbound_id=row.id)
            # The rep hears of every reply that lands in our mailbox, not only the first.
            owner = app.config.rep(lead.owner) if lead.owner else None
            why = f"{owner.name} owns this prospect" if owner else "no rep owns this prospect"
            _queue_handoff(
                s, app, lead, msg, cls, match, row, now, _rep_block(app, owner), why, again=True
            )
        return
    result = qualify(LeadFacts.of(lead), cls.reply_text or msg.text, app.config.qualification)
    lead.score = result.score
    lead.qualification = result.as_json()
    stop_nurture(s, lead.id, now, "the lead replied")
    if app.config.qualification.require_fit and not result.fit:
        transition(
            s, lead, "held", f"{cause}: replied, but below the minimum fit (score {result.score}): review by hand",
            now, inbound_id=row.id,
        )  # fmt: skip
        return
    promote(s, app, lead, msg, cls, match, row, now)


def promote(
    s: Session, app: App, lead: Lead, msg: ParsedMessage, cls: Classification, match: Match,
    row: InboundMessage, now: datetime,
) -> None:  # fmt: skip
    """lead -> prospect: assign a rep, queue the handoff and the in-thread follow-up."""
    config = app.config
    cause = _cause(row)
    transition(
        s, lead, "promoted", f"{cause}: genuine reply ({cls.intent or 'neutral'}), {match.explanation}",
        now, detail={"match": match.method, "score": lead.score}, inbound_id=row.id,
    )  # fmt: skip
    a = assign(s, lead, config, now)
    rep = a.rep
    if rep is not None:
        lead.owner = rep.email
        note_assignment(s, rep.email, now)
        record_event(
            s,
            lead,
            "assigned",
            a.reason,
            now,
            detail={"rep": rep.email, "reason": a.reason},
            inbound_id=row.id,
        )
    else:
        record_event(s, lead, "unassigned", a.reason, now, inbound_id=row.id)
    emit(s, lead, "lead.promoted", now, f"{cause}: genuine reply", row.id)
    _account_awareness(s, app, lead, rep.email if rep else None, now)
    rep_block = _rep_block(app, rep)
    reply_text = _queue_handoff(s, app, lead, msg, cls, match, row, now, rep_block, a.reason)
    fu = config.handoff.follow_up
    if fu is None or not msg.message_id:
        return
    from worker.schedule import add_delay

    from_rep = fu.from_ == "rep" and rep is not None
    subject = strip_reply_prefixes(msg.subject)
    s.add(
        OutboundMessage(
            idempotency_key=f"followup:{row.id}",
            kind="followup",
            lead_id=lead.id,
            template=fu.template,
            message_id=new_message_id(config.sender.domain),
            reply_token=lead.reply_token,
            to_addr=lead.email,
            mailbox=rep.mailbox if from_rep and rep else None,
            in_reply_to=msg.message_id,
            inbound_id=row.id,
            status=OutboxState.QUEUED,
            attempts=0,
            next_attempt_at=add_delay(now, fu.delay, lead.timezone or "UTC"),
            context={
                "rep": rep_block,
                "reply": {"subject": msg.subject, "text": reply_text},
                "references": [*msg.references, msg.message_id][-20:],
                "subject_override": f"Re: {subject}" if subject else "Re: your reply",
                "from_addr": rep.email if from_rep and rep else config.sender.address,
                "from_name": rep.name if from_rep and rep else config.sender.display_name,
            },
            created_at=now,
        )
    )
    record_event(
        s, lead, "followup_queued", "in-thread answer to the prospect", now, inbound_id=row.id
    )


def _rep_block(app: App, rep: Rep | None) -> dict[str, str]:
    """The `rep` templates see; the sales team's address when no rep could be assigned."""
    if rep is not None:
        return {"name": rep.name, "email": rep.email, "first_name": rep.name.split()[0]}
    return {"name": "Sales team", "email": app.config.sender.address, "first_name": "team"}


def _queue_handoff(
    s: Session, app: App, lead: Lead, msg: ParsedMessage, cls: Classification, match: Match,
    row: InboundMessage, now: datetime, rep_block: dict[str, str], reason: str,
    *, again: bool = False,
) -> str:  # fmt: skip
    """Queue the email that hands this reply to the rep (once per inbound message).

    `again`: the lead already is the rep's prospect and wrote once more. Returns the
    reply text the email quotes.
    """
    reply_block = {
        "subject": msg.subject,
        "from": f"{msg.from_name} <{msg.from_addr}>" if msg.from_name else (msg.from_addr or ""),
        "date": (msg.date or now).strftime("%a, %d %b %Y %H:%M %Z"),
        "text": cls.reply_text or msg.text.strip(),
    }
    context: dict[str, Any] = {
        "rep": rep_block,
        "prospect": {**lead_fields(lead), "status": lead.status, "owner": lead.owner},
        "qualification": lead.qualification or {"score": lead.score, "checklist": []},
        "match": {"method": match.method, "explanation": _why_two_way(match, cls)},
        "reply": reply_block,
        "reply_text": reply_block["text"],
        "thread": _thread(s, lead, row),
        "assignment_reason": reason,
        "again": again,
    }
    s.add(
        OutboundMessage(
            idempotency_key=f"handoff:{row.id}",
            kind="handoff",
            lead_id=lead.id,
            template=app.config.handoff.template,
            message_id=new_message_id(app.config.sender.domain),
            to_addr=rep_block["email"],
            inbound_id=row.id,
            status=OutboxState.QUEUED,
            attempts=0,
            next_attempt_at=now,
            context=context,
            created_at=now,
        )
    )
    what = "new reply" if again else "handoff"
    record_event(
        s, lead, "handoff_queued", f"{what} to {rep_block['email']}", now, inbound_id=row.id
    )
    return str(reply_block["text"])


def _why_two_way(match: Match, cls: Classification) -> str:
    return (
        f"{match.explanation}. It was classified a genuine human reply ({cls.reason}), "
        "not an auto-reply, bounce, list mail or unsubscribe, so the conversation is two-way."
    )


THREAD_ITEMS = 20


def _thread(s: Session, lead: Lead, current: InboundMessage) -> list[dict[str, Any]]:
    items: list[tuple[datetime, dict[str, Any]]] = []
    # The latest THREAD_ITEMS each way: bounded however long the lead's history is.
    for o in s.scalars(
        select(OutboundMessage)
        .where(OutboundMessage.lead_id == lead.id, OutboundMessage.status == OutboxState.SENT)
        .order_by(OutboundMessage.id.desc())
        .limit(THREAD_ITEMS)
    ):
        at = o.sent_at or o.created_at
        summary = f"step {(o.step or 0) + 1} of {o.campaign}" if o.kind == "nurture" else o.kind
        items.append(
            (
                at,
                {
                    "direction": "out",
                    "at": at.strftime("%Y-%m-%d %H:%M UTC"),
                    "subject": o.subject or "",
                    "summary": summary,
                },
            )
        )
    for m in s.scalars(
        select(InboundMessage)
        .where(InboundMessage.lead_id == lead.id)
        .order_by(InboundMessage.id.desc())
        .limit(THREAD_ITEMS)
    ):
        at = m.sent_date or m.received_at
        text = (m.reply_text or m.reason or "").strip().replace("\n", " ")
        items.append(
            (
                at,
                {
                    "direction": "in",
                    "at": at.strftime("%Y-%m-%d %H:%M UTC"),
                    "subject": m.subject or "",
                    "summary": text[:160],
                },
            )
        )
    if current.lead_id is None:  # not flushed with its lead yet
        at = current.sent_date or current.received_at
        items.append(
            (
                at,
                {
                    "direction": "in",
                    "at": at.strftime("%Y-%m-%d %H:%M UTC"),
                    "subject": current.subject or "",
                    "summary": (current.reply_text or "")[:160],
                },
            )
        )
    items.sort(key=lambda x: x[0])
    return [d for _, d in items]


ACCOUNT_MAX_LEADS = 50
"""A company with more leads than this is a large employer, not a prospect's team:
one person's reply there neither pauses nor reassigns their colleagues."""


def _account_awareness(
    s: Session, app: App, lead: Lead, rep_email: str | None, now: datetime
) -> None:
    """Colleagues at the same company pause their nurture and go to the same rep.

    Set-based and bounded: one lookup of at most ACCOUNT_MAX_LEADS + 1 colleagues, one UPDATE of the
    colleagues' active enrollments, one of their missing owners, and one event per
    colleague something actually changed for.
    """
    campaigns = set(s.scalars(select(Enrollment.campaign).where(Enrollment.lead_id == lead.id)))
    aware = [c for c in app.config.campaigns if c.name in campaigns and c.account_awareness]
    if not aware or lead.domain in CONSUMER_DOMAINS:  # colleagues at gmail.com are no account
        return
    # The domain alone in the WHERE: no statistics can steer the planner to the status
    # index (at 1,000,000 leads, sampled statistics did: a scan of every lead).
    same = s.execute(
        select(Lead.id, Lead.status)
        .where(Lead.domain == lead.domain, Lead.id != lead.id)
        .limit(ACCOUNT_MAX_LEADS + 1)
    ).all()
    if not same:
        return
    if len(same) > ACCOUNT_MAX_LEADS:
        record_event(
            s, lead, "account_skipped",
            f"{lead.domain} has more than {ACCOUNT_MAX_LEADS} other leads: a large employer, "
            "so colleagues' nurture goes on and they keep their own reps",
            now,
        )  # fmt: skip
        return
    colleagues = [other for other, status in same if status == LeadStatus.LEAD]
    if not colleagues:
        return
    paused = set(
        s.scalars(
            update(Enrollment)
            .where(Enrollment.lead_id.in_(colleagues), Enrollment.state == EnrollmentState.ACTIVE)
            .values(state=EnrollmentState.PAUSED, paused_until=None, updated_at=now)
            .returning(Enrollment.lead_id)
            .execution_options(synchronize_session=False)
        )
    )
    owned: set[int] = set()
    if rep_email:
        owned = set(
            s.scalars(
                update(Lead)
                .where(Lead.id.in_(colleagues), Lead.owner.is_(None))
                .values(owner=rep_email, updated_at=now)
                .returning(Lead.id)
                .execution_options(synchronize_session="fetch")
            )
        )
    if not (paused or owned):
        return
    shown = rep_email or "the team"
    s.execute(
        insert(LeadEvent),
        [
            {
                "lead_id": other,
                "at": now,
                "type": "account_paused",
                "from_status": None,
                "to_status": None,
                "cause": f"colleague {lead.email} became a prospect: "
                + ("nurture paused, " if other in paused else "")
                + (f"now owned by {shown}" if other in owned else f"shown to {shown}"),
                "detail": {},
                "inbound_id": None,
            }
            for other in sorted(paused | owned)
        ],
    )


def _referral(
    s: Session, app: App, referrer: Lead, email: str, row: InboundMessage, now: datetime
) -> None:
    try:
        address = normalise_email(email)
    except ValueError:
        return
    existing = s.scalar(select(Lead).where(Lead.email == address))
    record_event(
        s,
        referrer,
        "referral",
        f"{_cause(row)}: points to {address}",
        now,
        detail={"referred": address},
        inbound_id=row.id,
    )
    if existing is not None:
        return
    new = Lead(
        email=address,
        company=referrer.company,
        industry=referrer.industry,
        company_size=referrer.company_size,
        annual_revenue=referrer.annual_revenue,
        country=referrer.country,
        timezone=referrer.timezone,
        source="referral",
        custom={},
        status=LeadStatus.LEAD,
        reply_token=new_token(),
        domain=address.rsplit("@", 1)[1],
        referred_by_id=referrer.id,
        created_at=now,
        updated_at=now,
    )
    s.add(new)
    s.flush()
    record_created(s, new, f"referred by {referrer.email} in {_cause(row)}", now, row.id)
    for name in s.scalars(select(Enrollment.campaign).where(Enrollment.lead_id == referrer.id)):
        try:
            enroll(s, [new.id], app.config.campaign(name), now)
        except KeyError:
            continue


def _inbound_lead(
    s: Session, app: App, msg: ParsedMessage, row: InboundMessage, now: datetime
) -> None:
    assert msg.from_addr
    if s.scalar(select(Lead.id).where(Lead.email == msg.from_addr)):
        return
    name = (msg.from_name or "").split()
    lead = Lead(
        email=msg.from_addr,
        first_name=name[0] if name else None,
        last_name=" ".join(name[1:]) or None,
        source="inbound",
        custom={},
        status=LeadStatus.LEAD,
        reply_token=new_token(),
        domain=msg.from_addr.rsplit("@", 1)[1],
        created_at=now,
        updated_at=now,
    )
    s.add(lead)
    s.flush()
    row.lead_id, row.match_method = lead.id, "new_lead"
    record_created(s, lead, f"{_cause(row)}: wrote to us unprompted", now, row.id)


# --- reps answering ----------------------------------------------------------------------


def _from_rep(app: App, msg: ParsedMessage) -> bool:
    return bool(msg.from_addr) and app.config.rep(msg.from_addr or "") is not None


def _rep_answered(
    s: Session, app: App, msg: ParsedMessage, row: InboundMessage, now: datetime
) -> None:
    """A rep wrote to a prospect before our follow-up went out: cancel the follow-up."""
    if not _from_rep(app, msg):
        return
    for addr in (*msg.to, *msg.cc):
        lead = s.scalar(select(Lead).where(Lead.email == addr))
        if lead is None:
            continue
        if lead.status in ("prospect", "customer"):
            emit(
                s, lead, "lead.rep_answered", now, f"{msg.from_addr} wrote ({_cause(row)})", row.id
            )
        n = _cancel_followups(s, lead.id, f"{msg.from_addr} answered first")
        if n:
            record_event(
                s,
                lead,
                "followup_cancelled",
                f"{msg.from_addr} answered first ({_cause(row)})",
                now,
                inbound_id=row.id,
            )


def _cancel_followups(s: Session, lead_id: int, why: str) -> int:
    return cancel_queued(s, lead_id, "followup", why)
