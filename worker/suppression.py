"""The do-not-contact list: addresses and whole domains (`@example.org`) never mailed.

A suppressed lead is skipped when leads are imported, its due nurture steps are not
queued, and a message already queued is cancelled right before SMTP. Entries are plain
rows; every helper writes into the caller's session and never commits.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from worker.leads import normalise_email
from worker.models import Suppression

_CHUNK = 400  # two patterns per address: below SQLite's bound-parameter limit
MAX_REASON = 500


def parse_pattern(text: str) -> str:
    """`@domain` (a whole domain) or an address, normalised; ValueError says why not."""
    value = text.strip()
    if value.startswith("@"):
        try:
            domain = normalise_email(f"x{value}").split("@", 1)[1]
        except ValueError:
            raise ValueError(f"{value!r} is not a domain such as @example.org") from None
        return f"@{domain}"
    return normalise_email(value)


@dataclass
class SuppressImport:
    added: int = 0
    updated: int = 0
    rejected: list[tuple[int, str, str]] = field(default_factory=list)
    """(line, value, reason) of each row that is not an address or @domain."""

    def as_json(self) -> dict[str, Any]:
        return {
            "added": self.added,
            "updated": self.updated,
            "rejected": [{"line": ln, "email": v, "reason": r} for ln, v, r in self.rejected],
        }


def import_suppressions(
    session: Session, rows: Iterable[tuple[int, dict[str, str | None]]], now: datetime
) -> SuppressImport:
    """Add CSV rows (`email`: address or @domain, optional `reason`); later rows win."""
    result = SuppressImport()
    wanted: dict[str, str | None] = {}
    for line, raw in rows:
        row = {(k or "").strip().lower(): (v or "").strip() for k, v in raw.items() if k}
        value = row.get("email", "")
        try:
            pattern = parse_pattern(value)
        except ValueError as e:
            result.rejected.append((line, value, str(e)))
            continue
        wanted[pattern] = (row.get("reason") or None) and row["reason"][:MAX_REASON]
    patterns = list(wanted)
    existing: dict[str, Suppression] = {}
    for i in range(0, len(patterns), _CHUNK):
        for s in session.scalars(
            select(Suppression).where(Suppression.pattern.in_(patterns[i : i + _CHUNK]))
        ):
            existing[s.pattern] = s
    for pattern, reason in wanted.items():
        if pattern in existing:
            if reason:
                existing[pattern].reason = reason
            result.updated += 1
        else:
            session.add(Suppression(pattern=pattern, reason=reason, created_at=now))
            result.added += 1
    return result


def list_suppressions(session: Session) -> list[dict[str, Any]]:
    from worker.leads import iso

    return [
        {"email": s.pattern, "reason": s.reason, "at": iso(s.created_at)}
        for s in session.scalars(select(Suppression).order_by(Suppression.pattern))
    ]


def remove_suppressions(session: Session, values: Iterable[str]) -> int:
    """Remove entries (addresses or @domains); returns how many existed. ValueError if bad."""
    patterns = [parse_pattern(v) for v in values]
    res = session.execute(delete(Suppression).where(Suppression.pattern.in_(patterns)))
    return int(getattr(res, "rowcount", 0) or 0)


def suppressed(session: Session, emails: Iterable[str]) -> dict[str, str]:
    """Which of these (normalised) addresses are suppressed: address -> why."""
    addresses = list(dict.fromkeys(emails))
    out: dict[str, str] = {}
    for i in range(0, len(addresses), _CHUNK):
        chunk = addresses[i : i + _CHUNK]
        keys = set(chunk) | {"@" + a.rsplit("@", 1)[-1] for a in chunk}
        found = {
            p: r
            for p, r in session.execute(
                select(Suppression.pattern, Suppression.reason).where(
                    Suppression.pattern.in_(sorted(keys))
                )
            )
        }
        if not found:
            continue
        for a in chunk:
            for key in (a, "@" + a.rsplit("@", 1)[-1]):
                if key in found:
                    why = f"on the do-not-contact list ({key}"
                    out[a] = why + (f": {found[key]})" if found[key] else ")")
                    break
    return out
