"""The rep's side end to end, on Dovecot and aiosmtpd: the reply path cannot leak, and
speed to lead is enforced.

A lead replies; the rep receives the handoff. The rep's mail client is simulated
(tests/mail_client.py): Reply and Reply All to each message the rep received, quoting the
whole message, sent through SMTP; what reaches the sales address is delivered to the
sales mailbox twoway reads. Then, without an answer: the follow-up, the reminder and the
escalation, each once and in business hours, with the worker SIGKILLed between steps.
"""

from __future__ import annotations

import json
import os
import random
import signal
import smtplib
import subprocess
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
import yaml
from sqlalchemy import select

from tests import mails
from tests.conftest import base_config, base_config_data, twoway_cmd
from tests.imap_server import DovecotServer
from tests.mail_client import compose_reply
from tests.smtp_server import HOST, SmtpServer
from worker.app import App
from worker.config import load_config
from worker.leads import import_leads, show_lead
from worker.models import Handoff, InboundMessage, Lead, LeadEvent, OutboundMessage
from worker.runner import Worker

START = datetime(2026, 12, 1, 10, 0, tzinfo=UTC)  # a Tuesday
MARIA = "maria@nube.example.org"
ANA = "ana@example.com"
BOSS = "boss@example.com"
ASK = "Hola, could you send pricing for 25 seats? A demo next week would be great."

LEADS: list[tuple[int, dict[str, str | None]]] = [
    (2, {"email": MARIA, "first_name": "María", "last_name": "García",
         "company": "Soluciones Nube", "title": "CTO", "country": "ES", "company_size": "120"}),
    (3, {"email": "pedro@nube.example.org", "first_name": "Pedro", "last_name": "Ruiz",
         "company": "Soluciones Nube", "title": "Head of IT", "country": "ES"}),
]  # fmt: skip
HANDOFF = {"sla": "2bh", "escalate_after": "4bh", "escalate_to": BOSS}


def to(smtp: SmtpServer, address: str, since: int = 0) -> list[EmailMessage]:
    return [m.parsed() for m in smtp.messages[since:] if address in m.rcpts]


def text_of(msg: EmailMessage) -> str:
    """Everything a reader can see in a message: its text and HTML parts."""
    out = []
    for part in msg.walk():
        if part.get_content_type() in ("text/plain", "text/html"):
            out.append(str(part.get_content()))
    return "\n".join(out)


def deliver_to_sales(smtp: SmtpServer, dovecot: DovecotServer, user: str, since: int) -> int:
    """What the rep's provider would do: mail to the sales addresses lands in its mailbox."""
    n = 0
    for m in smtp.messages[since:]:
        if any(r.split("@")[0].split("+")[0] == "sales" for r in m.rcpts):
            dovecot.append(user, "INBOX", m.raw)
            n += 1
    return n


@pytest.fixture
def world(
    database_url: str, tmp_path: Path, dovecot: DovecotServer, imap_user: str,
    smtp_server: SmtpServer,
) -> Iterator[dict[str, Any]]:  # fmt: skip
    mailbox = dovecot.mailbox_section(imap_user, idle=False)
    config = base_config(
        database_url, tmp_path, mailboxes=[mailbox], smtp=smtp_server.section(), handoff=HANDOFF
    )
    clock = [START]
    app = App.open(config, lambda: clock[0])
    with app.transaction() as s:
        import_leads(s, LEADS, START, campaign=config.campaign("welcome"))
    worker = Worker(app).start()

    def run_pass(at: datetime) -> None:
        clock[0] = at
        worker.run_once()

    yield {"app": app, "run_pass": run_pass, "smtp": smtp_server, "dovecot": dovecot,
           "user": imap_user}  # fmt: skip
    worker.close()
    app.close()


