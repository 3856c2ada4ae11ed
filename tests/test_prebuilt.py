"""`db.run`: a prebuilt statement sent as driver SQL sends what SQLAlchemy's own
execution sends (the same SQL and parameters, types converted alike), on SQLite and on
PostgreSQL, and changes the same rows; `db.fetch` reads the same values back."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Insert, Select, Update, event, select, update

from tests.conftest import base_config
from worker.app import App
from worker.assign import _owned_like
from worker.db import _insert_returning, add_new, fetch, run, write_changes
from worker.leads import _CANCEL_QUEUED, _STOP_NURTURE, import_leads
from worker.lifecycle import (
    _BOUNCED_TO,
    _LAST_RESET,
    _PAUSE,
    _SAME_DOMAIN,
    _SOFT_SINCE,
    _colleagues,
    _own_colleagues,
    _pause_for_account,
)
from worker.models import Enrollment, InboundMessage, Lead, LeadEvent, LeadStatus, OutboundMessage
from worker.outbox import _claim_sql, _sent_sql, enqueue
from worker.webhooks import _FIRST_CAMPAIGN, _LATEST_SOURCE, _SOURCE_BY_ID

NOW = datetime(2026, 12, 1, 10, 0, tzinfo=UTC)


def _sent(app: App, stmt: Insert | Update, values: dict[str, Any], fast: bool) -> Any:
    seen: list[tuple[str, Any]] = []

    def record(_c: Any, _cur: Any, sql: str, params: Any, _ctx: Any, _many: bool) -> None:
        seen.append((sql, params))

    event.listen(app.engine, "before_cursor_execute", record)
    try:
        with app.engine.connect() as conn:  # rolled back: each side sees the same rows
            result = run(conn, stmt, values) if fast else conn.execute(stmt, values)
            # a RETURNING's row count (PostgreSQL's sequence is not rolled back), else rowcount
            rows = len(result.all()) if result.returns_rows else result.rowcount
            conn.rollback()
    finally:
        event.remove(app.engine, "before_cursor_execute", record)
    return seen, rows


def _plain(params: Any) -> Any:
    """Parameters as comparable values: a driver's binary wrapper as its bytes."""
    items = params.items() if isinstance(params, dict) else enumerate(params)
    return {k: bytes(v) if isinstance(v, memoryview | bytes) else repr(v) for k, v in items}


def _leads_with_a_queued_email(
    app: App, rows: list[tuple[int, dict[str, str]]]
) -> tuple[list[int], int]:
    """Import `rows` into the first campaign and queue its first step to the first lead:
    the leads' ids, in order, and the queued row's id."""
    with app.transaction() as s:
        import_leads(s, rows, NOW, campaign=app.config.campaigns[0])
    with app.transaction() as s:
        ids = sorted(s.scalars(select(Lead.id)))
        enrollment = s.scalars(select(Enrollment.id).where(Enrollment.lead_id == ids[0])).one()
        row = enqueue(
            s, app.config, "nurture", "nurture:1:0", s.get_one(Lead, ids[0]), "welcome", NOW,
            enrollment_id=enrollment, campaign="welcome", step=0,
        )  # fmt: skip
        assert row is not None
        s.flush()
        return ids, row.id


