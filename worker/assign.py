"""Assignment: which sales rep gets a new prospect, and a sentence saying why.

`assign` only reads the database; the caller (the lifecycle) records the choice by setting
`Lead.owner`, appending an "assigned" `LeadEvent` with detail `{"rep": email, "reason":
reason}` and calling `note_assignment`, in the same transaction. Everything here is
derived from those rows, never from in-process counters, so any number of workers
sharing the database agree; every read is a bounded indexed lookup.

The rules, first that gives a rep wins:

0. The lead already has an owner who is a configured rep: it stays with them.
1. Account ownership: another lead of the same company — same email domain, or the same
   company name compared case-insensitively with inner spaces collapsed (`company_key`) — already has an owner who is still a
   configured rep (the most recently updated such lead decides): that rep, so an account
   has one voice. This ignores `daily_cap` and `weight` (they balance new business, and
   splitting an account would confuse the customer) but not absence: an away owner is
   skipped and the lead goes through the next rules. Consumer mail domains (gmail.com,
   outlook.com, ...) and placeholder company names ("n/a", "self-employed", ...) do not
   make an account.
2. With `assignment: rules_then_round_robin`, the reps whose `match` rule fits the lead,
   in config order. A rule fits when every part it sets fits: country (ISO code,
   case-insensitive), industry (case-insensitive), company size within
   `min_company_size..max_company_size` (inclusive). A lead value the rule needs but the
   lead lacks means no fit. A rule that sets nothing is treated as no rule. One available
   match gets the lead; several share it by weighted round robin (weight-0 reps only
   when no matching rep has a weight).
3. Weighted round robin over the pool: the reps without a rule (`rules_then_round_robin`)
   or every rep (`round_robin`); when that pool is empty or nobody in it is available,
   every available rep, so a prospect is not left without a rep while someone could take
   it. Weight-0 reps never take round-robin leads.

Available means not away and under the daily cap. A rep is away while today (the UTC date
of `now`) is before `away_until`, and back ON `away_until`. The daily cap counts the
prospects assigned to the rep today (UTC), from the `rep_assignments` counters that
`note_assignment` keeps beside each "assigned" event.

Weighted round robin picks the available rep with the fewest assignments (all time, from
the same counters) per unit of weight; ties go to the earlier rep in the
config. Over time each rep's share is proportional to their weight. A rep who was away or
newly added catches up by taking the next leads (bounded by their daily cap, if any).
"""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from fractions import Fraction

from sqlalchemy import Select, bindparam, func, literal, select
from sqlalchemy.orm import Session

from worker.config import Config, Rep, RepMatch
from worker.db import core, fetch
from worker.models import Lead, RepAssignments, company_key

# Addresses at these domains belong to people, not companies: sharing one says nothing.
CONSUMER_DOMAINS = frozenset(
    {
        "gmail.com", "googlemail.com", "yahoo.com", "yahoo.co.uk", "yahoo.fr", "yahoo.es",
        "ymail.com", "hotmail.com", "hotmail.co.uk", "hotmail.fr", "hotmail.es", "outlook.com",
        "live.com", "msn.com", "icloud.com", "me.com", "mac.com", "aol.com", "proton.me",
        "protonmail.com", "pm.me", "gmx.com", "gmx.de", "gmx.net", "web.de", "t-online.de",
        "mail.com", "mail.ru", "yandex.ru", "yandex.com", "qq.com", "163.com", "126.com",
        "fastmail.com", "hey.com", "zoho.com", "libero.it", "orange.fr", "free.fr", "wanadoo.fr",
    }
)  # fmt: skip
# Company names people type when they have none; they do not make an account either.
PLACEHOLDER_COMPANIES = frozenset(
    {"", "-", "n/a", "na", "none", "private", "personal", "self", "self-employed",
     "self employed", "freelance", "freelancer", "independent", "student", "retired"}
)  # fmt: skip


@dataclass(frozen=True)
class Assignment:
    """The chosen rep, or None when nobody can take the lead; `reason` says why either way,
    including the reps that were passed over ("Ana Lopez skipped: away until 2026-12-10")."""

    rep: Rep | None
    reason: str


