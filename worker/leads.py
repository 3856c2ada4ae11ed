"""Leads: CSV import, enrollment, listing, the timeline and manual status changes."""

from __future__ import annotations

import base64
import csv
import io
import re
import secrets
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from sqlalchemy import bindparam, func, insert, select, update
from sqlalchemy.orm import Session

from worker.app import App
from worker.config import Campaign, Config, country_code
from worker.contexts import LeadBlock
from worker.db import core, deferred_rows, refresh_statistics, run, run_many
from worker.match import note_new_lead
from worker.models import (
    Enrollment,
    EnrollmentState,
    InboundMessage,
    Lead,
    LeadEvent,
    LeadStatus,
    OutboundMessage,
    company_key,
)
from worker.states import OUTBOX_MOVES, enrollments, outbox
from worker.webhooks import on_status

KNOWN_COLUMNS = (
    "email",
    "first_name",
    "last_name",
    "company",
    "title",
    "industry",
    "company_size",
    "annual_revenue",
    "country",
    "timezone",
    "source",
)
_INT_COLUMNS = ("company_size", "annual_revenue")
_LOCAL = re.compile(r"^[A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]+$")
_DOMAIN = re.compile(
    r"^(?=.{1,253}$)([A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z]{2,63}$"
)
_CHUNK = 900  # below SQLite's bound-parameter limit
_SLICE = 5000  # rows written per round trip on import


class LeadError(Exception):
    """A user asked for something about leads that cannot be done (unknown lead, bad status)."""


def normalise_email(text: str) -> str:
    """The canonical form of an address, or ValueError saying why it is not one.

    The domain is case-insensitive by standard; the local part is lower-cased too, because
    every real provider treats it so and a lead typed in two cases is one person.
    """
    addr = text.strip().strip("<>").strip()
    if not addr:
        raise ValueError("email is empty")
    if any(c.isspace() for c in addr) or addr.count("@") != 1:
        raise ValueError(f"{text.strip()!r} is not an email address")
    local, domain = addr.rsplit("@", 1)
    if not local or len(local) > 64 or not _LOCAL.match(local) or ".." in local:
        raise ValueError(f"{text.strip()!r} has an invalid local part")
    try:
        domain = domain.encode("idna").decode("ascii")
    except UnicodeError:
        raise ValueError(f"{text.strip()!r} has an invalid domain") from None
    if not _DOMAIN.match(domain):
        raise ValueError(f"{text.strip()!r} has an invalid domain")
    return f"{local}@{domain}".lower()


def new_token() -> str:
    """A reply token: 16 base32 characters (80 bits), safe in a plus-address local part."""
    return base64.b32encode(secrets.token_bytes(10)).decode("ascii").lower()


def record_event(
    session: Session,
    lead: Lead,
    type_: str,
    cause: str,
    at: datetime,
    *,
    detail: dict[str, Any] | None = None,
    inbound_id: int | None = None,
) -> None:
    """Append a fact to a lead's timeline that does not change its status."""
    _write_event(session, lead.id, type_, cause, at, None, None, detail, inbound_id)


def _write_event(
    session: Session,
    lead_id: int,
    type_: str,
    cause: str,
    at: datetime,
    from_status: LeadStatus | None,
    to_status: LeadStatus | None,
    detail: dict[str, Any] | None,
    inbound_id: int | None,
) -> None:
    row = {
        "lead_id": lead_id,
        "at": at,
        "type": type_,
        "from_status": from_status,
        "to_status": to_status,
        "cause": cause,
        "detail": detail or {},
        "inbound_id": inbound_id,
    }
    pending: _Buffer | None = session.info.get(_EVENT_BUFFER)
    if pending is not None:
        pending.add(row)
        return
    # A plain INSERT: events are written on every message and never read back here.
    session.execute(insert(LeadEvent), row)  # parameters apart: the compiled statement is cached


_EVENT_BUFFER = "twoway.lead_events"


