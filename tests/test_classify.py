"""Classification of our labelled .eml corpus, asserting what a user of `inspect` sees."""

from __future__ import annotations

import json
import re
from datetime import date
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.fuzz import examples
from worker.bounces import address_is_dead, bounce_reason
from worker.classify import (
    _DATE_RES,
    ClassifyContext,
    _date_matches,
    classify,
    extract_reply_text,
    find_return_date,
)
from worker.inspect import format_human, inspect_bytes, inspect_paths
from worker.parsing import parse
from worker.replytext import _ends_like_attribution, wants_unsubscribe

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


WITH_REASON = sorted(n for n, label in LABELS.items() if "bounce_reason" in label)


@pytest.mark.parametrize("name", WITH_REASON)
def test_it_names_the_reason_of_a_bounce_and_derives_hard_or_soft_from_it(name: str) -> None:
    label = LABELS[name]
    bounce = _verdict(name).bounce
    assert bounce is not None
    assert (bounce.reason, bounce.type) == (label["bounce_reason"], label["bounce_type"])
    assert bounce.as_json()["reason"] == label["bounce_reason"]


def test_it_has_labelled_mail_for_every_class_the_issue_names() -> None:
    languages = {
        str(x["language"]) for x in LABELS.values() if x["kind"] == "auto_reply" and "language" in x
    }
    assert len(languages) >= 25
    replies = {
        str(x["language"]) for x in LABELS.values() if x["kind"] == "reply" and "language" in x
    }
    assert len(replies) >= 25  # quote headers and mobile signatures, each with its reply text
    reasons = {str(x["bounce_reason"]) for x in LABELS.values() if "bounce_reason" in x}
    assert reasons >= {
        "user_unknown", "host_unknown", "mailbox_full", "message_too_big", "rate_limited",
        "blocked", "spam_policy", "sender_rejected", "relay_denied", "expired", "suspended",
        "system_error", "other",
    }  # fmt: skip
    assert {n for n in LABELS if n.startswith("challenge_")}
    assert {"complaint_arf.eml", "complaint_microsoft_jmrp.eml", "complaint_ses_json.eml"} <= set(
        LABELS
    )


@pytest.mark.parametrize(
    ("code", "status", "message", "dead"),
    [
        (550, "5.1.1", "5.1.1 <a@example.org>: Recipient address rejected: User unknown", True),
        (550, None, "No such user here", True),
        (550, "5.0.0", "Host or domain name not found", True),
        (550, "5.1.1", "Mailbox is full", False),  # over quota under a wrong 5.1.1
        (553, "5.1.8", "Domain of sender address sales@example.com does not exist", False),
        (550, "5.7.1", "Client host blocked using zen.spamhaus.org", False),
        (450, "4.1.1", "User unknown (temporary lookup failure)", False),
        (421, None, "Too many connections, try again later", False),
        (554, "5.7.1", "Relay access denied", False),
    ],
)
def test_it_uses_one_rule_for_a_dead_address_at_smtp_time_and_in_bounces(
    code: int, status: str | None, message: str, dead: bool
) -> None:
    assert address_is_dead(code, status, message) is dead
    assert (bounce_reason(status, message, code)[1] == "hard") is dead


def test_it_reads_mail_with_leading_blank_lines_a_bad_utf8_byte_and_bare_cr_folding() -> None:
    raw = (
        b"\xef\xbb\xbf\r\n  \r\nFrom: Ana <ana@example.org>\rSubject: Re: Offer\r to you\r"
        b"Content-Type: text/plain; charset=utf-8\r\r"
        b"Gr\xc3\xbc\xc3\x9fe, caf\xe9 ok\r"
    )
    msg = parse(raw)
    assert msg.from_addr == "ana@example.org"
    assert msg.subject == "Re: Offer to you"
    assert msg.text.startswith("Grüße, caf\ufffd ok")
    assert classify(msg, CTX).kind == "reply"


def test_it_never_reports_our_own_verp_address_as_failed() -> None:
    bounce = _verdict("bounce_verp_not_reported.eml").bounce
    assert bounce is not None and "sales+bx7k2q9@example.com" not in bounce.recipients


@pytest.mark.parametrize(
    "body",
    ["a" * 400_000, "-a" * 200_000, "-" * 400_000, "x@y.com " * 50_000, "On 1: wrote:\n" * 30_000],
    ids=["letters", "dash-letters", "dashes", "addresses", "attributions"],
)
def test_it_classifies_hostile_bodies_in_bounded_work(body: str) -> None:
    # Each regex is linear and each detector reads a bounded slice: these finish well
    # inside the suite's per-test timeout (a quadratic rule took minutes on them).
    for sender in ("MAILER-DAEMON@mx.example.org", "ann@example.org"):
        raw = (
            f"From: {sender}\nSubject: Re: Offer\nIn-Reply-To: <twoway.x@example.com>\n"
            "Content-Type: text/plain\n\n"
        ).encode() + body.encode()
        verdict = classify(parse(raw), CTX)
        assert verdict.kind in ("bounce", "reply", "auto_reply")
        assert not verdict.reason.startswith("classifier error")


