"""The inbound pipeline: mailbox sync -> parse -> classify -> match -> record -> lifecycle.

The messages of a fetched batch are one unit of work: their rows, their effects on the
leads and the folder's new `last_uid` commit in one transaction (bounded by the batch size
and `BATCH_SECONDS`), so a crash loses nothing and repeats nothing. When anything in it
fails, the batch is replayed one message per transaction: a message that cannot be
parsed or processed is quarantined (raw bytes and reason), the sync moves past it and
never loops on it. A database that cannot be reached or written (locked, disk full,
connection lost) is no fault of a message: DatabaseUnavailable ends the pass with
nothing quarantined and the progress where it was, and the caller retries with backoff.
"""

from __future__ import annotations

import gc
import hashlib
import itertools
import logging
import multiprocessing
import os
import signal
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import date, datetime

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from worker.app import App
from worker.classify import Classification, ClassifyContext, classify
from worker.config import Config, MailboxConfig
from worker.db import (
    add_new,
    as_unavailable,
    defer_inserts,
    is_conflict,
    is_unavailable,
    write_changes,
)
from worker.leads import buffer_events, prefetch_lead_facts
from worker.lifecycle import Inbound, apply_inbound, lock_leads, remember_received
from worker.mailbox import MAX_BATCH_BYTES, FetchedMessage, MailSource
from worker.match import Known, match_message, prefetch
from worker.models import InboundMessage, MailboxState, Quarantine
from worker.outbox import know_message_ids
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
    preparer: Preparer | None = None,
) -> SyncResult:
    """Read every new message of every configured folder and process it once.

    Returns when the folders are drained, after the batch that reaches `limit` messages
    (the daemon interleaves reading and sending), or when `should_stop` says so between
    batches.
    A UIDVALIDITY change restarts the folder from UID 0, deduplicating by Message-ID.
    Raises DatabaseUnavailable when the database cannot be reached or written: nothing
    of the batch in flight is kept or quarantined and the folder's progress stays put.
    `preparer` parses and classifies the batches (in-process when None).
    """
    result = SyncResult()
    preparer = preparer or Preparer(ctx, 0)
    # A bounded call reads whole batches of at most `limit`, and stops after the batch
    # that reaches it.
    size = mb.batch_size if limit is None else max(1, min(mb.batch_size, limit))
    try:
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
            # Batches k+1 and k+2 are fetched and handed to the preparer (parsed and
            # classified, in the pool when there is one) before batch k's database work
            # starts (`_ahead_full`), so a slow batch on either side does not stall the
            # other; batches still commit one after the other, in order. A call that
            # stops early leaves its batches ahead with the preparer, still being
            # prepared, for the next call to start with (the daemon's passes: `keep`).
            pending = deque(preparer.resume((mb.name, folder), info.uidvalidity, after))
            start = pending[-1][0][-1].uid if pending else after
            for batch in itertools.chain(source.fetch_new(folder, start, size), [None]):
                if batch is not None:
                    pending.append((batch, preparer.submit(batch, app.now().date())))
                while pending and (batch is None or _ahead_full(pending)):
                    current, prepared = pending.popleft()
                    process_batch(app, mb, current, ctx, result, prepared=prepared())
                    seen = result.processed + result.duplicates + result.quarantined
                    if should_stop() or (limit is not None and seen >= limit):
                        result.more = True
                        if pending:
                            done = current[-1].uid
                            preparer.keep((mb.name, folder), info.uidvalidity, done, [*pending])
                        return result
            with app.transaction() as s:
                st = _state(s, mb.name, folder)
                st.last_sync, st.last_error = app.now(), None
    except Exception as e:
        if is_unavailable(e):
            raise as_unavailable(e) from e
        raise
    finally:
        if result.to_move:
            _move_processed(source, result.to_move)
            result.to_move = []
    return result


