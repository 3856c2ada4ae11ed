"""The outbox: every email twoway sends is a row, claimed, re-checked, sent once.

States: queued -> sending -> sent | failed | cancelled, and `unknown` for a row found in
`sending` after a crash that the Sent folder cannot settle (never silently resent).
A row is claimed with a conditional UPDATE (and `FOR UPDATE SKIP LOCKED` on PostgreSQL)
in a short transaction; the SMTP call happens outside any transaction; its outcome is
recorded in another. Temporary failures wait in the row (`attempts`, `next_attempt_at`).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from email.message import EmailMessage
from typing import Any

from sqlalchemy import ColumnElement, func, select, update
from sqlalchemy.orm import Session
from sqlalchemy.orm.attributes import set_committed_value

from worker import handoffs
from worker.app import App
from worker.compose import (
    Attachment,
    clean_text,
    compose,
    is_message_id,
    reply_address,
    unsubscribe_targets,
)
from worker.leads import lead_fields
from worker.mailer import Mailer, SendResult
from worker.models import Enrollment, InboundMessage, Lead, OutboundMessage
from worker.rendering import Renderer, TemplateError

logger = logging.getLogger(__name__)
CLAIM_BATCH = 20

SentCopy = Callable[[str | None, bytes], None]
"""Append a sent message to the mailbox's Sent folder: (mailbox name, raw bytes)."""


@dataclass
class Prepared:
    row_id: int
    lead_id: int
    kind: str
    to_addr: str
    mailbox: str | None
    message: EmailMessage
    envelope_from: str
    transport: str = "default"
    """Which SMTP account sends it: "default" (the top-level smtp) or a mailbox's own."""


def _sent_since(
    s: Session,
    since: datetime,
    domain: str | None = None,
    mailboxes: tuple[str | None, ...] | None = None,
) -> int:
    q = select(func.count()).where(OutboundMessage.sent_at >= since)
    if domain is not None:
        q = q.where(OutboundMessage.to_addr.like(f"%@{domain}"), OutboundMessage.kind == "nurture")
    if mailboxes is not None:
        named = [m for m in mailboxes if m is not None]
        cond: ColumnElement[bool] = OutboundMessage.mailbox.in_(named)
        if None in mailboxes:
            cond = cond | OutboundMessage.mailbox.is_(None)
        q = q.where(cond)
    return int(s.scalar(q) or 0)


def _budget(s: Session, app: App, transport: str, now: datetime) -> int:
    """How many more messages one SMTP account's caps allow right now."""
    smtp = app.config.identity(transport if transport != "default" else None).smtp
    if smtp is None:
        return 0
    mailboxes = app.config.transport_mailboxes(transport)
    budget = CLAIM_BATCH
    if smtp.max_per_minute:
        sent = _sent_since(s, now - timedelta(minutes=1), mailboxes=mailboxes)
        budget = min(budget, smtp.max_per_minute - sent)
    if smtp.max_per_day:
        day = now.replace(hour=0, minute=0, second=0, microsecond=0)
        budget = min(budget, smtp.max_per_day - _sent_since(s, day, mailboxes=mailboxes))
    return max(budget, 0)


def claim(app: App, renderer: Renderer, limit: int = CLAIM_BATCH) -> list[Prepared]:
    """Claim due rows, re-check them and build their messages, in one transaction.

    Rows that must not go out any more are cancelled here; rows that cannot be rendered
    fail with the template error. The returned messages are `sending` in the database.
    """
    now = app.now()
    out: list[Prepared] = []
    with app.transaction() as s:
        rows = s.scalars(
            select(OutboundMessage)
            .where(OutboundMessage.status == "queued", OutboundMessage.next_attempt_at <= now)
            .order_by(OutboundMessage.next_attempt_at, OutboundMessage.id)
            .limit(limit)
            .with_for_update(skip_locked=True)
        ).all()
        if not rows:
            return []
        lease = now + timedelta(seconds=app.config.workers.lease_seconds)
        # One conditional UPDATE claims the batch: a row another worker took in between
        # is no longer `queued`, so it is not returned here and not sent twice.
        claimed = set(
            s.scalars(
                update(OutboundMessage)
                .where(
                    OutboundMessage.id.in_([r.id for r in rows]),
                    OutboundMessage.status == "queued",
                )
                .values(
                    status="sending",
                    attempts=OutboundMessage.attempts + 1,
                    # A claim is a lease: past it, another worker settles the row (never resends).
                    next_attempt_at=lease,
                )
                .returning(OutboundMessage.id)
                .execution_options(synchronize_session=False)
            )
        )
        budgets: dict[str, int] = {}
        for row in rows:
            if row.id not in claimed:
                continue
            # What the UPDATE wrote, without reading the row again.
            set_committed_value(row, "status", "sending")
            set_committed_value(row, "attempts", row.attempts + 1)
            set_committed_value(row, "next_attempt_at", lease)
            transport = app.config.identity(row.mailbox).transport
            if transport not in budgets:
                budgets[transport] = _budget(s, app, transport, now)
            if budgets[transport] <= 0:
                # This account's cap is reached: the row waits for the next minute.
                row.status, row.attempts = "queued", row.attempts - 1
                row.next_attempt_at = now + timedelta(minutes=1)
                continue
            budgets[transport] -= 1
            prepared = _prepare(s, app, renderer, row, now)
            if prepared is not None:
                out.append(prepared)
    return out


