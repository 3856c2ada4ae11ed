"""Hostile mail on the real stack: every attack is read, recorded and passed, and the
genuine replies behind it are applied in the same pass (`twoway run --once`)."""

from __future__ import annotations

import mailbox
import os
import subprocess
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from sqlalchemy import select

from tests import hostile
from tests.conftest import base_config, base_config_data, twoway_cmd
from tests.smtp_server import SmtpServer
from worker.app import App
from worker.config import load_config
from worker.leads import import_leads
from worker.models import InboundMessage, Lead, LeadEvent, LeadStatus, OutboundMessage, Quarantine
from worker.runner import Worker

SCALES = {"big_attachment": 0.15}  # 10 MB: the size bound is the same, the test faster


def test_it_reads_past_every_hostile_message_in_one_pass(sqlite_url: str, tmp_path: Path) -> None:
    attacks = sorted(hostile.ATTACKS)
    data = base_config_data(sqlite_url, tmp_path, campaigns=[])
    cfg = tmp_path / "twoway.yaml"
    cfg.write_text(yaml.safe_dump(data))
    config = load_config(cfg, env={})
    app = App.open(config, lambda: hostile.NOW_HINT)
    people = [f"{name.replace('_', '-')}@attacker.example.net" for name in attacks]
    genuine = [f"buyer{i}@company{i}.example.org" for i in range(3)]
    with app.transaction() as s:
        import_leads(
            s, [(i + 2, {"email": a}) for i, a in enumerate(people + genuine)], hostile.NOW_HINT
        )
    inbox = mailbox.Maildir(tmp_path / "inbox")
    for name, sender in zip(attacks, people, strict=True):
        inbox.add(hostile.ATTACKS[name](sender, "sales@example.com", SCALES.get(name, 1.0)))
    for i, sender in enumerate(genuine):  # behind every attack
        inbox.add(hostile.long_line(sender, "sales@example.com", 0.0001) + f"({i})".encode())
    env = {**os.environ, "TWOWAY_NOW": hostile.NOW_HINT.isoformat()}
    done = subprocess.run(
        twoway_cmd(cfg, "run", "--once"), env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    with app.transaction() as s:
        rows = {r.from_addr: r for r in s.scalars(select(InboundMessage))}
        status = dict(s.execute(select(Lead.email, Lead.status)).all())
        assert s.scalars(select(Quarantine)).all() == []
    assert set(rows) == set(people + genuine)  # every message recorded once
    assert all(status[g] == "prospect" for g in genuine)  # the replies behind were applied
    bounded = {
        a for a, r in zip(attacks, people, strict=True) if "bounded:" in (rows[r].reason or "")
    }
    # What was cut is said where the message is shown (`leads show`, `inspect`).
    assert {"long_line", "subject_words", "many_lines", "many_parts", "big_attachment"} <= bounded
    assert (
        "header subject of" in (rows[people[attacks.index("subject_words")]].reason or "").lower()
    )
    app.close()


def test_it_keeps_every_line_it_sends_within_998_octets(
    sqlite_url: str,
    tmp_path: Path,
    smtp_server: SmtpServer,
    start_worker: Callable[[App], Worker],
) -> None:
    """aiosmtpd answers `500 Line too long` past RFC 5321's limit, as real servers do."""
    config = base_config(
        sqlite_url, tmp_path, campaigns=[], smtp=smtp_server.section(),
        handoff={"follow_up": {"template": "followup/thanks", "delay": "0h", "from": "rep"}},
    )  # fmt: skip
    app = App.open(config, lambda: hostile.NOW_HINT)
    people = ["long@northwind.example", "wide@contoso.example"]
    with app.transaction() as s:
        import_leads(s, [(i + 2, {"email": a}) for i, a in enumerate(people)], hostile.NOW_HINT)
    inbox = mailbox.Maildir(tmp_path / "inbox")
    line = "We would like pricing for " + "twelve seats " * 115  # 1,521 characters
    inbox.add(
        f"From: {people[0]}\r\nTo: sales@example.com\r\nSubject: Re: Welcome\r\n"
        "Message-ID: <odd@id@northwind.example>\r\nContent-Type: text/plain\r\n\r\n"
        f"{line}\r\n".encode()
    )
    inbox.add(
        f"From: {people[1]}\r\nTo: sales@example.com\r\nSubject: Re: Welcome\r\n"
        f"Message-ID: <{'m' * 940}@contoso.example>\r\n"
        "Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
        "Preise für zwölf Plätze, bitte.\r\n".encode()
        * 60
    )
    worker = start_worker(app)
    worker.run_once()
    got = {tuple(m.rcpts): m for m in smtp_server.messages}
    with app.transaction() as s:
        rows = Counter(s.execute(select(OutboundMessage.kind, OutboundMessage.status)).all())
    # Per reply: the rep's briefing, the reply-ready copy of it, the follow-up.
    expected = {("handoff", "sent"): 2, ("rep_copy", "sent"): 2, ("followup", "sent"): 2}
    assert rows == Counter(expected), rows
    assert {p for p in people} <= {r for rs in got for r in rs}  # both follow-ups arrived
    for m in smtp_server.messages:
        assert max(len(x) for x in m.raw.split(b"\r\n")) <= 998
    handoffs = [
        m.parsed()
        for m in smtp_server.messages
        if m.rcpts[0] not in people and any(True for _ in m.parsed().iter_attachments())
    ]
    attached = {
        part.get_content_type(): part.get_filename()
        for h in handoffs
        for part in h.iter_attachments()
    }
    # The 1,521-character line travels inside a file; the 8-bit original as a message.
    assert attached == {
        "application/octet-stream": "original-reply.eml",
        "message/rfc822": "original-reply.eml",
    }


def test_it_promotes_a_genuine_reply_with_a_nul_byte_on_every_database(
    database_url: str,
    tmp_path: Path,
    start_worker: Callable[[App], Worker],
) -> None:
    """PostgreSQL text cannot hold NUL: the reply must not be quarantined for it."""
    config = base_config(database_url, tmp_path, campaigns=[])
    app = App.open(config, lambda: hostile.NOW_HINT)
    with app.transaction() as s:
        import_leads(s, [(2, {"email": "nul@northwind.example"})], hostile.NOW_HINT)
    mailbox.Maildir(tmp_path / "inbox").add(
        b"From: Nu\x00l <nul@northwind.example>\r\nTo: sales@example.com\r\n"
        b"Subject: Re: Wel\x00come\r\nMessage-ID: <nul.1@northwind.example>\r\n"
        b"Content-Type: text/plain\r\n\r\nYes, send me pricing\x00 please.\r\n"
    )
    worker = start_worker(app)
    worker.run_once()
    with app.transaction() as s:
        assert s.scalars(select(Quarantine)).all() == []
        assert s.scalar(select(Lead.status)) == "prospect"
        row = s.scalars(select(InboundMessage)).one()
        assert row.subject == "Re: Welcome" and "pricing please" in (row.reply_text or "")


def forged_dsn(victim: str, n: int, auth: str = "") -> bytes:
    """A DSN from a stranger's MAILER-DAEMON to the plain sales address: no token, none of
    our Message-IDs, the victim named in Final-Recipient with 5.1.1."""
    return (
        f"From: Mail Delivery System <MAILER-DAEMON@evil.example>\r\nTo: sales@example.com\r\n"
        f"{auth}Subject: Undelivered Mail Returned to Sender\r\n"
        f"Message-ID: <dsn{n}@evil.example>\r\nMIME-Version: 1.0\r\n"
        "Content-Type: multipart/report; report-type=delivery-status; boundary=b\r\n\r\n"
        "--b\r\nContent-Type: text/plain\r\n\r\nThe mail system: user unknown.\r\n"
        "--b\r\nContent-Type: message/delivery-status\r\n\r\nReporting-MTA: dns; evil.example\r\n"
        f"\r\nFinal-Recipient: rfc822; {victim}\r\nAction: failed\r\nStatus: 5.1.1\r\n"
        "Diagnostic-Code: smtp; 550 5.1.1 user unknown\r\n--b--\r\n"
    ).encode()


def test_it_acts_only_on_bounces_and_replies_tied_to_what_it_sent(
    database_url: str,
    tmp_path: Path,
    start_worker: Callable[[App], Worker],
) -> None:
    config = base_config(database_url, tmp_path, campaigns=[])
    app = App.open(config, lambda: hostile.NOW_HINT)
    who = ["lead@a.example", "prospect@b.example", "customer@c.example", "mailed@d.example"]
    with app.transaction() as s:
        import_leads(s, [(i + 2, {"email": a}) for i, a in enumerate(who)], hostile.NOW_HINT)
        for lead in s.scalars(select(Lead)):
            lead.status = {
                "prospect@b.example": LeadStatus.PROSPECT,
                "customer@c.example": LeadStatus.CUSTOMER,
            }.get(lead.email, LeadStatus.LEAD)
        mailed = s.scalars(select(Lead).where(Lead.email == "mailed@d.example")).one()
        s.add(
            OutboundMessage(
                idempotency_key="nurture:test", kind="nurture", lead_id=mailed.id,
                template="nurture/welcome", message_id="twoway.1@example.com",
                to_addr=mailed.email, status="sent", attempts=1,
                next_attempt_at=hostile.NOW_HINT, created_at=hostile.NOW_HINT,
                sent_at=hostile.NOW_HINT, context={},
            )
        )  # fmt: skip
    inbox = mailbox.Maildir(tmp_path / "inbox")
    for n, victim in enumerate(who):
        inbox.add(forged_dsn(victim, n))
    failing = (
        "Authentication-Results: mx.example.com; dmarc=fail (p=none) header.from=a.example\r\n"
    )
    inbox.add(  # a reply "from" the lead that its domain's DMARC disowns, no token, no thread
        f"From: lead@a.example\r\nTo: sales@example.com\r\n{failing}Subject: Hi\r\n"
        "Message-ID: <spoof@evil.example>\r\n\r\nYes, send me pricing.\r\n".encode()
    )
    worker = start_worker(app)
    worker.run_once()
    with app.transaction() as s:
        status = dict(s.execute(select(Lead.email, Lead.status)).all())
        events = Counter(s.scalars(select(LeadEvent.type)))
    assert status == {
        "lead@a.example": "lead",  # neither the forged bounce nor the spoofed reply moved it
        "prospect@b.example": "prospect",
        "customer@c.example": "customer",
        "mailed@d.example": "bounced",  # we mailed it and nothing fails the DSN: weaker rule
    }
    assert events["unverified_bounce"] == 3 and events["unverified_reply"] == 1  # on record


def test_it_keeps_two_peoples_replies_that_share_a_message_id(
    database_url: str,
    tmp_path: Path,
    start_worker: Callable[[App], Worker],
) -> None:
    config = base_config(database_url, tmp_path, campaigns=[])
    app = App.open(config, lambda: hostile.NOW_HINT)
    who = ["ana@a.example", "bo@b.example"]
    with app.transaction() as s:
        import_leads(s, [(i + 2, {"email": a}) for i, a in enumerate(who)], hostile.NOW_HINT)
        tokens = dict(s.execute(select(Lead.email, Lead.reply_token)).all())
    inbox = mailbox.Maildir(tmp_path / "inbox")
    for sender in [*who, who[0]]:  # the last one is a true duplicate of the first
        inbox.add(
            f"From: {sender}\r\nTo: sales+{tokens[sender]}@example.com\r\nSubject: Re: Hi\r\n"
            "Message-ID: <reused@mailer.example>\r\n\r\nYes, send me pricing.\r\n".encode()
        )
    worker = start_worker(app)
    result = worker.run_once()
    with app.transaction() as s:
        status = dict(s.execute(select(Lead.email, Lead.status)).all())
        recorded = sorted(a or "" for a in s.scalars(select(InboundMessage.from_addr)))
    assert status == {"ana@a.example": "prospect", "bo@b.example": "prospect"}
    assert recorded == who and result.inbound.duplicates == 1


def test_run_once_takes_over_a_dead_workers_lease_and_reads_the_mailbox(
    tmp_path: Path,
) -> None:
    from datetime import timedelta

    from tests.conftest import PG_URL, pg_schema
    from worker.leases import wall_clock
    from worker.models import MailboxLease

    if not PG_URL:
        pytest.skip("PostgreSQL not configured (set TWOWAY_TEST_PG_URL)")
    with pg_schema(PG_URL) as url:
        data = base_config_data("sqlite:///unused.db", tmp_path, campaigns=[])
        data["workers"] = {"lease_seconds": 15}
        cfg = tmp_path / "twoway.yaml"
        cfg.write_text(yaml.safe_dump(data))
        env = {**os.environ, "TWOWAY_DATABASE_URL": url, "TWOWAY_NOW": hostile.NOW_HINT.isoformat()}
        app = App.open(load_config(cfg, env=env), lambda: hostile.NOW_HINT)
        with app.transaction() as s:
            import_leads(s, [(2, {"email": "late@northwind.example"})], hostile.NOW_HINT)
            now = wall_clock()  # a worker SIGKILLed a moment ago still holds the lease
            s.add(MailboxLease(mailbox="sales", holder="dead:1:x", acquired_at=now,
                               heartbeat_at=now, expires_at=now + timedelta(seconds=12)))  # fmt: skip
        mailbox.Maildir(tmp_path / "inbox").add(
            hostile.long_line("late@northwind.example", "sales@example.com", 0.0001)
        )
        done = subprocess.run(
            twoway_cmd(cfg, "run", "--once"), env=env, capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 0, done.stderr[-2000:]
        assert "read 1 message" in done.stdout
        with app.transaction() as s:
            assert s.scalar(select(Lead.status)) == "prospect"
        app.close()


def test_it_creates_the_files_with_personal_data_for_its_user_only(tmp_path: Path) -> None:
    data = base_config_data(f"sqlite:///{tmp_path / 'new.db'}", tmp_path, campaigns=[])
    data["smtp"] = {"kind": "maildir", "path": str(tmp_path / "outbox")}
    cfg = tmp_path / "twoway.yaml"
    cfg.write_text(yaml.safe_dump(data))
    leads = tmp_path / "leads.csv"
    leads.write_text("email\nana@a.example\n")
    env = {**os.environ, "TWOWAY_NOW": hostile.NOW_HINT.isoformat()}
    for args in (("leads", "import", str(leads)), ("report", "--html", str(tmp_path / "r.html"))):
        done = subprocess.run(twoway_cmd(cfg, *args), env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-2000:]
    for path in (tmp_path / "new.db", tmp_path / "r.html"):
        assert path.stat().st_mode & 0o077 == 0, oct(path.stat().st_mode)


def test_report_html_replaces_a_symlink_instead_of_writing_through_it(tmp_path: Path) -> None:
    data = base_config_data(f"sqlite:///{tmp_path / 'db.db'}", tmp_path, campaigns=[])
    cfg = tmp_path / "twoway.yaml"
    cfg.write_text(yaml.safe_dump(data))
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    link = tmp_path / "report.html"
    link.symlink_to(victim)
    env = {**os.environ, "TWOWAY_NOW": hostile.NOW_HINT.isoformat()}
    done = subprocess.run(
        twoway_cmd(cfg, "report", "--html", str(link)), env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert victim.read_text() == "keep me" and not link.is_symlink()
