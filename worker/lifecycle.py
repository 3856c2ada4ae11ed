"""What an inbound message does to its lead: promotion, suppression, pauses, handoff.

Every helper here writes into the caller's session and never commits: the inbound
message, its effects and the mailbox progress commit together (one unit of work).
Every status change is a LeadEvent with its cause.
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, time, timedelta
from typing import Any, Literal
from zoneinfo import ZoneInfo

from sqlalchemy import BindParameter, Integer, Row, Select, Update, bindparam, func, select, update
from sqlalchemy.orm import Session
from sqlalchemy.orm.util import identity_key

from worker import handoffs
from worker.app import App
from worker.assign import CONSUMER_DOMAINS, assign, note_assignment
from worker.classify import Classification, strip_reply_prefixes
from worker.compose import LOOP_HEADER
from worker.config import Rep
from worker.contexts import (
    Colleague,
    FollowupFacts,
    HandoffFacts,
    RepBlock,
    RepCopyFacts,
    ReplyBlock,
    ThreadItem,
    rep_block,
)
from worker.db import core, fetch, run
from worker.leads import (
    MOVES,
    batch_leads,
    bounce_lead,
    cancel_queued,
    enroll,
    forget_loaded,
    has_event,
    lead_campaigns,
    lead_fields,
    new_token,
    normalise_email,
    pending_events,
    queue_events,
    record_created,
    record_event,
    stop_nurture,
    transition,
)
from worker.match import Match, is_internal
from worker.models import (
    Enrollment,
    Handoff,
    InboundMessage,
    Lead,
    LeadEvent,
    LeadStatus,
    OutboundMessage,
    OutboxState,
    UTCDateTime,
)
from worker.outbox import enqueue
from worker.parsing import ParsedMessage
from worker.qualify import LeadFacts, qualify
from worker.states import enrollments
from worker.webhooks import emit

logger = logging.getLogger(__name__)

NURTURED = (LeadStatus.LEAD, LeadStatus.HELD)
"""Statuses whose soft bounces still count towards suppressing the address."""


@dataclass(frozen=True)
class Inbound:
    """One inbound message as its lead's lifecycle sees it: the row just recorded, the
    parsed message, its classification and match, and the instant it is applied at."""

    row: InboundMessage
    msg: ParsedMessage
    cls: Classification
    match: Match
    at: datetime

    @property
    def cause(self) -> str:
        """How events caused by this message name it."""
        return _cause(self.row)


def _cause(row: InboundMessage) -> str:
    return f"inbound message <{row.message_id}> ({row.kind})"


_LOCKED = "twoway.locked_leads"


def lock_leads(s: Session, lead_ids: Iterable[int]) -> None:
    """PostgreSQL: lock and re-read an inbound batch's leads at once, in id order (so two
    workers' batches queue behind each other instead of deadlocking), for the rest of
    the unit of work; `apply_inbound` then needs no lock of its own for them. SQLite's
    BEGIN IMMEDIATE already serialises writers."""
    if s.get_bind().dialect.name == "sqlite":
        return
    ids = sorted(set(lead_ids))
    for i in range(0, len(ids), 500):
        s.scalars(
            select(Lead)
            .where(Lead.id.in_(ids[i : i + 500]))
            .order_by(Lead.id)
            .with_for_update()
            .execution_options(populate_existing=True)
        ).all()
    s.info[_LOCKED] = set(ids)


def apply_inbound(s: Session, app: App, ev: Inbound) -> None:
    """Apply one freshly recorded inbound message to its lead. Runs once per message."""
    _apply(s, app, ev)
    _recorded(s, ev.row)


def _apply(s: Session, app: App, ev: Inbound) -> None:
    row, msg, cls, match, now = ev.row, ev.msg, ev.cls, ev.match, ev.at
    if cls.kind == "ours" or (
        match.lead_id is None and match.method is None and is_internal(msg.from_addr, app.config)
    ):
        _rep_answered(s, app, ev)
        return
    # Lock the lead: two workers reading two replies of one lead must not both promote it.
    lead = None
    if match.lead_id is not None:
        # PostgreSQL: re-read under a row lock. SQLite's BEGIN IMMEDIATE already
        # serialises writers, so the copy matching loaded is current.
        locking = s.get_bind().dialect.name != "sqlite" and match.lead_id not in s.info.get(
            _LOCKED, ()
        )
        lead = s.get(Lead, match.lead_id, with_for_update=locking, populate_existing=locking)
    if lead is None:
        if cls.kind == "reply" and app.config.unknown_senders == "create_lead" and msg.from_addr:
            _inbound_lead(s, ev)
        return
    cause = ev.cause
    kind = cls.kind
    doubt = untrusted(s, lead, ev)
    if doubt is not None:
        # Anyone can write a DSN or a reply naming a lead: act only on what is tied to us.
        record_event(
            s, lead, f"unverified_{kind}", f"{cause}: not acted on: {doubt}", now,
            detail={"match": match.method, "why": doubt}, inbound_id=row.id,
        )  # fmt: skip
        return
    if kind in ("unsubscribe", "complaint"):
        why = "a spam complaint (ARF)" if kind == "complaint" else "asked to stop"
        transition(s, lead, "unsubscribed", f"{cause}: {why}", now, inbound_id=row.id)
        stop_nurture(s, lead.id, now, "the lead unsubscribed")
        _cancel_followups(s, lead.id, "the lead unsubscribed")
    elif kind == "bounce" and cls.bounce is not None:
        _bounce(s, app, lead, ev)
    elif kind == "auto_reply":
        _reset_soft_bounces(s, lead, ev)
        _auto_reply(s, app, lead, ev)
    elif kind == "reply":
        _reset_soft_bounces(s, lead, ev)
        _reply(s, app, lead, ev)


# --- trust -------------------------------------------------------------------------------

TRUST_DAYS = 30
"""A bounce naming a lead we mailed in this many days may act on it without our token."""


def untrusted(s: Session, lead: Lead, ev: Inbound) -> str | None:
    """Why this message must not change the lead (None: it may).

    A reply token (or VERP address) or one of our Message-IDs ties a message to mail we
    sent, so it is trusted. A message matched only by an address is weaker: a bounce
    then needs us to have mailed that address lately and the receiving server's
    Authentication-Results not to fail it; a reply, unsubscribe or disqualifying answer
    needs its Authentication-Results not to say that DMARC failed.
    """
    if ev.match.method != "sender" or ev.cls.kind not in ("bounce", "reply", "unsubscribe"):
        return None
    verdict = auth_failure(ev.msg)
    if ev.cls.kind == "bounce":
        mailed = s.scalar(
            select(func.count()).where(
                OutboundMessage.lead_id == lead.id,
                OutboundMessage.status.in_(("sent", "unknown")),
                OutboundMessage.sent_at >= ev.at - timedelta(days=TRUST_DAYS),
            )
        )
        if not mailed:
            return f"a bounce without our token or Message-ID, and we sent nothing to {lead.email} lately"
        return f"a bounce whose Authentication-Results say {verdict}" if verdict else None
    if verdict and verdict.startswith("dmarc"):
        return f"no token or thread reference, and Authentication-Results say {verdict}"
    return None


def auth_failure(msg: ParsedMessage) -> str | None:
    """ "dmarc=fail" (or spf/dkim) when the topmost Authentication-Results (RFC 8601), the
    one the receiving server added, says a check failed; None otherwise."""
    header = msg.header("authentication-results")
    if not header:
        return None
    results = {
        m.group(1).lower(): m.group(2).lower() for m in _AUTH_RESULT_RE.finditer(header[:4000])
    }
    for method in ("dmarc", "spf", "dkim"):
        if results.get(method) in ("fail", "permerror"):
            return f"{method}={results[method]}"
    return None


_AUTH_RESULT_RE = re.compile(r"(?i)(?<![\w.-])(dmarc|spf|dkim)\s*=\s*([a-z]+)")


# --- bounces -----------------------------------------------------------------------------


def _bounce(s: Session, app: App, lead: Lead, ev: Inbound) -> None:
    row, now = ev.row, ev.at
    assert ev.cls.bounce is not None
    b = ev.cls.bounce
    detail = {
        "type": b.type,
        "reason": b.reason,
        "status": b.status,
        "recipients": list(b.recipients),
    }
    code = f"{b.status} " if b.status else ""
    sent = fetch(core(s), _BOUNCED_TO, {"id": ev.match.outbound_id}) if ev.match.outbound_id else []
    ours = sent[0][0] if sent else None
    failed = {r.lower() for r in b.recipients}
    if (ours is not None and ours != lead.email) or (failed and lead.email not in failed):
        # Mail about the lead to someone else bounced (the rep's briefing, or the reply-ready
        # copy: it carries her Message-ID and token): the lead's address is not at fault.
        to = ours if ours is not None else ", ".join(sorted(failed))
        record_event(
            s, lead, "team_bounce", f"{_cause(row)}: our mail to {to} bounced {code}({b.reason})",
            now, detail=detail, inbound_id=row.id,
        )  # fmt: skip
        return
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
    # The table's events and those this unit of work has not written yet (buffered; an
    # unbuffered event is in the table already).
    window = now - timedelta(days=app.config.bounces.soft_window_days)
    conn = core(s)
    recorded: datetime | None = fetch(conn, _LAST_RESET, {"lead": lead.id})[0][0]  # MAX: NULL
    resets = [r["at"] for r in pending_events(s, lead.id, "bounce_reset")]
    last_reset = max([x for x in (recorded, *resets) if x is not None], default=None)
    since = max(window, last_reset) if last_reset else window
    count = (fetch(conn, _SOFT_SINCE, {"lead": lead.id, "since": since})[0][0] or 0) + sum(
        1 for r in pending_events(s, lead.id, "soft_bounce") if r["at"] >= since
    )
    if count >= app.config.bounces.soft_limit:
        bounce_lead(
            s, lead, now,
            f"{count} soft bounces within {app.config.bounces.soft_window_days} days (limit {app.config.bounces.soft_limit})",
            row.id,
        )  # fmt: skip


# Built once: they run for every bounce.
_BOUNCED_TO = select(OutboundMessage.to_addr).where(OutboundMessage.id == bindparam("id"))
_LAST_RESET = select(func.max(LeadEvent.at)).where(
    LeadEvent.lead_id == bindparam("lead"), LeadEvent.type == "bounce_reset"
)
_SOFT_SINCE = select(func.count()).where(
    LeadEvent.lead_id == bindparam("lead"),
    LeadEvent.type == "soft_bounce",
    LeadEvent.at >= bindparam("since", type_=UTCDateTime()),
)


def _reset_soft_bounces(s: Session, lead: Lead, ev: Inbound) -> None:
    """Genuine mail from the address proves it works: soft bounces start counting again."""
    if lead.status not in NURTURED:
        return  # soft bounces only count towards suppressing a lead still being nurtured
    if has_event(s, lead.id, "soft_bounce"):
        record_event(
            s,
            lead,
            "bounce_reset",
            f"{ev.cause}: mail from the address",
            ev.at,
            inbound_id=ev.row.id,
        )


# --- auto-replies ------------------------------------------------------------------------

_PAUSE = enrollments("paused", Enrollment.lead_id == bindparam("lead")).values(
    paused_until=bindparam("until"), updated_at=bindparam("at")
)


def _auto_reply(s: Session, app: App, lead: Lead, ev: Inbound) -> None:
    cls, row, now = ev.cls, ev.row, ev.at
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
    res = run(core(s), _PAUSE, {"lead": lead.id, "until": until, "at": now})
    if res.rowcount:
        forget_loaded(s, Enrollment, lead.id)
    capped = " (capped by auto_reply.max_pause_days)" if until < back else ""
    record_event(
        s, lead, "paused",
        f"{_cause(row)}: out of office until {cls.return_date}{capped}",
        now, detail={"until": until.isoformat(), "enrollments": res.rowcount}, inbound_id=row.id,
    )  # fmt: skip


# --- replies -----------------------------------------------------------------------------


def _reply(s: Session, app: App, lead: Lead, ev: Inbound) -> None:
    msg, cls, match, row, now = ev.msg, ev.cls, ev.match, ev.row, ev.at
    cause = ev.cause
    first = not has_event(s, lead.id, "engaged")
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
        _referral(s, app, lead, cls.referral_email, ev)
        if app.config.referrals.referrer == "stop":
            stop_nurture(s, lead.id, now, "the lead pointed to a colleague")
            return
    if lead.status not in MOVES["promoted"].sources:
        if lead.status in (LeadStatus.PROSPECT, LeadStatus.CUSTOMER):
            record_event(s, lead, "replied", f"{cause}: another reply", now, inbound_id=row.id)
            # The rep hears of every reply that lands in our mailbox, not only the first.
            owner = app.config.rep(lead.owner) if lead.owner else None
            why = f"{owner.name} owns this prospect" if owner else "no rep owns this prospect"
            _queue_handoff(s, app, lead, ev, _rep_block(app, owner), why, again=True)
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
    promote(s, app, lead, ev)


def promote(s: Session, app: App, lead: Lead, ev: Inbound) -> None:
    """lead -> prospect: assign a rep, queue the handoff and the in-thread follow-up."""
    config = app.config
    msg, cls, match, row, now = ev.msg, ev.cls, ev.match, ev.row, ev.at
    cause = ev.cause
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
    colleagues = _account_awareness(s, app, lead, rep.email if rep else None, now)
    rep_block = _rep_block(app, rep)
    if rep is not None:
        handoffs.open_handoff(s, config, lead, rep.email, now, row.id)
    followup = None
    if config.handoff.follow_up is not None and msg.message_id:
        followup = _queue_followup(s, app, lead, ev, rep, rep_block, cls.reply_text or msg.text)
    _queue_handoff(s, app, lead, ev, rep_block, a.reason, colleagues=colleagues, followup=followup)


def _rep_block(app: App, rep: Rep | None) -> RepBlock:
    """The `rep` templates see; the sales team's address when no rep could be assigned."""
    if rep is not None:
        return rep_block(rep.name, rep.email)
    return {"name": "Sales team", "email": app.config.sender.address, "first_name": "team"}


