"""Lead states as a user meets them: which moves happen, which are refused, and `held`.

`held` (a reply below the minimum fit, waiting for a person) was called `engaged` before
migration 0003_shape, the same word the funnel uses for "wrote back".
"""

from __future__ import annotations

import json
import mailbox
from pathlib import Path

import yaml
from click.testing import CliRunner, Result
from sqlalchemy import select, text

from tests.conftest import base_config_data
from worker.cli import main
from worker.db import make_engine, upgrade
from worker.models import Lead, LeadEvent, LeadStatus

NOW = "2026-12-01T10:00:00Z"


def write_config(tmp_path: Path, database_url: str, **overrides: object) -> Path:
    path = tmp_path / "twoway.yaml"
    path.write_text(yaml.safe_dump(base_config_data(database_url, tmp_path, **overrides)))
    return path


def twoway(cfg: Path, *args: str, now: str = NOW) -> Result:
    return CliRunner().invoke(main, ["--config", str(cfg), *args], env={"TWOWAY_NOW": now})


def reply_from(tmp_path: Path, email: str, body: str) -> None:
    """The lead answers step 1 (found in the Maildir outbox) into the sales inbox."""
    sent = next(m for m in mailbox.Maildir(tmp_path / "outbox") if email in str(m["To"]))
    (tmp_path / "inbox" / "new" / f"reply-{email}").write_text(
        f"From: {email}\r\nTo: {sent['Reply-To']}\r\nSubject: Re: {sent['Subject']}\r\n"
        f"Message-ID: <r.{email}>\r\nIn-Reply-To: {sent['Message-ID']}\r\n\r\n{body}\r\n"
    )


def test_it_holds_a_reply_below_the_minimum_fit_and_the_funnel_still_counts_it_engaged(
    tmp_path: Path, database_url: str
) -> None:
    qualification = {"require_fit": True, "fit": {"industries": ["software"]}}
    cfg = write_config(tmp_path, database_url, qualification=qualification)
    csv_file = tmp_path / "leads.csv"
    csv_file.write_text("email,industry\nsam@shop.example.org,retail\n")
    assert twoway(cfg, "leads", "import", str(csv_file), "--campaign", "welcome").exit_code == 0
    assert twoway(cfg, "run", "--once").exit_code == 0
    reply_from(tmp_path, "sam@shop.example.org", "Sounds good, what does it cost?")
    assert twoway(cfg, "run", "--once", now="2026-12-01T11:00:00Z").exit_code == 0

    listed = twoway(cfg, "leads", "list", "--status", "held", "--json")
    assert [lead["email"] for lead in json.loads(listed.output)] == ["sam@shop.example.org"]
    status = json.loads(twoway(cfg, "status", "--json").output)
    assert status["leads"]["held"] == 1 and "engaged" not in status["leads"]
    assert status["funnel"][0]["engaged"] == 1 and status["funnel"][0]["prospects"] == 0
    shown = json.loads(twoway(cfg, "leads", "show", "sam@shop.example.org", "--json").output)
    held = [e for e in shown["events"] if e["type"] == "held"]
    assert [(e["from_status"], e["to_status"]) for e in held] == [("lead", "held")]

    old_name = twoway(cfg, "leads", "list", "--status", "engaged")
    assert old_name.exit_code == 2
    assert "renamed `held`" in old_name.output and "Traceback" not in old_name.output


def test_it_refuses_by_hand_the_moves_nobody_may_make(tmp_path: Path, database_url: str) -> None:
    cfg = write_config(tmp_path, database_url)
    csv_file = tmp_path / "leads.csv"
    csv_file.write_text("email\numa@example.org\nvic@example.org\n")
    assert twoway(cfg, "leads", "import", str(csv_file), "--campaign", "welcome").exit_code == 0
    assert twoway(cfg, "leads", "mark", "uma@example.org", "unsubscribed").exit_code == 0

    for status in ("lead", "customer"):  # customer, then lead, would be a way round
        back = twoway(cfg, "leads", "mark", "uma@example.org", status)
        assert back.exit_code == 2
        assert "asked to stop" in back.output and "Traceback" not in back.output
    held = twoway(cfg, "leads", "mark", "vic@example.org", "held")
    assert held.exit_code == 2 and "verdict" in held.output

    # What is allowed by hand still works, and each move is one event with both ends.
    assert twoway(cfg, "leads", "mark", "vic@example.org", "customer").exit_code == 0
    assert twoway(cfg, "leads", "mark", "vic@example.org", "lead").exit_code == 0
    shown = json.loads(twoway(cfg, "leads", "show", "vic@example.org", "--json").output)
    moves = [(e["from_status"], e["to_status"]) for e in shown["events"] if e["type"] == "status"]
    assert moves == [("lead", "customer"), ("customer", "lead")]
    assert shown["status"] == "lead"


def test_it_renames_engaged_to_held_when_upgrading_a_database_from_0002(
    database_url: str,
) -> None:
    from alembic import command

    from worker.db import _alembic_config

    engine = make_engine(database_url)
    command.upgrade(_alembic_config(engine), "0002_mkt")
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO leads (id, email, custom, status, reply_token, domain, created_at,"
                " updated_at) VALUES (1, 'kim@example.org', '{}', 'engaged', 'abc', 'example.org',"
                " '2026-11-30 10:00:00', '2026-11-30 10:00:00')"
            )
        )
        conn.execute(
            text(
                "INSERT INTO lead_events (lead_id, at, type, from_status, to_status, cause, detail)"
                " VALUES (1, '2026-11-30 10:00:00', 'held', 'lead', 'engaged', 'a reply', '{}')"
            )
        )
    upgrade(engine)
    with engine.connect() as conn:
        assert conn.execute(text("SELECT status FROM leads")).scalar() == "held"
    from sqlalchemy.orm import Session

    with Session(engine) as s:
        lead = s.scalar(select(Lead))
        event = s.scalar(select(LeadEvent))
        assert lead is not None and lead.status is LeadStatus.HELD
        assert event is not None and event.to_status is LeadStatus.HELD
    engine.dispose()


def test_every_enrollment_and_outbox_move_names_real_states_and_refuses_others() -> None:
    from worker.models import Enrollment, EnrollmentState, OutboundMessage, OutboxState
    from worker.states import (
        ENROLLMENT_MOVES,
        OUTBOX_MOVES,
        StateError,
        enrollments,
        move_enrollment,
        move_outbox,
    )

    for moves in (ENROLLMENT_MOVES, OUTBOX_MOVES):
        for move in moves.values():
            assert move.sources and move.targets
    # The bulk UPDATE's WHERE names exactly the move's sources.
    sql = str(enrollments("resumed", Enrollment.lead_id == 1).compile())
    assert "enrollments.state IN" in sql and "enrollments.lead_id =" in sql
    done = Enrollment(id=1, state=EnrollmentState.COMPLETED)
    try:
        move_enrollment(done, "paused")
    except StateError as e:
        assert "paused cannot start from completed" in str(e)
    else:
        raise AssertionError("paused a completed enrollment")
    assert done.state == EnrollmentState.COMPLETED
    sent = OutboundMessage(id=2, status=OutboxState.SENT)
    try:
        move_outbox(sent, "cancelled")
    except StateError:
        pass
    else:
        raise AssertionError("cancelled a sent message")
    queued = OutboundMessage(id=3, status=OutboxState.QUEUED)
    move_outbox(queued, "claimed")
    assert queued.status == OutboxState.SENDING