def assign(
    session: Session,
    lead: Lead,
    config: Config,
    now: datetime,
    exclude: frozenset[str] = frozenset(),
) -> Assignment:
    """Choose the rep for `lead` at `now` by the rules in the module docstring.

    Reads only; writes nothing and never flushes on purpose (the caller records the
    assignment). `lead` may already be in the database or not. Reps in `exclude` (their
    addresses) are not considered: an escalation reassigns to the next eligible rep.
    """
    reps = tuple(r for r in config.reps if r.email not in exclude)
    if not reps:
        return Assignment(None, "no reps configured")
    state = _State(session, reps, now.astimezone(UTC).date())
    notes: list[str] = []

    current = _rep_by_email(reps, lead.owner)
    if current is not None:
        why = state.away(current)
        if why is None:
            return Assignment(current, f"already owned by {current.name}")
        notes.append(f"owner {current.name} skipped: {why}")
        state.noted.add(current.email)

    account = _account_owner(session, lead, reps)
    if account is not None:
        rep, what = account
        why = state.away(rep)
        if why is None:
            return Assignment(rep, f"company {what} already owned by {rep.name}")
        if rep is not current:
            notes.append(f"company {what} owned by {rep.name}, skipped: {why}")
            state.noted.add(rep.email)

    if config.assignment == "rules_then_round_robin":
        matched = [(rep, fit) for rep in reps if (fit := _rule_fit(rep.match, lead)) is not None]
        available = [rep for rep, _ in matched if state.available(rep, notes)]
        if available:
            fits = {rep.email: fit for rep, fit in matched}
            weighted = [r for r in available if r.weight > 0]
            if len(available) == 1 or not weighted:
                rep = available[0]
                return _done(rep, f"rule: {fits[rep.email]} matches {rep.name}", notes)
            rep, rr = state.round_robin(weighted)
            return _done(rep, f"rule: {fits[rep.email]} matches {rep.name}; {rr}", notes)
        pool = [rep for rep in reps if not _has_rule(rep.match)]
    else:
        pool = list(reps)

    candidates = [rep for rep in pool if rep.weight > 0 and state.available(rep, notes)]
    if not candidates:
        candidates = [rep for rep in reps if rep.weight > 0 and state.available(rep, notes)]
    if candidates:
        rep, rr = state.round_robin(candidates)
        return _done(rep, rr, notes)
    if not any(rep.weight > 0 for rep in reps):
        notes.append("every rep has weight 0")
    return Assignment(None, "no rep available: " + "; ".join(notes or ["no eligible rep"]))


def _done(rep: Rep, reason: str, notes: list[str]) -> Assignment:
    return Assignment(rep, "; ".join([*notes, reason]))


def _rep_by_email(reps: Sequence[Rep], email: str | None) -> Rep | None:
    if not email:
        return None
    wanted = email.strip().lower()
    return next((rep for rep in reps if rep.email == wanted), None)


# --- account ownership ------------------------------------------------------------------


@functools.cache
def _owned_like(column: str, emails: tuple[str, ...]) -> Select[datetime, int, str | None]:
    """The most recently updated lead owned by one of the reps (`emails`) that shares
    `column` with the lead (`value`), the lead itself (`lead_id`) excepted. Built once a
    rep list: it runs for every promotion, and building one, or expanding a list
    parameter, costs what running it does."""
    return (
        select(Lead.updated_at, Lead.id, Lead.owner)
        .where(
            getattr(Lead, column) == bindparam("value"),
            Lead.owner.in_([literal(e) for e in emails]),
            Lead.id != bindparam("lead_id"),
        )
        .order_by(Lead.updated_at.desc(), Lead.id.desc())
        .limit(1)
    )


