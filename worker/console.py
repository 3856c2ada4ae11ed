"""What the console shows, read from the database (no web framework here).

Each function takes the caller's session and returns plain data for a page; the actions
the console offers are the CLI's own functions (leads, inbound, outbox).
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, or_, select
from sqlalchemy.orm import Session

from worker.config import Config
from worker.leads import iso
from worker.models import InboundMessage, Lead, OutboundMessage, Quarantine

RAW_SHOWN = 256 * 1024
"""At most this much of a quarantined message is shown in a page."""


def funnel_steps(s: Session, config: Config, campaign: str) -> list[dict[str, Any]]:
    """Per step of a campaign: sent, and what came back (replies, auto-replies, bounces
    matched to that step's messages), and leads unsubscribed after it was their last."""
    camp = next((c for c in config.campaigns if c.name == campaign), None)
    templates = {i: st.template for i, st in enumerate(camp.steps)} if camp else {}
    sent: dict[int | None, int] = _pairs(
        s.execute(
            select(OutboundMessage.step, func.count())
            .where(
                OutboundMessage.kind == "nurture",
                OutboundMessage.campaign == campaign,
                OutboundMessage.status == "sent",
            )
            .group_by(OutboundMessage.step)
        ).tuples()
    )
    came_back = _came_back(s, campaign)
    last_step = (
        select(OutboundMessage.lead_id, func.max(OutboundMessage.step).label("step"))
        .where(
            OutboundMessage.kind == "nurture",
            OutboundMessage.campaign == campaign,
            OutboundMessage.status == "sent",
        )
        .group_by(OutboundMessage.lead_id)
        .subquery()
    )
    unsubscribed: dict[int | None, int] = _pairs(
        s.execute(
            select(last_step.c.step, func.count())
            .join(Lead, Lead.id == last_step.c.lead_id)
            .where(Lead.status == "unsubscribed")
            .group_by(last_step.c.step)
        ).tuples()
    )
    steps = sorted(set(templates) | {k for k in sent if k is not None})
    return [
        {
            "step": i + 1,
            "template": templates.get(i, "?"),
            "sent": sent.get(i, 0),
            "replied": came_back.get((i, "reply"), 0),
            "auto_replied": came_back.get((i, "auto_reply"), 0),
            "bounced": came_back.get((i, "bounce"), 0),
            "unsubscribed": unsubscribed.get(i, 0),
        }
        for i in steps
    ]


def _came_back(s: Session, campaign: str) -> dict[tuple[int, str], int]:
    """{(step, kind): leads} for replies, auto-replies and bounces: the step of our message
    they answer (by Message-ID), else the lead's last step sent before they arrived (a
    reply-token match names the lead, not the message)."""
    sent: dict[int, list[tuple[datetime, int]]] = {}
    by_id: dict[int, int] = {}
    for oid, lead_id, number, at in s.execute(
        select(OutboundMessage.id, OutboundMessage.lead_id, OutboundMessage.step,
               OutboundMessage.sent_at)
        .where(OutboundMessage.kind == "nurture", OutboundMessage.campaign == campaign,
               OutboundMessage.status == "sent")
    ).tuples():  # fmt: skip
        if number is None or at is None:
            continue
        sent.setdefault(lead_id, []).append((at, number))
        by_id[oid] = number
    leads: dict[tuple[int, str], set[int]] = {}
    for who, kind, answered, at in s.execute(
        select(InboundMessage.lead_id, InboundMessage.kind, InboundMessage.outbound_id,
               InboundMessage.received_at)
        .where(InboundMessage.lead_id.in_(list(sent)),
               InboundMessage.kind.in_(("reply", "auto_reply", "bounce")))
    ).tuples():  # fmt: skip
        step: int | None = by_id.get(answered) if answered is not None else None
        if step is None:
            before = [st for when, st in sent.get(who or 0, []) if when <= at]
            step = max(before) if before else None
        if step is not None and who is not None and kind is not None:
            leads.setdefault((step, kind), set()).add(who)
    return {key: len(ids) for key, ids in leads.items()}


def _pairs(result: Any) -> dict[Any, int]:
    """{first column: second column} of a two-column result."""
    return {k: int(v) for k, v in result}


def search_leads(
    s: Session, query: str, status: str | None, limit: int = 200
) -> tuple[list[dict[str, Any]], bool]:
    """Leads whose address, name or company contains `query` (case-insensitive), newest
    first; and whether there were more than `limit`."""
    q = select(Lead).order_by(Lead.id.desc())
    text = query.strip()[:200]
    if text:
        pattern = (
            "%" + text.lower().replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
        )
        q = q.where(
            or_(
                *(
                    func.lower(col).like(pattern, escape="\\")
                    for col in (Lead.email, Lead.first_name, Lead.last_name, Lead.company)
                )
            )
        )
    if status:
        q = q.where(Lead.status == status)
    leads = list(s.scalars(q.limit(limit + 1)))
    rows = [
        {
            "email": lead.email,
            "first_name": lead.first_name,
            "last_name": lead.last_name,
            "company": lead.company,
            "status": lead.status,
            "score": lead.score,
            "owner": lead.owner,
        }
        for lead in leads[:limit]
    ]
    return rows, len(leads) > limit


def quarantine_rows(s: Session, *, resolved_too: bool = False) -> list[dict[str, Any]]:
    """Messages waiting in the quarantine (with `resolved_too`, also those retried since),
    oldest first: the console's page and `twoway quarantine list`."""
    q = select(Quarantine).order_by(Quarantine.id)
    if not resolved_too:
        q = q.where(Quarantine.resolved_at.is_(None))
    return [_quarantine(row) for row in s.scalars(q)]


def quarantine_item(s: Session, qid: int) -> tuple[dict[str, Any], str, bool] | None:
    """One quarantined message, its raw text (at most RAW_SHOWN bytes, decoded leniently)
    and whether it was cut; None when there is no such message."""
    q = s.get(Quarantine, qid)
    if q is None:
        return None
    raw = q.raw[:RAW_SHOWN].decode("utf-8", errors="replace")
    return _quarantine(q), raw, len(q.raw) > RAW_SHOWN


def _quarantine(q: Quarantine) -> dict[str, Any]:
    return {
        "id": q.id,
        "mailbox": q.mailbox,
        "folder": q.folder,
        "uid": q.uid,
        "size": len(q.raw),
        "reason": q.reason,
        "at": iso(q.created_at),
        "resolved": q.resolved_at is not None,
    }


def waiting_prospects(s: Session, now: datetime, limit: int = 200) -> list[dict[str, Any]]:
    """Prospects still waiting for their rep's first answer, oldest first: the rows of
    `twoway leads list --waiting` (handoffs.waiting), with the wait put in words."""
    from worker.handoffs import waiting

    return [
        {
            **row,
            "owner": row["rep"],
            "handed_at": row["since"],
            "waiting": _ago(now, now - timedelta(seconds=row["waiting_seconds"])),
        }
        for row in waiting(s, now, limit)
    ]


def _ago(now: datetime, at: datetime | None) -> str:
    if at is None:
        return ""
    seconds = max(0, int((now - at).total_seconds()))
    if seconds < 3600:
        return f"{seconds // 60} min"
    if seconds < 86400:
        return f"{seconds // 3600} h {seconds % 3600 // 60} min"
    return f"{seconds // 86400} d {seconds % 86400 // 3600} h"
