"""The outbox: every email twoway sends is a row, claimed, re-checked, sent once.

States: queued -> sending -> sent | failed | cancelled, and `unknown` for a row found in
`sending` after a crash that the Sent folder cannot settle (never silently resent).

Due rows are picked a batch at a time (`_due_batch`; on PostgreSQL locked with `FOR UPDATE
SKIP LOCKED` and held back from other workers for a lease, in that one transaction), then
sent one row at a time, each step its own short transaction, none open across SMTP:
1. `prepare`: decide (cancel, or wait for a cap, a pause, the per-domain cap) and build
   the message; nothing claimed.
2. `Mailer.begin`: MAIL FROM and RCPT TO, and while the server answers RCPT (once it
   has accepted MAIL FROM), `claim`: one conditional UPDATE `queued -> sending`. Lost to
   another worker: RSET. A refusal is recorded like any failed attempt.
3. `Mailer.data`: DATA; then `record` the outcome (on PostgreSQL a `sent` goes in the
   next email's claim statement).
So a row is `sending` only once its SMTP transaction has begun: a crash strands at most
the message in flight, and only one whose SMTP transaction had begun; a crash before
MAIL FROM's answer leaves the row queued. Temporary failures wait in the row
(`attempts`, `next_attempt_at`).
"""

from __future__ import annotations

import functools
import logging
import random
from collections.abc import Callable, Collection, Iterable
from concurrent.futures import Future
from dataclasses import dataclass
from datetime import datetime, timedelta
from email.message import EmailMessage
from typing import Any

from sqlalchemy import (
    ColumnElement,
    Connection,
    CursorResult,
    Select,
    Update,
    and_,
    bindparam,
    func,
    or_,
    select,
    update,
)
from sqlalchemy.exc import DBAPIError, SQLAlchemyError
from sqlalchemy.orm import Session

from worker import handoffs
from worker.app import App
from worker.bounces import address_is_dead
from worker.campaigns import paused_campaigns
from worker.compose import (
    Attachment,
    check_size,
    clean_text,
    compose,
    compose_wire_steps,
    is_message_id,
    new_message_id,
    reply_address,
    subject_text,
    unsubscribe_targets,
)
from worker.config import Config
from worker.contexts import (
    FollowupFacts,
    HandoffFacts,
    Kind,
    NudgeFacts,
    RepCopyFacts,
    common,
    context_for,
    original_facts,
    sender_block,
    unsubscribe_url,
)
from worker.db import DriverResult, deferring, insert_row, run, run_alone
from worker.leads import bounce_lead, lead_fields
from worker.mailer import Mailer, SendResult
from worker.models import (
    SUPPRESSED,
    CampaignState,
    Enrollment,
    EnrollmentState,
    Handoff,
    InboundMessage,
    Lead,
    LeadStatus,
    OutboundMessage,
    OutboxState,
    Suppression,
    UTCDateTime,
)
from worker.pacing import touch_wait
from worker.rendering import Renderer
from worker.states import OUTBOX_MOVES, move_outbox, outbox
from worker.steps import Steps, drain
from worker.suppression import suppressed

logger = logging.getLogger(__name__)
MAX_ATTACHED_ORIGINAL = 10 * 1024 * 1024
"""A prospect's original larger than this is not attached to the handoff (SMTP size caps)."""
CLAIM_BATCH = 100
"""Rows a pass decides and sends per read (`_load`: a handful of queries for the whole
batch); each is still claimed alone, and what was not reached is released."""
MESSAGE_ID_LENGTH = 255
"""The outbox's `message_id` column (ours are about 60 characters)."""

MailerFor = Callable[[str], Mailer | None]
"""The Mailer of one SMTP account ("default" or a mailbox's name); None: there is none."""

SentCopy = Callable[[str | None, bytes], None]
"""Append a sent message to the mailbox's Sent folder: (mailbox name, raw bytes)."""


@dataclass
class Prepared:
    """A due row that may go out now, built but not yet claimed (still `queued`)."""

    row_id: int
    lead_id: int
    kind: str
    to_addr: str
    mailbox: str | None
    subject: str
    raw: bytes
    """The message as it goes to SMTP, written once before the claim."""
    envelope_from: str
    attempts: int
    """The row's `attempts` when it was prepared: the claim checks nobody moved it since."""
    reserved_until: datetime | None
    """Several workers (PostgreSQL): the row was held back from the others until then."""
    transport: str = "default"
    """Which SMTP account sends it: "default" (the top-level smtp) or a mailbox's own."""


def enqueue(
    s: Session,
    config: Config,
    kind: Kind,
    key: str,
    lead: Lead,
    template: str,
    at: datetime,
    *,
    to_addr: str | None = None,
    due: datetime | None = None,
    mailbox: str | None = None,
    facts: HandoffFacts | FollowupFacts | RepCopyFacts | NudgeFacts | None = None,
    enrollment_id: int | None = None,
    campaign: str | None = None,
    step: int | None = None,
    variant: int | None = None,
    in_reply_to: str | None = None,
    inbound_id: int | None = None,
    message_id: str | None = None,
) -> OutboundMessage | None:
    """Queue one email: the only way a row enters the outbox (the caller's transaction).

    `key` is the row's idempotency key (unique: `nurture:<enrollment>:<step>`,
    `handoff:<inbound>`, `followup:<inbound>`); the Message-ID is chosen now, before any
    attempt. It goes to the lead unless `to_addr` says otherwise, from `mailbox`'s identity,
    not before `due` (default: `at`). `facts` is the handoff's or follow-up's part of its
    template context (worker.contexts); a nurture step's is built when it is sent.

    `message_id` is the Message-ID the message goes out with when it is not one of ours
    (the reply-ready copy keeps the prospect's): the row carries it, so a send cut short
    by a crash is found in the Sent folder by it. It is used only if it fits the column
    and no other row has it (a second copy of one message: a reassignment, or the same
    message in two mailboxes); otherwise the row gets one of ours, as by default.
    """
    if message_id is not None:
        message_id = message_id.strip().strip("<>")
        if not (is_message_id(message_id) and len(message_id) <= MESSAGE_ID_LENGTH) or (
            _message_id_taken(s, message_id)
        ):
            message_id = None
    message_id = message_id or new_message_id(config.sender.domain)
    known: tuple[set[str], set[str]] | None = s.info.get(_OUTBOUND_IDS)
    if known is not None:
        known[0].add(message_id)
        known[1].add(message_id)
    values: dict[str, Any] = {
        "idempotency_key": key,
        "kind": kind,
        "lead_id": lead.id,
        "enrollment_id": enrollment_id,
        "campaign": campaign,
        "step": step,
        "template": template,
        "variant": variant,
        "mailbox": mailbox,
        "message_id": message_id,
        # Mail to the team carries no reply token (a reply to it is the rep's own mail),
        # except the reply-ready copy: its Reply-To brings the rep's answer back to us.
        "reply_token": lead.reply_token if kind in ("nurture", "followup", "rep_copy") else None,
        "to_addr": to_addr or lead.email,
        "in_reply_to": in_reply_to,
        "inbound_id": inbound_id,
        "status": OutboxState.QUEUED,
        "attempts": 0,
        "next_attempt_at": due or at,
        "last_error": None,  # (every deferred row names the same columns: one executemany)
        "context": dict(facts or {}),
        "created_at": at,
    }
    if deferring(s):  # an inbound batch: written with the message's other emails
        insert_row(s, OutboundMessage, values)
        return None
    row = OutboundMessage(**values)
    s.add(row)
    return row


