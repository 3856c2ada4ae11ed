"""Bytes to a `ParsedMessage`: the one module that reads raw mail.

`parse` turns any input into a frozen `ParsedMessage` or raises `ParseError`; nothing
else escapes it, so a poisoned message can be quarantined with a readable reason.
mail-parser (package `mailparser`) builds the MIME tree and lists the attachments; the
rest (header decoding with charset fallbacks, body choice, the machine-readable parts of
delivery, feedback and disposition reports) is done here with the stdlib `email` package,
because classification needs parts that mail-parser flattens away.
"""

from __future__ import annotations

import contextlib
import email
import email.errors
import email.header
import email.utils
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from email.message import Message
from html.parser import HTMLParser
from typing import Literal

import mailparser

__all__ = [
    "DeliveryStatus",
    "ParseError",
    "ParsedMessage",
    "decode_bytes",
    "html_to_text",
    "parse",
    "parse_field_blocks",
]

# Deeper MIME nesting than this is never legitimate mail; stop walking instead of recursing.
_MAX_DEPTH = 40
# Nobody reads more than this of a body part; it bounds the cost of pathological messages.
_MAX_TEXT = 1_000_000
# Bounds on the work one message may cause (issue: header bombs cost the `email` package
# seconds to minutes). Past a bound the rest is left out, and `ParsedMessage.limits` says so.
MAX_PARSE_BYTES = 2 * 1024 * 1024
MAX_MESSAGE_BYTES = 16 * 1024 * 1024
"""Bytes of one message read into memory at all (IMAP, Maildir, `inspect`): the rest of a
larger message stays where it is, and `parse(raw, size=...)` says it was truncated."""
"""Only this much of a message is parsed: headers, the text and the report parts come first."""
MAX_LINES = 100_000
"""Lines parsed per message (the `email` parser's cost is per line and per part)."""
MAX_FIELD = 16 * 1024
"""A header field longer than this (RFC 5322 lines stop at 998) is cut to it."""
MAX_FIELDS = 1000
"""Header fields kept per MIME part."""
MAX_PARTS = 1000
"""MIME parts looked at per message."""
MAX_BODY_TEXT = 64 * 1024
"""Characters of body text (and of HTML) that classification and reply extraction see."""

_MSGID_RE = re.compile(r"<([^<>\s]+)>")
_WS_RE = re.compile(r"[ \t]+")


class ParseError(Exception):
    """The bytes cannot be read as an email at all; `str(error)` says why, for a human."""


@dataclass(frozen=True)
class DeliveryStatus:
    """One per-recipient block of a `message/delivery-status` part (RFC 3464 §2.3).

    Addresses are bare and lower-cased; `action` is lower-cased (`failed`, `delayed`,
    `delivered`, `relayed`, `expanded`); `status` is the RFC 3463 code as written
    (e.g. `5.1.1`), or None when the block has none.
    """

    final_recipient: str | None
    original_recipient: str | None
    action: str | None
    status: str | None
    diagnostic_code: str | None
    remote_mta: str | None = None