class _Buffer(list[dict[str, Any]]):
    """The buffered events in the order recorded, and by (lead, type) for `pending_events`."""

    def __init__(self) -> None:
        super().__init__()
        self.by_kind: dict[tuple[int, str], list[dict[str, Any]]] = {}

    def add(self, row: dict[str, Any]) -> None:
        self.append(row)
        self.by_kind.setdefault((row["lead_id"], row["type"]), []).append(row)

    def clear(self) -> None:
        super().clear()
        self.by_kind.clear()


def buffer_events(session: Session) -> None:
    """Keep the events this unit of work writes in memory, to be written together (one
    executemany) by `flush_events`: before anything in it reads `lead_events`, and when
    it commits (the session factory's before-commit hook). Ids come out in the order
    the events were recorded, as with one INSERT each."""
    session.info.setdefault(_EVENT_BUFFER, _Buffer())


def queue_events(session: Session, rows: list[dict[str, Any]]) -> None:
    """Record several events at once (rows of `lead_events` columns), buffered or not."""
    pending: _Buffer | None = session.info.get(_EVENT_BUFFER)
    if pending is not None:
        for row in rows:
            pending.add(row)
    elif rows:
        session.execute(insert(LeadEvent), rows)


def pending_events(session: Session, lead_id: int, type_: str) -> list[dict[str, Any]]:
    """The buffered, not yet written events of one lead and type (readers of
    `lead_events` add them to what the table says instead of flushing the buffer)."""
    pending: _Buffer | None = session.info.get(_EVENT_BUFFER)
    return list(pending.by_kind.get((lead_id, type_), ())) if pending is not None else []


_BATCH_FACTS = "twoway.batch_facts"
BATCH_EVENT_TYPES = ("engaged", "soft_bounce")
"""The event types whose presence the inbound lifecycle asks about for nearly every message."""


@dataclass
class _BatchFacts:
    lead_ids: set[int]
    events: set[tuple[int, str]]
    campaigns: dict[int, list[str]]


def prefetch_lead_facts(session: Session, lead_ids: Iterable[int]) -> None:
    """Look up, for the leads of an inbound batch, which of BATCH_EVENT_TYPES each already
    has and the campaigns it is enrolled in: one query each, kept for this unit of work
    (`has_event`, `lead_campaigns`), instead of one query per message. Events only get
    added while it lasts (and those are buffered, see `pending_events`); a lead enrolled
    during it is a new lead, which is not among these."""
    ids = sorted(set(lead_ids))
    facts = _BatchFacts(set(ids), set(), {})
    for i in range(0, len(ids), _CHUNK):
        chunk = ids[i : i + _CHUNK]
        facts.events.update(
            (lead_id, type_)
            for lead_id, type_ in session.execute(
                select(LeadEvent.lead_id, LeadEvent.type)
                .where(LeadEvent.lead_id.in_(chunk), LeadEvent.type.in_(BATCH_EVENT_TYPES))
                .distinct()
            )
        )
        for lead_id, campaign in session.execute(
            select(Enrollment.lead_id, Enrollment.campaign)
            .where(Enrollment.lead_id.in_(chunk))
            .order_by(Enrollment.id)
        ):
            facts.campaigns.setdefault(lead_id, []).append(campaign)
    session.info[_BATCH_FACTS] = facts


def has_event(session: Session, lead_id: int, type_: str) -> bool:
    """Whether the lead's timeline holds an event of this type (written or buffered)."""
    if pending_events(session, lead_id, type_):
        return True
    facts: _BatchFacts | None = session.info.get(_BATCH_FACTS)
    if facts is not None and lead_id in facts.lead_ids and type_ in BATCH_EVENT_TYPES:
        return (lead_id, type_) in facts.events
    found = session.scalar(
        select(LeadEvent.id).where(LeadEvent.lead_id == lead_id, LeadEvent.type == type_).limit(1)
    )
    return found is not None


def lead_campaigns(session: Session, lead_id: int) -> list[str]:
    """The campaigns the lead is enrolled in, oldest enrollment first."""
    facts: _BatchFacts | None = session.info.get(_BATCH_FACTS)
    if facts is not None and lead_id in facts.lead_ids:
        return list(facts.campaigns.get(lead_id, []))
    return list(
        session.scalars(
            select(Enrollment.campaign).where(Enrollment.lead_id == lead_id).order_by(Enrollment.id)
        )
    )