def _queue_handoff(
    s: Session, app: App, lead: Lead, ev: Inbound, rep: RepBlock, reason: str,
    *, again: bool = False, colleagues: list[Colleague] | None = None,
    followup: dict[str, Any] | None = None, key: str = "",
) -> str:  # fmt: skip
    """Queue the two emails that hand this reply to the rep (once per inbound message).

    The briefing (`handoff`) is internal: from the sales address, no Reply-To, nothing of
    the prospect in its headers, so no reply to it can reach the prospect. The reply-ready
    copy (`rep_copy`) is the prospect's own message and nothing else, with her thread
    headers: the rep answers from it (see README, "For reps").

    `again`: the lead already is the rep's prospect and wrote once more. `key` tells
    apart a second handoff of the same message (a reassignment). Returns the reply text.
    """
    msg, cls = ev.msg, ev.cls
    reply: ReplyBlock = {
        "subject": msg.subject or "",
        "from": f"{msg.from_name} <{msg.from_addr}>" if msg.from_name else (msg.from_addr or ""),
        "date": (msg.date or ev.at).strftime("%a, %d %b %Y %H:%M %Z"),
        "text": cls.reply_text or msg.text.strip(),
    }
    facts: HandoffFacts = {
        "rep": rep,
        "prospect": {**lead_fields(lead), "status": lead.status, "owner": lead.owner},
        "qualification": lead.qualification or {"score": lead.score, "checklist": []},
        "match": {"method": ev.match.method, "explanation": _why_two_way(ev.match, cls)},
        "reply": reply,
        "reply_text": reply["text"],
        "thread": _thread(s, lead, ev.row),
        "assignment_reason": reason,
        "again": again,
        "colleagues": colleagues or [],
        "followup": followup,
    }
    enqueue(
        s, app.config, "handoff", f"handoff:{key}{ev.row.id}", lead, app.config.handoff.template,
        ev.at, to_addr=rep["email"], facts=facts, inbound_id=ev.row.id,
    )  # fmt: skip
    if msg.message_id:
        # Only what the prospect wrote and who she is: this context is all the copy's
        # template can show, so nothing internal can end up in the rep's answer.
        copy: RepCopyFacts = {
            "reply": {
                "subject": msg.subject or "",
                "from_name": msg.from_name or lead.first_name or lead.email,
                "date": reply["date"],
                "full_text": msg.text[:200_000],
            },
            "header_message_id": msg.message_id,
            "references": [*msg.references][-20:],
            "reply_in_reply_to": msg.in_reply_to[0] if msg.in_reply_to else None,
        }
        enqueue(
            s, app.config, "rep_copy", f"rep_copy:{key}{ev.row.id}", lead,
            app.config.handoff.reply_template, ev.at, to_addr=rep["email"], facts=copy,
            inbound_id=ev.row.id, message_id=msg.message_id,
        )  # fmt: skip
    what = "new reply" if again else "handoff"
    record_event(
        s, lead, "handoff_queued", f"{what} to {rep['email']}", ev.at, inbound_id=ev.row.id
    )
    return reply["text"]


