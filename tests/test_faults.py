"""Fault injection: kill the worker anywhere, restart servers under it, lock its database.

Each scenario asserts the end state a user relies on: every inbound message recorded
exactly once, no email delivered twice (counted at the SMTP server), and every send the
worker cannot vouch for reported as `unknown`.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime
from email.message import EmailMessage
from email.utils import format_datetime, make_msgid
from pathlib import Path
from typing import Any

import pytest
import yaml
from sqlalchemy import func, select

from tests import mails
from tests.conftest import ROOT, twoway_cmd, wait_for
from tests.imap_server import DovecotServer
from tests.smtp_server import SmtpServer
from worker.app import App
from worker.config import load_config
from worker.leads import import_leads
from worker.models import InboundMessage, Lead, MailboxState, OutboundMessage, OutboxState
from worker.runner import Worker

NOW = datetime(2026, 12, 1, 10, 0, tzinfo=UTC)


def token_reply(lead: Lead, i: int) -> bytes:
    """A reply addressed to the lead's reply token (no need for step 1 to have gone out)."""
    msg = EmailMessage()
    msg["From"] = lead.email
    msg["To"] = f"sales+{lead.reply_token}@example.com"
    msg["Subject"] = "Re: welcome"
    msg["Date"] = format_datetime(NOW)
    msg["Message-ID"] = make_msgid(domain=lead.domain)
    msg.set_content(f"Thanks! Could we see a demo and pricing? ({i})")
    return msg.as_bytes()


def write_config(
    tmp_path: Path, sqlite_url: str, dovecot: DovecotServer, user: str, smtp: SmtpServer
) -> Path:
    data: dict[str, Any] = {
        "database": sqlite_url,
        "templates_dir": str(ROOT / "templates"),
        "mailboxes": [
            dovecot.mailbox_section(user, batch_size=25, idle=True, poll_interval=2)
        ],
        "smtp": smtp.section(),
        "sender": {"from": "Acme Sales <sales@example.com>"},
        "internal_domains": ["example.com"],
        "campaigns": [{"name": "welcome", "send_window": None,
                       "steps": [{"template": "nurture/welcome"}, {"template": "nurture/case-study", "delay": "0h"}]}],
        "reps": [{"name": "Ana", "email": "ana@example.com"}, {"name": "Ben", "email": "ben@example.com"}],
        # The follow-up at once, so kills land in its sending too.
        "handoff": {"follow_up": {"template": "followup/thanks", "delay": "0h"}},
    }  # fmt: skip
    cfg = tmp_path / "twoway.yaml"
    cfg.write_text(yaml.safe_dump(data))
    return cfg