def test_prebuilt_statements_send_what_sqlalchemy_sends(database_url: str, tmp_path: Any) -> None:
    app = App.open(base_config(database_url, tmp_path), lambda: NOW)
    (lead,), row_id = _leads_with_a_queued_email(app, [(2, {"email": "a@x.example"})])
    message = {
        "mailbox": "sales", "folder": "INBOX", "uidvalidity": 1, "uid": 7, "message_id": "m@x",
        "from_addr": "a@x.example", "sent_date": NOW, "kind": "reply",
        "bounce": {"status": "5.1.1"}, "lead_id": lead, "raw": b"From: a\r\n\r\nhi",
        "received_at": NOW,
    }  # fmt: skip
    cases: list[tuple[Insert | Update, dict[str, Any]]] = [
        (_STOP_NURTURE, {"lead": lead, "at": NOW}),
        (_CANCEL_QUEUED, {"lead": lead, "of_kind": "nurture", "why": "asked to stop"}),
        (_PAUSE, {"lead": lead, "until": NOW, "at": NOW}),
        (_insert_returning(InboundMessage, frozenset(message)), message),
        (_pause_for_account(2), {"id0": lead, "id1": lead + 1, "at": NOW}),
        (_own_colleagues(1), {"id0": lead, "rep": "ana@example.com", "at": NOW}),
        # The send path's claim and outcome; values a statement does not name (`held`
        # without a reservation) are ignored, as SQLAlchemy ignores them.
        (_claim_sql("nurture", False), {
            "row_id": row_id, "tries": 0, "held": None, "addr": "a@x.example",
            "at_domain": "@x.example", "tried": 1, "subj": "Hello", "lease": NOW,
        }),
    ]  # fmt: skip
    for stmt, values in cases:
        core, core_rows = _sent(app, stmt, values, fast=False)
        fast, fast_rows = _sent(app, stmt, values, fast=True)
        assert [sql for sql, _ in fast] == [sql for sql, _ in core]
        assert [_plain(p) for _, p in fast] == [_plain(p) for _, p in core]
        assert fast_rows == core_rows == 1, stmt  # the same one row changed
    with app.engine.begin() as conn:  # claimed: its outcome can be written
        assert run(conn, cases[-1][0], cases[-1][1]).rowcount == 1
    core, core_rows = _sent(app, _sent_sql(), {"row_id": row_id, "at": NOW, "unused": 1}, False)
    fast, fast_rows = _sent(app, _sent_sql(), {"row_id": row_id, "at": NOW, "unused": 1}, True)
    assert [_plain(p) for _, p in fast] == [_plain(p) for _, p in core]
    assert fast_rows == core_rows == 1
    app.close()


def test_a_column_default_computed_in_python_is_applied(database_url: str, tmp_path: Any) -> None:
    """`lead_events.detail` defaults to {} in Python, not in the database: a row written
    without it (by `add_new`) must get {} (the statement goes the ORM's way), not NULL."""
    app = App.open(base_config(database_url, tmp_path), lambda: NOW)
    with app.transaction() as s:
        import_leads(s, [(2, {"email": "a@x.example"})], NOW)
    with app.transaction() as s:
        lead = s.scalars(select(Lead.id)).one()
        event_row = add_new(s, LeadEvent, lead_id=lead, at=NOW, type="note", cause="test")
        written = event_row.id
    with app.transaction() as s:
        assert s.scalar(select(LeadEvent.detail).where(LeadEvent.id == written)) == {}
    app.close()


def test_fetch_reads_what_sqlalchemy_reads(database_url: str, tmp_path: Any) -> None:
    """The inbound path's lookups read through `fetch` (driver SQL, converted by the
    columns' own types) give what SQLAlchemy's execution gives: the same SQL sent, the
    same values back, datetimes as aware datetimes, NULLs as None."""
    app = App.open(base_config(database_url, tmp_path), lambda: NOW)
    rows = [(2, {"email": "a@x.example", "company": "X"}), (3, {"email": "b@x.example"})]
    (a, b), sent = _leads_with_a_queued_email(app, rows)
    with app.transaction() as s:
        s.execute(update(OutboundMessage).values(status="sent", sent_at=NOW))
        s.execute(update(Lead).where(Lead.id == b).values(owner="ana@example.com"))
        for type_, at in (("bounce_reset", NOW - timedelta(days=2)), ("soft_bounce", NOW)):
            s.add(LeadEvent(lead_id=a, at=at, type=type_, cause="test", detail={}))
    since = NOW - timedelta(days=3)
    cases: list[
        tuple[Select[*tuple[Any, ...]], dict[str, Any], bool]
    ] = [  # (statement, values, found)
        (_SAME_DOMAIN, {"domain": "x.example", "lead_id": a}, True),
        (_SOURCE_BY_ID, {"id": sent}, True),
        (_LATEST_SOURCE, {"lead_id": a}, True),
        (_FIRST_CAMPAIGN, {"lead_id": a}, True),
        (_FIRST_CAMPAIGN, {"lead_id": a + b + 10}, False),
        (_BOUNCED_TO, {"id": sent}, True),
        (_LAST_RESET, {"lead": a}, True),
        (_LAST_RESET, {"lead": b}, True),  # MAX of nothing: one row, NULL
        (_SOFT_SINCE, {"lead": a, "since": since}, True),
        (_owned_like("domain", ("ana@example.com",)), {"value": "x.example", "lead_id": a}, True),
        (_colleagues(2), {"id0": a, "id1": b}, True),
    ]
    with app.engine.connect() as conn:
        seen: list[str] = []

        def record(_c: Any, _cur: Any, sql: str, *_rest: Any) -> None:
            if not sql.startswith("BEGIN"):  # SQLite's, as the connection's transaction begins
                seen.append(sql)

        for stmt, values, found in cases:
            seen.clear()
            event.listen(app.engine, "before_cursor_execute", record)
            try:
                core_rows = [r._tuple() for r in conn.execute(stmt, values)]
                fast_rows = fetch(conn, stmt, values)
            finally:
                event.remove(app.engine, "before_cursor_execute", record)
            assert fast_rows == core_rows, stmt
            assert bool(fast_rows) is found, stmt
            assert len(seen) == 2 and seen[0] == seen[1], stmt
            for value in (v for r in fast_rows for v in r):
                if isinstance(value, datetime):
                    assert value.tzinfo is not None and value.utcoffset() == timedelta(0)
        assert fetch(conn, _LAST_RESET, {"lead": a}) == [(NOW - timedelta(days=2),)]
        nothing: list[Any] = fetch(conn, _LAST_RESET, {"lead": b})
        assert nothing == [(None,)]
        status = fetch(conn, _SAME_DOMAIN, {"domain": "x.example", "lead_id": a})
        assert status == [(b, "lead")] and type(status[0][1]) is type(LeadStatus.LEAD)
    app.close()