def _account_owner(session: Session, lead: Lead, reps: Sequence[Rep]) -> tuple[Rep, str] | None:
    """The configured rep who owns the lead's company, and how the company was recognised
    (its domain, or its name in quotes); None when no owned lead shares either.

    Two indexed lookups (domain, owner) and (company_key, owner), each reading only the
    company's leads owned by a configured rep, however many leads the company has.
    """
    domain = (lead.domain or lead.email.rsplit("@", 1)[-1]).strip().lower()
    company = (lead.company or "").strip()
    key = company_key(company)
    found: list[tuple[datetime, int, str, str]] = []
    lookups: list[tuple[str, str, str]] = []
    if domain and domain not in CONSUMER_DOMAINS:
        lookups.append(("domain", domain, domain))
    if key is not None and company.casefold() not in PLACEHOLDER_COMPANIES:
        lookups.append(("company_key", key, repr(company)))
    conn = core(session)
    emails = tuple(rep.email for rep in reps)
    for column, value, what in lookups:
        # A lead not in the database yet has no id: 0 is nobody's (ids start at 1).
        params = {"value": value, "lead_id": lead.id or 0}
        for updated_at, lead_id, owner in fetch(conn, _owned_like(column, emails), params):
            if owner is not None:
                found.append((updated_at, lead_id, owner, what))
    if not found:
        return None
    # The most recently updated owned lead decides; the domain wins a tie.
    _at, _id, owner, what = max(found, key=lambda f: (f[0], f[1]))
    rep = _rep_by_email(reps, owner)
    return (rep, what) if rep is not None else None


_PENDING = "twoway.rep_assignments"


def note_assignment(session: Session, rep_email: str, now: datetime) -> None:
    """Count one prospect assigned to `rep_email` today (UTC), in the caller's transaction.

    The caller records the "assigned" event too; round robin and daily caps read these
    counters. The increment is kept in the session and written just before its commit
    (`write_assignments`), so a long transaction (a batch of inbound mail) holds the
    counter rows, which every worker shares, only for that instant, and always in the
    same order (no deadlock between two workers' batches). Reads in the same
    transaction see it at once.
    """
    pending: Counter[tuple[str, date]] = session.info.setdefault(_PENDING, Counter())
    pending[(rep_email, now.astimezone(UTC).date())] += 1


def write_assignments(session: Session) -> None:
    """Write the increments `note_assignment` kept (upserts in (rep, day) order)."""
    pending: Counter[tuple[str, date]] | None = session.info.pop(_PENDING, None)
    if not pending:
        return
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as upsert
    else:
        from sqlalchemy.dialects.sqlite import insert as upsert  # type: ignore[assignment]
    for (rep, day), n in sorted(pending.items()):
        stmt = upsert(RepAssignments).values(rep=rep, day=day, assigned=n)
        session.execute(
            stmt.on_conflict_do_update(
                index_elements=["rep", "day"], set_={"assigned": RepAssignments.assigned + n}
            )
        )


def _pending(session: Session) -> Counter[tuple[str, date]]:
    found: Counter[tuple[str, date]] = session.info.get(_PENDING) or Counter()
    return found


# --- rules ------------------------------------------------------------------------------


def _has_rule(match: RepMatch | None) -> bool:
    return match is not None and bool(
        match.countries
        or match.industries
        or match.min_company_size is not None
        or match.max_company_size is not None
    )


def _rule_fit(match: RepMatch | None, lead: Lead) -> str | None:
    """Why `match` fits `lead` ("country ES, industry software"), or None when it does not
    (or sets nothing)."""
    if match is None or not _has_rule(match):
        return None
    parts: list[str] = []
    if match.countries:
        country = (lead.country or "").strip().upper()
        if not country or country not in {c.strip().upper() for c in match.countries}:
            return None
        parts.append(f"country {country}")
    if match.industries:
        industry = (lead.industry or "").strip()
        if not industry or industry.casefold() not in {
            i.strip().casefold() for i in match.industries
        }:
            return None
        parts.append(f"industry {industry}")
    low, high = match.min_company_size, match.max_company_size
    if low is not None or high is not None:
        size = lead.company_size
        if size is None or (low is not None and size < low) or (high is not None and size > high):
            return None
        bounds = f"{low if low is not None else 0}..{high if high is not None else '∞'}"
        parts.append(f"company size {size} within {bounds}")
    return ", ".join(parts)


