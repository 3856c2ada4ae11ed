"""Score classification and reply-text extraction on the shared labelled corpus.

Usage: python bench/eval_corpus.py [CORPUS_DIR] [--json] [--misses] [--write-readme]

CORPUS_DIR defaults to `<project>/../shared/corpus`; when it is absent the script says so
and exits 0 (our own `tests/emails/` are still scored). Every set is scored the same way:

- kind: each message is classified as `twoway inspect` does; the labelled kind against
  the predicted one gives a confusion matrix per set and over all sets. Reply-body sets
  (bodies without headers) are wrapped in a plain message from an outside sender that
  answers one of ours, so their kind counts too.
- bounces: hard/soft agreement where the label says hard or soft (flufl-bounce's
  "permanent"/"temporary" is the detector's split, not ours: a temporary report must be
  a `notification`, a permanent one a `bounce`), and failed-recipient accuracy (the set
  of addresses, case-insensitive, must equal the label's; any row counts when a file
  has several).
- reply text: each label row's check (equals, startswith, endswith, contains,
  not_contains, regex, not_regex; whitespace normalised as the corpus README says)
  against the reply text twoway extracts (`inspect`'s reply_text, which keeps the
  closing and name; rows of scope `reply`, which leave the closing out, are checked
  against `extract_reply_text(strip_signoff=True)`); email_reply_trimmer and talon by
  exact match.
- return dates and reasons: our own `tests/emails/labels.json` (written by us, not
  held out) adds return-date accuracy and the bounce-reason taxonomy.

`--write-readme` replaces the "Classification on the shared corpus" section of
bench/README.md with the tables printed here.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

PROJECT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT))

from worker.classify import Classification, ClassifyContext, classify  # noqa: E402
from worker.parsing import ParseError, parse  # noqa: E402
from worker.replytext import extract_reply_text  # noqa: E402

CTX = ClassifyContext(
    our_addresses=frozenset({"sales@example.com"}),
    internal_domains=frozenset({"example.com"}),
    unsubscribe_mailto="sales+unsubscribe-{token}@example.com",
)
KINDS = ("bounce", "complaint", "auto_reply", "notification", "unsubscribe", "bulk", "reply")
REPLY_SETS = (
    "github-email_reply_parser",
    "zapier-email-reply-parser",
    "willdurand-EmailReplyParser",
    "mail-parser-reply",
    "edgetier-email-reply-parser",
    "extended_email_reply_parser",
    "elixir_email_reply_parser",
)
CLASS_SETS = ("mimekit", "email-arf", "rt", "salmon", "cpython-email", "zammad")
README_START = "<!-- eval_corpus:start -->"
README_END = "<!-- eval_corpus:end -->"


@dataclass
class Score:
    """Counts for one set; every ratio is (hits, total)."""

    name: str
    pairs: list[tuple[str, str]] = field(default_factory=list)  # (labelled, predicted)
    hard_soft: list[bool] = field(default_factory=list)
    recipients: list[bool] = field(default_factory=list)
    return_dates: list[bool] = field(default_factory=list)
    text_checks: list[bool] = field(default_factory=list)
    text_files: dict[str, bool] = field(default_factory=dict)
    reasons: list[bool] = field(default_factory=list)
    misses: list[str] = field(default_factory=list)

    def kind_accuracy(self) -> tuple[int, int]:
        return sum(e == p for e, p in self.pairs), len(self.pairs)

    def text_file_agreement(self) -> tuple[int, int]:
        return sum(self.text_files.values()), len(self.text_files)


def _classify(raw: bytes) -> Classification | None:
    try:
        return classify(parse(raw), CTX)
    except ParseError:
        return None


def _kind(verdict: Classification | None) -> str:
    return verdict.kind if verdict else "unparseable"


_HEADER_LINE_RE = re.compile(rb"^[A-Za-z][\w-]*:(?:[ \t]|$)")


def _looks_like_message(raw: bytes) -> bool:
    """Whether a file holds a whole message (a header block) rather than a reply body."""
    head = raw.lstrip()[:4000].replace(b"\r\n", b"\n").split(b"\n\n", 1)[0]
    lines = [line for line in head.split(b"\n") if line and not line[:1].isspace()]
    if not lines or not all(_HEADER_LINE_RE.match(x) or x.startswith(b"From ") for x in lines):
        return False
    names = {x.split(b":", 1)[0].lower() for x in lines}
    return bool(names & {b"from", b"received", b"return-path"}) and bool(
        names & {b"to", b"subject", b"date", b"message-id"}
    )


def _wrap(body: bytes, n: int) -> bytes:
    """A reply body as the plain message an outside sender would send back to us."""
    head = (
        "From: Someone Else <someone@example.org>\r\n"
        "To: sales@example.com\r\n"
        "Subject: Re: Our offer\r\n"
        f"Message-ID: <eval-{n}@example.org>\r\n"
        "In-Reply-To: <twoway.eval@example.com>\r\n"
        "Date: Tue, 01 Dec 2026 10:00:00 +0000\r\n"
        "MIME-Version: 1.0\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n"
        "Content-Transfer-Encoding: 8bit\r\n\r\n"
    )
    return head.encode() + body


def _norm(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def _check(check: str, expected: str, got: str, note: str) -> bool | None:
    """Whether the reply text `got` meets one label row; None when there is nothing to check."""
    if check in ("none", ""):
        return None
    if "all whitespace" in note.lower() or "whitespace removed" in note.lower():
        g, e = re.sub(r"\s", "", got), re.sub(r"\s", "", expected)
    else:
        g, e = _norm(got), _norm(expected)
    lines = "\n".join(line.strip() for line in got.replace("\r", "").split("\n"))
    if check in ("equals", "text_equals_ws_insensitive"):
        if check == "text_equals_ws_insensitive":
            g, e = re.sub(r"\s", "", got), re.sub(r"\s", "", expected)
        return g == e
    if check == "startswith":
        return g.startswith(e)
    if check == "endswith":
        return g.endswith(e)
    if check == "contains":
        return e in g
    if check == "not_contains":
        return e not in g
    if check == "regex":
        return re.search(expected, lines) is not None
    if check == "not_regex":
        return re.search(expected, lines) is None
    raise ValueError(f"unknown check {check!r}")


def _read_rows(path: Path) -> list[dict[str, str]]:
    with path.open(encoding="utf-8", newline="") as fh:
        return list(csv.DictReader(fh))


def _without_signoff(raw: bytes) -> str:
    """The reply text without its closing: what the label scope `reply` asks for."""
    if _looks_like_message(raw):
        try:
            msg = parse(raw)
        except ParseError:
            return ""
        body = "" if msg.text_from_html else msg.text
        return extract_reply_text(body, msg.html, strip_signoff=True)
    return extract_reply_text(raw.decode("utf-8", errors="replace"), strip_signoff=True)


def eval_reply_set(root: Path) -> Score:
    """A reply-parser port: bodies (or whole messages) with checks on the reply text."""
    score = Score(root.name)
    rows = _read_rows(root / "labels.csv")
    texts: dict[str, str] = {}
    signoff_free: dict[str, str] = {}
    for n, row in enumerate(rows):
        name = row["file"]
        if name not in texts:
            raw = (root / name).read_bytes()
            if _looks_like_message(raw):
                verdict = _classify(raw)
                try:
                    msg = parse(raw)
                    text = extract_reply_text("" if msg.text_from_html else msg.text, msg.html)
                except ParseError:
                    text = ""
            else:
                verdict = _classify(_wrap(raw, n))
                text = extract_reply_text(raw.decode("utf-8", errors="replace"))
            texts[name] = text
            signoff_free[name] = _without_signoff(raw)
            score.pairs.append((row["kind"] or "reply", _kind(verdict)))
            if _kind(verdict) != (row["kind"] or "reply"):
                score.misses.append(f"{name}: kind {_kind(verdict)}")
        text = texts[name]
        if row.get("scope") == "reply" and name in signoff_free:
            text = signoff_free[name]
        ok = _check(row["check"], row["expected"], text, row.get("note", ""))
        if ok is None:
            continue
        score.text_checks.append(ok)
        score.text_files[name] = score.text_files.get(name, True) and ok
        if not ok:
            score.misses.append(
                f"{name}: {row['check']} {row['expected'][:50]!r} got {texts[name][:70]!r}"
            )
    return score


def _bounce_figures(score: Score, name: str, verdict: Classification | None, row: dict[str, str]):  # type: ignore[no-untyped-def]
    cls = row.get("bounce_class", "")
    bounce = verdict.bounce if verdict else None
    if cls in ("hard", "soft") and row["kind"] == "bounce":
        got = bounce.type if bounce else None
        score.hard_soft.append(got == cls)
        if got != cls:
            score.misses.append(f"{name}: {got} for {cls}")
    wanted = {a.strip().lower() for a in row.get("failed_recipients", "").split(";") if a.strip()}
    if wanted and row["kind"] == "bounce":
        got_r = set(bounce.recipients) if bounce else set()
        score.recipients.append(got_r == wanted)
        if got_r != wanted:
            score.misses.append(f"{name}: recipients {sorted(got_r)}")


def eval_class_set(root: Path) -> Score:
    """A set labelled with twoway kinds and bounce fields (mimekit, zammad, ...)."""
    score = Score(root.name)
    for row in _read_rows(root / "labels.csv"):
        name = row["file"]
        verdict = _classify((root / name).read_bytes())
        expected = row["kind"]
        got = _kind(verdict)
        # email-arf: an opt-out report may come out as an unsubscribe (the README says so).
        if expected == "complaint" and got == "unsubscribe" and row.get("subtype") == "opt-out":
            got = "complaint"
        score.pairs.append((expected, got))
        if got != expected:
            score.misses.append(f"{name}: kind {got}")
        _bounce_figures(score, name, verdict, row)
    return score


def eval_flufl(root: Path) -> Score:
    score = Score(root.name)
    by_file: dict[str, list[dict[str, str]]] = {}
    for row in _read_rows(root / "labels.csv"):
        by_file.setdefault(row["file"], []).append(row)
    for name, file_rows in sorted(by_file.items()):
        verdict = _classify((root / name).read_bytes())
        temporary = file_rows[0]["bounce_class"] == "temporary"
        expected = "notification" if temporary else "bounce"
        got = _kind(verdict)
        score.pairs.append((expected, got))
        if got != expected:
            score.misses.append(f"{name}: kind {got}")
        wanted = [
            {a.strip().lower() for a in r["expected_addresses"].split(";") if a.strip()}
            for r in file_rows
        ]
        wanted = [w for w in wanted if w]
        if wanted and not temporary:
            got_r = set(verdict.bounce.recipients) if verdict and verdict.bounce else set()
            score.recipients.append(any(got_r == w for w in wanted))
            if not score.recipients[-1]:
                score.misses.append(f"{name}: recipients {sorted(got_r)}")
    return score


def eval_trimmer(root: Path) -> Score:
    score = Score(root.name)
    for path in sorted((root / "emails").glob("*.txt")):
        body = path.read_bytes()
        score.pairs.append(("reply", _kind(_classify(_wrap(body, 0)))))
        expected = (root / "trimmed" / path.name).read_text(encoding="utf-8")
        got = extract_reply_text(body.decode("utf-8", errors="replace"))
        ok = got.strip() == expected.strip()
        score.text_checks.append(ok)
        score.text_files[path.name] = ok
        if not ok:
            score.misses.append(f"{path.name}: got {got[:70]!r}")
        if score.pairs[-1][1] != "reply":
            score.misses.append(f"{path.name}: kind {score.pairs[-1][1]}")
    return score


def eval_talon(root: Path) -> Score:
    """Talon's labels keep signatures ("Sent from my iPhone"): quotes-only extraction."""
    score = Score(root.name)
    for row in _read_rows(root / "labels.csv"):
        path = root / row["file"]
        expected = row["expected_reply_text"]
        if path.suffix == ".eml":
            raw = path.read_bytes()
            score.pairs.append(("reply", _kind(_classify(raw))))
            got = extract_reply_text(parse(raw).text, strip_signature=False)
            ok = got.strip() == expected.strip()
        else:
            got = extract_reply_text("", path.read_text(encoding="utf-8", errors="replace"))
            ok = re.sub(r"\s", "", got) == re.sub(r"\s", "", expected)
        score.text_checks.append(ok)
        score.text_files[row["file"]] = ok
        if not ok:
            score.misses.append(f"{row['file']}: got {got[:70]!r}")
    return score