@dataclass(frozen=True)
class ParsedMessage:
    """What twoway needs from one message. Built only by `parse`.

    Besides the contract fields, report parts are exposed for classification:

    - `content_type`: the top-level MIME type, lower-cased.
    - `report_type`: the `report-type` of the first `multipart/report` part anywhere in the
      tree (`delivery-status`, `feedback-report`, `disposition-notification`), lower-cased,
      or None when there is none.
    - `report_fields`: the per-message fields of the machine-readable report part (the
      first block of `message/delivery-status`, or the whole `message/feedback-report` /
      `message/disposition-notification`), names lower-cased, in order.
    - `delivery_status`: the per-recipient blocks of `message/delivery-status`.
    - `returned_headers`: the headers of the first attached message — in a bounce or
      complaint, the returned message (`message/rfc822`, `text/rfc822-headers`...) — names
      lower-cased, values decoded.
    - `text_from_html`: True when `text` was derived from HTML (no text/plain part).
    """

    message_id: str | None
    in_reply_to: tuple[str, ...]
    references: tuple[str, ...]
    from_addr: str | None
    from_name: str
    reply_to: tuple[str, ...]
    to: tuple[str, ...]
    cc: tuple[str, ...]
    delivered_to: tuple[str, ...]
    return_path: str | None
    subject: str
    date: datetime | None
    text: str
    html: str
    attachments: tuple[str, ...]
    headers: tuple[tuple[str, str], ...]
    raw_size: int
    content_type: str = "text/plain"
    report_type: str | None = None
    report_fields: tuple[tuple[str, str], ...] = ()
    delivery_status: tuple[DeliveryStatus, ...] = ()
    returned_headers: tuple[tuple[str, str], ...] = ()
    text_from_html: bool = False
    limits: tuple[str, ...] = ()
    """The bounds this message hit (what was left out), for a human; () when none."""

    def header(self, name: str) -> str | None:
        """The first value of header `name` (case-insensitive), or None when absent."""
        key = name.lower()
        for hname, value in self.headers:
            if hname == key:
                return value
        return None

    def header_all(self, name: str) -> tuple[str, ...]:
        """Every value of header `name` (case-insensitive), in order."""
        key = name.lower()
        return tuple(value for hname, value in self.headers if hname == key)

    def all_recipients(self) -> tuple[str, ...]:
        """To, Cc and the envelope recipients (Delivered-To & co), deduplicated, in order."""
        return tuple(dict.fromkeys((*self.to, *self.cc, *self.delivered_to)))

    def returned_header(self, name: str) -> str | None:
        """The first value of `name` in the returned message's headers, or None."""
        key = name.lower()
        for hname, value in self.returned_headers:
            if hname == key:
                return value
        return None


# --------------------------------------------------------------------------- decoding


def decode_bytes(data: bytes, charset: str | None = None) -> str:
    """Decode body bytes: UTF-8, then the declared charset, then Windows-1252, then Latin-1.

    Never raises. Mislabelled charsets are common (a "Big5" reply that is really UTF-8),
    and non-ASCII bytes that happen to be valid UTF-8 almost never are anything else, so
    UTF-8 is tried first; a charset that fails strictly falls through to the next guess.
    """
    candidates = [c for c in ("utf-8", charset, "cp1252") if c]
    declared = (charset or "").strip().strip('"').lower().replace("_", "-")
    if declared in ("utf-8", "utf8"):
        # A part declared UTF-8 with one bad byte is UTF-8 with a typo, not Latin-1.
        return data.decode("utf-8", errors="replace")
    for candidate in candidates:
        try:
            text = data.decode(candidate.strip().strip('"').lower())
            text.encode("utf-8")  # some codecs yield lone surrogates, unusable downstream
            return text
        except (LookupError, UnicodeError, ValueError):
            continue
    return data.decode("latin-1")


_ESCAPED_BYTE_RE = re.compile("[\udc80-\udcff]")


def _unsurrogate(value: str) -> str:
    """Turn raw 8-bit header bytes (kept by `email` as surrogate escapes) into text."""
    if not _ESCAPED_BYTE_RE.search(value):  # one C scan, not a Python loop per character
        return value
    return decode_bytes(value.encode("ascii", "surrogateescape"))


def decode_header_value(value: object) -> str:
    """Decode one raw header value: unfold, repair 8-bit bytes, decode RFC 2047 words."""
    # NUL is no text (RFC 5322 excludes it; PostgreSQL text cannot hold it): drop it.
    text = _unsurrogate(str(value)).replace("\0", "")
    text = re.sub(r"\r?\n(?=[ \t])", "", text).replace("\r", "").replace("\n", " ")
    if "=?" in text:
        # Malformed encoded words: keep the raw text.
        with contextlib.suppress(Exception):
            text = "".join(
                decode_bytes(chunk, chunk_charset) if isinstance(chunk, bytes) else chunk
                for chunk, chunk_charset in email.header.decode_header(text)
            )
    return text.strip()


