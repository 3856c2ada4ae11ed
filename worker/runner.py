"""The worker: one pass (`run_once`) and a short loop around it.

A pass syncs every mailbox (IMAP or Maildir), queues due nurture steps and sends what is
due. Between passes the worker waits on the first mailbox that offers IDLE (or sleeps)
until new mail, the next due send, the poll interval or a stop request.
"""

from __future__ import annotations

import contextlib
import logging
import random
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from worker import handoffs
from worker.app import App
from worker.campaigns import paused_campaigns
from worker.classify import ClassifyContext
from worker.config import Config, MailboxConfig, Rep
from worker.db import as_unavailable, is_unavailable, refresh_statistics
from worker.inbound import (
    Preparer,
    SyncResult,
    classify_context,
    default_parse_processes,
    sync_mailbox,
)
from worker.leases import (
    SqliteLock,
    acquire_lease,
    heartbeat,
    live_workers,
    new_worker_id,
    release_lease,
    release_leases,
    wall_clock,
)
from worker.lifecycle import handoff_to_new_rep
from worker.mailbox import IDLE_RENEW_SECONDS, ImapSource, MailboxError, MailSource, open_source
from worker.mailer import Mailer
from worker.models import (
    Enrollment,
    EnrollmentState,
    Handoff,
    Lead,
    MailboxLease,
    MailboxState,
    OutboundMessage,
    OutboxState,
)
from worker.outbox import recover_sending, send_due
from worker.rendering import Renderer
from worker.sequences import queue_due
from worker.webhooks import deliver_due
from worker.webhooks import next_due as webhooks_due
from worker.webhooks import recover as recover_webhooks

logger = logging.getLogger(__name__)
MAX_BACKOFF = 300.0
DB_BACKOFF = 60.0
"""The longest wait between two passes while the database is unavailable."""
STATS_SECONDS = 3600.0
"""How often the daemon refreshes the planner's statistics (and once at start)."""
ONCE_DB_ATTEMPTS = 6
"""`run --once` tries a pass this many times while the database is unavailable."""
PASS_LIMIT = 200
"""Messages read per mailbox and sent per daemon pass, so reading and sending interleave."""


@dataclass
class _Mailbox:
    cfg: MailboxConfig
    source: MailSource
    connected: bool = False
    failures: int = 0
    retry_at: float = 0.0
    reported: bool = False
    leased: bool = False


class _Watcher:
    """A thread holding its own IMAP connection IDLE on one folder of one mailbox.

    It sets `wake` whenever the server announces new mail there (and once after each
    (re)connection, for mail that came meanwhile); IDLE is re-issued every
    IDLE_RENEW_SECONDS, well within RFC 2177's 29 minutes; a broken connection is
    reopened with exponential backoff. `idling` says whether it is in IDLE now.
    """

    def __init__(self, cfg: MailboxConfig, folder: str, wake: threading.Event) -> None:
        self.cfg, self.folder, self.wake = cfg, folder, wake
        self.idling = False
        self.error: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name=f"idle:{cfg.name}/{folder}", daemon=True
        )
        self._thread.start()

    def _run(self) -> None:
        source = ImapSource(self.cfg)
        failures = 0
        try:
            while not self._stop.is_set():
                try:
                    if source.supports_idle is False or failures:
                        source.connect()
                    if not source.supports_idle:
                        self.error = "the server does not offer IDLE"
                        return
                    self.idling, self.error, failures = True, None, 0
                    if source.watch(self.folder, IDLE_RENEW_SECONDS, self._stop):
                        self.wake.set()
                except MailboxError as e:
                    self.idling, self.error = False, str(e)
                    failures += 1
                    source.close()
                    delay = min(MAX_BACKOFF, 2.0 ** min(failures, 8)) * random.uniform(0.5, 1)
                    self._stop.wait(delay if e.temporary else MAX_BACKOFF)
                    self.wake.set()  # the next pass reconnects the main source as well
        finally:
            self.idling = False
            source.close()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def stop(self) -> None:
        self._stop.set()

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)