def _queue_followup(
    s: Session, app: App, lead: Lead, ev: Inbound, rep: Rep | None, block: RepBlock, text: str
) -> dict[str, Any]:
    """Queue the in-thread answer to the prospect, from their rep (or the sender), after
    `handoff.follow_up.delay` in the rep's zone and business hours. Returns what the
    briefing announces of it (when, and the row's key for its text)."""
    fu, sender, msg = app.config.handoff.follow_up, app.config.sender, ev.msg
    assert fu is not None and msg.message_id
    by_rep = rep if fu.from_ == "rep" else None
    subject = strip_reply_prefixes(msg.subject)
    facts: FollowupFacts = {
        "rep": block,
        "reply": {
            "subject": msg.subject,
            "text": text.strip(),
            "asks": handoffs.reply_asks(text, ev.cls.intent),
            "referral": ev.cls.referral_email or "",
        },
        "references": [*msg.references, msg.message_id][-20:],
        "subject_override": f"Re: {subject}" if subject else "Re: your reply",
        "from_addr": by_rep.email if by_rep else sender.address,
        "from_name": by_rep.name if by_rep else sender.display_name,
    }
    config = app.config
    zone = config.rep_timezone(rep.email if rep else None)
    due = handoffs.rep_due(config, rep.email if rep else "", ev.at, fu.delay)
    enqueue(
        s, config, "followup", f"followup:{ev.row.id}", lead, fu.template, ev.at,
        due=due, facts=facts, mailbox=by_rep.mailbox if by_rep else None,
        in_reply_to=msg.message_id, inbound_id=ev.row.id,
    )  # fmt: skip
    local = due.astimezone(ZoneInfo(zone)).strftime("%H:%M on %a %d %b") + f" ({zone})"
    record_event(
        s, lead, "followup_queued",
        f"in-thread answer to the prospect in {block['name']}'s name, unless answered by {local}",
        ev.at, inbound_id=ev.row.id,
    )  # fmt: skip
    return {
        "due": due.isoformat(),
        "due_local": local,
        "immediate": due <= ev.at,
        "key": f"followup:{ev.row.id}",
    }


