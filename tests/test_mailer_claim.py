"""The send path's order against a real SMTP server (aiosmtpd): a row is claimed only once
its SMTP transaction has begun (MAIL FROM accepted, RCPT TO sent: the claim runs while
the server answers RCPT), and its message follows (DATA).

So a crash strands only a row whose SMTP transaction had begun; a recipient refused at
RCPT is recorded as one failed attempt; a claim lost to another worker abandons its
envelope. Rows a crash left `sending` are settled without holding the database across
the search of the Sent folder.
"""

from __future__ import annotations

import mailbox
import sqlite3
from collections import Counter
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import psycopg
import pytest
from sqlalchemy import event, select

from tests import mails
from tests.conftest import PG_URL, base_config
from tests.imap_server import free_port
from tests.smtp_server import SmtpServer
from worker.app import App
from worker.campaigns import pause_campaign
from worker.config import Config
from worker.leads import import_leads
from worker.mailer import Mailer
from worker.models import Lead, LeadEvent, OutboundMessage, OutboxState
from worker.outbox import _due_batch, claim, enqueue, prepare, recover_sending, send_due
from worker.rendering import Renderer
from worker.sequences import queue_due
from worker.suppression import import_suppressions

NOW = datetime(2026, 11, 30, 10, 0, tzinfo=UTC)


class Sleeps:
    """Records the waits the mailer asks for, instead of waiting."""

    def __init__(self) -> None:
        self.delays: list[float] = []

    def __call__(self, seconds: float) -> None:
        self.delays.append(seconds)


def setup(
    database_url: str, tmp_path: Path, smtp: SmtpServer, n: int, clock: list[datetime] | None = None
) -> tuple[Config, App]:
    config = base_config(database_url, tmp_path, smtp=smtp.section())
    now = clock if clock is not None else [NOW]
    app = App.open(config, lambda: now[0])
    with app.transaction() as s:
        leads = [(i + 2, {"email": f"lead{i}@company{i}.example.org"}) for i in range(n)]
        import_leads(s, leads, NOW, campaign=config.campaign("welcome"))
    assert queue_due(app) == n
    return config, app


def states(app: App) -> dict[str, tuple[str, int]]:
    with app.transaction() as s:
        rows = s.execute(
            select(OutboundMessage.to_addr, OutboundMessage.status, OutboundMessage.attempts)
        ).all()
    return {to: (str(st), n) for to, st, n in rows}


def test_it_claims_a_row_only_once_the_server_holds_its_envelope(
    database_url: str, tmp_path: Path, smtp_server: SmtpServer
) -> None:
    config, app = setup(database_url, tmp_path, smtp_server, 3)
    leads = [f"lead{i}@company{i}.example.org" for i in range(3)]
    at_mail: list[list[str]] = []
    at_data: list[tuple[str, str]] = []

    def look_at_mail(_sender: str) -> None:  # runs while the worker waits for us
        now = states(app)
        at_mail.append([now[a][0] for a in leads])

    def look(command: str, address: str) -> None:
        if command == "DATA":
            at_data.append((address, states(app)[address][0]))

    smtp_server.on_mail, smtp_server.on_command = look_at_mail, look
    assert config.smtp is not None
    with Mailer(config.smtp) as mailer:
        assert send_due(app, Renderer(config.templates_path), lambda _t: mailer) == 3
    # At MAIL the row is still queued (a crash now leaves it to be sent again), and so is
    # every row after it; by DATA it is claimed (a crash now leaves it `unknown`, with its
    # transaction begun). In between, while the server answers RCPT, it is claimed.
    for i, seen in enumerate(at_mail):
        assert seen[i:] == ["queued"] * (3 - i)
        assert "queued" not in seen[:i]
    assert at_data == [(a, "sending") for a in leads]
    assert states(app) == {a: ("sent", 1) for a in leads}
    assert [t.rcpts for t in smtp_server.transactions] == [[a] for a in leads]
    app.close()


