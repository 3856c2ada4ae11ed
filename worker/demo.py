"""`twoway demo`: the whole flow on the embedded default, no servers, no setup.

A throwaway workspace gets a SQLite database, a Maildir inbox (the "sales mailbox"), a
Maildir outbox (what the SMTP server would have received), sample leads and a 3-step
campaign. Step 1 goes out; realistic answers land in the inbox — genuine replies, an
out-of-office, a bounce, an unsubscribe, a "no thanks", a newsletter — and the worker
turns the genuine ones into prospects, hands them to reps and answers in the thread.
"""

from __future__ import annotations

import csv
import mailbox
import tempfile
import time
from collections.abc import Callable
from datetime import datetime, timedelta
from email import message_from_bytes, policy
from email.message import EmailMessage
from email.utils import format_datetime, make_msgid
from pathlib import Path
from typing import Any

import yaml

from worker.app import App
from worker.config import Clock, load_config
from worker.leads import import_leads, read_csv
from worker.runner import Worker
from worker.samples import SamplesMissing, copy_tree, sample_dir
from worker.status import collect_status

SENDER = "sales@acme.example"

LEADS = [
    # email, first, last, company, title, industry, size, revenue, country, timezone
    ("maria.garcia@nube.example", "María", "García", "Soluciones Nube", "CTO", "software", 120, 9_000_000, "ES", "Europe/Madrid"),
    ("priya.patel@ledgerly.example", "Priya", "Patel", "Ledgerly", "VP Finance", "fintech", 300, 25_000_000, "GB", "Europe/London"),
    ("tom.becker@kraftwerk.example", "Tom", "Becker", "Kraftwerk Logistik", "Head of Operations", "logistics", 800, 120_000_000, "DE", "Europe/Berlin"),
    ("john.smith@northwind.example", "John", "Smith", "Northwind Traders", "Operations Manager", "retail", 45, 4_000_000, "US", "America/Chicago"),
    ("aiko.tanaka@sakura.example", "Aiko", "Tanaka", "Sakura Systems", "Engineer", "software", 60, 7_000_000, "JP", "Asia/Tokyo"),
    ("old.contact@gone.example", "Sam", "Jones", "Gone Ltd", "Buyer", "retail", 10, 500_000, "GB", "Europe/London"),
    ("lea.dubois@atelier.example", "Léa", "Dubois", "Atelier Dubois", "Founder", "design", 8, 600_000, "FR", "Europe/Paris"),
    ("raj.mehta@finlytics.example", "Raj", "Mehta", "Finlytics", "Analyst", "fintech", 40, 3_000_000, "IN", "Asia/Kolkata"),
    ("carlos.ruiz@nube.example", "Carlos", "Ruiz", "Soluciones Nube", "Developer", "software", 120, 9_000_000, "ES", "Europe/Madrid"),
    ("emma.wilson@brightline.example", "Emma", "Wilson", "Brightline", "COO", "logistics", 150, 30_000_000, "US", "America/New_York"),
]  # fmt: skip


def _config(ws: Path) -> dict[str, Any]:
    return {
        "database": "sqlite:///twoway.db",
        "templates_dir": "templates",
        "mailboxes": [{"name": "sales", "kind": "maildir", "path": "mail/inbox", "idle": False}],
        "smtp": {"kind": "maildir", "path": "mail/outbox", "max_per_minute": 600},
        "sender": {
            "from": f"Acme Sales <{SENDER}>",
            "reply_token": True,
            "unsubscribe_url": "https://acme.example/unsubscribe/{token}",
            "unsubscribe_mailto": "sales+unsubscribe-{token}@acme.example",
            "postal_address": "Acme Inc., 1 Main Street, Springfield",
        },
        "internal_domains": ["acme.example"],
        "campaigns": [
            {
                "name": "welcome",
                "mailbox": "sales",
                "timezone": "UTC",
                "send_window": None,
                "steps": [
                    {"template": "nurture/welcome", "delay": "0d"},
                    {"template": "nurture/case-study", "delay": "3bd"},
                    {"template": "nurture/last-call", "delay": "5bd"},
                ],
            }
        ],
        "reps": [
            {
                "name": "Ana Lopez",
                "email": "ana@acme.example",
                "match": {"countries": ["ES", "MX", "AR"]},
            },
            {
                "name": "Ben Okafor",
                "email": "ben@acme.example",
                "match": {"industries": ["fintech", "saas"]},
            },
            {"name": "Chloe Martin", "email": "chloe@acme.example"},
        ],
        "qualification": {
            "fit": {
                "industries": ["software", "saas", "fintech", "logistics"],
                "min_company_size": 20,
            },
        },
        "handoff": {
            "template": "handoff/rep",
            "follow_up": {"template": "followup/thanks", "delay": "0h", "from": "rep"},
        },
    }


