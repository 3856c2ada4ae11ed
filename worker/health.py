"""Is twoway healthy? The one answer behind `/healthz` and `twoway status --check`.

Healthy means: the database answers, a worker has heartbeated within its lease, and no
mailbox has been failing for longer than `alarms.mailbox_failing_seconds`. The reasons
name what failed without error texts (the answer is public: no host names or accounts).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.exc import SQLAlchemyError

from worker.app import App
from worker.leases import wall_clock
from worker.models import MailboxState, WorkerHeartbeat


@dataclass
class Health:
    """`ok` with the `reasons` it is not; `as_json` is the body of /healthz."""

    ok: bool = True
    reasons: list[str] = field(default_factory=list)
    workers: int = 0
    failing: dict[str, int] = field(default_factory=dict)

    def fail(self, reason: str) -> None:
        self.ok = False
        self.reasons.append(reason)

    def as_json(self) -> dict[str, Any]:
        return {
            "status": "ok" if self.ok else "failing",
            "reasons": self.reasons,
            "workers": self.workers,
            "mailboxes_failing_seconds": self.failing,
        }


def check_health(app: App) -> Health:
    """Look at heartbeats and mailbox states now (one short read-only transaction)."""
    health = Health()
    lease = app.config.workers.lease_seconds
    limit = app.config.alarms.mailbox_failing_seconds
    wall, now = wall_clock(), app.now()
    try:
        with app.transaction() as s:
            live = s.scalars(
                select(WorkerHeartbeat).where(
                    WorkerHeartbeat.heartbeat_at > wall - timedelta(seconds=lease)
                )
            ).all()
            last_beat = s.scalar(select(func.max(WorkerHeartbeat.heartbeat_at)))
            states = s.scalars(select(MailboxState)).all()
    except SQLAlchemyError as e:
        health.fail(f"the database does not answer ({e.__class__.__name__})")
        return health
    health.workers = len(live)
    if not live:
        seen = (
            f"the last heartbeat was {round((wall - last_beat).total_seconds())} s ago"
            if last_beat
            else "none is running"
        )
        health.fail(f"no worker has heartbeated within its lease ({lease:g} s): {seen}")
    started = min((w.started_at for w in live), default=None)
    configured = {m.name for m in app.config.mailboxes}
    for st in states:
        if st.mailbox not in configured or not st.last_error:
            continue
        since = _failing_since(st.last_sync, started, st.last_error_at)
        seconds = max(0, round((now - since).total_seconds())) if since else 0
        health.failing[st.mailbox] = max(health.failing.get(st.mailbox, 0), seconds)
    for name, seconds in sorted(health.failing.items()):
        if seconds > limit:
            health.fail(f"mailbox {name} has been failing for {seconds} s (limit {limit:g} s)")
    return health


def _failing_since(
    last_sync: datetime | None, started: datetime | None, last_error_at: datetime | None
) -> datetime | None:
    """When the current outage began, at the latest: the last good sync, else the start of
    the oldest live worker (it has been trying since), else the last error."""
    return last_sync or started or last_error_at