# --- availability and round robin -------------------------------------------------------


_TODAY = (
    select(RepAssignments.rep, RepAssignments.assigned)
    .where(RepAssignments.day == bindparam("day"))
    .where(RepAssignments.rep.in_(bindparam("reps", expanding=True)))
)
_TOTALS = (
    select(RepAssignments.rep, func.sum(RepAssignments.assigned))
    .where(RepAssignments.rep.in_(bindparam("reps", expanding=True)))
    .group_by(RepAssignments.rep)
)
_READ = "twoway.rep_counters_read"


def _read_once(
    session: Session, query: Select[str, int], reps: Sequence[Rep], today: date
) -> dict[str, int]:
    """The reps' counters as `query` reads them from the database, once a transaction
    (an inbound batch promotes hundreds of leads): until this unit of work commits, only
    its own increments change them for it, and those are kept apart (`_pending`). On
    PostgreSQL, another worker's batch committed meanwhile is counted from this worker's
    next transaction, about a second later; each worker's own batch is invisible to the
    others until it commits, whether or not this is cached."""
    txn = session.get_transaction()
    held: tuple[object, dict[tuple[object, ...], dict[str, int]]] | None = session.info.get(_READ)
    if held is None or held[0] is not txn:
        held = session.info[_READ] = (txn, {})
    emails = tuple(r.email for r in reps)
    found = held[1].get((query, emails, today))
    if found is None:
        rows = session.execute(query, {"day": today, "reps": list(emails)})
        found = held[1][(query, emails, today)] = {rep: int(n or 0) for rep, n in rows}
    return found


class _State:
    """Per-call view of the reps' absence and load, read from the database once."""

    def __init__(self, session: Session, reps: Sequence[Rep], today: date) -> None:
        self.session = session
        self.reps = reps
        self.today = today
        self._today_counts: dict[str, int] | None = None
        self._totals: dict[str, int] | None = None
        self.noted: set[str] = set()  # reps whose absence is already in the reason

    def away(self, rep: Rep) -> str | None:
        """Why `rep` is away today, or None when they are in."""
        if rep.away_until is not None and self.today < rep.away_until:
            return f"away until {rep.away_until.isoformat()}"
        return None

    def available(self, rep: Rep, notes: list[str]) -> bool:
        """Whether `rep` can take a new lead today; when not, add the reason to `notes`
        (once per rep)."""
        why = self.away(rep)
        if why is None and rep.daily_cap is not None:
            taken = self.today_counts().get(rep.email, 0)
            if taken >= rep.daily_cap:
                why = f"daily cap {rep.daily_cap} reached"
        if why is not None and rep.email not in self.noted:
            self.noted.add(rep.email)
            notes.append(f"{rep.name} skipped: {why}")
        return why is None

    def today_counts(self) -> dict[str, int]:
        if self._today_counts is None:
            counts = dict(_read_once(self.session, _TODAY, self.reps, self.today))
            for (rep, day), n in _pending(self.session).items():
                if day == self.today:
                    counts[rep] = counts.get(rep, 0) + n
            self._today_counts = counts
        return self._today_counts

    def totals(self) -> dict[str, int]:
        if self._totals is None:
            totals = dict(_read_once(self.session, _TOTALS, self.reps, self.today))
            for (rep, _day), n in _pending(self.session).items():
                totals[rep] = totals.get(rep, 0) + n
            self._totals = totals
        return self._totals

    def round_robin(self, candidates: Sequence[Rep]) -> tuple[Rep, str]:
        """The candidate (all with weight > 0) furthest behind their weighted share, and
        the reason text."""
        totals = self.totals()
        order = {rep.email: i for i, rep in enumerate(self.reps)}
        rep = min(
            candidates,
            key=lambda r: (Fraction(totals.get(r.email, 0), r.weight), order[r.email]),
        )
        whole = sum(r.weight for r in candidates)
        names = ", ".join(r.name for r in candidates)
        return rep, f"round-robin (weight {rep.weight} of {whole}) among {names}"
