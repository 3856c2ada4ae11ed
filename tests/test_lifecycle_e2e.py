"""The whole story against real servers: Dovecot IMAP and aiosmtpd on 127.0.0.1.

20 leads get step 1; eleven kinds of answer land in the mailbox; one pass later exactly the
three genuine repliers are prospects with a rep, a handoff and an in-thread follow-up,
and everybody else is in the state their answer calls for.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
import yaml
from sqlalchemy import func, select

from tests import mails
from tests.conftest import base_config, base_config_data, twoway_cmd
from tests.imap_server import DovecotServer
from tests.smtp_server import SmtpServer
from worker.app import App
from worker.config import load_config
from worker.leads import import_leads, show_lead
from worker.models import InboundMessage, Lead, OutboundMessage, Quarantine
from worker.runner import Worker
from worker.status import collect_status

START = datetime(2026, 12, 1, 10, 0, tzinfo=UTC)


def lead(i: int) -> str:
    return f"lead{i}@company{i}.example.org"


def lead_rows() -> list[tuple[int, dict[str, str]]]:
    rows = []
    for i in range(20):
        rows.append(
            (
                i + 2,
                {
                    "email": f"lead{i}@company{i}.example.org",
                    "first_name": f"Lead{i}",
                    "last_name": "Tester",
                    "company": f"Company {i}",
                    "title": "CTO" if i < 3 else "Analyst",
                    "industry": "software" if i == 1 else "retail",
                    "country": "ES" if i == 0 else ("DE" if i == 1 else "US"),
                    "company_size": "200",
                },
            )
        )
    return rows


@pytest.fixture
def world(
    database_url: str,
    tmp_path: Path,
    dovecot: DovecotServer,
    imap_user: str,
    smtp_server: SmtpServer,
) -> Iterator[dict[str, Any]]:
    smtp = smtp_server.section()
    mailbox = dovecot.mailbox_section(imap_user, idle=False)
    config = base_config(database_url, tmp_path, mailboxes=[mailbox], smtp=smtp)
    clock = [START]
    app = App.open(config, lambda: clock[0])
    with app.transaction() as s:
        import_leads(s, lead_rows(), clock[0], campaign=config.campaign("welcome"))
    worker = Worker(app).start()

    def run_pass(at: datetime) -> None:
        clock[0] = at
        worker.run_once()

    yield {
        "app": app,
        "clock": clock,
        "worker": worker,
        "run_pass": run_pass,
        "smtp": smtp_server,
        "dovecot": dovecot,
        "user": imap_user,
    }
    worker.close()
    app.close()


@pytest.fixture
def killed_world(
    sqlite_url: str, tmp_path: Path, dovecot: DovecotServer, imap_user: str, smtp_server: SmtpServer
) -> Iterator[dict[str, Any]]:
    """The same world, but each pass is `twoway run --once` SIGKILLed at random points
    (zero to two times) and then run again to completion."""
    mailbox = dovecot.mailbox_section(imap_user, idle=False, batch_size=2)
    smtp = smtp_server.section()
    data = base_config_data(sqlite_url, tmp_path, mailboxes=[mailbox], smtp=smtp)
    cfg = tmp_path / "twoway.yaml"
    cfg.write_text(yaml.safe_dump(data))
    config = load_config(cfg, env={})
    clock = [START]
    app = App.open(config, lambda: clock[0])
    with app.transaction() as s:
        import_leads(s, lead_rows(), clock[0], campaign=config.campaign("welcome"))
    rng = random.Random(5)
    kills = [0]

    def run_pass(at: datetime) -> None:
        clock[0] = at
        env = {**os.environ, "TWOWAY_NOW": at.isoformat()}
        cmd = twoway_cmd(cfg, "run", "--once")
        first = at == START  # step 1 goes out whole: the kills come between the steps
        for _ in range(0 if first else rng.randint(1, 2)):
            proc = subprocess.Popen(
                cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
            )
            time.sleep(rng.uniform(0.3, 0.9))
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                kills[0] += 1
            proc.wait(30)
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr

    yield {
        "app": app, "clock": clock, "run_pass": run_pass, "smtp": smtp_server,
        "dovecot": dovecot, "user": imap_user, "kills": kills,
    }  # fmt: skip
    app.close()


def by_recipient(smtp: SmtpServer) -> dict[str, list[EmailMessage]]:
    out: dict[str, list[EmailMessage]] = {}
    for m in smtp.messages:
        for r in m.rcpts:
            out.setdefault(r, []).append(m.parsed())
    return out


def test_it_turns_exactly_the_genuine_repliers_into_prospects(world: dict[str, Any]) -> None:
    scenario(world)


def test_it_ends_the_same_when_killed_and_restarted_between_the_steps(
    killed_world: dict[str, Any],
) -> None:
    scenario(killed_world)
    assert killed_world["kills"][0] >= 3  # the passes really were interrupted


def scenario(world: dict[str, Any]) -> None:
    app: App = world["app"]
    smtp: SmtpServer = world["smtp"]
    dovecot: DovecotServer = world["dovecot"]
    run_pass = world["run_pass"]

    def count(model: Any) -> int:
        with app.transaction() as s:
            return int(s.scalar(select(func.count()).select_from(model)) or 0)

    run_pass(START)
    assert len(smtp.messages) == 20
    sent = {k: v[0] for k, v in by_recipient(smtp).items()}
    assert len(sent) == 20
    step1 = {k: str(v["Subject"]) for k, v in sent.items()}

    at = START + timedelta(hours=1)
    back = (START + timedelta(days=9)).date()
    inbox = [
        mails.reply(sent[lead(0)], "Yes please, send me pricing and let's book a demo.", at, name="Lead0 Tester"),
        mails.outlook_reply(sent[lead(1)], "Interesting. What does a pilot cost for 10 users?", at),
        mails.reply(
            sent[lead(2)], "Could we talk about your timeline next week?", at,
            threaded=False, to="sales@example.com", subject="Question about your product", quote=False,
        ),
        mails.exchange_ooo(sent[lead(3)], back, at),
        mails.gmail_vacation(sent[lead(4)], at),
        mails.dsn(sent[lead(5)], lead(5), "5.1.1", f"550 5.1.1 <{lead(5)}>: User unknown", at),
        mails.dsn(sent[lead(6)], lead(6), "4.2.2", "452 4.2.2 Mailbox full", at),
        mails.reply(sent[lead(7)], "Unsubscribe", at),
        mails.reply(sent[lead(8)], "Thanks, but we are not interested.", at),
        mails.reply(
            sent[lead(9)],
            "I'm not the right person for this. Please contact my colleague jane.doe@company9.example.org, she runs purchasing.",
            at,
        ),
        mails.newsletter("sales@example.com", at),
    ]  # fmt: skip
    for raw in inbox:
        dovecot.append(world["user"], "INBOX", raw)
    flags_before = dovecot.flags(world["user"], "INBOX")

    run_pass(START + timedelta(hours=2))
    assert count(InboundMessage) == 11
    assert count(Quarantine) == 0

    with app.transaction() as s:
        status = {row.email: row for row in s.scalars(select(Lead))}
        prospects = sorted(e for e, row in status.items() if row.status == "prospect")
        assert prospects == [lead(0), lead(1), lead(2)]
        assert status[lead(0)].owner == "ana@example.com"  # country rule
        assert status[lead(1)].owner == "ben@example.com"  # industry rule
        assert status[lead(2)].owner == "chloe@example.com"  # the round-robin pool
        assert status[lead(5)].status == "bounced"
        assert status[lead(6)].status == "lead"  # one soft bounce is not enough
        assert status[lead(7)].status == "unsubscribed"
        assert status[lead(8)].status == "disqualified"
        referred = status.get("jane.doe@company9.example.org")
        assert referred is not None and referred.source == "referral"
        assert referred.referred_by_id == status[lead(9)].id
        shown = {
            e: show_lead(s, e)
            for e in (lead(0), lead(1), lead(2), lead(3), lead(4), lead(6), lead(9))
        }
    # The bounce's reason travels to the timeline and to `status`: soft bounces by reason.
    assert "(mailbox_full)" in shown[lead(6)]["events"][-1]["cause"]
    assert shown[lead(6)]["messages"][-1]["bounce"]["reason"] == "mailbox_full"
    assert collect_status(app)["soft_bounces"] == {"mailbox_full": 1}

    def last_in(email: str) -> dict[str, Any]:
        """The lead's latest inbound message: the handoff it caused is listed after it."""
        inbound: list[dict[str, Any]] = [
            m for m in shown[email]["messages"] if m["direction"] == "in"
        ]
        return inbound[-1]

    assert last_in(lead(0))["match"] in ("reply_token", "message_id")
    assert last_in(lead(1))["match"] == "reply_token"
    assert last_in(lead(2))["match"] == "sender"
    assert shown[lead(3)]["enrollments"][0]["state"] == "paused"
    # "out until December 10": back on the 10th or the 11th depending on the reading.
    resume = {f"{(back + timedelta(days=d)).isoformat()}T00:00:00Z" for d in (0, 1)}
    assert shown[lead(3)]["enrollments"][0]["paused_until"] in resume
    assert (
        shown[lead(4)]["status"] == "lead" and shown[lead(4)]["enrollments"][0]["state"] == "active"
    )
    assert shown[lead(9)]["enrollments"][0]["state"] == "stopped"

    # A kill during an SMTP call leaves that send `unknown` (reported, never resent):
    # every message below was delivered exactly once, or is one of those.
    def unknown(kind: str, to: str) -> int:
        with app.transaction() as s:
            return int(
                s.scalar(
                    select(func.count()).where(
                        OutboundMessage.status == "unknown",
                        OutboundMessage.kind == kind,
                        OutboundMessage.to_addr == to,
                    )
                )
                or 0
            )

    if "kills" not in world:
        with app.transaction() as s:
            assert not s.scalar(select(func.count()).where(OutboundMessage.status == "unknown"))

    # Each rep got exactly one briefing, with the reply text and the original attached,
    # and one reply-ready copy of the prospect's message to answer from.
    got = by_recipient(smtp)
    for rep, prospect, words in (
        ("ana@example.com", lead(0), "send me pricing"),
        ("ben@example.com", lead(1), "pilot cost"),
        ("chloe@example.com", lead(2), "timeline next week"),
    ):
        to_rep = got.get(rep, [])
        briefings = [m for m in to_rep if m["Reply-To"] is None]
        copies = [m for m in to_rep if m["Reply-To"] is not None]
        assert len(briefings) + unknown("handoff", rep) == 1, rep
        assert len(copies) + unknown("rep_copy", rep) == 1, rep
        for copy in copies:
            assert prospect in str(copy["Reply-To"])
        # The follow-up in the rep's name waits for the rep to answer first.
        assert [m for m in got[prospect] if str(m["Subject"]) != step1[prospect]] == []
        if not briefings:
            continue
        handoff = briefings[0]
        assert prospect not in str(handoff["To"]) + str(handoff["From"])
        body = handoff.get_body(("plain",))
        assert body is not None and words in body.get_content()
        attached = [p.get_content_type() for p in handoff.iter_attachments()]
        assert attached == ["message/rfc822"]
    # The referred colleague got step 1 of the same campaign in the same pass.
    jane = "jane.doe@company9.example.org"
    assert len(got.get(jane, [])) + unknown("nurture", jane) == 1
    # Reading changed no flags.
    assert dovecot.flags(world["user"], "INBOX") == flags_before

    # Running again changes nothing.
    before = len(smtp.messages)
    rows = count(OutboundMessage)
    run_pass(START + timedelta(hours=2))
    assert (len(smtp.messages), count(InboundMessage), count(OutboundMessage)) == (before, 11, rows)

    # No rep answered: one business hour later each prospect gets one in-thread follow-up.
    run_pass(START + timedelta(hours=3, minutes=5))
    got = by_recipient(smtp)
    for prospect in (lead(0), lead(1), lead(2)):
        follow = [m for m in got[prospect] if str(m["Subject"]) != step1[prospect]]
        assert len(follow) + unknown("followup", prospect) == 1
        for m in follow:
            assert str(m["Subject"]).lower().startswith("re:")
            assert m["In-Reply-To"] is not None
    before = len(smtp.messages)

    # Three days later step 2 goes only to leads still in `lead` and not paused.
    run_pass(START + timedelta(days=3, hours=1))
    step2 = {r for m in smtp.messages[before:] for r in m.rcpts}
    step2 |= {a for a in (lead(i) for i in range(20)) if unknown("nurture", a) and a not in step2}
    expected = {lead(i) for i in (4, 6)} | {lead(i) for i in range(10, 20)}
    assert step2 == expected

    # After the return date the out-of-office lead resumes and gets step 2.
    n = len(smtp.messages)
    run_pass(START + timedelta(days=11, hours=1))
    resumed = [m for m in smtp.messages[n:] if lead(3) in m.rcpts]
    assert len(resumed) + unknown("nurture", lead(3)) == 1
    with app.transaction() as s:
        steps = s.scalars(
            select(OutboundMessage.step).where(
                OutboundMessage.to_addr == lead(3), OutboundMessage.kind == "nurture"
            )
        ).all()
    # Step 2 after the pause, not step 3.
    assert sorted(st for st in steps if st is not None) == [0, 1]


