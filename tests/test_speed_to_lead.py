"""Speed to lead: business hours, reassignment, the commands, and the 0005_rep migration.

The mail goes through the Maildir transport of the base test config (a real outbox on
disk); the end-to-end story on Dovecot and aiosmtpd is in test_rep_reply_e2e.py.
"""

from __future__ import annotations

import json
import mailbox
import os
import subprocess
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from email import policy
from email.message import EmailMessage
from email.parser import BytesParser
from pathlib import Path
from typing import Any

import yaml
from sqlalchemy import inspect, select, text

from tests.conftest import base_config, base_config_data, twoway_cmd
from worker import db
from worker.app import App
from worker.config import Delay, SendWindow, config_from_dict
from worker.leads import import_leads, show_lead
from worker.models import Handoff, Lead, OutboundMessage
from worker.runner import Worker
from worker.schedule import add_delay, business_seconds_between

TUESDAY = datetime(2026, 12, 1, 10, 0, tzinfo=UTC)
MARIA = "maria@nube.example.org"


def test_it_counts_business_hours_in_the_reps_zone() -> None:
    friday = datetime(2026, 12, 4, 15, 30, tzinfo=UTC)  # 16:30 in Madrid
    # Two business hours from Friday 16:30 Madrid: 30 minutes on Friday, 90 on Monday.
    assert add_delay(friday, Delay(2, "bh"), "Europe/Madrid") == datetime(
        2026, 12, 7, 9, 30, tzinfo=UTC
    )
    # Saturday noon counts from Monday's opening.
    saturday = datetime(2026, 12, 5, 12, 0, tzinfo=UTC)
    assert add_delay(saturday, Delay(1, "bh"), "UTC") == datetime(2026, 12, 7, 10, 0, tzinfo=UTC)
    short = SendWindow(start="10:00", end="12:00")  # type: ignore[arg-type]
    assert add_delay(TUESDAY, Delay(3, "bh"), "UTC", short) == datetime(
        2026, 12, 2, 11, 0, tzinfo=UTC
    )
    assert business_seconds_between(friday, datetime(2026, 12, 7, 10, 0, tzinfo=UTC),
                                    SendWindow(), "UTC") == 2 * 3600 + 1800  # fmt: skip


def test_it_refuses_a_bad_escalation_target_with_its_key() -> None:
    data = base_config_data("sqlite://", Path("/tmp"), handoff={"escalate_to": "the boss"})
    try:
        config_from_dict(data)
    except Exception as e:
        assert "handoff.escalate_to" in str(e)
    else:
        raise AssertionError("accepted a bad escalate_to")


def sent(tmp_path: Path) -> dict[str, EmailMessage]:
    """What went out, by Maildir key (a reply-ready copy bears the prospect's Message-ID:
    two copies of one message share it)."""
    box = mailbox.Maildir(tmp_path / "outbox", create=True)
    parser = BytesParser(policy=policy.default)
    return {key: parser.parsebytes(m.as_bytes()) for key, m in box.items()}


def start(worker: Worker, tmp_path: Path) -> Worker:
    app = worker.app
    with app.transaction() as s:
        import_leads(
            s,
            [(2, {"email": MARIA, "first_name": "María", "country": "ES"})],
            app.now(),
            campaign=app.config.campaign("welcome"),
        )
    worker.run_once()
    (step1,) = sent(tmp_path).values()
    reply = (
        f"From: María <{MARIA}>\r\nTo: {step1['Reply-To']}\r\nSubject: Re: {step1['Subject']}\r\n"
        f"Message-ID: <r1@nube.example.org>\r\nIn-Reply-To: {step1['Message-ID']}\r\n"
        "Date: Tue, 01 Dec 2026 10:20:00 +0000\r\n\r\nCan you send pricing?\r\n"
    )
    (tmp_path / "inbox" / "new" / "1.reply").write_text(reply)
    app.clock[0] = TUESDAY + timedelta(minutes=30)  # type: ignore[attr-defined]
    worker.run_once()
    return worker


def test_it_reassigns_an_unanswered_prospect_once_to_the_next_rep(
    database_url: str, tmp_path: Path, start_worker: Callable[[App], Worker]
) -> None:
    config = base_config(database_url, tmp_path, handoff={"sla": "1bh", "escalate_to": "reassign"})
    clock = [TUESDAY]
    app = App.open(config, lambda: clock[0])
    app.clock = clock  # type: ignore[attr-defined]
    worker = start(start_worker(app), tmp_path)
    before = set(sent(tmp_path))
    clock[0] = TUESDAY + timedelta(hours=3)  # past the reminder (1bh) and escalation (2bh)
    worker.run_once()
    worker.run_once()  # a second pass does nothing more
    new = [m for key, m in sent(tmp_path).items() if key not in before]
    with app.transaction() as s:
        lead = s.scalars(select(Lead).where(Lead.email == MARIA)).one()
        rows = s.scalars(select(Handoff).order_by(Handoff.id)).all()
        owner = lead.owner
        shown = show_lead(s, MARIA)
    to = sorted((str(m["To"]), str(m["Subject"])) for m in new if "María" not in str(m["To"]))
    assert owner != "ana@example.com" and owner is not None
    assert [r.rep for r in rows] == ["ana@example.com", owner]
    assert rows[0].closed_reason == f"reassigned to {owner}" and rows[1].escalate_due is None
    subjects = [s for t, s in to]
    assert any(s.startswith("Reminder: María") for s in subjects)  # the one reminder to Ana
    assert any("now goes to" in s for t, s in to if "ana@example.com" in t)
    to_new = [m for m in new if owner in str(m["To"])]
    assert len(to_new) == 2  # a fresh briefing and her message to answer from
    assert [e["type"] for e in shown["events"]].count("reassigned") == 1