@dataclass
class Prepared:
    """A fetched message parsed and classified, before any database work."""

    fetched: FetchedMessage
    msg: ParsedMessage | None = None
    cls: Classification | None = None
    error: str | None = None
    """Why it cannot be parsed (it is quarantined with this reason)."""
    failure: Exception | None = None
    """What classifying it raised; raised again where the message is processed, so it is
    handled as any other failure of that message."""
    key: str = ""
    """Its dedupe key (`message_key`) once parsed."""
    header_key: str | None = None
    """The batch lookup's guess of its Message-ID from the raw header (`_header_key`)."""


def prepare(fetched: FetchedMessage, ctx: ClassifyContext, today: date) -> Prepared:
    """Parse and classify one message (pure: no database, no I/O); never raises. The
    keys are worked out here too, in the parsing process when there is one."""
    guess = _header_key(fetched.raw)
    try:
        msg = parse(fetched.raw, fetched.size)
    except ParseError as e:
        return Prepared(fetched, error=f"cannot parse: {e}", header_key=guess)
    key = message_key(msg, fetched.raw)
    try:
        return Prepared(fetched, msg, classify(msg, ctx, today=today), key=key, header_key=guess)
    except Exception as e:  # a poisoned message must never stop the batch
        return Prepared(fetched, msg, failure=e, key=key, header_key=guess)


def _prepare_many(batch: list[FetchedMessage], today: date) -> list[Prepared]:
    """In a pool process: `prepare` each message with the context `_start_child` set.
    The raw bytes do not travel back: the parent has them (`_with_fetched`)."""
    assert _CHILD_CTX is not None
    return [replace(prepare(f, _CHILD_CTX, today), fetched=_NO_FETCHED) for f in batch]


_NO_FETCHED = FetchedMessage("", 0, 0, b"", ())


def _ready() -> None:
    """In a pool process: nothing (`Preparer.warm` waits for the process to be up)."""


def _with_fetched(batch: list[FetchedMessage], prepared: list[Prepared]) -> list[Prepared]:
    return [replace(p, fetched=f) for f, p in zip(batch, prepared, strict=True)]


_CHILD_CTX: ClassifyContext | None = None


GC_THRESHOLD = (10_000, 50, 100)
"""The collector's thresholds in the worker's processes (Python's defaults: 700, 10, 10)."""


def tune_gc() -> None:
    """For a long-running process of the worker (`twoway run`, and its parsing
    processes), once start-up is done: what start-up made (modules, mappers, compiled
    statements, templates) is moved out of the cyclic collector's sight, and young
    objects are examined every 10,000 allocations instead of 700. Every message
    allocates thousands of short-lived objects (parsed mail, rows, statement parameters)
    that reference counting frees anyway; with Python's defaults the collector's passes
    over them and over start-up's objects took about 7 % of the worker's CPU on the
    benchmarks' mail (0.1 ms a message; 0.04 ms with these). Cyclic garbage is still
    collected, only later."""
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLD)


def _start_child(ctx: ClassifyContext, parent: int) -> None:
    """A pool process: the parent decides when to stop (SIGTERM and Ctrl-C are its to
    handle: it finishes the batch in flight and shuts the pool down), and mail-parser's
    warnings stay quiet as in the CLI."""
    global _CHILD_CTX
    tune_gc()
    _CHILD_CTX = ctx
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.getLogger("mailparser").setLevel(logging.ERROR)
    threading.Thread(target=_exit_with, args=(parent,), daemon=True).start()


def _exit_with(parent: int) -> None:
    """A pool process outlives no worker: when its parent (`parent`, the pid the worker
    passed, so a parent dead before this process started counts too) dies of SIGKILL or
    a crash, it is reparented and exits within a second (it holds both ends of its task
    queue, so it would never see the queue close)."""
    while os.getppid() == parent:
        time.sleep(1)
    os._exit(0)


Ahead = tuple[list[FetchedMessage], Callable[[], list[Prepared]]]
"""A fetched batch and the call that gives it prepared (`Preparer.submit`)."""

