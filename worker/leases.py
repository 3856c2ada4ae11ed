"""Sharing work between worker processes.

On PostgreSQL any number of `twoway run` processes share one database: each mailbox is
leased to one worker at a time (a row with an expiry, renewed every pass; a dead worker's
lease is taken over once it expires), outbox rows and due steps are claimed with
`FOR UPDATE SKIP LOCKED`. SQLite has one writer: a second worker is refused at start.

Leases use the wall clock, never `TWOWAY_NOW`: they are about which process is alive.
"""

from __future__ import annotations

import fcntl
import os
import socket
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import IO

from sqlalchemy import delete, func, select, update
from sqlalchemy.engine import make_url
from sqlalchemy.exc import IntegrityError

from worker.app import App
from worker.models import MailboxLease, WorkerHeartbeat


class WorkerLockError(Exception):
    """Another worker already uses this SQLite database."""


def wall_clock() -> datetime:
    return datetime.now(UTC)


def new_worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


class SqliteLock:
    """An exclusive lock file beside a SQLite database, held while a worker runs."""

    def __init__(self, url: str) -> None:
        database = make_url(url).database or ""
        self.path = Path(f"{database}.worker.lock")
        self._file: IO[str] | None = None

    def acquire(self) -> None:
        f = self.path.open("a+")
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            f.close()
            raise WorkerLockError(
                f"another twoway worker ({holder}) is using this SQLite database; SQLite "
                "supports one worker at a time — stop it, or use PostgreSQL for several"
            ) from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        f.flush()
        self._file = f

    def release(self) -> None:
        if self._file is not None:
            fcntl.flock(self._file.fileno(), fcntl.LOCK_UN)
            self._file.close()
            self._file = None


def acquire_lease(app: App, mailbox: str, holder: str, ttl: float, *, force: bool = False) -> bool:
    """Take or renew the lease of `mailbox` for `holder`; False while another worker has it.

    `force` takes it whoever holds it: for SQLite, where the lock file already proves that
    no other worker is alive (a lease left by a killed one must not wait to expire).
    """
    now = wall_clock()
    expires = now + timedelta(seconds=ttl)
    with app.transaction() as s:
        free = (MailboxLease.holder == holder) | (MailboxLease.expires_at <= now)
        res = s.execute(
            update(MailboxLease)
            .where(
                MailboxLease.mailbox == mailbox,
                free if not force else MailboxLease.mailbox == mailbox,
            )
            .values(holder=holder, heartbeat_at=now, expires_at=expires)
            .execution_options(synchronize_session=False)
        )
        if getattr(res, "rowcount", 0) == 1:
            return True
        if s.get(MailboxLease, mailbox) is not None:
            return False
        try:
            with s.begin_nested():
                s.add(
                    MailboxLease(
                        mailbox=mailbox,
                        holder=holder,
                        acquired_at=now,
                        heartbeat_at=now,
                        expires_at=expires,
                    )
                )
        except IntegrityError:  # another worker inserted it first
            return False
    return True


def live_workers(app: App, ttl: float) -> int:
    """Workers whose heartbeat is younger than a lease (at least 1: this one)."""
    since = wall_clock() - timedelta(seconds=ttl)
    with app.transaction() as s:
        n = s.scalar(
            select(func.count())
            .select_from(WorkerHeartbeat)
            .where(WorkerHeartbeat.heartbeat_at > since)
        )
    return max(int(n or 0), 1)


def release_lease(app: App, mailbox: str, holder: str) -> None:
    with app.transaction() as s:
        s.execute(
            delete(MailboxLease).where(
                MailboxLease.mailbox == mailbox, MailboxLease.holder == holder
            )
        )


def release_leases(app: App, holder: str) -> None:
    with app.transaction() as s:
        s.execute(delete(MailboxLease).where(MailboxLease.holder == holder))
        s.execute(delete(WorkerHeartbeat).where(WorkerHeartbeat.worker == holder))


def heartbeat(app: App, holder: str, started: datetime) -> None:
    now = wall_clock()
    with app.transaction() as s:
        row = s.get(WorkerHeartbeat, holder)
        if row is None:
            s.add(
                WorkerHeartbeat(
                    worker=holder,
                    host=socket.gethostname(),
                    pid=os.getpid(),
                    started_at=started,
                    heartbeat_at=now,
                )
            )
        else:
            row.heartbeat_at = now


def workers_and_leases(app: App) -> tuple[list[dict[str, object]], dict[str, dict[str, object]]]:
    """For `twoway status`: the workers seen recently and who holds each mailbox."""
    now = wall_clock()
    with app.transaction() as s:
        workers = [
            {
                "worker": w.worker,
                "host": w.host,
                "pid": w.pid,
                "started_at": w.started_at.isoformat(),
                "heartbeat_at": w.heartbeat_at.isoformat(),
                "heartbeat_age_seconds": round((now - w.heartbeat_at).total_seconds()),
            }
            for w in s.scalars(select(WorkerHeartbeat).order_by(WorkerHeartbeat.started_at))
        ]
        leases = {
            le.mailbox: {
                "holder": le.holder,
                "expires_at": le.expires_at.isoformat(),
                "expired": le.expires_at <= now,
            }
            for le in s.scalars(select(MailboxLease))
        }
    return workers, leases