def write_config(tmp_path: Path, database_url: str) -> Path:
    data = base_config_data(database_url, tmp_path, handoff={"sla": "2bh"})
    cfg = tmp_path / "twoway.yaml"
    cfg.write_text(yaml.safe_dump(data))
    return cfg


def twoway(cfg: Path, *args: str, at: datetime) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "TWOWAY_NOW": at.isoformat()}
    return subprocess.run(
        twoway_cmd(cfg, *args), env=env, capture_output=True, text=True, timeout=120
    )


def test_it_lists_the_waiting_cancels_the_follow_up_and_reports_figures(
    sqlite_url: str, tmp_path: Path
) -> None:
    cfg = write_config(tmp_path, sqlite_url)
    config = base_config(sqlite_url, tmp_path, handoff={"sla": "2bh"})
    clock = [TUESDAY]
    app = App.open(config, lambda: clock[0])
    app.clock = clock  # type: ignore[attr-defined]
    with Worker(app) as worker:  # gone before the commands below (SQLite: one worker)
        start(worker, tmp_path)
    app.close()
    later = TUESDAY + timedelta(hours=3)
    waiting = json.loads(twoway(cfg, "leads", "list", "--waiting", "--json", at=later).stdout)
    assert [(w["email"], w["rep"], w["breached"]) for w in waiting] == [
        (MARIA, "ana@example.com", True)
    ]
    assert waiting[0]["waiting_seconds"] == 3 * 3600 - 30 * 60
    assert {"status", "owner", "score", "company", "campaigns", "since"} <= set(waiting[0])
    human = twoway(cfg, "leads", "list", "--waiting", at=later)
    assert MARIA in human.stdout and "over the SLA" in human.stdout

    done = twoway(cfg, "leads", "followup", "cancel", MARIA, at=later)
    assert done.returncode == 0 and "cancelled" in done.stdout
    again = twoway(cfg, "leads", "followup", "cancel", MARIA, at=later)
    assert again.returncode == 0 and "no follow-up is waiting" in again.stdout
    unknown = twoway(cfg, "leads", "followup", "cancel", "nobody@example.org", at=later)
    assert unknown.returncode == 2 and "Traceback" not in unknown.stderr

    status = json.loads(twoway(cfg, "status", "--json", at=later).stdout)
    speed: dict[str, Any] = status["speed_to_lead"]
    assert speed["sla"] == "2bh"
    assert speed["reps"] == [{"rep": "ana@example.com", "name": "Ana Lopez", "handoffs": 1,
                              "answered": 0, "breaches": 1, "median_seconds": None,
                              "p90_seconds": None}]  # fmt: skip
    assert [w["email"] for w in speed["waiting"]] == [MARIA]
    assert "waiting: " + MARIA in twoway(cfg, "status", at=later).stdout
    app = App.open(load(cfg), lambda: later)
    with app.transaction() as s:
        followup = s.scalars(
            select(OutboundMessage).where(OutboundMessage.kind == "followup")
        ).one()
        assert followup.status == "cancelled"
    app.close()


def load(cfg: Path) -> Any:
    from worker.config import load_config

    return load_config(cfg, env={})


def test_it_upgrades_a_database_made_by_the_previous_revision(database_url: str) -> None:
    from alembic import command

    engine = db.make_engine(database_url)
    command.upgrade(db._alembic_config(engine), "0004_scale")
    assert "handoffs" not in set(inspect(engine).get_table_names())
    now = datetime(2026, 12, 1, 10, 0)
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO leads (id, email, custom, status, reply_token, domain, created_at,"
                " updated_at) VALUES (1, 'a@x.org', '{}', 'prospect', 'tok', 'x.org', :n, :n)"
            ),
            {"n": now},
        )
    db.upgrade(engine)
    assert db.current_revision(engine) == db.head_revision()
    with engine.begin() as conn:
        conn.execute(
            text("INSERT INTO handoffs (lead_id, rep, handed_at) VALUES (1, 'ana@x.org', :n)"),
            {"n": now},
        )
        assert conn.execute(text("SELECT rep FROM handoffs")).scalar() == "ana@x.org"
    engine.dispose()
