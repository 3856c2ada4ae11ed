"""Campaign controls for marketers: stats, pause/resume, enroll and unenroll segments.

Plain functions taking a session (the CLI and the console call the same ones); none
commits. Every change is an event on each affected lead's timeline.
"""

from __future__ import annotations

import hashlib
import math
from collections import defaultdict
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Select, func, insert, select, update
from sqlalchemy.orm import Session

from worker.config import Campaign, Config
from worker.leads import LeadError, normalise_email, parse_status
from worker.models import (
    LIVE_ENROLLMENT,
    CampaignState,
    Enrollment,
    EnrollmentState,
    InboundMessage,
    Lead,
    LeadEvent,
    OutboundMessage,
)
from worker.states import move_enrollment, outbox

_CHUNK = 900


def campaign(config: Config, name: str) -> Campaign:
    """The configured campaign, or LeadError naming the ones there are."""
    try:
        return config.campaign(name)
    except KeyError:
        known = ", ".join(c.name for c in config.campaigns) or "none configured"
        raise LeadError(f"no campaign named {name!r} (campaigns: {known})") from None


def paused_campaigns(s: Session) -> set[str]:
    return set(s.scalars(select(CampaignState.campaign).where(CampaignState.paused.is_(True))))


def _events(s: Session, lead_ids: list[int], type_: str, cause: str, now: datetime,
            detail: dict[str, Any]) -> None:  # fmt: skip
    rows = [
        {"lead_id": lid, "at": now, "type": type_, "from_status": None, "to_status": None,
         "cause": cause, "detail": detail, "inbound_id": None}
        for lid in lead_ids
    ]  # fmt: skip
    for i in range(0, len(rows), 5000):
        s.execute(insert(LeadEvent), rows[i : i + 5000])


def _enrolled_leads(s: Session, name: str, states: tuple[str, ...]) -> list[int]:
    return list(
        s.scalars(
            select(Enrollment.lead_id).where(
                Enrollment.campaign == name, Enrollment.state.in_(states)
            )
        )
    )


# --- pause and resume ------------------------------------------------------------------


def pause_campaign(s: Session, config: Config, name: str, now: datetime, by: str = "user") -> int:
    """Pause a campaign: nothing of it is queued or sent until it is resumed.

    Returns the number of leads with an active enrollment (each gets an event); a campaign
    already paused is left as it is (0).
    """
    campaign(config, name)
    state = s.get(CampaignState, name, with_for_update=True)
    if state is not None and state.paused:
        return 0
    if state is None:
        s.add(CampaignState(campaign=name, paused=True, changed_at=now, changed_by=by))
    else:
        state.paused, state.changed_at, state.changed_by = True, now, by
    leads = _enrolled_leads(s, name, LIVE_ENROLLMENT)
    _events(s, leads, "campaign_paused", f"{by}: campaigns pause {name}", now, {"campaign": name})
    return len(leads)


@dataclass
class Resumed:
    leads: int
    spread: int
    """Due steps given staggered times so they leave within the caps, not in one burst."""
    last_due: datetime | None


def _per_minute(config: Config, camp: Campaign) -> int | None:
    """How many of this campaign's emails its SMTP account may send per minute (None: no cap)."""
    smtp = config.identity(camp.mailbox).smtp
    if smtp is None:
        return None
    rates: list[int] = []
    if smtp.max_per_minute:
        rates.append(smtp.max_per_minute)
    if smtp.max_per_day:
        w = camp.send_window
        minutes = (
            (w.end.hour * 60 + w.end.minute) - (w.start.hour * 60 + w.start.minute) if w else 1440
        )
        rates.append(max(1, math.ceil(smtp.max_per_day / max(minutes, 1))))
    return min(rates) if rates else None


