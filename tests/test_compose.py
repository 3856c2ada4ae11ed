"""Outbound messages: correct RFC 5322/MIME, RFC 8058 unsubscribe, no header injection."""

from __future__ import annotations

import email.policy
import random
import re
import weakref
from datetime import UTC, datetime
from email.message import EmailMessage, MIMEPart
from email.parser import BytesParser
from typing import Any, cast

import pytest

from worker.compose import (
    LOOP_HEADER,
    Attachment,
    as_wire_bytes,
    clean_text,
    compose,
    compose_wire,
    new_message_id,
    reply_address,
    unsubscribe_targets,
)
from worker.config import SenderConfig

WHEN = datetime(2026, 12, 1, 10, 0, tzinfo=UTC)
REPLY = (
    b"From: Maya Patel <maya@northwind.example>\r\n"
    b"To: sales+k3x9@acme.example\r\n"
    b"Subject: =?utf-8?q?Re:_Pricing_f=C3=BCr_12?=\r\n"
    b"Message-ID: <CAF=reply.1@mail.northwind.example>\r\n"
    b"In-Reply-To: <twoway.0123456789abcdef0123456789abcdef@acme.example>\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"Content-Transfer-Encoding: 8bit\r\n"
    b"\r\n"
    b"Sounds good \xe2\x80\x94 can you send pricing?\r\n"
)


def build(**overrides: Any) -> EmailMessage:
    args: dict[str, Any] = {
        "from_addr": "sales@acme.example",
        "from_name": "Acme Sales",
        "to_addr": "maya@northwind.example",
        "to_name": "Maya Patel",
        "subject": "How Brightline cut dispatch time by 40%",
        "text": "Hi Maya,\n\nA short story.\n",
        "html": "<p>Hi Maya,</p><p>A short story.</p>",
        "message_id": "twoway.0123456789abcdef0123456789abcdef@acme.example",
        "domain": "acme.example",
        "date": WHEN,
    }
    args.update(overrides)
    try:
        msg = compose(**args)
    except ValueError:
        with pytest.raises(ValueError):  # the send path refuses it alike
            compose_wire(**args)
        raise
    _SENT[msg] = compose_wire(**args)
    return msg


_SENT: weakref.WeakKeyDictionary[EmailMessage, bytes] = weakref.WeakKeyDictionary()
"""What the send path writes (compose_wire) for each message `build` made."""
_BOUNDARY = re.compile(rb"===============\d{19}==(?:\.\d+)?")


def same_but_boundary(a: bytes, b: bytes) -> bool:
    return _BOUNDARY.sub(b"B", a) == _BOUNDARY.sub(b"B", b)


def wire(msg: EmailMessage) -> bytes:
    """The bytes a server receives (CRLF line ends, as smtplib sends them): what the send
    path writes, which must be compose's message byte for byte, but for the boundary."""
    sent = _SENT[msg]
    assert same_but_boundary(sent, as_wire_bytes(msg))
    return sent


def received(msg: EmailMessage) -> EmailMessage:
    return BytesParser(policy=email.policy.default).parsebytes(wire(msg))


def content(part: MIMEPart) -> str:
    """A text part's content with the wire's CRLF line ends read as newlines."""
    return cast(str, part.get_content()).replace("\r\n", "\n")


def test_it_builds_a_text_and_html_alternative_with_the_basic_headers() -> None:
    msg = received(build())
    assert msg["From"] == "Acme Sales <sales@acme.example>"
    assert msg["To"] == "Maya Patel <maya@northwind.example>"
    assert msg["Subject"] == "How Brightline cut dispatch time by 40%"
    assert msg["Date"] == "Tue, 01 Dec 2026 10:00:00 +0000"
    assert msg["Message-ID"] == "<twoway.0123456789abcdef0123456789abcdef@acme.example>"
    assert msg["MIME-Version"] == "1.0"
    assert msg.get_content_type() == "multipart/alternative"
    text, html = msg.iter_parts()
    assert text.get_content_type() == "text/plain"
    assert html.get_content_type() == "text/html"
    assert content(text) == "Hi Maya,\n\nA short story.\n"
    assert "<p>A short story.</p>" in html.get_content()


