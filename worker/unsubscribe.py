"""One-click unsubscribe by link (RFC 8058) and its undo, behind `/u/<token>`.

The functions answer whether anything changed, for tests and logs only: the pages never
tell, so a visitor cannot learn which tokens exist. Only a lead's reply token (16 base32
characters) is looked up; an address or anything else is ignored.
"""

from __future__ import annotations

import re
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from worker.leads import cancel_queued, stop_nurture, transition
from worker.models import (
    LIVE_ENROLLMENT,
    Enrollment,
    EnrollmentState,
    Lead,
    LeadEvent,
    LeadStatus,
    OutboundMessage,
    OutboxState,
)
from worker.states import enrollments, outbox

TOKEN = re.compile(r"[a-z2-7]{16}")
LINK_CAUSE = "one-click unsubscribe link"
UNDO_CAUSE = "undo of the one-click unsubscribe"


def _lead(s: Session, token: str) -> Lead | None:
    if not TOKEN.fullmatch(token):
        return None
    return s.scalar(select(Lead).where(Lead.reply_token == token).with_for_update())


def unsubscribe_by_link(s: Session, token: str, now: datetime, how: str) -> bool:
    """Unsubscribe the lead holding `token` (idempotent); True when its status changed.

    Nurture stops and queued nurture and follow-up sends are cancelled; the event keeps
    what was stopped (`detail`), so `undo_unsubscribe` can put it back exactly.
    """
    lead = _lead(s, token)
    if lead is None or lead.status == LeadStatus.UNSUBSCRIBED:
        return False
    enrollments = [
        {
            "id": e.id,
            "state": e.state,
            "next_due": _iso(e.next_due),
            "paused_until": _iso(e.paused_until),
        }
        for e in s.scalars(
            select(Enrollment).where(
                Enrollment.lead_id == lead.id, Enrollment.state.in_(LIVE_ENROLLMENT)
            )
        )
    ]
    queued = list(
        s.scalars(
            select(OutboundMessage.id).where(
                OutboundMessage.lead_id == lead.id,
                OutboundMessage.kind.in_(("nurture", "followup")),
                OutboundMessage.status == OutboxState.QUEUED,
            )
        )
    )
    detail: dict[str, Any] = {
        "via": "link",
        "how": how,
        "enrollments": enrollments,
        "cancelled_sends": queued,
    }
    transition(s, lead, "unsubscribed", f"{LINK_CAUSE} ({how})", now, detail=detail)
    stop_nurture(s, lead.id, now, "the lead unsubscribed by link")
    cancel_queued(s, lead.id, "followup", "the lead unsubscribed by link")
    return True


def undo_unsubscribe(s: Session, token: str, now: datetime, window: timedelta) -> bool:
    """Take back a link unsubscribe made less than `window` ago; True when it was undone.

    The lead gets its previous status, and its enrollments and cancelled sends come back
    as they were; anything that changed since (a reply, a later event) is left alone.
    """
    lead = _lead(s, token)
    if lead is None or lead.status != LeadStatus.UNSUBSCRIBED:
        return False
    last = s.scalar(
        select(LeadEvent)
        .where(LeadEvent.lead_id == lead.id)
        .order_by(LeadEvent.at.desc(), LeadEvent.id.desc())
        .limit(1)
    )
    if (
        last is None
        or last.to_status != LeadStatus.UNSUBSCRIBED
        or (last.detail or {}).get("via") != "link"
        or last.at < now - window
    ):
        return False
    detail = last.detail or {}
    back = last.from_status or LeadStatus.LEAD
    transition(s, lead, "unsubscribe_undone", UNDO_CAUSE, now, to=back)
    for e in detail.get("enrollments", []):
        s.execute(
            enrollments(
                "restored", Enrollment.id == e["id"], to=EnrollmentState(e["state"])
            ).values(
                next_due=_at(e["next_due"]), paused_until=_at(e["paused_until"]), updated_at=now
            )
        )
    ids = [int(i) for i in detail.get("cancelled_sends", [])]
    if ids:
        s.execute(outbox("restored", OutboundMessage.id.in_(ids)).values(last_error=None))
    return True


def _iso(at: datetime | None) -> str | None:
    return at.isoformat() if at else None


def _at(text: str | None) -> datetime | None:
    return datetime.fromisoformat(text) if text else None
