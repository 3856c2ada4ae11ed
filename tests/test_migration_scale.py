"""Migration 0004_scale upgrades a database made by the revision before it, keeping data."""

from __future__ import annotations

import json
from datetime import datetime

from alembic import command
from alembic.script import ScriptDirectory
from sqlalchemy import inspect, text

from worker import db


def test_it_upgrades_the_previous_revision_s_database_keeping_accounts_and_assignment_history(
    database_url: str,
) -> None:
    engine = db.make_engine(database_url)
    previous = ScriptDirectory(str(db.MIGRATIONS)).get_revision("0004_scale").down_revision
    assert isinstance(previous, str)
    command.upgrade(db._alembic_config(engine), previous)
    at = datetime(2026, 11, 30, 9, 0)
    with engine.begin() as conn:
        for i, (company, owner) in enumerate(
            [("  Acme   Corp ", "ana@example.com"), ("ACME corp", None), (None, None)]
        ):
            conn.execute(
                text(
                    "INSERT INTO leads (id, email, company, custom, status, owner, reply_token,"
                    " domain, created_at, updated_at) VALUES (:id, :email, :company, '{}',"
                    " 'lead', :owner, :token, 'acme.example', :at, :at)"
                ),
                {"id": i + 1, "email": f"p{i}@acme.example", "company": company,
                 "owner": owner, "token": f"tok{i}", "at": at},
            )  # fmt: skip
        for day, rep in [(30, "ana@example.com"), (30, "ana@example.com"), (29, "ben@example.com")]:
            conn.execute(
                text(
                    "INSERT INTO lead_events (lead_id, at, type, cause, detail)"
                    " VALUES (1, :at, 'assigned', 'rule', :detail)"
                ),
                {"at": datetime(2026, 11, day, 12), "detail": json.dumps({"rep": rep})},
            )

    db.upgrade(engine)

    assert db.current_revision(engine) == db.head_revision()
    with engine.connect() as conn:
        keys = conn.execute(text("SELECT id, company_key FROM leads ORDER BY id")).all()
        counters = conn.execute(
            text("SELECT rep, day, assigned FROM rep_assignments ORDER BY rep, day")
        ).all()
    assert [tuple(k) for k in keys] == [(1, "acme corp"), (2, "acme corp"), (3, None)]
    assert [(rep, str(day)[:10], n) for rep, day, n in counters] == [
        ("ana@example.com", "2026-11-30", 2),
        ("ben@example.com", "2026-11-29", 1),
    ]
    names = {i["name"] for t in ("leads", "lead_events") for i in inspect(engine).get_indexes(t)}
    assert {
        "ix_leads_company_key_owner",
        "ix_leads_domain_owner",
        "ix_lead_events_lead_type",
    } <= names
    engine.dispose()