BATCHES_AHEAD = 2
"""Batches fetched and being prepared while one's database work runs: with one, the two
sides waited on each other whenever a batch was slower on one side than the other (the
worker spent a tenth of a backlog waiting for the pool)."""


def _ahead_full(pending: deque[Ahead]) -> bool:
    """Whether the batch at the head of `pending` should be processed now rather than
    another fetched: BATCHES_AHEAD batches are behind it, or at least one is and the
    batches held come to MAX_BATCH_BYTES. Another batch (at most MAX_BATCH_BYTES) is only
    fetched while less is held, so the mail in memory is at most twice MAX_BATCH_BYTES,
    as with one batch ahead."""
    behind = len(pending) - 1
    if behind >= BATCHES_AHEAD:
        return True
    return behind > 0 and sum(len(f.raw) for b, _ in pending for f in b) >= MAX_BATCH_BYTES


POOL_MIN_BATCH = 64
"""Smaller batches are prepared in-process: shipping them to another process costs
about what parsing them does."""


def default_parse_processes() -> int:
    """One pool process when the machine has more than one core; none on one core."""
    return 1 if (os.cpu_count() or 1) > 1 else 0


class Preparer:
    """Parses and classifies fetched batches for `process_batch`.

    With `processes` > 0, batches of at least POOL_MIN_BATCH messages go to a small pool
    of that many processes (started on the first such batch), so the next batches are
    prepared while this one's database work runs; the queue is bounded by the caller
    (BATCHES_AHEAD, and MAX_BATCH_BYTES of mail). A pool that breaks (a child killed) or
    a result that cannot come back is logged, and that batch and the rest are prepared
    in-process: the same messages, the same answers.
    """

    def __init__(self, ctx: ClassifyContext, processes: int) -> None:
        self.ctx = ctx
        self.processes = processes
        self._pool: ProcessPoolExecutor | None = None
        self._kept: dict[tuple[str, str], tuple[int, int, list[Ahead]]] = {}

    def keep(
        self, folder: tuple[str, str], uidvalidity: int, after: int, ahead: list[Ahead]
    ) -> None:
        """Hold `ahead`, batches fetched and submitted that a bounded `sync_mailbox` did
        not reach, for the next call on this (mailbox, folder): they go on being prepared
        meanwhile (while the daemon sends, say), and are not fetched again. They are the
        next batches only while the folder's progress is still at uid `after` under
        `uidvalidity`."""
        self._kept[folder] = (uidvalidity, after, ahead)

    def resume(self, folder: tuple[str, str], uidvalidity: int, after: int) -> list[Ahead]:
        """The batches `keep` held for this folder if they are still the next ones: the
        folder's progress (read now) is where it was left. Otherwise (another worker read
        on, the UIDVALIDITY changed) they are dropped, and the folder is fetched from
        `after` again."""
        kept = self._kept.pop(folder, None)
        if kept is None or kept[:2] != (uidvalidity, after):
            return []
        return kept[2]

    def warm(self, wait: bool = False) -> None:
        """Start the pool's processes now rather than on the first large batch: a new
        process imports twoway first (about a second of CPU), which a backlog's first
        batch would otherwise wait for. The daemon does this once at start; `wait` returns
        when every process is ready."""
        pool = self._started()
        if pool is None:
            return
        try:
            started = [pool.submit(_ready) for _ in range(self.processes)]
            if wait:
                for fut in started:
                    fut.result()
        except Exception as e:  # the first large batch tries again, and falls back
            logger.warning("the parsing process did not start (%s)", e)

    def _started(self) -> ProcessPoolExecutor | None:
        """The pool, started if need be; None when there is none (in-process), also when
        the system refuses one (e.g. a container without a writable /dev/shm for its
        locks): that is logged once and the worker parses in-process from then on."""
        if self._pool is None and self.processes > 0:
            try:
                self._pool = ProcessPoolExecutor(
                    self.processes,
                    mp_context=multiprocessing.get_context("spawn"),  # no fork of our threads
                    initializer=_start_child,
                    initargs=(self.ctx, os.getpid()),
                )
            except OSError as e:
                logger.warning(
                    "cannot start the parsing process (%s): parsing in this process "
                    "(workers.parse_processes: 0 says so and silences this)",
                    e,
                )
                self.processes = 0
        return self._pool

    def submit(self, batch: list[FetchedMessage], today: date) -> Callable[[], list[Prepared]]:
        """Start preparing `batch`; the returned call gives the result (in order)."""
        pool = self._started() if len(batch) >= POOL_MIN_BATCH else None
        if pool is None:
            return lambda: [prepare(f, self.ctx, today) for f in batch]
        size = -(-len(batch) // (2 * self.processes))
        try:
            futures = [
                pool.submit(_prepare_many, batch[i : i + size], today)
                for i in range(0, len(batch), size)
            ]
        except Exception as e:  # a broken pool, or the system refusing a new process
            self._give_up(e)
            return lambda: [prepare(f, self.ctx, today) for f in batch]

        def result() -> list[Prepared]:
            try:
                return _with_fetched(batch, [p for fut in futures for p in fut.result()])
            except Exception as e:
                self._give_up(e)
                return [prepare(f, self.ctx, today) for f in batch]

        return result

    def _give_up(self, e: Exception) -> None:
        logger.warning("the parsing pool failed (%s): parsing in this process", e)
        self.close()
        self.processes = 0

    def close(self) -> None:
        """Stop the pool's processes (queued work is dropped; nothing was committed)."""
        self._kept.clear()
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None


@dataclass
class _Outcome:
    fetched: FetchedMessage
    kind: str | None
    """The message's kind; None for a duplicate, "" when it was quarantined."""


def process_batch(
    app: App,
    mb: MailboxConfig,
    batch: list[FetchedMessage],
    ctx: ClassifyContext,
    result: SyncResult,
    prepared: list[Prepared] | None = None,
) -> None:
    """Process a fetched batch in as few transactions as possible. `prepared`: the
    batch already parsed and classified (`prepare`), in order.

    The messages' rows, their effects and the folder's progress commit together, one
    transaction per `BATCH_SECONDS` at most. When anything in a transaction fails, it is
    rolled back and its messages are replayed one per transaction (`process_message`),
    so only the bad message is quarantined. Raises DatabaseUnavailable (nothing kept).
    """
    if prepared is None:
        prepared = [prepare(f, ctx, app.now().date()) for f in batch]
    i = 0
    while i < len(batch):
        started = time.monotonic()
        done: list[_Outcome] = []
        try:
            with app.transaction() as s:
                buffer_events(s)  # one executemany of the batch's events
                defer_inserts(s)  # and of its queued emails and conversion events
                keep: list[object] = []  # loaded leads stay in the session's identity map
                seen = _seen_keys(s, mb.name, prepared[i:])
                known = prefetch(
                    s, [(p.msg, p.cls) for p in prepared[i:] if p.msg and p.cls], app.config
                )
                lock_leads(s, known.leads)
                prefetch_lead_facts(s, known.leads)
                remember_received(s)
                know_message_ids(s, known.message_ids_checked, known.by_message_id)
                for p in prepared[i:]:
                    kind = _process_in_batch(s, app, mb, p, ctx, seen, keep, known)
                    done.append(_Outcome(p.fetched, kind))
                    if time.monotonic() - started >= BATCH_SECONDS:
                        break
                _advance(s, mb.name, done[-1].fetched)
        except Exception as e:
            # A deadlock with another worker's batch (both hold leads and rep counters
            # for up to BATCH_SECONDS) is settled by replaying in short transactions.
            if is_unavailable(e) and not is_conflict(e):
                raise as_unavailable(e) from e
            replay = batch[i : i + len(done) + 1]
            logger.info(
                "%s: a batch of %d failed (%s): replaying one message per transaction",
                mb.name, len(replay), e.__class__.__name__,
            )  # fmt: skip
            for fetched in replay:
                process_message(app, mb, fetched, ctx, result)
            i += len(replay)
            continue
        for o in done:
            _count(mb, o.fetched, o.kind, result)
        i += len(done)


BATCH_SECONDS = 1.0
"""A batch transaction commits after this long at most (other commands wait on it)."""


def _seen_keys(s: Session, mailbox: str, batch: list[Prepared]) -> set[str]:
    """The dedupe keys among the batch's Message-IDs already recorded (one query)."""
    keys = {k for p in batch if (k := p.header_key)}
    if not keys:
        return set()
    return set(
        s.scalars(
            select(InboundMessage.message_id).where(
                InboundMessage.mailbox == mailbox, InboundMessage.message_id.in_(keys)
            )
        )
    )


def _header_key(raw: bytes) -> str | None:
    """A cheap guess of the Message-ID from the raw header (for the batch lookup only)."""
    head = raw[:65536].split(b"\r\n\r\n", 1)[0].split(b"\n\n", 1)[0]
    for line in head.splitlines():
        if line[:11].lower() == b"message-id:":
            value = line[11:].strip()
            if value.startswith(b"<") and b">" in value:
                value = value[1 : value.index(b">")].strip()
            return value.decode("ascii", "replace")[:990] or None
    return None


def _process_in_batch(
    s: Session,
    app: App,
    mb: MailboxConfig,
    prepared: Prepared,
    ctx: ClassifyContext,
    seen: set[str],
    keep: list[object],
    known: Known,
) -> str | None:
    now, fetched = app.now(), prepared.fetched
    try:
        kind = _process(
            s, app, mb, fetched, ctx, now, seen=seen, keep=keep, prepared=prepared, known=known
        )
    except _Quarantine as q:
        logger.warning(
            "quarantined %s/%s uid %s: %s", mb.name, fetched.folder, fetched.uid, q.reason
        )
        s.add(_quarantine_row(mb, fetched, q.reason, now))
        return ""
    return kind


def _count(
    mb: MailboxConfig, fetched: FetchedMessage, kind: str | None, result: SyncResult
) -> None:
    if kind is None:
        result.duplicates += 1
        return
    if kind == "":
        result.quarantined += 1
        return
    result.processed += 1
    result.kinds[kind] = result.kinds.get(kind, 0) + 1
    dest = mb.move_processed.get(kind)
    if dest:
        result.to_move.append((fetched.folder, fetched.uidvalidity, fetched.uid, dest))


def process_message(
    app: App, mb: MailboxConfig, fetched: FetchedMessage, ctx: ClassifyContext, result: SyncResult
) -> None:
    """One message, one transaction; on a failure of the message, quarantine it and move on.

    Raises DatabaseUnavailable when the database cannot be reached or written: that is
    no property of the message, so it is neither quarantined nor passed over.
    """
    now = app.now()
    try:
        try:
            with app.transaction() as s:
                buffer_events(s)
                defer_inserts(s)
                kind = _process(s, app, mb, fetched, ctx, now)
                _advance(s, mb.name, fetched)
            _count(mb, fetched, kind, result)
        except _Quarantine as q:
            _quarantine(app, mb, fetched, q.reason, now)
            result.quarantined += 1
        except IntegrityError as e:
            if not _is_duplicate(e):
                logger.exception(
                    "could not process %s/%s uid %s", mb.name, fetched.folder, fetched.uid
                )
                _quarantine(app, mb, fetched, f"processing failed: {e.orig or e}", now)
                result.quarantined += 1
                return
            # Another worker recorded the same message at the same moment: it is done.
            with app.transaction() as s:
                _advance(s, mb.name, fetched)
            result.duplicates += 1
        except Exception as e:  # a poisoned message must never stop the worker
            if is_unavailable(e):
                raise
            logger.exception("could not process %s/%s uid %s", mb.name, fetched.folder, fetched.uid)
            _quarantine(app, mb, fetched, f"processing failed: {e.__class__.__name__}: {e}", now)
            result.quarantined += 1
    except Exception as e:
        if is_unavailable(e):
            raise as_unavailable(e) from e
        raise


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
    *,
    seen: set[str] | None = None,
    keep: list[object] | None = None,
    prepared: Prepared | None = None,
    known: Known | None = None,
) -> str | None:
    """Record and apply one message; None when it was already recorded (a duplicate).

    `seen`: keys already looked up for a whole batch (the batch's header Message-IDs
    found recorded); a key it does not cover is looked up here. Keys recorded by this
    call are added to it. `keep` holds the loaded lead for the rest of the transaction.
    `prepared`: the message already parsed and classified; `known`: the batch's match
    signals looked up at once.
    """
    if prepared is None:
        prepared = prepare(fetched, ctx, now.date())
    if prepared.error is not None:
        raise _Quarantine(prepared.error)
    msg = prepared.msg
    assert msg is not None
    key = prepared.key
    if (seen is not None and key in seen) or (
        (seen is None or prepared.header_key != key) and _sender_of(s, mb.name, key)
    ):
        # A reused Message-ID is the same message only from the same sender; another
        # sender's message is recorded under its id plus a hash of its bytes.
        if _sender_of(s, mb.name, key) == (msg.from_addr or ""):
            return None
        key = f"{key[:960]}#{hashlib.sha256(fetched.raw).hexdigest()[:24]}"
        if _sender_of(s, mb.name, key) is not None:
            return None
    if seen is not None:
        seen.add(key)
    if prepared.failure is not None:
        raise prepared.failure
    cls = prepared.cls
    assert cls is not None
    match = match_message(s, msg, cls, app.config, known)
    if keep is not None and match.lead is not None:
        keep.append(match.lead)
    # Its id: the effects' events, handoffs and queued emails name it.
    row = add_new(
        s,
        InboundMessage,
        mailbox=mb.name,
        folder=fetched.folder,
        uidvalidity=fetched.uidvalidity,
        uid=fetched.uid,
        message_id=key,
        from_addr=msg.from_addr,
        subject=(msg.subject or "")[:2000],
        sent_date=msg.date,
        kind=cls.kind,
        reason=(cls.reason + "".join(f"; bounded: {x}" for x in msg.limits))[:2000],
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
    # The effects go to the database in one flush at the end (one UPDATE of the lead,
    # one INSERT per table): nothing the lifecycle reads depends on its own unflushed
    # writes (events are buffered and read with `pending_events`).
    with s.no_autoflush:
        apply_inbound(s, app, Inbound(row, msg, cls, match, now))
    if match.lead is not None:
        write_changes(s, match.lead)  # its UPDATE without the flush's machinery
    s.flush()
    return cls.kind


def _sender_of(s: Session, mailbox: str, key: str) -> str | None:
    """The sender of the message recorded under `key` ("" when it had none); None: no such."""
    row = s.execute(
        select(InboundMessage.from_addr)
        .where(InboundMessage.mailbox == mailbox, InboundMessage.message_id == key)
        .limit(1)
    ).first()
    return None if row is None else (row[0] or "")


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


def _quarantine_row(
    mb: MailboxConfig, fetched: FetchedMessage, reason: str, now: datetime
) -> Quarantine:
    return Quarantine(
        mailbox=mb.name,
        folder=fetched.folder,
        uidvalidity=fetched.uidvalidity,
        uid=fetched.uid,
        raw=fetched.raw,
        reason=reason[:4000],
        created_at=now,
    )


def _quarantine(
    app: App, mb: MailboxConfig, fetched: FetchedMessage, reason: str, now: datetime
) -> None:
    logger.warning("quarantined %s/%s uid %s: %s", mb.name, fetched.folder, fetched.uid, reason)
    with app.transaction() as s:
        s.add(_quarantine_row(mb, fetched, reason, now))
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