def test_it_does_not_send_to_an_address_suppressed_while_its_envelope_opens(
    database_url: str, tmp_path: Path, smtp_server: SmtpServer
) -> None:
    clock = [NOW]
    config, app = setup(database_url, tmp_path, smtp_server, 3, clock)
    late = "lead1@company1.example.org"

    def suppress_at_second_mail(_sender: str) -> None:  # the worker waits for us
        if len(smtp_server.transactions) == 1:  # the second email's (`late`) MAIL FROM
            with app.transaction() as s:  # `twoway suppress import`, from another process
                import_suppressions(s, [(2, {"email": late, "reason": "asked by phone"})], NOW)

    smtp_server.on_mail = suppress_at_second_mail
    assert config.smtp is not None
    renderer = Renderer(config.templates_path)
    with Mailer(config.smtp) as mailer:
        # The pass had decided its batch before the suppression: the claim looks again.
        assert send_due(app, renderer, lambda _t: mailer) == 2
        assert late not in smtp_server.recipients()
        assert states(app)[late] == ("queued", 0)  # not claimed, not tried
        smtp_server.on_mail = None
        # The next pass decides it (on PostgreSQL once this worker's hold on it has run out).
        clock[0] += timedelta(seconds=config.workers.lease_seconds + 1)
        assert send_due(app, renderer, lambda _t: mailer) == 0
    assert sorted(smtp_server.recipients()) == sorted(a for a in states(app) if a != late)
    assert [t.delivered for t in smtp_server.transactions] == [True, False, True]
    with app.transaction() as s:
        row = s.scalars(select(OutboundMessage).where(OutboundMessage.to_addr == late)).one()
        assert row.status == "cancelled" and row.attempts == 0
        assert row.last_error is not None and "asked by phone" in row.last_error
    app.close()


def test_it_sends_nothing_more_of_a_campaign_paused_during_the_pass(
    database_url: str, tmp_path: Path, smtp_server: SmtpServer
) -> None:
    config, app = setup(database_url, tmp_path, smtp_server, 4)
    paused: list[str] = []

    def pause_at_second_mail(_sender: str) -> None:
        if len(smtp_server.transactions) == 1 and not paused:
            with app.transaction() as s:
                pause_campaign(s, config, "welcome", NOW)
            paused.append("lead1@company1.example.org")  # the second email's

    smtp_server.on_mail = pause_at_second_mail
    assert config.smtp is not None
    with Mailer(config.smtp) as mailer:
        assert send_due(app, Renderer(config.templates_path), lambda _t: mailer) == 1
    assert len(smtp_server.recipients()) == 1  # the first, sent before the pause
    got = states(app)
    assert sorted(got.values()) == [("queued", 0)] * 3 + [("sent", 1)]
    assert paused and got[paused[0]] == ("queued", 0)  # its envelope opened, then RSET
    app.close()


def test_it_records_a_recipient_refused_at_rcpt_as_one_failed_attempt(
    database_url: str, tmp_path: Path, smtp_server: SmtpServer
) -> None:
    config, app = setup(database_url, tmp_path, smtp_server, 3)
    gone = "lead1@company1.example.org"
    smtp_server.reject(gone)
    sleeps = Sleeps()
    assert config.smtp is not None
    with Mailer(config.smtp, sleep=sleeps) as mailer:
        assert send_due(app, Renderer(config.templates_path), lambda _t: mailer) == 2
    got = states(app)
    assert got[gone] == ("failed", 1)  # one attempt, refused for good
    assert sleeps.delays == []  # a 5xx is not retried
    with app.transaction() as s:
        error = s.scalar(select(OutboundMessage.last_error).where(OutboundMessage.to_addr == gone))
        lead = s.scalar(select(Lead).where(Lead.email == gone))
        assert lead is not None and lead.status == "bounced"  # 5.1.1: the address is dead
    assert error is not None and error.startswith("permanent: 550") and "5.1.1" in error
    assert sorted(smtp_server.recipients()) == sorted(a for a in got if a != gone)
    assert smtp_server.connections == 1  # the connection served the next message
    app.close()


def test_it_retries_a_recipient_deferred_at_rcpt_and_sends_it_once(
    database_url: str, tmp_path: Path, smtp_server: SmtpServer
) -> None:
    config, app = setup(database_url, tmp_path, smtp_server, 1)
    busy = "lead0@company0.example.org"
    smtp_server.defer(busy, times=4)  # more than one send's retries
    sleeps = Sleeps()
    assert config.smtp is not None
    renderer = Renderer(config.templates_path)
    with Mailer(config.smtp, retries=3, sleep=sleeps) as mailer:
        assert send_due(app, renderer, lambda _t: mailer) == 0
        assert states(app) == {busy: ("queued", 1)}  # temporary: back in the queue, counted
        assert len(sleeps.delays) == 3
        with app.transaction() as s:
            row = s.scalars(select(OutboundMessage)).one()
            assert row.last_error is not None and row.last_error.startswith("temporary: 450")
            row.next_attempt_at = NOW - timedelta(seconds=1)  # its backoff has run out
        assert send_due(app, renderer, lambda _t: mailer) == 1
    assert states(app) == {busy: ("sent", 2)}
    assert smtp_server.recipients() == [busy]
    app.close()