def test_it_shows_the_bounce_reason_in_the_human_inspect_output() -> None:
    result = inspect_bytes((EMAILS / "bounce_reason_mailbox_full_8.eml").read_bytes(), CTX)
    assert "bounce:      soft (mailbox_full) 5.2.2 -> quota@example.net" in format_human(result)


# The shortcuts that make classification cheap must answer exactly as the scans they
# replaced: each is checked against that scan on text built from the characters it reads.
_DATE_TEXT = st.lists(
    st.sampled_from([*"0123456789 ./-,\n", "年", "月", "日", "월", "일", "号", "º", "x"])
    | st.sampled_from(["December", "dez", "of ", "de ", "2026", "14th", "Dec.", "12"])
    | st.sampled_from(["\xa0", "\u2003", "²", "_", "é", "abcdefghijklmno", "ab", "  "]),
    max_size=14,
).map("".join)
_ENDING_TEXT = st.lists(
    st.sampled_from(["wrote", "WROTE", "wRote", "schrieb", "ſchrieb", " ", "-", "\t", "\xa0"])
    | st.sampled_from([":", "：", "x", "e", ".", "\x1c", "İ", "ı"]),
    max_size=8,
).map("".join)
_OLD_ATTR_END_RE = re.compile(r"[:：]$|(?i:wrote|schrieb)\s*-*$")


# The unsubscribe words as they were written before they shared one \b: each with its own.
_OLD_UNSUBSCRIBE_RE = re.compile(
    r"(?i)\bunsubscribe\b|\bremove\s+(?:me|us|my\s+(?:e-?mail|address))\b|"
    r"\btake\s+(?:me|us)\s+off\b|\bopt(?:\s|-)?(?:me\s+)?out\b|"
    r"\bstop\s+(?:e-?mailing|sending|contacting|writing)\b|"
    r"\b(?:don'?t|do\s+not|never)\s+(?:e-?mail|send)\s+(?:me|us)\b|"
    r"\bno\s+more\s+e-?mails\b|\babmelden\b|\babbestellen\b|\baustragen\b|"
    r"\bkeine\s+(?:weiteren\s+)?(?:e-?mails|nachrichten|newsletter)\b|"
    r"d[ée]sabonner|d[ée]sinscri|\bne\s+plus\s+recevoir\b|\bretirez[- ]moi\b|"
    r"\bdar(?:me|se)?\s+de\s+baja\b|\bno\s+(?:quiero|deseo)\s+recibir\b|"
    r"cancelar\s+(?:la\s+)?suscripci[oó]n|\bcancella(?:re)?\s+(?:la\s+mia\s+)?iscrizione\b|"
    r"\bdisiscriv|\bnon\s+voglio\s+(?:più\s+)?ricevere\b|\bdescadastr|"
    r"cancelar\s+(?:a\s+)?inscri[cç][aã]o|\bn[aã]o\s+quero\s+(?:mais\s+)?receber\b|"
    r"\buitschrijven\b|\bafmelden\b|\bschrijf\s+me\s+uit\b|^[^\S\n]*stop[^\S\n]*[.!]?[^\S\n]*$",
    re.MULTILINE,
)
_UNSUBSCRIBE_TEXT = st.lists(
    st.sampled_from(["unsubscribe", "UNSUBSCRIBE", "remove me", "opt-out", "opt me out", "stop"])
    | st.sampled_from(["Désabonner", "desinscrire", "cancelar la suscripción", "ABMELDEN", "x"])
    | st.sampled_from(["don't email us", "no more emails", "descadastrar", "Stop."])
    | st.sampled_from([" ", "\n", "a", "_", "-", ".", "é", "ſ", "İ", "\xa0", "!"]),
    max_size=10,
).map("".join)


@settings(max_examples=examples(500), deadline=None)
@given(_UNSUBSCRIBE_TEXT)
def test_it_reads_unsubscribe_words_as_the_one_alternation_did(text: str) -> None:
    assert wants_unsubscribe(text) == bool(_OLD_UNSUBSCRIBE_RE.search(text))


@settings(max_examples=examples(300), deadline=None)
@given(_DATE_TEXT)
def test_it_finds_the_same_dates_trying_digits_only(text: str) -> None:
    digits = [i for i, c in enumerate(text) if re.match(r"\d", c)]
    for style, regex in _DATE_RES:
        expected = [(m.span(), m.groups()) for m in regex.finditer(text)]
        found = _date_matches(style, regex, text, digits)
        assert [(m.span(), m.groups()) for m in found] == expected


def test_it_reads_spaces_as_the_date_patterns_do() -> None:
    # The month-first dates are tried before the spaces that precede a digit.
    spaces = re.compile(r"\s")
    assert all(
        bool(spaces.match(chr(c))) == chr(c).isspace()
        for c in range(0x110000)
        if not 0xD800 <= c < 0xE000
    )


@settings(max_examples=examples(300), deadline=None)
@given(_ENDING_TEXT)
def test_it_tests_an_attribution_ending_as_the_search_it_replaced(text: str) -> None:
    line = text.strip()  # it reads unquoted lines, which are stripped
    assert _ends_like_attribution(line) == bool(_OLD_ATTR_END_RE.search(line))