_OUTBOUND_IDS = "twoway.outbound_message_ids"


def know_message_ids(s: Session, checked: Iterable[str], taken: Iterable[str]) -> None:
    """For this unit of work: the outbox was searched for every Message-ID in `checked`
    at once (an inbound batch's), and rows have those in `taken`. `enqueue` asks these
    instead of the database, and adds the ones it gives out."""
    s.info[_OUTBOUND_IDS] = (set(checked), set(taken))


def _message_id_taken(s: Session, message_id: str) -> bool:
    known: tuple[set[str], set[str]] | None = s.info.get(_OUTBOUND_IDS)
    if known is not None and message_id in known[0]:
        return message_id in known[1]
    found = s.scalar(select(OutboundMessage.id).where(OutboundMessage.message_id == message_id))
    return found is not None


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
        q = q.where(_mailbox_filter(mailboxes))
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


def _mailbox_filter(mailboxes: tuple[str | None, ...]) -> ColumnElement[bool]:
    named = [m for m in mailboxes if m is not None]
    cond: ColumnElement[bool] = OutboundMessage.mailbox.in_(named)
    if None in mailboxes:
        cond = cond | OutboundMessage.mailbox.is_(None)
    return cond


@dataclass
class _Batch:
    """Due rows picked for one round of a pass: their ids in order and, with several
    workers (PostgreSQL), until when they are held back from the other workers (`held`)
    and when each was due before that (`was_due`, to give back the ones not reached)."""

    ids: list[int]
    held: datetime | None = None
    was_due: dict[int, datetime] | None = None


def _due_batch(app: App, limit: int, budgets: dict[str, int], down: Collection[str] = ()) -> _Batch:
    """Up to `limit` due rows whose SMTP account still has budget.

    Fills `budgets` (transport -> how many more its caps allow; none for an account in
    `down`, found unreachable in this pass). Rows of an account whose cap is reached or
    that is down are moved to the next minute in one UPDATE, without being claimed.

    On PostgreSQL the rows picked are held one lease ahead in the same transaction
    (`FOR UPDATE SKIP LOCKED`, then one UPDATE of their `next_attempt_at`): other workers
    skip them instead of building and opening them too only to lose the claim. They stay
    `queued`: if this worker dies, they are due again once the lease has run out.
    """
    now = app.now()
    with app.transaction() as s:
        transports = {"default", *(m.name for m in app.config.mailboxes if m.smtp is not None)}
        waiting: list[ColumnElement[bool]] = []
        for transport in sorted(transports):
            budgets[transport] = 0 if transport in down else _budget(s, app, transport, now)
            if budgets[transport] <= 0:
                waiting.append(_mailbox_filter(app.config.transport_mailboxes(transport)))
        due = (OutboundMessage.status == OutboxState.QUEUED, OutboundMessage.next_attempt_at <= now)
        for cond in waiting:
            s.execute(
                update(OutboundMessage)
                .where(*due, cond)
                .values(next_attempt_at=now + timedelta(minutes=1))
                .execution_options(synchronize_session=False)
            )
        pick = (
            select(OutboundMessage.id, OutboundMessage.next_attempt_at)
            .where(*due)
            .order_by(OutboundMessage.next_attempt_at, OutboundMessage.id)
            .limit(limit)
        )
        if app.engine.dialect.name == "sqlite":  # one worker: nobody to hold rows from
            return _Batch([row_id for row_id, _ in s.execute(pick)])
        was_due = dict(s.execute(pick.with_for_update(skip_locked=True)).tuples().all())
        held = now + timedelta(seconds=app.config.workers.lease_seconds)
        if was_due:
            s.execute(
                update(OutboundMessage)
                .where(OutboundMessage.id.in_(list(was_due)))
                .values(next_attempt_at=held)
                .execution_options(synchronize_session=False)
            )
        return _Batch(list(was_due), held, was_due)


def _release(app: App, batch: _Batch, row_ids: Collection[int]) -> None:
    """Give back rows of `batch` this pass held but did not reach (they are due again at
    once, for any worker); only those still queued and held by this pass."""
    if batch.held is None or batch.was_due is None or not row_ids:
        return
    with app.engine.begin() as conn:
        conn.execute(
            _release_sql(),
            [{"row_id": i, "held": batch.held, "at": batch.was_due[i]} for i in row_ids],
        )


@functools.cache
def _release_sql() -> Update:
    return (
        update(OutboundMessage)
        .where(
            OutboundMessage.id == bindparam("row_id"),
            OutboundMessage.status == OutboxState.QUEUED,
            OutboundMessage.next_attempt_at == bindparam("held", type_=UTCDateTime()),
        )
        .values(next_attempt_at=bindparam("at", type_=UTCDateTime()))
    )


@dataclass
class _Due:
    """What a batch of due rows is decided on, read in one transaction (`_load`): the rows
    still queued and due, their leads and enrollments, which of their addresses are
    suppressed, the paused campaigns and the leads whose rep has answered.

    The rows' own state is checked again by every write (conditional UPDATEs), and what
    must stop a send (the lead, its enrollment, its campaign, a suppression) again by the
    claim itself, right before DATA: a snapshot a batch old decides nothing alone.
    """

    rows: dict[int, OutboundMessage]
    leads: dict[int, Lead]
    enrollments: dict[int, Enrollment]
    blocked: dict[str, str]
    paused: set[str]
    answered: set[int]
    held: datetime | None = None
    """The batch's rows are held back from other workers until then (`_due_batch`)."""


