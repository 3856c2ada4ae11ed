"""Conversion records out to the CRM: signed webhook POSTs from a durable table.

`emit` writes a `CrmEvent` (the conversion record: account, contact, opportunity) in the
caller's transaction, with the change that caused it, so a crash never loses one; its
body is fixed there and then, so one idempotency key never carries two bodies. A pass
fans new events out to the configured endpoints (`webhook_deliveries`) and delivers due
ones: each row is claimed with one conditional UPDATE (a lease, like the outbox), POSTed
outside any transaction, and its outcome recorded in another. Failures are retried with
exponential backoff and jitter up to the endpoint's `max_attempts`, then `dead` until
`twoway webhooks retry`. Delivery is at least once: receivers deduplicate by the
`Twoway-Event-Id` header (the event's idempotency key).

Signature (documented in README): header `Twoway-Signature: t=<unix seconds>,v1=<hex>`
where hex is HMAC-SHA256 with the endpoint's secret over `<t>.` followed by the raw body.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import random
import secrets
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, bindparam, func, insert, or_, select, update
from sqlalchemy.orm import Session

from worker.app import App
from worker.config import Config, Webhook
from worker.db import core, fetch, insert_row
from worker.models import (
    CrmEvent,
    Enrollment,
    InboundMessage,
    Lead,
    OutboundMessage,
    WebhookDelivery,
)

logger = logging.getLogger(__name__)
BATCH = 20
MAX_BACKOFF = 3600.0
LEASE_EXTRA = 30.0
"""A claim lasts the request timeout plus this; past it another pass retries the row."""
SIGNATURE_HEADER = "Twoway-Signature"
EVENT_ID_HEADER = "Twoway-Event-Id"
EVENT_TYPE_HEADER = "Twoway-Event-Type"
STATES = ("pending", "sending", "delivered", "dead")


def sign(secret: bytes, timestamp: int, body: bytes) -> str:
    """The `Twoway-Signature` value for a body sent at `timestamp` (unix seconds)."""
    mac = hmac.new(secret, f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={mac}"


def verify(secret: bytes, header: str, body: bytes) -> bool:
    """Check a `Twoway-Signature` header (what a receiver does; used by our tests too)."""
    try:
        parts = dict(p.split("=", 1) for p in header.split(","))
        expected = sign(secret, int(parts["t"]), body)
    except (ValueError, KeyError):
        return False
    return hmac.compare_digest(expected, header)


# --- the conversion record ------------------------------------------------------------


def _iso(at: datetime | None) -> str | None:
    return at.replace(microsecond=0).isoformat().replace("+00:00", "Z") if at else None


# Built once, the columns the record shows only: they run for every promotion and
# status change the CRM hears of.
_O = OutboundMessage
_SOURCE_BY_ID = select(_O.kind, _O.campaign, _O.step, _O.template).where(_O.id == bindparam("id"))
_LATEST_SOURCE = (
    select(_O.kind, _O.campaign, _O.step, _O.template)
    .where(_O.lead_id == bindparam("lead_id"), _O.kind == "nurture", _O.status == "sent")
    .order_by(_O.sent_at.desc(), _O.id.desc())
    .limit(1)
)
_LATEST_REPLY = (
    select(InboundMessage)
    .where(InboundMessage.lead_id == bindparam("lead_id"), InboundMessage.kind == "reply")
    .order_by(InboundMessage.id.desc())
    .limit(1)
)
_FIRST_CAMPAIGN = (
    select(Enrollment.campaign)
    .where(Enrollment.lead_id == bindparam("lead_id"))
    .order_by(Enrollment.id)
    .limit(1)
)


def conversion_record(s: Session, lead: Lead, inbound_id: int | None = None) -> dict[str, Any]:
    """Account (the company), contact (the person) and opportunity (the sale) of a lead."""
    reply = None
    if inbound_id is not None:
        reply = s.get(InboundMessage, inbound_id)
    if reply is None or reply.kind != "reply":
        reply = s.scalar(_LATEST_REPLY, {"lead_id": lead.id})
    conn = core(s)
    # (kind, campaign, step, template) of the nurture email replied to, else the last sent
    source = None
    if reply is not None and reply.outbound_id:
        source = next(iter(fetch(conn, _SOURCE_BY_ID, {"id": reply.outbound_id})), None)
    if source is None or source[0] != "nurture":
        source = next(iter(fetch(conn, _LATEST_SOURCE, {"lead_id": lead.id})), None)
    campaign = source[1] if source else None
    if campaign is None:
        first = fetch(conn, _FIRST_CAMPAIGN, {"lead_id": lead.id})
        campaign = first[0][0] if first else None
    name = " ".join(x for x in (lead.first_name, lead.last_name) if x)
    company = lead.company or lead.domain
    q = lead.qualification or {}
    return {
        "account": {
            "name": company,
            "domain": lead.domain,
            "industry": lead.industry,
            "size": lead.company_size,
            "annual_revenue": lead.annual_revenue,
            "country": lead.country,
        },
        "contact": {
            "email": lead.email,
            "first_name": lead.first_name,
            "last_name": lead.last_name,
            "title": lead.title,
            "country": lead.country,
            "timezone": lead.timezone,
            "source": lead.source,
            "custom": dict(lead.custom or {}),
        },
        "opportunity": {
            "name": f"{company} — {name or lead.email}",
            "stage": lead.status,
            "owner": lead.owner,
            "source_campaign": campaign,
            "source_step": (source[2] or 0) + 1 if source else None,
            "source_template": source[3] if source else None,
            "reply_text": reply.reply_text if reply else None,
            "replied_at": _iso(reply.received_at) if reply else None,
            "score": lead.score,
            "checklist": list(q.get("checklist") or []),
        },
    }


def emit(
    s: Session,
    lead: Lead,
    type_: str,
    at: datetime,
    cause: str,
    inbound_id: int | None = None,
) -> None:
    """Record one conversion event (its body fixed now) in the caller's transaction."""
    key = f"evt_{secrets.token_hex(16)}"
    body = {
        "id": key,
        "type": type_,
        "created_at": _iso(at),
        "cause": cause,
        "lead": {"email": lead.email, "status": lead.status, "owner": lead.owner},
        **conversion_record(s, lead, inbound_id),
    }
    insert_row(
        s,
        CrmEvent,
        {
            "key": key,
            "type": type_,
            "lead_id": lead.id,
            "at": at,
            "body": json.dumps(body, ensure_ascii=False, sort_keys=True, default=str),
            "fanned_out": False,
        },
    )