def test_it_lets_no_reply_of_the_rep_leak_and_records_the_answer(world: dict[str, Any]) -> None:
    app: App = world["app"]
    smtp: SmtpServer = world["smtp"]
    dovecot: DovecotServer = world["dovecot"]
    run_pass = world["run_pass"]

    run_pass(START)
    step1 = to(smtp, MARIA)[0]
    answer = mails.reply(step1, ASK, START + timedelta(minutes=20), name="María García")
    dovecot.append(world["user"], "INBOX", answer)
    hers = mails_parsed(answer)
    run_pass(START + timedelta(minutes=30))

    received = to(smtp, ANA)
    assert len(received) == 2  # the briefing and her own message to answer from
    briefing = next(m for m in received if m["Reply-To"] is None)
    brief = text_of(briefing)
    assert "Pedro Ruiz, Head of IT" in brief  # the colleague paused because of her
    # The follow-up in her name is announced, with its time, its text and how to stop it.
    assert "If you have not answered by 11:30 on Tue 01 Dec (UTC)" in brief
    assert f"twoway leads followup cancel {MARIA}" in brief
    assert "You asked about pricing" in brief

    with app.transaction() as s:
        lead = s.scalar(select(Lead).where(Lead.email == MARIA))
        assert lead is not None
        token = lead.reply_token
        checklist = [c["criterion"] for c in (lead.qualification or {})["checklist"]]
        reason = s.scalar(
            select(LeadEvent.cause).where(
                LeadEvent.lead_id == lead.id, LeadEvent.type == "assigned"
            )
        )
    assert checklist and reason
    internal = ["fit score", "FIT: score", "Internal", "How we know", "WHY YOU", str(reason),
                *checklist, "twoway leads", token]  # fmt: skip
    assert all(s in brief for s in ("Internal", str(reason), checklist[0]))  # they are there

    # The rep presses Reply, then Reply All, on each message they received.
    sent_before = len(smtp.messages)
    with smtplib.SMTP(HOST, smtp.port, timeout=10) as client:
        for msg in received:
            for reply_all in (False, True):
                mine = compose_reply(
                    msg, name="Ana Lopez", address=ANA, reply_all=reply_all,
                    body="Hola María, gracias. Pricing for 25 seats is attached; Tuesday 10:00?",
                    at=START + timedelta(minutes=35),
                )  # fmt: skip
                rcpts = [a.strip() for a in str(mine["To"]).split(",")]
                # SMTP wants CRLF lines; smtplib does not convert bytes.
                client.sendmail(ANA, rcpts, mine.as_bytes(policy=mine.policy.clone(linesep="\r\n")))
    prospect_copies = to(smtp, MARIA, sent_before)
    assert len(prospect_copies) == 2  # Reply and Reply All on her message; none from the briefing
    for copy in prospect_copies:
        seen = text_of(copy) + "\n" + str(copy["Subject"])
        for secret in internal:
            assert secret not in seen, secret
        assert "Hola María, gracias" in seen and "25 seats" in seen
        # Her thread: Re: her subject, In-Reply-To her message, References ending with it.
        assert str(copy["Subject"]) == str(hers["Subject"])  # already "Re: …"
        assert str(copy["In-Reply-To"]) == str(hers["Message-ID"])
        refs = str(copy["References"]).split()
        assert refs[-1] == str(hers["Message-ID"]) and str(step1["Message-ID"]) in refs
        # The token is only in the sales address among the recipients, nowhere else.
        headers = {k: str(v) for k, v in copy.items() if k.lower() not in ("to", "cc")}
        assert token not in json.dumps(headers)
        assert f"sales+{token}@example.com" in str(copy["To"])
    assert deliver_to_sales(smtp, dovecot, world["user"], sent_before) == 4

    run_pass(START + timedelta(minutes=40))
    with app.transaction() as s:
        shown = show_lead(s, MARIA)
        handoff = s.scalars(select(Handoff)).one()
        followup = s.scalars(
            select(OutboundMessage).where(OutboundMessage.kind == "followup")
        ).one()
        answers = s.scalars(
            select(InboundMessage).where(InboundMessage.match_method == "rep_answer")
        ).all()
    types = [e["type"] for e in shown["events"]]
    assert shown["status"] == "prospect"
    assert types.count("rep_answered") == 1 and "replied" not in types  # never a lead's reply
    assert handoff.answered_by == ANA and handoff.answered_at == START + timedelta(minutes=35)
    assert followup.status == "cancelled"
    assert len(answers) == 2  # the two answers that went to her; the briefing replies did not
    assert len(to(smtp, ANA)) == 2  # her thread's news is not handed over again

    # Later: no follow-up, reminder or escalation; the rep's figures count the answer.
    count = len(smtp.messages)
    run_pass(START + timedelta(hours=5))
    run_pass(START + timedelta(days=1))
    assert len(smtp.messages) == count
    with app.transaction() as s:
        from worker.handoffs import speed_to_lead

        figures = speed_to_lead(s, app.config, START + timedelta(days=1))
    assert figures["reps"] == [{"rep": ANA, "name": "Ana Lopez", "handoffs": 1, "answered": 1,
                                "breaches": 0, "median_seconds": 300, "p90_seconds": 300}]  # fmt: skip
    assert figures["waiting"] == []


def mails_parsed(raw: bytes) -> EmailMessage:
    from email import policy
    from email.parser import BytesParser

    return BytesParser(policy=policy.default).parsebytes(raw)


# --- without an answer, killed between the steps ----------------------------------------


def in_business_hours(at: datetime) -> bool:
    return at.weekday() < 5 and 9 <= at.hour < 17