def _why_two_way(match: Match, cls: Classification) -> str:
    """Plain words for why this is a person answering (the detail stays in `leads show`)."""
    how = {
        "reply_token": "was sent to the reply address of our email to them",
        "message_id": "answers one of our emails",
        "sender": "comes from their address",
    }.get(match.method or "", "was matched to them")
    return (
        f"The message {how}, and a person wrote it: it is not an out-of-office, "
        "an automatic answer, a bounce, a newsletter or an unsubscribe."
    )


THREAD_ITEMS = 20
_THREAD_TEXT = 2000
# The latest THREAD_ITEMS each way: bounded however long the lead's history is. The
# columns shown only (not the rows: their contexts and raw mail are large). Built once:
# they run for every reply, and building a statement costs about what running it does.
_OUT, _IN = OutboundMessage, InboundMessage
_THREAD_OUT = (
    select(_OUT.sent_at, _OUT.created_at, _OUT.subject, _OUT.kind, _OUT.step, _OUT.campaign)
    .where(
        _OUT.lead_id == bindparam("lead_id"),
        _OUT.status == OutboxState.SENT,
        _OUT.kind.in_(("nurture", "followup")),
    )
    .order_by(_OUT.id.desc())
    .limit(THREAD_ITEMS)
)
_THREAD_IN = (
    select(
        _IN.id, _IN.sent_date, _IN.received_at, _IN.kind, _IN.reason, _IN.reply_text, _IN.subject
    )
    .where(_IN.lead_id == bindparam("lead_id"))
    .order_by(_IN.id.desc())
    .limit(THREAD_ITEMS)
)