def _load(app: App, ids: list[int], held: datetime | None = None) -> _Due:
    """The facts the rows `ids` are decided on; `held`: the rows are those this worker
    holds until then (else: those still due now)."""
    now = app.now()
    with app.transaction() as s:
        rows = {
            r.id: r
            for r in s.scalars(
                select(OutboundMessage).where(
                    OutboundMessage.id.in_(ids),
                    OutboundMessage.status == OutboxState.QUEUED,
                    OutboundMessage.next_attempt_at == held
                    if held is not None
                    else OutboundMessage.next_attempt_at <= now,
                )
            )
        }
        lead_ids = sorted({r.lead_id for r in rows.values()})
        leads = {x.id: x for x in s.scalars(select(Lead).where(Lead.id.in_(lead_ids)))}
        en_ids = sorted({r.enrollment_id for r in rows.values() if r.enrollment_id})
        ens = {e.id: e for e in s.scalars(select(Enrollment).where(Enrollment.id.in_(en_ids)))}
        checked = [r.to_addr for r in rows.values() if r.kind in ("nurture", "followup")]
        blocked = suppressed(s, checked) if checked else {}
        nudged = [r.lead_id for r in rows.values() if r.kind in _UNLESS_ANSWERED]
        answered = handoffs.answered_among(s, nudged) if nudged else set()
        return _Due(rows, leads, ens, blocked, paused_campaigns(s), answered, held)


_UNLESS_ANSWERED = ("followup", "reminder", "escalation")
"""Kinds that must not go out once the rep has answered the prospect."""


class _BuildAhead:
    """Builds the batch's next messages (render and compose), a part at a time, while the
    current one is spoken over SMTP: `step`, given to the Mailer, runs parts while it
    waits for each of the server's replies, so building costs no time where the server
    takes longer to answer than a part takes. It builds in the batch's order, up to
    `DEPTH` messages ahead of the one being sent: one message's parts may be done before
    the waits are. What it builds is what `prepare` would (the same row and lead, read
    with the batch; a handoff, which reads the database, is built by `prepare` itself),
    and it writes nothing: `prepare` still decides whether the message goes out, and
    takes the result, or its exception, as its own."""

    DEPTH = 3

    def __init__(self, app: App, renderer: Renderer, due: _Due, order: list[int]) -> None:
        self._app, self._renderer, self._due = app, renderer, due
        self._order = order
        self._at = {row_id: at for at, row_id in enumerate(order)}
        self._next = 0  # the position in `order` of the next row to start
        self._jobs: dict[int, tuple[Steps[tuple[str, bytes]], Future[tuple[str, bytes]]]] = {}
        self._running: list[int] = []  # rows started and not finished, oldest first

    def step(self) -> bool:
        """Run the next part of a build; whether any work is left. Never raises."""
        if not self._running and not self._start():
            return False
        row_id = self._running[0]
        steps, done = self._jobs[row_id]
        try:
            next(steps)
            return True
        except StopIteration as end:
            done.set_result(end.value)
        except Exception as e:  # the build's problem, for `prepare` to handle as its own
            done.set_exception(e)
        self._running.pop(0)
        return bool(self._running) or (
            len(self._jobs) < self.DEPTH and self._next < len(self._order)
        )

    def _start(self) -> bool:
        """Start the next buildable row of the batch, if fewer than DEPTH are ahead."""
        while len(self._jobs) < self.DEPTH and self._next < len(self._order):
            row_id = self._order[self._next]
            self._next += 1
            row = self._due.rows.get(row_id)
            lead = self._due.leads.get(row.lead_id) if row is not None else None
            if row is None or lead is None or row.kind == "handoff":
                continue
            steps = _build_wire_steps(None, self._app, self._renderer, row, lead)
            self._jobs[row_id] = (steps, Future())
            self._running.append(row_id)
            return True
        return False

    def take(self, row_id: int) -> Future[tuple[str, bytes]] | None:
        """The built message of row `row_id` (its remaining parts run now), or None when it
        was not started; builds of rows before it in the batch are dropped."""
        at = self._at[row_id]
        for other in [r for r in self._jobs if self._at[r] < at]:
            self._drop(other)
        self._next = max(self._next, at + 1)
        if row_id not in self._jobs:
            return None
        while row_id in self._running:
            self.step()
        return self._jobs.pop(row_id)[1]

    def _drop(self, row_id: int) -> None:
        self._jobs.pop(row_id, None)
        if row_id in self._running:
            self._running.remove(row_id)


def prepare(
    app: App,
    renderer: Renderer,
    row_id: int,
    budgets: dict[str, int],
    due: _Due | None = None,
    built: Future[tuple[str, bytes]] | None = None,
) -> Prepared | None:
    """Decide whether row `row_id` goes out now and, if so, build it.

    A row that must not go out any more is cancelled; one that must wait (paused
    enrollment, domain cap, account cap) gets a later `next_attempt_at`; one whose
    message cannot be built fails with the reason; each such write is its own transaction
    and applies only if the row is as it was read. None of them is claimed: a row that
    may go out is returned still `queued`, for `claim` once its SMTP transaction has begun.
    None also when the row was taken, settled or rescheduled meanwhile. `due`: the
    batch's facts read by `_load` (default: read for this row alone). `built`: the
    message built ahead by `_BuildAhead` (default: built here).
    """
    now = app.now()
    if due is None:
        due = _load(app, [row_id])
    row = due.rows.get(row_id)
    if row is None:
        return None
    lead = due.leads.get(row.lead_id)
    reserved = due.held  # held with its batch (PostgreSQL), or by this call below
    if lead is None:
        _settle(app, row, "cancelled", "the lead was deleted", reserved)
        return None
    me = app.config.identity(row.mailbox)
    transport = me.transport
    wait_until = _must_wait(app, due, row, lead, now)
    if wait_until is None and budgets.get(transport, 0) <= 0:
        wait_until = now + timedelta(minutes=1)  # this account's cap is reached
    if isinstance(wait_until, str):
        _settle(app, row, "cancelled", wait_until, reserved)
        logger.info("cancelled %s to %s: %s", row.kind, row.to_addr, wait_until)
        return None
    if wait_until is not None:
        _reschedule(app, row, wait_until, reserved)
        return None
    if reserved is None and app.engine.dialect.name != "sqlite":
        # A row decided on its own (not with a batch `_due_batch` held): hold it back from
        # the other workers while its SMTP transaction opens, as a batch is. Still
        # `queued`: if this worker dies now, it is due again after the lease.
        reserved = now + timedelta(seconds=app.config.workers.lease_seconds)
        if not _reschedule(app, row, reserved):
            return None  # another worker holds it
    try:
        if row.kind == "handoff":  # the original and the follow-up it announces
            with app.transaction() as s:
                subject, raw = _build_wire(s, app, renderer, row, lead)
        elif built is not None:
            subject, raw = built.result()
        else:
            subject, raw = _build_wire(None, app, renderer, row, lead)
        check_size(raw, me.smtp)
    except SQLAlchemyError:
        raise  # the database, not this message: the pass fails and is retried
    except Exception as e:  # one bad message (RecursionError too) must not stop others
        _settle(app, row, "failed", f"cannot build the message: {_why(e)}", reserved)
        logger.error("cannot build %s for %s: %s", row.template, row.to_addr, _why(e))
        return None
    envelope = me.address
    if row.kind == "nurture" and app.config.sender.reply_token and row.reply_token:
        envelope = reply_address(me.address, row.reply_token)  # VERP: bounces carry the token
    return Prepared(
        row.id, lead.id, row.kind, row.to_addr, row.mailbox, subject, raw,
        envelope, row.attempts, reserved, transport,
    )  # fmt: skip