def test_it_follows_up_reminds_and_escalates_once_each_when_killed_between_steps(
    sqlite_url: str, tmp_path: Path, dovecot: DovecotServer, imap_user: str,
    smtp_server: SmtpServer,
) -> None:  # fmt: skip
    mailbox = dovecot.mailbox_section(imap_user, idle=False)
    data = base_config_data(
        sqlite_url, tmp_path, mailboxes=[mailbox], smtp=smtp_server.section(), handoff=HANDOFF
    )
    cfg = tmp_path / "twoway.yaml"
    cfg.write_text(yaml.safe_dump(data))
    config = load_config(cfg, env={})
    app = App.open(config, lambda: START)
    with app.transaction() as s:
        import_leads(s, LEADS[:1], START, campaign=config.campaign("welcome"))
    rng = random.Random(13)
    kills = 0
    took = 1.0  # how long the last whole pass took: the kills land within that, on any machine

    def run_pass(at: datetime, kill: bool = True) -> None:
        nonlocal kills, took
        env = {**os.environ, "TWOWAY_NOW": at.isoformat()}
        cmd = twoway_cmd(cfg, "run", "--once")
        for _ in range(int(kill)):  # one run killed at a random point, then one to completion
            proc = subprocess.Popen(
                cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
            )
            time.sleep(rng.uniform(0.4, 0.95) * took)
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                kills += 1
            proc.wait(30)
        started = time.monotonic()
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
        took = time.monotonic() - started
        assert done.returncode == 0, done.stderr

    def unknown(kind: str) -> int:
        """Sends a kill during the SMTP call left `unknown` (reported, never resent) whose
        message did not arrive (one that did is counted at the server)."""
        arrived = {str(m.parsed()["Message-ID"]).strip("<>") for m in smtp_server.messages}
        with app.transaction() as s:
            rows = s.scalars(
                select(OutboundMessage.message_id).where(
                    OutboundMessage.kind == kind, OutboundMessage.status == "unknown"
                )
            ).all()
        return len([r for r in rows if r not in arrived])

    def got(address: str, *kinds: str) -> int:
        return len(to(smtp_server, address)) + sum(unknown(k) for k in kinds)

    # Step 1 is not what this test is about: a kill between its claim and its DATA would
    # leave it `unknown` (never resent), and there would be nothing to reply to.
    run_pass(START, kill=False)
    step1 = to(smtp_server, MARIA)[0]
    handed = START.replace(hour=15, minute=30)  # Tuesday 15:30 UTC
    dovecot.append(
        imap_user, "INBOX", mails.reply(step1, ASK, handed - timedelta(minutes=10), name="María")
    )
    run_pass(handed)
    assert got(ANA, "handoff", "rep_copy") == 2
    # Follow-up after one business hour: 16:30, before the day closes.
    run_pass(handed + timedelta(minutes=30))
    assert len(to(smtp_server, MARIA)) == 1  # only step 1 so far
    run_pass(handed + timedelta(hours=1, minutes=5))
    assert got(MARIA, "followup") == 2  # step 1 and the follow-up
    # The SLA (2bh) runs out Wednesday 09:30: nothing happens overnight.
    run_pass(handed + timedelta(hours=3))
    assert got(ANA, "handoff", "rep_copy", "reminder") == 2
    wednesday = handed + timedelta(days=1)
    run_pass(wednesday.replace(hour=9, minute=35))
    assert got(ANA, "handoff", "rep_copy", "reminder") == 3  # one reminder
    # The escalation (4bh): Wednesday 11:30, once.
    run_pass(wednesday.replace(hour=11, minute=35))
    assert got(BOSS, "escalation") == 1
    count = len(smtp_server.messages)
    run_pass(wednesday.replace(hour=11, minute=35))
    run_pass(wednesday + timedelta(days=1))
    assert len(smtp_server.messages) == count  # a second pass sends nothing more

    with app.transaction() as s:
        rows = s.scalars(
            select(OutboundMessage).where(
                OutboundMessage.kind.in_(("followup", "reminder", "escalation"))
            )
        ).all()
        assert sorted(r.kind for r in rows) == ["escalation", "followup", "reminder"]
        for r in rows:
            assert r.status in ("sent", "unknown"), (r.kind, r.status, r.last_error)
            assert r.sent_at is None or in_business_hours(r.sent_at), (r.kind, r.sent_at)
        h = s.scalars(select(Handoff)).one()
        assert h.answered_at is None and h.reminded_at and h.escalated_at
    followup = next(m for m in to(smtp_server, MARIA) if m["In-Reply-To"] is not None)
    assert "pricing" in text_of(followup) and "invitation" in text_of(followup)
    assert "unsubscribe" not in text_of(followup).lower()
    assert str(followup["From"]) == "Ana Lopez <ana@example.com>"
    app.close()
    assert kills >= 3, kills  # the passes really were interrupted