def _addresses(values: list[str]) -> tuple[str, ...]:
    """Bare, lower-cased addresses from address-list header values, deduplicated."""
    out: list[str] = []
    try:
        pairs = email.utils.getaddresses(values)
    except Exception:  # the stdlib parser trips on some garbage
        pairs = []
    for _name, addr in pairs:
        addr = addr.strip().strip("<>").lower()
        if addr and "@" in addr and addr not in out:
            out.append(addr)
    if not out:
        # Fall back to anything that looks like an address (broken quoting, bare lists).
        for value in values:
            for addr in re.findall(r"[\w.+'=-]+@[\w.-]+\w", value):
                addr = addr.lower()
                if addr not in out:
                    out.append(addr)
    return tuple(out)


def _msg_ids(value: str | None) -> tuple[str, ...]:
    """Message ids from an In-Reply-To/References value, without <>, in order, deduplicated."""
    if not value:
        return ()
    ids = _MSGID_RE.findall(value)
    if not ids:
        # Some clients omit the angle brackets.
        ids = [token for token in value.split() if "@" in token]
    return tuple(dict.fromkeys(i.strip() for i in ids if i.strip()))


def _single_msg_id(value: str | None) -> str | None:
    if not value:
        return None
    ids = _msg_ids(value)
    if ids:
        return ids[0]
    stripped = value.strip().strip("<>").strip()
    return stripped or None


def _parse_date(value: str | None) -> datetime | None:
    if not value:
        return None
    try:
        parsed = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if parsed is None:
        return None
    if parsed.tzinfo is None:
        # RFC 5322 "-0000" means "UTC, source zone unknown"; the stdlib returns it naive.
        parsed = parsed.replace(tzinfo=UTC)
    return parsed


# --------------------------------------------------------------------------- HTML to text

_BLOCK_TAGS = frozenset(
    [
        "address",
        "article",
        "aside",
        "blockquote",
        "center",
        "dd",
        "div",
        "dl",
        "dt",
        "fieldset",
        "figcaption",
        "figure",
        "footer",
        "form",
        "h1",
        "h2",
        "h3",
        "h4",
        "h5",
        "h6",
        "header",
        "hr",
        "li",
        "main",
        "nav",
        "ol",
        "p",
        "pre",
        "section",
        "table",
        "tbody",
        "thead",
        "tfoot",
        "tr",
        "ul",
    ]
)
_VOID_TAGS = frozenset(
    [
        "area",
        "base",
        "br",
        "col",
        "embed",
        "hr",
        "img",
        "input",
        "link",
        "meta",
        "param",
        "source",
        "track",
        "wbr",
    ]
)
_SKIP_CONTENT = frozenset({"script", "style", "head", "title", "template"})

# What a skip hook answers for an opening tag: drop this element's content, drop
# everything from here to the end of the document, or keep going.
SkipDecision = Literal["skip", "stop"] | None
SkipHook = Callable[[str, dict[str, str]], SkipDecision]


