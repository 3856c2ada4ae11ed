"""parse(): bytes in, a ParsedMessage or a ParseError out."""

from __future__ import annotations

import email
from pathlib import Path

import pytest

from worker import parsing
from worker.parsing import ParseError, parse

EMAILS = Path(__file__).parent / "emails"


def test_it_reads_addresses_ids_and_dates() -> None:
    msg = parse((EMAILS / "reply_gmail_pricing.eml").read_bytes())
    assert msg.from_addr == "dana@acme.example.org"
    assert msg.from_name == "Dana Whitfield"
    assert msg.to[0].startswith("sales+") and msg.to[0].endswith("@example.com")
    assert msg.delivered_to == ("sales@example.com",)
    assert msg.in_reply_to[0].startswith("twoway.") and msg.references == msg.in_reply_to
    assert msg.date is not None and msg.date.tzinfo is not None
    assert msg.header("SUBJECT") == msg.subject
    assert msg.all_recipients() == (*msg.to, "sales@example.com")


def test_it_decodes_encoded_words_and_quoted_printable() -> None:
    msg = parse((EMAILS / "reply_crlf_quoted_printable.eml").read_bytes())
    assert msg.from_name == "Zoë Müller"
    assert msg.subject == "AW: Cutting_onboarding_time".replace("_", " ")
    assert "Grüße – ja" in msg.text


def test_it_keeps_the_null_sender_distinct_from_a_missing_one() -> None:
    bounce = parse((EMAILS / "bounce_qmail.eml").read_bytes())
    assert bounce.return_path == ""
    reply = parse((EMAILS / "reply_with_attachment.eml").read_bytes())
    assert reply.return_path is None
    assert reply.attachments == ("org chart.pdf",)


def test_it_exposes_the_parts_of_a_delivery_report() -> None:
    msg = parse((EMAILS / "bounce_multiple_recipients.eml").read_bytes())
    assert msg.report_type == "delivery-status"
    assert [d.final_recipient for d in msg.delivery_status] == [
        "a.one@example.org",
        "b.two@example.org",
    ]
    assert {d.action for d in msg.delivery_status} == {"failed"}
    assert (
        msg.returned_header(
            "message-id",
        )
        is not None
    )
    assert "most plants" not in msg.text  # the returned message is not the bounce's body


def test_it_derives_text_from_html_only_mail() -> None:
    msg = parse((EMAILS / "reply_html_only_gmail.eml").read_bytes())
    assert msg.text_from_html
    assert "schedule a demo" in msg.text


def test_it_tolerates_missing_headers_and_a_broken_charset() -> None:
    msg = parse(b"Subject: hi\nContent-Type: text/plain; charset=x-unknown-9\n\n\xff\xfe caf\xe9\n")
    assert msg.message_id is None and msg.from_addr is None and msg.date is None
    assert "caf" in msg.text


def test_it_survives_deep_nesting() -> None:
    depth = 300
    parts = [f"--b{i}\nContent-Type: multipart/mixed; boundary=b{i + 1}\n\n" for i in range(depth)]
    raw = (
        "Subject: deep\nContent-Type: multipart/mixed; boundary=b0\n\n" + "".join(parts) + "hello\n"
    )
    msg = parse(raw.encode())
    assert msg.subject == "deep"


def test_it_handles_a_large_attachment_quickly() -> None:
    blob = b"QUJD" * (5 * 1024 * 1024 // 4)
    raw = (
        b"Subject: big\nContent-Type: multipart/mixed; boundary=x\n\n--x\nContent-Type: text/plain\n\nhi\n"
        b"--x\nContent-Type: application/octet-stream; name=big.bin\nContent-Transfer-Encoding: base64\n"
        b"Content-Disposition: attachment; filename=big.bin\n\n" + blob + b"\n--x--\n"
    )
    msg = parse(raw)
    assert msg.attachments == ("big.bin",) and msg.text.strip() == "hi"
    assert msg.raw_size == len(raw)


@pytest.mark.parametrize("raw", [b"", b"   \n", b"\x00\x01\x02", b"just some text without headers"])
def test_it_raises_parse_error_for_what_is_not_mail(raw: bytes) -> None:
    with pytest.raises(ParseError):
        parse(raw)


@pytest.mark.parametrize("name", sorted(p.name for p in EMAILS.glob("*.eml")))
def test_it_reads_the_same_message_where_it_skips_mail_parser(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # mail-parser only lists attachments; where it is skipped it would have found none.
    raw = (EMAILS / name).read_bytes()
    if not parsing._attachment_free(email.message_from_bytes(raw)):
        return  # mail-parser runs: nothing was skipped
    quick = parse(raw)
    monkeypatch.setattr(parsing, "_attachment_free", lambda _message: False)
    assert parse(raw) == quick