# The send path's statements are built once (building one costs more than running it)
# and run with each row's values; on a Connection, as they touch no loaded object.


@functools.cache
def _unchanged_sql(reserved: bool) -> tuple[ColumnElement[bool], ...]:
    """The row (`row_id`) still queued, due and untried (`tries`) since `_load` read it,
    or, `reserved`, still held by this worker (`held`): nobody took, moved or reserved it."""
    return (
        OutboundMessage.id == bindparam("row_id"),
        OutboundMessage.status == OutboxState.QUEUED,
        OutboundMessage.attempts == bindparam("tries"),
        OutboundMessage.next_attempt_at == bindparam("held", type_=UTCDateTime())
        if reserved
        else OutboundMessage.next_attempt_at <= bindparam("now", type_=UTCDateTime()),
    )


def _unchanged(
    row: OutboundMessage, now: datetime, reserved: datetime | None = None
) -> dict[str, Any]:
    return {"row_id": row.id, "tries": row.attempts, "held": reserved, "now": now}


@functools.cache
def _settle_sql(move: str, reserved: bool) -> Update:
    return outbox(move, *_unchanged_sql(reserved)).values(last_error=bindparam("why"))


@functools.cache
def _reschedule_sql(reserved: bool) -> Update:
    at = bindparam("at", type_=UTCDateTime())
    return update(OutboundMessage).where(*_unchanged_sql(reserved)).values(next_attempt_at=at)


def _settle(
    app: App, row: OutboundMessage, move: str, why: str, reserved: datetime | None = None
) -> None:
    """Cancel or fail a row that was not claimed (its own transaction), if unchanged."""
    with app.engine.begin() as conn:
        values = {**_unchanged(row, app.now(), reserved), "why": why}
        conn.execute(_settle_sql(move, reserved is not None), values)


def _reschedule(
    app: App, row: OutboundMessage, at: datetime, reserved: datetime | None = None
) -> bool:
    """Move an unclaimed row to `at` (its own transaction), if unchanged (and, `reserved`,
    still held by this worker until then). False: it was taken, moved or reserved meanwhile."""
    with app.engine.begin() as conn:
        values = {**_unchanged(row, app.now(), reserved), "at": at}
        moved = conn.execute(_reschedule_sql(reserved is not None), values)
        return moved.rowcount == 1


def _moved(move: str, *where: ColumnElement[bool]) -> Update:
    """`states.outbox(move, ...)` for the send path's statements: the same move's sources
    and target, its sources written as plain comparisons, since an IN list is expanded
    again at every execution, which costs more than the statement on a hot path."""
    m = OUTBOX_MOVES[move]
    came_from = or_(*(OutboundMessage.status == st for st in sorted(m.sources)))
    return update(OutboundMessage).where(came_from, *where).values(status=m.target(move, None))


def _none_of(column: Any, values: Iterable[str]) -> ColumnElement[bool]:
    """`column NOT IN values` for a NOT NULL column, without an IN list (see `_moved`)."""
    return and_(*(column != v for v in sorted(values)))


def claim(
    app: App, item: Prepared, conn: Connection | None = None, later: _Later | None = None
) -> bool:
    """Claim a prepared row whose SMTP transaction has begun (the server has accepted its
    MAIL FROM and been sent its RCPT TO): `queued -> sending`, one conditional UPDATE in
    its own transaction.

    So a row is `sending` only once its transaction has begun at the server, and a crash
    strands at most that one. The UPDATE also checks, at that instant, what must stop the
    send (the lead's status, its enrollment, its campaign paused, the address suppressed,
    the rep's answer). False: another worker took or settled the row meanwhile, or one of
    those changed (the next pass decides the row again), or, with touch caps, another
    email to the same person was claimed first. `conn`: the pass's connection. `later`:
    the pass's outcome still to write, written first; on PostgreSQL an email's `sent`
    goes in the claim's own statement (one round trip, one transaction for both).
    """
    now = app.now()
    sender = app.config.sender
    statement = _claim_sql(item.kind, item.reserved_until is not None)
    values = {
        "row_id": item.row_id,
        "tries": item.attempts,
        "held": item.reserved_until,
        "addr": item.to_addr,
        "at_domain": "@" + item.to_addr.rsplit("@", 1)[-1],
        "tried": item.attempts + 1,
        "subj": item.subject,
        # A claim is a lease: past it, another worker settles the row (never resends).
        "lease": now + timedelta(seconds=app.config.workers.lease_seconds),
    }
    touch = item.kind == "nurture" and bool(sender.max_touches or sender.min_gap)
    sent = later.take_sent() if later is not None and not touch else None
    if sent is not None:
        return _sent_and_claimed(app, sent, conn, statement, values)
    if later is not None:
        later.write()
    if touch:
        with app.transaction() as s:
            # The touch check again, under the person's lock: two workers may have
            # prepared two emails to one person at once (see _touch_wait).
            if s.get_bind().dialect.name != "sqlite":
                mine = select(Lead.id).where(Lead.id == item.lead_id)
                if s.scalar(mine.with_for_update(skip_locked=True)) is None:
                    return False  # being decided elsewhere: the next pass looks again
            if touch_wait(s, sender, item.lead_id, now, exclude_row=item.row_id, sent_only=True):
                return False
            return run(s.connection(), statement, values).rowcount == 1
    return _alone(app, conn, statement, values).rowcount == 1