def test_it_abandons_the_envelope_when_another_worker_claims_the_row_first(
    database_url: str, tmp_path: Path, smtp_server: SmtpServer
) -> None:
    clock = [NOW]
    config, app = setup(database_url, tmp_path, smtp_server, 1, clock)
    renderer = Renderer(config.templates_path)
    with app.transaction() as s:
        row_id = s.scalars(select(OutboundMessage.id)).one()
    budgets = {"default": 5}
    mine = prepare(app, renderer, row_id, budgets)
    if app.engine.dialect.name != "sqlite":  # several workers: the row is held back a while
        assert prepare(app, renderer, row_id, budgets) is None
    # Another worker decides the same row (on PostgreSQL, once the hold on it has run out).
    clock[0] += timedelta(seconds=config.workers.lease_seconds + 1)
    theirs = prepare(app, renderer, row_id, budgets)
    assert mine is not None and theirs is not None
    assert config.smtp is not None
    with Mailer(config.smtp) as mailer:
        assert mailer.begin(mine.envelope_from, [mine.to_addr]) is None
        assert claim(app, theirs)  # the other worker's claim commits first
        assert not claim(app, mine)
        mailer.reset()
        assert smtp_server.messages == []  # nothing of ours went out
        result = mailer.send(
            b"Subject: next\r\n\r\nstill usable\r\n", "a@example.com", ["b@x.test"]
        )
    assert result.status == "sent"
    assert [t.delivered for t in smtp_server.transactions] == [False, True]
    assert smtp_server.connections == 1
    assert Counter(st for st, _ in states(app).values()) == Counter({"sending": 1})
    app.close()


def test_it_asks_the_sent_folder_outside_any_transaction_and_settles_only_stranded_rows(
    sqlite_url: str, tmp_path: Path, smtp_server: SmtpServer
) -> None:
    _, app = setup(sqlite_url, tmp_path, smtp_server, 3)
    with app.transaction() as s:
        rows = list(s.scalars(select(OutboundMessage).order_by(OutboundMessage.id)))
        for row in rows:
            row.status = OutboxState.SENDING  # as if the worker died during the SMTP call
        ids = [row.message_id for row in rows]
    path = sqlite_url.removeprefix("sqlite:///")
    writable: list[bool] = []

    def in_sent_folder(mailbox: str | None, message_id: str) -> bool | None:
        # Meanwhile the database takes writes (no transaction is held across the search)...
        other = sqlite3.connect(path, timeout=0, isolation_level=None)
        try:
            other.execute("BEGIN IMMEDIATE")
            writable.append(True)
            if message_id == ids[0]:  # ...and another worker settles the third row.
                other.execute(
                    "UPDATE outbound_messages SET status = 'queued' WHERE message_id = ?",
                    (ids[2],),
                )
            other.execute("COMMIT")
        except sqlite3.OperationalError:
            writable.append(False)
        finally:
            other.close()
        return message_id == ids[1]

    assert recover_sending(app, in_sent_folder, all_rows=True) == (1, 1)
    assert writable == [True, True, True]
    with app.transaction() as s:
        got = dict(s.execute(select(OutboundMessage.message_id, OutboundMessage.status)).all())
    assert got == {ids[0]: "unknown", ids[1]: "sent", ids[2]: "queued"}
    app.close()


def test_it_keeps_a_foreign_message_id_only_when_it_fits_and_no_other_row_has_it(
    database_url: str, tmp_path: Path, smtp_server: SmtpServer
) -> None:
    config, app = setup(database_url, tmp_path, smtp_server, 1)
    theirs = "CAF=x9k2@mail.gmail.com"
    too_long = "a" * 250 + "@example.net"
    with app.transaction() as s:
        lead = s.scalars(select(Lead)).one()
        ids = []
        for i, mid in enumerate([f"<{theirs}>", theirs, too_long, "two@at@example.net"]):
            row = enqueue(s, config, "rep_copy", f"copy:{i}", lead, "handoff/reply", NOW,
                          to_addr="ana@example.com", message_id=mid)  # fmt: skip
            assert row is not None  # not deferred: the ORM row
            ids.append(row.message_id)
    assert ids[0] == theirs  # the copy of her message goes out, and is found, by her id
    assert ids[1] != theirs  # a second copy (a reassignment) gets one of ours...
    assert all(i.startswith("twoway.") and i.endswith("@example.com") for i in ids[1:])
    assert len(set(ids)) == 4  # ...as do ids the column or a header cannot hold
    app.close()


