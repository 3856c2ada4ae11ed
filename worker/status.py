"""`twoway status`: funnel, outbox, mailbox health, quarantine and alarms."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, select, text

from worker.app import App
from worker.leads import iso, status_counts
from worker.models import (
    UNVERIFIED_EVENTS,
    UNVERIFIED_WHERE,
    Enrollment,
    EnrollmentState,
    InboundMessage,
    Lead,
    LeadEvent,
    LeadStatus,
    MailboxState,
    OutboundMessage,
    OutboxState,
    Quarantine,
)

UNVERIFIED_DAYS = 30
"""The window of the unverified counts in `status` (the trust window of lifecycle)."""


def unverified_counts(s: Any, now: datetime) -> dict[str, int]:
    """Bounces, replies and unsubscribes recorded on a lead in the last UNVERIFIED_DAYS and
    not acted on, per kind. One read of the partial index ix_lead_events_unverified (it
    holds only these events, so the cost follows their number, not the timeline's)."""
    counts = {t.removeprefix("unverified_"): 0 for t in UNVERIFIED_EVENTS}
    for kind, n in s.execute(
        select(LeadEvent.type, func.count())
        .where(text(UNVERIFIED_WHERE), LeadEvent.at >= now - timedelta(days=UNVERIFIED_DAYS))
        .group_by(LeadEvent.type)
    ):
        counts[str(kind).removeprefix("unverified_")] = n
    return counts


def _rate(part: int, whole: int) -> float | None:
    return round(part / whole, 4) if whole else None


def collect_status(app: App) -> dict[str, Any]:
    """The object printed by `twoway status --json` (stable keys, documented in README)."""
    now = app.now()
    day_start = now.replace(hour=0, minute=0, second=0, microsecond=0)
    with app.transaction() as s:
        leads = status_counts(s)
        outbox = {str(state): 0 for state in OutboxState}
        for st, n in s.execute(
            select(OutboundMessage.status, func.count()).group_by(OutboundMessage.status)
        ):
            outbox[st] = n
        sent_today = s.scalar(
            select(func.count()).where(
                OutboundMessage.status == OutboxState.SENT, OutboundMessage.sent_at >= day_start
            )
        )
        next_due = s.scalar(
            select(func.min(Enrollment.next_due)).where(Enrollment.state == EnrollmentState.ACTIVE)
        )
        unknown = [
            {"message_id": m, "to": t, "template": tpl}
            for m, t, tpl in s.execute(
                select(
                    OutboundMessage.message_id, OutboundMessage.to_addr, OutboundMessage.template
                ).where(OutboundMessage.status == OutboxState.UNKNOWN)
            )
        ]
        failed = [
            {"to": t, "template": tpl, "error": err}
            for t, tpl, err in s.execute(
                select(
                    OutboundMessage.to_addr, OutboundMessage.template, OutboundMessage.last_error
                )
                .where(OutboundMessage.status == OutboxState.FAILED)
                .order_by(OutboundMessage.id.desc())
                .limit(5)
            )
        ]
        mailboxes: list[dict[str, Any]] = []
        states = {(m.mailbox, m.folder): m for m in s.scalars(select(MailboxState))}
        for mb in app.config.mailboxes:
            folders = [states.get((mb.name, f)) for f in mb.folders]
            syncs = [f.last_sync for f in folders if f and f.last_sync]
            errors = [(f.last_error_at, f.last_error) for f in folders if f and f.last_error]
            last_sync = min(syncs) if len(syncs) == len(folders) and syncs else None
            mailboxes.append(
                {
                    "name": mb.name,
                    "kind": mb.kind,
                    "folders": list(mb.folders),
                    "last_sync": iso(last_sync),
                    "lag_seconds": round((now - last_sync).total_seconds()) if last_sync else None,
                    "idle": any(f.idle for f in folders if f),
                    "idle_folders": [f.folder for f in folders if f and f.idle],
                    "last_error": max(errors, key=lambda e: e[0] or now)[1] if errors else None,
                }
            )
        quarantine = s.scalar(
            select(func.count()).select_from(Quarantine).where(Quarantine.resolved_at.is_(None))
        )
        inbound = {
            k: n
            for k, n in s.execute(
                select(InboundMessage.kind, func.count()).group_by(InboundMessage.kind)
            )
        }
        why = InboundMessage.bounce["reason"].as_string()
        soft_bounces: dict[str, int] = {}
        for reason, n in s.execute(
            select(why, func.count())
            .where(
                InboundMessage.kind == "bounce",
                InboundMessage.bounce["type"].as_string() == "soft",
            )
            .group_by(why)
        ):
            key = str(reason or "other")  # bounces stored before reasons existed: "other"
            soft_bounces[key] = soft_bounces.get(key, 0) + n
        funnel = _funnel(s, app)
        unverified = unverified_counts(s, now)
        alarms = _alarms(s, app, now)
        from worker.webhooks import webhook_status

        webhooks = webhook_status(s)
        from worker.handoffs import speed_to_lead

        speed = speed_to_lead(s, app.config, now)
        if webhooks["dead"]:
            alarms.append(
                f"{webhooks['dead']} webhook deliver(ies) dead after every retry: fix the "
                "endpoint, then `twoway webhooks retry --all`"
            )
    from worker.leases import workers_and_leases

    workers, leases = workers_and_leases(app)
    for m in mailboxes:
        m["worker"] = leases.get(m["name"])
    return {
        "now": iso(now),
        "workers": workers,
        "leads": leads,
        "funnel": funnel,
        "outbox": {**outbox, "sent_today": sent_today or 0, "next_due": iso(next_due)},
        "unknown_sends": unknown,
        "recent_failures": failed,
        "inbound": {str(k): v for k, v in inbound.items()},
        "soft_bounces": dict(sorted(soft_bounces.items())),
        "unverified": {"days": UNVERIFIED_DAYS, **unverified},
        "mailboxes": mailboxes,
        "quarantine": quarantine or 0,
        "alarms": alarms,
        "webhooks": webhooks,
        "speed_to_lead": speed,
    }


def _funnel(s: Any, app: App) -> list[dict[str, Any]]:
    """Per campaign: enrolled leads -> engaged (replied) -> prospects -> handed off."""
    rows = []
    names = [c.name for c in app.config.campaigns]
    names += [n for n in s.scalars(select(Enrollment.campaign).distinct()) if n not in names]
    for name in names:
        enrolled = s.scalar(select(func.count()).where(Enrollment.campaign == name)) or 0
        lead_ids = select(Enrollment.lead_id).where(Enrollment.campaign == name)
        engaged = (
            s.scalar(
                select(func.count(func.distinct(LeadEvent.lead_id))).where(
                    LeadEvent.type == "engaged", LeadEvent.lead_id.in_(lead_ids)
                )
            )
            or 0
        )
        prospects = (
            s.scalar(
                select(func.count()).where(
                    Lead.id.in_(lead_ids),
                    Lead.status.in_((LeadStatus.PROSPECT, LeadStatus.CUSTOMER)),
                )
            )
            or 0
        )
        handed = (
            s.scalar(
                select(func.count(func.distinct(OutboundMessage.lead_id))).where(
                    OutboundMessage.kind == "handoff",
                    OutboundMessage.status == OutboxState.SENT,
                    OutboundMessage.lead_id.in_(lead_ids),
                )
            )
            or 0
        )
        rows.append(
            {
                "campaign": name,
                "leads": enrolled,
                "engaged": engaged,
                "prospects": prospects,
                "handed_off": handed,
                "engaged_rate": _rate(engaged, enrolled),
                "prospect_rate": _rate(prospects, enrolled),
            }
        )
    return rows


def _alarms(s: Any, app: App, now: datetime) -> list[str]:
    alarms: list[str] = []
    window = now - timedelta(hours=app.config.alarms.silent_hours)
    sent_recent = s.scalar(
        select(func.count()).where(
            OutboundMessage.status == OutboxState.SENT, OutboundMessage.sent_at >= window
        )
    )
    heard = s.scalar(
        select(func.count()).where(
            InboundMessage.received_at >= window,
            InboundMessage.kind.in_(("reply", "bounce", "auto_reply", "unsubscribe")),
        )
    )
    if sent_recent and sent_recent >= 20 and not heard:
        alarms.append(
            f"{sent_recent} messages sent in the last {app.config.alarms.silent_hours} h but no "
            "reply, bounce or auto-reply seen: is the mailbox being read?"
        )
    week = now - timedelta(days=7)
    sent_week = s.scalar(
        select(func.count()).where(
            OutboundMessage.status == OutboxState.SENT, OutboundMessage.sent_at >= week
        )
    )
    bounces = s.scalar(
        select(func.count()).where(
            InboundMessage.kind == "bounce", InboundMessage.received_at >= week
        )
    )
    if sent_week and sent_week >= 20 and bounces / sent_week > app.config.alarms.bounce_rate:
        alarms.append(
            f"bounce rate {bounces / sent_week:.1%} over the last 7 days is above "
            f"{app.config.alarms.bounce_rate:.0%}: check the list quality and sender reputation"
        )
    unknown = s.scalar(select(func.count()).where(OutboundMessage.status == OutboxState.UNKNOWN))
    if unknown:
        alarms.append(
            f"{unknown} send(s) in state unknown (the worker stopped during the SMTP call): "
            "check the recipients' threads before resending"
        )
    return alarms


def format_status(d: dict[str, Any]) -> str:
    lines = ["leads: " + ", ".join(f"{k} {v}" for k, v in d["leads"].items() if v) or "leads: none"]
    if d["funnel"]:
        lines.append("funnel (leads -> engaged -> prospects -> handed off):")
        for f in d["funnel"]:
            rate = (
                f" ({f['prospect_rate']:.1%} prospects)" if f["prospect_rate"] is not None else ""
            )
            lines.append(
                f"  {f['campaign']}: {f['leads']} -> {f['engaged']} -> {f['prospects']} -> "
                f"{f['handed_off']}{rate}"
            )
    o = d["outbox"]
    lines.append(
        f"outbox: queued {o['queued']}, sending {o['sending']}, sent today {o['sent_today']}, "
        f"sent {o['sent']}, failed {o['failed']}, cancelled {o['cancelled']}, unknown {o['unknown']}"
        + (f"; next due {o['next_due']}" if o["next_due"] else "")
    )
    for u in d["unknown_sends"]:
        lines.append(f"  unknown: {u['template']} to {u['to']} (Message-ID {u['message_id']})")
    for m in d["mailboxes"]:
        health = f"last sync {m['last_sync'] or 'never'}"
        if m["lag_seconds"] is not None:
            health += f" ({m['lag_seconds']} s ago)"
        idle, polled = m["idle_folders"], [f for f in m["folders"] if f not in m["idle_folders"]]
        if idle:
            health += ", IDLE on " + ", ".join(idle)
        if polled:
            health += (", polling " + ", ".join(polled)) if idle else ", polling"
        if m["last_error"]:
            health += f", last error: {m['last_error']}"
        lines.append(f"mailbox {m['name']} ({m['kind']}): {health}")
    for w in d["workers"]:
        held = [
            m["name"]
            for m in d["mailboxes"]
            if (m.get("worker") or {}).get("holder") == w["worker"]
        ]
        lines.append(
            f"worker {w['worker']}: heartbeat {w['heartbeat_age_seconds']} s ago"
            + (f", reads {', '.join(held)}" if held else "")
        )
    if d.get("soft_bounces"):
        counts = ", ".join(f"{why} {n}" for why, n in d["soft_bounces"].items())
        lines.append(f"soft bounces by reason: {counts}")
    u = d.get("unverified") or {}
    if any(u.get(k) for k in ("bounce", "reply", "unsubscribe")):
        lines.append(
            f"unverified in the last {u['days']} days (recorded on the lead, not acted on; "
            f"see `twoway leads show`): bounce {u['bounce']}, reply {u['reply']}, "
            f"unsubscribe {u['unsubscribe']}"
        )
    lines.append(f"quarantine: {d['quarantine']} message(s)")
    w = d["webhooks"]
    if any(w[k] for k in ("pending", "sending", "delivered", "dead")):
        lines.append(
            f"webhooks: pending {w['pending']}, sending {w['sending']}, "
            f"delivered {w['delivered']}, dead {w['dead']}"
        )
        for x in w["dead_letters"]:
            lines.append(
                f"  dead #{x['id']} {x['event']} to {x['endpoint']} after {x['attempts']} "
                f"attempt(s): {x['last_error']}"
            )
    lines.extend(_speed_lines(d.get("speed_to_lead") or {}))
    for a in d["alarms"]:
        lines.append(f"ALARM: {a}")
    return "\n".join(lines)


def _minutes(seconds: int | None) -> str:
    return "-" if seconds is None else f"{seconds // 60} min"


def _speed_lines(speed: dict[str, Any]) -> list[str]:
    """Speed to lead: first-response time per rep, and who is still waiting."""
    lines: list[str] = []
    for r in speed.get("reps", []):
        lines.append(
            f"rep {r['rep']}: {r['answered']}/{r['handoffs']} answered in {speed['days']} days, "
            f"first response median {_minutes(r['median_seconds'])}, "
            f"p90 {_minutes(r['p90_seconds'])}, {r['breaches']} over the SLA"
        )
    for w in speed.get("waiting", []):
        late = ", over the SLA" if w["breached"] else ""
        lines.append(
            f"waiting: {w['email']} for {w['rep']} since {w['since']} "
            f"({_minutes(w['waiting_seconds'])}{late})"
        )
    return lines