def test_it_marks_every_message_as_ours_with_the_loop_header() -> None:
    assert received(build())[LOOP_HEADER] == "acme.example"


def test_it_adds_one_click_unsubscribe_headers() -> None:
    msg = received(
        build(
            unsubscribe_url="https://acme.example/unsubscribe/k3x9",
            unsubscribe_mailto="sales+unsubscribe-k3x9@acme.example",
        )
    )
    assert msg["List-Unsubscribe"] == (
        "<https://acme.example/unsubscribe/k3x9>, <mailto:sales+unsubscribe-k3x9@acme.example>"
    )
    assert msg["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"


def test_it_offers_no_one_click_post_without_an_https_url() -> None:
    msg = received(build(unsubscribe_mailto="sales+unsubscribe-k3x9@acme.example"))
    assert msg["List-Unsubscribe"] == "<mailto:sales+unsubscribe-k3x9@acme.example>"
    assert msg["List-Unsubscribe-Post"] is None
    assert received(build())["List-Unsubscribe"] is None


def test_it_sets_threading_reply_to_and_auto_submitted_when_asked() -> None:
    msg = received(
        build(
            reply_to="sales+k3x9@acme.example",
            in_reply_to="CAF=reply.1@mail.northwind.example",
            references=["<twoway.aa@acme.example>", "CAF=reply.1@mail.northwind.example"],
            auto_submitted=True,
        )
    )
    assert msg["Reply-To"] == "sales+k3x9@acme.example"
    assert msg["In-Reply-To"] == "<CAF=reply.1@mail.northwind.example>"
    assert msg["References"] == "<twoway.aa@acme.example> <CAF=reply.1@mail.northwind.example>"
    assert msg["Auto-Submitted"] == "auto-generated"
    assert received(build())["Auto-Submitted"] is None


def test_it_keeps_a_long_references_chain_readable_by_mail_clients() -> None:
    ids = [f"twoway.{i:032x}@acme.example" for i in range(30)]
    head = wire(build(references=ids)).split(b"\r\n\r\n", 1)[0]
    assert b"=?" not in head  # no RFC 2047 encoded words, which clients do not decode here
    assert all(len(line) <= 78 for line in head.split(b"\r\n"))
    assert received(build(references=ids))["References"] == " ".join(f"<{i}>" for i in ids)
    # Ids longer than a line still go out verbatim, one per line.
    long_ids = [f"twoway.{i:032x}@mail.a-rather-long-domain-name.example" for i in range(3)]
    head = wire(build(references=long_ids)).split(b"\r\n\r\n", 1)[0]
    assert b"=?" not in head
    assert received(build(references=long_ids))["References"] == " ".join(
        f"<{i}>" for i in long_ids
    )


def test_it_encodes_non_ascii_names_and_subjects() -> None:
    msg = build(from_name="Équipe Ventes, Acme", to_name="Zoë Ødegård", subject="Grüße aus Köln")
    raw = wire(msg)
    assert raw.isascii()
    parsed = received(msg)
    assert parsed["From"].addresses[0].display_name == "Équipe Ventes, Acme"
    assert parsed["From"].addresses[0].addr_spec == "sales@acme.example"
    assert parsed["To"].addresses[0].display_name == "Zoë Ødegård"
    assert parsed["Subject"] == "Grüße aus Köln"


def test_it_sends_non_ascii_bodies_in_a_7bit_safe_encoding() -> None:
    msg = build(text="Grüße — Maya\n", html="<p>Grüße — Maya</p>")
    assert wire(msg).isascii()
    text, html = received(msg).iter_parts()
    assert content(text) == "Grüße — Maya\n"
    assert "Grüße — Maya" in html.get_content()


@pytest.mark.parametrize(
    ("field", "hostile"),
    [
        ("to_name", "Bob\r\nBcc: victim@example.net"),
        ("to_name", "Bob\nBcc: victim@example.net"),
        ("to_name", "Bob\rBcc: victim@example.net"),
        ("from_name", "Acme\r\nBcc: victim@example.net"),
        ("subject", "Hello\r\nBcc: victim@example.net"),
        ("subject", "Hello\u2028Bcc: victim@example.net"),
        ("to_name", "Bob\x00\x0bBcc: victim@example.net"),
    ],
)
def test_it_neutralises_header_injection_in_names_and_subject(field: str, hostile: str) -> None:
    raw = wire(build(**{field: hostile}))
    head = raw.split(b"\r\n\r\n", 1)[0]
    assert not re.search(rb"(?im)^bcc:", head)
    assert b"\x00" not in raw and b"\x0b" not in raw
    msg = received(build(**{field: hostile}))
    assert msg["Bcc"] is None
    assert [a.addr_spec for a in msg["To"].addresses] == ["maya@northwind.example"]


HOSTILE_ADDRESSES = [
    "maya@northwind.example\r\nBcc: victim@example.net",
    "maya@northwind.example\nBcc: victim@example.net",
    "maya@northwind.example, victim@example.net",
    "maya@northwind.example;victim@example.net",
    "Maya <maya@northwind.example>",
    "maya@northwind.example>",
    "maya",
    "maya@",
    "@northwind.example",
    "maya@@northwind.example",
    "maya@north wind.example",
    "maya@northwind.example\x00",
    "mäya@northwind.example",
]


@pytest.mark.parametrize(
    ("field", "hostile"),
    [
        *((f, h) for f in ("to_addr", "from_addr") for h in [*HOSTILE_ADDRESSES, ""]),
        # For the optional ones, an empty value means "none".
        *((f, h) for f in ("reply_to", "unsubscribe_mailto") for h in HOSTILE_ADDRESSES),
    ],
)
def test_it_refuses_anything_but_one_valid_address(field: str, hostile: str) -> None:
    with pytest.raises(ValueError):
        build(**{field: hostile})


def test_it_accepts_an_internationalised_domain_in_ascii_form() -> None:
    msg = received(build(to_addr="maya@münchen.example"))
    assert msg["To"].addresses[0].addr_spec == "maya@xn--mnchen-3ya.example"


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"message_id": "two ids@acme.example"}, "Message-ID"),
        ({"unsubscribe_url": "https://acme.example/u/1>, <https://evil.example"}, "URL"),
        ({"unsubscribe_url": "javascript:alert(1)"}, "URL"),
        ({"extra_headers": {"Bcc": "victim@example.net"}}, "Bcc"),
        ({"extra_headers": {"X-Bad\r\nBcc": "v"}}, "X-Bad"),
        ({"date": datetime(2026, 12, 1, 10, 0)}, "aware"),
    ],
)
def test_it_refuses_malformed_ids_urls_headers_and_dates(
    overrides: dict[str, Any], match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        build(**overrides)


def test_it_threads_on_any_writable_id_and_leaves_out_the_rest() -> None:
    built = build(
        in_reply_to="<a@b>\r\nBcc: x@y.z",
        references=["ok@acme.example", "bad\n@x", "two@at@signs.example", "x" * 950],
    )
    msg = received(built)
    assert msg["In-Reply-To"] is None and msg["Bcc"] is None  # never an injected header
    assert str(msg["References"]).split() == ["<ok@acme.example>", "<two@at@signs.example>"]
    assert all(len(line) <= 998 for line in wire(built).split(b"\r\n"))


def test_it_neutralises_extra_header_values() -> None:
    msg = received(build(extra_headers={"X-Campaign": "welcome\r\nBcc: victim@example.net"}))
    assert msg["X-Campaign"] == "welcome Bcc: victim@example.net"
    assert msg["Bcc"] is None


def test_it_attaches_an_original_email_as_message_rfc822() -> None:
    msg = received(
        build(
            attachments=[
                Attachment("reply.eml", REPLY, "message/rfc822"),
                Attachment("price-sheet.pdf", b"%PDF-1.7 fake", "application/pdf"),
            ]
        )
    )
    assert msg.get_content_type() == "multipart/mixed"
    body, original, pdf = msg.iter_parts()
    assert body.get_content_type() == "multipart/alternative"
    assert original.get_content_type() == "message/rfc822"
    assert original.get_filename() == "reply.eml"
    inner = original.get_content()
    assert inner["Message-ID"] == "<CAF=reply.1@mail.northwind.example>"
    assert inner["Subject"] == "Re: Pricing für 12"
    assert inner["From"] == "Maya Patel <maya@northwind.example>"
    assert content(inner) == "Sounds good — can you send pricing?\n"
    assert pdf.get_content_type() == "application/pdf"
    assert pdf.get_filename() == "price-sheet.pdf"
    assert pdf.get_content() == b"%PDF-1.7 fake"


def test_it_makes_message_ids_on_our_domain() -> None:
    first, second = new_message_id("acme.example"), new_message_id("acme.example")
    assert re.fullmatch(r"twoway\.[0-9a-f]{32}@acme\.example", first)
    assert first != second
    assert received(build(message_id=first))["Message-ID"] == f"<{first}>"
    with pytest.raises(ValueError):
        new_message_id("acme.example>\r\nBcc: x")


def test_it_plus_addresses_the_reply_token() -> None:
    assert reply_address("sales@example.com", "k3x9q2") == "sales+k3x9q2@example.com"
    with pytest.raises(ValueError):
        reply_address("sales@example.com", "k3x9@evil.example")
    with pytest.raises(ValueError):
        reply_address("sales@example.com", "")


def test_it_fills_the_token_into_the_unsubscribe_targets() -> None:
    sender = SenderConfig.model_validate(
        {
            "from": "Acme Sales <sales@example.com>",
            "unsubscribe_url": "https://example.com/unsubscribe/{token}",
            "unsubscribe_mailto": "sales+unsubscribe-{token}@example.com",
        }
    )
    assert unsubscribe_targets(sender, "k3x9") == (
        "https://example.com/unsubscribe/k3x9",
        "sales+unsubscribe-k3x9@example.com",
    )
    bare = SenderConfig.model_validate({"from": "sales@example.com"})
    assert unsubscribe_targets(bare, "k3x9") == (None, None)


def test_it_writes_for_smtp_exactly_the_message_compose_describes() -> None:
    # Names, subjects and bodies a lead or a template may bring: words the stdlib quotes or
    # encodes, encoded-word look-alikes, long lines, controls, non-ASCII, trailing blanks.
    pieces = ["Maya", "O'Hara", "Dr. Jane", "a,b", '"q"', "(c)", "=?utf-8?q?x?=", "Zoë",
              "—", "x" * 90, "\t", "\r\n", " ", "end ", "日本", "<p>", "&amp;", "=", "."]  # fmt: skip
    rng = random.Random(12)

    def text(n: int) -> str:
        return "".join(rng.choice(pieces) for _ in range(rng.randint(0, n)))

    for _ in range(300):
        msg = build(
            from_name=text(4),
            to_name=text(6),
            subject=text(12) or "x",
            text=text(60),
            html=text(80),
            reply_to=rng.choice([None, "sales+k3x9@acme.example", [(text(3), "a@b.example")]]),
            in_reply_to=rng.choice([None, "<CAF=x.1@mail.example>"]),
            references=[f"<a.{i}@x.example>" for i in range(rng.randint(0, 12))],
            unsubscribe_url=rng.choice([None, "https://acme.example/u/k3x9"]),
            auto_submitted=rng.random() < 0.5,
        )
        wire(msg)  # asserts the send path's bytes are compose's


def test_it_blanks_exactly_the_control_and_line_separator_characters_of_unicode() -> None:
    """clean_text turns every character of Unicode categories Cc, Zl and Zp into a space
    (its fast path names them), and keeps every other character."""
    import sys
    import unicodedata

    for point in range(sys.maxunicode + 1):
        ch = chr(point)
        blanked = unicodedata.category(ch) in ("Cc", "Zl", "Zp") or ch.isspace()
        assert clean_text(f"a{ch}b") == ("a b" if blanked else f"a{ch}b"), hex(point)
