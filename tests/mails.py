"""Builders for the mail a lead (or their server) sends back, written the way real clients do."""

from __future__ import annotations

from datetime import date, datetime
from email.message import EmailMessage
from email.utils import format_datetime, make_msgid


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
    envelope = str(original["Reply-To"] or original["From"]).split("<")[-1].rstrip(">")
    returned = "".join(
        f"{k}: {v}\r\n"
        for k, v in original.items()
        if k in ("From", "To", "Subject", "Message-ID", "Date")
    )
    text = (
        "From: MAILER-DAEMON@mx.example.net (Mail Delivery System)\r\n"
        f"To: {envelope}\r\n"
        "Subject: Undelivered Mail Returned to Sender\r\n"
        f"Date: {format_datetime(at)}\r\n"
        f"Message-ID: {make_msgid(domain='mx.example.net')}\r\n"
        "Auto-Submitted: auto-replied\r\nMIME-Version: 1.0\r\n"
        'Content-Type: multipart/report; report-type=delivery-status; boundary="B"\r\n\r\n'
        "--B\r\nContent-Type: text/plain\r\n\r\n"
        "This is the mail system at host mx.example.net.\r\n\r\n"
        "I'm sorry to have to inform you that your message could not\r\n"
        "be delivered to one or more recipients.\r\n\r\n"
        f"<{recipient}>: {diagnostic}\r\n"
        "\r\n--B\r\nContent-Type: message/delivery-status\r\n\r\n"
        "Reporting-MTA: dns; mx.example.net\r\n\r\n"
        f"Final-Recipient: rfc822; {recipient}\r\nAction: failed\r\nStatus: {status}\r\n"
        f"Diagnostic-Code: smtp; {diagnostic}\r\n"
        f"\r\n--B\r\nContent-Type: text/rfc822-headers\r\n\r\n{returned}\r\n--B--\r\n"
    )
    return text.encode()


def newsletter(to: str, at: datetime) -> bytes:
    msg = _base("news@growthweekly.example.org", "Growth Weekly", to, "5 pipeline hacks for Q1", at)
    msg["List-Id"] = "Growth Weekly <weekly.growthweekly.example.org>"
    msg["List-Unsubscribe"] = "<https://growthweekly.example.org/u/123>"
    msg["Precedence"] = "bulk"
    msg.set_content("This week: five pipeline hacks. Read online.")
    return msg.as_bytes()
