"""A rep's mail client, simulated: the standard Reply and Reply All to a received message.

The rules are RFC 5322's (3.6.3 and 3.6.4), which mainstream clients follow: a reply goes
to the Reply-To addresses when there are any, else to From; Reply All adds To and Cc and
drops the replier's own address. The subject gets "Re: " unless it has one; In-Reply-To is
the message's Message-ID and References its References (else In-Reply-To) plus that
Message-ID. The whole message is quoted below the answer, text and HTML, as clients do.
"""

from __future__ import annotations

from datetime import datetime
from email.headerregistry import Address
from email.message import EmailMessage
from email.utils import format_datetime, getaddresses, make_msgid


def _addresses(msg: EmailMessage, *names: str) -> list[str]:
    values = [str(v) for name in names for v in msg.get_all(name, [])]
    return [addr.lower() for _, addr in getaddresses(values) if addr]


def recipients(original: EmailMessage, me: str, *, reply_all: bool) -> list[str]:
    """Where the client addresses a reply (Reply or Reply All), without `me`."""
    out = _addresses(original, "Reply-To") or _addresses(original, "From")
    if reply_all:
        out += _addresses(original, "To", "Cc")
    me = me.lower()
    return [a for a in dict.fromkeys(out) if a != me]


def _quoted(original: EmailMessage) -> tuple[str, str]:
    text_part = original.get_body(("plain",))
    html_part = original.get_body(("html",))
    text = text_part.get_content() if isinstance(text_part, EmailMessage) else ""
    html = html_part.get_content() if isinstance(html_part, EmailMessage) else ""
    return "\n".join("> " + line for line in text.splitlines()), html


def compose_reply(
    original: EmailMessage,
    *,
    name: str,
    address: str,
    body: str,
    at: datetime,
    reply_all: bool,
) -> EmailMessage:
    """The reply a client composes when the user presses Reply (or Reply All) and types
    `body` above the quoted message."""
    msg = EmailMessage()
    local, domain = address.split("@")
    msg["From"] = Address(name, local, domain)
    msg["To"] = ", ".join(recipients(original, address, reply_all=reply_all))
    subject = str(original["Subject"] or "")
    msg["Subject"] = subject if subject[:3].lower() == "re:" else f"Re: {subject}"
    msg["Date"] = format_datetime(at)
    msg["Message-ID"] = make_msgid(domain=domain)
    parent = str(original["Message-ID"])
    refs = str(original["References"] or original["In-Reply-To"] or "").split()
    msg["In-Reply-To"] = parent
    msg["References"] = " ".join([*refs, parent])
    quoted_text, quoted_html = _quoted(original)
    attribution = f"On {original['Date']}, {original['From']} wrote:"
    msg.set_content(f"{body}\n\n{attribution}\n{quoted_text}\n", cte="quoted-printable")
    msg.add_alternative(
        f"<p>{body}</p><p>{attribution}</p><blockquote>{quoted_html}</blockquote>",
        subtype="html",
        cte="quoted-printable",
    )
    return msg