def _sent_and_claimed(
    app: App,
    sent: tuple[Prepared, SendResult],
    conn: Connection | None,
    statement: Update,
    values: dict[str, Any],
) -> bool:
    """The last email's `sent` and this one's claim in one statement (PostgreSQL: two
    data-modifying CTEs), committed together; whether the claim was won. A `sent` that
    finds its row moved (another worker settled it) is written row by row after."""
    both = _sent_and_claim_sql(statement)
    written = {"sent_id": sent[0].row_id, "sent_at": app.now()}
    try:
        done, won = tuple(_alone(app, conn, both, {**values, **written}).one())
    except DBAPIError as e:
        # Neither was written. The message is out: its `sent` on its own (`record` takes a
        # fresh connection if this one was lost); then, after a lost connection (a
        # database restart), the claim alone, as the pool's next checkout would.
        record(app, *sent, conn=conn)
        if conn is None or not e.connection_invalidated:
            raise
        return _alone(app, conn, statement, values).rowcount == 1
    if not done:
        record(app, *sent, conn=conn)
    return bool(won)


@functools.cache
def _sent_and_claim_sql(claim: Update) -> Select[tuple[int, int]]:
    o = OutboundMessage
    done = _sent_sql("sent_id", "sent_at").returning(o.id).cte("done")
    took = claim.returning(o.id).cte("took")
    return select(
        select(func.count()).select_from(done).scalar_subquery(),
        select(func.count()).select_from(took).scalar_subquery(),
    )


def _alone(
    app: App, conn: Connection | None, stmt: Update | Select[Any], values: dict[str, Any]
) -> DriverResult | CursorResult[Any]:
    """`db.run_alone` on `conn` (the pass's connection) or on one of the pool."""
    if conn is not None:
        return run_alone(conn, stmt, values)
    with app.engine.connect() as fresh:
        return run_alone(fresh, stmt, values)


@functools.cache
def _claim_sql(kind: str, reserved: bool) -> Update:
    where = [
        OutboundMessage.id == bindparam("row_id"),
        OutboundMessage.attempts == bindparam("tries"),
        *([OutboundMessage.next_attempt_at == bindparam("held", type_=UTCDateTime())]
          if reserved else []),
        *_still_wanted(kind),
    ]  # fmt: skip
    return _moved("claimed", *where).values(
        attempts=bindparam("tried"),
        subject=bindparam("subj"),
        next_attempt_at=bindparam("lease", type_=UTCDateTime()),
    )


def _still_wanted(kind: str) -> list[ColumnElement[bool]]:
    """The claim's own check of what `_must_not_send` and `_must_wait` decided from the
    batch's snapshot: the lead, its enrollment, its campaign, suppression (of `addr` or
    `at_domain`) and whether the rep has answered, as they are at the claim."""
    row, lead = OutboundMessage, Lead
    unanswered = (
        ~select(Handoff.id)
        .where(Handoff.lead_id == row.lead_id, Handoff.answered_at.is_not(None))
        .exists()
    )
    if kind not in ("nurture", "followup"):
        return [unanswered] if kind in _UNLESS_ANSWERED else []
    listed = Suppression.pattern.in_([bindparam("addr"), bindparam("at_domain")])
    cond: list[ColumnElement[bool]] = [~select(Suppression.id).where(listed).exists()]
    if kind == "followup":
        wanted = select(lead.id).where(lead.id == row.lead_id, _none_of(lead.status, SUPPRESSED))
        return [*cond, wanted.exists(), unanswered]
    live = select(Enrollment.id).where(  # a completed one still sends its last step
        Enrollment.id == row.enrollment_id,
        _none_of(Enrollment.state, (EnrollmentState.STOPPED, EnrollmentState.PAUSED)),
    )
    paused = select(CampaignState.campaign).where(
        CampaignState.campaign == row.campaign, CampaignState.paused.is_(True)
    )
    status = select(lead.id).where(lead.id == row.lead_id, lead.status == LeadStatus.LEAD)
    return [*cond, status.exists(), live.exists(), ~paused.exists()]


def _why(e: Exception) -> str:
    text = str(e) or type(e).__name__
    if isinstance(e, RecursionError):
        text = "the message nests too deeply to be built"
    return text[:500]


def _must_wait(
    app: App, due: _Due, row: OutboundMessage, lead: Lead, now: datetime
) -> datetime | str | None:
    """None: the row may go out now. A datetime: not before then. A str: never (why)."""
    why_not = _must_not_send(due, row, lead)
    if why_not:
        return why_not
    if row.kind in ("nurture", "followup"):
        blocked = due.blocked.get(row.to_addr)
        if blocked:
            return blocked
    en = due.enrollments.get(row.enrollment_id) if row.enrollment_id else None
    if row.kind == "nurture" and en is not None and en.state == EnrollmentState.PAUSED:
        return en.paused_until or now + timedelta(days=1)
    if row.kind == "nurture" and row.campaign in due.paused:
        return now + timedelta(hours=1)  # `campaigns resume` gives it its slot
    sender = app.config.sender
    campaign = next((c for c in app.config.campaigns if c.name == row.campaign), None)
    touches = sender.max_touches is not None or sender.min_gap is not None
    per_domain = campaign.max_per_domain_per_day if campaign else None
    if row.kind != "nurture" or not (touches or per_domain):
        return None
    with app.transaction() as s:  # the caps count what was sent, up to this instant
        if touches:
            later = _touch_wait(s, app, row, lead, now)
            if later is not None:
                return later
        if per_domain:
            day = now.replace(hour=0, minute=0, second=0, microsecond=0)
            if _sent_since(s, day, lead.domain) >= per_domain:
                return day + timedelta(days=1)
    return None


