"""`twoway status` counts what it recorded on a lead but did not act on (issue 12).

A bounce, reply or unsubscribe that is not tied to our mail (lifecycle.untrusted) goes on
the lead's timeline as `unverified_*`; the operator sees how many in `status`, over the
last 30 days, read from a partial index that holds only those events.
"""

from __future__ import annotations

import json
import mailbox
import os
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import yaml
from alembic import command
from sqlalchemy import event, text

from tests.conftest import base_config, base_config_data, twoway_cmd
from tests.test_hostile import forged_dsn
from worker import db
from worker.app import App
from worker.status import collect_status

NOW = datetime(2026, 12, 1, 10, 0, tzinfo=UTC)
DMARC_FAIL = "Authentication-Results: mx.example.com; dmarc=fail (p=none) header.from=a.example\r\n"


def _spoofed(sender: str, subject: str, body: str, n: int) -> bytes:
    """Mail "from" a lead that its domain's DMARC disowns, with no token and no thread."""
    return (
        f"From: {sender}\r\nTo: sales@example.com\r\n{DMARC_FAIL}Subject: {subject}\r\n"
        f"Message-ID: <spoof{n}@evil.example>\r\n\r\n{body}\r\n"
    ).encode()


def _twoway(cfg: Path, at: datetime, *args: str) -> str:
    env = {**os.environ, "TWOWAY_NOW": at.isoformat()}
    done = subprocess.run(
        twoway_cmd(cfg, *args), env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, (args, done.stderr[-2000:])
    return done.stdout


def test_status_counts_the_bounces_and_replies_it_did_not_act_on(
    database_url: str, tmp_path: Path
) -> None:
    cfg = tmp_path / "twoway.yaml"
    cfg.write_text(yaml.safe_dump(base_config_data(database_url, tmp_path, campaigns=[])))
    (tmp_path / "leads.csv").write_text("email\nana@a.example\nbo@a.example\ncy@a.example\n")
    _twoway(cfg, NOW, "leads", "import", str(tmp_path / "leads.csv"))
    inbox = mailbox.Maildir(tmp_path / "inbox")
    inbox.add(forged_dsn("ana@a.example", 1))  # we never mailed them: not acted on
    inbox.add(forged_dsn("bo@a.example", 2))
    inbox.add(_spoofed("cy@a.example", "Hi", "Yes, send me pricing.", 3))
    inbox.add(_spoofed("ana@a.example", "unsubscribe", "Please unsubscribe me from this list.", 4))
    _twoway(cfg, NOW, "run", "--once")

    later = NOW + timedelta(hours=2)
    data = json.loads(_twoway(cfg, later, "status", "--json"))
    assert data["unverified"] == {"days": 30, "bounce": 2, "reply": 1, "unsubscribe": 1}
    assert data["leads"]["lead"] == 3  # none of them moved a lead
    shown = _twoway(cfg, later, "status")
    assert (
        "unverified in the last 30 days (recorded on the lead, not acted on; see `twoway leads "
        "show`): bounce 2, reply 1, unsubscribe 1"
    ) in shown

    past_the_window = NOW + timedelta(days=31)
    data = json.loads(_twoway(cfg, past_the_window, "status", "--json"))
    assert data["unverified"] == {"days": 30, "bounce": 0, "reply": 0, "unsubscribe": 0}
    assert "unverified" not in _twoway(cfg, past_the_window, "status")


def test_the_counts_are_read_from_the_partial_index(database_url: str, tmp_path: Path) -> None:
    app = App.open(base_config(database_url, tmp_path), lambda: NOW)
    statements: list[tuple[str, Any]] = []

    def capture(_c: Any, _cur: Any, statement: str, params: Any, _ctx: Any, _m: bool) -> None:
        if "unverified_bounce" in statement:
            statements.append((statement, params))

    event.listen(app.engine, "before_cursor_execute", capture)
    collect_status(app)
    event.remove(app.engine, "before_cursor_execute", capture)
    assert len(statements) == 1
    statement, params = statements[0]
    with app.engine.connect() as conn:
        if app.engine.dialect.name == "sqlite":
            plan = " ".join(
                str(row[-1])
                for row in conn.exec_driver_sql("EXPLAIN QUERY PLAN " + statement, params)
            )
        else:  # an empty table is cheapest to scan: ask whether the index can serve it
            conn.exec_driver_sql("SET enable_seqscan = off")
            plan = " ".join(str(r[0]) for r in conn.exec_driver_sql("EXPLAIN " + statement, params))
    assert "ix_lead_events_unverified" in plan, plan
    app.close()


def test_migration_0006_indexes_the_unverified_events_already_recorded(
    database_url: str, tmp_path: Path
) -> None:
    engine = db.make_engine(database_url)
    command.upgrade(db._alembic_config(engine), "0005_rep")
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO leads (id, email, custom, status, reply_token, domain, created_at, "
                "updated_at) VALUES (1, 'ana@a.example', '{}', 'lead', 'tok', 'a.example', "
                ":at, :at)"
            ),
            {"at": NOW.replace(tzinfo=None)},
        )
        for n, kind in enumerate(["unverified_bounce", "unverified_bounce", "unverified_reply"]):
            conn.execute(
                text(
                    "INSERT INTO lead_events (id, lead_id, at, type, cause, detail) "
                    "VALUES (:id, 1, :at, :type, 'a forged DSN', '{}')"
                ),
                {"id": n + 1, "at": (NOW - timedelta(days=n)).replace(tzinfo=None), "type": kind},
            )
    db.upgrade(engine)
    assert db.current_revision(engine) == "0006_leftover"
    engine.dispose()
    app = App.open(base_config(database_url, tmp_path), lambda: NOW)
    unverified = collect_status(app)["unverified"]
    assert unverified == {"days": 30, "bounce": 2, "reply": 1, "unsubscribe": 0}
    app.close()