def test_it_changes_nothing_when_the_same_message_arrives_twice(world: dict[str, Any]) -> None:
    worker: Worker = world["worker"]
    smtp: SmtpServer = world["smtp"]
    worker.run_once()
    sent = {k: v[0] for k, v in by_recipient(smtp).items()}
    raw = mails.reply(
        sent["lead0@company0.example.org"], "Send pricing please", START + timedelta(hours=1)
    )
    world["dovecot"].append(world["user"], "INBOX", raw)
    world["dovecot"].append(world["user"], "INBOX", raw)  # the same message delivered twice
    result = worker.run_once()
    assert (result.inbound.processed, result.inbound.duplicates) == (1, 1)
    with world["app"].transaction() as s:
        handoffs = s.scalars(select(OutboundMessage).where(OutboundMessage.kind == "handoff")).all()
        assert len(handoffs) == 1


def test_it_tells_the_owner_of_every_later_reply_once(world: dict[str, Any]) -> None:
    worker: Worker = world["worker"]
    smtp: SmtpServer = world["smtp"]
    worker.run_once()
    sent = {k: v[0] for k, v in by_recipient(smtp).items()}
    first = mails.reply(sent["lead0@company0.example.org"], "Send pricing please", START)
    world["dovecot"].append(world["user"], "INBOX", first)
    worker.run_once()
    later = mails.reply(
        sent["lead0@company0.example.org"],
        "Also: can we start in March?",
        START + timedelta(hours=3),
    )
    world["dovecot"].append(world["user"], "INBOX", later)
    worker.run_once()
    worker.run_once()  # nothing more
    to_ana = by_recipient(smtp)["ana@example.com"]
    subjects = [str(m["Subject"]) for m in to_ana]
    briefings = [m for m in to_ana if m["Reply-To"] is None]
    subjects = [str(m["Subject"]) for m in briefings]
    assert len(to_ana) == 4  # per message: a briefing and a reply-ready copy
    assert len(subjects) == 2 and subjects[0].startswith("New prospect: Lead0 Tester")
    assert subjects[1] == "New reply from Lead0 Tester (Company 0), your prospect"
    body = briefings[1].get_body(("plain",))
    assert body is not None and "start in March" in body.get_content()
    assert "already your prospect" in body.get_content()
    copies = [m for m in to_ana if m["Reply-To"] is not None]
    assert "lead0@company0.example.org" in str(copies[1]["Reply-To"])
    assert "start in March" in str(copies[1].get_body(("plain",)).get_content())  # type: ignore[union-attr]