class _TextExtractor(HTMLParser):
    """A forgiving HTML-to-text converter: block elements become line breaks, blockquotes
    become `> ` lines (so quote stripping treats them like plain-text quotes)."""

    def __init__(self, hook: SkipHook | None) -> None:
        super().__init__(convert_charrefs=True)
        self.hook = hook
        self.lines: list[str] = []
        self.current: list[str] = []
        self.quote_depth = 0
        self.skip_tag: str | None = None
        self.skip_nesting = 0
        self.hidden = 0
        self.stopped = False
        self.in_pre = 0

    def _flush(self) -> None:
        line = "".join(self.current)
        if not self.in_pre:
            line = _WS_RE.sub(" ", line).strip()
        prefix = "> " * self.quote_depth
        self.lines.append((prefix + line).rstrip() if line or self.quote_depth else "")
        self.current = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if self.stopped:
            return
        if self.skip_tag is not None:
            if tag == self.skip_tag and tag not in _VOID_TAGS:
                self.skip_nesting += 1
            return
        if tag in _SKIP_CONTENT:
            self.hidden += 1
            return
        if self.hook is not None:
            decision = self.hook(tag, {k.lower(): (v or "") for k, v in attrs})
            if decision == "stop":
                self._flush()
                self.stopped = True
                return
            if decision == "skip":
                if tag not in _VOID_TAGS:
                    self.skip_tag, self.skip_nesting = tag, 1
                return
        if tag == "br":
            self._flush()
        elif tag in _BLOCK_TAGS:
            if self.current:
                self._flush()
            if tag == "blockquote":
                self.quote_depth += 1
            elif tag == "pre":
                self.in_pre += 1
        elif tag in ("td", "th"):
            self.current.append(" ")

    def handle_endtag(self, tag: str) -> None:
        if self.stopped:
            return
        if self.skip_tag is not None:
            if tag == self.skip_tag:
                self.skip_nesting -= 1
                if self.skip_nesting == 0:
                    self.skip_tag = None
            return
        if tag in _SKIP_CONTENT:
            self.hidden = max(0, self.hidden - 1)
            return
        if tag in _BLOCK_TAGS:
            if self.current:
                self._flush()
            if tag == "blockquote" and self.quote_depth:
                self.quote_depth -= 1
            elif tag == "pre" and self.in_pre:
                self.in_pre -= 1
            if tag in ("p", "table"):
                self.lines.append("")

    def handle_data(self, data: str) -> None:
        if self.stopped or self.skip_tag is not None or self.hidden:
            return
        if self.in_pre:
            parts = data.split("\n")
            for i, part in enumerate(parts):
                if i:
                    self._flush()
                self.current.append(part)
        else:
            self.current.append(data.replace("\xa0", " ").replace("\n", " "))

    def text(self) -> str:
        if self.current:
            self._flush()
        out: list[str] = []
        for line in self.lines:
            if line or (out and out[-1]):  # collapse runs of empty lines
                out.append(line)
        return "\n".join(out).strip("\n")


def html_to_text(html: str, hook: SkipHook | None = None) -> str:
    """Readable plain text from HTML; never raises.

    `hook(tag, attrs)` may return "skip" (drop that element and its content) or "stop"
    (drop everything from that element on) — used to cut quoted history out of replies.
    """
    extractor = _TextExtractor(hook)
    try:
        extractor.feed(html[:_MAX_TEXT])
        extractor.close()
    except Exception:  # HTMLParser is lenient, but never let it escape
        pass
    return extractor.text()


# --------------------------------------------------------------------------- MIME walking


def parse_field_blocks(text: str) -> list[list[tuple[str, str]]]:
    """Split `Name: value` field blocks separated by blank lines (a delivery-status body).

    Names are lower-cased, continuation lines are unfolded. Lines that are not fields are
    ignored, so a sloppy report still yields what it can.
    """
    blocks: list[list[tuple[str, str]]] = []
    block: list[tuple[str, str]] = []
    for line in text.replace("\r\n", "\n").replace("\r", "\n").split("\n"):
        if not line.strip():
            if block:
                blocks.append(block)
                block = []
            continue
        if line[0] in " \t" and block:
            name, value = block[-1]
            block[-1] = (name, f"{value} {line.strip()}")
            continue
        name, sep, value = line.partition(":")
        if sep and name.strip() and " " not in name.strip():
            block.append((name.strip().lower(), value.strip()))
    if block:
        blocks.append(block)
    return blocks


def _part_text(part: Message) -> str:
    """The decoded text of a leaf part (transfer encoding and charset applied)."""
    try:
        payload = part.get_payload(decode=True)
    except Exception:  # broken base64/qp: fall back to the raw payload
        payload = None
    if isinstance(payload, bytes):
        charset = None
        try:
            charset = part.get_content_charset()
        except Exception:
            charset = None
        return decode_bytes(payload[:_MAX_TEXT], charset).replace("\0", "")
    raw = part.get_payload()
    if isinstance(raw, str):
        return _unsurrogate(raw[:_MAX_TEXT]).replace("\0", "")
    return ""


def _content_type(part: Message) -> str:
    try:
        return part.get_content_type().lower()
    except Exception:
        return "text/plain"