def batch_leads(session: Session) -> set[int]:
    """The leads of the inbound batch this unit of work is processing (see
    `prefetch_lead_facts`); empty outside one."""
    facts: _BatchFacts | None = session.info.get(_BATCH_FACTS)
    return facts.lead_ids if facts is not None else set()


def flush_events(session: Session) -> None:
    """Write the buffered events (see `buffer_events`); a no-op when none are pending."""
    pending: _Buffer | None = session.info.get(_EVENT_BUFFER)
    if pending:
        run_many(session.connection(), LeadEvent, pending)  # Core: no ORM bulk path
        pending.clear()


@dataclass(frozen=True)
class Move:
    """A kind of status change: the statuses it may start from and those it may lead to."""

    sources: frozenset[LeadStatus]
    targets: frozenset[LeadStatus]


_S = LeadStatus
_EVERY = frozenset(LeadStatus)

MOVES: dict[str, Move] = {
    # The worker, on an inbound message or an SMTP refusal:
    "promoted": Move(frozenset({_S.LEAD, _S.HELD, _S.BOUNCED}), frozenset({_S.PROSPECT})),
    "held": Move(frozenset({_S.LEAD, _S.BOUNCED}), frozenset({_S.HELD})),
    "disqualified": Move(frozenset({_S.LEAD, _S.HELD, _S.PROSPECT}), frozenset({_S.DISQUALIFIED})),
    "unsubscribed": Move(_EVERY - {_S.UNSUBSCRIBED}, frozenset({_S.UNSUBSCRIBED})),
    "bounced": Move(_EVERY - {_S.BOUNCED, _S.UNSUBSCRIBED}, frozenset({_S.BOUNCED})),
    # The lead takes back its own one-click unsubscribe (within the undo window):
    "unsubscribe_undone": Move(frozenset({_S.UNSUBSCRIBED}), _EVERY - {_S.UNSUBSCRIBED}),
    # A person (`twoway leads mark`): anything but undoing a lead's request to stop, or
    # giving the worker's own verdict `held`.
    "status": Move(_EVERY - {_S.UNSUBSCRIBED}, _EVERY - {_S.HELD}),
}
"""Every status change there is, by the event type that records it."""


def can_move(event: str, source: LeadStatus, to: LeadStatus) -> bool:
    move = MOVES[event]
    return source in move.sources and to in move.targets


def transition(
    session: Session,
    lead: Lead,
    event: str,
    cause: str,
    at: datetime,
    *,
    to: LeadStatus | None = None,
    detail: dict[str, Any] | None = None,
    inbound_id: int | None = None,
) -> bool:
    """Make the status change `event` (a key of MOVES) and write its event, if MOVES allows it.

    `to` may be left out when the move has one target. Returns whether the status changed:
    False, writing nothing, when the lead already has it or cannot come from where it is.
    A change the CRM hears of (customer, disqualified, unsubscribed, bounced) also records
    its conversion event for the webhooks, in the same unit of work.
    """
    if to is None:
        (to,) = MOVES[event].targets
    source = lead.status
    if source == to or not can_move(event, source, to):
        return False
    lead.status = to
    lead.updated_at = at
    _write_event(session, lead.id, event, cause, at, source, to, detail, inbound_id)
    on_status(session, lead, to, at, cause, inbound_id)
    return True


def bounce_lead(
    session: Session, lead: Lead, now: datetime, cause: str, inbound_id: int | None = None
) -> None:
    """Suppress a lead whose address is dead (hard bounce, 5.1.1 at SMTP, soft limit)."""
    if transition(session, lead, "bounced", cause, now, inbound_id=inbound_id):
        stop_nurture(session, lead.id, now, "the lead's address bounced")


