"""Build outbound emails as `email.message.EmailMessage` objects (RFC 5322, MIME).

Everything that reaches a header here may come from a lead (a name typed into a web form, a
CSV cell), so every value is neutralised before it is set: control characters (CR and LF
above all) never reach the wire, and an address must be exactly one valid address or the
call raises ValueError. Nothing in this module does I/O.
"""

from __future__ import annotations

import email.policy
import functools
import io
import random
import re
import secrets
import sys
import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from email import quoprimime
from email.generator import BytesGenerator
from email.headerregistry import Address
from email.message import EmailMessage, Message
from email.utils import format_datetime
from types import MappingProxyType
from urllib.parse import quote

from worker.config import SenderConfig, SmtpConfig
from worker.steps import Steps, drained

LOOP_HEADER = "X-Twoway-Loop"

# refold_source="none": headers we fold ourselves (Message-IDs, References, List-Unsubscribe)
# go out as written. The stdlib's folder would turn a long References line into RFC 2047
# encoded words, which mail clients do not decode there, and threading would break.
_POLICY = email.policy.default.clone(refold_source="none")
_MAX_LINE = 78
_NO_HEADERS: Mapping[str, str] = MappingProxyType({})
_TOKEN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._=-]*$")
_DOMAIN = re.compile(
    r"^(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$"
)
_HEADER_NAME = re.compile(r"^[!-9;-~]+$")  # RFC 5322 ftext: printable ASCII except ":"
_VISIBLE_ASCII = re.compile(r"^[!-~]+$")  # no space, no control character
# RFC 5322 dot-atom: the local parts the stdlib's address parser takes as they are.
_DOT_ATOM = re.compile(r"^[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*$")
_MSGID = re.compile(r"^[^\s<>@\x00-\x1f\x7f]+@[^\s<>@\x00-\x1f\x7f]+$")
# Headers compose() owns: an extra header of the same name would duplicate or override them.
_RESERVED = frozenset(
    h.lower()
    for h in (
        "From", "To", "Cc", "Bcc", "Subject", "Date", "Message-ID", "Reply-To", "In-Reply-To",
        "References", "List-Unsubscribe", "List-Unsubscribe-Post", "Auto-Submitted",
        "MIME-Version", "Content-Type", "Content-Transfer-Encoding", "Sender", "Return-Path",
        LOOP_HEADER,
    )
)  # fmt: skip


@dataclass(frozen=True)
class Attachment:
    """A file to attach. `mime_type` "message/rfc822" attaches `content` (the raw bytes of
    an email) as a proper message/rfc822 part, so mail clients show it as a message."""

    filename: str
    content: bytes
    mime_type: str


def clean_text(value: str) -> str:
    """One header-safe line: every control character (CR, LF, NUL, ...) becomes a space,
    whitespace runs collapse, the ends are stripped."""
    return " ".join(_LINE_BREAKERS.sub(" ", value).split())


# Unicode categories Cc, Zl and Zp, which the standard fixes for good: Cc is exactly
# U+0000-U+001F and U+007F-U+009F, Zl U+2028 alone, Zp U+2029 alone.
_LINE_BREAKERS = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


@functools.lru_cache(maxsize=4096)  # the sender's addresses come back for every email
def check_address(value: str) -> str:
    """Return `value` as one bare, valid addr-spec ("local@domain"); raise ValueError if it
    is anything else (empty, several addresses, a display name, control characters).

    An internationalised domain is returned in its ASCII (IDNA) form; a non-ASCII local
    part is refused, because it would need SMTPUTF8 from every server on the way.
    """
    if not isinstance(value, str):
        raise ValueError(f"not an email address: {value!r}")
    stripped = value.strip()
    if not _VISIBLE_ASCII.match(stripped) and (
        not stripped
        or any(unicodedata.category(ch) in ("Cc", "Zl", "Zp") or ch.isspace() for ch in stripped)
    ):
        raise ValueError(f"not a single email address: {value!r}")
    if any(ch in stripped for ch in ',;<>()[]\\"') or stripped.count("@") != 1:
        raise ValueError(f"not a single email address: {value!r}")
    local, domain = stripped.rsplit("@", 1)
    if not local or not domain or not local.isascii():
        raise ValueError(f"not a valid email address: {value!r}")
    try:
        domain = domain.encode("idna").decode("ascii")
    except UnicodeError:
        raise ValueError(f"not a valid email domain: {value!r}") from None
    if not _DOMAIN.match(domain):
        raise ValueError(f"not a valid email domain: {value!r}")
    if _DOT_ATOM.match(local):
        return f"{local}@{domain}"  # what the stdlib's parser makes of a plain local part
    try:
        parsed = Address(addr_spec=f"{local}@{domain}")
    except (ValueError, IndexError):
        raise ValueError(f"not a valid email address: {value!r}") from None
    return parsed.addr_spec


