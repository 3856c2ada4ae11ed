"""Offline inspection of .eml files: what `twoway inspect` prints.

`inspect_bytes` gives the stable JSON object of DESIGN.md for one message;
`inspect_paths` walks files and directories and never stops on a bad file;
`format_human` renders one result for people. No config, no database: but
`inspect_files`, what `twoway inspect` prints, also says which lead the worker would
match each message to when a config is there.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from worker.classify import ClassifyContext, classify
from worker.parsing import MAX_MESSAGE_BYTES, ParseError, parse

if TYPE_CHECKING:
    from worker.app import App

__all__ = ["RESULT_KEYS", "format_human", "inspect_bytes", "inspect_files", "inspect_paths"]

# Every result carries these keys (None when not applicable), so scripts can rely on them.
RESULT_KEYS = (
    "kind",
    "reason",
    "bounce",
    "return_date",
    "reply_text",
    "intent",
    "referral_email",
    "unsubscribe_token",
    "message_id",
    "in_reply_to",
    "references",
    "from",
    "subject",
    "date",
    "truncated",
    "limits",
)


_DEFAULT_CTX = ClassifyContext()


def _empty() -> dict[str, object]:
    return dict.fromkeys(RESULT_KEYS)


def inspect_bytes(
    raw: bytes, ctx: ClassifyContext = _DEFAULT_CTX, size: int | None = None
) -> dict[str, object]:
    """Classify one raw message into the stable JSON object.

    Keys: kind, reason, bounce ({"type", "reason", "recipients", "status", ...} or None),
    return_date (ISO date or None), reply_text, intent, referral_email,
    unsubscribe_token, message_id, in_reply_to (list), references (list), from, subject,
    date (ISO or None), truncated (whether only the first MAX_MESSAGE_BYTES of a message
    of `size` bytes were read, as the worker reads it) and limits (what parsing left out,
    as the worker records it in the reason). When the bytes are not an email, kind is
    None and "error" says why.
    """
    result = _empty()
    try:
        msg = parse(raw, size)
    except ParseError as exc:
        result["error"] = f"not an email: {exc}"
        return result
    verdict = classify(msg, ctx)
    result.update(
        kind=verdict.kind,
        reason=verdict.reason,
        bounce=verdict.bounce.as_json() if verdict.bounce else None,
        return_date=verdict.return_date.isoformat() if verdict.return_date else None,
        reply_text=verdict.reply_text,
        intent=verdict.intent,
        referral_email=verdict.referral_email,
        unsubscribe_token=verdict.unsubscribe_token,
        message_id=msg.message_id,
        in_reply_to=list(msg.in_reply_to),
        references=list(msg.references),
        subject=msg.subject,
        date=msg.date.isoformat() if msg.date else None,
        truncated=size is not None and size > len(raw),
        limits=list(msg.limits),
    )
    result["from"] = msg.from_addr
    return result


def _files(path: Path) -> Iterator[Path]:
    if path.is_dir():
        for child in sorted(path.rglob("*")):
            if child.is_file():
                yield child
    else:
        yield path


def _read(file: Path) -> tuple[bytes, int | None]:
    """The first MAX_MESSAGE_BYTES of `file` (what the worker would read), and the file's
    size when it is larger."""
    with file.open("rb") as f:
        size = os.fstat(f.fileno()).st_size
        raw = f.read(MAX_MESSAGE_BYTES)
    return raw, size if size > len(raw) else None


def inspect_paths(
    paths: list[Path], ctx: ClassifyContext = _DEFAULT_CTX
) -> Iterator[dict[str, object]]:
    """One result per file, each with "file" (the path as given or found under a directory).

    Directories are walked recursively in sorted order, regular files only. A file that
    cannot be read gives {"file", "kind": None, "error"} and the iteration goes on.
    """
    for given in paths:
        path = Path(given)
        try:
            files = list(_files(path))
        except OSError as exc:
            yield {"file": str(given), **_empty(), "error": f"cannot read: {exc}"}
            continue
        for file in files:
            try:
                raw, size = _read(file)
            except OSError as exc:
                yield {
                    "file": str(file),
                    **_empty(),
                    "error": f"cannot read: {exc.strerror or exc}",
                }
                continue
            yield {"file": str(file), **inspect_bytes(raw, ctx, size)}


def inspect_files(paths: list[Path], app: App | None = None) -> list[dict[str, object]]:
    """What `twoway inspect` prints: `inspect_paths`' results. With `app` they are
    classified with the config's own addresses, and each message that classified gets
    `lead` (the address, or None) and `match` ({"method", "explanation"}): the lead the
    worker would match it to now."""
    if app is None:
        return list(inspect_paths(paths))
    # The database side, and what it imports, only with a config: inspecting a file
    # without one stays quick.
    from worker.inbound import classify_context
    from worker.match import match_message
    from worker.models import Lead

    ctx = classify_context(app.config)
    results = list(inspect_paths(paths, ctx))
    with app.transaction() as s:
        for r in results:
            if r.get("kind") is None or not r.get("file"):
                continue
            try:
                msg = parse(*_read(Path(str(r["file"]))))
            except (OSError, ParseError):
                continue
            m = match_message(s, msg, classify(msg, ctx), app.config)
            lead = s.get(Lead, m.lead_id) if m.lead_id is not None else None
            r["lead"] = lead.email if lead is not None else None
            r["match"] = {"method": m.method, "explanation": m.explanation}
    return results


def format_human(result: dict[str, object]) -> str:
    """A readable multi-line rendering of one result (for the non-JSON CLI output)."""
    lines: list[str] = []
    if result.get("file"):
        lines.append(f"file:        {result['file']}")
    if result.get("kind") is None:
        lines.append(f"error:       {result.get('error') or 'unknown error'}")
        return "\n".join(lines)
    lines.append(f"kind:        {result['kind']}  ({result.get('reason')})")
    for key, label in (("from", "from"), ("subject", "subject"), ("message_id", "message-id")):
        if result.get(key):
            lines.append(f"{label + ':':<12} {result[key]}")
    in_reply_to = result.get("in_reply_to")
    if isinstance(in_reply_to, list) and in_reply_to:
        lines.append(f"in-reply-to: {', '.join(str(i) for i in in_reply_to)}")
    bounce = result.get("bounce")
    if isinstance(bounce, dict):
        recipients = ", ".join(str(r) for r in bounce.get("recipients") or []) or "(none found)"
        lines.append(
            f"bounce:      {bounce.get('type')} ({bounce.get('reason') or 'other'}) "
            f"{bounce.get('status') or ''} -> {recipients}"
        )
        if bounce.get("diagnostic"):
            lines.append(f"diagnostic:  {bounce['diagnostic']}")
    limits = result.get("limits")
    if isinstance(limits, list) and limits:
        lines.append(f"bounded:     {'; '.join(str(x) for x in limits)}")
    if result.get("return_date"):
        lines.append(f"back on:     {result['return_date']}")
    if result.get("intent"):
        lines.append(f"intent:      {result['intent']}")
    if result.get("referral_email"):
        lines.append(f"referral:    {result['referral_email']}")
    if result.get("unsubscribe_token"):
        lines.append(f"token:       {result['unsubscribe_token']}")
    text = result.get("reply_text")
    if isinstance(text, str) and text.strip():
        lines.append("reply text:")
        lines.extend(f"  | {line}" for line in text.split("\n"))
    return "\n".join(lines)
