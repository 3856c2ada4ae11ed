"""A database that cannot be written for a while is a temporary failure of the pass.

Locked by another process past the busy timeout, or full: the messages in flight are
neither quarantined nor passed over; once the database is writable again every one of
them is applied, exactly once.
"""

from __future__ import annotations

import contextlib
import mailbox
import os
import signal
import sqlite3
import subprocess
import sys
import time
from datetime import UTC, datetime
from email.message import EmailMessage
from email.utils import format_datetime, make_msgid
from pathlib import Path
from typing import Any

import pytest
import yaml
from sqlalchemy import event, select

from tests.conftest import base_config_data, twoway_cmd
from worker.app import App
from worker.config import config_from_dict
from worker.db import DatabaseUnavailable
from worker.leads import import_leads
from worker.models import Lead, MailboxState
from worker.runner import Worker

NOW = datetime(2026, 12, 1, 10, 0, tzinfo=UTC)

LOCKER = """
import sqlite3, sys
conn = sqlite3.connect(sys.argv[1], isolation_level=None, timeout=60)
sys.stdin.readline()
conn.execute("BEGIN EXCLUSIVE")
print("locked", flush=True)
sys.stdin.readline()
conn.execute("COMMIT")
"""


def token_reply(email: str, token: str, i: int) -> bytes:
    msg = EmailMessage()
    msg["From"] = email
    msg["To"] = f"sales+{token}@example.com"
    msg["Subject"] = "Re: welcome"
    msg["Date"] = format_datetime(NOW)
    msg["Message-ID"] = make_msgid(domain=email.rsplit("@", 1)[1])
    msg.set_content(f"Thanks! Could we see a demo and pricing next week? ({i})")
    return msg.as_bytes()


def setup(tmp_path: Path, n: int, **overrides: Any) -> tuple[dict[str, Any], list[tuple[str, str]]]:
    """A config with a Maildir inbox and `n` imported leads; returns (email, token)s."""
    data = base_config_data(f"sqlite:///{tmp_path / 'twoway.db'}", tmp_path, **overrides)
    config = config_from_dict(data, tmp_path / "twoway.yaml")
    app = App.open(config, lambda: NOW)
    rows = [(i + 2, {"email": f"lead{i}@c{i}.example.org"}) for i in range(n)]
    with app.transaction() as s:
        import_leads(s, rows, NOW)
        leads = [(lead.email, lead.reply_token) for lead in s.scalars(select(Lead))]
    app.close()
    return data, leads


def deliver(tmp_path: Path, leads: list[tuple[str, str]]) -> None:
    inbox = mailbox.Maildir(tmp_path / "inbox", create=True)
    for i, (email, token) in enumerate(leads):
        inbox.add(token_reply(email, token, i))


def counts(db_path: str) -> tuple[int, int, int]:
    """(inbound messages recorded, quarantined, prospects), read while a writer holds the
    lock (a plain WAL reader; twoway's own sessions always take the write lock)."""
    conn = sqlite3.connect(db_path, timeout=30)

    def one(query: str) -> int:
        return int(conn.execute(query).fetchone()[0])

    try:
        return (
            one("SELECT count(*) FROM inbound_messages"),
            one("SELECT count(*) FROM quarantine"),
            one("SELECT count(*) FROM leads WHERE status = 'prospect'"),
        )
    finally:
        conn.close()


def test_it_applies_every_message_after_another_process_releases_its_lock(
    tmp_path: Path,
) -> None:
    n = 40
    data, leads = setup(
        tmp_path, n, workers={"busy_timeout": 1},
        mailboxes=[{"name": "sales", "kind": "maildir", "path": str(tmp_path / "inbox"),
                    "batch_size": 5, "poll_interval": 1}],
    )  # fmt: skip
    cfg = tmp_path / "twoway.yaml"
    cfg.write_text(yaml.safe_dump(data))
    db_path = str(tmp_path / "twoway.db")
    first, second = leads[: n // 2], leads[n // 2 :]
    deliver(tmp_path, first)
    log = (tmp_path / "worker.log").open("wb")
    env = {**os.environ, "TWOWAY_NOW": NOW.isoformat()}
    worker = subprocess.Popen(
        twoway_cmd(cfg, "--verbose", "run", "--log-format", "human"), env=env, stderr=log
    )
    locker = subprocess.Popen(
        [sys.executable, "-c", LOCKER, db_path],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert locker.stdin is not None and locker.stdout is not None
    try:
        reader = sqlite3.connect(db_path, timeout=30)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # the worker has read the first replies
            with contextlib.suppress(sqlite3.OperationalError):
                query = "SELECT count(*) FROM inbound_messages"
                if reader.execute(query).fetchone()[0] == len(first):
                    break
            time.sleep(0.05)
        reader.close()
        locker.stdin.write("lock\n")
        locker.stdin.flush()
        assert locker.stdout.readline().strip() == "locked"
        deliver(tmp_path, second)  # more replies arrive while the database is locked
        time.sleep(4)  # four busy timeouts: the worker's writes fail meanwhile
        during = counts(db_path)
        locker.stdin.write("\n")
        locker.stdin.flush()
        assert locker.wait(30) == 0
        deadline = time.monotonic() + 90
        while counts(db_path)[0] < n and time.monotonic() < deadline:
            time.sleep(0.2)
        after = counts(db_path)
    finally:
        if locker.poll() is None:
            locker.kill()
        worker.send_signal(signal.SIGTERM)
        worker.wait(30)
        log.close()
    text = (tmp_path / "worker.log").read_text()
    assert during == (len(first), 0, len(first))  # stalled by the lock, none quarantined
    assert after == (n, 0, n)  # every reply recorded once and applied, none quarantined
    assert "the database is unavailable" in text
    assert text.count("the database is unavailable") == 1  # logged once per outage
    assert "processing failed" not in text
    app = App.open(config_from_dict(data, cfg), lambda: NOW, migrate=False)
    with app.transaction() as s:
        st = s.scalar(select(MailboxState).where(MailboxState.folder == "INBOX"))
        assert st is not None and st.last_uid == n
    app.close()


def test_it_keeps_a_full_database_s_messages_for_when_there_is_room(tmp_path: Path) -> None:
    data, leads = setup(tmp_path, 5)
    db_path = str(tmp_path / "twoway.db")
    config = config_from_dict(data, tmp_path / "twoway.yaml")
    deliver(tmp_path, leads)
    app = App.open(config, lambda: NOW)

    # SQLite's own page limit stands in for a full disk: the same SQLITE_FULL error.
    @event.listens_for(app.engine, "connect")
    def _full(dbapi_conn: Any, _record: Any) -> None:
        pages = dbapi_conn.execute("PRAGMA page_count").fetchone()[0]
        dbapi_conn.execute(f"PRAGMA max_page_count={pages}")

    app.engine.dispose()
    with Worker(app) as worker, pytest.raises(DatabaseUnavailable, match="full"):
        worker.run_once()
    event.remove(app.engine, "connect", _full)
    app.engine.dispose()
    assert counts(db_path) == (0, 0, 0)  # nothing half-applied, nothing quarantined
    with app.transaction() as s:
        st = s.scalar(select(MailboxState).where(MailboxState.folder == "INBOX"))
        assert st is None or st.last_uid == 0  # progress stays where it was

    with Worker(app) as worker:
        result = worker.run_once()
    assert result.inbound.processed == 5 and result.inbound.quarantined == 0
    assert counts(db_path) == (5, 0, 5)
    app.close()