def new_message_id(domain: str) -> str:
    """A fresh, globally unique Message-ID "twoway.<32 hex>@domain", without angle brackets.

    The `twoway.` prefix and our domain let inbound matching recognise replies to our mail.
    """
    domain = clean_text(domain).lower()
    if not _DOMAIN.match(domain):
        raise ValueError(f"not a domain for a Message-ID: {domain!r}")
    return f"twoway.{secrets.token_hex(16)}@{domain}"


def reply_address(sender_address: str, token: str) -> str:
    """The sender's address plus-addressed with `token`: ("sales@example.com", "k3x9") →
    "sales+k3x9@example.com". Replies to it carry the token back to us."""
    address = check_address(sender_address)
    if not _TOKEN.match(token):
        raise ValueError(f"a reply token is letters, digits, '.', '_', '=', '-': {token!r}")
    local, domain = address.rsplit("@", 1)
    return check_address(f"{local}+{token}@{domain}")


def unsubscribe_targets(sender: SenderConfig, token: str) -> tuple[str | None, str | None]:
    """The (https URL, mailto address) to unsubscribe the lead with `token`, from the
    sender's `unsubscribe_url` / `unsubscribe_mailto` with "{token}" filled in; None for
    one that is not configured."""
    if not _TOKEN.match(token):
        raise ValueError(f"an unsubscribe token is letters, digits, '.', '_', '=', '-': {token!r}")
    url = mailto = None
    if sender.unsubscribe_url:
        url = _check_url(sender.unsubscribe_url.replace("{token}", quote(token, safe="")))
    if sender.unsubscribe_mailto:
        target = sender.unsubscribe_mailto.replace("{token}", token).removeprefix("mailto:")
        mailto = check_address(target)
    return url, mailto


def _check_url(url: str) -> str:
    if clean_text(url) != url or any(ch in url for ch in "<> ,"):
        raise ValueError(f"not a usable unsubscribe URL: {url!r}")
    if not url.lower().startswith(("https://", "http://")):
        raise ValueError(f"the unsubscribe URL must be http(s): {url!r}")
    return url


def is_message_id(value: str) -> bool:
    """Whether `value` (with or without angle brackets) is one usable Message-ID."""
    try:
        _bracketed(value)
    except ValueError:
        return False
    return True


def _bracketed(message_id: str) -> str:
    """`message_id` as "<id@domain>", checked to be a single id with no spaces or controls."""
    bare = message_id.strip()
    if bare.startswith("<") and bare.endswith(">"):
        bare = bare[1:-1]
    if not _MSGID.match(bare):
        raise ValueError(f"not a Message-ID: {message_id!r}")
    return f"<{bare}>"


def _reference(message_id: str) -> str | None:
    """Someone else's Message-ID, bracketed, to thread on; None when it cannot be written
    in a header line (whitespace, controls, brackets, or too long for 998 octets). Any
    number of "@" is kept: threading needs the id exactly as its author wrote it."""
    bare = message_id.strip().removeprefix("<").removesuffix(">")
    if not bare or len(bare) > 900 or not _FOREIGN_MSGID.match(bare):
        return None
    return f"<{bare}>"