class DemoError(Exception):
    """The demo cannot set up its workspace."""


def make_workspace(ws: Path) -> Path:
    """Write config, templates, sample leads and empty mailboxes; returns the config path."""
    ws.mkdir(parents=True, exist_ok=True)
    try:
        copy_tree(sample_dir("templates"), ws / "templates")
    except SamplesMissing as e:
        raise DemoError(str(e)) from None
    for box in ("inbox", "outbox"):
        (ws / "mail").mkdir(exist_ok=True)
        mailbox.Maildir(ws / "mail" / box, create=True)
    cfg = ws / "twoway.yaml"
    cfg.write_text(
        "# The demo's config: a Maildir inbox and outbox instead of IMAP and SMTP.\n"
        + yaml.safe_dump(_config(ws), sort_keys=False, allow_unicode=True),
        encoding="utf-8",
    )
    with (ws / "leads.csv").open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["email", "first_name", "last_name", "company", "title", "industry",
                    "company_size", "annual_revenue", "country", "timezone", "source"])  # fmt: skip
        for row in LEADS:
            w.writerow([*row, "demo"])
    return cfg


def _sent(ws: Path) -> dict[str, EmailMessage]:
    """What the 'SMTP server' received, by recipient."""
    out: dict[str, EmailMessage] = {}
    for key in sorted(mailbox.Maildir(ws / "mail" / "outbox", create=False).keys()):
        raw = (ws / "mail" / "outbox").glob(f"*/{key}*")
        for p in raw:
            msg = message_from_bytes(p.read_bytes(), policy=policy.default)
            assert isinstance(msg, EmailMessage)
            out.setdefault(str(msg["To"]).split("<")[-1].rstrip(">").lower(), msg)
    return out


def _reply(original: EmailMessage, sender: str, name: str, body: str, now: datetime,
           *, threaded: bool = True, extra: dict[str, str] | None = None,
           subject: str | None = None) -> bytes:  # fmt: skip
    """A reply as a mail client would write it: quoting our message, threading headers."""
    msg = EmailMessage()
    msg["From"] = f"{name} <{sender}>"
    msg["To"] = str(original["Reply-To"] or original["From"])
    msg["Subject"] = subject or f"Re: {original['Subject']}"
    msg["Date"] = format_datetime(now)
    msg["Message-ID"] = make_msgid(domain=sender.split("@")[1])
    if threaded:
        msg["In-Reply-To"] = str(original["Message-ID"])
        msg["References"] = str(original["Message-ID"])
    for k, v in (extra or {}).items():
        msg[k] = v
    part = original.get_body(("plain",))
    quoted = "\n".join(
        "> " + line for line in (part.get_content() if part else "").splitlines()[:8]
    )
    when = format_datetime(now - timedelta(hours=2))
    msg.set_content(f"{body}\n\nOn {when}, Acme Sales <{SENDER}> wrote:\n{quoted}\n")
    return msg.as_bytes()


def dsn(
    original: EmailMessage,
    recipient: str,
    at: datetime,
    *,
    status: str = "5.1.1",
    diagnostic: str = "550 5.1.1 User unknown in virtual mailbox table",
    mta: str = "mx.acme.example",
) -> bytes:
    """A Postfix-style RFC 3464 report that `original` failed for `recipient`.

    It goes to the envelope sender (our Reply-To address, as VERP would) and returns the
    original's headers, as Postfix does.
    """
    returned = "".join(
        f"{k}: {v}\r\n"
        for k, v in original.items()
        if k in ("From", "To", "Subject", "Message-ID", "Date")
    )
    envelope = str(original["Reply-To"] or original["From"]).split("<")[-1].rstrip(">")
    text = (
        f"From: Mail Delivery System <MAILER-DAEMON@{mta}>\r\n"
        f"To: {envelope}\r\n"
        "Subject: Undelivered Mail Returned to Sender\r\n"
        f"Date: {format_datetime(at)}\r\n"
        f"Message-ID: {make_msgid(domain=mta)}\r\n"
        "Auto-Submitted: auto-replied\r\n"
        "MIME-Version: 1.0\r\n"
        'Content-Type: multipart/report; report-type=delivery-status; boundary="dsn"\r\n'
        "\r\n--dsn\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\n"
        f"This is the mail system at host {mta}.\r\n\r\n"
        "I'm sorry to have to inform you that your message could not\r\n"
        "be delivered to one or more recipients.\r\n\r\n"
        f"<{recipient}>: {diagnostic}\r\n"
        "\r\n--dsn\r\nContent-Type: message/delivery-status\r\n\r\n"
        f"Reporting-MTA: dns; {mta}\r\n\r\n"
        f"Final-Recipient: rfc822; {recipient}\r\nAction: failed\r\nStatus: {status}\r\n"
        f"Diagnostic-Code: smtp; {diagnostic}\r\n"
        "\r\n--dsn\r\nContent-Type: text/rfc822-headers\r\n\r\n"
        f"{returned}\r\n--dsn--\r\n"
    )
    return text.encode("utf-8")


