"""Property tests: parse() returns or raises ParseError; classify() never raises."""

from __future__ import annotations

from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.fuzz import examples
from worker.classify import ClassifyContext, classify, extract_reply_text
from worker.parsing import ParseError, parse

EMAILS = sorted((Path(__file__).parent / "emails").glob("*.eml"))
CTX = ClassifyContext(
    our_addresses=frozenset({"sales@example.com"}),
    unsubscribe_mailto="sales+unsubscribe-{token}@example.com",
)
FUZZ = settings(
    max_examples=examples(60), deadline=None, suppress_health_check=[HealthCheck.too_slow]
)

header_names = st.sampled_from(
    [
        "From",
        "To",
        "Cc",
        "Subject",
        "Message-ID",
        "In-Reply-To",
        "References",
        "Date",
        "Return-Path",
        "Auto-Submitted",
        "Precedence",
        "Content-Type",
        "Content-Transfer-Encoding",
        "List-Id",
        "X-Auto-Response-Suppress",
        "Delivered-To",
        "X-Twoway-Loop",
    ]
)
header_values = st.one_of(
    st.text(max_size=60),
    st.sampled_from(
        [
            "=?utf-8?q?J=C3=BCrgen?= <j@example.org>",
            "=?bogus?b?!!!?=",
            "<>",
            "<a@b> <c@d>",
            "multipart/report; report-type=delivery-status; boundary=x",
            "text/plain; charset=nope",
            "base64",
            "quoted-printable",
            "Tue, 99 Foo 2026 25:61:00 +9999",
            "auto-replied",
            "",
        ]
    ),
)


def _check(raw: bytes) -> None:
    try:
        msg = parse(raw)
    except ParseError as exc:
        assert str(exc)
        return
    verdict = classify(msg, CTX)
    assert verdict.kind in {
        "ours",
        "bounce",
        "complaint",
        "auto_reply",
        "notification",
        "unsubscribe",
        "bulk",
        "reply",
    }


@st.composite
def mime_messages(draw: st.DrawFn) -> bytes:
    headers = draw(st.lists(st.tuples(header_names, header_values), max_size=10))
    head = "".join(f"{name}: {value}\r\n".replace("\x00", "") for name, value in headers)
    depth = draw(st.integers(0, 4))
    body = draw(st.text(max_size=200))
    for level in range(depth):
        ctype = draw(
            st.sampled_from(
                [
                    "multipart/mixed",
                    "multipart/alternative",
                    "multipart/report",
                    "message/rfc822",
                    "message/delivery-status",
                ]
            )
        )
        body = f"--b{level}\r\nContent-Type: {ctype}; boundary=b{level + 1}\r\n\r\n{body}\r\n--b{level}--\r\n"
    encoding = draw(st.sampled_from(["utf-8", "latin-1"]))
    data = f"{head}Content-Type: multipart/mixed; boundary=b0\r\n\r\n{body}".encode(
        encoding, "replace"
    )
    return data


@FUZZ
@given(mime_messages())
def test_it_parses_generated_mime_or_raises_parse_error(raw: bytes) -> None:
    _check(raw)


@FUZZ
@given(st.binary(max_size=2000))
def test_it_survives_arbitrary_bytes(raw: bytes) -> None:
    _check(raw)


@FUZZ
@given(
    st.sampled_from(EMAILS),
    st.lists(st.tuples(st.integers(0, 10_000), st.binary(min_size=0, max_size=8)), max_size=6),
    st.integers(0, 10_000),
)
def test_it_survives_mutations_of_real_samples(
    path: Path, edits: list[tuple[int, bytes]], cut: int
) -> None:
    raw = bytearray(path.read_bytes())
    for position, replacement in edits:
        position %= max(len(raw), 1)
        raw[position : position + len(replacement)] = replacement
    _check(bytes(raw[: max(cut, len(raw) // 2)]))


@FUZZ
@given(st.text(max_size=500), st.text(max_size=300))
def test_it_extracts_reply_text_from_anything(text: str, html: str) -> None:
    assert isinstance(extract_reply_text(text, html), str)
