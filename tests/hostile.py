"""Hostile mail, generated: the attacks of issue 12, each a function returning raw bytes.

Each builder takes `scale` (1.0 = the size the issue measured) so tests can use a small,
fast version of the same shape and the benchmark the full one. Every message is a
plausible reply to `to` from `sender`, so that what it does to the pipeline is what a
real reply would do.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from email.utils import format_datetime, make_msgid

NOW_HINT = datetime(2026, 12, 1, 10, 0, tzinfo=UTC)

Builder = Callable[[str, str, float], bytes]


def _head(sender: str, to: str, subject: str = "Re: Welcome", extra: str = "") -> bytes:
    domain = sender.rsplit("@", 1)[-1]
    return (
        f"From: {sender}\r\nTo: {to}\r\nSubject: {subject}\r\n"
        f"Date: {format_datetime(NOW_HINT)}\r\nMessage-ID: {make_msgid(domain=domain)}\r\n"
        f"MIME-Version: 1.0\r\n{extra}"
    ).encode()


def long_line(sender: str, to: str, scale: float = 1.0) -> bytes:
    """`Thanks` and one line of 200,000 `A`s (scale 100 gives the 20 MB line)."""
    n = max(1, int(200_000 * scale))
    body = b"Thanks, let's talk about pricing.\r\n" + b"A" * n + b"\r\n"
    return (
        _head(sender, to, extra="Content-Type: text/plain; charset=us-ascii\r\n") + b"\r\n" + body
    )


def long_words_line(sender: str, to: str, scale: float = 1.0) -> bytes:
    """One long line of address-like and word-like fragments (`a.b.c…`, `x@`, `+-`)."""
    n = max(1, int(40_000 * scale))
    body = b"Thanks!\r\n" + b"a.b-c+d " * n + b"@" * 10 + b"\r\n" + b"x@y." * n + b"\r\n"
    return _head(sender, to, extra="Content-Type: text/plain\r\n") + b"\r\n" + body


def subject_words(sender: str, to: str, scale: float = 1.0) -> bytes:
    """100,000 RFC 2047 encoded words in Subject (about 7 MB)."""
    n = max(1, int(100_000 * scale))
    words = " ".join(["=?utf-8?q?Hall=C3=B6?="] * n)
    return _head(sender, to, subject=words, extra="Content-Type: text/plain\r\n") + (
        b"\r\nThanks, interested.\r\n"
    )


def from_words(sender: str, to: str, scale: float = 1.0) -> bytes:
    """50,000 encoded words in From's display name (about 0.7 MB)."""
    n = max(1, int(50_000 * scale))
    name = " ".join(["=?utf-8?b?w6k=?="] * n)
    domain = sender.rsplit("@", 1)[-1]
    return (
        f"From: {name} <{sender}>\r\nTo: {to}\r\nSubject: Re: Welcome\r\n"
        f"Date: {format_datetime(NOW_HINT)}\r\nMessage-ID: {make_msgid(domain=domain)}\r\n"
        "Content-Type: text/plain\r\n\r\nThanks, interested.\r\n"
    ).encode()


def content_type_params(sender: str, to: str, scale: float = 1.0) -> bytes:
    """200,000 Content-Type parameters (about 2 MB)."""
    n = max(1, int(200_000 * scale))
    params = "".join(f";p{i}=v" for i in range(n))
    return _head(sender, to, extra=f"Content-Type: text/plain{params}\r\n") + (
        b"\r\nThanks, interested.\r\n"
    )


def rfc2231_continuations(sender: str, to: str, scale: float = 1.0) -> bytes:
    """An attachment name in RFC 2231 continuations, 100,000 of them (about 2.4 MB)."""
    n = max(1, int(100_000 * scale))
    params = "".join(f";\r\n filename*{i}*=utf-8''a%C3%A9" for i in range(n))
    body = (
        "Content-Type: multipart/mixed; boundary=b1\r\n\r\n--b1\r\n"
        "Content-Type: text/plain\r\n\r\nThanks, interested.\r\n--b1\r\n"
        f"Content-Type: application/octet-stream\r\nContent-Disposition: attachment{params}\r\n"
        "\r\nAAAA\r\n--b1--\r\n"
    )
    return _head(sender, to) + body.encode()


def nested_rfc822(sender: str, to: str, scale: float = 1.0) -> bytes:
    """A reply carrying a message/rfc822 nested 300 levels deep."""
    depth = max(1, int(300 * scale))
    inner = b"From: x@example.net\r\nSubject: inner\r\n\r\nbottom\r\n"
    for _ in range(depth):
        inner = b"Content-Type: message/rfc822\r\n\r\n" + inner
    body = (
        b"Content-Type: multipart/mixed; boundary=outer\r\n\r\n--outer\r\n"
        b"Content-Type: text/plain\r\n\r\nThanks, see the attached thread; interested.\r\n"
        b"--outer\r\n" + inner + b"\r\n--outer--\r\n"
    )
    return _head(sender, to) + body


def many_parts(sender: str, to: str, scale: float = 1.0) -> bytes:
    """A multipart with 20,000 tiny parts."""
    n = max(1, int(20_000 * scale))
    parts = b"".join(b"--b\r\nContent-Type: text/plain\r\n\r\nx\r\n" for _ in range(n))
    body = (
        b"Content-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\nContent-Type: text/plain\r\n"
        b"\r\nThanks, interested.\r\n" + parts + b"--b--\r\n"
    )
    return _head(sender, to) + body


