"""The database schema: leads, enrollments, outbound and inbound mail, sync state, timeline.

Every datetime is stored as naive UTC and handed back timezone-aware (UTC), so SQLite and
PostgreSQL behave the same.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, date, datetime
from enum import StrEnum
from typing import Any, ClassVar

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Date,
    DateTime,
    Dialect,
    Enum,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, validates


class LeadStatus(StrEnum):
    """Where a lead stands (`leads.status`). Only `leads.transition` moves it."""

    LEAD = "lead"
    """Receiving nurture emails."""
    HELD = "held"
    """Replied, but below the minimum fit (`qualification.require_fit`): a person decides."""
    PROSPECT = "prospect"
    UNSUBSCRIBED = "unsubscribed"
    BOUNCED = "bounced"
    DISQUALIFIED = "disqualified"
    CUSTOMER = "customer"


SUPPRESSED = frozenset({LeadStatus.UNSUBSCRIBED, LeadStatus.BOUNCED, LeadStatus.DISQUALIFIED})
"""Statuses that receive nothing from us any more but what a rep writes by hand."""


class EnrollmentState(StrEnum):
    """Where a lead stands in one campaign (`enrollments.state`)."""

    ACTIVE = "active"
    PAUSED = "paused"
    """Until `paused_until` (an out-of-office), or with none until a person acts (account)."""
    COMPLETED = "completed"
    STOPPED = "stopped"


LIVE_ENROLLMENT = (EnrollmentState.ACTIVE, EnrollmentState.PAUSED)
"""Enrollments that may still send: what stopping nurture stops."""


class OutboxState(StrEnum):
    """Where an outbound email stands (`outbound_messages.status`); see worker.outbox."""

    QUEUED = "queued"
    SENDING = "sending"
    SENT = "sent"
    FAILED = "failed"
    CANCELLED = "cancelled"
    UNKNOWN = "unknown"
    """Found `sending` after a crash and not settled by the Sent folder: a person decides."""


def _states(enum: type[StrEnum]) -> Enum:
    """A VARCHAR(20) column holding an enum's values; an unknown value is an error both ways."""
    return Enum(
        enum,
        native_enum=False,
        create_constraint=False,
        length=20,
        validate_strings=True,
        values_callable=lambda e: [m.value for m in e],
    )