def _prepare(
    s: Session, app: App, renderer: Renderer, row: OutboundMessage, now: datetime
) -> Prepared | None:
    lead = s.get(Lead, row.lead_id)
    if lead is None:
        row.status, row.last_error = "cancelled", "the lead was deleted"
        return None
    why_not = _must_not_send(s, app, row, lead)
    if why_not == "paused":
        en = s.get(Enrollment, row.enrollment_id) if row.enrollment_id else None
        row.status = "queued"
        row.attempts -= 1
        row.next_attempt_at = en.paused_until if en and en.paused_until else now + timedelta(days=1)
        return None
    if why_not:
        row.status, row.last_error = "cancelled", why_not
        logger.info("cancelled %s to %s: %s", row.kind, row.to_addr, why_not)
        return None
    campaign = next((c for c in app.config.campaigns if c.name == row.campaign), None)
    if row.kind == "nurture" and campaign and campaign.max_per_domain_per_day:
        day = now.replace(hour=0, minute=0, second=0, microsecond=0)
        if _sent_since(s, day, lead.domain) >= campaign.max_per_domain_per_day:
            row.status, row.attempts = "queued", row.attempts - 1
            row.next_attempt_at = day + timedelta(days=1)
            return None
    try:
        message = _build(s, app, renderer, row, lead)
    except (TemplateError, ValueError) as e:
        row.status, row.last_error = "failed", f"cannot build the message: {e}"
        logger.error("cannot build %s for %s: %s", row.template, row.to_addr, e)
        return None
    row.subject = str(message["Subject"])
    me = app.config.identity(row.mailbox)
    envelope = me.address
    if row.kind == "nurture" and app.config.sender.reply_token and row.reply_token:
        envelope = reply_address(me.address, row.reply_token)  # VERP: bounces carry the token
    return Prepared(
        row.id, lead.id, row.kind, row.to_addr, row.mailbox, message, envelope, me.transport
    )


def _must_not_send(s: Session, app: App, row: OutboundMessage, lead: Lead) -> str | None:
    """Why this row must not go out now (None: send it). Checked right before SMTP."""
    if row.kind == "nurture":
        if lead.status != "lead":
            return f"the lead is now {lead.status}"
        en = s.get(Enrollment, row.enrollment_id) if row.enrollment_id else None
        if en is None or en.state == "stopped":
            return "the enrollment was stopped"
        if en.state == "paused":
            return "paused"
    elif row.kind == "followup" and lead.status in ("unsubscribed", "bounced", "disqualified"):
        return f"the lead is now {lead.status}"
    if row.kind in ("followup", "reminder", "escalation") and handoffs.answered(s, lead.id):
        return "the rep answered the prospect"
    return None


