"""The send path's statements find their rows by primary key after a bulk enrollment.

A campaign's first steps for thousands of leads arrive as thousands of new outbox rows at
once, while the planner's statistics still describe the small outbox of before (here: an
empty one, analysed as `leads import` of a first small file would leave it). Planned
from those, PostgreSQL found each claimed row through the status index, reading every
queued row for every claim. `queue_due` refreshes the statistics after such a bulk: each
statement the claim and the outcome send is then explained by the database itself and
must look up `outbound_messages` and `leads` by their primary keys, never scan them.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Select, Update, select

from tests.conftest import base_config
from worker.app import App
from worker.db import _for_driver, refresh_statistics
from worker.leads import import_leads
from worker.models import OutboundMessage
from worker.outbox import _claim_sql, _sent_and_claim_sql, _sent_sql
from worker.sequences import STATS_AFTER, queue_due

NOW = datetime(2026, 12, 7, 10, 0, tzinfo=UTC)


def plan(conn: Connection, stmt: Update | Select[Any], values: dict[str, Any]) -> str:
    """The database's own plan of `stmt` as the send path sends it (its driver SQL)."""
    prebuilt = _for_driver(stmt, conn.dialect)
    assert prebuilt is not None
    sql, params = prebuilt
    explain = "EXPLAIN QUERY PLAN " if conn.dialect.name == "sqlite" else "EXPLAIN "
    rows = conn.exec_driver_sql(explain + sql, params(values)).all()
    conn.rollback()
    return "\n".join(str(r[-1]) for r in rows)


def test_claims_and_outcomes_use_primary_keys_after_a_bulk_enrollment(
    database_url: str, tmp_path: Path
) -> None:
    config = base_config(database_url, tmp_path)
    app = App.open(config, lambda: NOW)
    refresh_statistics(app.engine)  # statistics of an empty database
    n = STATS_AFTER + 200
    with app.transaction() as s:
        rows = [(i + 2, {"email": f"lead{i}@company{i}.example.org"}) for i in range(n)]
        import_leads(s, rows, NOW, campaign=config.campaign("welcome"))
    assert queue_due(app) == n
    with app.transaction() as s:
        row_id = s.scalars(select(OutboundMessage.id).order_by(OutboundMessage.id.desc())).first()
    claim = _claim_sql("nurture", app.engine.dialect.name != "sqlite")
    values = {
        "row_id": row_id, "tries": 0, "held": NOW, "addr": "lead1@company1.example.org",
        "at_domain": "@company1.example.org", "tried": 1, "subj": "Welcome",
        "lease": NOW + timedelta(minutes=5), "sent_id": 1, "sent_at": NOW, "at": NOW,
    }  # fmt: skip
    statements: list[Update | Select[Any]] = [claim, _sent_sql()]
    if app.engine.dialect.name == "postgresql":
        statements.append(_sent_and_claim_sql(claim))
    with app.engine.connect() as conn:
        for stmt in statements:
            got = plan(conn, stmt, values)
            if conn.dialect.name == "sqlite":
                assert "SCAN outbound_messages" not in got and "SCAN leads" not in got, got
                assert "USING INTEGER PRIMARY KEY" in got, got
                continue
            assert "Seq Scan on outbound_messages" not in got, got
            assert "ix_outbound_queue" not in got and "ix_leads_status" not in got, got
            assert "outbound_messages_pkey" in got, got
            if stmt is not _sent_sql():
                assert "leads_pkey" in got, got
    app.close()