_FOREIGN_MSGID = re.compile(r"^[!-;=?-~]+$")  # printable ASCII but "<" and ">"


def _mailbox(name: str, address: str) -> Address:
    addr = check_address(address)
    local, domain = addr.rsplit("@", 1)
    return Address(display_name=clean_text(name), username=local, domain=domain)


_HeaderValue = str | Address | list[Address]


@dataclass(frozen=True)
class _Header:
    """One header compose() sets: `value` as given to EmailMessage, or, when `raw`, a
    value already folded by _folded (it goes out as written)."""

    name: str
    value: _HeaderValue
    raw: bool = False


def _folded(name: str, items: Sequence[str], separator: str = "") -> _Header:
    """Header `name` of `items` (checked ASCII tokens without whitespace) joined by
    `separator` and a space, folded between items so lines stay within 78 characters."""
    lines: list[str] = []
    current = ""
    for i, item in enumerate(items):
        token = item + (separator if i < len(items) - 1 else "")
        used = len(current) + (0 if lines else len(name) + 2)
        if current and used + 1 + len(token) > _MAX_LINE:
            lines.append(current)
            current = " " + token
        else:
            current = f"{current} {token}" if current else token
    lines.append(current)
    return _Header(name, "\n".join(lines), raw=True)


def _body_cte(text: str) -> str:
    # 7bit when it is safe everywhere; otherwise quoted-printable, which (unlike 8bit) does
    # not need the server to offer 8BITMIME and keeps the source readable.
    if text.isascii() and all(len(line) <= 900 for line in text.splitlines()):
        return "7bit"
    return "quoted-printable"


def compose(
    *,
    from_addr: str,
    from_name: str,
    to_addr: str,
    to_name: str,
    subject: str,
    text: str,
    html: str,
    message_id: str,
    domain: str,
    reply_to: str | Sequence[tuple[str, str]] | None = None,
    in_reply_to: str | None = None,
    references: Sequence[str] = (),
    unsubscribe_url: str | None = None,
    unsubscribe_mailto: str | None = None,
    auto_submitted: bool = False,
    attachments: Sequence[Attachment] = (),
    date: datetime | None = None,
    extra_headers: Mapping[str, str] = _NO_HEADERS,
) -> EmailMessage:
    """Build one outbound email: multipart/alternative (text, then HTML), wrapped in
    multipart/mixed when there are attachments.

    Headers: Date (`date`, default now), Message-ID `<message_id>`, From and To with
    encoded display names, Subject, optional Reply-To (one bare address, or several
    `(display name, address)` pairs: a reply then goes to all of them), In-Reply-To and
    References, the
    RFC 8058 pair `List-Unsubscribe` / `List-Unsubscribe-Post: List-Unsubscribe=One-Click`
    (the Post header only when there is an https URL), `Auto-Submitted: auto-generated` when
    `auto_submitted`, and always `X-Twoway-Loop: <domain>` so we recognise our own mail.

    Names and the subject are neutralised (control characters become spaces); an address
    that is not exactly one valid address raises ValueError, as does a naive `date`, a
    malformed Message-ID or an extra header that would replace one of ours.
    """
    headers = _headers(
        from_addr=from_addr, from_name=from_name, to_addr=to_addr, to_name=to_name,
        subject=subject, message_id=message_id, domain=domain, reply_to=reply_to,
        in_reply_to=in_reply_to, references=references, unsubscribe_url=unsubscribe_url,
        unsubscribe_mailto=unsubscribe_mailto, auto_submitted=auto_submitted, date=date,
        extra_headers=extra_headers,
    )  # fmt: skip
    msg = EmailMessage(policy=_POLICY)
    for h in headers:
        if h.raw:
            msg.set_raw(h.name, str(h.value))
        else:
            msg[h.name] = h.value
    msg.set_content(text, cte=_body_cte(text))
    msg.add_alternative(html, subtype="html", cte=_body_cte(html))
    for att in attachments:
        _attach(msg, att)
    return msg


