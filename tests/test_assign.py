"""Assignment of new prospects to reps, on SQLite and PostgreSQL.

The lifecycle records each assignment (owner and an "assigned" event); these tests play
that part with `record`, so the next assignment sees the state a worker would see.
"""

from __future__ import annotations

import secrets
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from tests.conftest import base_config
from worker.app import App
from worker.assign import Assignment, assign, note_assignment
from worker.config import Config
from worker.models import Lead, LeadEvent

NOW = datetime(2026, 12, 1, 10, 0, tzinfo=UTC)


def add_lead(session: Session, email: str, at: datetime = NOW, **fields: Any) -> Lead:
    lead = Lead(
        email=email,
        domain=email.rsplit("@", 1)[1],
        reply_token=secrets.token_hex(8),
        status="lead",
        custom={},
        created_at=at,
        updated_at=at,
        **fields,
    )
    session.add(lead)
    session.flush()
    return lead


def record(session: Session, lead: Lead, assignment: Assignment, at: datetime = NOW) -> None:
    """What the lifecycle does with an assignment."""
    assert assignment.rep is not None, assignment.reason
    lead.owner = assignment.rep.email
    lead.updated_at = at
    session.add(
        LeadEvent(
            lead_id=lead.id,
            at=at,
            type="assigned",
            cause=assignment.reason,
            detail={"rep": assignment.rep.email, "reason": assignment.reason},
        )
    )
    note_assignment(session, assignment.rep.email, at)
    session.flush()


def assign_new(
    app: App, config: Config, email: str, at: datetime = NOW, **fields: Any
) -> Assignment:
    """A new prospect arrives and is assigned and recorded in one transaction."""
    with app.transaction() as session:
        lead = add_lead(session, email, at, **fields)
        result = assign(session, lead, config, at)
        if result.rep is not None:
            record(session, lead, result, at)
        return result


def rep_of(result: Assignment) -> str | None:
    return None if result.rep is None else result.rep.name


def with_reps(app: App, tmp_path: Path, reps: list[dict[str, Any]], **extra: Any) -> Config:
    return base_config(app.config.database, tmp_path, reps=reps, **extra)


def test_it_gives_a_lead_in_a_rep_territory_to_that_rep(app: App) -> None:
    result = assign_new(app, app.config, "rosa@tienda.example", country="ES", industry="retail")

    assert rep_of(result) == "Ana Lopez"
    assert result.reason == "rule: country ES matches Ana Lopez"


def test_it_gives_a_lead_in_a_rep_industry_to_that_rep(app: App) -> None:
    result = assign_new(app, app.config, "kai@code.example", country="DE", industry="Software")

    assert rep_of(result) == "Ben Okafor"
    assert result.reason == "rule: industry Software matches Ben Okafor"


def test_it_gives_a_lead_no_rule_matches_to_the_pool(app: App) -> None:
    result = assign_new(app, app.config, "li@farm.example", country="DE", industry="agriculture")
    unknown = assign_new(app, app.config, "x@unknown.example")  # no facts: no rule fits

    assert rep_of(result) == "Chloe Martin"
    assert result.reason == "round-robin (weight 1 of 1) among Chloe Martin"
    assert rep_of(unknown) == "Chloe Martin"


def test_it_needs_every_part_of_a_rule_to_match(app: App, tmp_path: Path) -> None:
    config = with_reps(
        app,
        tmp_path,
        [
            {
                "name": "Ana Lopez",
                "email": "ana@example.com",
                "match": {"countries": ["ES"], "min_company_size": 100, "max_company_size": 999},
            },
            {"name": "Chloe Martin", "email": "chloe@example.com"},
        ],
    )
    small = assign_new(app, config, "a@small.example", country="ES", company_size=20)
    unknown_size = assign_new(app, config, "b@nosize.example", country="ES")
    fits = assign_new(app, config, "c@mid.example", country="es", company_size=100)

    assert rep_of(small) == "Chloe Martin"
    assert rep_of(unknown_size) == "Chloe Martin"
    assert rep_of(fits) == "Ana Lopez"
    assert fits.reason == "rule: country ES, company size 100 within 100..999 matches Ana Lopez"