def _is_attachment(part: Message) -> bool:
    try:
        disposition = (part.get_content_disposition() or "").lower()
    except Exception:
        disposition = ""
    return disposition == "attachment"


def _filename(part: Message) -> str | None:
    try:
        name = part.get_filename()
    except Exception:
        name = None
    return decode_header_value(name) if name else None


def _header_items(part: Message) -> list[tuple[str, str]]:
    items: list[tuple[str, str]] = []
    for name, value in part.raw_items():
        items.append((str(name).strip().lower(), decode_header_value(value)))
    return items


def _sub_blocks(part: Message) -> list[list[tuple[str, str]]]:
    """Field blocks of a report part, whether `email` parsed it into sub-messages or not."""
    payload = part.get_payload()
    if isinstance(payload, list):
        blocks = [_header_items(sub) for sub in payload if isinstance(sub, Message)]
        blocks = [b for b in blocks if b]
        # A transfer-encoded report is left as text by `email`: decode it ourselves.
        if blocks:
            return blocks
    return parse_field_blocks(_part_text(part))


def _bare(value: str | None) -> str | None:
    """`rfc822; Foo@Example.com` -> `foo@example.com`."""
    if not value:
        return None
    _type, sep, rest = value.partition(";")
    addr = (rest if sep else value).strip().strip("<>").strip().lower()
    return addr or None


def _delivery_blocks(blocks: list[list[tuple[str, str]]]) -> tuple[DeliveryStatus, ...]:
    out: list[DeliveryStatus] = []
    for block in blocks:
        fields = dict(reversed(block))  # first occurrence wins
        if not any(k in fields for k in ("final-recipient", "original-recipient", "action")):
            continue
        status = fields.get("status")
        match = re.search(r"\d\.\d{1,3}\.\d{1,3}", status or "")
        out.append(
            DeliveryStatus(
                final_recipient=_bare(fields.get("final-recipient")),
                original_recipient=_bare(fields.get("original-recipient")),
                action=(fields.get("action") or "").strip().lower() or None,
                status=match.group(0) if match else (status.strip() if status else None),
                diagnostic_code=fields.get("diagnostic-code"),
                remote_mta=fields.get("remote-mta"),
            )
        )
    return tuple(out)


@dataclass
class _Walk:
    plains: list[str]
    htmls: list[str]
    attachments: list[str]
    report_type: str | None = None
    report_fields: tuple[tuple[str, str], ...] = ()
    delivery: tuple[DeliveryStatus, ...] = ()
    returned: tuple[tuple[str, str], ...] = ()


def _iter_children(part: Message) -> Iterator[Message]:
    payload = part.get_payload()
    if isinstance(payload, list):
        for child in payload:
            if isinstance(child, Message):
                yield child


def _walk(part: Message, acc: _Walk, depth: int, inside_message: bool) -> None:
    """Collect bodies, attachments and report parts.

    Body text comes only from the top-level message, never from an attached or returned
    message (its text is someone else's words, e.g. our own mail inside a bounce).
    """
    if depth > _MAX_DEPTH:
        return
    ctype = _content_type(part)
    if ctype == "multipart/report" and acc.report_type is None:
        acc.report_type = (part.get_param("report-type") or "").__str__().strip().lower() or ""
    if ctype == "message/delivery-status":
        blocks = _sub_blocks(part)
        if blocks and not acc.delivery:
            acc.report_fields = tuple(blocks[0])
            acc.delivery = _delivery_blocks(blocks[1:] or blocks)
        return
    if ctype in ("message/feedback-report", "message/disposition-notification"):
        if not acc.report_fields:
            acc.report_fields = tuple(f for block in _sub_blocks(part) for f in block)
        return
    if ctype in ("text/rfc822-headers", "message/rfc822-headers"):
        if not acc.returned:
            blocks = parse_field_blocks(_part_text(part))
            acc.returned = tuple(blocks[0]) if blocks else ()
        return
    if ctype in ("message/rfc822", "message/global"):
        children = list(_iter_children(part))
        if children:
            if not acc.returned:
                acc.returned = tuple(_header_items(children[0]))
            name = _filename(part)
            if name:
                acc.attachments.append(name)
            _walk(children[0], acc, depth + 1, True)
        return
    if ctype.startswith("multipart/") and isinstance(part.get_payload(), str):
        # A boundary that matches no line (cut off, mistyped): the parts are one text.
        if not inside_message:
            acc.plains.append(_unsurrogate(str(part.get_payload())[:_MAX_TEXT]).replace("\0", ""))
        return
    if ctype.startswith("multipart/") or isinstance(part.get_payload(), list):
        for child in _iter_children(part):
            _walk(child, acc, depth + 1, inside_message)
        return
    name = _filename(part)
    if name and not inside_message:
        acc.attachments.append(name)
    if inside_message or _is_attachment(part) or (name and not ctype.startswith("text/")):
        return
    if ctype == "text/plain" or ctype == "text":
        acc.plains.append(_part_text(part))
    elif ctype == "text/html":
        acc.htmls.append(_part_text(part))


