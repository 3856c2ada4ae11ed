"""At 100,000 leads every statement the inbound path issues is an indexed search.

The database holds 100,000 leads enrolled in a campaign, each with a sent step, one
employer with 2,000 leads and a company with 40. Real mail (token, thread and sender
replies, an out-of-office, a hard bounce, an unsubscribe) goes through a worker pass
while every SQL statement is captured; each is then explained by SQLite, with and
without planner statistics. A full scan of a growing table fails the test, and so does a
statement count that grows with the number of colleagues.
"""

from __future__ import annotations

import mailbox
import re
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from email.message import EmailMessage
from email.utils import format_datetime, make_msgid
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event, insert, select, update

from tests import mails
from tests.conftest import base_config
from worker.app import App
from worker.db import refresh_statistics
from worker.models import Enrollment, Lead, LeadEvent, OutboundMessage
from worker.runner import Worker

NOW = datetime(2026, 12, 1, 10, 0, tzinfo=UTC)
N = 100_000
BIG, MEDIUM = 2000, 40
GROWING = ("leads", "enrollments", "outbound_messages", "inbound_messages", "lead_events")
_SCAN = re.compile(r"^SCAN (" + "|".join(GROWING) + r")\b")


def _domain(i: int) -> str:
    if i < BIG:
        return "bigbank.example"
    if i < BIG + MEDIUM:
        return "midsize.example"
    return f"shop{i // 3}.example"  # many small companies of three


def populate(app: App) -> None:
    later = NOW + timedelta(days=3)  # nothing due during the pass
    with app.transaction() as s:
        for start in range(0, N, 20_000):
            ids = range(start, min(N, start + 20_000))
            s.execute(
                insert(Lead),
                [{"id": i + 1, "email": f"p{i}@{_domain(i)}", "company": _domain(i).split(".")[0],
                  "company_key": _domain(i).split(".")[0], "custom": {}, "status": "lead",
                  "reply_token": f"{i:016d}".translate(str.maketrans("0123456789", "abcdefghij")),
                  "domain": _domain(i), "created_at": NOW, "updated_at": NOW} for i in ids],
            )  # fmt: skip
            s.execute(
                insert(Enrollment),
                [{"id": i + 1, "lead_id": i + 1, "campaign": "welcome", "step": 1,
                  "state": "active", "next_due": later, "created_at": NOW, "updated_at": NOW}
                 for i in ids],
            )  # fmt: skip
            s.execute(
                insert(OutboundMessage),
                [{"idempotency_key": f"nurture:{i + 1}:0", "kind": "nurture", "lead_id": i + 1,
                  "enrollment_id": i + 1, "campaign": "welcome", "step": 0,
                  "template": "nurture/welcome", "message_id": f"step0.{i}@example.com",
                  "to_addr": f"p{i}@{_domain(i)}", "status": "sent", "attempts": 1,
                  "next_attempt_at": NOW, "context": {}, "created_at": NOW, "sent_at": NOW}
                 for i in ids],
            )  # fmt: skip
            s.execute(
                insert(LeadEvent),
                [{"lead_id": i + 1, "at": NOW, "type": "created", "cause": "import",
                  "detail": {}} for i in ids],
            )  # fmt: skip


def original(i: int, token: str) -> EmailMessage:
    """Step 1 as the lead received it."""
    msg = EmailMessage()
    msg["From"] = "Acme Sales <sales@example.com>"
    msg["To"] = f"p{i}@{_domain(i)}"
    msg["Reply-To"] = f"sales+{token}@example.com"
    msg["Subject"] = "Welcome to Acme"
    msg["Date"] = format_datetime(NOW - timedelta(days=1))
    msg["Message-ID"] = f"<step0.{i}@example.com>"
    msg.set_content("Hello! Here is what Acme does for teams like yours.")
    return msg


def token(i: int) -> str:
    return f"{i:016d}".translate(str.maketrans("0123456789", "abcdefghij"))


def inbox_mail() -> list[bytes]:
    at = NOW - timedelta(minutes=5)
    sender_only = EmailMessage()
    sender_only["From"] = f"p{BIG + MEDIUM + 7}@{_domain(BIG + MEDIUM + 7)}"
    sender_only["To"] = "sales@example.com"
    sender_only["Subject"] = "Question about pricing"
    sender_only["Date"] = format_datetime(at)
    sender_only["Message-ID"] = make_msgid(domain="shop.example")
    sender_only.set_content("Hi, could you send me your pricing for 20 seats? Thanks, Sam")
    return [
        # a medium company's lead replies in the thread: promotion, 39 colleagues
        mails.reply(original(BIG + 3, token(BIG + 3)), "Yes, let's talk next week.", at),
        # the large employer: promotion, colleagues left alone
        mails.reply(original(5, token(5)), "Interesting, can we get a demo?", at),
        sender_only.as_bytes(),
        mails.exchange_ooo(
            original(BIG + MEDIUM + 20, token(BIG + MEDIUM + 20)), date(2026, 12, 8), at
        ),
        mails.dsn(
            original(BIG + MEDIUM + 30, token(BIG + MEDIUM + 30)),
            f"p{BIG + MEDIUM + 30}@{_domain(BIG + MEDIUM + 30)}",
            "5.1.1",
            "550 5.1.1 user unknown",
            at,
        ),
    ]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[App, Path]]:
    tmp_path = tmp_path_factory.mktemp("plans")
    config = base_config(f"sqlite:///{tmp_path / 'twoway.db'}", tmp_path)
    app = App.open(config, lambda: NOW)
    populate(app)
    yield app, tmp_path
    app.close()