def resume_campaign(
    s: Session, config: Config, name: str, now: datetime, by: str = "user"
) -> Resumed:
    """Resume a paused campaign; what fell due meanwhile is spread out by the caps.

    Queued messages of the campaign and due enrollments get the next open window of their
    lead's time zone and, among those sharing it, consecutive minutes: as many per minute
    as the SMTP account's caps allow. Resuming a long pause is no burst, even at night.
    """
    camp = campaign(config, name)
    state = s.get(CampaignState, name, with_for_update=True)
    if state is None or not state.paused:
        return Resumed(0, 0, None)
    state.paused, state.changed_at, state.changed_by = False, now, by
    rate = _per_minute(config, camp)
    spread = 0
    last: datetime | None = None
    if rate:
        from worker.schedule import next_open_slot
        from worker.sequences import public_holidays

        def opens(tz: str | None, country: str | None) -> datetime:
            days_off = public_holidays(country, now.year) if camp.skip_holidays else frozenset()
            return next_open_slot(now, camp.send_window, tz or camp.timezone, days_off)

        queued = s.execute(
            select(OutboundMessage.id, Lead.timezone, Lead.country)
            .join(Lead, Lead.id == OutboundMessage.lead_id)
            .where(
                OutboundMessage.campaign == name,
                OutboundMessage.kind == "nurture",
                # Held while paused (an hour at a time): all of them get a slot now.
                OutboundMessage.status == "queued",
            )
            .order_by(OutboundMessage.next_attempt_at, OutboundMessage.id)
        ).all()
        due = s.execute(
            select(Enrollment.id, Lead.timezone, Lead.country)
            .join(Lead, Lead.id == Enrollment.lead_id)
            .where(
                Enrollment.campaign == name,
                Enrollment.state == "active",
                Enrollment.next_due <= now,
            )
            .order_by(Enrollment.next_due, Enrollment.id)
        ).all()
        # Each message gets the next open window of its lead's time zone, then a minute
        # of its own among those sharing that opening: `rate` per minute, queued ones first.
        taken: dict[datetime, int] = defaultdict(int)

        def slot(tz: str | None, country: str | None) -> datetime:
            start = opens(tz, country)
            at = start + timedelta(minutes=taken[start] // rate)
            taken[start] += 1
            return at

        row_slots: dict[datetime, list[int]] = defaultdict(list)
        for row_id, tz, country in queued:
            row_slots[slot(tz, country)].append(row_id)
        for at, ids in row_slots.items():
            s.execute(
                update(OutboundMessage)
                .where(OutboundMessage.id.in_(ids))
                .values(next_attempt_at=at)
                .execution_options(synchronize_session=False)
            )
        en_slots: dict[datetime, list[int]] = defaultdict(list)
        for en_id, tz, country in due:
            en_slots[slot(tz, country)].append(en_id)
        for at, ids in en_slots.items():
            s.execute(
                update(Enrollment)
                .where(Enrollment.id.in_(ids))
                .values(next_due=at, waiting=None, updated_at=now)
                .execution_options(synchronize_session=False)
            )
        spread = len(queued) + len(due)
        if spread:
            last = max([*row_slots, *en_slots])
    leads = _enrolled_leads(s, name, LIVE_ENROLLMENT)
    _events(
        s, leads, "campaign_resumed", f"{by}: campaigns resume {name}", now,
        {"campaign": name, "spread": spread, "last_due": last.isoformat() if last else None},
    )  # fmt: skip
    return Resumed(len(leads), spread, last)


# --- segments ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Segment:
    """Which leads: every given filter must hold (an empty filter matches everyone)."""

    statuses: tuple[str, ...] = ()
    countries: tuple[str, ...] = ()
    industries: tuple[str, ...] = ()
    sources: tuple[str, ...] = ()
    imported_since: datetime | None = None
    emails: tuple[str, ...] = ()
    """Addresses (from a CSV file or the command line), normalised."""

    def is_empty(self) -> bool:
        return not (
            self.statuses
            or self.countries
            or self.industries
            or self.sources
            or self.imported_since
            or self.emails
        )

    def query(self) -> Select[Any]:
        statuses = [parse_status(st) for st in self.statuses]
        q = select(Lead.id).order_by(Lead.id)
        if statuses:
            q = q.where(Lead.status.in_(statuses))
        if self.countries:
            q = q.where(Lead.country.in_([c.upper() for c in self.countries]))
        if self.industries:
            q = q.where(func.lower(Lead.industry).in_([i.lower() for i in self.industries]))
        if self.sources:
            q = q.where(Lead.source.in_(self.sources))
        if self.imported_since is not None:
            q = q.where(Lead.created_at >= self.imported_since)
        return q


def segment_lead_ids(s: Session, segment: Segment) -> list[int]:
    q = segment.query()
    if not segment.emails:
        return list(s.scalars(q))
    out: list[int] = []
    emails = list(segment.emails)
    for i in range(0, len(emails), _CHUNK):
        out += s.scalars(q.where(Lead.email.in_(emails[i : i + _CHUNK])))
    return sorted(set(out))


def emails_of(values: list[str]) -> tuple[str, ...]:
    """Normalise addresses given by a user; LeadError names the first bad one."""
    out: list[str] = []
    for v in values:
        try:
            out.append(normalise_email(v))
        except ValueError as e:
            raise LeadError(str(e)) from None
    return tuple(out)


def _emails(s: Session, ids: list[int]) -> dict[int, str]:
    out: dict[int, str] = {}
    for i in range(0, len(ids), _CHUNK):
        out.update(
            s.execute(select(Lead.id, Lead.email).where(Lead.id.in_(ids[i : i + _CHUNK]))).all()
        )
    return out


@dataclass
class Enrolled:
    enrolled: int = 0
    """New enrollments (step 1 becomes due after its delay)."""
    reactivated: int = 0
    """Enrollments stopped by `unenroll` that continue where they stopped."""
    already: int = 0
    not_lead: int = 0
    suppressed: int = 0

    def as_json(self) -> dict[str, int]:
        return dict(self.__dict__)


def enroll_segment(
    s: Session, config: Config, name: str, segment: Segment, now: datetime, by: str = "user"
) -> Enrolled:
    """Enroll the segment's leads in a campaign; each new one gets step 1 once.

    Only leads in status `lead` and not on the do-not-contact list are enrolled (the
    default segment is every lead in status `lead`). A lead already in the campaign is
    left alone, unless it was unenrolled: then it continues from the step it stopped at.
    """
    from worker.leads import enroll
    from worker.suppression import suppressed

    camp = campaign(config, name)
    result = Enrolled()
    everyone = segment_lead_ids(s, segment)
    only_leads = replace(segment, statuses=("lead",))
    wants_leads = not segment.statuses or "lead" in segment.statuses
    eligible = segment_lead_ids(s, only_leads) if wants_leads else []
    result.not_lead = len(everyone) - len(eligible)
    emails = _emails(s, eligible)
    blocked = suppressed(s, emails.values())
    eligible_set = {lid for lid in eligible if emails[lid] not in blocked}
    result.suppressed = len(eligible) - len(eligible_set)
    existing = {
        en.lead_id: en
        for en in s.scalars(select(Enrollment).where(Enrollment.campaign == name))
        if en.lead_id in eligible_set
    }
    fresh = [lid for lid in sorted(eligible_set) if lid not in existing]
    revived: list[int] = []
    for lid, en in existing.items():
        if en.state == EnrollmentState.STOPPED and en.step < len(camp.steps):
            move_enrollment(en, "continued")
            en.next_due, en.waiting, en.updated_at = now, None, now
            revived.append(lid)
        else:
            result.already += 1
    result.reactivated = len(revived)
    result.enrolled = enroll(s, fresh, camp, now)
    cause = f"{by}: campaigns enroll {name}"
    _events(s, fresh, "enrolled", cause, now, {"campaign": name})
    _events(s, revived, "enrolled", cause + " (continues where it stopped)", now,
            {"campaign": name})  # fmt: skip
    return result


def unenroll_segment(
    s: Session, config: Config, name: str, segment: Segment, now: datetime, by: str = "user"
) -> int:
    """Take the segment's leads out of a campaign: their queued steps are cancelled and
    nothing more of it is sent. Returns how many enrollments were stopped."""
    campaign(config, name)
    ids = set(segment_lead_ids(s, segment))
    stopped = [
        en
        for en in s.scalars(
            select(Enrollment).where(
                Enrollment.campaign == name, Enrollment.state.in_(LIVE_ENROLLMENT)
            )
        )
        if en.lead_id in ids
    ]
    lead_ids = [en.lead_id for en in stopped]
    for en in stopped:
        move_enrollment(en, "stopped")
        en.next_due, en.waiting, en.updated_at = None, None, now
    for i in range(0, len(lead_ids), _CHUNK):
        s.execute(
            outbox(
                "cancelled",
                OutboundMessage.campaign == name,
                OutboundMessage.kind == "nurture",
                OutboundMessage.lead_id.in_(lead_ids[i : i + _CHUNK]),
            )
            .values(last_error=f"unenrolled from {name}")
            .execution_options(synchronize_session=False)
        )
    _events(s, lead_ids, "unenrolled", f"{by}: campaigns unenroll {name}", now,
            {"campaign": name})  # fmt: skip
    return len(lead_ids)


# --- variants ----------------------------------------------------------------------------


def pick_variant(campaign_name: str, step: int, lead_id: int, count: int) -> int:
    """Which of a step's `count` templates a lead gets: a stable hash, even across leads."""
    if count <= 1:
        return 0
    digest = hashlib.sha256(f"{campaign_name}\0{step}\0{lead_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % count


def two_proportion_p(x1: int, n1: int, x2: int, n2: int) -> float | None:
    """Two-sided p-value of a two-proportion z-test (pooled); None when undefined."""
    if not n1 or not n2:
        return None
    pooled = (x1 + x2) / (n1 + n2)
    se = math.sqrt(pooled * (1 - pooled) * (1 / n1 + 1 / n2))
    if se == 0:
        return None
    z = (x1 / n1 - x2 / n2) / se
    return math.erfc(abs(z) / math.sqrt(2))


def significance_note(variants: list[dict[str, Any]]) -> str:
    """A plain-words verdict comparing each variant's reply rate with the first's."""
    if len(variants) < 2:
        return ""
    base = variants[0]
    notes: list[str] = []
    for v in variants[1:]:
        n1, n2 = base["sent"], v["sent"]
        pooled = (base["replied"] + v["replied"]) / (n1 + n2) if n1 + n2 else 0
        # The normal approximation needs a few expected replies and non-replies per arm.
        if min(n1, n2) * min(pooled, 1 - pooled) < 5:
            notes.append(
                f"{v['label']} vs {base['label']}: too few sends to tell "
                f"({n1} and {n2} sent, {base['replied'] + v['replied']} replies)"
            )
            continue
        p = two_proportion_p(base["replied"], n1, v["replied"], n2)
        if p is None:
            notes.append(f"{v['label']} vs {base['label']}: no difference to test")
        elif p < 0.05:
            better = v["label"] if v["replied"] / n2 > base["replied"] / n1 else base["label"]
            notes.append(
                f"{v['label']} vs {base['label']}: {better} replies more, significant "
                f"(p={p:.3f}, two-proportion z-test)"
            )
        else:
            notes.append(
                f"{v['label']} vs {base['label']}: no significant difference yet "
                f"(p={p:.2f}, two-proportion z-test)"
            )
    return "; ".join(notes)


# --- stats -------------------------------------------------------------------------------

OUTCOMES = {
    "reply": "replied",
    "auto_reply": "auto_replied",
    "bounce": "bounced",
    "unsubscribe": "unsubscribed",
    "complaint": "unsubscribed",
}


def _rate(part: int, whole: int) -> float | None:
    return round(part / whole, 4) if whole else None


def _counts() -> dict[str, Any]:
    return {"sent": 0, "replied": 0, "auto_replied": 0, "bounced": 0, "unsubscribed": 0}


def campaign_stats(s: Session, config: Config) -> list[dict[str, Any]]:
    """The rows of `twoway campaigns list --json`: per campaign, per step, per variant.

    Each inbound reply, auto-reply, bounce or unsubscribe counts for the nurture email it
    answers: the one it matched (by token or Message-ID), else the lead's latest email
    sent before it arrived. A lead counts once per outcome and step.
    """
    paused = paused_campaigns(s)
    names = [c.name for c in config.campaigns]
    names += sorted({n for n in s.scalars(select(Enrollment.campaign).distinct())} - set(names))
    enrolled = dict(
        s.execute(select(Enrollment.campaign, func.count()).group_by(Enrollment.campaign)).all()
    )
    active = dict(
        s.execute(
            select(Enrollment.campaign, func.count())
            .where(Enrollment.state == "active")
            .group_by(Enrollment.campaign)
        ).all()
    )
    at_step = {
        (name, step): n
        for name, step, n in s.execute(
            select(Enrollment.campaign, Enrollment.step, func.count())
            .where(Enrollment.state.in_(("active", "paused")))
            .group_by(Enrollment.campaign, Enrollment.step)
        )
    }
    sent_rows = s.execute(
        select(
            OutboundMessage.id,
            OutboundMessage.lead_id,
            OutboundMessage.campaign,
            OutboundMessage.step,
            OutboundMessage.variant,
            OutboundMessage.template,
            OutboundMessage.sent_at,
        ).where(OutboundMessage.kind == "nurture", OutboundMessage.status == "sent")
    ).all()
    by_id = {r.id: r for r in sent_rows}
    by_lead: dict[int, list[Any]] = defaultdict(list)
    for r in sent_rows:
        by_lead[r.lead_id].append(r)
    for rows in by_lead.values():
        rows.sort(key=lambda r: r.sent_at)
    # outcome -> campaign -> step -> variant -> set of leads
    hits: dict[str, dict[tuple[str, int, int], set[int]]] = defaultdict(lambda: defaultdict(set))
    inbound = s.execute(
        select(
            InboundMessage.lead_id,
            InboundMessage.kind,
            InboundMessage.outbound_id,
            InboundMessage.received_at,
        ).where(InboundMessage.lead_id.is_not(None), InboundMessage.kind.in_(list(OUTCOMES)))
    ).all()
    for lead_id, kind, outbound_id, received in inbound:
        if lead_id is None or kind is None:
            continue
        target = by_id.get(outbound_id) if outbound_id else None
        if target is None:
            before = [r for r in by_lead.get(lead_id, []) if r.sent_at and r.sent_at <= received]
            target = before[-1] if before else None
        if target is None or target.campaign is None:
            continue
        key = (target.campaign, target.step or 0, target.variant or 0)
        hits[OUTCOMES[kind]][key].add(lead_id)
    out: list[dict[str, Any]] = []
    for name in names:
        try:
            camp: Campaign | None = config.campaign(name)
        except KeyError:
            camp = None
        steps_cfg = camp.steps if camp else ()
        step_numbers = sorted(
            {r.step or 0 for r in sent_rows if r.campaign == name} | set(range(len(steps_cfg)))
        )
        total = _counts()
        total_leads: dict[str, set[int]] = defaultdict(set)
        steps: list[dict[str, Any]] = []
        for i in step_numbers:
            templates = steps_cfg[i].templates if i < len(steps_cfg) else ()
            rows = [r for r in sent_rows if r.campaign == name and (r.step or 0) == i]
            count = max(len(templates), 1 + max((r.variant or 0 for r in rows), default=0))
            variants: list[dict[str, Any]] = []
            step_counts = _counts()
            step_counts["sent"] = len(rows)
            for v in range(count):
                vrows = [r for r in rows if (r.variant or 0) == v]
                vc = _counts()
                vc["sent"] = len(vrows)
                for outcome in ("replied", "auto_replied", "bounced", "unsubscribed"):
                    vc[outcome] = len(hits[outcome].get((name, i, v), set()))
                    step_counts[outcome] += vc[outcome]
                tpl = templates[v] if v < len(templates) else (vrows[0].template if vrows else "")
                variants.append(
                    {"variant": v, "label": chr(ord("A") + v) if v < 26 else str(v),
                     "template": tpl, **vc, "reply_rate": _rate(vc["replied"], vc["sent"])}
                )  # fmt: skip
            for outcome in ("replied", "auto_replied", "bounced", "unsubscribed"):
                for v in range(count):
                    total_leads[outcome] |= hits[outcome].get((name, i, v), set())
            total_leads["sent"] |= {r.lead_id for r in rows}
            total["sent"] += len(rows)
            step = {
                "step": i + 1,
                "template": templates[0] if templates else (rows[0].template if rows else ""),
                "waiting": at_step.get((name, i), 0),
                **step_counts,
                "reply_rate": _rate(step_counts["replied"], step_counts["sent"]),
                "variants": variants if count > 1 else [],
                "significance": significance_note(variants) if count > 1 else "",
            }
            steps.append(step)
        reached = len(total_leads["sent"])
        out.append(
            {
                "campaign": name,
                "configured": camp is not None,
                "paused": name in paused,
                "enrolled": enrolled.get(name, 0),
                "active": active.get(name, 0),
                "sent": total["sent"],
                "leads_reached": reached,
                "replied": len(total_leads["replied"]),
                "auto_replied": len(total_leads["auto_replied"]),
                "bounced": len(total_leads["bounced"]),
                "unsubscribed": len(total_leads["unsubscribed"]),
                "reply_rate": _rate(len(total_leads["replied"]), reached),
                "steps": steps,
            }
        )
    return out


def format_stats(rows: list[dict[str, Any]]) -> str:
    """`twoway campaigns list` for people."""
    if not rows:
        return "no campaigns configured"

    def pct(rate: float | None) -> str:
        return "-" if rate is None else f"{rate:.1%}"

    lines: list[str] = []
    head = (
        f"  {'':24} {'SENT':>6} {'REPLIED':>7} {'AUTO':>5} {'BOUNCED':>7} {'UNSUB':>5} {'RATE':>6}"
    )
    for c in rows:
        state = "PAUSED" if c["paused"] else "running"
        if not c["configured"]:
            state = "not in the config"
        lines.append(
            f"{c['campaign']} ({state}): {c['enrolled']} enrolled, {c['active']} active, "
            f"{c['leads_reached']} reached, reply rate {pct(c['reply_rate'])}"
        )
        lines.append(head)
        for st in c["steps"]:
            lines.append(
                f"  {'step ' + str(st['step']) + ' ' + st['template']:24.24} {st['sent']:>6} "
                f"{st['replied']:>7} {st['auto_replied']:>5} {st['bounced']:>7} "
                f"{st['unsubscribed']:>5} {pct(st['reply_rate']):>6}"
            )
            for v in st["variants"]:
                lines.append(
                    f"    {v['label'] + ' ' + v['template']:22.22} {v['sent']:>6} "
                    f"{v['replied']:>7} {v['auto_replied']:>5} {v['bounced']:>7} "
                    f"{v['unsubscribed']:>5} {pct(v['reply_rate']):>6}"
                )
            if st["significance"]:
                lines.append(f"    {st['significance']}")
    return "\n".join(lines)