def _touch_wait(
    s: Session, app: App, row: OutboundMessage, lead: Lead, now: datetime
) -> datetime | None:
    """A nurture row that would break the touch cap or gap: when it may go."""
    sender = app.config.sender
    if s.get_bind().dialect.name != "sqlite":
        # One claim at a time per person, so two workers cannot both see room under the cap.
        mine = select(Lead.id).where(Lead.id == lead.id).with_for_update(skip_locked=True)
        if s.scalar(mine) is None:
            return now + timedelta(seconds=5)
    wait = touch_wait(s, sender, lead.id, now, exclude_row=row.id, sent_only=True)
    if wait is None:
        return None
    if row.enrollment_id:
        s.execute(
            update(Enrollment)
            .where(Enrollment.id == row.enrollment_id)
            .values(waiting=f"{wait[1]}: waits until {wait[0].isoformat()}")
            .execution_options(synchronize_session=False)
        )
    return wait[0]


def _must_not_send(due: _Due, row: OutboundMessage, lead: Lead) -> str | None:
    """Why this row must never go out (None: it may). Checked right before SMTP."""
    if row.kind == "nurture":
        if lead.status != LeadStatus.LEAD:
            return f"the lead is now {lead.status}"
        en = due.enrollments.get(row.enrollment_id) if row.enrollment_id else None
        if en is None or en.state == EnrollmentState.STOPPED:
            return "the enrollment was stopped"
    elif row.kind == "followup" and lead.status in SUPPRESSED:
        return f"the lead is now {lead.status}"
    if row.kind in _UNLESS_ANSWERED and lead.id in due.answered:
        return "the rep answered the prospect"
    return None


def _build(
    s: Session | None, app: App, renderer: Renderer, row: OutboundMessage, lead: Lead
) -> EmailMessage:
    """The row's message (for a look at its parts; the send path writes `_build_wire`)."""
    return compose(**_message(s, app, renderer, row, lead))


def _build_wire(
    s: Session | None, app: App, renderer: Renderer, row: OutboundMessage, lead: Lead
) -> tuple[str, bytes]:
    """The row's subject and its message as it goes to SMTP, written once before the claim."""
    return drain(_build_wire_steps(s, app, renderer, row, lead))


def _build_wire_steps(
    s: Session | None, app: App, renderer: Renderer, row: OutboundMessage, lead: Lead
) -> Steps[tuple[str, bytes]]:
    """`_build_wire` a part at a time (see `_BuildAhead`)."""
    args = yield from _message_steps(s, app, renderer, row, lead)
    yield
    raw = yield from compose_wire_steps(**args)
    return subject_text(str(args["subject"])), raw


def _message(
    s: Session | None, app: App, renderer: Renderer, row: OutboundMessage, lead: Lead
) -> dict[str, Any]:
    """compose()'s arguments for the row: its templates rendered, its headers chosen. `s`
    is needed for a handoff only (the original it attaches, the follow-up it announces)."""
    return drain(_message_steps(s, app, renderer, row, lead))


def _message_steps(
    s: Session | None, app: App, renderer: Renderer, row: OutboundMessage, lead: Lead
) -> Steps[dict[str, Any]]:
    """`_message` a part at a time: it pauses between the templates' parts."""
    config = app.config
    sender = config.sender
    facts: dict[str, Any] = dict(row.context or {})
    me = config.identity(row.mailbox)
    token = row.reply_token or lead.reply_token
    base = common(
        lead_fields(lead),
        sender_block(me.name, me.address, sender.postal_address),
        unsubscribe_url(sender, token),
    )
    total = len(config.campaign(row.campaign).steps) if row.campaign else 1
    if row.kind == "handoff" and s is None:
        raise ValueError("a handoff is built in a transaction")
    if s is not None and row.kind == "handoff" and isinstance(facts.get("followup"), dict):
        facts["followup"] = _followup_preview(s, app, renderer, lead, dict(facts["followup"]))
    original: bytes | None = None
    if s is not None and row.kind == "handoff":  # the briefing says whether it is attached
        inbound = s.get(InboundMessage, row.inbound_id) if row.inbound_id else None
        original = inbound.raw if inbound is not None else None
        facts.update(original_facts(original, MAX_ATTACHED_ORIGINAL))
    ctx = context_for(
        row.kind, base, facts, campaign=row.campaign, step=(row.step or 0) + 1, total=total
    )
    rendered = yield from renderer.render_steps(row.template, ctx)
    unsub_url, unsub_mailto = unsubscribe_targets(sender, token)
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
        rep = facts.get("rep") or {}
        to_name = str(rep.get("name", "")) if row.kind != "escalation" else ""
        if original is not None and facts.get("original_attached"):
            attachments.append(Attachment("original-reply.eml", original, "message/rfc822"))
    elif row.kind == "followup":
        if facts.get("from_addr"):
            from_addr, from_name = str(facts["from_addr"]), str(facts.get("from_name", ""))
        # The prospect's answer reaches the rep and, by the token, twoway.
        reply_to = [(from_name, from_addr), ("", reply_address(me.address, token))]
    refs = [str(r) for r in facts.get("references", [])]
    message_id, in_reply_to = row.message_id, row.in_reply_to
    if row.kind == "rep_copy":
        # The prospect's own message, re-sent from our address (her From would fail her
        # domain's DMARC at the rep's provider), keeping her Message-ID and thread headers:
        # the rep's client answers with In-Reply-To/References of her message, and
        # Reply-To sends that answer to her and, by the token, to twoway.
        copy = facts.get("reply") or {}
        name = clean_text(str(copy.get("from_name") or lead.email))
        from_name = f"{name} via {me.name or me.address}"
        reply_to = [(name, lead.email), ("", reply_address(me.address, token))]
        theirs = str(facts.get("header_message_id") or "")
        message_id = theirs if is_message_id(theirs) else row.message_id
        irt = facts.get("reply_in_reply_to")
        in_reply_to = str(irt) if irt and is_message_id(str(irt)) else None
        refs = [r for r in refs if is_message_id(r)]
    return dict(
        from_addr=from_addr,
        from_name=from_name,
        to_addr=row.to_addr,
        to_name=to_name,
        subject=str(facts.get("subject_override") or rendered.subject),
        text=rendered.text,
        html=rendered.html,
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
    except Exception:  # a broken follow-up fails on its own row; the briefing goes out
        return None
    body = message.get_body(("plain",))
    text = body.get_content() if isinstance(body, EmailMessage) else ""
    return {**followup, "text": text.strip(), "sent": row.status != "queued"}


def record(
    app: App,
    item: Prepared,
    result: SendResult,
    *,
    claimed: bool = True,
    conn: Connection | None = None,
) -> None:
    """Write the outcome of one SMTP attempt (its own transaction).

    `claimed` False: the server refused the envelope before the claim (`result` is
    temporary or permanent); the attempt counts all the same, unless another worker has
    moved the row meanwhile (then it is theirs and nothing is written). `conn`: the
    pass's connection.
    """
    now = app.now()
    if claimed and result.status == "sent":
        values = {"row_id": item.row_id, "at": now}
        try:
            done = _alone(app, conn, _sent_sql(), values).rowcount
        except DBAPIError as e:
            if conn is None or not e.connection_invalidated:
                raise
            # The pass's connection was lost (a database restart): the message is out, so
            # once more on a fresh connection, as a new checkout of the pool would do.
            done = _alone(app, None, _sent_sql(), values).rowcount
        if done == 1:
            return
        # Not `sending` (nor `unknown`) any more: the row-by-row way below says why.
    smtp = app.config.identity(item.mailbox).smtp
    max_attempts = smtp.max_attempts if smtp else 5
    with app.transaction() as s:
        row = s.get(OutboundMessage, item.row_id, with_for_update=not claimed)
        if row is None:
            return
        if not claimed:
            if row.status != OutboxState.QUEUED or row.attempts != item.attempts:
                return
            row.attempts += 1
        if result.status == "sent":
            if row.status == OutboxState.SENT:
                return  # already written (a commit whose answer was lost with its connection)
            move_outbox(row, "sent")
            row.sent_at, row.last_error = now, None
            return
        detail = f"{result.code or ''} {result.message}".strip()
        if result.status == "temporary" and row.attempts < max_attempts:
            # Exponential backoff with jitter, kept in the row (not in a sleeping frame).
            wait = min(60 * 2 ** (row.attempts - 1), 3600) * random.uniform(0.8, 1.2)
            move_outbox(row, "deferred")
            row.last_error = f"temporary: {detail}"
            row.next_attempt_at = now + timedelta(seconds=wait)
            logger.warning(
                "temporary failure sending to %s (attempt %d): %s",
                row.to_addr,
                row.attempts,
                detail,
            )
            return
        move_outbox(row, "failed")
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
            and address_is_dead(result.code, status or None, result.message)
        ):
            lead = s.get(Lead, row.lead_id)
            if lead is not None:
                bounce_lead(s, lead, now, f"SMTP refused {row.to_addr}: {detail}")