def test_it_keeps_a_company_with_the_rep_who_owns_it(app: App) -> None:
    with app.transaction() as session:
        add_lead(session, "old@acme.example", NOW - timedelta(days=9), owner="ana@example.com")
        add_lead(session, "boss@acme.example", NOW - timedelta(days=2), owner="ben@example.com")
        add_lead(session, "ex@acme.example", NOW - timedelta(days=1), owner="gone@example.com")
        add_lead(session, "eve@othermail.example", company="Globex", owner="chloe@example.com")

    # Spain would go to Ana, but Ben holds the account (the most recent owner still a rep).
    same_domain = assign_new(app, app.config, "new@acme.example", country="ES")
    same_name = assign_new(app, app.config, "joe@globex.example", company="  GLOBEX ", country="ES")

    assert rep_of(same_domain) == "Ben Okafor"
    assert same_domain.reason == "company acme.example already owned by Ben Okafor"
    assert rep_of(same_name) == "Chloe Martin"
    assert same_name.reason == "company 'GLOBEX' already owned by Chloe Martin"


def test_it_does_not_treat_a_free_mail_domain_as_a_company(app: App) -> None:
    with app.transaction() as session:
        add_lead(session, "someone@gmail.com", owner="chloe@example.com", company="n/a")

    result = assign_new(app, app.config, "other@gmail.com", country="ES", company="N/A")

    assert rep_of(result) == "Ana Lopez"


def test_it_skips_an_away_rep_and_says_so(app: App, tmp_path: Path) -> None:
    config = with_reps(
        app,
        tmp_path,
        [
            {
                "name": "Ana Lopez",
                "email": "ana@example.com",
                "away_until": "2026-12-10",
                "match": {"countries": ["ES"]},
            },
            {"name": "Chloe Martin", "email": "chloe@example.com"},
        ],
    )
    while_away = assign_new(app, config, "a@es1.example", country="ES")
    back = assign_new(
        app, config, "b@es2.example", datetime(2026, 12, 10, 8, 0, tzinfo=UTC), country="ES"
    )

    assert rep_of(while_away) == "Chloe Martin"
    assert while_away.reason == (
        "Ana Lopez skipped: away until 2026-12-10; round-robin (weight 1 of 1) among Chloe Martin"
    )
    assert rep_of(back) == "Ana Lopez"  # back on the day itself


def test_it_does_not_keep_an_account_with_an_away_owner(app: App, tmp_path: Path) -> None:
    config = with_reps(
        app,
        tmp_path,
        [
            {"name": "Ben Okafor", "email": "ben@example.com", "away_until": "2026-12-05"},
            {"name": "Chloe Martin", "email": "chloe@example.com"},
        ],
        assignment="round_robin",
    )
    with app.transaction() as session:
        add_lead(session, "boss@acme.example", owner="ben@example.com")

    result = assign_new(app, config, "new@acme.example")

    assert rep_of(result) == "Chloe Martin"
    assert result.reason == (
        "company acme.example owned by Ben Okafor, skipped: away until 2026-12-05; "
        "round-robin (weight 1 of 1) among Chloe Martin"
    )


def test_it_respects_the_daily_cap(app: App, tmp_path: Path) -> None:
    config = with_reps(
        app,
        tmp_path,
        [
            {
                "name": "Ana Lopez",
                "email": "ana@example.com",
                "daily_cap": 2,
                "match": {"countries": ["ES"]},
            },
            {"name": "Chloe Martin", "email": "chloe@example.com"},
        ],
    )
    # Yesterday's assignments do not count towards today's cap.
    yesterday = assign_new(app, config, "y@es0.example", NOW - timedelta(days=1), country="ES")
    today = [
        assign_new(app, config, f"p@es{i}.example", NOW + timedelta(minutes=i), country="ES")
        for i in range(1, 4)
    ]
    tomorrow = assign_new(app, config, "t@es9.example", NOW + timedelta(days=1), country="ES")

    assert rep_of(yesterday) == "Ana Lopez"
    assert [rep_of(r) for r in today] == ["Ana Lopez", "Ana Lopez", "Chloe Martin"]
    assert today[2].reason.startswith("Ana Lopez skipped: daily cap 2 reached; ")
    assert rep_of(tomorrow) == "Ana Lopez"


def test_it_keeps_an_account_together_above_the_cap(app: App, tmp_path: Path) -> None:
    config = with_reps(
        app,
        tmp_path,
        [
            {"name": "Ben Okafor", "email": "ben@example.com", "daily_cap": 1},
            {"name": "Chloe Martin", "email": "chloe@example.com", "weight": 0},
        ],
        assignment="round_robin",
    )
    first = assign_new(app, config, "a@acme.example")
    second = assign_new(app, config, "b@acme.example")
    elsewhere = assign_new(app, config, "c@globex.example")

    assert rep_of(first) == "Ben Okafor"
    assert rep_of(second) == "Ben Okafor"
    assert second.reason == "company acme.example already owned by Ben Okafor"
    assert elsewhere.rep is None  # Ben is over his cap and Chloe takes no round robin
    assert "Ben Okafor skipped: daily cap 1 reached" in elsewhere.reason