def eval_quotequail(root: Path) -> Score:
    score = Score(root.name)
    for row in _read_rows(root / "labels.csv"):
        html = (root / row["file"]).read_text(encoding="utf-8", errors="replace")
        got = extract_reply_text("", html)
        ok = bool(_check(row["check"], row["expected"], got, row.get("note", "")))
        score.text_checks.append(ok)
        score.text_files[row["file"]] = ok
        if not ok:
            score.misses.append(f"{row['file']}: got {got[:70]!r}")
    return score


def eval_ours(root: Path) -> Score:
    """Our own labelled messages (tests/emails): kinds, bounce fields, reasons, dates."""
    score = Score("tests/emails (ours)")
    labels: dict[str, dict[str, object]] = json.loads((root / "labels.json").read_text("utf-8"))
    for name, label in sorted(labels.items()):
        verdict = _classify((root / name).read_bytes())
        expected = str(label["kind"])
        score.pairs.append((expected, _kind(verdict)))
        if _kind(verdict) != expected:
            score.misses.append(f"{name}: kind {_kind(verdict)}")
        if verdict is None:
            continue
        bounce = verdict.bounce
        if "bounce_type" in label:
            score.hard_soft.append(bool(bounce) and bounce.type == label["bounce_type"])  # type: ignore[union-attr]
        if "recipients" in label:
            got_r = list(bounce.recipients) if bounce else []
            score.recipients.append(got_r == label["recipients"])
        if "bounce_reason" in label:
            score.reasons.append(bool(bounce) and bounce.reason == label["bounce_reason"])  # type: ignore[union-attr]
            if not score.reasons[-1]:
                score.misses.append(f"{name}: reason {bounce.reason if bounce else None}")
        if expected == "auto_reply":
            got_d = verdict.return_date.isoformat() if verdict.return_date else None
            score.return_dates.append(got_d == label.get("return_date"))
            if not score.return_dates[-1]:
                score.misses.append(f"{name}: return date {got_d}")
        if "reply_text" in label:
            ok = verdict.reply_text == label["reply_text"]
            score.text_checks.append(ok)
            score.text_files[name] = ok
    return score