def _newsletter(now: datetime) -> bytes:
    msg = EmailMessage()
    msg["From"] = "Growth Weekly <news@growthweekly.example>"
    msg["To"] = SENDER
    msg["Subject"] = "5 pipeline hacks for Q1"
    msg["Date"] = format_datetime(now)
    msg["Message-ID"] = make_msgid(domain="growthweekly.example")
    msg["List-Id"] = "Growth Weekly <weekly.growthweekly.example>"
    msg["List-Unsubscribe"] = "<https://growthweekly.example/u/123>"
    msg["Precedence"] = "bulk"
    msg.set_content("This week: five pipeline hacks. Read online at https://growthweekly.example/5")
    return msg.as_bytes()


def drop_replies(ws: Path, now: datetime) -> list[str]:
    """Put realistic answers to step 1 in the inbox; returns one line per message."""
    sent = _sent(ws)
    inbox = mailbox.Maildir(ws / "mail" / "inbox", create=False)
    dropped: list[str] = []

    def drop(raw: bytes, what: str) -> None:
        inbox.add(raw)
        dropped.append(what)

    if m := sent.get("maria.garcia@nube.example"):
        drop(_reply(m, "maria.garcia@nube.example", "María García",
                    "Hola, thanks for reaching out. We're evaluating tools for Q1.\n"
                    "Could you send pricing for 25 seats, and do you have time for a demo next week?\n\n"
                    "María", now), "María García: a genuine reply to our email (it carries our reply token)")  # fmt: skip
    if m := sent.get("priya.patel@ledgerly.example"):
        drop(_reply(m, "priya.patel@ledgerly.example", "Priya Patel",
                    "Interesting timing - our budget for next year is being set now.\n"
                    "What would a pilot look like for our finance team?\n\nBest,\nPriya",
                    now, threaded=False, extra={"Thread-Index": "AdqT5n0a7Q=="}),
             "Priya Patel: an Outlook-style reply with no References (matched by the reply token)")  # fmt: skip
    if m := sent.get("tom.becker@kraftwerk.example"):
        back = (now + timedelta(days=9)).date()
        ooo = EmailMessage()
        ooo["From"] = "Tom Becker <tom.becker@kraftwerk.example>"
        ooo["To"] = str(m["Reply-To"])
        ooo["Subject"] = f"Automatic reply: {m['Subject']}"
        ooo["Date"] = format_datetime(now)
        ooo["Message-ID"] = make_msgid(domain="kraftwerk.example")
        ooo["In-Reply-To"] = str(m["Message-ID"])
        ooo["Auto-Submitted"] = "auto-replied"
        ooo["X-Auto-Response-Suppress"] = "All"
        ooo.set_content(
            f"Thank you for your message. I am out of the office until {back:%d %B %Y} "
            "with limited access to email. For urgent matters please contact my colleague."
        )
        drop(ooo.as_bytes(), f"Tom Becker: an Exchange out-of-office, away until {back}")
    if m := sent.get("old.contact@gone.example"):
        drop(
            dsn(m, "old.contact@gone.example", now),
            "a hard bounce (550 5.1.1) for old.contact@gone.example",
        )
    if m := sent.get("john.smith@northwind.example"):
        drop(_reply(m, "john.smith@northwind.example", "John Smith",
                    "Please unsubscribe me from this list.", now),
             "John Smith: asks to unsubscribe")  # fmt: skip
    if m := sent.get("lea.dubois@atelier.example"):
        drop(_reply(m, "lea.dubois@atelier.example", "Léa Dubois",
                    "Thanks, but we're not interested at the moment.", now),
             "Léa Dubois: not interested")  # fmt: skip
    drop(_newsletter(now), "a newsletter from an unknown sender")
    return dropped


