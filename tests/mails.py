"""Builders for the mail a lead (or their server) sends back, written the way real clients do."""

from __future__ import annotations

from datetime import date, datetime
from email.message import EmailMessage
from email.utils import format_datetime, make_msgid

from worker import demo


def _base(sender: str, name: str, to: str, subject: str, at: datetime) -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = f"{name} <{sender}>" if name else sender
    msg["To"] = to
    msg["Subject"] = subject
    msg["Date"] = format_datetime(at)
    msg["Message-ID"] = make_msgid(domain=sender.split("@")[1])
    return msg


def _quote(original: EmailMessage) -> str:
    part = original.get_body(("plain",))
    text = part.get_content() if part is not None else ""
    return "\n".join("> " + line for line in text.splitlines()[:6])


def reply(
    original: EmailMessage,
    body: str,
    at: datetime,
    *,
    sender: str | None = None,
    name: str = "",
    threaded: bool = True,
    to: str | None = None,
    subject: str | None = None,
    quote: bool = True,
) -> bytes:
    """A human reply (Gmail style: top-posted, 'On … wrote:' then the quoted message)."""
    sender = sender or str(original["To"]).split("<")[-1].rstrip(">")
    msg = _base(
        sender,
        name,
        to or str(original["Reply-To"] or original["From"]),
        subject or f"Re: {original['Subject']}",
        at,
    )
    if threaded:
        msg["In-Reply-To"] = str(original["Message-ID"])
        msg["References"] = str(original["Message-ID"])
    text = body
    if quote:
        text += f"\n\nOn {original['Date']}, {original['From']} wrote:\n{_quote(original)}\n"
    msg.set_content(text)
    return msg.as_bytes()


def outlook_reply(original: EmailMessage, body: str, at: datetime, *, name: str = "") -> bytes:
    """Outlook: Thread-Index, no References, no In-Reply-To (it happens), its own quote block."""
    sender = str(original["To"]).split("<")[-1].rstrip(">")
    msg = _base(sender, name, str(original["Reply-To"]), f"RE: {original['Subject']}", at)
    msg["Thread-Index"] = "AdqT5n0a7Q+2Lk1vQ0OaX8K3r4b1Zw=="
    msg["X-Auto-Response-Suppress"] = "All"
    msg["X-MS-Has-Attach"] = ""
    msg.set_content(
        f"{body}\n\n________________________________\nFrom: {original['From']}\n"
        f"Sent: {original['Date']}\nTo: {original['To']}\nSubject: {original['Subject']}\n\n"
        f"{_quote(original).replace('> ', '')}\n"
    )
    return msg.as_bytes()


def exchange_ooo(original: EmailMessage, back: date, at: datetime) -> bytes:
    sender = str(original["To"]).split("<")[-1].rstrip(">")
    msg = _base(
        sender, "", str(original["Reply-To"]), f"Automatic reply: {original['Subject']}", at
    )
    msg["In-Reply-To"] = str(original["Message-ID"])
    msg["Auto-Submitted"] = "auto-replied"
    msg["X-Auto-Response-Suppress"] = "All"
    msg["X-MS-Exchange-Inbox-Rules-Loop"] = sender
    msg.set_content(
        f"Thank you for your email. I am out of the office until {back:%B} {back.day}, "
        f"{back.year} with no access to email. For urgent matters contact reception."
    )
    return msg.as_bytes()


def gmail_vacation(original: EmailMessage, at: datetime) -> bytes:
    sender = str(original["To"]).split("<")[-1].rstrip(">")
    msg = _base(sender, "", str(original["Reply-To"]), f"Vacation: {original['Subject']}", at)
    msg["In-Reply-To"] = str(original["Message-ID"])
    msg["References"] = str(original["Message-ID"])
    msg["Auto-Submitted"] = "auto-replied"
    msg["Precedence"] = "bulk"
    msg["X-Autoreply"] = "yes"
    msg.set_content("I'm travelling with limited access to email and will answer when I'm back.")
    return msg.as_bytes()


def dsn(
    original: EmailMessage, recipient: str, status: str, diagnostic: str, at: datetime
) -> bytes:
    """A Postfix RFC 3464 report to the envelope sender, returning our headers."""
    return demo.dsn(
        original, recipient, at, status=status, diagnostic=diagnostic, mta="mx.example.net"
    )


def newsletter(to: str, at: datetime) -> bytes:
    msg = _base("news@growthweekly.example.org", "Growth Weekly", to, "5 pipeline hacks for Q1", at)
    msg["List-Id"] = "Growth Weekly <weekly.growthweekly.example.org>"
    msg["List-Unsubscribe"] = "<https://growthweekly.example.org/u/123>"
    msg["Precedence"] = "bulk"
    msg.set_content("This week: five pipeline hacks. Read online.")
    return msg.as_bytes()
