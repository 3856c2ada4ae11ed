"""Nurture sending against a real SMTP server (aiosmtpd on 127.0.0.1): once, on time, to
the right people, and never twice whatever fails."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import yaml
from sqlalchemy import select

from tests.conftest import ROOT, base_config, twoway_cmd
from tests.smtp_server import SmtpServer
from worker.app import App
from worker.config import Config
from worker.leads import import_leads, mark_lead
from worker.models import Enrollment, Lead, OutboundMessage
from worker.runner import Worker
from worker.sequences import queue_due

MONDAY = datetime(2026, 11, 30, 10, 0, tzinfo=UTC)


def rows(n: int, **fields: str) -> list[tuple[int, dict[str, str | None]]]:
    return [(i + 2, {"email": f"lead{i}@company{i}.example.org", **fields}) for i in range(n)]


def open_app(config: Config, clock: list[datetime]) -> App:
    return App.open(config, lambda: clock[0])


def test_it_sends_each_step_once_and_only_to_leads_still_in_lead(
    database_url: str,
    tmp_path: Path,
    smtp_server: SmtpServer,
    start_worker: Callable[[App], Worker],
) -> None:
    config = base_config(database_url, tmp_path, smtp=smtp_server.section())
    clock = [MONDAY]
    app = open_app(config, clock)
    with app.transaction() as s:
        import_leads(s, rows(200), clock[0], campaign=config.campaign("welcome"))
    worker = start_worker(app)

    assert worker.run_once().sent == 200
    assert Counter(smtp_server.recipients()) == Counter(
        f"lead{i}@company{i}.example.org" for i in range(200)
    )
    ids = {str(m["Message-ID"]) for m in smtp_server.parsed()}
    assert len(ids) == 200 and all(i.endswith("@example.com>") for i in ids)
    assert worker.run_once().sent == 0  # nothing is due twice

    # Between queueing and sending, one lead replies and another unsubscribes by hand.
    clock[0] = MONDAY + timedelta(days=3, minutes=1)
    assert queue_due(app) == 200
    with app.transaction() as s:
        mark_lead(s, "lead0@company0.example.org", "prospect", clock[0], "replied")
        s.get(Lead, 2).status = "unsubscribed"  # type: ignore[union-attr]  # changed behind our back
    before = len(smtp_server.messages)
    assert worker.run_once().sent == 198
    step2 = [r for m in smtp_server.messages[before:] for r in m.rcpts]
    assert "lead0@company0.example.org" not in step2 and "lead1@company1.example.org" not in step2
    with app.transaction() as s:
        cancelled = s.scalars(
            select(OutboundMessage.to_addr).where(OutboundMessage.status == "cancelled")
        ).all()
    assert sorted(cancelled) == ["lead0@company0.example.org", "lead1@company1.example.org"]


def test_it_honours_the_send_window_in_each_leads_time_zone(
    sqlite_url: str, tmp_path: Path
) -> None:
    campaign = {
        "name": "welcome",
        "send_window": {
            "days": ["mon", "tue", "wed", "thu", "fri"],
            "start": "09:00",
            "end": "17:00",
        },
        "steps": [
            {"template": "nurture/welcome", "delay": "0d"},
            {"template": "nurture/case-study", "delay": "1bd"},
        ],
    }
    config = base_config(sqlite_url, tmp_path, campaigns=[campaign])
    friday_evening = datetime(
        2026, 12, 4, 22, 30, tzinfo=UTC
    )  # Fri 17:30 New York, Sat 07:30 Tokyo
    clock = [friday_evening]
    app = open_app(config, clock)
    zones = {"ny": "America/New_York", "berlin": "Europe/Berlin", "tokyo": "Asia/Tokyo"}
    with app.transaction() as s:
        import_leads(
            s,
            [
                (i + 2, {"email": f"{k}@example.org", "timezone": tz})
                for i, (k, tz) in enumerate(zones.items())
            ],
            clock[0],
            campaign=config.campaign("welcome"),
        )
    assert queue_due(app) == 0  # it is the weekend (or Friday evening) everywhere
    with app.transaction() as s:
        due = {
            lead.email: en.next_due
            for en, lead in s.execute(
                select(Enrollment, Lead).join(Lead, Lead.id == Enrollment.lead_id)
            )
        }
    assert due == {
        "ny@example.org": datetime(2026, 12, 7, 14, 0, tzinfo=UTC),  # Mon 09:00 EST
        "berlin@example.org": datetime(2026, 12, 7, 8, 0, tzinfo=UTC),  # Mon 09:00 CET
        "tokyo@example.org": datetime(2026, 12, 7, 0, 0, tzinfo=UTC),  # Mon 09:00 JST
    }
    clock[0] = datetime(2026, 12, 7, 8, 0, tzinfo=UTC)  # Monday 09:00 in Berlin
    # Berlin opens; Tokyo's window closed at 17:00 local and New York is still asleep.
    assert queue_due(app) == 1
    with app.transaction() as s:
        tokyo = s.execute(
            select(Enrollment)
            .join(Lead, Lead.id == Enrollment.lead_id)
            .where(Lead.email == "tokyo@example.org")
        ).scalar_one()
        assert tokyo.next_due == datetime(2026, 12, 8, 0, 0, tzinfo=UTC)  # Tue 09:00 JST
    app.close()


def test_it_retries_temporary_failures_and_never_a_permanent_one(
    database_url: str,
    tmp_path: Path,
    smtp_server: SmtpServer,
    start_worker: Callable[[App], Worker],
) -> None:
    config = base_config(database_url, tmp_path, smtp=smtp_server.section(max_attempts=5))
    clock = [MONDAY]
    app = open_app(config, clock)
    with app.transaction() as s:
        import_leads(s, rows(30), clock[0], campaign=config.campaign("welcome"))
    smtp_server.reject("lead7@company7.example.org")
    smtp_server.drop_next(2)
    smtp_server.fail_next(2, 421)
    smtp_server.fail_next(3, 451)
    worker = start_worker(app)
    for minute in range(0, 240, 5):  # a few hours of passes; retries wait in the database
        clock[0] = MONDAY + timedelta(minutes=minute)
        worker.run_once()
    got = Counter(smtp_server.recipients())
    good = {f"lead{i}@company{i}.example.org" for i in range(30)} - {"lead7@company7.example.org"}
    assert set(got) == good
    assert set(got.values()) == {1}  # every good message exactly once
    with app.transaction() as s:
        bounced = s.scalar(select(Lead).where(Lead.email == "lead7@company7.example.org"))
        assert bounced is not None and bounced.status == "bounced"
        refused = s.scalar(select(OutboundMessage).where(OutboundMessage.to_addr == bounced.email))
        assert refused is not None and refused.status == "failed" and refused.attempts == 1
        attempts = s.scalars(select(OutboundMessage.attempts)).all()
        assert max(attempts) <= 5


def _run_once(cfg: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        twoway_cmd(cfg, "run", "--once"),
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def test_it_never_sends_twice_when_killed_mid_batch(
    sqlite_url: str, tmp_path: Path, smtp_server: SmtpServer
) -> None:
    data: dict[str, Any] = {
        "database": sqlite_url,
        "templates_dir": str(ROOT / "templates"),
        "smtp": smtp_server.section(),
        "sender": {"from": "Acme Sales <sales@example.com>"},
        "campaigns": [
            {"name": "welcome", "send_window": None, "steps": [{"template": "nurture/welcome"}]}
        ],
    }
    cfg = tmp_path / "twoway.yaml"
    cfg.write_text(yaml.safe_dump(data))
    config = base_config(sqlite_url, tmp_path)
    clock = [MONDAY]
    app = open_app(config, clock)
    with app.transaction() as s:
        import_leads(s, rows(500), clock[0], campaign=config.campaign("welcome"))
    app.close()
    env = {**os.environ, "TWOWAY_NOW": MONDAY.isoformat()}
    proc = _run_once(cfg, env)
    deadline = time.monotonic() + 60
    while len(smtp_server.messages) < 150 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    killed_at = len(smtp_server.messages)
    assert 0 < killed_at < 500, "the kill must land mid-batch"

    second = _run_once(cfg, env)
    assert second.wait(120) == 0, second.stderr.read() if second.stderr else ""
    got = Counter(smtp_server.recipients())
    assert max(got.values()) == 1  # zero duplicates at the server
    app = open_app(config, clock)
    with app.transaction() as s:
        states = dict(s.execute(select(OutboundMessage.to_addr, OutboundMessage.status)).all())
    app.close()
    unknown = {a for a, st in states.items() if st == "unknown"}
    assert len(unknown) <= 1  # only the message in flight could be stranded...
    assert smtp_server.began_for(sorted(unknown))  # ...and its SMTP transaction had begun
    assert len(states) == 500
    for addr, st in states.items():
        assert st in ("sent", "unknown"), (addr, st)
        assert (addr in got) == (st == "sent") or st == "unknown"
    assert set(got) | unknown == set(states)  # each one delivered once, or reported unknown
    status = subprocess.run(
        twoway_cmd(cfg, "status"),
        env=env,
        capture_output=True,
        text=True,
    )
    if unknown:
        assert f"unknown {len(unknown)}" in status.stdout


def test_it_stops_between_messages_and_leaves_the_rest_queued(
    sqlite_url: str, tmp_path: Path, smtp_server: SmtpServer
) -> None:
    from worker.mailer import Mailer
    from worker.outbox import send_due
    from worker.rendering import Renderer

    config = base_config(sqlite_url, tmp_path, smtp=smtp_server.section())
    clock = [MONDAY]
    app = open_app(config, clock)
    with app.transaction() as s:
        import_leads(s, rows(10), clock[0], campaign=config.campaign("welcome"))
    queue_due(app)
    assert config.smtp is not None
    renderer = Renderer(config.templates_path)
    with Mailer(config.smtp) as mailer:
        # SIGTERM arrives while the third message is in flight.
        sent = send_due(
            app, renderer, lambda _: mailer, should_stop=lambda: len(smtp_server.messages) >= 3
        )
    assert sent == 3
    with app.transaction() as s:
        states = Counter(s.scalars(select(OutboundMessage.status)).all())
    assert states == Counter({"sent": 3, "queued": 7})  # nothing left half-claimed
    with Mailer(config.smtp) as mailer:
        assert send_due(app, renderer, lambda _: mailer) == 7
    assert len(set(smtp_server.recipients())) == len(smtp_server.recipients()) == 10
    app.close()


def test_a_running_worker_sends_a_template_edited_since_its_last_pass(
    sqlite_url: str,
    tmp_path: Path,
    smtp_server: SmtpServer,
    start_worker: Callable[[App], Worker],
) -> None:
    templates = tmp_path / "templates"
    shutil.copytree(ROOT / "templates", templates)
    config = base_config(
        sqlite_url, tmp_path, smtp=smtp_server.section(), templates_dir=str(templates)
    )
    clock = [MONDAY]
    app = open_app(config, clock)
    with app.transaction() as s:
        import_leads(s, rows(2, first_name="Maya"), clock[0], campaign=config.campaign("welcome"))
    worker = start_worker(app)
    worker.run_once()
    # An admin edits a subject and the body's layout while the worker runs.
    subject = templates / "nurture" / "case-study" / "subject.txt"
    subject.write_text("Edited: how {{ lead.first_name or 'a team' }} could plan faster\n")
    layout = templates / "layout.txt"
    layout.write_text(layout.read_text().replace("Not useful right now?", "Edited footer."))
    later = time.time() + 2  # a new modification time, however coarse the file system's
    os.utime(subject, (later, later))
    os.utime(layout, (later, later))
    clock[0] += timedelta(days=3, hours=1)
    worker.run_once()
    sent = [m.parsed() for m in smtp_server.messages]
    assert len(sent) == 4
    assert not any(str(m["Subject"]).startswith("Edited") for m in sent[:2])
    assert [str(m["Subject"]) for m in sent[2:]] == ["Edited: how Maya could plan faster"] * 2
    for m in sent[2:]:
        text = m.get_body(("plain",))
        assert text is not None and "Edited footer." in str(text.get_content())
    app.close()


def test_it_skips_public_holidays_in_the_leads_country(sqlite_url: str, tmp_path: Path) -> None:
    campaign = {
        "name": "welcome",
        "skip_holidays": True,
        "send_window": {
            "days": ["mon", "tue", "wed", "thu", "fri"],
            "start": "09:00",
            "end": "17:00",
        },
        "steps": [{"template": "nurture/welcome", "delay": "0d"}],
    }
    config = base_config(sqlite_url, tmp_path, campaigns=[campaign])
    christmas = datetime(2026, 12, 25, 10, 0, tzinfo=UTC)  # a Friday, a holiday in DE, not in JP
    clock = [christmas]
    app = open_app(config, clock)
    with app.transaction() as s:
        import_leads(
            s,
            [(2, {"email": "de@example.org", "country": "DE", "timezone": "Europe/Berlin"}),
             (3, {"email": "jp@example.org", "country": "JP", "timezone": "Asia/Tokyo"})],
            clock[0],
            campaign=config.campaign("welcome"),
        )  # fmt: skip
    assert queue_due(app) == 0  # Berlin: Christmas; Tokyo: 19:00, after the window
    with app.transaction() as s:
        due = {
            lead.email: en.next_due
            for en, lead in s.execute(
                select(Enrollment, Lead).join(Lead, Lead.id == Enrollment.lead_id)
            )
        }
    # Germany: the 25th and 26th are holidays, then the weekend: Monday the 28th, 09:00 CET.
    assert due["de@example.org"] == datetime(2026, 12, 28, 8, 0, tzinfo=UTC)
    # Japan has no holiday on the 28th either; its next open slot is Monday 09:00 JST.
    assert due["jp@example.org"] == datetime(2026, 12, 28, 0, 0, tzinfo=UTC)
    app.close()


def test_it_sends_each_campaign_from_its_mailboxs_identity_and_caps(
    database_url: str,
    tmp_path: Path,
    smtp_server_factory: Any,
    start_worker: Callable[[App], Worker],
) -> None:
    """A rep's mailbox with its own sender, SMTP account and caps, beside the shared one."""
    import mailbox as maildir

    shared, own = smtp_server_factory(), smtp_server_factory()
    maildir.Maildir(tmp_path / "ana-inbox", create=True)
    config = base_config(
        database_url,
        tmp_path,
        smtp=shared.section(),
        mailboxes=[
            {"name": "sales", "kind": "maildir", "path": str(tmp_path / "inbox")},
            {"name": "ana", "kind": "maildir", "path": str(tmp_path / "ana-inbox"),
             "from": "Ana Lopez <ana.box@example.com>",
             "smtp": own.section(max_per_minute=3)},
        ],
        campaigns=[
            {"name": "welcome", "mailbox": "sales", "send_window": None,
             "steps": [{"template": "nurture/welcome"}]},
            {"name": "spain", "mailbox": "ana", "send_window": None,
             "steps": [{"template": "nurture/welcome"}]},
        ],
    )  # fmt: skip
    clock = [MONDAY]
    app = open_app(config, clock)
    with app.transaction() as s:
        import_leads(s, rows(5), clock[0], campaign=config.campaign("welcome"))
        more = [(i + 2, {"email": f"es{i}@empresa{i}.example.org"}) for i in range(5)]
        import_leads(s, more, clock[0], campaign=config.campaign("spain"))
        token = s.scalar(select(Lead.reply_token).where(Lead.email == "es0@empresa0.example.org"))
    worker = start_worker(app)
    worker.run_once()
    assert len(shared.messages) == 5 and len(own.messages) == 3  # the rep's account: 3 a minute
    assert {str(m.parsed()["From"]) for m in shared.messages} == {"Acme Sales <sales@example.com>"}
    first = own.messages[0].parsed()
    assert str(first["From"]) == "Ana Lopez <ana.box@example.com>"
    assert str(first["Reply-To"]).startswith("ana.box+")
    assert own.messages[0].envelope_from.startswith("ana.box+")
    clock[0] = MONDAY + timedelta(minutes=2)
    worker.run_once()
    assert len(own.messages) == 5 and len(shared.messages) == 5

    # A reply to the rep's token address is matched like one to the shared address.
    (tmp_path / "ana-inbox" / "new" / "1.reply").write_text(
        f"From: es0@empresa0.example.org\r\nTo: ana.box+{token}@example.com\r\n"
        "Subject: Re: hola\r\nMessage-ID: <r@empresa0.example.org>\r\n\r\nMe interesa, ¿precio?\r\n"
    )
    worker.run_once()
    with app.transaction() as s:
        lead = s.scalar(select(Lead).where(Lead.email == "es0@empresa0.example.org"))
        assert lead is not None and lead.status == "prospect"