@dataclass
class PassResult:
    """What one pass did; `found_work` is True when anything was processed or sent."""

    inbound: SyncResult = field(default_factory=SyncResult)
    queued: int = 0
    sent: int = 0
    delivered: int = 0
    """Webhook events delivered to the CRM."""
    errors: list[str] = field(default_factory=list)
    more: bool = False
    """True when a limit stopped the pass before everything was done."""

    def as_json(self) -> dict[str, object]:
        """What `twoway run --once --json` prints."""
        return {
            "processed": self.inbound.processed,
            "duplicates": self.inbound.duplicates,
            "quarantined": self.inbound.quarantined,
            "kinds": self.inbound.kinds,
            "queued": self.queued,
            "sent": self.sent,
            "delivered": self.delivered,
            "errors": self.errors,
        }

    @property
    def found_work(self) -> bool:
        return bool(
            self.more
            or self.inbound.processed
            or self.inbound.quarantined
            or self.queued
            or self.sent
            or self.delivered
        )


class Worker:
    """Owns the mailbox connections, the SMTP connection and the renderer of one process."""

    def __init__(self, app: App, stop: threading.Event | None = None) -> None:
        """Builds what the worker needs without side effects: no lock, no connection, no
        thread. `start()` (or `with Worker(app) as w:`) takes those, `close()` lets go."""
        self.app = app
        self.stop = stop or threading.Event()
        self.idle = threading.Event()
        """Set while the daemon loop waits for work with every IMAP folder it holds in IDLE
        (mail arriving now is announced to it); cleared when a pass starts."""
        self.id = new_worker_id()
        self.started = wall_clock()
        self._lock: SqliteLock | None = None
        if app.engine.dialect.name == "sqlite":
            self._lock = SqliteLock(app.config.database)  # one worker per SQLite database
        self.renderer = Renderer(app.config.templates_path)
        self.ctx: ClassifyContext = classify_context(app.config)
        n = app.config.workers.parse_processes
        self.preparer = Preparer(self.ctx, default_parse_processes() if n is None else n)
        self.mailboxes = [_Mailbox(m, open_source(m)) for m in app.config.mailboxes]
        self._running = False
        self._recovered = False
        self._fair = len(self.mailboxes)
        self._mailers: dict[str, Mailer] = {}
        self._closing = threading.Event()
        self._db_failures = 0
        self._said_idle = False
        self._stats_at = float("-inf")
        self._wake = threading.Event()
        self._watchers: dict[tuple[str, str], _Watcher] = {}
        self._renewer: threading.Thread | None = None

    def start(self) -> Worker:
        """Take the SQLite lock (WorkerLockError when another worker holds it) or, on
        PostgreSQL, start the thread that renews this worker's leases. Returns self."""
        if self._running:
            return self
        if self._lock is not None:
            self._lock.acquire()
        elif self.mailboxes:
            self._closing.clear()
            self._renewer = threading.Thread(target=self._renew_leases, name="leases", daemon=True)
            self._renewer.start()
        self._running = True
        return self

    def __enter__(self) -> Worker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- one pass -------------------------------------------------------------------

    def run_once(self, limit: int | None = None) -> PassResult:
        """Sync every mailbox, queue due steps, send what is due. Returns what it did.

        Without `limit` the pass drains everything (`twoway run --once`). The daemon passes
        a limit per mailbox and for sending, so a backlog on one side never holds up the
        other: a reply is read within a pass even while thousands of steps go out.
        """
        if not self._running:
            raise RuntimeError("Worker.start() first (or `with Worker(app) as worker:`)")
        self._wake.clear()  # mail announced from now on wakes the next wait
        result = PassResult()
        heartbeat(self.app, self.id, self.started)
        if not self._recovered or self._lock is None:
            # SQLite: once at start (no one else can be mid-send). Several workers: every
            # pass, for rows whose claim expired (their worker died mid-send).
            self._recover()
        self._balance()
        if self._lock is not None and time.monotonic() - self._stats_at >= STATS_SECONDS:
            # SQLite only: PostgreSQL's autovacuum keeps its statistics fresh.
            refresh_statistics(self.app.engine)
            self._stats_at = time.monotonic()
        for mb in self.mailboxes:
            if self.stop.is_set():
                break
            self._sync(mb, result, limit)
        if not self.stop.is_set():
            self._send(result, limit)
        if not self.stop.is_set():
            result.delivered = deliver_due(self.app, should_stop=self.stop.is_set, limit=limit)
        return result

    def _recover(self) -> None:
        recover_sending(self.app, self._in_sent_folder, all_rows=self._lock is not None)
        recover_webhooks(self.app, all_rows=self._lock is not None)
        self._recovered = True

    def _in_sent_folder(self, mailbox: str | None, message_id: str) -> bool | None:
        mb = next((m for m in self.mailboxes if m.cfg.name == mailbox), None)
        if mb is None and self.mailboxes:
            mb = self.mailboxes[0]
        if mb is None or not mb.cfg.sent_folder:
            return None
        try:
            self._connect(mb)
            return mb.source.has_message_id(mb.cfg.sent_folder, message_id)
        except MailboxError:
            return None

    def _connect(self, mb: _Mailbox) -> None:
        if not mb.connected:
            mb.source.connect()
            mb.connected = True

    def _renew_leases(self) -> None:
        """Keep this worker's leases while a long pass runs (a thread, every lease/3 s).

        Without it a pass longer than the lease (a big first sync, a large send batch)
        would let another worker read the same mailbox at the same time.
        """
        ttl = self.app.config.workers.lease_seconds
        while not self._closing.wait(ttl / 3):
            for mb in list(self.mailboxes):
                if mb.leased:
                    with contextlib.suppress(Exception):  # the next pass will notice
                        acquire_lease(self.app, mb.cfg.name, self.id, ttl)
            with contextlib.suppress(Exception):
                heartbeat(self.app, self.id, self.started)

    def _balance(self) -> None:
        """Hold no more than a fair share of the mailboxes when several workers run."""
        if self._lock is not None or len(self.mailboxes) < 2:
            return
        live = live_workers(self.app, self.app.config.workers.lease_seconds)
        self._fair = -(-len(self.mailboxes) // live)
        held = [m for m in self.mailboxes if m.leased]
        for mb in held[self._fair :]:
            logger.info("mailbox %s: handed over to balance %d workers", mb.cfg.name, live)
            release_lease(self.app, mb.cfg.name, self.id)
            self._let_go(mb)

    def _let_go(self, mb: _Mailbox) -> None:
        self._stop_watchers(mb.cfg.name)
        if mb.connected:
            with contextlib.suppress(Exception):
                mb.source.close()
            mb.connected = False
        mb.leased = False

    def _sync(self, mb: _Mailbox, result: PassResult, limit: int | None) -> None:
        if time.monotonic() < mb.retry_at:
            return
        if not mb.leased and sum(m.leased for m in self.mailboxes) >= self._fair:
            return  # enough mailboxes for this worker; another one reads this
        ttl = self.app.config.workers.lease_seconds
        if not acquire_lease(
            self.app, mb.cfg.name, self.id, ttl, force=self._lock is not None
        ) and not (limit is None and self._outwait_lease(mb, ttl)):
            if mb.leased:
                logger.warning("mailbox %s: another worker took it over", mb.cfg.name)
            if limit is None:  # `run --once` promises every message was read
                result.errors.append(
                    f"{mb.cfg.name}: another worker that is alive reads this mailbox; "
                    "not read in this pass"
                )
            self._let_go(mb)
            return
        if not mb.leased:
            logger.info("mailbox %s: this worker reads it now", mb.cfg.name)
            mb.leased = True
        try:
            self._connect(mb)
            got = sync_mailbox(
                self.app, mb.source, mb.cfg, self.ctx, self.stop.is_set, limit, self.preparer
            )
        except MailboxError as e:
            self._mailbox_failed(mb, str(e), temporary=e.temporary)
            result.errors.append(f"{mb.cfg.name}: {e}")
            return
        if mb.failures:
            logger.warning("mailbox %s: connection is back", mb.cfg.name)
        mb.failures, mb.reported = 0, False
        self._record_idle(mb)
        r = result.inbound
        r.processed += got.processed
        r.duplicates += got.duplicates
        r.quarantined += got.quarantined
        result.more = result.more or got.more
        for k, v in got.kinds.items():
            r.kinds[k] = r.kinds.get(k, 0) + v

    def _outwait_lease(self, mb: _Mailbox, ttl: float) -> bool:
        """`run --once`: wait for another worker's lease to run out and take it; False when
        that worker renews it (it is alive) or a stop is requested."""
        with self.app.transaction() as s:
            lease = s.get(MailboxLease, mb.cfg.name)
            seen = lease.expires_at if lease is not None else None
        deadline = time.monotonic() + ttl + 2
        while time.monotonic() < deadline and not self.stop.wait(0.5):
            with self.app.transaction() as s:
                lease = s.get(MailboxLease, mb.cfg.name)
                if lease is not None and seen is not None and lease.expires_at > seen:
                    return False  # renewed: its holder is alive
            if acquire_lease(self.app, mb.cfg.name, self.id, ttl):
                logger.info("mailbox %s: took over the lease of a worker that stopped", mb.cfg.name)
                return True
        return False

    def _mailbox_failed(self, mb: _Mailbox, error: str, *, temporary: bool) -> None:
        """Log once per outage, back off exponentially, and show it in `status`."""
        mb.failures += 1
        mb.connected = False
        with contextlib.suppress(Exception):  # the connection is already gone
            mb.source.close()
        delay = min(MAX_BACKOFF, 2.0 ** min(mb.failures, 8)) if temporary else MAX_BACKOFF
        mb.retry_at = time.monotonic() + delay
        if not mb.reported:
            logger.error("mailbox %s: %s (retrying with backoff)", mb.cfg.name, error)
            mb.reported = True
        now = self.app.now()
        with self.app.transaction() as s:
            for folder in mb.cfg.folders:
                st = s.scalar(
                    select(MailboxState).where(
                        MailboxState.mailbox == mb.cfg.name, MailboxState.folder == folder
                    )
                )
                if st is None:
                    st = MailboxState(mailbox=mb.cfg.name, folder=folder, last_uid=0, idle=False)
                    s.add(st)
                st.last_error, st.last_error_at = error[:2000], now

    def _watch(self, mb: _Mailbox) -> None:
        """One IDLE watcher per folder of a held IMAP mailbox that offers IDLE."""
        if mb.cfg.kind != "imap" or not (mb.cfg.idle and mb.source.supports_idle):
            return
        for folder in mb.cfg.folders:
            w = self._watchers.get((mb.cfg.name, folder))
            if w is None or not w.alive:
                self._watchers[(mb.cfg.name, folder)] = _Watcher(mb.cfg, folder, self._wake)

    def _stop_watchers(self, mailbox: str | None = None) -> None:
        gone = [k for k in self._watchers if mailbox is None or k[0] == mailbox]
        for key in gone:
            self._watchers[key].stop()
        for key in gone:
            self._watchers.pop(key).join(5)

    def idling_folders(self, mailbox: str) -> list[str]:
        """The folders of `mailbox` a watcher is IDLE on now."""
        return [f for (m, f), w in self._watchers.items() if m == mailbox and w.idling]

    def _record_idle(self, mb: _Mailbox) -> None:
        self._watch(mb)
        if mb.cfg.kind == "imap":
            idle = set(self.idling_folders(mb.cfg.name))
        else:  # a Maildir's wait watches every folder's directories
            idle = set(mb.cfg.folders) if mb.source.supports_idle and mb.cfg.idle else set()
        with self.app.transaction() as s:
            for st in s.scalars(select(MailboxState).where(MailboxState.mailbox == mb.cfg.name)):
                st.idle = st.folder in idle

    def _send(self, result: PassResult, limit: int | None) -> None:
        result.queued = queue_due(self.app)
        result.queued += handoffs.run_due(self.app, self._handoff_to_new_rep)
        config = self.app.config
        if config.smtp is None and not any(m.smtp for m in config.mailboxes):
            return
        result.sent = send_due(
            self.app,
            self.renderer,
            self._mailer_for,
            self._sent_copy,
            limit=limit,
            should_stop=self.stop.is_set,
        )
        if limit is not None and result.sent >= limit:
            result.more = True

    def _handoff_to_new_rep(
        self, s: Session, lead: Lead, rep: Rep, now: datetime, h: Handoff
    ) -> None:
        handoff_to_new_rep(s, self.app, lead, rep, now, h)

    def _mailer_for(self, transport: str) -> Mailer | None:
        """One SMTP connection per account, reused across passes; None: no such account."""
        if transport not in self._mailers:
            smtp = self.app.config.identity(None if transport == "default" else transport).smtp
            if smtp is None:
                return None
            self._mailers[transport] = Mailer(smtp)
        return self._mailers[transport]

    def _sent_copy(self, mailbox: str | None, raw: bytes) -> None:
        mb = next((m for m in self.mailboxes if m.cfg.name == mailbox), None)
        if mb is None or not mb.cfg.sent_folder or mb.cfg.kind != "imap":
            return
        self._connect(mb)
        mb.source.append(mb.cfg.sent_folder, raw)

    # --- the loop -------------------------------------------------------------------

    def next_due(self) -> datetime | None:
        with self.app.transaction() as s:
            active = [Enrollment.state == EnrollmentState.ACTIVE]
            paused = paused_campaigns(s)
            if paused:  # their steps stay due until resumed: not a reason to wake up
                active.append(Enrollment.campaign.not_in(sorted(paused)))
            a = s.scalar(select(func.min(Enrollment.next_due)).where(*active))
            b = s.scalar(
                select(func.min(OutboundMessage.next_attempt_at)).where(
                    OutboundMessage.status == OutboxState.QUEUED
                )
            )
            c = s.scalar(
                select(func.min(Enrollment.paused_until)).where(
                    Enrollment.state == EnrollmentState.PAUSED
                )
            )
            waiting = (Handoff.answered_at.is_(None), Handoff.closed_at.is_(None))
            d = s.scalar(
                select(func.min(Handoff.sla_due)).where(*waiting, Handoff.reminded_at.is_(None))
            )
            e = s.scalar(
                select(func.min(Handoff.escalate_due)).where(
                    *waiting, Handoff.escalated_at.is_(None)
                )
            )
            f = webhooks_due(s, self.app.config)
        times = [t for t in (a, b, c, d, e, f) if t is not None]
        return min(times) if times else None

    def wait(self) -> None:
        """Sleep until new mail may be there, something is due, or stop is requested;
        `idle` is set while it waits (see there)."""
        try:
            self._wait()
        finally:
            self.idle.clear()

    def _wait(self) -> None:
        poll = min((m.cfg.poll_interval for m in self.mailboxes), default=60.0)
        poll = min(poll, self.app.config.workers.lease_seconds / 3)  # renew leases in time
        due = self.next_due()
        timeout = poll
        if due is not None:
            timeout = max(0.0, min(poll, (due - self.app.now()).total_seconds()))
        retry = [m.retry_at - time.monotonic() for m in self.mailboxes if m.failures]
        if retry:
            timeout = max(0.0, min([timeout, *retry]))
        if any(w.alive for w in self._watchers.values()):
            # IMAP folders are watched by their IDLE threads; Maildirs are polled here.
            deadline = time.monotonic() + timeout
            maildirs = [m for m in self.mailboxes if m.cfg.kind == "maildir" and m.connected]
            while not self.stop.is_set():
                watchers = [w for w in self._watchers.values() if w.alive]
                if not self.idle.is_set() and all(w.idling for w in watchers):
                    self._idling(f"{len(watchers)} folder(s) in IDLE")
                left = deadline - time.monotonic()
                if left <= 0 or self._wake.wait(min(left, 0.5)):
                    return
                for m in maildirs:
                    if m.source.wait(0, self.stop):
                        return
            return
        watcher = next(
            (
                m
                for m in self.mailboxes
                if m.connected and m.source.supports_idle and not m.failures
            ),
            None,
        )
        if watcher is None or timeout <= 0:
            if timeout > 0:
                self._idling(f"next look in {timeout:.0f} s")
            self.stop.wait(timeout)
            return
        self._idling(f"watching mailbox {watcher.cfg.name}")
        try:
            watcher.source.wait(timeout, self.stop)
        except MailboxError as e:
            self._mailbox_failed(watcher, str(e), temporary=e.temporary)

    def _idling(self, how: str) -> None:
        """Say (once after each spell of work) that the worker is waiting, and set `idle`."""
        if not self._said_idle:
            logger.info("idle: waiting for mail or the next due time (%s)", how)
            self._said_idle = True
        self.idle.set()

    def run_once_retrying(self) -> PassResult:
        """`run --once`: a whole pass, retried with backoff while the database cannot be
        reached or written (up to ONCE_DB_ATTEMPTS passes); then DatabaseUnavailable.

        A retried pass starts where the last commit left off, so nothing is read twice
        and nothing is quarantined for the database's sake.
        """
        for attempt in range(1, ONCE_DB_ATTEMPTS + 1):
            try:
                return self.run_once()
            except Exception as e:
                if not is_unavailable(e):
                    raise
                if attempt == ONCE_DB_ATTEMPTS or self.stop.is_set():
                    raise as_unavailable(e) from e
                self._database_failed(e)
        raise AssertionError("unreachable")

    def _database_failed(self, e: BaseException) -> None:
        """Log once per outage and wait (exponential backoff with jitter, or until stop)."""
        self._db_failures += 1
        delay = min(DB_BACKOFF, 2.0 ** min(self._db_failures, 6)) * random.uniform(0.5, 1.0)
        if self._db_failures == 1:
            logger.error(
                "%s: the pass is retried with backoff; no message is quarantined and "
                "mailbox progress stays where it is",
                as_unavailable(e),
            )
        self.stop.wait(delay)

    def run_forever(self) -> None:
        """The daemon loop: a pass, then wait while idle; ends soon after stop is set."""
        logger.info("twoway worker started (%d mailbox(es))", len(self.mailboxes))
        if self.mailboxes:
            self.preparer.warm()  # the parsing pool is up before the first batch needs it
        while not self.stop.is_set():
            try:
                result = self.run_once(limit=PASS_LIMIT)
            except Exception as e:
                if is_unavailable(e):
                    self._database_failed(e)
                    continue
                # Any other failing pass is logged and retried, not fatal.
                logger.exception("the pass failed; retrying in 5 s")
                self.stop.wait(5)
                continue
            if self._db_failures:
                logger.warning("the database is back after %d failed pass(es)", self._db_failures)
                self._db_failures = 0
            if result.found_work:
                self._said_idle = False
            else:
                self.wait()
        logger.info("twoway worker stopped")

    def close(self) -> None:
        """Close connections, hand the mailboxes back and drop the SQLite lock."""
        self._closing.set()
        self._stop_watchers()
        self.preparer.close()
        if self._renewer is not None:
            self._renewer.join(5)
        for mailer in self._mailers.values():
            with contextlib.suppress(Exception):
                mailer.close()
        self._mailers.clear()
        for mb in self.mailboxes:
            with contextlib.suppress(Exception):  # closing a dead connection
                mb.source.close()
        with contextlib.suppress(Exception):  # the database may be the thing that failed
            release_leases(self.app, self.id)
        if self._lock is not None:
            self._lock.release()
        self._running = False


def run_daemon(
    app: App, reload_config: Callable[[], Config], serve_at: tuple[str, int] | None = None
) -> None:
    """`twoway run`: the worker until SIGTERM or SIGINT (the message in flight finishes).

    SIGHUP reloads the configuration and templates: `reload_config()` is called and a new
    worker built from its result takes over between two passes; when the new config is
    not usable the error is logged and the old worker goes on. With `serve_at` (host,
    port) `twoway serve` runs in a thread of this process. Raises WorkerLockError when
    another worker holds this SQLite database.
    """
    stop, reload = threading.Event(), threading.Event()

    def _stop(signum: int, _frame: object) -> None:
        logger.info(
            "signal %s: finishing the message in flight, then stopping", signal.Signals(signum).name
        )
        stop.set()

    def _reload(_signum: int, _frame: object) -> None:
        reload.set()
        stop.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    signal.signal(signal.SIGHUP, _reload)
    worker = Worker(app, stop).start()
    stop_serving: Callable[[], None] | None = None
    try:
        if serve_at is not None:
            from worker.web import serve_in_thread  # Starlette and uvicorn only when serving

            stop_serving = serve_in_thread(app, *serve_at)
        while True:
            worker.run_forever()
            if not reload.is_set():
                break
            reload.clear()
            stop.clear()
            worker = _reloaded(worker, reload_config)
    finally:
        worker.close()
        if stop_serving is not None:
            stop_serving()


def _reloaded(worker: Worker, reload_config: Callable[[], Config]) -> Worker:
    """The worker to go on with after SIGHUP: a new one on the new config, or the old one
    when that config is not usable. The new one is built before the old one closes (so a
    bad config costs nothing) and started after (it takes the old one's SQLite lock)."""
    app = worker.app
    try:
        new = Worker(App(reload_config(), app.engine, app.sessions, app.now), worker.stop)
    except Exception as e:  # a bad new config must not take the worker down
        logger.error("SIGHUP: the new configuration is not usable, keeping the old one:\n%s", e)
        return worker
    worker.close()
    new.start()
    logger.info("SIGHUP: configuration and templates reloaded")
    return new