_n = func.row_number().over(partition_by=_OUT.lead_id, order_by=_OUT.id.desc()).label("n")
_sent = (
    select(_OUT.lead_id, _OUT.sent_at, _OUT.created_at, _OUT.subject, _OUT.kind, _OUT.step,
           _OUT.campaign, _n)
    .where(
        _OUT.lead_id.in_(bindparam("ids", expanding=True)),
        _OUT.status == OutboxState.SENT,
        _OUT.kind.in_(("nurture", "followup")),
    )
    .subquery()
)  # fmt: skip
_THREAD_OUT_BATCH = (
    select(_sent).where(_sent.c.n <= THREAD_ITEMS).order_by(_sent.c.lead_id, _sent.c.n)
)
"""_THREAD_OUT for every lead of an inbound batch at once (the latest THREAD_ITEMS each)."""
_SENT_THREADS = "twoway.sent_threads"


_k = func.row_number().over(partition_by=_IN.lead_id, order_by=_IN.id.desc()).label("n")
_got = (
    select(_IN.lead_id, _IN.id, _IN.sent_date, _IN.received_at, _IN.kind, _IN.reason,
           _IN.reply_text, _IN.subject, _k)
    .where(_IN.lead_id.in_(bindparam("ids", expanding=True)))
    .subquery()
)  # fmt: skip
_THREAD_IN_BATCH = select(_got).where(_got.c.n <= THREAD_ITEMS)
"""_THREAD_IN for every lead of an inbound batch at once, as the batch began."""
_RECEIVED_THREADS = "twoway.received_threads"
_RECORDED = "twoway.recorded_messages"
_CHUNK = 900  # leads per IN list: below SQLite's bound-parameter limit