def record_created(
    session: Session, lead: Lead, cause: str, at: datetime, inbound_id: int | None = None
) -> None:
    """The first event of a lead made one by one (referral, unprompted mail)."""
    note_new_lead(session)
    _write_event(session, lead.id, "created", cause, at, None, lead.status, None, inbound_id)


# --- import ----------------------------------------------------------------------------


@dataclass
class Rejected:
    line: int
    email: str
    reason: str


@dataclass
class ImportResult:
    imported: int = 0
    updated: int = 0
    rejected: list[Rejected] = field(default_factory=list)
    enrolled: int = 0
    strict_failed: bool = False
    suppressed: int = 0
    """Rows skipped because the address or its domain is on the do-not-contact list."""

    def as_json(self) -> dict[str, Any]:
        return {
            "imported": self.imported,
            "updated": self.updated,
            "enrolled": self.enrolled,
            "suppressed": self.suppressed,
            "rejected": [
                {"line": r.line, "email": r.email, "reason": r.reason} for r in self.rejected
            ],
            "committed": not self.strict_failed,
        }


def _clean_row(raw: Mapping[str, str | None], source: str | None) -> dict[str, Any]:
    """Validate one CSV row into lead fields; ValueError says what is wrong."""
    row = {(k or "").strip().lower(): (v or "").strip() for k, v in raw.items() if k is not None}
    if None in raw:
        raise ValueError("more fields than the header has columns")
    out: dict[str, Any] = {"email": normalise_email(row.get("email", ""))}
    for col in KNOWN_COLUMNS[1:]:
        value = row.get(col, "")
        if not value:
            continue
        if col in _INT_COLUMNS:
            digits = value.replace(",", "").replace("_", "").replace(" ", "")
            try:
                number = (
                    int(float(digits)) if "." in digits or "e" in digits.lower() else int(digits)
                )
            except ValueError:
                raise ValueError(f"{col} {value!r} is not a number") from None
            if number < 0:
                raise ValueError(f"{col} {value!r} is negative")
            out[col] = number
        elif col == "country":
            out[col] = country_code(value)
        elif col == "timezone":
            try:
                ZoneInfo(value)
            except (ZoneInfoNotFoundError, ValueError):
                raise ValueError(f"timezone {value!r} is not an IANA time zone") from None
            out[col] = value
        else:
            out[col] = value[:300]
    if source and "source" not in out:
        out["source"] = source
    custom = {k: v for k, v in row.items() if k and k not in KNOWN_COLUMNS and v}
    out["custom"] = custom
    return out


_DELIMITERS = (",", ";", "\t", "|")


def _decode(data: bytes) -> str:
    """A CSV file's text: UTF-8 (with or without BOM), UTF-16 (BOM, or the NUL bytes of
    ASCII text without one), else Windows-1252 as spreadsheets on Windows write it."""
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        return data.decode("utf-16", errors="replace")
    head = data[:200]
    if len(head) >= 4 and head.count(0) * 3 >= len(head):  # ASCII text in UTF-16
        return data.decode("utf-16-le" if head[1] == 0 else "utf-16-be", errors="replace")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        return data.decode("cp1252", errors="replace")