def _message_from_bytes(raw: bytes, limits: list[str]) -> tuple[Message, tuple[str, ...]]:
    """Build the MIME tree (stdlib), bound it, then let mail-parser list the attachments."""
    try:
        message = email.message_from_bytes(raw)
    except RecursionError as exc:
        raise ParseError("MIME structure is nested too deeply") from exc
    except Exception as exc:
        raise ParseError(f"not readable as an email: {exc}") from exc
    _bound_tree(message, limits)
    if _attachment_free(message):
        return message, ()  # mail-parser would list none; it re-reads the whole message
    names: tuple[str, ...] = ()
    try:
        parsed = mailparser.MailParser(message)
        names = tuple(str(a.get("filename")) for a in parsed.attachments if a.get("filename"))
    except Exception:  # mail-parser raises assorted errors on odd mail
        names = ()
    return message, names


def _attachment_free(message: Message) -> bool:
    """Whether mail-parser is sure to list no attachment in `message`.

    mail-parser lists a part that has a file name, a Content-ID, a Content-Disposition of
    "attachment" or an RTF type (any subtype within "rtf", as it tests), and the parts it
    recovers from an epilogue after a missing start boundary. A message none of whose
    parts has a Content-Disposition, a Content-ID, a "name" parameter, such a subtype or
    such a defect has none. False when in doubt (the test itself failing).
    """
    try:
        for part in message.walk():
            if part.get("content-disposition") is not None or part.get("content-id") is not None:
                return False
            if any("name" in str(v).lower() for v in part.get_all("content-type") or ()):
                return False
            if not part.is_multipart() and part.get_content_subtype() in "rtf":
                return False
            defects = part.defects
            if any(isinstance(d, email.errors.StartBoundaryNotFoundDefect) for d in defects):
                return False
    except Exception:
        return False
    return True


_TAIL_FIELDS = frozenset({"from", "sender", "reply-to", "return-path"})