def compose_wire_steps(
    *,
    from_addr: str,
    from_name: str,
    to_addr: str,
    to_name: str,
    subject: str,
    text: str,
    html: str,
    message_id: str,
    domain: str,
    reply_to: str | Sequence[tuple[str, str]] | None = None,
    in_reply_to: str | None = None,
    references: Sequence[str] = (),
    unsubscribe_url: str | None = None,
    unsubscribe_mailto: str | None = None,
    auto_submitted: bool = False,
    attachments: Sequence[Attachment] = (),
    date: datetime | None = None,
    extra_headers: Mapping[str, str] = _NO_HEADERS,
) -> Steps[bytes]:
    """`as_wire_bytes(compose(...))` with the same arguments, checks and bytes (but for
    the random MIME boundary), a part at a time (see worker.steps): the stdlib's header
    objects and generator cost milliseconds a message, so the wire form is written
    directly. Its header classes fold only the headers that need folding or encoding; a
    message with attachments or extra headers is built by compose.
    """
    if attachments or extra_headers:
        return as_wire_bytes(
            compose(
                from_addr=from_addr, from_name=from_name, to_addr=to_addr, to_name=to_name,
                subject=subject, text=text, html=html, message_id=message_id, domain=domain,
                reply_to=reply_to, in_reply_to=in_reply_to, references=references,
                unsubscribe_url=unsubscribe_url, unsubscribe_mailto=unsubscribe_mailto,
                auto_submitted=auto_submitted, attachments=attachments, date=date,
                extra_headers=extra_headers,
            )
        )  # fmt: skip
    headers = _headers(
        from_addr=from_addr, from_name=from_name, to_addr=to_addr, to_name=to_name,
        subject=subject, message_id=message_id, domain=domain, reply_to=reply_to,
        in_reply_to=in_reply_to, references=references, unsubscribe_url=unsubscribe_url,
        unsubscribe_mailto=unsubscribe_mailto, auto_submitted=auto_submitted, date=date,
        extra_headers=extra_headers,
    )  # fmt: skip
    yield
    out = "".join(map(_wire_header, headers))
    yield
    plain = _text_part(text, "plain", first=True)
    yield
    parts = [plain, _text_part(html, "html", first=False)]
    boundary = _boundary("\n".join(parts))
    out += f'MIME-Version: 1.0\nContent-Type: multipart/alternative;\n boundary="{boundary}"\n\n'
    out += f"--{boundary}\n" + f"\n--{boundary}\n".join(parts) + f"\n--{boundary}--\n"
    data = out.encode("ascii", "surrogateescape")
    return data.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")


compose_wire = drained(compose_wire_steps)


def _headers(
    *,
    from_addr: str,
    from_name: str,
    to_addr: str,
    to_name: str,
    subject: str,
    message_id: str,
    domain: str,
    reply_to: str | Sequence[tuple[str, str]] | None,
    in_reply_to: str | None,
    references: Sequence[str],
    unsubscribe_url: str | None,
    unsubscribe_mailto: str | None,
    auto_submitted: bool,
    date: datetime | None,
    extra_headers: Mapping[str, str],
) -> list[_Header]:
    """compose()'s headers in order, every value checked and neutralised."""
    when = date if date is not None else datetime.now(UTC)
    if when.tzinfo is None or when.utcoffset() is None:
        raise ValueError("date must be timezone-aware")
    loop_domain = clean_text(domain).lower()
    if not _DOMAIN.match(loop_domain):
        raise ValueError(f"not a domain: {domain!r}")

    out = [
        _Header("Date", format_datetime(when)),
        _folded("Message-ID", [_bracketed(message_id)]),
        _Header("From", _mailbox(from_name, from_addr)),
        _Header("To", _mailbox(to_name, to_addr)),
        _Header("Subject", clean_text(subject)),
    ]
    if isinstance(reply_to, str):
        out.append(_Header("Reply-To", check_address(reply_to)))
    elif reply_to:
        out.append(_Header("Reply-To", [_mailbox(name, address) for name, address in reply_to]))
    parent = _reference(in_reply_to) if in_reply_to else None
    if parent:
        out.append(_folded("In-Reply-To", [parent]))
    refs = [r for r in map(_reference, references) if r]
    if refs:
        out.append(_folded("References", refs))
    targets = []
    if unsubscribe_url:
        targets.append(f"<{_check_url(unsubscribe_url)}>")
    if unsubscribe_mailto:
        targets.append(f"<mailto:{check_address(unsubscribe_mailto.removeprefix('mailto:'))}>")
    if targets:
        out.append(_folded("List-Unsubscribe", targets, separator=","))
    if unsubscribe_url and unsubscribe_url.lower().startswith("https://"):
        # RFC 8058 one-click needs an https URL; a mailto alone does not qualify.
        out.append(_Header("List-Unsubscribe-Post", "List-Unsubscribe=One-Click"))
    if auto_submitted:
        out.append(_Header("Auto-Submitted", "auto-generated"))
    out.append(_Header(LOOP_HEADER, loop_domain))
    for name, value in extra_headers.items():
        if not _HEADER_NAME.match(name) or name.lower() in _RESERVED:
            raise ValueError(f"cannot set header {name!r} through extra_headers")
        out.append(_Header(name, clean_text(value)))
    return out