def read_csv(path: Path) -> Iterator[tuple[int, dict[str, str | None]]]:
    """Rows with the line number an editor shows (the header is line 1)."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise LeadError(f"{path}: cannot read: {e.strerror or e}") from None
    text = _decode(data)
    header = text.split("\n", 1)[0]
    # The separator the header row uses most: spreadsheets in many locales write `;`,
    # and "export as text" writes tabs.
    delimiter = max(_DELIMITERS, key=header.count) if any(d in header for d in _DELIMITERS) else ","
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter)
    columns = [f.strip() for f in reader.fieldnames or []]
    if "email" not in [c.lower() for c in columns]:
        found = ", ".join(repr(c) for c in columns[:10]) or "none"
        raise LeadError(
            f"{path}:1: the header row needs an 'email' column (columns found: {found})"
        )
    prev_line = 1
    while True:
        try:
            raw = next(reader)
        except StopIteration:
            return
        except csv.Error as e:  # a field over the csv module's limit, or a NUL byte
            raise LeadError(f"{path}:{prev_line + 1}: not a readable CSV row ({e})") from None
        start = prev_line + 1
        prev_line = reader.line_num
        if not any((v or "").strip() for v in raw.values() if isinstance(v, str)):
            continue
        yield start, raw


def import_leads(
    session: Session,
    rows: Iterable[tuple[int, Mapping[str, str | None]]],
    now: datetime,
    *,
    campaign: Campaign | None = None,
    source: str | None = None,
    strict: bool = False,
    progress: Callable[[int], None] | None = None,
) -> ImportResult:
    """Insert or update leads from CSV rows; optionally enroll them in `campaign`.

    Writes into `session` without committing; with `strict` and any rejected row it writes
    nothing and sets `strict_failed`. Later rows for the same address update earlier ones.
    """
    result = ImportResult()
    clean: dict[str, dict[str, Any]] = {}
    seen_lines = 0
    for line, raw in rows:
        seen_lines += 1
        try:
            fields = _clean_row(raw, source)
        except ValueError as e:
            result.rejected.append(Rejected(line, (raw.get("email") or "").strip(), str(e)))
            continue
        email = fields["email"]
        if email in clean:
            result.updated += 1
            merged = clean[email]
            merged["custom"] = {**merged["custom"], **fields.pop("custom")}
            merged.update(fields)
        else:
            clean[email] = fields
        if progress and seen_lines % 1000 == 0:
            progress(seen_lines)
    if progress:
        progress(seen_lines)
    if strict and result.rejected:
        result.strict_failed = True
        return result
    from worker.suppression import suppressed

    for email in suppressed(session, clean):
        del clean[email]
        result.suppressed += 1

    cause = f"import ({source})" if source else "import"
    emails = list(clean)
    # Look every address up before writing anything: on PostgreSQL a lookup after bulk
    # inserts in the same transaction plans with stale statistics (a scan per lookup).
    existing: dict[str, tuple[int, dict[str, Any]]] = {}
    for j in range(0, len(emails), _CHUNK):
        for lead_id, email, custom in session.execute(
            select(Lead.id, Lead.email, Lead.custom).where(Lead.email.in_(emails[j : j + _CHUNK]))
        ):
            existing[email] = (lead_id, custom or {})
    enroll_ids: list[int] = [lead_id for lead_id, _ in existing.values()]
    # In slices, so memory holds the cleaned rows once, not several copies of them.
    for i in range(0, len(emails), _SLICE):
        inserts: list[dict[str, Any]] = []
        updates: list[dict[str, Any]] = []
        for email in emails[i : i + _SLICE]:
            fields = clean.pop(email)
            if email in existing:
                lead_id, custom = existing[email]
                fields.update(id=lead_id, custom={**custom, **fields["custom"]}, updated_at=now)
                if "company" in fields:
                    fields["company_key"] = company_key(fields["company"])
                updates.append(fields)
                continue
            inserts.append(
                {
                    **dict.fromkeys(KNOWN_COLUMNS[1:]),
                    **fields,
                    "company_key": company_key(fields.get("company")),
                    "status": LeadStatus.LEAD,
                    "reply_token": new_token(),
                    "domain": email.rsplit("@", 1)[1],
                    "created_at": now,
                    "updated_at": now,
                }
            )
        result.imported += len(inserts)
        result.updated += len(updates)
        new_ids: list[int] = []
        if inserts:
            new_ids = list(session.scalars(insert(Lead).returning(Lead.id), inserts))
        if updates:
            session.execute(update(Lead), updates)
        if new_ids:
            session.execute(
                insert(LeadEvent),
                [
                    {"lead_id": lid, "at": now, "type": "created", "from_status": None,
                     "to_status": LeadStatus.LEAD, "cause": cause, "detail": {}, "inbound_id": None}
                    for lid in new_ids
                ],
            )  # fmt: skip
        enroll_ids += new_ids
    if campaign is not None:
        result.enrolled = enroll(session, enroll_ids, campaign, now)
    return result


def enroll(session: Session, lead_ids: list[int], campaign: Campaign, now: datetime) -> int:
    """Enroll leads in a campaign (a no-op for leads already in it); returns how many were new.

    Step 1 becomes due after its delay; the send window is applied when it is queued.
    """
    from worker.schedule import add_delay

    already: set[int] = set()
    for i in range(0, len(lead_ids), _CHUNK):
        chunk = lead_ids[i : i + _CHUNK]
        already.update(
            session.scalars(
                select(Enrollment.lead_id).where(
                    Enrollment.campaign == campaign.name, Enrollment.lead_id.in_(chunk)
                )
            )
        )
    due = add_delay(now, campaign.steps[0].delay, campaign.timezone)
    rows = [
        {
            "lead_id": lid,
            "campaign": campaign.name,
            "step": 0,
            "state": EnrollmentState.ACTIVE,
            "next_due": due,
            "paused_until": None,
            "created_at": now,
            "updated_at": now,
        }
        for lid in dict.fromkeys(lead_ids)
        if lid not in already
    ]
    for i in range(0, len(rows), 5000):
        session.execute(insert(Enrollment), rows[i : i + 5000])
    return len(rows)


def lead_fields(lead: Lead) -> LeadBlock:
    """The `lead` mapping templates see."""
    return {
        "email": lead.email,
        "first_name": lead.first_name or "",
        "last_name": lead.last_name or "",
        "company": lead.company or "",
        "title": lead.title or "",
        "industry": lead.industry or "",
        "company_size": lead.company_size,
        "annual_revenue": lead.annual_revenue,
        "country": lead.country or "",
        "timezone": lead.timezone or "",
        "source": lead.source or "",
        "custom": dict(lead.custom or {}),
    }


# --- looking at leads ------------------------------------------------------------------


def iso(at: datetime | None) -> str | None:
    """An instant as JSON shows it: ISO 8601 UTC to the second, `Z` suffix."""
    return at.replace(microsecond=0).isoformat().replace("+00:00", "Z") if at else None


def get_lead(session: Session, email: str) -> Lead:
    """The lead with this address, or with this reply token (what an unsubscribe link carries)."""
    if "@" not in email and re.fullmatch(r"[a-z2-7]{16}", email.strip().lower()):
        by_token = session.scalar(select(Lead).where(Lead.reply_token == email.strip().lower()))
        if by_token is None:
            raise LeadError(f"no lead with the token {email.strip()}")
        return by_token
    try:
        key = normalise_email(email)
    except ValueError as e:
        raise LeadError(str(e)) from None
    lead = session.scalar(select(Lead).where(Lead.email == key))
    if lead is None:
        raise LeadError(f"no lead with the address {key}")
    return lead


def list_leads(
    session: Session, status: str | None = None, limit: int | None = None
) -> list[dict[str, Any]]:
    """The rows of `twoway leads list --json`."""
    q = select(Lead).order_by(Lead.id)
    if status is not None:
        q = q.where(Lead.status == parse_status(status))
    if limit is not None:
        q = q.limit(limit)
    return lead_rows(session, list(session.scalars(q)))


def lead_rows(session: Session, leads: list[Lead]) -> list[dict[str, Any]]:
    """A row of `leads list --json` for each lead: its fields and its campaigns."""
    campaigns: dict[int, list[str]] = {}
    ids = [lead.id for lead in leads]
    for i in range(0, len(ids), _CHUNK):
        for lead_id, name in session.execute(
            select(Enrollment.lead_id, Enrollment.campaign).where(
                Enrollment.lead_id.in_(ids[i : i + _CHUNK])
            )
        ):
            campaigns.setdefault(lead_id, []).append(name)
    return [
        {
            "email": lead.email,
            "status": lead.status,
            "owner": lead.owner,
            "score": lead.score,
            "first_name": lead.first_name,
            "last_name": lead.last_name,
            "company": lead.company,
            "campaigns": sorted(campaigns.get(lead.id, [])),
        }
        for lead in leads
    ]


def show_lead(session: Session, email: str) -> dict[str, Any]:
    """The object of `twoway leads show EMAIL --json`: profile, timeline, enrollments, mail."""
    lead = get_lead(session, email)
    events = session.scalars(
        select(LeadEvent).where(LeadEvent.lead_id == lead.id).order_by(LeadEvent.at, LeadEvent.id)
    )
    enrollments = session.scalars(
        select(Enrollment).where(Enrollment.lead_id == lead.id).order_by(Enrollment.id)
    )
    outbound = session.scalars(
        select(OutboundMessage)
        .where(OutboundMessage.lead_id == lead.id)
        .order_by(OutboundMessage.id)
    )
    inbound = session.scalars(
        select(InboundMessage).where(InboundMessage.lead_id == lead.id).order_by(InboundMessage.id)
    )
    messages: list[dict[str, Any]] = [
        {
            "direction": "out",
            "kind": o.kind,
            "message_id": o.message_id,
            "at": iso(o.sent_at or o.created_at),
            "match": None,
            "subject": o.subject,
            "status": o.status,
            "template": o.template,
            "to": o.to_addr,
        }
        for o in outbound
    ]
    messages += [
        {
            "direction": "in",
            "kind": m.kind,
            "message_id": m.message_id,
            "at": iso(m.received_at),
            "match": m.match_method,
            "subject": m.subject,
            "from": m.from_addr,
            "intent": m.intent,
            "reason": m.reason,
            "reply_text": m.reply_text,
            "bounce": m.bounce,
        }
        for m in inbound
    ]
    # At one instant (a reply and the handoff it caused), what came in goes first.
    messages.sort(key=lambda m: (m["at"] or "", m["direction"] == "out"))
    referred_by = session.get(Lead, lead.referred_by_id) if lead.referred_by_id else None
    from worker.campaigns import paused_campaigns

    paused = paused_campaigns(session)
    return {
        "email": lead.email,
        "first_name": lead.first_name,
        "last_name": lead.last_name,
        "company": lead.company,
        "title": lead.title,
        "industry": lead.industry,
        "company_size": lead.company_size,
        "annual_revenue": lead.annual_revenue,
        "country": lead.country,
        "timezone": lead.timezone,
        "source": lead.source,
        "custom": lead.custom or {},
        "status": lead.status,
        "owner": lead.owner,
        "score": lead.score,
        "referred_by": referred_by.email if referred_by else None,
        "created_at": iso(lead.created_at),
        "qualification": lead.qualification,
        "events": [
            {
                "at": iso(e.at),
                "type": e.type,
                "from_status": e.from_status,
                "to_status": e.to_status,
                "cause": e.cause,
                "detail": e.detail or {},
            }
            for e in events
        ],
        "enrollments": [
            {
                "campaign": en.campaign,
                "state": en.state,
                "step": en.step,
                "next_due": iso(en.next_due),
                "paused_until": iso(en.paused_until),
                "waiting": (
                    f"campaign {en.campaign} is paused"
                    if en.campaign in paused and en.state in ("active", "paused")
                    else en.waiting
                ),
            }
            for en in enrollments
        ],
        "messages": messages,
    }


def parse_status(text: str) -> LeadStatus:
    """The lead status a user typed, or LeadError naming the valid ones."""
    try:
        return LeadStatus(text.strip().lower())
    except ValueError:
        pass
    hint = " (renamed `held`: waits for a person after a reply below the minimum fit)"
    raise LeadError(
        f"unknown status {text!r}; use one of {', '.join(LeadStatus)}"
        + (hint if text.strip().lower() == "engaged" else "")
    )


def mark_lead(session: Session, email: str, status: str, now: datetime, reason: str | None) -> Lead:
    """A manual lifecycle change by a user; stops nurture unless the lead goes back to `lead`.

    LeadError if the status is unknown or the move is one nobody may make by hand.
    """
    to = parse_status(status)
    lead = get_lead(session, email)
    if lead.status != to and not can_move("status", lead.status, to):
        why = (
            "the lead asked to stop; only the lead can take that back"
            if lead.status == LeadStatus.UNSUBSCRIBED
            else f"{to} is the worker's verdict on a reply, not set by hand"
        )
        raise LeadError(f"cannot move {lead.email} from {lead.status} to {to}: {why}")
    cause = f"user: {reason}" if reason else "user"
    if transition(session, lead, "status", cause, now, to=to) and to != LeadStatus.LEAD:
        stop_nurture(session, lead.id, now, f"lead marked {to}")
    return lead


# Built once (they run for nearly every reply) and run on the connection: the ORM's
# update path costs several times the statement. `forget_loaded` stands in for the ORM's
# synchronisation of the rows a session has loaded.
_STOP_NURTURE = enrollments("stopped", Enrollment.lead_id == bindparam("lead")).values(
    next_due=None, updated_at=bindparam("at")
)
_CANCEL_QUEUED = outbox(
    "cancelled",
    OutboundMessage.lead_id == bindparam("lead"),
    OutboundMessage.kind == bindparam("of_kind"),
).values(last_error=bindparam("why"))


def stop_nurture(session: Session, lead_id: int, now: datetime, why: str) -> int:
    """Stop active/paused enrollments and cancel queued nurture sends; returns sends cancelled."""
    if run(core(session), _STOP_NURTURE, {"lead": lead_id, "at": now}).rowcount:
        forget_loaded(session, Enrollment, lead_id)
    return cancel_queued(session, lead_id, "nurture", why)


def cancel_queued(session: Session, lead_id: int, kind: str, why: str) -> int:
    """Cancel a lead's queued sends of one kind (nurture, followup); returns how many."""
    params = {"lead": lead_id, "of_kind": kind, "why": why}
    n = int(run(core(session), _CANCEL_QUEUED, params).rowcount or 0)
    if n:
        forget_loaded(session, OutboundMessage, lead_id)
    cancelled = OUTBOX_MOVES["cancelled"]
    for row in deferred_rows(session, OutboundMessage):  # queued earlier in this batch
        if row["lead_id"] == lead_id and row["kind"] == kind and row["status"] in cancelled.sources:
            row["status"], row["last_error"] = cancelled.target("cancelled", None), why
            n += 1
    return n