@functools.cache
def _sent_sql(row_id: str = "row_id", at: str = "at") -> Update:
    return _moved("sent", OutboundMessage.id == bindparam(row_id)).values(
        sent_at=bindparam(at, type_=UTCDateTime()), last_error=None
    )


def send_due(
    app: App,
    renderer: Renderer,
    mailer_for: MailerFor,
    sent_copy: SentCopy | None = None,
    limit: int | None = None,
    should_stop: Callable[[], bool] = lambda: False,
) -> int:
    """Send everything due now (respecting the caps); returns how many were sent.

    `mailer_for(transport)` gives the Mailer of one SMTP account ("default" or a
    mailbox's name). Each row is claimed once its SMTP transaction has begun, so
    `should_stop` (asked between messages) leaves the rest queued and untouched.
    """
    sent = 0
    seen: set[int] = set()  # a row another worker holds right now comes back: skip it
    down: set[str] = set()  # SMTP accounts that could not be reached in this pass
    while (limit is None or sent < limit) and not should_stop():
        budgets: dict[str, int] = {}
        size = CLAIM_BATCH if limit is None else min(CLAIM_BATCH, limit - sent)
        picked = _due_batch(app, size, budgets, down)
        batch = [i for i in picked.ids if i not in seen]
        skipped = [i for i in picked.ids if i in seen]
        if not batch:
            _release(app, picked, skipped)
            break
        due = _load(app, batch, picked.held)
        reached = 0
        # The batch's claims and outcomes run on one connection, each in a short
        # transaction of its own: none is open while SMTP is spoken.
        ahead = _BuildAhead(app, renderer, due, batch)
        with app.engine.connect() as conn, renderer.pass_(), _Later(app, conn) as later:
            meanwhile = functools.partial(_meanwhile, later, ahead)
            for row_id in batch:
                if should_stop() or (limit is not None and sent >= limit):
                    break
                reached += 1
                seen.add(row_id)
                item = prepare(app, renderer, row_id, budgets, due, ahead.take(row_id))
                if item is None:
                    continue
                mailer = mailer_for(item.transport)
                assert mailer is not None  # an account that does not exist gets no budget
                result = _send(app, mailer, item, conn, meanwhile, later)
                if result is not None:
                    sent += _after(result, item, budgets, down, sent_copy)
        _release(app, picked, skipped + batch[reached:])
    if sent:
        logger.info("sent %d message(s)", sent)
    return sent


def _after(
    result: SendResult,
    item: Prepared,
    budgets: dict[str, int],
    down: set[str],
    sent_copy: SentCopy | None,
) -> int:
    """What one attempt means for the rest of the pass; 1 when the message went out."""
    budgets[item.transport] -= 1
    if _account_down(result):
        # The server, not this message: one try per pass is enough. The account's other
        # rows wait a minute unclaimed instead of each spending its retries.
        down.add(item.transport)
        budgets[item.transport] = 0
        logger.warning(
            "SMTP account %s is unavailable (%s): its other messages wait",
            item.transport,
            result.message,
        )
    if result.status != "sent":
        return 0
    if sent_copy is not None:
        try:
            sent_copy(item.mailbox, item.raw)
        except Exception as e:  # a missing Sent copy must not fail the send
            logger.warning("could not save a copy in the Sent folder: %s", e)
    return 1


def _account_down(result: SendResult) -> bool:
    """A temporary failure of the connection itself (no reply, 421 "service not
    available", or a refused login or TLS handshake) rather than of one message."""
    return result.status == "temporary" and (
        result.code is None or result.code == 421 or result.code >= 500
    )


def _meanwhile(later: _Later, ahead: _BuildAhead) -> bool:
    """One part of the work for the waits on the SMTP server's replies: the last email's
    outcome first (unless it goes with the next claim), then the next emails' builds.
    Whether any is left."""
    return later.write_early() or ahead.step()