def evaluate(corpus: Path) -> list[Score]:
    scores: list[Score] = []
    if corpus.is_dir():
        for name in sorted(p.name for p in corpus.iterdir() if p.is_dir()):
            root = corpus / name
            if name == "flufl-bounce":
                scores.append(eval_flufl(root))
            elif name == "email_reply_trimmer":
                scores.append(eval_trimmer(root))
            elif name == "talon":
                scores.append(eval_talon(root))
            elif name == "quotequail":
                scores.append(eval_quotequail(root))
            elif name in REPLY_SETS:
                scores.append(eval_reply_set(root))
            elif (root / "labels.csv").is_file():
                scores.append(eval_class_set(root))
    return scores


def _ratio(values: list[bool]) -> tuple[int, int]:
    return sum(values), len(values)


def headline(scores: list[Score]) -> dict[str, tuple[int, int]]:
    """The issue's headline figures over every set: (hits, total) each."""
    pairs = [p for s in scores for p in s.pairs]
    kinds: dict[str, tuple[int, int]] = {}
    for kind in ("reply", "auto_reply", "bounce", "complaint", "notification"):
        kinds[f"{kind} recall"] = (
            sum(e == p == kind for e, p in pairs),
            sum(e == kind for e, _ in pairs),
        )
    reply_predicted = sum(p == "reply" for _, p in pairs)
    return {
        "kind accuracy": (sum(e == p for e, p in pairs), len(pairs)),
        "human-reply precision": (kinds["reply recall"][0], reply_predicted),
        **kinds,
        "bounce hard/soft agreement": _ratio([x for s in scores for x in s.hard_soft]),
        "failed-recipient accuracy": _ratio([x for s in scores for x in s.recipients]),
        "reply-text checks": _ratio([x for s in scores for x in s.text_checks]),
        "reply-text files (all checks)": (
            sum(s.text_file_agreement()[0] for s in scores),
            sum(s.text_file_agreement()[1] for s in scores),
        ),
        "return-date accuracy": _ratio([x for s in scores for x in s.return_dates]),
        "bounce reason": _ratio([x for s in scores for x in s.reasons]),
    }