# Values the stdlib writes exactly as given (within a line): printable ASCII words, no
# encoded-word look-alikes; display names of atext words only (others it quotes).
_PLAIN_TEXT = re.compile(r"^[!-~]+(?: [!-~]+)*$")
_PLAIN_NAME = re.compile(r"^[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?: [A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*$")


def subject_text(subject: str) -> str:
    """The Subject of a message composed with `subject`, as a reader sees it (decoded)."""
    text = clean_text(subject)
    # The stdlib reads "=?charset?...?=" in a value as an encoded word, as a reader's
    # client will: the column keeps what they see.
    return str(_POLICY.header_factory("Subject", text)) if "=?" in text else text


def _plain(value: _HeaderValue) -> str | None:
    """`value` as one header line's text when the stdlib would write it unchanged."""
    if isinstance(value, str):
        return value if _PLAIN_TEXT.match(value) and "=?" not in value else None
    if isinstance(value, list):
        each = [_plain(a) for a in value]
        return ", ".join(x for x in each if x is not None) if None not in each else None
    if not _DOT_ATOM.match(value.username) or not _DOMAIN.match(value.domain):
        return None
    name = value.display_name
    if not name:
        return value.addr_spec
    return f"{name} <{value.addr_spec}>" if _PLAIN_NAME.match(name) and "=?" not in name else None


def _wire_header(h: _Header) -> str:
    """One header as the generator writes it ("\n" line ends)."""
    if h.raw:
        return f"{h.name}: {h.value}\n"
    plain = _plain(h.value)
    if plain is not None and len(h.name) + 2 + len(plain) <= _MAX_LINE:
        return f"{h.name}: {plain}\n"
    if isinstance(h.value, str):
        return _folded_text(h.name, h.value)
    return str(_POLICY.header_factory(h.name, h.value).fold(policy=_POLICY))


@functools.lru_cache(maxsize=256)  # a subject nobody's name is in comes back every email
def _folded_text(name: str, value: str) -> str:
    """A text header folded (and encoded) by the stdlib's header class, as compose() has it."""
    return str(_POLICY.header_factory(name, value).fold(policy=_POLICY))


def _text_part(text: str, subtype: str, *, first: bool) -> str:
    """A text part as EmailMessage.set_content / add_alternative and the generator write
    it: utf-8, 7bit or quoted-printable, lines ending "\n"."""
    cte = _body_cte(text)
    data = b"\n".join(text.encode("utf-8").splitlines()) + b"\n"
    if cte == "7bit":
        body = data.decode("ascii")
    else:
        body = quoprimime.body_encode(data.decode("latin-1"), _MAX_LINE)  # the policy's
    head = f'Content-Type: text/{subtype}; charset="utf-8"\nContent-Transfer-Encoding: {cte}\n'
    # add_alternative makes the HTML part an EmailMessage of its own, with MIME-Version.
    return head + ("" if first else "MIME-Version: 1.0\n") + "\n" + body