def forget_loaded(
    session: Session, model: type[Enrollment | OutboundMessage], lead_id: int
) -> None:
    """Expire the lead's rows of `model` this session holds, after an UPDATE it did not see."""
    held = session.identity_map
    # Identity keys start with the class: only the model's objects are looked at (an
    # inbound batch holds hundreds of other rows).
    for key in [k for k in held.keys() if k[0] is model]:  # noqa: SIM118 (no __iter__ typed)
        obj = held.get(key)
        if obj is not None and obj.__dict__.get("lead_id") == lead_id:
            session.expire(obj)


def status_counts(session: Session) -> dict[str, int]:
    counts = {str(s): 0 for s in LeadStatus}
    for status, n in session.execute(select(Lead.status, func.count()).group_by(Lead.status)):
        counts[status] = n
    return counts


def import_file(
    app: App,
    path: Path,
    campaign: str | None = None,
    *,
    source: str | None = None,
    strict: bool = False,
    progress: Callable[[int], None] | None = None,
) -> ImportResult:
    """`twoway leads import`: `import_leads` over a CSV file in one transaction, enrolling
    the leads in the campaign named `campaign`; with `strict`, nothing is kept when a row
    is rejected. The planner's statistics are refreshed after a change."""
    camp = campaign_for(app.config, campaign)
    with app.transaction() as session:
        result = import_leads(
            session,
            read_csv(path),
            app.now(),
            campaign=camp,
            source=source,
            strict=strict,
            progress=progress,
        )
        if result.strict_failed:
            session.rollback()
    if result.imported or result.updated:
        refresh_statistics(app.engine)  # thousands of new rows change the plans
    return result


def campaign_for(config: Config, name: str | None) -> Campaign | None:
    if name is None:
        return None
    try:
        return config.campaign(name)
    except KeyError:
        known = ", ".join(c.name for c in config.campaigns) or "none configured"
        raise LeadError(f"no campaign named {name!r} (campaigns: {known})") from None