def _batch_rows(s: Session, key: str, stmt: Select[Any]) -> dict[int, list[Row[Any]]]:
    """`stmt` (a SELECT of `lead_id` and more, over the leads `ids`) for every lead of the
    inbound batch, per lead: read once per unit of work, when first asked, kept at `key`."""
    rows: dict[int, list[Row[Any]]] | None = s.info.get(key)
    if rows is None:
        rows = s.info[key] = {}
        ids = sorted(batch_leads(s))
        for i in range(0, len(ids), _CHUNK):
            for r in core(s).execute(stmt, {"ids": ids[i : i + _CHUNK]}):
                rows.setdefault(r.lead_id, []).append(r)
    return rows


def _sent_to(s: Session, lead_id: int) -> list[Row[Any]]:
    """_THREAD_OUT's rows for one lead: on the inbound path, read once for the whole batch
    (nothing the batch does sends mail; on PostgreSQL a nurture email another worker
    sends meanwhile may be missing from a briefing's thread, as it would be a moment
    earlier)."""
    if lead_id not in batch_leads(s):
        return list(core(s).execute(_THREAD_OUT, {"lead_id": lead_id}))
    return _batch_rows(s, _SENT_THREADS, _THREAD_OUT_BATCH).get(lead_id, [])


def _received(s: Session, lead_id: int, current: InboundMessage) -> list[Any]:
    """_THREAD_IN's rows for one lead, newest first, `current` among them. On the inbound
    path one read for the batch's leads, plus the batch's own messages kept in memory."""
    recorded: dict[int, list[InboundMessage]] | None = s.info.get(_RECORDED)
    if recorded is None or lead_id not in batch_leads(s):
        before: list[Any] = list(core(s).execute(_THREAD_IN, {"lead_id": lead_id}))
    else:
        before = _batch_rows(s, _RECEIVED_THREADS, _THREAD_IN_BATCH).get(lead_id, [])
        before = before + recorded.get(lead_id, [])
    rows = {m.id: m for m in before}  # a message recorded before the read is in both
    rows.pop(current.id, None)
    return [current, *sorted(rows.values(), key=lambda m: m.id, reverse=True)][:THREAD_ITEMS]


def remember_received(s: Session) -> None:
    """Let this unit of work (an inbound batch) keep its messages for the briefings'
    threads (`_received`)."""
    s.info[_RECORDED] = {}


def _recorded(s: Session, row: InboundMessage) -> None:
    recorded: dict[int, list[InboundMessage]] | None = s.info.get(_RECORDED)
    if recorded is not None and row.lead_id is not None:
        recorded.setdefault(row.lead_id, []).append(row)