def test_write_changes_updates_what_the_flush_would(database_url: str, tmp_path: Any) -> None:
    """`write_changes` writes a loaded lead's changed columns in one UPDATE (a JSON and a
    datetime among them), leaves the session with nothing to flush, and the ORM keeps
    tracking the object afterwards; anything it does not cover is left to the flush."""
    app = App.open(base_config(database_url, tmp_path), lambda: NOW)
    with app.transaction() as s:
        import_leads(s, [(2, {"email": "a@x.example"})], NOW)
    later = NOW + timedelta(hours=1)
    sent: list[str] = []

    def record(_c: Any, _cur: Any, sql: str, *_rest: Any) -> None:
        if sql.startswith(("UPDATE", "INSERT", "DELETE")):
            sent.append(sql)

    event.listen(app.engine, "before_cursor_execute", record)
    with app.transaction() as s:
        lead = s.scalars(select(Lead)).one()
        assert write_changes(s, lead) is False  # nothing changed
        lead.status, lead.score, lead.owner = LeadStatus.PROSPECT, 70, "ana@example.com"
        lead.qualification, lead.updated_at = {"score": 70, "checklist": ["fit"]}, later
        lead.first_name = lead.first_name  # set to what it was: no change
        assert write_changes(s, lead) is True
        assert len(sent) == 1 and "first_name" not in sent[0], sent
        assert not s.dirty
        s.flush()
        assert len(sent) == 1  # the flush had nothing left to write
        lead.score = 80  # still tracked: the ORM's flush writes the next change
        s.flush()
        assert len(sent) == 2 and "score" in sent[1]
    event.remove(app.engine, "before_cursor_execute", record)
    with app.transaction() as s:
        row = s.execute(
            select(Lead.status, Lead.score, Lead.owner, Lead.qualification, Lead.updated_at)
        ).one()
        assert tuple(row) == (
            LeadStatus.PROSPECT, 80, "ana@example.com", {"score": 70, "checklist": ["fit"]}, later,
        )  # fmt: skip
        lead = s.scalars(select(Lead)).one()
        s.expire(lead, ["owner"])
        lead.score = 90
        assert write_changes(s, lead) is True  # an expired column it does not write is fine
        new = Lead(email="new@x.example", status=LeadStatus.LEAD, domain="x.example",
                   reply_token="t" * 20, created_at=NOW, updated_at=NOW, custom={})  # fmt: skip
        s.add(new)
        assert write_changes(s, new) is False  # not persistent yet: the flush inserts it
    with app.transaction() as s:
        assert s.scalar(select(Lead.score).where(Lead.email == "a@x.example")) == 90
        assert s.scalar(select(Lead.id).where(Lead.email == "new@x.example")) is not None
    app.close()