def _bound_tree(message: Message, limits: list[str]) -> None:
    """Cut what would make later work on `message` unbounded, noting each cut in `limits`:
    header fields over MAX_FIELD, more than MAX_FIELDS fields in a part, more than MAX_PARTS
    parts, nesting deeper than _MAX_DEPTH. Iterative, so depth costs no stack."""
    parts = 0
    stack: list[tuple[Message, int]] = [(message, 0)]
    while stack:
        part, depth = stack.pop()
        parts += 1
        headers: list[tuple[str, str]] = vars(part)["_headers"]  # no public in-place setter
        if len(headers) > MAX_FIELDS:
            limits.append(f"{len(headers)} header fields in a part: the first {MAX_FIELDS} kept")
            del headers[MAX_FIELDS:]
        for i, (name, value) in enumerate(headers):
            if isinstance(value, str) and len(value) > MAX_FIELD:
                if name.lower() in _TAIL_FIELDS:  # "<name bomb> <address>": keep the address
                    cut = value[-MAX_FIELD:]
                    cut = cut[min(i for i in (cut.find(" "), MAX_FIELD // 2) if i >= 0) :]
                else:
                    cut = value[:MAX_FIELD]
                    cut = cut[: max(cut.rfind(" "), cut.rfind(";"), MAX_FIELD // 2)]
                limits.append(f"header {name[:40]} of {len(value)} characters cut to {len(cut)}")
                headers[i] = (name, cut)
        payload = part.get_payload()
        if not isinstance(payload, list):
            continue
        if depth >= _MAX_DEPTH:
            limits.append(f"MIME parts nested deeper than {_MAX_DEPTH} levels left out")
            part.set_payload([])
            continue
        room = MAX_PARTS - parts - len(stack)
        if len(payload) > max(room, 0):
            limits.append(f"more than {MAX_PARTS} MIME parts: the rest left out")
            del payload[max(room, 0) :]
        stack.extend(
            (child, depth + 1) for child in reversed(payload) if isinstance(child, Message)
        )


_HEADER_LINE = re.compile(rb"^[!-9;-~]+[ \t]*:", re.MULTILINE)
_LEADING_JUNK = re.compile(rb"\A(?:\xef\xbb\xbf)?(?:[ \t]*\r?\n)*")


def truncation_note(size: int, kept: int) -> str:
    """What `limits` says of a message of `size` bytes of which only `kept` were read."""
    return f"truncated: message of {size:,} bytes, only the first {kept:,} read"


def parse(raw: bytes, size: int | None = None) -> ParsedMessage:
    """Parse raw RFC 5322 bytes into a `ParsedMessage`.

    `size`: the whole message's size when `raw` is only its start (a message over
    MAX_MESSAGE_BYTES); `limits` then begins with `truncation_note` and `raw_size` is
    `size`.

    Raises `ParseError` (and nothing else) when the bytes are not an email at all: empty
    input, or no header block. Broken MIME, unknown charsets, missing headers, bad dates
    and deep nesting are tolerated and give empty or None fields instead.
    """
    if not isinstance(raw, bytes | bytearray | memoryview):
        raise ParseError(f"expected bytes, got {type(raw).__name__}")
    raw = bytes(raw)
    if not raw.strip():
        raise ParseError("empty message")
    # A byte-order mark or blank lines before the header block (saved by some tools and
    # web forms) would make the whole message a body: drop them.
    raw = _LEADING_JUNK.sub(b"", raw[:4096], count=1) + raw[4096:]
    head = raw[:4096].lstrip(b"\r\n")
    if head.startswith(b"From ") and b"\n" in head:  # mbox "From " envelope line
        head = head.split(b"\n", 1)[1]
    if not _HEADER_LINE.match(head):
        raise ParseError("no header block: the data does not start with 'Name: value' lines")
    limits: list[str] = []
    whole = len(raw)
    if size is not None and size > whole:
        limits.append(truncation_note(size, whole))
        whole = size
    try:
        return _parse(_prebound(raw, limits), whole, limits)
    except ParseError:
        raise
    except RecursionError as exc:
        raise ParseError("MIME structure is nested too deeply") from exc
    except Exception as exc:  # the contract: only ParseError escapes
        raise ParseError(f"unreadable message: {type(exc).__name__}: {exc}") from exc


def _prebound(raw: bytes, limits: list[str]) -> bytes:
    """The part of `raw` worth parsing: at most MAX_PARSE_BYTES, MAX_LINES lines, about
    MAX_PARTS part boundaries, and 2 * MAX_FIELDS lines of top-level header. Each cut is
    noted in `limits`; what is cut is the end of the message, where attachments are."""
    if len(raw) > MAX_PARSE_BYTES:
        limits.append(f"message of {len(raw)} bytes: only the first {MAX_PARSE_BYTES} were read")
        raw = raw[:MAX_PARSE_BYTES]
    for mark, bound, what in ((b"\n", MAX_LINES, "lines"), (b"\n--", MAX_PARTS, "part boundaries")):
        if raw.count(mark) > bound:
            at = -1
            for _ in range(bound):
                at = raw.find(mark, at + 1)
            limits.append(f"more than {bound} {what}: the rest of the message left out")
            raw = raw[: at + 1]
    end = min((i for i in (raw.find(b"\n\n"), raw.find(b"\n\r\n")) if i >= 0), default=len(raw))
    if raw.count(b"\n", 0, end) > 2 * MAX_FIELDS:
        at = -1
        for _ in range(2 * MAX_FIELDS):
            at = raw.find(b"\n", at + 1)
        limits.append(f"a header of more than {2 * MAX_FIELDS} lines: the rest left out")
        raw = raw[: at + 1] + raw[end:]
    return raw


def _parse(raw: bytes, raw_size: int, limits: list[str]) -> ParsedMessage:
    message, mp_names = _message_from_bytes(raw, limits)
    headers = tuple(_header_items(message))

    def first(name: str) -> str | None:
        for hname, value in headers:
            if hname == name:
                return value
        return None

    def every(*names: str) -> list[str]:
        return [value for hname, value in headers if hname in names]

    # Address lists are split before RFC 2047 decoding: a decoded display name may hold
    # the commas and angle brackets that the encoding protected.
    raw_headers = [
        (
            str(name).strip().lower(),
            re.sub(r"\r?\n(?=[ \t])", "", _unsurrogate(str(value)).replace("\0", "")),
        )
        for name, value in message.raw_items()
    ]

    def every_raw(*names: str) -> list[str]:
        return [value for hname, value in raw_headers if hname in names]

    from_values = every_raw("from")
    from_name, from_addr = "", None
    if from_values:
        try:
            from_name, addr = email.utils.parseaddr(from_values[0])
        except Exception:
            addr = ""
        from_name = decode_header_value(from_name)
        from_addr = addr.strip().lower() or None
        if from_addr is None or "@" not in from_addr:
            found = _addresses(from_values[:1])
            from_addr = found[0] if found else from_addr
    return_path: str | None = None
    rp = first("return-path")
    if rp is not None:
        inner = rp.strip()
        match = re.search(r"<([^<>]*)>", inner)
        return_path = (match.group(1) if match else inner).strip().lower()

    acc = _Walk(plains=[], htmls=[], attachments=[])
    _walk(message, acc, 0, False)
    html = "\n".join(h for h in acc.htmls if h.strip())
    text = "\n".join(p for p in acc.plains if p.strip())
    if len(html) > 4 * MAX_BODY_TEXT:
        limits.append(f"HTML body of {len(html)} characters: the first {4 * MAX_BODY_TEXT} read")
        html = html[: 4 * MAX_BODY_TEXT]
    from_html = False
    if not text.strip() and html:
        text, from_html = html_to_text(html), True
    if len(text) > MAX_BODY_TEXT:
        limits.append(f"body text of {len(text)} characters: the first {MAX_BODY_TEXT} read")
        text = text[:MAX_BODY_TEXT]
    attachments = tuple(dict.fromkeys([*acc.attachments, *mp_names]))

    return ParsedMessage(
        message_id=_single_msg_id(first("message-id")),
        in_reply_to=_msg_ids(" ".join(every("in-reply-to"))),
        references=_msg_ids(" ".join(every("references"))),
        from_addr=from_addr,
        from_name=(from_name or "").strip(),
        reply_to=_addresses(every_raw("reply-to")),
        to=_addresses(every_raw("to")),
        cc=_addresses(every_raw("cc")),
        delivered_to=_addresses(
            every_raw("delivered-to", "x-original-to", "envelope-to", "x-envelope-to")
        ),
        return_path=return_path,
        subject=first("subject") or "",
        date=_parse_date(first("date")),
        text=text.replace("\r\n", "\n").replace("\r", "\n"),
        html=html,
        attachments=attachments,
        headers=headers,
        raw_size=raw_size,
        content_type=_content_type(message),
        report_type=acc.report_type,
        report_fields=acc.report_fields,
        delivery_status=acc.delivery,
        returned_headers=acc.returned,
        text_from_html=from_html,
        limits=tuple(dict.fromkeys(limits)),
    )