class _Later:
    """The outcome of the email just sent, written in the next email's first wait (the
    server's answer to MAIL FROM) or, on PostgreSQL, when it is `sent`, in the next
    claim's own statement; at the latest before that claim or the batch's end. Its own
    transaction still (or the claim's), a fraction of a millisecond later."""

    def __init__(self, app: App, conn: Connection) -> None:
        self._app, self._conn = app, conn
        self._pending: tuple[Prepared, SendResult] | None = None
        self._with_claim = conn.dialect.name == "postgresql"

    def put(self, item: Prepared, result: SendResult) -> None:
        self.write()
        self._pending = (item, result)

    def write(self) -> bool:
        """Write the pending outcome, if any; whether there was one."""
        pending, self._pending = self._pending, None
        if pending is None:
            return False
        record(self._app, *pending, conn=self._conn)
        return True

    def write_early(self) -> bool:
        """`write`, unless the pending outcome is one the next claim takes."""
        return self._taken_by_claim() is None and self.write()

    def take_sent(self) -> tuple[Prepared, SendResult] | None:
        """The pending outcome, for the claim's statement to write: a `sent`, on
        PostgreSQL. It is this caller's to write from now on."""
        pending = self._taken_by_claim()
        if pending is not None:
            self._pending = None
        return pending

    def _taken_by_claim(self) -> tuple[Prepared, SendResult] | None:
        pending = self._pending
        if pending is None or not self._with_claim or pending[1].status != "sent":
            return None
        return pending

    def __enter__(self) -> _Later:
        return self

    def __exit__(self, *exc: object) -> None:
        self.write()


def _send(
    app: App,
    mailer: Mailer,
    item: Prepared,
    conn: Connection,
    meanwhile: Callable[[], bool],
    later: _Later,
) -> SendResult | None:
    """Send one prepared row: open its SMTP transaction, claim the row while the server
    answers RCPT TO, then DATA; each outcome recorded in its own transaction (on `conn`,
    the pass's connection), DATA's by `later`. None: another worker claimed it first, or
    it must not go out any more. `meanwhile`: work for the waits on the server's replies
    (see Mailer.begin), which writes `later`'s pending outcome first."""
    won: list[bool] = []

    def claim_it() -> None:
        won.append(claim(app, item, conn, later))

    size, eight_bit = len(item.raw), not item.raw.isascii()
    refused = mailer.begin(
        item.envelope_from, [item.to_addr], size=size, eight_bit=eight_bit,
        meanwhile=meanwhile, claim=claim_it,
    )  # fmt: skip
    if refused is None and not won:  # no envelope step (a Maildir)
        claim_it()
    later.write()  # the last email's outcome, if the claim did not write it
    if won and not won[0]:  # taken or settled elsewhere, or no longer to go out
        mailer.reset()
        return None
    if refused is not None:
        record(app, item, refused, claimed=bool(won))
        return refused
    result = mailer.data(item.raw, meanwhile)
    later.put(item, result)
    return result


def recover_sending(
    app: App, in_sent_folder: Callable[[str | None, str], bool | None] | None, all_rows: bool
) -> tuple[int, int]:
    """Settle rows left in `sending` by a crash, never by sending again.

    `in_sent_folder(mailbox, message_id)` answers True/False, or None when it cannot tell.
    With `all_rows` (one worker: nobody else can be mid-send) every `sending` row is looked
    at; otherwise only rows whose lease expired. Returns (found sent, marked unknown).
    """
    now = app.now()
    stranded = [OutboundMessage.status == OutboxState.SENDING]
    if not all_rows:
        stranded.append(OutboundMessage.next_attempt_at < now)
    with app.transaction() as s:
        rows = s.execute(
            select(OutboundMessage.id, OutboundMessage.mailbox, OutboundMessage.message_id).where(
                *stranded
            )
        ).all()
    # The Sent folder is asked outside any transaction; each row is then settled on its
    # own, and only if it is still stranded (no other worker settled it meanwhile).
    found = unknown = 0
    for row_id, mailbox, message_id in rows:
        answer = in_sent_folder(mailbox, message_id) if in_sent_folder else None
        if answer:
            move, values = (
                "confirmed",
                {
                    "sent_at": now,
                    "last_error": "confirmed in the Sent folder after a restart",
                },
            )
        else:
            move, values = (
                "lost",
                {
                    "last_error": "the worker stopped during the SMTP call; not in the Sent folder"
                    if answer is False
                    else "the worker stopped during the SMTP call; no Sent folder to check",
                },
            )
        with app.transaction() as s:
            settled = s.execute(
                outbox(move, OutboundMessage.id == row_id, *stranded)
                .values(**values)
                .execution_options(synchronize_session=False)
            )
        if getattr(settled, "rowcount", 0) != 1:
            continue
        if answer:
            found += 1
        else:
            unknown += 1
    if found or unknown:
        logger.warning("after a restart: %d send(s) confirmed sent, %d unknown", found, unknown)
    return found, unknown


def resolve_unknown(s: Session, message_id: str, action: str, now: datetime) -> OutboundMessage:
    """A person settles a send left `unknown` by a crash: `sent` (it did arrive) or `resend`
    (queue it again, same Message-ID, so a copy that did arrive threads with it).

    Recorded on the lead's timeline. Raises LookupError when no unknown send has that
    Message-ID and ValueError for another action.
    """
    from worker.leads import record_event

    if action not in ("sent", "resend"):
        raise ValueError(f"unknown action {action!r}: use sent or resend")
    row = s.scalar(
        select(OutboundMessage)
        .where(
            OutboundMessage.message_id == message_id.strip().strip("<>"),
            OutboundMessage.status == OutboxState.UNKNOWN,
        )
        .with_for_update()
    )
    if row is None:
        raise LookupError(f"no send in state unknown has the Message-ID {message_id}")
    if action == "sent":
        move_outbox(row, "marked_sent")
        row.sent_at = row.sent_at or now
        row.last_error = "marked as sent by a user"
    else:
        move_outbox(row, "resent")
        row.next_attempt_at, row.attempts = now, 0
        row.last_error = "sent again by a user"
    lead = s.get(Lead, row.lead_id)
    if lead is not None:
        what = "marked as sent" if action == "sent" else "queued to be sent again"
        cause = f"user: {row.template} ({row.kind}) {what}"
        detail = {"message_id": row.message_id, "action": action}
        record_event(s, lead, "send_resolved", cause, now, detail=detail)
    return row