STATUS_EVENTS = {
    "customer": "lead.customer",
    "disqualified": "lead.disqualified",
    "unsubscribed": "lead.unsubscribed",
    "bounced": "lead.bounced",
}


def on_status(
    s: Session, lead: Lead, to_status: str, at: datetime, cause: str, inbound_id: int | None
) -> None:
    """The conversion event of a status change, if it is one the CRM hears of."""
    type_ = STATUS_EVENTS.get(to_status)
    if type_ is not None:
        emit(s, lead, type_, at, cause, inbound_id)


# --- delivery ---------------------------------------------------------------------------


def fan_out(app: App, batch: int = 500) -> int:
    """Give every new event a delivery row per endpoint that wants it; returns events seen."""
    hooks = app.config.webhooks
    now = app.now()
    seen = 0
    while True:
        with app.transaction() as s:
            events = s.execute(
                select(CrmEvent.id, CrmEvent.type)
                .where(CrmEvent.fanned_out.is_(False))
                .order_by(CrmEvent.id)
                .limit(batch)
                .with_for_update(skip_locked=True)
            ).all()
            rows = [
                {"event_id": eid, "endpoint": h.name, "status": "pending", "attempts": 0,
                 "next_attempt_at": now, "last_error": None, "created_at": now,
                 "delivered_at": None}
                for eid, type_ in events
                for h in hooks
                if not h.events or type_ in h.events
            ]  # fmt: skip
            if rows:
                s.execute(insert(WebhookDelivery), rows)
            if events:
                s.execute(
                    update(CrmEvent)
                    .where(CrmEvent.id.in_([e for e, _ in events]))
                    .values(fanned_out=True)
                    .execution_options(synchronize_session=False)
                )
        seen += len(events)
        if len(events) < batch:
            return seen