def _build(
    s: Session, app: App, renderer: Renderer, row: OutboundMessage, lead: Lead
) -> EmailMessage:
    config = app.config
    sender = config.sender
    ctx: dict[str, Any] = dict(row.context or {})
    me = config.identity(row.mailbox)
    sender_block = {
        "name": me.name or me.address,
        "address": me.address,
        "postal_address": sender.postal_address,
    }
    token = row.reply_token or lead.reply_token
    unsub_url, unsub_mailto = unsubscribe_targets(sender, token)
    ctx.setdefault("lead", lead_fields(lead))
    ctx.setdefault("sender", sender_block)
    ctx.setdefault(
        "unsubscribe_url", unsub_url or (f"mailto:{unsub_mailto}" if unsub_mailto else "")
    )
    if row.kind == "nurture":
        total = len(config.campaign(row.campaign).steps) if row.campaign else 1
        ctx.setdefault("campaign", {"name": row.campaign})
        ctx.setdefault("step", {"number": (row.step or 0) + 1, "total": total})
    if row.kind == "handoff" and isinstance(ctx.get("followup"), dict):
        ctx["followup"] = _followup_preview(s, app, renderer, lead, dict(ctx["followup"]))
    rendered = renderer.render(row.template, ctx)
    from_addr, from_name = me.address, me.name
    reply_to: str | list[tuple[str, str]] | None = None
    attachments: list[Attachment] = []
    to_name = " ".join(x for x in (lead.first_name, lead.last_name) if x)
    if row.kind == "nurture":
        reply_to = reply_address(me.address, token) if sender.reply_token else None
    elif row.kind in handoffs.INTERNAL_KINDS:
        # Mail to the team. The briefing, the reminder and the escalation carry no
        # Reply-To and nothing of the prospect in their headers: Reply and Reply All reach
        # the sales mailbox only. The reply-ready copy is the one route to the prospect.
        rep = ctx.get("rep") or {}
        to_name = str(rep.get("name", "")) if row.kind != "escalation" else ""
        if row.kind == "handoff" and row.inbound_id:
            inbound = s.get(InboundMessage, row.inbound_id)
            if inbound is not None and inbound.raw:
                attachments.append(Attachment("original-reply.eml", inbound.raw, "message/rfc822"))
    elif row.kind == "followup":
        if ctx.get("from_addr"):
            from_addr, from_name = str(ctx["from_addr"]), str(ctx.get("from_name", ""))
        # The prospect's answer reaches the rep and, by the token, twoway.
        reply_to = [(from_name, from_addr), ("", reply_address(me.address, token))]
    refs = [str(r) for r in ctx.get("references", [])]
    message_id, in_reply_to = row.message_id, row.in_reply_to
    if row.kind == "rep_copy":
        # The prospect's own message, re-sent from our address (her From would fail her
        # domain's DMARC at the rep's provider), keeping her Message-ID and thread headers:
        # the rep's client answers with In-Reply-To/References of her message, and
        # Reply-To sends that answer to her and, by the token, to twoway.
        copy = ctx.get("reply") or {}
        name = clean_text(str(copy.get("from_name") or lead.email))
        from_name = f"{name} via {me.name or me.address}"
        reply_to = [(name, lead.email), ("", reply_address(me.address, token))]
        theirs = str(ctx.get("header_message_id") or "")
        message_id = theirs if is_message_id(theirs) else row.message_id
        irt = ctx.get("reply_in_reply_to")
        in_reply_to = str(irt) if irt and is_message_id(str(irt)) else None
        refs = [r for r in refs if is_message_id(r)]
    text, html = rendered.text, rendered.html
    return compose(
        from_addr=from_addr,
        from_name=from_name,
        to_addr=row.to_addr,
        to_name=to_name,
        subject=str(ctx.get("subject_override") or rendered.subject),
        text=text,
        html=html,
        message_id=message_id,
        domain=sender.domain,
        reply_to=reply_to,
        in_reply_to=in_reply_to,
        references=refs,
        unsubscribe_url=unsub_url if row.kind == "nurture" else None,
        unsubscribe_mailto=unsub_mailto if row.kind == "nurture" else None,
        auto_submitted=sender.auto_submitted and row.kind in ("nurture", "followup"),
        attachments=attachments,
        date=app.now(),
    )


def _followup_preview(
    s: Session, app: App, renderer: Renderer, lead: Lead, followup: dict[str, Any]
) -> dict[str, Any] | None:
    """What the handoff announces: the follow-up's text as it will go out, when, and
    whether it is still to come (None when there is none any more)."""
    row = s.scalar(
        select(OutboundMessage).where(OutboundMessage.idempotency_key == followup.get("key"))
    )
    if row is None or row.status not in ("queued", "sending", "sent"):
        return None
    try:
        message = _build(s, app, renderer, row, lead)
    except (TemplateError, ValueError):
        return None
    body = message.get_body(("plain",))
    text = body.get_content() if isinstance(body, EmailMessage) else ""
    return {**followup, "text": text.strip(), "sent": row.status != "queued"}