def _thread(s: Session, lead: Lead, current: InboundMessage) -> list[ThreadItem]:
    """What the prospect saw and wrote, oldest first: our emails to them (never the
    team's internal mail) and their messages, earlier replies with their text."""
    items: list[tuple[datetime, ThreadItem]] = []
    for o in _sent_to(s, lead.id):
        at = o.sent_at or o.created_at
        summary = (
            f"step {(o.step or 0) + 1} of {o.campaign}"
            if o.kind == "nurture"
            else "our answer in your name"
        )
        items.append((at, _thread_item("out", at, o.subject, summary, "")))
    for m in _received(s, lead.id, current):
        at = m.sent_date or m.received_at
        is_current = m is current
        text = (m.reply_text or "").strip() if m.kind == "reply" and not is_current else ""
        summary = "this message" if is_current else (m.kind or "")
        if m.kind != "reply":
            summary = f"{m.kind}: {(m.reason or '').strip()[:120]}"
        items.append((at, _thread_item("in", at, m.subject, summary, text[:_THREAD_TEXT])))
    items.sort(key=lambda x: x[0])
    return [d for _, d in items]


def _thread_item(
    direction: Literal["in", "out"], at: datetime, subject: str | None, summary: str, text: str
) -> ThreadItem:
    return {
        "direction": direction,
        "at": at.astimezone(UTC).isoformat(" ", "minutes")[:16] + " UTC",
        "subject": subject or "",
        "summary": summary,
        "text": text,
    }


ACCOUNT_MAX_LEADS = 50
"""A company with more leads than this is a large employer, not a prospect's team:
one person's reply there neither pauses nor reassigns their colleagues."""


_SAME_DOMAIN = (
    select(Lead.id, Lead.status)
    .where(Lead.domain == bindparam("domain"), Lead.id != bindparam("lead_id"))
    .limit(ACCOUNT_MAX_LEADS + 1)
)


def _ids(n: int) -> list[BindParameter[int]]:
    return [bindparam(f"id{i}", type_=Integer) for i in range(n)]


# Built once per number of colleagues (at most ACCOUNT_MAX_LEADS), without a list
# parameter to expand at each execution, so `run` sends them as driver SQL.
@functools.cache
def _pause_for_account(n: int) -> Update:
    return (
        enrollments("paused_for_account", Enrollment.lead_id.in_(_ids(n)))
        .values(paused_until=None, updated_at=bindparam("at"))
        .returning(Enrollment.lead_id)
    )


@functools.cache
def _own_colleagues(n: int) -> Update:
    return (
        update(Lead)
        .where(Lead.id.in_(_ids(n)), Lead.owner.is_(None))
        .values(owner=bindparam("rep"), updated_at=bindparam("at"))
        .returning(Lead.id)
    )


@functools.cache
def _colleagues(n: int) -> Select[str | None, str | None, str, str | None]:
    return (
        select(Lead.first_name, Lead.last_name, Lead.email, Lead.title)
        .where(Lead.id.in_(_ids(n)))
        .order_by(Lead.id)
    )


