"""The inbound pipeline: mailbox sync -> parse -> classify -> match -> record -> lifecycle.

Each message is one unit of work: its row, its effects on the lead and the folder's new
`last_uid` commit in one transaction, so a crash loses nothing and repeats nothing.
A message that cannot be parsed or processed is quarantined (raw bytes and reason), the
sync moves past it and never loops on it.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from worker.app import App
from worker.classify import Classification, ClassifyContext, classify
from worker.config import Config, MailboxConfig
from worker.lifecycle import apply_inbound
from worker.mailbox import FetchedMessage, MailSource
from worker.match import match_message
from worker.models import InboundMessage, MailboxState, Quarantine
from worker.parsing import ParsedMessage, ParseError, parse

logger = logging.getLogger(__name__)
KEEP_RAW = ("reply", "unsubscribe", "complaint")
_MAX_KEPT_RAW = 25 * 1024 * 1024


def classify_context(config: Config) -> ClassifyContext:
    return ClassifyContext(
        our_addresses=config.our_addresses,
        internal_domains=config.our_domains,
        unsubscribe_mailto=config.sender.unsubscribe_mailto,
    )


@dataclass
class SyncResult:
    """What one sync of one mailbox did."""

    processed: int = 0
    duplicates: int = 0
    quarantined: int = 0
    kinds: dict[str, int] = field(default_factory=dict)
    to_move: list[tuple[str, int, int, str]] = field(default_factory=list)
    more: bool = False
    """True when the sync stopped before the folders were drained."""


def _state(s: Session, mailbox: str, folder: str) -> MailboxState:
    st = s.scalar(
        select(MailboxState).where(MailboxState.mailbox == mailbox, MailboxState.folder == folder)
    )
    if st is None:
        st = MailboxState(mailbox=mailbox, folder=folder, uidvalidity=None, last_uid=0, idle=False)
        s.add(st)
        s.flush()
    return st


def message_key(msg: ParsedMessage | None, raw: bytes) -> str:
    """The dedupe key: the Message-ID, or a hash of the bytes when there is none."""
    if msg is not None and msg.message_id:
        return msg.message_id[:990]
    return "sha256:" + hashlib.sha256(raw).hexdigest()


def sync_mailbox(
    app: App,
    source: MailSource,
    mb: MailboxConfig,
    ctx: ClassifyContext,
    should_stop: Callable[[], bool] = lambda: False,
    limit: int | None = None,
) -> SyncResult:
    """Read every new message of every configured folder and process it once.

    Returns when the folders are drained, after `limit` messages (the daemon interleaves
    reading and sending), or when `should_stop` says so between messages.
    A UIDVALIDITY change restarts the folder from UID 0, deduplicating by Message-ID.
    """
    result = SyncResult()
    for folder in mb.folders:
        info = source.select(folder)
        with app.transaction() as s:
            st = _state(s, mb.name, folder)
            if st.uidvalidity != info.uidvalidity:
                if st.uidvalidity is not None:
                    logger.warning(
                        "%s/%s: UIDVALIDITY changed (%s -> %s): resyncing, duplicates skipped",
                        mb.name, folder, st.uidvalidity, info.uidvalidity,
                    )  # fmt: skip
                st.uidvalidity, st.last_uid = info.uidvalidity, 0
            after = st.last_uid
        for batch in source.fetch_new(folder, after, mb.batch_size):
            for fetched in batch:
                process_message(app, mb, fetched, ctx, result)
                seen = result.processed + result.duplicates + result.quarantined
                if should_stop() or (limit is not None and seen >= limit):
                    result.more = True
                    return result
        with app.transaction() as s:
            st = _state(s, mb.name, folder)
            st.last_sync, st.last_error = app.now(), None
    if result.to_move:
        _move_processed(source, result.to_move)
    return result


def process_message(
    app: App, mb: MailboxConfig, fetched: FetchedMessage, ctx: ClassifyContext, result: SyncResult
) -> None:
    """One message, one transaction; on any failure, quarantine it and move on."""
    now = app.now()
    try:
        with app.transaction() as s:
            kind = _process(s, app, mb, fetched, ctx, now)
            _advance(s, mb.name, fetched)
        if kind is None:
            result.duplicates += 1
            return
        result.processed += 1
        result.kinds[kind] = result.kinds.get(kind, 0) + 1
        dest = mb.move_processed.get(kind)
        if dest:
            result.to_move.append((fetched.folder, fetched.uidvalidity, fetched.uid, dest))
    except _Quarantine as q:
        _quarantine(app, mb, fetched, q.reason, now)
        result.quarantined += 1
    except IntegrityError as e:
        if not _is_duplicate(e):
            logger.exception("could not process %s/%s uid %s", mb.name, fetched.folder, fetched.uid)
            _quarantine(app, mb, fetched, f"processing failed: {e.orig or e}", now)
            result.quarantined += 1
            return
        # Another worker recorded the same message at the same moment: it is done.
        with app.transaction() as s:
            _advance(s, mb.name, fetched)
        result.duplicates += 1
    except Exception as e:  # a poisoned message must never stop the worker
        logger.exception("could not process %s/%s uid %s", mb.name, fetched.folder, fetched.uid)
        _quarantine(app, mb, fetched, f"processing failed: {e.__class__.__name__}: {e}", now)
        result.quarantined += 1


def _is_duplicate(e: IntegrityError) -> bool:
    """Whether the error is the (mailbox, Message-ID) uniqueness of inbound messages."""
    text = str(e.orig)
    return (
        "uq_inbound_dedupe" in text
        or "inbound_messages.mailbox, inbound_messages.message_id" in text
    )


class _Quarantine(Exception):
    def __init__(self, reason: str) -> None:
        self.reason = reason


def _process(
    s: Session,
    app: App,
    mb: MailboxConfig,
    fetched: FetchedMessage,
    ctx: ClassifyContext,
    now: datetime,
) -> str | None:
    """Record and apply one message; None when it was already recorded (a duplicate)."""
    try:
        msg = parse(fetched.raw)
    except ParseError as e:
        raise _Quarantine(f"cannot parse: {e}") from None
    key = message_key(msg, fetched.raw)
    seen = s.scalar(
        select(InboundMessage.id)
        .where(InboundMessage.mailbox == mb.name, InboundMessage.message_id == key)
        .limit(1)
    )
    if seen is not None:
        return None
    cls: Classification = classify(msg, ctx, today=now.date())
    match = match_message(s, msg, cls, app.config)
    row = InboundMessage(
        mailbox=mb.name,
        folder=fetched.folder,
        uidvalidity=fetched.uidvalidity,
        uid=fetched.uid,
        message_id=key,
        from_addr=msg.from_addr,
        subject=(msg.subject or "")[:2000],
        sent_date=msg.date,
        kind=cls.kind,
        reason=cls.reason[:2000],
        intent=cls.intent,
        reply_text=cls.reply_text,
        bounce=cls.bounce.as_json() if cls.bounce else None,
        return_date=cls.return_date,
        match_method=match.method,
        lead_id=match.lead_id,
        outbound_id=match.outbound_id,
        raw=fetched.raw if cls.kind in KEEP_RAW and len(fetched.raw) <= _MAX_KEPT_RAW else None,
        received_at=now,
    )
    s.add(row)
    s.flush()
    apply_inbound(s, app, row, msg, cls, match)
    return cls.kind


def _advance(s: Session, mailbox: str, fetched: FetchedMessage) -> None:
    """Move the folder's progress past this message (in the caller's transaction)."""
    s.execute(
        update(MailboxState)
        .where(
            MailboxState.mailbox == mailbox,
            MailboxState.folder == fetched.folder,
            MailboxState.last_uid < fetched.uid,
        )
        .values(last_uid=fetched.uid)
        .execution_options(synchronize_session=False)
    )


def _quarantine(
    app: App, mb: MailboxConfig, fetched: FetchedMessage, reason: str, now: datetime
) -> None:
    logger.warning("quarantined %s/%s uid %s: %s", mb.name, fetched.folder, fetched.uid, reason)
    with app.transaction() as s:
        s.add(
            Quarantine(
                mailbox=mb.name,
                folder=fetched.folder,
                uidvalidity=fetched.uidvalidity,
                uid=fetched.uid,
                raw=fetched.raw,
                reason=reason[:4000],
                created_at=now,
            )
        )
        _advance(s, mb.name, fetched)


def _move_processed(source: MailSource, moves: list[tuple[str, int, int, str]]) -> None:
    """File processed mail after the commit (only when configured)."""
    groups: dict[tuple[str, int, str], list[int]] = {}
    for folder, uidvalidity, uid, dest in moves:
        groups.setdefault((folder, uidvalidity, dest), []).append(uid)
    for (folder, uidvalidity, dest), uids in groups.items():
        try:
            source.move(folder, uids, dest, uidvalidity=uidvalidity)
        except Exception as e:  # filing is a convenience: the data is already safe
            logger.warning("could not move %d message(s) to %s: %s", len(uids), dest, e)


def retry_quarantined(app: App, qid: int) -> str:
    """Process a quarantined message again; returns its kind. Raises LookupError/ValueError."""
    with app.transaction() as s:
        q = s.get(Quarantine, qid)
        if q is None:
            raise LookupError(f"no quarantined message {qid}")
        if q.resolved_at is not None:
            raise ValueError(f"quarantined message {qid} was already processed")
        mb = next((m for m in app.config.mailboxes if m.name == q.mailbox), None)
        if mb is None:
            raise ValueError(f"mailbox {q.mailbox!r} is no longer configured")
        fetched = FetchedMessage(q.folder, q.uidvalidity, q.uid, q.raw, ())
    ctx = classify_context(app.config)
    now = app.now()
    try:
        with app.transaction() as s:
            kind = _process(s, app, mb, fetched, ctx, now) or "duplicate"
            q2 = s.get(Quarantine, qid)
            assert q2 is not None
            q2.resolved_at = now
    except _Quarantine as e:
        raise ValueError(e.reason) from None
    return kind