def captured_pass(app: App, tmp_path: Path, messages: list[bytes]) -> list[tuple[str, Any]]:
    inbox = mailbox.Maildir(tmp_path / "inbox", create=True)
    for raw in messages:
        inbox.add(raw)
    statements: list[tuple[str, Any]] = []

    def capture(_c: Any, _cur: Any, statement: str, params: Any, _ctx: Any, many: bool) -> None:
        statements.append((statement, params[0] if many and params else params))

    event.listen(app.engine, "before_cursor_execute", capture)
    try:
        with Worker(app) as worker:
            result = worker.run_once()
    finally:
        event.remove(app.engine, "before_cursor_execute", capture)
    assert result.inbound.processed == len(messages), result
    return statements


def scans(app: App, statements: list[tuple[str, Any]]) -> list[str]:
    """The statements whose plan scans a growing table, with the plan line."""
    bad = []
    with app.engine.connect() as conn:
        for sql, params in statements:
            if not sql.lstrip().upper().startswith(("SELECT", "UPDATE", "DELETE", "INSERT")):
                continue
            if sql.lstrip().upper().startswith("INSERT") and "SELECT" not in sql.upper():
                continue
            for row in conn.exec_driver_sql("EXPLAIN QUERY PLAN " + sql, params or ()):
                if _SCAN.match(row[-1]):
                    bad.append(f"{row[-1]}: {' '.join(sql.split())[:300]}")
        conn.rollback()
    return bad


def test_it_searches_by_index_for_every_statement_at_100000_leads(
    world: tuple[App, Path],
) -> None:
    app, tmp_path = world
    statements = captured_pass(app, tmp_path, inbox_mail())

    assert scans(app, statements) == []  # with the statistics the worker keeps fresh
    with app.engine.connect() as conn:
        conn.exec_driver_sql("DELETE FROM sqlite_stat1")
        conn.commit()
    app.engine.dispose()
    assert scans(app, statements) == []  # and as a planner without statistics sees it
    refresh_statistics(app.engine)
    app.engine.dispose()
    wanted = [BIG + 4, 6, BIG + MEDIUM + 8, BIG + MEDIUM + 31]
    with app.transaction() as s:
        status = s.execute(select(Lead.email, Lead.status).where(Lead.id.in_(wanted))).all()
        paused = s.scalars(select(Enrollment.lead_id).where(Enrollment.state == "paused")).all()
    assert {email: st for email, st in status} == {
        f"p{BIG + 3}@midsize.example": "prospect",
        "p5@bigbank.example": "prospect",
        f"p{BIG + MEDIUM + 7}@{_domain(BIG + MEDIUM + 7)}": "prospect",
        f"p{BIG + MEDIUM + 30}@{_domain(BIG + MEDIUM + 30)}": "bounced",
    }
    colleagues = {BIG + i + 1 for i in range(MEDIUM) if i != 3}
    small = {BIG + MEDIUM + i + 1 for i in (6, 8)}  # the sender's two colleagues
    ooo = {BIG + MEDIUM + 21}
    assert set(paused) == colleagues | small | ooo  # the employer's 1,999 go on


def test_it_issues_as_many_statements_for_a_colleague_rich_reply_as_for_a_lone_one(
    world: tuple[App, Path],
) -> None:
    app, tmp_path = world
    at = NOW - timedelta(minutes=1)
    few_i, many_i = BIG + MEDIUM + 3 * 1000, BIG + 10  # 2 colleagues / 39 colleagues
    few = captured_pass(app, tmp_path, [mails.reply(original(few_i, token(few_i)), "Yes.", at)])
    with app.transaction() as s:  # the midsize colleagues were paused: active again
        s.execute(
            update(Enrollment)
            .where(Enrollment.lead_id.between(BIG + 1, BIG + MEDIUM), Enrollment.state == "paused")
            .values(state="active")
        )
    many = captured_pass(app, tmp_path, [mails.reply(original(many_i, token(many_i)), "Yes.", at)])
    assert len(many) <= len(few) + 3, (len(few), len(many))