def _account_awareness(
    s: Session, app: App, lead: Lead, rep_email: str | None, now: datetime
) -> list[Colleague]:
    """Colleagues at the same company pause their nurture and go to the same rep.

    Set-based and bounded: one lookup of at most ACCOUNT_MAX_LEADS + 1 colleagues, one UPDATE of the
    colleagues' active enrollments, one of their missing owners, and one event per
    colleague something actually changed for. Returns those colleagues (name, email,
    title), for the handoff to show.
    """
    campaigns = set(lead_campaigns(s, lead.id))
    aware = [c for c in app.config.campaigns if c.name in campaigns and c.account_awareness]
    if not aware or lead.domain in CONSUMER_DOMAINS:  # colleagues at gmail.com are no account
        return []
    # The domain alone in the WHERE: no statistics can steer the planner to the status
    # index (at 1,000,000 leads, sampled statistics did: a scan of every lead).
    same = fetch(core(s), _SAME_DOMAIN, {"domain": lead.domain, "lead_id": lead.id})
    if not same:
        return []
    if len(same) > ACCOUNT_MAX_LEADS:
        record_event(
            s, lead, "account_skipped",
            f"{lead.domain} has more than {ACCOUNT_MAX_LEADS} other leads: a large employer, "
            "so colleagues' nurture goes on and they keep their own reps",
            now,
        )  # fmt: skip
        return []
    colleagues = [other for other, status in same if status == LeadStatus.LEAD]
    if not colleagues:
        return []
    conn = core(s)
    ids = {f"id{i}": other for i, other in enumerate(colleagues)}
    pause = _pause_for_account(len(colleagues))
    paused = set(run(conn, pause, {**ids, "at": now}).scalars())
    owned: set[int] = set()
    if rep_email:
        own = _own_colleagues(len(colleagues))
        owned = set(run(conn, own, {**ids, "rep": rep_email, "at": now}).scalars())
        for other in owned:  # what the ORM's synchronisation would do for loaded leads
            loaded = s.identity_map.get(identity_key(Lead, other))
            if loaded is not None:
                s.expire(loaded, ["owner", "updated_at"])
    if not (paused or owned):
        return []
    shown = rep_email or "the team"
    queue_events(
        s,
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
    shown_to: list[Colleague] = []
    changed = sorted(paused | owned)
    by_id = {f"id{i}": other for i, other in enumerate(changed)}
    for first_name, last_name, email, title in fetch(conn, _colleagues(len(changed)), by_id):
        name = " ".join(x for x in (first_name, last_name) if x)
        shown_to.append({"name": name or email, "email": email, "title": title or ""})
    return shown_to


def _referral(s: Session, app: App, referrer: Lead, email: str, ev: Inbound) -> None:
    row, now = ev.row, ev.at
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
    for name in lead_campaigns(s, referrer.id):
        try:
            enroll(s, [new.id], app.config.campaign(name), now)
        except KeyError:
            continue


def _inbound_lead(s: Session, ev: Inbound) -> None:
    msg, row, now = ev.msg, ev.row, ev.at
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


def _rep_answered(s: Session, app: App, ev: Inbound) -> None:
    """A rep (or a colleague) wrote to a prospect: their first response, never a lead's reply.

    Seen when the answer reaches a watched mailbox: the sales mailbox through the tokenised
    address the reply-ready copy adds to Reply-To, or a rep's own mailbox. The prospect must
    be among its recipients (an answer to the internal briefing is not an answer to them),
    and twoway's own mail (its loop header: the follow-up in the rep's name) never counts.
    """
    msg, row, now = ev.msg, ev.row, ev.at
    if msg.header(LOOP_HEADER) is not None or not is_internal(msg.from_addr, app.config):
        return
    who = msg.from_addr or ""
    at = msg.date if msg.date is not None else now
    for addr in dict.fromkeys(a.lower() for a in (*msg.to, *msg.cc)):
        lead = s.scalar(select(Lead).where(Lead.email == addr))
        if lead is None:
            continue
        if lead.status in (LeadStatus.PROSPECT, LeadStatus.CUSTOMER):
            emit(
                s, lead, "lead.rep_answered", now, f"{msg.from_addr} wrote ({_cause(row)})", row.id
            )
        handoffs.rep_answered(s, lead, who, at, now, row.id)
        row.lead_id, row.match_method = lead.id, "rep_answer"


def _cancel_followups(s: Session, lead_id: int, why: str) -> int:
    return cancel_queued(s, lead_id, "followup", why)


def handoff_to_new_rep(
    s: Session, app: App, lead: Lead, rep: Rep, now: datetime, handoff: Handoff
) -> None:
    """An escalation reassigned `lead` to `rep`: hand them the same message, freshly."""
    from worker.parsing import ParseError, parse

    row = s.get(InboundMessage, handoff.inbound_id) if handoff.inbound_id else None
    if row is None or row.raw is None:
        return
    try:
        msg = parse(row.raw)
    except ParseError:
        return
    cls = Classification(kind="reply", reason=row.reason or "", reply_text=row.reply_text)
    ev = Inbound(row, msg, cls, Match(lead.id, row.match_method, ""), now)
    _queue_handoff(
        s, app, lead, ev, _rep_block(app, rep),
        f"reassigned to {rep.name}: the first rep did not answer in time", key=f"r{handoff.id}:",
    )  # fmt: skip