def test_a_bounce_of_mail_to_the_team_leaves_the_prospects_address_alone(
    database_url: str, tmp_path: Path, smtp_server: SmtpServer
) -> None:
    """The reply-ready copy carries the prospect's Message-ID, so a DSN for it (the rep's
    address is gone) names her message: it must not mark her address dead."""
    from worker.runner import Worker

    _, app = setup(database_url, tmp_path, smtp_server, 1)
    inbox = mailbox.Maildir(tmp_path / "inbox", create=False)
    with Worker(app) as worker:
        worker.run_once()
        [step1] = smtp_server.parsed()
        inbox.add(mails.reply(step1, "Could we see pricing and a demo?", NOW))
        worker.run_once()
        team = [m for m in smtp_server.messages if m.rcpts != (str(step1["To"]),)]
        assert len(team) == 2  # the briefing and the reply-ready copy
        for m in team:  # each DSN goes to the envelope sender (RFC 5321 4.5.5)
            original = m.parsed()
            del original["Reply-To"]
            original["Reply-To"] = m.envelope_from  # where mails.dsn addresses it
            inbox.add(mails.dsn(original, m.rcpts[0], "5.1.1", "550 5.1.1 unknown user", NOW))
        worker.run_once()
    with app.transaction() as s:
        lead = s.scalars(select(Lead)).one()
        events = list(s.scalars(select(LeadEvent.type).where(LeadEvent.lead_id == lead.id)))
        assert lead.status == "prospect"
    assert events.count("team_bounce") == 2
    app.close()


def test_it_tries_an_unreachable_server_once_a_pass_not_once_a_message(
    database_url: str, tmp_path: Path, smtp_server: SmtpServer
) -> None:
    config, app = setup(database_url, tmp_path, smtp_server, 5)
    down = Config.model_validate(
        {**config.model_dump(), "smtp": smtp_server.section(port=free_port())}
    )
    sleeps = Sleeps()
    assert down.smtp is not None
    with Mailer(down.smtp, sleep=sleeps) as mailer:
        assert send_due(app, Renderer(config.templates_path), lambda _t: mailer) == 0
    got = states(app)
    # One message spent its retries on the dead server; the other four were not tried
    # (no attempt counted) and wait, queued, for the next pass instead of each retrying.
    assert sorted(got.values()) == [("queued", 0)] * 4 + [("queued", 1)]
    assert len(sleeps.delays) == 3  # one send's retries, not five sends' worth
    with app.transaction() as s:
        waits = s.scalars(select(OutboundMessage.next_attempt_at)).all()
    assert all(w.replace(tzinfo=UTC) > NOW for w in waits)  # none is due again this instant
    with Mailer(config.smtp or down.smtp, sleep=sleeps) as mailer:  # the server is back
        app_later = App.open(config, lambda: NOW + timedelta(hours=2))
        assert send_due(app_later, Renderer(config.templates_path), lambda _t: mailer) == 5
        app_later.close()
    assert sorted(smtp_server.recipients()) == sorted(got)
    app.close()


def test_it_holds_a_whole_batch_back_from_other_workers_and_gives_back_what_it_leaves(
    database_url: str, tmp_path: Path, smtp_server: SmtpServer
) -> None:
    """Several workers (PostgreSQL): the batch a pass picks is held in the pick's own
    transaction, so while its first envelope is open a second worker finds none of it
    due; rows the pass stops before are due again at once, not after the hold."""
    config, app = setup(database_url, tmp_path, smtp_server, 5)
    other = App.open(config, lambda: NOW)  # a second worker's view of the same database
    found: list[list[int]] = []

    def look(_sender: str) -> None:  # the first worker waits for us
        if not found:
            found.append(_due_batch(other, 20, {}).ids)

    smtp_server.on_mail = look
    assert config.smtp is not None
    renderer = Renderer(config.templates_path)
    with Mailer(config.smtp) as mailer:
        stop = lambda: len(smtp_server.messages) >= 2  # noqa: E731  (SIGTERM after two)
        assert send_due(app, renderer, lambda _t: mailer, should_stop=stop) == 2
        smtp_server.on_mail = None
        if app.engine.dialect.name != "sqlite":
            assert found == [[]]  # all five held by the first worker
        # The three it did not reach are due now, for any worker: the other sends them.
        assert send_due(other, renderer, lambda _t: mailer) == 3
    assert Counter(smtp_server.recipients()) == Counter({a: 1 for a in states(app)})
    assert set(states(app).values()) == {("sent", 1)}
    other.close()
    app.close()