@dataclass(frozen=True)
class Attempt:
    """What one POST achieved: `ok` on a 2xx; else the status code and/or the error."""

    ok: bool
    status: int | None
    error: str


Post = Callable[[Webhook, bytes, dict[str, str]], Attempt]


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None  # a redirect is a failed delivery: the body is never re-sent elsewhere


def http_post(hook: Webhook, body: bytes, headers: dict[str, str]) -> Attempt:
    """POST with urllib (TLS verified by default); never raises for a network failure."""
    req = urllib.request.Request(hook.url, data=body, headers=headers, method="POST")
    opener = urllib.request.build_opener(_NoRedirect)
    try:
        with opener.open(req, timeout=hook.timeout) as resp:
            code = int(resp.status)  # the body is never read: a receiver cannot stall us there
    except urllib.error.HTTPError as e:
        return Attempt(False, e.code, f"HTTP {e.code} {e.reason}"[:300])
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        return Attempt(False, None, f"{type(e).__name__}: {reason}"[:300])
    if 200 <= code < 300:
        return Attempt(True, code, "")
    return Attempt(False, code, f"HTTP {code}")


def _claim(app: App, now: datetime) -> list[tuple[int, str, str, str, str]]:
    """Claim up to BATCH due deliveries: (id, endpoint, key, type, body)."""
    hooks = {h.name: h for h in app.config.webhooks}
    due = or_(
        and_(WebhookDelivery.status == "pending", WebhookDelivery.next_attempt_at <= now),
        # A claim whose lease ran out: its worker died mid-POST. Send again (at least once).
        and_(WebhookDelivery.status == "sending", WebhookDelivery.next_attempt_at < now),
    )
    out: list[tuple[int, str, str, str, str]] = []
    with app.transaction() as s:
        rows = s.execute(
            select(
                WebhookDelivery.id,
                WebhookDelivery.endpoint,
                CrmEvent.key,
                CrmEvent.type,
                CrmEvent.body,
            )
            .join(CrmEvent, CrmEvent.id == WebhookDelivery.event_id)
            .where(due, WebhookDelivery.endpoint.in_(sorted(hooks)))
            .order_by(WebhookDelivery.next_attempt_at, WebhookDelivery.id)
            .limit(BATCH)
            .with_for_update(skip_locked=True, of=WebhookDelivery)
        ).all()
        for row_id, endpoint, key, type_, body in rows:
            lease = now + timedelta(seconds=hooks[endpoint].timeout + LEASE_EXTRA)
            res = s.execute(
                update(WebhookDelivery)
                .where(WebhookDelivery.id == row_id, due)
                .values(
                    status="sending", attempts=WebhookDelivery.attempts + 1, next_attempt_at=lease
                )
                .execution_options(synchronize_session=False)
            )
            if getattr(res, "rowcount", 0) == 1:
                out.append((row_id, endpoint, key, type_, body))
    return out


def _record(app: App, row_id: int, hook: Webhook, result: Attempt) -> None:
    now = app.now()
    with app.transaction() as s:
        row = s.get(WebhookDelivery, row_id)
        if row is None or row.status != "sending":
            return
        if result.ok:
            row.status, row.delivered_at, row.last_error = "delivered", now, None
            return
        row.last_error = result.error
        if row.attempts >= hook.max_attempts:
            row.status = "dead"
            logger.error(
                "webhook %s: gave up on delivery %d after %d attempts: %s",
                hook.name,
                row.id,
                row.attempts,
                result.error,
            )
            return
        wait = min(hook.backoff_seconds * 2 ** (row.attempts - 1), MAX_BACKOFF)
        row.status = "pending"
        row.next_attempt_at = now + timedelta(seconds=wait * random.uniform(0.8, 1.2))