class UTCDateTime(TypeDecorator[datetime]):
    """A datetime stored as naive UTC and returned aware."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the database; use UTC-aware datetimes")
        return value.astimezone(UTC).replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        return None if value is None else value.replace(tzinfo=UTC)

    # On SQLite a datetime is text, in SQLAlchemy's format (2026-12-03 14:05:00.000000,
    # which sorts as time does): these write and read it in one step, without the
    # generic chain of this type's conversion and then the dialect's (a reply's handoff
    # reads and writes dozens of them).

    def bind_processor(self, dialect: Dialect) -> Callable[[Any], Any] | None:
        if dialect.name != "sqlite":
            return super().bind_processor(dialect)
        return _sqlite_bind

    def result_processor(self, dialect: Dialect, coltype: Any) -> Callable[[Any], Any] | None:
        if dialect.name != "sqlite":
            return super().result_processor(dialect, coltype)
        return _sqlite_result


def _sqlite_bind(value: datetime | None) -> str | None:
    if value is None:
        return None
    if value.tzinfo is None:
        raise ValueError("naive datetime given to the database; use UTC-aware datetimes")
    return value.astimezone(UTC).isoformat(" ", "microseconds")[:26]


def _sqlite_result(value: str | None) -> datetime | None:
    return None if value is None else datetime.fromisoformat(value).replace(tzinfo=UTC)


class Base(DeclarativeBase):
    type_annotation_map: ClassVar[dict[Any, Any]] = {
        datetime: UTCDateTime,
        dict[str, Any]: JSON,
        date: Date,
    }


def company_key(name: str | None) -> str | None:
    """A company name as accounts compare it: trimmed, inner spaces collapsed, casefolded
    (Python's notion of case, so "ÉCOLE" and "école" meet on SQLite too)."""
    key = " ".join((name or "").split()).casefold()[:300]
    return key or None


class Lead(Base):
    __tablename__ = "leads"
    __table_args__ = (
        # Colleagues (same domain) and account owners (same domain or company, with owner).
        Index("ix_leads_domain_owner", "domain", "owner"),
        Index("ix_leads_company_key_owner", "company_key", "owner"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    email: Mapped[str] = mapped_column(String(320), unique=True)
    first_name: Mapped[str | None] = mapped_column(String(200))
    last_name: Mapped[str | None] = mapped_column(String(200))
    company: Mapped[str | None] = mapped_column(String(300))
    company_key: Mapped[str | None] = mapped_column(String(300))
    """`company_key(company)`, kept in step by the ORM (Core writers set it themselves)."""
    title: Mapped[str | None] = mapped_column(String(300))
    industry: Mapped[str | None] = mapped_column(String(200))
    company_size: Mapped[int | None] = mapped_column(Integer)
    annual_revenue: Mapped[int | None] = mapped_column(BigInteger)
    country: Mapped[str | None] = mapped_column(String(2))
    timezone: Mapped[str | None] = mapped_column(String(64))
    source: Mapped[str | None] = mapped_column(String(100))
    custom: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    status: Mapped[LeadStatus] = mapped_column(
        _states(LeadStatus), default=LeadStatus.LEAD, index=True
    )
    owner: Mapped[str | None] = mapped_column(String(320), index=True)
    score: Mapped[int | None] = mapped_column(Integer)
    qualification: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    reply_token: Mapped[str] = mapped_column(String(32), unique=True)
    domain: Mapped[str] = mapped_column(String(255))
    referred_by_id: Mapped[int | None] = mapped_column(ForeignKey("leads.id", ondelete="SET NULL"))
    created_at: Mapped[datetime]
    updated_at: Mapped[datetime]

    @validates("company")
    def _keep_company_key(self, _key: str, value: str | None) -> str | None:
        self.company_key = company_key(value)
        return value


class Enrollment(Base):
    __tablename__ = "enrollments"
    __table_args__ = (
        UniqueConstraint("lead_id", "campaign"),
        Index("ix_enrollments_due", "state", "next_due"),
        Index("ix_enrollments_lead_state", "lead_id", "state"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    lead_id: Mapped[int] = mapped_column(ForeignKey("leads.id", ondelete="CASCADE"))
    campaign: Mapped[str] = mapped_column(String(200))
    step: Mapped[int] = mapped_column(Integer, default=0)
    """Index of the next step to send (== number of steps queued so far)."""
    state: Mapped[EnrollmentState] = mapped_column(
        _states(EnrollmentState), default=EnrollmentState.ACTIVE
    )
    next_due: Mapped[datetime | None]
    paused_until: Mapped[datetime | None]
    waiting: Mapped[str | None] = mapped_column(Text)
    """Why the next step waits beyond its delay (touch cap, minimum gap, paused campaign)."""
    created_at: Mapped[datetime]
    updated_at: Mapped[datetime]


class OutboundMessage(Base):
    __tablename__ = "outbound_messages"
    __table_args__ = (
        Index("ix_outbound_queue", "status", "next_attempt_at"),
        Index("ix_outbound_lead_status", "lead_id", "status"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    idempotency_key: Mapped[str] = mapped_column(String(200), unique=True)
    kind: Mapped[str] = mapped_column(String(20))  # nurture | handoff | followup
    lead_id: Mapped[int] = mapped_column(ForeignKey("leads.id", ondelete="CASCADE"))
    enrollment_id: Mapped[int | None] = mapped_column(
        ForeignKey("enrollments.id", ondelete="SET NULL")
    )
    campaign: Mapped[str | None] = mapped_column(String(200))
    step: Mapped[int | None] = mapped_column(Integer)
    template: Mapped[str] = mapped_column(String(200))
    variant: Mapped[int | None] = mapped_column(Integer)
    """Which of a step's templates this lead got (0-based), when the step has variants."""
    mailbox: Mapped[str | None] = mapped_column(String(200))
    message_id: Mapped[str] = mapped_column(String(255), unique=True)
    reply_token: Mapped[str | None] = mapped_column(String(32))
    to_addr: Mapped[str] = mapped_column(String(320))
    subject: Mapped[str | None] = mapped_column(Text)
    in_reply_to: Mapped[str | None] = mapped_column(String(998))
    inbound_id: Mapped[int | None] = mapped_column(Integer)
    """The inbound message that caused this send (handoff, follow-up); no FK: avoids a cycle."""
    status: Mapped[OutboxState] = mapped_column(_states(OutboxState), default=OutboxState.QUEUED)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime]
    last_error: Mapped[str | None] = mapped_column(Text)
    context: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime]
    sent_at: Mapped[datetime | None] = mapped_column(UTCDateTime, index=True)


class InboundMessage(Base):
    __tablename__ = "inbound_messages"
    __table_args__ = (
        UniqueConstraint("mailbox", "folder", "uidvalidity", "uid"),
        # One row per message per mailbox, however many folders or workers saw it.
        UniqueConstraint("mailbox", "message_id", name="uq_inbound_dedupe"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    mailbox: Mapped[str] = mapped_column(String(200))
    folder: Mapped[str] = mapped_column(String(300))
    uidvalidity: Mapped[int] = mapped_column(BigInteger)
    uid: Mapped[int] = mapped_column(BigInteger)
    message_id: Mapped[str] = mapped_column(String(998))
    """The Message-ID, or `sha256:<hex>` of the raw bytes when the message has none."""
    from_addr: Mapped[str | None] = mapped_column(String(320))
    subject: Mapped[str | None] = mapped_column(Text)
    sent_date: Mapped[datetime | None]
    kind: Mapped[str | None] = mapped_column(String(20), index=True)
    reason: Mapped[str | None] = mapped_column(Text)
    intent: Mapped[str | None] = mapped_column(String(20))
    reply_text: Mapped[str | None] = mapped_column(Text)
    bounce: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    return_date: Mapped[date | None]
    match_method: Mapped[str | None] = mapped_column(String(40))
    lead_id: Mapped[int | None] = mapped_column(
        ForeignKey("leads.id", ondelete="SET NULL"), index=True
    )
    outbound_id: Mapped[int | None] = mapped_column(
        ForeignKey("outbound_messages.id", ondelete="SET NULL")
    )
    raw: Mapped[bytes | None] = mapped_column(LargeBinary)
    """Kept for messages a person may need again (replies: the handoff attaches them)."""
    received_at: Mapped[datetime]


class Handoff(Base):
    """Speed to lead: one prospect handed to one rep, and when (if) they answered.

    Opened when a prospect is handed to a rep (promotion, or a reassignment on escalation);
    `answered_at` is the rep's first answer to the prospect; `closed_at` ends a handoff that
    was not answered by this rep (reassigned). `reminded_at` / `escalated_at` make the
    reminder and the escalation happen once.
    """

    __tablename__ = "handoffs"
    __table_args__ = (Index("ix_handoffs_open", "answered_at", "closed_at"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    lead_id: Mapped[int] = mapped_column(ForeignKey("leads.id", ondelete="CASCADE"), index=True)
    rep: Mapped[str] = mapped_column(String(320), index=True)
    inbound_id: Mapped[int | None] = mapped_column(Integer)
    """The prospect's message that caused the handoff."""
    handed_at: Mapped[datetime]
    sla_due: Mapped[datetime | None]
    escalate_due: Mapped[datetime | None]
    reminded_at: Mapped[datetime | None]
    escalated_at: Mapped[datetime | None]
    answered_at: Mapped[datetime | None]
    answered_by: Mapped[str | None] = mapped_column(String(320))
    closed_at: Mapped[datetime | None]
    closed_reason: Mapped[str | None] = mapped_column(Text)


class MailboxState(Base):
    __tablename__ = "mailbox_state"
    __table_args__ = (UniqueConstraint("mailbox", "folder"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    mailbox: Mapped[str] = mapped_column(String(200))
    folder: Mapped[str] = mapped_column(String(300))
    uidvalidity: Mapped[int | None] = mapped_column(BigInteger)
    last_uid: Mapped[int] = mapped_column(BigInteger, default=0)
    last_sync: Mapped[datetime | None]
    last_error: Mapped[str | None] = mapped_column(Text)
    last_error_at: Mapped[datetime | None]
    idle: Mapped[bool] = mapped_column(Boolean, default=False)


class Quarantine(Base):
    __tablename__ = "quarantine"

    id: Mapped[int] = mapped_column(primary_key=True)
    mailbox: Mapped[str] = mapped_column(String(200))
    folder: Mapped[str] = mapped_column(String(300))
    uidvalidity: Mapped[int] = mapped_column(BigInteger)
    uid: Mapped[int] = mapped_column(BigInteger)
    raw: Mapped[bytes] = mapped_column(LargeBinary)
    reason: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime]
    resolved_at: Mapped[datetime | None]


UNVERIFIED_EVENTS = ("unverified_bounce", "unverified_reply", "unverified_unsubscribe")
"""A bounce, reply or unsubscribe recorded on a lead and not acted on (lifecycle.untrusted)."""
UNVERIFIED_WHERE = "type IN ('unverified_bounce', 'unverified_reply', 'unverified_unsubscribe')"
"""The predicate of the partial index that counts them: a query must spell it exactly so
for SQLite and PostgreSQL to use the index (a bound parameter would not match)."""


class LeadEvent(Base):
    """The append-only timeline of a lead: every status change and notable fact."""

    __tablename__ = "lead_events"
    __table_args__ = (
        Index("ix_lead_events_lead_type", "lead_id", "type", "at"),
        # Only the rare unverified events: `status` counts them without a scan of the
        # timeline, and other events cost no extra index write.
        Index(
            "ix_lead_events_unverified",
            "type",
            "at",
            sqlite_where=text(UNVERIFIED_WHERE),
            postgresql_where=text(UNVERIFIED_WHERE),
        ),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    lead_id: Mapped[int] = mapped_column(ForeignKey("leads.id", ondelete="CASCADE"))
    at: Mapped[datetime]
    type: Mapped[str] = mapped_column(String(40))
    from_status: Mapped[LeadStatus | None] = mapped_column(_states(LeadStatus))
    to_status: Mapped[LeadStatus | None] = mapped_column(_states(LeadStatus))
    cause: Mapped[str] = mapped_column(Text)
    detail: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    inbound_id: Mapped[int | None] = mapped_column(
        ForeignKey("inbound_messages.id", ondelete="SET NULL")
    )


class MailboxLease(Base):
    """Which worker reads a mailbox now. A lease not renewed before `expires_at` is free."""

    __tablename__ = "mailbox_leases"

    mailbox: Mapped[str] = mapped_column(String(200), primary_key=True)
    holder: Mapped[str] = mapped_column(String(200))
    acquired_at: Mapped[datetime]
    heartbeat_at: Mapped[datetime]
    expires_at: Mapped[datetime]


class WorkerHeartbeat(Base):
    """One row per running worker process, for `twoway status`."""

    __tablename__ = "worker_heartbeats"

    worker: Mapped[str] = mapped_column(String(200), primary_key=True)
    host: Mapped[str] = mapped_column(String(255))
    pid: Mapped[int] = mapped_column(Integer)
    started_at: Mapped[datetime]
    heartbeat_at: Mapped[datetime]


class RepAssignments(Base):
    """How many prospects each rep was assigned per UTC day: round robin and daily caps
    read these counters instead of counting events."""

    __tablename__ = "rep_assignments"

    rep: Mapped[str] = mapped_column(String(320), primary_key=True)
    day: Mapped[date] = mapped_column(Date, primary_key=True)
    assigned: Mapped[int] = mapped_column(Integer, default=0)


class CampaignState(Base):
    """A campaign's pause switch, set by `twoway campaigns pause/resume` (no row: running)."""

    __tablename__ = "campaign_states"

    campaign: Mapped[str] = mapped_column(String(200), primary_key=True)
    paused: Mapped[bool] = mapped_column(Boolean, default=False)
    changed_at: Mapped[datetime]
    changed_by: Mapped[str | None] = mapped_column(String(200))


class Suppression(Base):
    """A do-not-contact entry: one address, or a whole domain written `@domain`."""

    __tablename__ = "suppressions"

    id: Mapped[int] = mapped_column(primary_key=True)
    pattern: Mapped[str] = mapped_column(String(320), unique=True)
    reason: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime]


class CrmEvent(Base):
    """A conversion record for the CRM, written with the change that caused it.

    `body` is the exact JSON sent to every webhook: fixed once, so one idempotency key
    (`key`) never carries two different bodies, whatever crashes and retries happen.
    """

    __tablename__ = "crm_events"
    __table_args__ = (Index("ix_crm_events_fanout", "fanned_out", "id"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    key: Mapped[str] = mapped_column(String(64), unique=True)
    type: Mapped[str] = mapped_column(String(40))
    lead_id: Mapped[int | None] = mapped_column(
        ForeignKey("leads.id", ondelete="SET NULL"), index=True
    )
    at: Mapped[datetime]
    body: Mapped[str] = mapped_column(Text)
    fanned_out: Mapped[bool] = mapped_column(Boolean, default=False)


class WebhookDelivery(Base):
    """One event to one webhook endpoint: pending -> sending -> delivered | dead.

    Claimed like outbox rows (conditional UPDATE, a lease in `next_attempt_at`); a row
    found `sending` past its lease is retried: delivery is at least once, deduplicated by
    the receiver with the event's idempotency key.
    """

    __tablename__ = "webhook_deliveries"
    __table_args__ = (
        UniqueConstraint("event_id", "endpoint"),
        Index("ix_webhook_queue", "status", "next_attempt_at"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    event_id: Mapped[int] = mapped_column(ForeignKey("crm_events.id", ondelete="CASCADE"))
    endpoint: Mapped[str] = mapped_column(String(200))
    status: Mapped[str] = mapped_column(String(20), default="pending")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime]
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime]
    delivered_at: Mapped[datetime | None]