def test_it_records_a_sent_message_when_the_database_connection_drops_during_data(
    database_url: str, tmp_path: Path, smtp_server: SmtpServer
) -> None:
    """PostgreSQL restarted (or the connection cut) while the server takes DATA: the
    outcome is written on a fresh connection, so the row says `sent`, not `sending`."""
    if not database_url.startswith("postgresql") or not PG_URL:
        pytest.skip("a cut database connection: PostgreSQL")
    admin_url = PG_URL.replace("postgresql+psycopg", "postgresql")
    config, app = setup(database_url, tmp_path, smtp_server, 2)
    out: dict[int, int] = {}  # the DBAPI connections checked out now -> their backend pid
    event.listen(app.engine, "checkout", lambda c, _r, _p: out.__setitem__(id(c), _pid(c)))
    event.listen(app.engine, "checkin", lambda c, _r: out.pop(id(c), None))
    cut: list[int] = []

    def cut_at_first_data(command: str, address: str) -> None:
        if command == "DATA" and not cut:
            cut.extend(out.values())  # only the pass's connection is out during SMTP
            with psycopg.connect(admin_url) as admin:
                for pid in cut:
                    admin.execute("SELECT pg_terminate_backend(%s)", (pid,))

    smtp_server.on_command = cut_at_first_data
    assert config.smtp is not None
    with Mailer(config.smtp) as mailer:
        sent = send_due(app, Renderer(config.templates_path), lambda _t: mailer)
    assert len(cut) == 1
    assert sent == 2 and set(states(app).values()) == {("sent", 1)}
    assert len(smtp_server.messages) == 2
    app.close()


def _pid(dbapi_conn: Any) -> int:
    return int(dbapi_conn.info.backend_pid)


def test_each_outcome_is_written_before_the_next_email_is_claimed(
    database_url: str, tmp_path: Path, smtp_server: SmtpServer
) -> None:
    """The last email's outcome is written while the server answers the next one's MAIL
    FROM (on PostgreSQL, in that one's claim): by its DATA, every earlier row says `sent`."""
    config, app = setup(database_url, tmp_path, smtp_server, 4)
    leads = [f"lead{i}@company{i}.example.org" for i in range(4)]
    seen: list[tuple[str, list[str]]] = []

    def look(command: str, address: str) -> None:
        if command == "DATA":
            now = states(app)
            seen.append((address, [now[a][0] for a in leads]))

    smtp_server.on_command = look
    assert config.smtp is not None
    with Mailer(config.smtp) as mailer:
        assert send_due(app, Renderer(config.templates_path), lambda _t: mailer) == 4
    assert seen == [
        (a, ["sent"] * i + ["sending"] + ["queued"] * (3 - i)) for i, a in enumerate(leads)
    ]
    assert states(app) == {a: ("sent", 1) for a in leads}  # the last one at the batch's end
    app.close()


def test_messages_built_ahead_each_go_to_their_own_lead(
    database_url: str, tmp_path: Path, smtp_server: SmtpServer
) -> None:
    """Messages are built ahead while others are spoken over SMTP; rows that do not go
    out (a suppressed address) drop theirs, and each email sent is its own lead's."""
    config = base_config(database_url, tmp_path, smtp=smtp_server.section())
    app = App.open(config, lambda: NOW)
    names = ["Ada", "Grace", "Edsger", "Barbara", "Donald", "Frances", "Ken"]
    with app.transaction() as s:
        rows = [(i + 2, {"email": f"{n.lower()}@firm{i}.example.org", "first_name": n})
                for i, n in enumerate(names)]  # fmt: skip
        import_leads(s, rows, NOW, campaign=config.campaign("welcome"))
    assert queue_due(app) == len(names)
    with app.transaction() as s:
        gone = ["grace@firm1.example.org", "donald@firm4.example.org"]
        import_suppressions(s, [(i + 2, {"email": a}) for i, a in enumerate(gone)], NOW)
    assert config.smtp is not None
    with Mailer(config.smtp) as mailer:
        assert send_due(app, Renderer(config.templates_path), lambda _t: mailer) == 5
    got = {m["To"].addresses[0].addr_spec: m for m in smtp_server.parsed()}
    assert sorted(got) == sorted(
        f"{n.lower()}@firm{i}.example.org"
        for i, n in enumerate(names)
        if n not in ("Grace", "Donald")
    )
    for address, msg in got.items():
        name = address.split("@")[0].title()
        assert msg["Subject"].startswith(f"{name}, welcome")
        body = msg.get_body(("plain",))
        assert isinstance(body, EmailMessage) and f"Hi {name}," in body.get_content()
    app.close()