def _fmt(pair: tuple[int, int]) -> str:
    hits, total = pair
    return f"{hits / total:.3f} ({hits}/{total})" if total else "–"


def confusion(pairs: list[tuple[str, str]]) -> list[str]:
    """A markdown confusion matrix: rows labelled, columns predicted."""
    labelled = [k for k in KINDS if any(e == k for e, _ in pairs)]
    predicted = sorted({p for _, p in pairs} | set(labelled), key=lambda k: (k not in KINDS, k))
    counts = Counter(pairs)
    out = ["| labelled \\ predicted | " + " | ".join(predicted) + " |"]
    out.append("|---|" + "---:|" * len(predicted))
    for e in labelled:
        out.append(f"| {e} | " + " | ".join(str(counts[(e, p)] or "") for p in predicted) + " |")
    return out


def report(scores: list[Score]) -> list[str]:
    lines = [
        "| set | messages | kind accuracy | hard/soft | recipients | reply-text checks "
        "| reply-text files | return dates | confusions (labelled→predicted ×n) |"
    ]
    lines.append("|---|---:|---:|---:|---:|---:|---:|---:|---|")
    for s in scores:
        wrong = Counter((e, p) for e, p in s.pairs if e != p)
        conf = ", ".join(f"{e}→{p} ×{n}" for (e, p), n in sorted(wrong.items())) or "none"
        lines.append(
            f"| {s.name} | {len(s.pairs) or len(s.text_files)} | {_fmt(s.kind_accuracy())} "
            f"| {_fmt(_ratio(s.hard_soft))} | {_fmt(_ratio(s.recipients))} "
            f"| {_fmt(_ratio(s.text_checks))} | {_fmt(s.text_file_agreement())} "
            f"| {_fmt(_ratio(s.return_dates))} | {conf} |"
        )
    lines += ["", "| headline (all sets) | score |", "|---|---:|"]
    lines += [f"| {k} | {_fmt(v)} |" for k, v in headline(scores).items()]
    lines += ["", "Confusion matrix over all sets (rows: label, columns: twoway's kind):", ""]
    lines += confusion([p for s in scores for p in s.pairs])
    return lines