def deliver_due(
    app: App, post: Post = http_post, should_stop: Callable[[], bool] = lambda: False,
    limit: int | None = None,
) -> int:  # fmt: skip
    """Fan out new events and POST every due delivery; returns how many were delivered."""
    if not app.config.webhooks:
        return 0
    fan_out(app)
    hooks = {h.name: h for h in app.config.webhooks}
    delivered = attempts = 0
    while not should_stop() and (limit is None or attempts < limit):
        batch = _claim(app, app.now())
        if not batch:
            break
        for row_id, endpoint, key, type_, body in batch:
            hook = hooks[endpoint]
            data = body.encode()
            timestamp = int(app.now().timestamp())
            headers = {
                "Content-Type": "application/json",
                "User-Agent": "twoway-webhooks/1",
                EVENT_ID_HEADER: key,
                EVENT_TYPE_HEADER: type_,
                "Idempotency-Key": key,
                SIGNATURE_HEADER: sign(hook.secret_value(), timestamp, data),
            }
            result = post(hook, data, headers)
            _record(app, row_id, hook, result)
            attempts += 1
            delivered += result.ok
    if delivered:
        logger.info("delivered %d webhook event(s)", delivered)
    return delivered


def recover(app: App, all_rows: bool) -> int:
    """Rows left `sending` by a crash go back to pending (the receiver deduplicates).

    With `all_rows` (one worker on SQLite: nobody else is mid-POST) every such row at
    once; otherwise the claim itself picks up rows whose lease ran out.
    """
    if not all_rows:
        return 0
    with app.transaction() as s:
        res = s.execute(
            update(WebhookDelivery)
            .where(WebhookDelivery.status == "sending")
            .values(status="pending", next_attempt_at=app.now())
        )
        return int(getattr(res, "rowcount", 0) or 0)


def next_due(s: Session, config: Config) -> datetime | None:
    """When the next delivery attempt is due (new events count as due now)."""
    if not config.webhooks:
        return None
    waiting = s.scalar(
        select(func.min(WebhookDelivery.next_attempt_at)).where(
            WebhookDelivery.status.in_(("pending", "sending"))
        )
    )
    fresh = s.scalar(select(func.min(CrmEvent.at)).where(CrmEvent.fanned_out.is_(False)))
    times = [t for t in (waiting, fresh) if t is not None]
    return min(times) if times else None


def retry_dead(s: Session, now: datetime, ids: list[int] | None = None) -> int:
    """Give dead deliveries (all, or these ids) a fresh set of attempts; returns how many."""
    q = (
        update(WebhookDelivery)
        .where(WebhookDelivery.status == "dead")
        .values(status="pending", attempts=0, next_attempt_at=now)
    )
    if ids is not None:
        q = q.where(WebhookDelivery.id.in_(ids))
    res = s.execute(q.execution_options(synchronize_session=False))
    return int(getattr(res, "rowcount", 0) or 0)


def webhook_status(s: Session) -> dict[str, Any]:
    """The `webhooks` object of `twoway status --json`."""
    counts = dict.fromkeys(STATES, 0)
    for st, n in s.execute(
        select(WebhookDelivery.status, func.count()).group_by(WebhookDelivery.status)
    ):
        counts[st] = n
    dead = [
        {"id": i, "endpoint": ep, "event": t, "key": k, "attempts": a, "last_error": err}
        for i, ep, t, k, a, err in s.execute(
            select(
                WebhookDelivery.id,
                WebhookDelivery.endpoint,
                CrmEvent.type,
                CrmEvent.key,
                WebhookDelivery.attempts,
                WebhookDelivery.last_error,
            )
            .join(CrmEvent, CrmEvent.id == WebhookDelivery.event_id)
            .where(WebhookDelivery.status == "dead")
            .order_by(WebhookDelivery.id.desc())
            .limit(20)
        )
    ]
    return {**counts, "dead_letters": dead}
