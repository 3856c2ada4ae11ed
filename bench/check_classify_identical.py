"""Check that parsing and classification give the same answers as before a change.

Usage:
    python bench/check_classify_identical.py --write BASE.jsonl [--src DIR]
    python bench/check_classify_identical.py --check BASE.jsonl [--src DIR]
    python bench/check_classify_identical.py --time [--src DIR] [-n 5000]

`--write` dumps, for every input below, the whole `ParsedMessage`, every field of the
`Classification` (under two contexts), the bounce report, and the reply text and intent
helpers (each `extract_reply_text` variant, `quotes_history`, `new_words`,
`detect_intent`, `find_return_date`), one JSON line per input. `--check` dumps again and
prints every difference against the saved file (exit 1 when there is one). `--src`
imports `worker` from another checkout (e.g. main, for the baseline), so both dumps can be
made from one script. Long values are stored as their length and SHA-256.

Inputs, read in place (nothing is copied into the repository):

- every file of `../shared/corpus` (when present): as it is, wrapped as a threaded reply
  from an outside sender (as eval_corpus.py does), and wrapped unthreaded; whole messages
  also with their threading headers removed and as a "Re:" threaded to us;
- every `tests/emails/*.eml`, with the same variants;
- the benchmarks' mail mix (bench/_common.py `inbound_mix`, seeds 1 and 14, with the
  clock fixed so that dates do not move between runs);
- the hostile-mail builders of tests/hostile.py at a small scale.

`--time` prints CPU ms per message of `parse` and of `classify` over the benchmark mix
(seed 14, `-n` messages, as bench_scale.py --stages) and over the corpus messages.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import re
import sys
import time
from collections.abc import Callable, Iterator
from datetime import UTC, date, datetime
from functools import partial
from pathlib import Path
from typing import Any

PROJECT = Path(__file__).resolve().parent.parent
TODAY = date(2026, 12, 1)
FROZEN_NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
LONG = 2000  # values longer than this are stored as length and digest
SKIP_NAMES = {"labels.csv", "SHA256SUMS", "README.md"}


def _src_from_argv(argv: list[str]) -> Path:
    for i, arg in enumerate(argv):
        if arg == "--src" and i + 1 < len(argv):
            return Path(argv[i + 1]).resolve()
        if arg.startswith("--src="):
            return Path(arg.split("=", 1)[1]).resolve()
    return PROJECT


# `worker` comes from --src; the inputs (tests/, bench/) always from this checkout.
sys.path.insert(0, str(PROJECT / "bench"))
sys.path.insert(0, str(PROJECT))
sys.path.insert(0, str(_src_from_argv(sys.argv)))

import _common  # noqa: E402

from worker.bounces import analyse_bounce  # noqa: E402
from worker.classify import ClassifyContext, classify, find_return_date  # noqa: E402
from worker.parsing import ParseError, parse  # noqa: E402
from worker.replytext import (  # noqa: E402
    detect_intent,
    extract_reply_text,
    new_words,
    quotes_history,
    wants_unsubscribe,
)

CTX = ClassifyContext(
    our_addresses=frozenset({"sales@example.com"}),
    internal_domains=frozenset({"example.com"}),
    unsubscribe_mailto="sales+unsubscribe-{token}@example.com",
)
BENCH_CTX = ClassifyContext(
    our_addresses=frozenset({"sales@acme.example"}),
    internal_domains=frozenset({"acme.example"}),
)


def _short(value: Any) -> Any:
    """JSON-able `value`, with long strings replaced by their length and digest."""
    if isinstance(value, str):
        if len(value) <= LONG:
            return value
        digest = hashlib.sha256(value.encode("utf-8", "surrogatepass")).hexdigest()[:16]
        return f"<{len(value)} chars sha256:{digest}>"
    if isinstance(value, list | tuple):
        return [_short(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _short(v) for k, v in value.items()}
    if isinstance(value, date | datetime):
        return value.isoformat()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _short(getattr(value, f.name)) for f in dataclasses.fields(value)}
    return value


def _guard(fn: Callable[[], Any]) -> Any:
    try:
        return _short(fn())
    except Exception as exc:  # an exception is an answer too
        return f"raised {type(exc).__name__}: {exc}"


def _text_answers(text: str, html: str = "") -> dict[str, Any]:
    """The reply-text helpers on one body."""
    reply = _guard(lambda: extract_reply_text(text, html))
    full = extract_reply_text(text, html)
    words = new_words(full)
    return {
        "reply_text": reply,
        "reply_text_keep_signature": _guard(
            lambda: extract_reply_text(text, html, strip_signature=False)
        ),
        "reply_text_no_signoff": _guard(lambda: extract_reply_text(text, html, strip_signoff=True)),
        "quotes_history": _guard(lambda: quotes_history(text)),
        "new_words": _short(words),
        "intent": _guard(lambda: detect_intent(words, frozenset({"sales@example.com"}))),
        "wants_unsubscribe": _guard(lambda: wants_unsubscribe(words)),
        "return_date": _guard(lambda: find_return_date(text[:4000], TODAY)),
    }


_RANDOM_NAME_RE = re.compile(r"^[a-z]{10}(?=\.(?:txt|rtf)$)")


def _message_answers(raw: bytes, ctx: ClassifyContext) -> dict[str, Any]:
    try:
        msg = parse(raw)
    except ParseError as exc:
        return {"parse_error": str(exc)}
    out: dict[str, Any] = {"parsed": _short(msg)}
    # mail-parser names a file-less attachment with ten random letters.
    out["parsed"]["attachments"] = [
        _RANDOM_NAME_RE.sub("<random>", a) for a in out["parsed"]["attachments"]
    ]
    out["classify"] = _guard(lambda: classify(msg, ctx, TODAY))
    out["classify_default_ctx"] = _guard(lambda: classify(msg, ClassifyContext(), TODAY))
    if msg.date is not None:
        out["classify_own_date"] = _guard(lambda: classify(msg, ctx))
    out["bounce_report"] = _guard(lambda: analyse_bounce(msg))
    out["text"] = _text_answers("" if msg.text_from_html else msg.text, msg.html)
    return out


def _wrap(body: bytes, n: int, threaded: bool) -> bytes:
    """A body as a plain message from an outside sender (eval_corpus.py's wrapper)."""
    head = (
        "From: Someone Else <someone@example.org>\r\n"
        "To: sales@example.com\r\n"
        f"Subject: {'Re: Our offer' if threaded else 'Our offer'}\r\n"
        f"Message-ID: <eval-{n}@example.org>\r\n"
        + ("In-Reply-To: <twoway.eval@example.com>\r\n" if threaded else "")
        + "Date: Tue, 01 Dec 2026 10:00:00 +0000\r\n"
        "MIME-Version: 1.0\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n"
        "Content-Transfer-Encoding: 8bit\r\n\r\n"
    )
    return head.encode() + body


_THREAD_FIELD_RE = re.compile(rb"(?im)^(?:in-reply-to|references):[^\n]*\n(?:[ \t][^\n]*\n)*")
_SUBJECT_RE = re.compile(rb"(?im)^subject:[ \t]*")


def _header_variants(raw: bytes) -> Iterator[tuple[str, bytes]]:
    """The message without its threading headers, and as a "Re:" threaded to us."""
    cut = raw.find(b"\n\n")
    cut2 = raw.find(b"\n\r\n")
    ends = [c for c in (cut, cut2) if c >= 0]
    if not ends:
        return
    end = min(ends) + 1
    head, body = raw[:end], raw[end:]
    yield "nothread", _THREAD_FIELD_RE.sub(b"", head) + body
    threaded = b"In-Reply-To: <twoway.eval@example.com>\r\n" + _THREAD_FIELD_RE.sub(b"", head)
    if _SUBJECT_RE.search(threaded):
        threaded = _SUBJECT_RE.sub(b"Subject: Re: ", threaded, count=1)
    else:
        threaded = b"Subject: Re: Our offer\r\n" + threaded
    yield "re", threaded + body


def _file_cases(root: Path, label: str) -> Iterator[tuple[str, bytes, str]]:
    """(key, raw, kind) for every file under `root`; kind is "file"."""
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        if path.name in SKIP_NAMES or path.suffix in (".csv", ".md"):
            continue
        yield f"{label}/{path.relative_to(root)}", path.read_bytes(), "file"


def _frozen_mix(n: int, seed: int) -> list[bytes]:
    """The benchmarks' mail mix with the clock fixed (its dates follow `now`)."""

    class Frozen(datetime):
        @classmethod
        def now(cls, tz: Any = None) -> Any:
            return FROZEN_NOW

    saved = _common.datetime
    _common.datetime = Frozen  # type: ignore[misc]
    try:
        from bench_scale import TOUCHED, bench_lead

        leads = [bench_lead(i) for i in range(TOUCHED)]
        return list(_common.inbound_mix(n, leads, seed=seed))
    finally:
        _common.datetime = saved  # type: ignore[misc]


def _hostile() -> Iterator[tuple[str, bytes]]:
    import tests.hostile as hostile

    hostile.make_msgid = lambda domain=None, **_k: f"<fixed@{domain}>"  # type: ignore[assignment]
    for name, build in sorted(hostile.ATTACKS.items()):
        yield name, build("p1@co0.example.net", "sales@example.com", 0.02)


def dump(corpus: Path, only: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    """(key, answers) for every input (whose key starts with `only`)."""
    for key, answers in _dump(corpus):
        if key.startswith(only):
            yield key, answers()


def _dump(corpus: Path) -> Iterator[tuple[str, Callable[[], dict[str, Any]]]]:
    """(key, how to compute its answers) for every input."""
    roots = [(corpus, "corpus")] if corpus.is_dir() else []
    roots.append((PROJECT / "tests" / "emails", "tests/emails"))
    for root, label in roots:
        for n, (key, raw, _kind) in enumerate(_file_cases(root, label)):
            body = raw.decode("utf-8", errors="replace")
            yield f"{key}#raw", partial(_message_answers, raw, CTX)
            yield f"{key}#wrapped", partial(_message_answers, _wrap(raw, n, True), CTX)
            unthreaded = _wrap(raw, n, False)
            yield f"{key}#wrapped-unthreaded", partial(_message_answers, unthreaded, CTX)
            yield f"{key}#body", partial(_text_answers, body)
            yield f"{key}#body-as-html", partial(_text_answers, "", body)
            for variant, changed in _header_variants(raw):
                yield f"{key}#{variant}", partial(_message_answers, changed, CTX)
    for seed in (1, 14):
        for i, raw in enumerate(_frozen_mix(1500, seed)):
            yield f"bench-mix/seed{seed}/{i}", partial(_message_answers, raw, BENCH_CTX)
    for name, raw in _hostile():
        yield f"hostile/{name}", partial(_message_answers, raw, CTX)


def _diff(a: Any, b: Any, path: str = "") -> Iterator[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if k not in a or k not in b:
                yield f"{path}.{k}: {'missing' if k not in b else 'new'}"
            else:
                yield from _diff(a[k], b[k], f"{path}.{k}")
    elif a != b:
        yield f"{path}: {str(a)[:200]!r} -> {str(b)[:200]!r}"


def _cpu_ms(fn: Callable[[Any], Any], items: list[Any], repeat: int = 3) -> float:
    best = float("inf")
    for _ in range(repeat):
        started = time.process_time()
        for item in items:
            fn(item)
        best = min(best, time.process_time() - started)
    return best * 1000 / len(items)


def _classify_today(msg: Any, ctx: ClassifyContext) -> Any:
    return classify(msg, ctx, TODAY)


def timing(corpus: Path, n: int) -> dict[str, float]:
    """CPU ms per message of parse and classify (best of three passes)."""
    out: dict[str, float] = {}
    sets = {"bench mix": (_frozen_mix(n, 14), BENCH_CTX)}
    if corpus.is_dir():
        raws = []
        for _key, raw, _kind in _file_cases(corpus, "corpus"):
            try:
                parse(raw)
            except ParseError:
                continue
            raws.append(raw)
        sets[f"corpus ({len(raws)} files)"] = (raws, CTX)
    for name, (raws, ctx) in sets.items():
        parsed = [parse(r) for r in raws]
        out[f"{name}: parse"] = round(_cpu_ms(parse, raws), 3)
        out[f"{name}: classify"] = round(_cpu_ms(partial(_classify_today, ctx=ctx), parsed), 3)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n", 1)[0])
    parser.add_argument("--write", metavar="FILE", help="save the answers to FILE (JSON lines)")
    parser.add_argument("--check", metavar="FILE", help="compare the answers with FILE")
    parser.add_argument("--time", action="store_true", help="CPU ms per message")
    parser.add_argument("--src", help="import worker from this checkout")
    parser.add_argument("-n", type=int, default=5000, help="bench mix size for --time")
    parser.add_argument("--only", default="", help="only the inputs whose key starts so")
    parser.add_argument("--corpus", default=str(PROJECT.parent / "shared" / "corpus"))
    args = parser.parse_args(argv)
    corpus = Path(args.corpus)
    logging.getLogger("mailparser").setLevel(logging.ERROR)  # it warns on every report part
    import worker

    print(f"worker from {Path(worker.__file__).parent}", file=sys.stderr)
    if args.time:
        for name, ms in timing(corpus, args.n).items():
            print(f"{name:<40} {ms:8.3f} CPU ms/message")
    if args.write:
        count = 0
        with open(args.write, "w", encoding="utf-8") as fh:
            for key, answers in dump(corpus, args.only):
                fh.write(json.dumps({"key": key, **answers}, ensure_ascii=False) + "\n")
                count += 1
        print(f"{count} inputs written to {args.write}")
    if args.check:
        saved: dict[str, Any] = {}
        with open(args.check, encoding="utf-8") as fh:
            for line in fh:
                row = json.loads(line)
                if row["key"].startswith(args.only):
                    saved[row.pop("key")] = row
        differences = 0
        seen = 0
        for key, answers in dump(corpus, args.only):
            seen += 1
            now = json.loads(json.dumps(answers, ensure_ascii=False))
            if key not in saved:
                print(f"{key}: not in {args.check}")
                differences += 1
                continue
            for line in _diff(saved.pop(key), now):
                print(f"{key}{line}")
                differences += 1
        for key in saved:
            print(f"{key}: missing now")
            differences += 1
        print(f"{seen} inputs compared, {differences} differences")
        return 1 if differences else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