def _boundary(text: str) -> str:
    """A multipart boundary as the stdlib's generator makes it: random, not in `text`."""
    boundary = "=" * 15 + f"{random.randrange(sys.maxsize):019d}" + "=="
    found, counter = boundary, 0
    while f"--{found}" in text:  # the stdlib looks for whole lines; anywhere is stricter
        found = f"{boundary}.{counter}"
        counter += 1
    return found


def _attach(msg: EmailMessage, att: Attachment) -> None:
    filename = clean_text(att.filename).replace("/", "_").replace("\\", "_") or "attachment"
    mime_type = att.mime_type.strip().lower()
    maintype, _, subtype = mime_type.partition("/")
    if not maintype or not subtype or clean_text(mime_type) != mime_type or " " in mime_type:
        raise ValueError(f"not a MIME type: {att.mime_type!r}")
    if mime_type == "message/rfc822" and fits_lines(att.content):
        # The original goes out byte for byte, never parsed: parsing and writing it again
        # would cost what a hostile message makes it cost (deep nesting, header bombs).
        # 8-bit bytes go as "8bit"; the mailer then asks for 8BITMIME where it is offered.
        part = EmailMessage(policy=_POLICY)
        part["Content-Type"] = "message/rfc822"
        part["Content-Transfer-Encoding"] = "7bit" if att.content.isascii() else "8bit"
        part.add_header("Content-Disposition", "attachment", filename=filename)
        part.set_payload(att.content.decode("ascii", "surrogateescape"))
        msg.make_mixed()
        msg.attach(part)
    elif mime_type == "message/rfc822":
        # RFC 2046 5.2.1 allows only 7bit/8bit/binary for message/rfc822, and a line over
        # 998 octets (or a NUL) needs BINARYMIME on every hop: send it as a file instead.
        msg.add_attachment(att.content, maintype="application", subtype="octet-stream",
                           filename=filename)  # fmt: skip
    else:
        msg.add_attachment(att.content, maintype=maintype, subtype=subtype, filename=filename)


def fits_lines(raw: bytes) -> bool:
    """Whether `raw` can travel as 7bit or 8bit data: no NUL and every line at most 998
    octets (RFC 5322 2.1.1, RFC 5321 4.5.3.1.6)."""
    return b"\0" not in raw and not _LONG_LINE.search(raw)


def as_wire_bytes(msg: EmailMessage) -> bytes:
    """`msg` as SMTP carries it: every line ending CRLF (smtplib sends bytes as given),
    an attached original byte for byte."""
    out = io.BytesIO()
    _WireGenerator(out, policy=msg.policy).flatten(msg)
    data = out.getvalue()
    return data.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")


class MessageTooLarge(ValueError):
    """A message is larger than the SMTP account takes; it must not be sent."""


def check_size(raw: bytes, smtp: SmtpConfig | None) -> bytes:
    """`raw`, unless it is over the account's smtp.max_message_bytes: MessageTooLarge."""
    default = int(SmtpConfig.model_fields["max_message_bytes"].default)
    limit = smtp.max_message_bytes if smtp is not None else default
    if len(raw) > limit:
        raise MessageTooLarge(
            f"the message is {len(raw):,} bytes, over the {limit:,} bytes this SMTP account "
            "sends (smtp.max_message_bytes); not sent"
        )
    return raw


class _WireGenerator(BytesGenerator):
    """Writes a message/rfc822 part whose payload is the original's text (see _attach) as
    those bytes; the stdlib would insist on ASCII there."""

    def _handle_message(self, msg: Message) -> None:
        payload = vars(msg)["_payload"]  # get_payload() would decode the escaped bytes
        if isinstance(payload, str):
            self.write(payload)  # BytesGenerator.write keeps surrogate-escaped bytes
            return
        super()._handle_message(msg)  # type: ignore[misc]


_LONG_LINE = re.compile(rb"[^\r\n]{999}")