def record(app: App, item: Prepared, result: SendResult) -> None:
    """Write the outcome of one SMTP attempt (its own transaction)."""
    from worker.lifecycle import bounce_lead

    now = app.now()
    smtp = app.config.identity(item.mailbox).smtp
    max_attempts = smtp.max_attempts if smtp else 5
    with app.transaction() as s:
        row = s.get(OutboundMessage, item.row_id)
        if row is None:
            return
        if result.status == "sent":
            row.status, row.sent_at, row.last_error = "sent", now, None
            return
        detail = f"{result.code or ''} {result.message}".strip()
        if result.status == "temporary" and row.attempts < max_attempts:
            # Exponential backoff with jitter, kept in the row (not in a sleeping frame).
            wait = min(60 * 2 ** (row.attempts - 1), 3600) * random.uniform(0.8, 1.2)
            row.status, row.last_error = "queued", f"temporary: {detail}"
            row.next_attempt_at = now + timedelta(seconds=wait)
            logger.warning(
                "temporary failure sending to %s (attempt %d): %s",
                row.to_addr,
                row.attempts,
                detail,
            )
            return
        row.status = "failed"
        row.last_error = ("permanent: " if result.status == "permanent" else "gave up: ") + detail
        logger.error("failed to send %s to %s: %s", row.kind, row.to_addr, detail)
        status = result.enhanced_status or ""
        refused_lead = row.to_addr in result.refused or (
            not result.refused and result.code and result.code >= 550
        )
        if (
            result.status == "permanent"
            and row.kind == "nurture"
            and refused_lead
            and (status.startswith("5.1.") or (result.code == 550 and not status.startswith("5.7")))
        ):
            lead = s.get(Lead, row.lead_id)
            if lead is not None:
                bounce_lead(s, lead, now, f"SMTP refused {row.to_addr}: {detail}")


def send_due(
    app: App,
    renderer: Renderer,
    mailer: Mailer | None,
    sent_copy: SentCopy | None = None,
    limit: int | None = None,
    should_stop: Callable[[], bool] = lambda: False,
    mailer_for: Callable[[str], Mailer] | None = None,
) -> int:
    """Send everything due now (respecting the caps); returns how many were sent.

    `should_stop` is asked between messages: the message in flight finishes, the rest of
    the claimed batch goes back to the queue untouched.
    """
    sent = 0
    while (limit is None or sent < limit) and not should_stop():
        batch = claim(
            app, renderer, CLAIM_BATCH if limit is None else min(CLAIM_BATCH, limit - sent)
        )
        if not batch:
            break
        for n, item in enumerate(batch):
            if should_stop():
                unclaim(app, batch[n:])
                break
            via = (
                mailer
                if item.transport == "default" or mailer_for is None
                else mailer_for(item.transport)
            )
            if via is None:  # no SMTP account for it (claim gives such rows no budget)
                unclaim(app, [item])
                continue
            result = via.send(item.message, item.envelope_from, [item.to_addr])
            record(app, item, result)
            if result.status == "sent":
                sent += 1
                if sent_copy is not None:
                    try:
                        sent_copy(item.mailbox, item.message.as_bytes())
                    except Exception as e:  # a missing Sent copy must not fail the send
                        logger.warning("could not save a copy in the Sent folder: %s", e)
    if sent:
        logger.info("sent %d message(s)", sent)
    return sent


def unclaim(app: App, items: list[Prepared]) -> None:
    """Give claimed rows that were never handed to SMTP back to the queue."""
    now = app.now()
    with app.transaction() as s:
        for item in items:
            s.execute(
                update(OutboundMessage)
                .where(OutboundMessage.id == item.row_id, OutboundMessage.status == "sending")
                .values(status="queued", attempts=OutboundMessage.attempts - 1, next_attempt_at=now)
            )


def recover_sending(
    app: App, in_sent_folder: Callable[[str | None, str], bool | None] | None, all_rows: bool
) -> tuple[int, int]:
    """Settle rows left in `sending` by a crash, never by sending again.

    `in_sent_folder(mailbox, message_id)` answers True/False, or None when it cannot tell.
    With `all_rows` (one worker: nobody else can be mid-send) every `sending` row is looked
    at; otherwise only rows whose lease expired. Returns (found sent, marked unknown).
    """
    now = app.now()
    found = unknown = 0
    with app.transaction() as s:
        q = select(OutboundMessage).where(OutboundMessage.status == "sending")
        if not all_rows:
            q = q.where(OutboundMessage.next_attempt_at < now)
        rows = s.scalars(q).all()
        for row in rows:
            answer = in_sent_folder(row.mailbox, row.message_id) if in_sent_folder else None
            if answer:
                row.status, row.sent_at = "sent", now
                row.last_error = "confirmed in the Sent folder after a restart"
                found += 1
            else:
                row.status = "unknown"
                row.last_error = (
                    "the worker stopped during the SMTP call; not in the Sent folder"
                    if answer is False
                    else "the worker stopped during the SMTP call; no Sent folder to check"
                )
                unknown += 1
    if found or unknown:
        logger.warning("after a restart: %d send(s) confirmed sent, %d unknown", found, unknown)
    return found, unknown