def test_it_shares_round_robin_by_weight(app: App, tmp_path: Path) -> None:
    config = with_reps(
        app,
        tmp_path,
        [
            {"name": "Ben Okafor", "email": "ben@example.com", "weight": 2},
            {"name": "Chloe Martin", "email": "chloe@example.com", "weight": 1},
        ],
        assignment="round_robin",
    )
    names = [
        rep_of(assign_new(app, config, f"lead{i}@company{i}.example", NOW + timedelta(minutes=i)))
        for i in range(30)
    ]

    assert Counter(names) == {"Ben Okafor": 20, "Chloe Martin": 10}
    assert names[:6] == ["Ben Okafor", "Chloe Martin", "Ben Okafor"] * 2  # spread, not bunched
    with app.transaction() as session:
        owners = Counter(session.scalars(select(Lead.owner)))
    assert owners == {"ben@example.com": 20, "chloe@example.com": 10}


def test_it_gives_nobody_when_every_rep_is_away(app: App, tmp_path: Path) -> None:
    config = with_reps(
        app,
        tmp_path,
        [
            {"name": "Ana Lopez", "email": "ana@example.com", "away_until": "2026-12-02",
             "match": {"countries": ["ES"]}},
            {"name": "Chloe Martin", "email": "chloe@example.com", "away_until": "2027-01-04"},
        ],
    )  # fmt: skip
    with app.transaction() as session:
        lead = add_lead(session, "a@es.example", country="ES")
        result = assign(session, lead, config, NOW)
        events = session.scalar(select(func.count()).select_from(LeadEvent))

    assert result.rep is None
    assert result.reason == (
        "no rep available: Ana Lopez skipped: away until 2026-12-02; "
        "Chloe Martin skipped: away until 2027-01-04"
    )
    assert events == 0  # assign only reads


def test_it_gives_nobody_without_reps(app: App, tmp_path: Path) -> None:
    config = with_reps(app, tmp_path, [])

    result = assign_new(app, config, "a@b.example")

    assert result == Assignment(None, "no reps configured")


def test_it_keeps_a_lead_with_the_rep_who_already_owns_it(app: App) -> None:
    with app.transaction() as session:
        lead = add_lead(session, "kai@code.example", industry="software", owner="chloe@example.com")
        result = assign(session, lead, app.config, NOW)

    assert rep_of(result) == "Chloe Martin"
    assert result.reason == "already owned by Chloe Martin"


def test_it_lends_the_pool_lead_to_the_other_reps_when_the_pool_is_away(
    app: App, tmp_path: Path
) -> None:
    config = with_reps(
        app,
        tmp_path,
        [
            {"name": "Ana Lopez", "email": "ana@example.com", "match": {"countries": ["ES"]}},
            {"name": "Ben Okafor", "email": "ben@example.com", "match": {"industries": ["saas"]}},
            {"name": "Chloe Martin", "email": "chloe@example.com", "away_until": "2026-12-03"},
        ],
    )
    result = assign_new(app, config, "li@farm.example", country="DE")

    assert rep_of(result) == "Ana Lopez"
    assert result.reason == (
        "Chloe Martin skipped: away until 2026-12-03; "
        "round-robin (weight 1 of 2) among Ana Lopez, Ben Okafor"
    )


def test_promotions_in_one_transaction_share_the_round_robin_and_the_caps(
    app: App, tmp_path: Path
) -> None:
    # An inbound batch promotes many leads in one transaction: the counters are read
    # once for it, and each assignment it makes counts for the next one.
    config = with_reps(
        app,
        tmp_path,
        [
            {"name": "Ben Okafor", "email": "ben@example.com", "daily_cap": 2},
            {"name": "Chloe Martin", "email": "chloe@example.com"},
        ],
        assignment="round_robin",
    )

    def batch(emails: list[str]) -> list[Assignment]:
        out = []
        with app.transaction() as session:
            for email in emails:
                lead = add_lead(session, email)
                out.append(assign(session, lead, config, NOW))
                record(session, lead, out[-1])
        return out

    first = batch([f"p{i}@co{i}.example" for i in range(4)])
    second = batch([f"q{i}@other{i}.example" for i in range(2)])

    assert [rep_of(r) for r in first] == ["Ben Okafor", "Chloe Martin"] * 2
    assert [rep_of(r) for r in second] == ["Chloe Martin", "Chloe Martin"]
    assert all(r.reason.startswith("Ben Okafor skipped: daily cap 2 reached") for r in second)
