"""Qualification: how well a replying lead fits, as a score and a checklist for the rep.

Pure: no I/O. `qualify` reads a `LeadFacts` snapshot, the reply's new text and the
`qualification` config section, and returns a frozen `QualificationResult`.

The checklist, in this order, holds only the criteria the config asks about:

- fit: `industry`, `company_size`, `annual_revenue`, `country` — one per `fit` key that is
  set; an empty list or a null threshold means "any" and the criterion is left out, not
  reported as unknown. Industries compare case-insensitively, countries as upper-case
  ISO codes, thresholds are minimums (inclusive).
- `authority` — when `authority_titles` is not empty: a configured title appears in the
  lead's job title as a whole word or phrase, case-insensitively ("vp" matches
  "VP Finance" but not "MVP Lead"; "head of" matches "Head of  Sales").
- `intent` — when `intent_phrases` is not empty: a configured phrase appears in the
  reply as a whole word or phrase, case-insensitively; a plain English plural counts
  ("prices" mentions "price").

A fact the lead record does not have (no industry, no title, ...) makes its criterion
`unknown`: unknown earns no points but is not a failure of fit.

Score formula. Each configured criterion has base points: the fit criteria share 50
(50 / number of fit criteria each), authority 20, intent 30. The base points are scaled
so that the configured criteria add up to exactly 100, then rounded to whole points by
largest remainder (ties go to the earlier criterion). The score is the sum of the points
of the criteria that are `met`; it is therefore always within 0..100, and 100 is
reachable whatever subset is configured. With no criterion configured the score is 0.
Example with the default config (three fit criteria, authority, intent): industry 17,
company_size 17, annual_revenue 16, authority 20, intent 30.

Minimum fit (`fit`): no fit criterion is `not_met` and the score is at least `min_score`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from fractions import Fraction
from typing import Literal

from worker.config import Qualification
from worker.models import Lead

Status = Literal["met", "not_met", "unknown"]

FIT_POINTS = 50
AUTHORITY_POINTS = 20
INTENT_POINTS = 30


@dataclass(frozen=True)
class LeadFacts:
    """A plain snapshot of the lead fields qualification reads, so `qualify` stays pure."""

    email: str
    title: str | None
    company: str | None
    industry: str | None
    company_size: int | None
    annual_revenue: int | None
    country: str | None

    @classmethod
    def of(cls, lead: Lead) -> LeadFacts:
        """Copy the relevant fields of a database row (reads attributes, no query of its own
        beyond what the session needs to load the row)."""
        return cls(
            email=lead.email,
            title=lead.title,
            company=lead.company,
            industry=lead.industry,
            company_size=lead.company_size,
            annual_revenue=lead.annual_revenue,
            country=lead.country,
        )


@dataclass(frozen=True)
class Criterion:
    """One checklist line: what was checked, the outcome, why, and its points when met."""

    criterion: str
    status: Status
    evidence: str
    weight: int


@dataclass(frozen=True)
class QualificationResult:
    """The score (0..100), the checklist in a stable order, and whether minimum fit holds."""

    score: int
    checklist: tuple[Criterion, ...]
    fit: bool

    def as_json(self) -> dict[str, object]:
        """The stored and printed form (`Lead.qualification`, `leads show --json`).

        Keys: `score`, `fit`, `checklist` (each `criterion`, `status`, `evidence`, and
        `weight`, the points the criterion is worth when met).
        """
        return {
            "score": self.score,
            "fit": self.fit,
            "checklist": [
                {
                    "criterion": c.criterion,
                    "status": c.status,
                    "evidence": c.evidence,
                    "weight": c.weight,
                }
                for c in self.checklist
            ],
        }


def qualify(lead: LeadFacts, reply_text: str, q: Qualification) -> QualificationResult:
    """Score `lead` against `q`; `reply_text` is the new text of the reply (no quoted
    history), where intent is looked for. See the module docstring for the formula."""
    # (criterion name, base points, status, evidence), in checklist order.
    checks: list[tuple[str, Fraction, Status, str]] = []
    fit_checks = _fit_checks(lead, q)
    for name, status, evidence in fit_checks:
        checks.append((name, Fraction(FIT_POINTS, len(fit_checks)), status, evidence))
    if _phrases(q.authority_titles):
        status, evidence = _authority(lead.title, q.authority_titles)
        checks.append(("authority", Fraction(AUTHORITY_POINTS), status, evidence))
    if _phrases(q.intent_phrases):
        status, evidence = _intent(reply_text, q.intent_phrases)
        checks.append(("intent", Fraction(INTENT_POINTS), status, evidence))

    weights = _scale_to_100([base for _, base, _, _ in checks])
    checklist = tuple(
        Criterion(name, status, evidence, weight)
        for (name, _, status, evidence), weight in zip(checks, weights, strict=True)
    )
    score = min(100, max(0, sum(c.weight for c in checklist if c.status == "met")))
    fit_ok = not any(status == "not_met" for _, status, _ in fit_checks)
    return QualificationResult(
        score=score, checklist=checklist, fit=fit_ok and score >= q.min_score
    )


# --- fit --------------------------------------------------------------------------------


def _fit_checks(lead: LeadFacts, q: Qualification) -> list[tuple[str, Status, str]]:
    fit = q.fit
    out: list[tuple[str, Status, str]] = []
    industries = _phrases(fit.industries)
    if industries:
        wanted = {i.casefold() for i in industries}
        industry = (lead.industry or "").strip()
        if not industry:
            out.append(("industry", "unknown", "industry not known"))
        elif industry.casefold() in wanted:
            out.append(("industry", "met", f"industry {industry} is in the target list"))
        else:
            out.append(
                (
                    "industry",
                    "not_met",
                    f"industry {industry} is not in the target list ({', '.join(industries)})",
                )
            )
    if fit.min_company_size is not None:
        out.append(
            _at_least("company_size", "company size", lead.company_size, fit.min_company_size)
        )
    if fit.min_annual_revenue is not None:
        out.append(
            _at_least(
                "annual_revenue", "annual revenue", lead.annual_revenue, fit.min_annual_revenue
            )
        )
    countries = _phrases(fit.countries)
    if countries:
        wanted = {c.upper() for c in countries}
        country = (lead.country or "").strip().upper()
        if not country:
            out.append(("country", "unknown", "country not known"))
        elif country in wanted:
            out.append(("country", "met", f"country {country} is in the target list"))
        else:
            out.append(
                (
                    "country",
                    "not_met",
                    f"country {country} is not in the target list ({', '.join(countries)})",
                )
            )
    return out


def _at_least(name: str, label: str, value: int | None, minimum: int) -> tuple[str, Status, str]:
    if value is None:
        return name, "unknown", f"{label} not known"
    if value >= minimum:
        return name, "met", f"{label} {value:,} is at least {minimum:,}"
    return name, "not_met", f"{label} {value:,} is below {minimum:,}"


# --- authority and intent ---------------------------------------------------------------


def _authority(title: str | None, titles: Iterable[str]) -> tuple[Status, str]:
    shown = (title or "").strip()
    if not shown:
        return "unknown", "job title not known"
    found = [t for t in _phrases(titles) if _phrase_pattern(t, plural=False).search(shown)]
    if found:
        return "met", f"title {shown!r} matches " + ", ".join(repr(t) for t in found)
    return "not_met", f"title {shown!r} matches none of the authority titles"


def _intent(reply_text: str, phrases: Iterable[str]) -> tuple[Status, str]:
    found = [p for p in _phrases(phrases) if _phrase_pattern(p, plural=True).search(reply_text)]
    if found:
        return "met", "reply mentions " + ", ".join(repr(p) for p in found)
    return "not_met", "reply mentions none of the intent phrases"


def _phrases(items: Iterable[str]) -> list[str]:
    """The non-blank entries, stripped, without case-insensitive repeats, in config order."""
    seen: set[str] = set()
    out: list[str] = []
    for item in items:
        p = item.strip()
        if p and p.casefold() not in seen:
            seen.add(p.casefold())
            out.append(p)
    return out


def _phrase_pattern(phrase: str, *, plural: bool) -> re.Pattern[str]:
    """`phrase` as a whole word or phrase: any run of spaces between its words, and no
    letter or digit glued to either end (so "vp" is not found in "MVP")."""
    body = r"\s+".join(re.escape(w) for w in phrase.split())
    suffix = "(?:e?s)?" if plural else ""
    return re.compile(rf"(?<!\w){body}{suffix}(?!\w)", re.IGNORECASE)


# --- scoring ----------------------------------------------------------------------------


def _scale_to_100(bases: list[Fraction]) -> list[int]:
    """Whole points proportional to `bases` that add up to exactly 100 (or [] / zeros
    when there is nothing to weigh), by largest remainder, earlier entries first on ties."""
    total = sum(bases, Fraction(0))
    if not bases or total == 0:
        return [0] * len(bases)
    exact = [b * 100 / total for b in bases]
    points = [int(e) for e in exact]
    short = 100 - sum(points)
    by_remainder = sorted(range(len(exact)), key=lambda i: (-(exact[i] - points[i]), i))
    for i in by_remainder[:short]:
        points[i] += 1
    return points