def write_readme(lines: list[str], command: str) -> None:
    path = PROJECT / "bench" / "README.md"
    text = path.read_text(encoding="utf-8")
    block = "\n".join([README_START, f"`{command}`", "", *lines, README_END])
    if README_START in text and README_END in text:
        head, rest = text.split(README_START, 1)
        text = head + block + rest.split(README_END, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n## Classification on the shared corpus\n\n" + block + "\n"
    path.write_text(text, encoding="utf-8")


def _default_corpus() -> Path:
    """`../shared/corpus` beside the checkout (or beside a worktree's parent)."""
    for base in (PROJECT.parent, PROJECT.parent.parent):
        if (base / "shared" / "corpus").is_dir():
            return base / "shared" / "corpus"
    return PROJECT.parent / "shared" / "corpus"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n", 1)[0])
    parser.add_argument("corpus", nargs="?", default=str(_default_corpus()))
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--misses", action="store_true", help="list what misses")
    parser.add_argument("--write-readme", action="store_true", help="update bench/README.md")
    parser.add_argument("--no-ours", action="store_true", help="leave out tests/emails")
    args = parser.parse_args(argv)
    corpus = Path(args.corpus)
    if not corpus.is_dir():
        print(f"corpus not found at {corpus}; scoring tests/emails only")
    scores = evaluate(corpus)
    shared = list(scores)
    if not args.no_ours:
        scores.append(eval_ours(PROJECT / "tests" / "emails"))
    if args.json:
        out = {
            "headline": {k: (h / t if t else None) for k, (h, t) in headline(shared).items()},
            "sets": {
                s.name: {
                    "messages": len(s.pairs),
                    "kind_accuracy": _fmt(s.kind_accuracy()),
                    "hard_soft": _fmt(_ratio(s.hard_soft)),
                    "recipients": _fmt(_ratio(s.recipients)),
                    "reply_text_checks": _fmt(_ratio(s.text_checks)),
                    "reply_text_files": _fmt(s.text_file_agreement()),
                    "return_dates": _fmt(_ratio(s.return_dates)),
                    **({"misses": s.misses} if args.misses else {}),
                }
                for s in scores
            },
        }
        print(json.dumps(out, indent=2, ensure_ascii=False))
        return 0
    lines = report(shared)
    if not args.no_ours:
        ours = scores[-1]
        lines += [
            "",
            f"Our own `tests/emails` ({len(ours.pairs)} messages, written by us, not held out): "
            f"kind {_fmt(ours.kind_accuracy())}, hard/soft {_fmt(_ratio(ours.hard_soft))}, "
            f"recipients {_fmt(_ratio(ours.recipients))}, bounce reason "
            f"{_fmt(_ratio(ours.reasons))}, return dates {_fmt(_ratio(ours.return_dates))}, "
            f"reply text {_fmt(_ratio(ours.text_checks))}.",
        ]
    print("\n".join(lines))
    if args.misses:
        for s in scores:
            for miss in s.misses:
                print(f"miss {s.name}: {miss}")
    if args.write_readme:
        write_readme(lines, "python bench/eval_corpus.py --write-readme")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