def run_demo(
    ws: Path | None, clock: Clock, echo: Callable[[str], None], prog: str = "twoway"
) -> int:
    """Run the whole flow and narrate it; returns an exit code."""
    started = time.monotonic()
    ws = ws or Path(tempfile.mkdtemp(prefix="twoway-demo-"))
    echo(f"twoway demo — workspace {ws}\n")
    cfg_path = make_workspace(ws)
    config = load_config(cfg_path, env={})
    app = App.open(config, clock)
    try:
        with app.transaction() as s:
            result = import_leads(
                s,
                read_csv(ws / "leads.csv"),
                app.now(),
                campaign=config.campaign("welcome"),
                source="demo",
            )
        echo(
            f"1. Imported {result.imported} leads from leads.csv into the 3-step campaign 'welcome'."
        )
        with Worker(app) as worker:
            first = worker.run_once()
            echo(
                f"2. Sent step 1 to {first.sent} leads (captured in mail/outbox, a local Maildir)."
            )
            dropped = drop_replies(ws, app.now() + timedelta(minutes=7))
            echo(f"3. {len(dropped)} messages arrived in the sales inbox (mail/inbox):")
            for d in dropped:
                echo(f"   - {d}")
            second = worker.run_once()
        kinds = ", ".join(f"{v} {k}" for k, v in sorted(second.inbound.kinds.items()))
        echo(
            f"4. The worker read them ({kinds}) and sent {second.sent} messages (handoffs to reps, follow-ups in the thread).\n"
        )
        _report(app, ws, echo)
    finally:
        app.close()
    echo(f"\nDone in {time.monotonic() - started:.1f} s. Everything is in {ws}:")
    echo(f"  {prog} --config {cfg_path} status          # the funnel and health")
    echo(f"  {prog} --config {cfg_path} leads list      # every lead and its state")
    echo(
        f"  {prog} --config {cfg_path} leads show maria.garcia@nube.example   # one lead's whole story"
    )
    echo(f"To point twoway at a real mailbox: `{prog} init DIR` writes DIR/config/twoway.yaml and")
    echo("DIR/templates; fill in mailboxes (IMAP host, user, ${IMAP_PASSWORD} or an OAuth2 token)")
    echo("and smtp, then:")
    echo(
        "  twoway config check --connect && twoway leads import leads.csv --campaign welcome && twoway run"
    )
    return 0


def _report(app: App, ws: Path, echo: Callable[[str], None]) -> None:
    from sqlalchemy import select

    from worker.models import Enrollment, EnrollmentState, Lead, LeadEvent, LeadStatus

    data = collect_status(app)
    echo("Funnel (leads -> engaged -> prospects -> handed off):")
    for f in data["funnel"]:
        echo(
            f"  {f['campaign']}: {f['leads']} -> {f['engaged']} -> {f['prospects']} -> {f['handed_off']}"
        )
    echo("Leads by status: " + ", ".join(f"{k} {v}" for k, v in data["leads"].items() if v))
    with app.transaction() as s:
        prospects = s.scalars(
            select(Lead).where(Lead.status == LeadStatus.PROSPECT).order_by(Lead.id)
        ).all()
        echo(f"\nProspects ({len(prospects)}):")
        for p in prospects:
            promoted = s.scalar(
                select(LeadEvent).where(LeadEvent.lead_id == p.id, LeadEvent.type == "promoted")
            )
            assigned = s.scalar(
                select(LeadEvent).where(LeadEvent.lead_id == p.id, LeadEvent.type == "assigned")
            )
            echo(
                f"  {p.first_name} {p.last_name} <{p.email}>, {p.title} at {p.company}: score {p.score}, owner {p.owner}"
            )
            if promoted:
                echo(f"    why: {promoted.cause}")
            if assigned:
                echo(f"    rep: {assigned.cause}")
        others = s.scalars(
            select(Lead)
            .where(Lead.status.not_in((LeadStatus.LEAD, LeadStatus.PROSPECT)))
            .order_by(Lead.id)
        ).all()
        paused = s.scalars(
            select(Lead)
            .join(Enrollment, Enrollment.lead_id == Lead.id)
            .where(Enrollment.state == EnrollmentState.PAUSED)
        ).all()
        if others or paused:
            echo("\nOthers:")
            for o in [*paused, *others]:
                last = s.scalar(
                    select(LeadEvent)
                    .where(LeadEvent.lead_id == o.id)
                    .order_by(LeadEvent.id.desc())
                    .limit(1)
                )
                state = "lead, nurture paused" if o in paused else o.status
                echo(f"  {o.email}: {state} ({last.cause if last else ''})")
    handoff = _first_handoff(ws)
    if handoff is not None:
        body = handoff.get_body(("plain",))
        echo("\nThe handoff email the rep received:")
        echo(
            f"  From: {handoff['From']}\n  To: {handoff['To']}\n  Reply-To: {handoff['Reply-To']}\n  Subject: {handoff['Subject']}"
        )
        attached = [p.get_content_type() for p in handoff.iter_attachments()]
        if attached:
            echo(f"  Attached: {', '.join(attached)} (the prospect's original message)")
        echo("")
        for line in (body.get_content() if body else "").strip().splitlines():
            echo(f"  | {line}")


def _first_handoff(ws: Path) -> EmailMessage | None:
    for p in sorted((ws / "mail" / "outbox").glob("*/*"), key=lambda p: p.stat().st_mtime):
        msg = message_from_bytes(p.read_bytes(), policy=policy.default)
        if (
            str(msg["To"] or "").endswith("@acme.example>")
            and str(msg["Reply-To"] or "").find("acme.example") < 0
        ):
            assert isinstance(msg, EmailMessage)
            return msg
    return None
