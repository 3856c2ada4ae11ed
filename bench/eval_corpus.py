"""Measure classification and reply-text extraction on the shared labelled corpus.

Usage: python bench/eval_corpus.py [CORPUS_DIR] [--json]

CORPUS_DIR defaults to `<project>/../shared/corpus`; when it is absent the script says so
and exits 0. Prints a markdown table (for bench/README.md) or, with --json, one object.

- flufl-bounce: every file is a bounce. A permanent one must come out as kind "bounce",
  a temporary one (delay warning) as "notification" (DESIGN.md: a delay is not a bounce).
  Recipients: the set of failed addresses (case-insensitive) must equal the label's; files
  without an expected address are not counted; where a file has several label rows, any
  row counts.
- email_reply_trimmer: `extract_reply_text(emails/X.txt)` must equal `trimmed/X.txt`
  (exact after trimming surrounding whitespace on both sides).
- talon: each .eml is a genuine reply (kind "reply"); its text/plain reply text must equal
  `expected_reply_text` exactly after strip. Talon's labels keep signatures ("Sent from my
  iPhone"), so quotation-only extraction (`strip_signature=False`) is measured. The HTML
  bodies are compared with all whitespace removed, as talon's own tests do.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import sys
from collections import Counter
from pathlib import Path

PROJECT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT))

from worker.bounces import analyse_bounce  # noqa: E402
from worker.classify import ClassifyContext, classify  # noqa: E402
from worker.parsing import ParseError, parse  # noqa: E402
from worker.replytext import extract_reply_text  # noqa: E402

CTX = ClassifyContext()


def _kind(raw: bytes) -> str:
    try:
        return classify(parse(raw), CTX).kind
    except ParseError:
        return "unparseable"


def eval_flufl(root: Path) -> dict[str, object]:
    rows = list(csv.DictReader((root / "labels.csv").open(encoding="utf-8")))
    by_file: dict[str, list[dict[str, str]]] = {}
    for row in rows:
        by_file.setdefault(row["file"], []).append(row)
    detected = recip_ok = recip_n = 0
    misses: list[str] = []
    pairs: list[tuple[str, str]] = []  # (expected kind, predicted kind)
    for name, file_rows in sorted(by_file.items()):
        raw = (root / name).read_bytes()
        cls = file_rows[0]["bounce_class"]
        expected = "notification" if cls == "temporary" else "bounce"
        predicted = _kind(raw)
        pairs.append((expected, predicted))
        detected += predicted == expected
        if predicted != expected:
            misses.append(f"{name}: {predicted}")
        wanted = [
            {a.strip().lower() for a in r["expected_addresses"].split(";") if a.strip()}
            for r in file_rows
        ]
        wanted = [w for w in wanted if w]
        if wanted:
            recip_n += 1
            try:
                report = analyse_bounce(parse(raw))
            except ParseError:
                report = None
            got = set(report.recipients) if report else set()
            if any(got == w for w in wanted):
                recip_ok += 1
            else:
                misses.append(f"{name}: recipients {sorted(got)}")
    return {
        "files": len(by_file),
        "detection": detected / len(by_file),
        "recipients": recip_ok / recip_n if recip_n else 0.0,
        "recipient_files": recip_n,
        "pairs": pairs,
        "misses": misses,
    }


def eval_trimmer(root: Path) -> dict[str, object]:
    files = sorted((root / "emails").glob("*.txt"))
    ok = 0
    misses: list[str] = []
    for path in files:
        expected = (root / "trimmed" / path.name).read_text(encoding="utf-8")
        got = extract_reply_text(path.read_text(encoding="utf-8"))
        if got.strip() == expected.strip():
            ok += 1
        else:
            misses.append(path.name)
    return {"files": len(files), "exact": ok / len(files) if files else 0.0, "misses": misses}


def eval_talon(root: Path) -> dict[str, object]:
    rows = list(csv.DictReader((root / "labels.csv").open(encoding="utf-8")))
    eml_ok = eml_n = html_ok = html_n = 0
    pairs: list[tuple[str, str]] = []
    misses: list[str] = []
    for row in rows:
        path = root / row["file"]
        expected = row["expected_reply_text"]
        if path.suffix == ".eml":
            eml_n += 1
            raw = path.read_bytes()
            pairs.append(("reply", _kind(raw)))
            msg = parse(raw)
            got = extract_reply_text(msg.text, strip_signature=False)
            if got.strip() == expected.strip():
                eml_ok += 1
            else:
                misses.append(f"{row['file']}: {got[:60]!r}")
        else:
            html_n += 1
            got = extract_reply_text("", path.read_text(encoding="utf-8", errors="replace"))
            if re.sub(r"\s", "", got) == re.sub(r"\s", "", expected):
                html_ok += 1
            else:
                misses.append(f"{row['file']}: {got[:60]!r}")
    return {
        "eml_files": eml_n,
        "eml_exact": eml_ok / eml_n if eml_n else 0.0,
        "html_files": html_n,
        "html_exact": html_ok / html_n if html_n else 0.0,
        "pairs": pairs,
        "misses": misses,
    }


def per_kind(pairs: list[tuple[str, str]]) -> dict[str, dict[str, float]]:
    """Precision and recall per kind over (expected, predicted) pairs."""
    kinds = sorted({k for pair in pairs for k in pair})
    true_pos = Counter(e for e, p in pairs if e == p)
    expected = Counter(e for e, _ in pairs)
    predicted = Counter(p for _, p in pairs)
    out: dict[str, dict[str, float]] = {}
    for kind in kinds:
        out[kind] = {
            "support": float(expected[kind]),
            "precision": true_pos[kind] / predicted[kind] if predicted[kind] else 0.0,
            "recall": true_pos[kind] / expected[kind] if expected[kind] else 0.0,
        }
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("corpus", nargs="?", default=str(PROJECT.parent / "shared" / "corpus"))
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--misses", action="store_true", help="list the files that miss")
    args = parser.parse_args(argv)
    corpus = Path(args.corpus)
    if not corpus.is_dir():
        print(f"corpus not found at {corpus}; nothing to evaluate")
        return 0
    flufl = eval_flufl(corpus / "flufl-bounce") if (corpus / "flufl-bounce").is_dir() else None
    trimmer = (
        eval_trimmer(corpus / "email_reply_trimmer")
        if (corpus / "email_reply_trimmer").is_dir()
        else None
    )
    talon = eval_talon(corpus / "talon") if (corpus / "talon").is_dir() else None
    pairs: list[tuple[str, str]] = []
    for result in (flufl, talon):
        if result:
            pairs += result["pairs"]  # type: ignore[arg-type]
    kinds = per_kind(pairs)
    if args.json:
        summary = {
            "per_kind": kinds,
            "flufl_bounce": {k: v for k, v in (flufl or {}).items() if k != "pairs"},
            "email_reply_trimmer": trimmer,
            "talon": {k: v for k, v in (talon or {}).items() if k != "pairs"},
        }
        if not args.misses:
            for part in summary.values():
                if isinstance(part, dict):
                    part.pop("misses", None)
        print(json.dumps(summary, indent=2))
        return 0
    print("| kind | support | precision | recall |")
    print("|---|---:|---:|---:|")
    for kind, figures in kinds.items():
        print(
            f"| {kind} | {int(figures['support'])} | {figures['precision']:.3f} "
            f"| {figures['recall']:.3f} |"
        )
    print()
    print("| measure | files | score |")
    print("|---|---:|---:|")
    if flufl:
        print(
            f"| flufl-bounce: permanent→bounce, temporary→notification | {flufl['files']} "
            f"| {flufl['detection']:.3f} |"
        )
        print(
            f"| flufl-bounce: failed recipients exact | {flufl['recipient_files']} "
            f"| {flufl['recipients']:.3f} |"
        )
    if trimmer:
        print(
            f"| email_reply_trimmer: reply text exact | {trimmer['files']} | {trimmer['exact']:.3f} |"
        )
    if talon:
        print(
            f"| talon .eml: reply text exact (quotes only) | {talon['eml_files']} "
            f"| {talon['eml_exact']:.3f} |"
        )
        print(
            f"| talon HTML: reply text (whitespace-insensitive) | {talon['html_files']} "
            f"| {talon['html_exact']:.3f} |"
        )
    if args.misses:
        for name, result in (("flufl", flufl), ("trimmer", trimmer), ("talon", talon)):
            for miss in (result or {}).get("misses", []):  # type: ignore[union-attr]
                print(f"miss {name}: {miss}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