def run_once(cfg: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        twoway_cmd(cfg, "run", "--once"),
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def test_it_loses_and_repeats_nothing_when_killed_at_random_points(
    sqlite_url: str, tmp_path: Path, dovecot: DovecotServer, imap_user: str, smtp_server: SmtpServer
) -> None:
    cfg = write_config(tmp_path, sqlite_url, dovecot, imap_user, smtp_server)
    env = {**os.environ, "TWOWAY_NOW": NOW.isoformat()}
    config = load_config(cfg, env={})
    app = App.open(config, lambda: NOW)
    rng = random.Random(20261201)
    kills = replies = newsletters = 0
    for it in range(50):
        # New work every round, so each kill lands in a different phase: importing,
        # reading mail, promoting, sending nurture steps, handoffs and follow-ups.
        with app.transaction() as s:
            rows = [(n + 2, {"email": f"lead{it}x{n}@c{it}x{n}.example.org"}) for n in range(30)]
            import_leads(s, rows, NOW, campaign=config.campaign("welcome"))
            fresh = list(
                s.scalars(select(Lead).where(Lead.email.like(f"lead{it}x%")).order_by(Lead.id))
            )
        with dovecot.client(imap_user) as c:
            for lead in fresh[:6]:
                c.append("INBOX", token_reply(lead, replies))
                replies += 1
            for _ in range(4):
                c.append("INBOX", mails.newsletter("sales@example.com", NOW))
                newsletters += 1
        proc = run_once(cfg, env)
        time.sleep(rng.uniform(0.3, 1.1))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait(30)
    for _ in range(2):  # then let it finish
        assert run_once(cfg, env).wait(180) == 0

    with app.transaction() as s:
        inbound = s.scalar(select(func.count()).select_from(InboundMessage))
        distinct = s.scalar(select(func.count(func.distinct(InboundMessage.message_id))))
        prospects = s.scalar(select(func.count()).where(Lead.status == "prospect"))
        rows_out = s.execute(
            select(
                OutboundMessage.message_id,
                OutboundMessage.status,
                OutboundMessage.kind,
                OutboundMessage.to_addr,
            )
        ).all()
        still_leads = s.scalar(select(func.count()).where(Lead.status == "lead"))
        steps = Counter(
            s.execute(
                select(OutboundMessage.status)
                .join(Lead, Lead.id == OutboundMessage.lead_id)
                .where(OutboundMessage.kind == "nurture", Lead.status == "lead")
            ).scalars()
        )
    print(f"{kills} of 50 runs killed mid-work")
    assert kills >= 25, "most runs must really be killed mid-work"
    assert inbound == distinct == replies + newsletters  # nothing lost, nothing twice
    assert prospects == replies
    delivered = Counter(str(m.parsed()["Message-ID"]).strip("<>") for m in smtp_server.messages)
    statuses = Counter(st for _, st, _, _ in rows_out)
    assert set(statuses) <= {"sent", "unknown", "cancelled"}, statuses
    # Every message delivered is one of ours, at most once; every row `sent` exactly once.
    assert set(delivered) <= {mid for mid, _, _, _ in rows_out}
    assert max(delivered.values()) == 1  # zero duplicate deliveries
    for message_id, st, _, _ in rows_out:
        if st == "sent":
            assert delivered[message_id] == 1, message_id
        elif st == "cancelled":
            assert delivered[message_id] == 0, message_id
    assert Counter(k for _, _, k, _ in rows_out)["handoff"] == replies  # one per promotion
    # A kill strands at most the one message in flight, and only once the server holds its
    # transaction: every `unknown` row is one whose MAIL FROM and RCPT TO had reached the
    # server (or whose message arrived), each with a transaction of its own.
    unknown = [(to, mid) for mid, st, _, to in rows_out if st == OutboxState.UNKNOWN]
    print(f"{len(unknown)} unknown, {len(smtp_server.transactions)} SMTP transactions begun")
    assert len(unknown) <= kills
    assert smtp_server.not_begun(unknown) == 0
    # Every lead still in the funnel got both steps (sent, or unknown mid-SMTP).
    assert steps[OutboxState.SENT] + steps[OutboxState.UNKNOWN] == 2 * (still_leads or 0), steps
    status = subprocess.run(
        twoway_cmd(cfg, "status", "--json"),
        env=env, capture_output=True, text=True, check=True,
    )  # fmt: skip
    reported = json.loads(status.stdout)
    assert (
        reported["outbox"]["unknown"] == statuses[OutboxState.UNKNOWN]
    )  # every unknown is reported
    assert len(reported["unknown_sends"]) == statuses[OutboxState.UNKNOWN]
    app.close()


def test_it_strands_only_a_send_the_server_had_begun_when_killed_inside_smtp(
    sqlite_url: str, tmp_path: Path, smtp_server: SmtpServer
) -> None:
    """SIGKILL the worker at the worst moments, from inside the SMTP server: at MAIL (the
    transaction not yet begun, the row not claimed), at RCPT (begun; the claim runs while
    the server answers) and at DATA (claimed, the message not yet accepted). The first is
    sent on the next run; the second may, and the third must, stay `unknown`, each with
    its transaction begun. Nothing arrives twice."""
    cfg, env, app, leads = _ten_due(sqlite_url, tmp_path, smtp_server)
    running: list[subprocess.Popen[bytes]] = []
    at: list[str] = []  # the command to kill at in this run
    killed: dict[str, str] = {}  # command -> the recipient whose transaction it cut
    seen: Counter[str] = Counter()

    def kill_inside(command: str, address: str) -> None:
        if at and command == at[0]:
            seen[command] += 1
            if seen[command] == 3:  # the third message of the run
                killed[command] = address
                os.kill(running[-1].pid, signal.SIGKILL)
                running[-1].wait(10)  # dead before the server answers

    smtp_server.on_command = kill_inside
    smtp_server.on_mail = lambda sender: kill_inside("MAIL", sender)
    for command in ("MAIL", "RCPT", "DATA", None):
        at[:] = [command] if command else []
        running.append(run_once(cfg, env))
        code = running[-1].wait(120)
        assert code == (-signal.SIGKILL if command else 0), command
    with app.transaction() as s:
        states = dict(s.execute(select(OutboundMessage.to_addr, OutboundMessage.status)).all())
        ids = dict(s.execute(select(OutboundMessage.to_addr, OutboundMessage.message_id)).all())
    assert set(killed) == {"MAIL", "RCPT", "DATA"}
    # Killed at RCPT: claimed or not, as the kill fell; `unknown` (never resent) or sent
    # once on the next run. Killed at DATA: claimed, so `unknown` (reported, never
    # resent). Killed at MAIL: nothing begun, nothing claimed: every row but those two
    # went out and says `sent`.
    assert states[killed["RCPT"]] in ("sent", "unknown")
    assert states[killed["DATA"]] == "unknown"
    assert {a for a, st in states.items() if st != "sent"} <= {killed["RCPT"], killed["DATA"]}
    unknown = [(a, ids[a]) for a, st in states.items() if st == "unknown"]
    assert smtp_server.not_begun(unknown) == 0
    # The server had the whole message when the worker died waiting for its 250: it
    # arrived once, and the row says `unknown` rather than guess. The one cut at RCPT
    # arrived once or never (then `unknown`). Nothing went twice, no other was lost.
    got = Counter(r for m in smtp_server.messages for r in m.rcpts)
    expected = {a: 1 for a in leads}
    if got[killed["RCPT"]] == 0:
        assert states[killed["RCPT"]] == "unknown"
        del expected[killed["RCPT"]]
    assert got == Counter(expected)
    app.close()


def test_a_kill_while_the_last_outcome_is_written_sends_nothing_twice(
    sqlite_url: str, tmp_path: Path, smtp_server: SmtpServer
) -> None:
    """The outcome of an email is written while the server answers the next one's MAIL
    FROM. SIGKILL the worker there, at the third MAIL: the second email, delivered, says
    `sent` or, if its outcome was not yet written, `unknown` (never resent); the third,
    never claimed, goes out once on the next run."""
    cfg, env, app, leads = _ten_due(sqlite_url, tmp_path, smtp_server)
    running: list[subprocess.Popen[bytes]] = []
    mails: list[str] = []

    def kill_at_third_mail(sender: str) -> None:
        if len(running) == 1:
            mails.append(sender)
            if len(mails) == 3:
                os.kill(running[-1].pid, signal.SIGKILL)
                running[-1].wait(10)  # dead before the server answers

    smtp_server.on_mail = kill_at_third_mail
    running.append(run_once(cfg, env))
    assert running[-1].wait(120) == -signal.SIGKILL
    delivered = [r for m in smtp_server.messages for r in m.rcpts]
    assert len(delivered) == 2  # the first two emails, whole
    running.append(run_once(cfg, env))
    assert running[-1].wait(120) == 0
    with app.transaction() as s:
        states = dict(s.execute(select(OutboundMessage.to_addr, OutboundMessage.status)).all())
    assert states[delivered[0]] == "sent"
    assert states[delivered[1]] in ("sent", "unknown")
    assert {a for a, st in states.items() if st != "sent"} <= {delivered[1]}
    got = Counter(r for m in smtp_server.messages for r in m.rcpts)
    assert got == Counter({a: 1 for a in leads})  # nothing twice, nothing lost
    app.close()


def _ten_due(
    sqlite_url: str, tmp_path: Path, smtp_server: SmtpServer
) -> tuple[Path, dict[str, str], App, list[str]]:
    """A config sending through `smtp_server` and ten leads due step 1; the worker's env."""
    data: dict[str, Any] = {
        "database": sqlite_url,
        "templates_dir": str(ROOT / "templates"),
        "smtp": smtp_server.section(),
        "sender": {"from": "Acme Sales <sales@example.com>"},
        "campaigns": [
            {"name": "welcome", "send_window": None, "steps": [{"template": "nurture/welcome"}]}
        ],
    }
    cfg = tmp_path / "twoway.yaml"
    cfg.write_text(yaml.safe_dump(data))
    config = load_config(cfg, env={})
    app = App.open(config, lambda: NOW)
    leads = [f"lead{i}@c{i}.example.org" for i in range(10)]
    with app.transaction() as s:
        import_leads(s, [(i + 2, {"email": a}) for i, a in enumerate(leads)], NOW,
                     campaign=config.campaign("welcome"))  # fmt: skip
    return cfg, {**os.environ, "TWOWAY_NOW": NOW.isoformat()}, app, leads


def test_it_survives_dovecot_restarting_mid_sync(
    sqlite_url: str, tmp_path: Path, dovecot: DovecotServer, imap_user: str, smtp_server: SmtpServer
) -> None:
    cfg = write_config(tmp_path, sqlite_url, dovecot, imap_user, smtp_server)
    env = {**os.environ, "TWOWAY_NOW": NOW.isoformat()}
    app = App.open(load_config(cfg, env={}), lambda: NOW)
    with dovecot.client(imap_user) as c:
        for i in range(600):
            c.append(
                "INBOX",
                mails.newsletter("sales@example.com", NOW).replace(b"pipeline", f"p{i}".encode()),
            )

    def count() -> int:
        with app.transaction() as s:
            return int(s.scalar(select(func.count()).select_from(InboundMessage)) or 0)

    proc = run_once(cfg, env)
    deadline = time.monotonic() + 60
    while count() < 50 and time.monotonic() < deadline:
        time.sleep(0.02)
    dovecot.restart()
    proc.wait(60)  # the pass ends with an error (exit 1) or, if it was done, 0
    assert run_once(cfg, env).wait(120) == 0
    assert count() == 600
    app.close()


def test_it_reconnects_when_dovecot_restarts_under_idle(
    sqlite_url: str, tmp_path: Path, dovecot: DovecotServer, imap_user: str, smtp_server: SmtpServer
) -> None:
    cfg = write_config(tmp_path, sqlite_url, dovecot, imap_user, smtp_server)
    app = App.open(load_config(cfg, env={}), lambda: NOW)
    log = (tmp_path / "worker.log").open("w")
    proc = subprocess.Popen(
        twoway_cmd(cfg, "run", "--log-format", "json"),
        env={**os.environ}, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:

        def synced() -> bool:  # connected: the restart cuts a live connection
            with app.transaction() as s:
                return s.scalar(select(MailboxState.last_sync)) is not None

        wait_for(synced, 60, "the worker's first sync")
        dovecot.restart()
        dovecot.append(imap_user, "INBOX", mails.newsletter("sales@example.com", NOW))

        def recorded() -> bool:
            with app.transaction() as s:
                return bool(s.scalar(select(func.count()).select_from(InboundMessage)))

        deadline = time.monotonic() + 30
        while not recorded():
            assert time.monotonic() < deadline, "the message after the restart was never read"
            time.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
        log.close()
    text = (tmp_path / "worker.log").read_text()
    assert text.count("connection is back") == 1  # one line when lost, one when back
    app.close()


def test_it_waits_out_a_briefly_locked_sqlite_database(
    sqlite_url: str, tmp_path: Path, dovecot: DovecotServer, imap_user: str, smtp_server: SmtpServer
) -> None:
    cfg = write_config(tmp_path, sqlite_url, dovecot, imap_user, smtp_server)
    env = {**os.environ, "TWOWAY_NOW": NOW.isoformat()}
    config = load_config(cfg, env={})
    app = App.open(config, lambda: NOW)
    with app.transaction() as s:
        import_leads(s, [(i + 2, {"email": f"lead{i}@c{i}.example.org"}) for i in range(20)], NOW,
                     campaign=config.campaign("welcome"))  # fmt: skip
    app.close()
    path = sqlite_url.removeprefix("sqlite:///")
    locker = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    locker.execute("BEGIN EXCLUSIVE")
    release = threading.Timer(2.0, lambda: locker.execute("COMMIT"))
    release.start()
    try:
        assert run_once(cfg, env).wait(120) == 0  # waited for the lock, then did the pass
    finally:
        release.join()
        locker.close()
    assert Counter(r for m in smtp_server.messages for r in m.rcpts) == Counter(
        {f"lead{i}@c{i}.example.org": 1 for i in range(20)}
    )


@pytest.mark.parametrize("burst", [3, 8])
def test_it_delivers_once_through_bursts_of_4xx_and_dropped_connections(
    sqlite_url: str,
    tmp_path: Path,
    dovecot: DovecotServer,
    imap_user: str,
    smtp_server: SmtpServer,
    burst: int,
    start_worker: Callable[[App], Worker],
) -> None:
    cfg = write_config(tmp_path, sqlite_url, dovecot, imap_user, smtp_server)
    config = load_config(cfg, env={})
    clock = [NOW]
    app = App.open(config, lambda: clock[0])
    with app.transaction() as s:
        import_leads(s, [(i + 2, {"email": f"lead{i}@c{i}.example.org"}) for i in range(40)], NOW,
                     campaign=config.campaign("welcome"))  # fmt: skip
    worker = start_worker(app)
    from datetime import timedelta

    for minute in range(0, 600, 10):
        if minute % 60 == 0:
            smtp_server.fail_next(burst, 451)
            smtp_server.drop_next(1)
            smtp_server.fail_next(1, 421)
        clock[0] = NOW + timedelta(minutes=minute)
        worker.run_once()
    got = Counter(r for m in smtp_server.messages for r in m.rcpts)
    assert got == Counter({f"lead{i}@c{i}.example.org": 2 for i in range(40)})


def test_it_settles_a_send_interrupted_by_a_crash_with_the_sent_folder(
    sqlite_url: str,
    tmp_path: Path,
    dovecot: DovecotServer,
    imap_user: str,
    smtp_server: SmtpServer,
    start_worker: Callable[[App], Worker],
) -> None:
    """A row left in `sending` is `sent` when the Sent folder has it, else `unknown`: never resent."""
    mailbox = dovecot.mailbox_section(imap_user, sent_folder="Sent")
    dovecot.create_folder(imap_user, "Sent")
    from tests.conftest import base_config

    config = base_config(
        sqlite_url, tmp_path, mailboxes=[mailbox],
        smtp=smtp_server.section(),
    )  # fmt: skip
    app = App.open(config, lambda: NOW)
    with app.transaction() as s:
        import_leads(s, [(2, {"email": "a@a.example.org"}), (3, {"email": "b@b.example.org"})], NOW,
                     campaign=config.campaign("welcome"))  # fmt: skip
    worker = start_worker(app)
    from worker.sequences import queue_due

    queue_due(app)
    with app.transaction() as s:
        rows = list(s.scalars(select(OutboundMessage).order_by(OutboundMessage.id)))
        for row in rows:
            row.status = OutboxState.SENDING  # as if the worker died during the SMTP call
        in_sent = rows[0].message_id
    copy = EmailMessage()
    copy["From"], copy["To"], copy["Subject"] = "sales@example.com", "a@a.example.org", "Welcome"
    copy["Message-ID"] = f"<{in_sent}>"
    copy.set_content("the copy the server kept")
    dovecot.append(imap_user, "Sent", copy.as_bytes())
    worker.run_once()
    with app.transaction() as s:
        states = dict(s.execute(select(OutboundMessage.to_addr, OutboundMessage.status)).all())
    assert states == {"a@a.example.org": "sent", "b@b.example.org": "unknown"}
    assert smtp_server.messages == []  # neither was sent again


def test_it_finds_the_reply_ready_copy_in_the_sent_folder_by_the_id_it_went_out_with(
    sqlite_url: str, tmp_path: Path, dovecot: DovecotServer, imap_user: str, smtp_server: SmtpServer
) -> None:
    """The rep's copy goes out under the prospect's Message-ID; its row carries that id, so
    a crash after DATA is settled by the Sent folder instead of ending `unknown`."""
    from tests.conftest import base_config
    from worker.runner import Worker

    dovecot.create_folder(imap_user, "Sent")
    config = base_config(
        sqlite_url, tmp_path, smtp=smtp_server.section(),
        mailboxes=[dovecot.mailbox_section(imap_user, sent_folder="Sent")],
    )  # fmt: skip
    app = App.open(config, lambda: NOW)
    with app.transaction() as s:
        import_leads(s, [(2, {"email": "maya@northwind.example"})], NOW)
        lead = s.scalars(select(Lead)).one()
        reply = token_reply(lead, 0)
    dovecot.append(imap_user, "INBOX", reply)
    with Worker(app) as worker:
        worker.run_once()
    theirs = str(mails_message_id(reply))
    with app.transaction() as s:
        copy = s.scalars(select(OutboundMessage).where(OutboundMessage.kind == "rep_copy")).one()
        assert copy.status == "sent"
        assert copy.message_id == theirs  # the row's id is the prospect's...
        copy.status = OutboxState.SENDING  # ...so when a crash hits after DATA:
    [on_wire] = [
        m for m in smtp_server.messages if str(m.parsed()["Message-ID"]).strip("<>") == theirs
    ]
    # The copy the server kept, as a provider that files submitted mail in Sent does (the
    # worker files only mail sent from a mailbox's own identity).
    dovecot.append(imap_user, "Sent", on_wire.raw)
    delivered = len(smtp_server.messages)
    with Worker(app) as worker:
        worker.run_once()
    with app.transaction() as s:
        copy = s.scalars(select(OutboundMessage).where(OutboundMessage.kind == "rep_copy")).one()
        assert (copy.status, copy.last_error) == (
            "sent",
            "confirmed in the Sent folder after a restart",
        )
    assert len(smtp_server.messages) == delivered  # and nothing was sent again
    app.close()


def mails_message_id(raw: bytes) -> str:
    """The bare Message-ID of a raw message."""
    from email import message_from_bytes

    return str(message_from_bytes(raw)["Message-ID"]).strip().strip("<>")


@pytest.fixture
def own_postgres(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A PostgreSQL of this test's own (it gets restarted), via .ci/pg.sh on a free port."""
    import glob
    import shutil
    import socket
    import tempfile

    if not glob.glob("/usr/lib/postgresql/*/bin/initdb"):
        pytest.skip("PostgreSQL server binaries are not installed")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    d = tempfile.mkdtemp(prefix="twoway-pg-")
    script = str(ROOT / ".ci" / "pg.sh")
    url = subprocess.run(
        [script, "start", d, str(port)], capture_output=True, text=True, check=True
    ).stdout.strip()

    def restart() -> None:
        subprocess.run([script, "stop", d], check=True)
        time.sleep(1.0)
        bin_dir = sorted(glob.glob("/usr/lib/postgresql/*/bin"))[-1]
        opts = f"-k {d} -p {port} -c listen_addresses=127.0.0.1 -c fsync=off"
        start = f"{bin_dir}/pg_ctl -D {d}/data -l {d}/log -w start -o '{opts}'"
        as_pg = (
            ["su", "postgres", "-s", "/bin/sh", "-c", start]
            if os.getuid() == 0
            else ["sh", "-c", start]
        )
        subprocess.run(as_pg, check=True, capture_output=True)

    yield url, restart
    subprocess.run([script, "stop", d], check=False)
    shutil.rmtree(d, ignore_errors=True)


def test_it_rides_out_a_postgresql_restart(
    own_postgres: Any,
    tmp_path: Path,
    dovecot: DovecotServer,
    imap_user: str,
    smtp_server: SmtpServer,
) -> None:
    url, restart = own_postgres
    cfg = write_config(tmp_path, "sqlite:///unused.db", dovecot, imap_user, smtp_server)
    env = {**os.environ, "TWOWAY_DATABASE_URL": url}
    env.pop("TWOWAY_NOW", None)
    config = load_config(cfg, env=env)
    app = App.open(config, lambda: datetime.now(UTC))
    with app.transaction() as s:
        import_leads(s, [(i + 2, {"email": f"lead{i}@c{i}.example.org"}) for i in range(10)],
                     app.now(), campaign=config.campaign("welcome"))  # fmt: skip
        leads = list(s.scalars(select(Lead).order_by(Lead.id)))
    app.engine.dispose()
    log = (tmp_path / "worker.log").open("w")
    proc = subprocess.Popen(
        twoway_cmd(cfg, "run", "--log-format", "json"),
        env=env, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip

    def inbound() -> int:
        with app.transaction() as s:
            return int(s.scalar(select(func.count()).select_from(InboundMessage)) or 0)

    def handoffs_sent() -> set[str]:
        """The Message-IDs of the handoffs recorded as sent (after the server said 250)."""
        with app.transaction() as s:
            return set(
                s.scalars(
                    select(OutboundMessage.message_id).where(
                        OutboundMessage.kind == "handoff",
                        OutboundMessage.status == OutboxState.SENT,
                    )
                )
            )

    try:
        dovecot.append(imap_user, "INBOX", token_reply(leads[0], 0))
        wait_for(lambda: inbound() >= 1, 30, "the first reply recorded before the restart")
        restart()  # the worker's connections die under it
        app.engine.dispose()
        for i, lead in enumerate(leads[1:4], start=1):
            dovecot.append(imap_user, "INBOX", token_reply(lead, i))
        wait_for(lambda: inbound() >= 4, 60, "the replies after the restart read")
        # The handoffs go out after their replies are recorded: stopping the worker before
        # would leave nothing at the server to count.
        wait_for(lambda: len(handoffs_sent()) == 4, 60, "the 4 handoffs sent to the reps")
        assert proc.poll() is None  # the worker kept running
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(15)
        log.close()
    with app.transaction() as s:
        assert s.scalar(select(func.count()).where(Lead.status == "prospect")) == 4
        handoffs = s.scalar(select(func.count()).where(OutboundMessage.kind == "handoff"))
    assert handoffs == 4
    delivered = Counter(str(m.parsed()["Message-ID"]) for m in smtp_server.messages)
    # Each handoff reached its rep (the row's Message-ID has no angle brackets).
    assert all(delivered[f"<{mid}>"] == 1 for mid in handoffs_sent()), delivered
    assert max(delivered.values()) == 1  # and nothing, handoff or not, twice
    app.close()
