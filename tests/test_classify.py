"""Classification of our labelled .eml corpus, asserting what a user of `inspect` sees."""

from __future__ import annotations

import json
from datetime import date
from pathlib import Path

import pytest

from worker.classify import ClassifyContext, classify, extract_reply_text, find_return_date
from worker.inspect import format_human, inspect_bytes, inspect_paths
from worker.parsing import parse

EMAILS = Path(__file__).parent / "emails"
LABELS: dict[str, dict[str, object]] = json.loads((EMAILS / "labels.json").read_text("utf-8"))
CTX = ClassifyContext(
    our_addresses=frozenset({"sales@example.com"}),
    internal_domains=frozenset({"example.com"}),
    unsubscribe_mailto="sales+unsubscribe-{token}@example.com",
)


def _verdict(name: str):  # type: ignore[no-untyped-def]
    return classify(parse((EMAILS / name).read_bytes()), CTX)


def test_it_has_a_label_for_every_email_and_enough_of_them() -> None:
    files = {p.name for p in EMAILS.glob("*.eml")}
    assert files == set(LABELS)
    assert len(files) >= 90


@pytest.mark.parametrize("name", sorted(LABELS))
def test_it_gives_the_labelled_kind(name: str) -> None:
    verdict = _verdict(name)
    assert verdict.kind == LABELS[name]["kind"], verdict.reason
    assert verdict.reason


BOUNCES = sorted(n for n, label in LABELS.items() if label["kind"] == "bounce")


@pytest.mark.parametrize("name", BOUNCES)
def test_it_reports_bounce_type_recipients_and_status(name: str) -> None:
    label = LABELS[name]
    bounce = _verdict(name).bounce
    assert bounce is not None
    assert bounce.type == label["bounce_type"]
    assert list(bounce.recipients) == label["recipients"]
    assert bounce.status == label["status"]
    if "original_message_ids" in label:
        assert list(bounce.original_message_ids) == label["original_message_ids"]
    assert bounce.as_json()["recipients"] == label["recipients"]


AUTO = sorted(n for n, label in LABELS.items() if label["kind"] == "auto_reply")


@pytest.mark.parametrize("name", AUTO)
def test_it_finds_the_out_of_office_return_date(name: str) -> None:
    verdict = _verdict(name)
    expected = LABELS[name].get("return_date")
    assert (verdict.return_date.isoformat() if verdict.return_date else None) == expected


WITH_INTENT = sorted(n for n, label in LABELS.items() if "intent" in label)


@pytest.mark.parametrize("name", WITH_INTENT)
def test_it_reads_the_intent_of_a_reply(name: str) -> None:
    verdict = _verdict(name)
    assert verdict.intent == LABELS[name]["intent"], verdict.reply_text
    if "referral_email" in LABELS[name]:
        assert verdict.referral_email == LABELS[name]["referral_email"]


WITH_TEXT = sorted(n for n, label in LABELS.items() if "reply_text" in label)


@pytest.mark.parametrize("name", WITH_TEXT)
def test_it_extracts_the_new_text_without_quotes_or_signature(name: str) -> None:
    assert _verdict(name).reply_text == LABELS[name]["reply_text"]


TOKENS = sorted(n for n, label in LABELS.items() if "unsubscribe_token" in label)


@pytest.mark.parametrize("name", TOKENS)
def test_it_takes_the_token_from_the_unsubscribe_address(name: str) -> None:
    assert _verdict(name).unsubscribe_token == LABELS[name]["unsubscribe_token"]


def test_it_never_reads_our_quoted_footer_as_an_unsubscribe() -> None:
    quoted = [n for n, label in LABELS.items() if label["kind"] == "reply"]
    for name in quoted:
        assert "unsubscribe" not in (_verdict(name).reply_text or "").lower(), name


def test_it_does_not_take_x_auto_response_suppress_alone_for_an_auto_reply() -> None:
    raw = (EMAILS / "reply_outlook_suppress_header_neutral.eml").read_bytes()
    assert b"X-Auto-Response-Suppress" in raw
    assert classify(parse(raw), CTX).kind == "reply"


def test_it_keeps_a_human_reply_whose_subject_mentions_out_of_office() -> None:
    assert _verdict("reply_subject_out_of_office_plans.eml").kind == "reply"


def test_it_resolves_return_dates_in_several_languages() -> None:
    today = date(2026, 12, 1)
    assert find_return_date("I will be back on 12 December.", today) == date(2026, 12, 12)
    assert find_return_date("zurück am 14.12.2026", today) == date(2026, 12, 14)
    assert find_return_date("Je serai de retour le 3 janvier.", today) == date(2027, 1, 3)
    assert find_return_date("Out of office until 2026-12-18.", today) == date(2026, 12, 19)
    assert find_return_date("No dates here.", today) is None


def test_it_strips_quotes_and_signatures_from_plain_text() -> None:
    text = (
        "Yes please.\n\n-- \nJo\n\nOn Mon, 30 Nov 2026 at 09:02, Sam <s@example.com> wrote:\n> hi\n"
    )
    assert extract_reply_text(text) == "Yes please."
    assert extract_reply_text("Hi\n\nSent from my iPhone", strip_signature=False) == (
        "Hi\n\nSent from my iPhone"
    )


def test_it_gives_the_stable_json_object_for_inspect() -> None:
    result = inspect_bytes((EMAILS / "bounce_postfix_user_unknown.eml").read_bytes(), CTX)
    assert result["kind"] == "bounce"
    assert result["bounce"] == {
        "type": "hard",
        "reason": "user_unknown",
        "recipients": ["dana@acme.example.org"],
        "status": "5.1.1",
        "diagnostic": result["bounce"]["diagnostic"],  # type: ignore[index]
        "original_message_ids": result["bounce"]["original_message_ids"],  # type: ignore[index]
    }
    for key in ("return_date", "reply_text", "intent", "message_id", "in_reply_to", "from"):
        assert key in result
    json.dumps(result)


def test_it_reports_an_error_for_bytes_that_are_not_mail() -> None:
    result = inspect_bytes(b"\x00\x01 not an email at all")
    assert result["kind"] is None
    assert "error" in result


def test_it_inspects_a_directory_and_goes_on_after_a_bad_file(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.eml").write_bytes((EMAILS / "reply_iphone.eml").read_bytes())
    (tmp_path / "b.eml").write_bytes(b"")
    missing = tmp_path / "missing.eml"
    results = list(inspect_paths([tmp_path, missing], CTX))
    assert [r["file"] for r in results] == [
        str(tmp_path / "b.eml"),
        str(tmp_path / "sub" / "a.eml"),
        str(missing),
    ]
    assert results[0]["kind"] is None and results[0]["error"]
    assert results[1]["kind"] == "reply"
    assert results[2]["kind"] is None and "cannot read" in str(results[2]["error"])
    assert "kind:" in format_human(results[1]) and "error:" in format_human(results[2])