def big_attachment(sender: str, to: str, scale: float = 1.0) -> bytes:
    """A reply with a 70 MB attachment (base64)."""
    size = max(1, int(70 * 1024 * 1024 * scale))
    line = b"QUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFB\r\n"
    blob = line * (size // len(line) + 1)
    body = (
        b"Content-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\nContent-Type: text/plain\r\n"
        b"\r\nThanks, the file you asked for; interested in pricing.\r\n--b\r\n"
        b"Content-Type: application/octet-stream; name=big.bin\r\n"
        b"Content-Transfer-Encoding: base64\r\n"
        b"Content-Disposition: attachment; filename=big.bin\r\n\r\n" + blob + b"--b--\r\n"
    )
    return _head(sender, to) + body


def many_headers(sender: str, to: str, scale: float = 1.0) -> bytes:
    """100,000 header fields."""
    n = max(1, int(100_000 * scale))
    extra = "".join(f"X-H{i}: v\r\n" for i in range(n))
    return _head(sender, to, extra=extra) + b"\r\nThanks, interested.\r\n"


def many_references(sender: str, to: str, scale: float = 1.0) -> bytes:
    """References with 50,000 Message-IDs."""
    n = max(1, int(50_000 * scale))
    refs = " ".join(f"<r{i}@example.net>" for i in range(n))
    return _head(sender, to, extra=f"References: {refs}\r\n") + b"\r\nThanks, interested.\r\n"


def html_bomb(sender: str, to: str, scale: float = 1.0) -> bytes:
    """An HTML-only reply with 200,000 nested <blockquote>s."""
    n = max(1, int(200_000 * scale))
    html = b"<p>Thanks, interested.</p>" + b"<blockquote>" * n + b"x" + b"</blockquote>" * n
    return _head(sender, to, extra="Content-Type: text/html; charset=utf-8\r\n") + b"\r\n" + html


def many_lines(sender: str, to: str, scale: float = 1.0) -> bytes:
    """A body of 2,000,000 one-character lines."""
    n = max(1, int(2_000_000 * scale))
    return _head(sender, to, extra="Content-Type: text/plain\r\n") + b"\r\nThanks!\r\n" + b"x\n" * n


ATTACKS: dict[str, Builder] = {
    "many_lines": many_lines,
    "long_line": long_line,
    "long_words_line": long_words_line,
    "subject_words": subject_words,
    "from_words": from_words,
    "content_type_params": content_type_params,
    "rfc2231_continuations": rfc2231_continuations,
    "nested_rfc822": nested_rfc822,
    "many_parts": many_parts,
    "many_headers": many_headers,
    "many_references": many_references,
    "html_bomb": html_bomb,
    "big_attachment": big_attachment,
}


# --- template attacks (issue 12 item 9) -------------------------------------------------

# The attacks on `templates lint` and sending: each is one line inside the body
# block of a copy of nurture/welcome (line 3 of the copy).
TEMPLATE_ATTACKS = {
    "nurture/loops": "{% for i in range(100000) %}{% for j in range(100000) %}"
    "{% endfor %}{% endfor %}",
    "nurture/three-gb": "{% for i in range(100000) %}{{ 'x' * 30000 }}{% endfor %}",
    "nurture/thirty-mb": "{% for i in range(1000) %}{{ lead.email * 1000 }}{% endfor %}",
}

# Every way a template can grow a value, each with the reason the render stops with.
TEMPLATE_GROWTH = {
    "repeat": ("{{ 'x' * 1000000000 }}", "builds a repeated value of 1,000,000,000"),
    "power": ("{% set n = 2 %}{{ n ** 100000000 }}", "computes a number of about"),
    "doubling": (
        "{% set s = 'xxxxxxxx' %}" + "{% set s = s ~ s %}" * 40 + "{{ s }}",
        "builds a value of 1,048,576",
    ),
    "namespace": (
        "{% set ns = namespace(s='x') %}{% for i in range(60) %}"
        "{% set ns.s = ns.s ~ ns.s %}{% endfor %}",
        "builds a value of 1,048,576",
    ),
    "center": ("{{ 'x'|center(1000000000) }}", "builds a centred value"),
    "method": ("{{ 'x'.ljust(1000000000) }}", "builds a ljust() result"),
    "format": ("{{ '{:>1000000000}'.format(1) }}", "builds a padded value"),
    "printf": ("{{ '%*s' % (1000000000, 'x') }}", "builds a padded value"),
    "replace": ("{% set a = 'x' * 100000 %}{{ a|replace('x', a) }}", "builds a replaced value"),
    "join": ("{{ range(100000)|join('y' * 100000) }}", "builds a joined value"),
    "macro": (
        "{% macro m() %}{% for i in range(100000) %}{{ 'x' * 100000 }}{% endfor %}"
        "{% endmacro %}{{ m()|length }}",
        "writes or builds more than 2,000,000 characters",
    ),
    "set_block": (
        "{% set b %}{% for i in range(100000) %}{{ 'y' * 100000 }}{% endfor %}{% endset %}",
        "writes or builds more than 2,000,000 characters",
    ),
    "many_values": (
        "{{ ('x' * 1000000)|list|map('center', 1000)|list|length }}",
        "writes or builds more than 2,000,000 characters",
    ),
    "recursion": (
        "{% macro f(n) %}{% if n %}{{ f(n - 1) }}{{ f(n - 1) }}{% endif %}{% endmacro %}"
        "{{ f(60) }}",
        "does more than 1,000,000 steps",
    ),
    "lipsum": ("{{ lipsum(100000000) }}", "builds lorem ipsum"),
    "slice": ("{{ [1]|slice(1000000000)|list }}", "asks slice() for 1,000,000,000 parts"),
}
