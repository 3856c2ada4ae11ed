"""Inbound sync against a real Dovecot: every message read once, never lost, never altered."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable
from datetime import UTC, datetime
from email.message import EmailMessage
from email.utils import format_datetime
from pathlib import Path
from typing import Any

import yaml
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import func, select

from tests.conftest import ROOT, base_config, twoway_cmd
from tests.fuzz import examples
from tests.imap_server import DovecotServer
from worker.app import App
from worker.cli import main
from worker.inbound import SyncResult, classify_context, process_batch, process_message
from worker.leads import import_leads
from worker.mailbox import FetchedMessage
from worker.models import InboundMessage, Lead, LeadEvent, OutboundMessage, Quarantine
from worker.runner import Worker

NOW = datetime(2026, 12, 1, 10, 0, tzinfo=UTC)


def human(i: int, body: str = "Hello, could you tell me more about pricing?") -> bytes:
    msg = EmailMessage()
    msg["From"] = f"Person {i} <person{i}@company{i}.example.org>"
    msg["To"] = "sales@example.com"
    msg["Subject"] = f"Question {i}"
    msg["Date"] = format_datetime(NOW)
    msg["Message-ID"] = f"<q{i}.{time.monotonic_ns()}@company{i}.example.org>"
    msg.set_content(body)
    return msg.as_bytes()


def imap_app(
    database_url: str, tmp_path: Path, dovecot: DovecotServer, user: str, **box: Any
) -> App:
    mailbox = dovecot.mailbox_section(user, idle=False, **box)
    config = base_config(database_url, tmp_path, mailboxes=[mailbox], campaigns=[])
    return App.open(config, lambda: NOW)


def count(app: App, model: Any) -> int:
    with app.transaction() as s:
        return int(s.scalar(select(func.count()).select_from(model)) or 0)


def test_it_reads_each_message_exactly_once_and_changes_no_flags(
    database_url: str,
    tmp_path: Path,
    dovecot: DovecotServer,
    imap_user: str,
    start_worker: Callable[[App], Worker],
) -> None:
    for i in range(30):
        dovecot.append(imap_user, "INBOX", human(i), flags=["\\Seen"] if i % 3 == 0 else [])
    flags = dovecot.flags(imap_user, "INBOX")
    app = imap_app(database_url, tmp_path, dovecot, imap_user, batch_size=7)
    worker = start_worker(app)
    assert worker.run_once().inbound.processed == 30
    assert worker.run_once().inbound.processed == 0
    for i in range(30, 35):
        dovecot.append(imap_user, "INBOX", human(i))
    assert worker.run_once().inbound.processed == 5
    assert count(app, InboundMessage) == 35
    assert dovecot.flags(imap_user, "INBOX") == {
        **flags,
        **{u: () for u in dovecot.uids(imap_user, "INBOX") if u not in flags},
    }


def test_it_resyncs_without_duplicates_when_uidvalidity_changes(
    database_url: str,
    tmp_path: Path,
    dovecot: DovecotServer,
    imap_user: str,
    start_worker: Callable[[App], Worker],
) -> None:
    dovecot.create_folder(imap_user, "Leads")
    originals = [human(i) for i in range(10)]
    for raw in originals:
        dovecot.append(imap_user, "Leads", raw)
    app = imap_app(database_url, tmp_path, dovecot, imap_user, folders=["Leads"])
    worker = start_worker(app)
    assert worker.run_once().inbound.processed == 10
    dovecot.delete_folder(imap_user, "Leads")
    dovecot.create_folder(imap_user, "Leads")  # a new UIDVALIDITY
    for raw in [*originals, human(10), human(11)]:
        dovecot.append(imap_user, "Leads", raw)
    result = worker.run_once()
    assert (result.inbound.processed, result.inbound.duplicates) == (2, 10)
    assert count(app, InboundMessage) == 12


def test_it_loses_nothing_and_repeats_nothing_when_killed_mid_sync(
    sqlite_url: str, tmp_path: Path, dovecot: DovecotServer, imap_user: str
) -> None:
    n = 1500
    with dovecot.client(imap_user) as c:
        for i in range(n):
            c.append("INBOX", human(i))
    app = imap_app(sqlite_url, tmp_path, dovecot, imap_user, batch_size=100)
    cfg = tmp_path / "run.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "database": sqlite_url,
                "templates_dir": str(ROOT / "templates"),
                "mailboxes": [dovecot.mailbox_section(imap_user, batch_size=100)],
                "sender": {"from": "Acme Sales <sales@example.com>"},
            }
        )
    )
    env = {**os.environ, "TWOWAY_NOW": NOW.isoformat()}
    cmd = twoway_cmd(cfg, "run", "--once")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while count(app, InboundMessage) < 200 and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    partial = count(app, InboundMessage)
    assert 0 < partial < n, "the kill must land mid-sync"
    assert subprocess.run(cmd, env=env, capture_output=True).returncode == 0
    with app.transaction() as s:
        rows = s.scalar(select(func.count()).select_from(InboundMessage))
        distinct = s.scalar(select(func.count(func.distinct(InboundMessage.message_id))))
    assert rows == distinct == n
    app.close()


def test_it_quarantines_what_it_cannot_process_and_goes_on(sqlite_url: str, tmp_path: Path) -> None:
    config = base_config(sqlite_url, tmp_path, campaigns=[])
    inbox = tmp_path / "inbox"
    (inbox / "new" / "1.good").write_bytes(human(1))
    (inbox / "new" / "2.empty").write_bytes(b"")
    (inbox / "new" / "3.good").write_bytes(human(3))
    cfg = tmp_path / "c.yaml"
    data = config.model_dump(mode="json", by_alias=True, exclude={"path"})
    cfg.write_text(yaml.safe_dump(data))
    env = {"TWOWAY_NOW": NOW.isoformat()}
    run = CliRunner().invoke(main, ["--config", str(cfg), "run", "--once", "--json"], env=env)
    assert run.exit_code == 0, run.output
    listed = CliRunner().invoke(main, ["--config", str(cfg), "quarantine", "list"], env=env)
    assert "#1 sales/INBOX" in listed.output and "cannot parse" in listed.output
    retry = CliRunner().invoke(main, ["--config", str(cfg), "quarantine", "retry", "1"], env=env)
    assert retry.exit_code == 1 and "still failing" in retry.output
    status = CliRunner().invoke(main, ["--config", str(cfg), "status", "--json"], env=env)
    assert '"quarantine": 1' in status.output


@settings(
    max_examples=examples(400),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    st.lists(
        st.binary(max_size=2000)
        | st.text(max_size=2000).map(lambda t: t.encode("utf-8", "surrogateescape")),
        min_size=1,
        max_size=5,
    )
)
def test_it_never_raises_out_of_the_sync_and_loses_nothing(
    tmp_path: Path, raws: list[bytes]
) -> None:
    app = _fuzz_app(tmp_path)
    mb = app.config.mailboxes[0]
    ctx = classify_context(app.config)
    result = SyncResult()
    start = count(app, InboundMessage) + count(app, Quarantine)
    for raw in raws:
        _fuzz_app.uid += 1  # type: ignore[attr-defined]
        process_message(app, mb, FetchedMessage("INBOX", 1, _fuzz_app.uid, raw, ()), ctx, result)  # type: ignore[attr-defined]
    seen = result.processed + result.duplicates + result.quarantined
    assert seen == len(raws)
    stored = count(app, InboundMessage) + count(app, Quarantine)
    assert stored - start == result.processed + result.quarantined


def _fuzz_app(tmp_path: Path) -> App:
    if getattr(_fuzz_app, "app", None) is None:
        d = tmp_path / "fuzz"
        d.mkdir(exist_ok=True)
        _fuzz_app.app = App.open(base_config(f"sqlite:///{d / 'f.db'}", d), lambda: NOW)  # type: ignore[attr-defined]
        _fuzz_app.uid = 0  # type: ignore[attr-defined]
    return _fuzz_app.app  # type: ignore[attr-defined, no-any-return]


def test_it_records_the_events_of_a_message_once(sqlite_url: str, tmp_path: Path) -> None:
    """Processing the same bytes again (a crash before the UID commit) changes nothing."""
    config = base_config(sqlite_url, tmp_path, campaigns=[], unknown_senders="create_lead")
    app = App.open(config, lambda: NOW)
    raw = human(7)
    result = SyncResult()
    ctx = classify_context(config)
    for uid in (1, 1, 2):
        process_message(
            app, config.mailboxes[0], FetchedMessage("INBOX", 1, uid, raw, ()), ctx, result
        )
    assert (result.processed, result.duplicates) == (1, 2)
    assert count(app, LeadEvent) == 1
    app.close()


def test_a_lead_one_message_makes_is_matched_by_the_next_in_the_same_batch(
    database_url: str, tmp_path: Path
) -> None:
    """The batch looks its senders up once; a lead made meanwhile must still be found."""
    config = base_config(database_url, tmp_path, campaigns=[], unknown_senders="create_lead")
    app = App.open(config, lambda: NOW)
    batch = [
        FetchedMessage("INBOX", 1, uid, human(8, body), ())
        for uid, body in ((1, "Hello, what does it cost?"), (2, "And is there a trial?"))
    ]
    result = SyncResult()
    process_batch(app, config.mailboxes[0], batch, classify_context(config), result)
    assert result.processed == 2, result
    with app.transaction() as s:
        rows = s.execute(
            select(InboundMessage.match_method, InboundMessage.lead_id).order_by(InboundMessage.uid)
        ).all()
        leads = s.scalars(select(Lead.id).where(Lead.email == "person8@company8.example.org"))
        (lead_id,) = leads.all()
    assert [tuple(r) for r in rows] == [("new_lead", lead_id), ("sender", lead_id)]
    app.close()


def test_an_unsubscribe_cancels_the_follow_up_a_reply_queued_in_the_same_batch(
    database_url: str, tmp_path: Path
) -> None:
    """A batch writes its queued emails at its end: the lead who asks to stop in the
    batch's second message must not get the follow-up its first one queued."""
    config = base_config(database_url, tmp_path, campaigns=[])
    app = App.open(config, lambda: NOW)
    with app.transaction() as s:
        import_leads(s, [(2, {"email": "person8@company8.example.org", "first_name": "P"})], NOW)
    with app.transaction() as s:
        token = s.scalar(select(Lead.reply_token))

    def reply(uid: int, body: str) -> FetchedMessage:
        msg = EmailMessage()
        msg["From"] = "Person 8 <person8@company8.example.org>"
        msg["To"] = f"sales+{token}@example.com"
        msg["Subject"] = "Re: Hello"
        msg["Date"] = format_datetime(NOW)
        msg["Message-ID"] = f"<r{uid}@company8.example.org>"
        msg.set_content(body)
        return FetchedMessage("INBOX", 1, uid, msg.as_bytes(), ())

    batch = [
        reply(1, "Hello, what does it cost for 20 seats?"),
        reply(2, "Please unsubscribe me, remove me from your list."),
    ]
    result = SyncResult()
    process_batch(app, config.mailboxes[0], batch, classify_context(config), result)
    assert result.processed == 2, result
    with app.transaction() as s:
        kinds = s.scalars(select(InboundMessage.kind).order_by(InboundMessage.uid)).all()
        queued = dict(
            s.execute(select(OutboundMessage.kind, OutboundMessage.status)).tuples().all()
        )
        why = s.scalar(select(OutboundMessage.last_error).where(OutboundMessage.kind == "followup"))
    assert kinds == ["reply", "unsubscribe"]
    assert queued["followup"] == "cancelled" and why == "the lead unsubscribed"
    assert queued["handoff"] == "queued"  # the rep still hears of the reply
    app.close()


CORPUS = sorted((ROOT / "tests" / "emails").glob("*.eml"))


def _mutate(data: bytes, rng_bytes: bytes) -> bytes:
    """Flip, drop and duplicate bytes at positions chosen by hypothesis."""
    out = bytearray(data)
    for i in range(0, len(rng_bytes) - 2, 3):
        if not out:
            break
        pos = (rng_bytes[i] << 8 | rng_bytes[i + 1]) % len(out)
        op = rng_bytes[i + 2] % 3
        if op == 0:
            out[pos] = rng_bytes[i + 2]
        elif op == 1:
            del out[pos : pos + rng_bytes[i + 2] % 64]
        else:
            out[pos:pos] = out[pos : pos + rng_bytes[i + 2] % 64]
    return bytes(out)


@settings(
    max_examples=examples(60),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    picks=st.lists(
        st.integers(min_value=0, max_value=max(len(CORPUS) - 1, 0)), min_size=1, max_size=6
    ),
    noise=st.binary(min_size=3, max_size=90),
)
def test_it_classifies_or_quarantines_every_mutated_message_in_a_whole_pass(
    tmp_path_factory: Any, picks: list[int], noise: bytes
) -> None:
    d = tmp_path_factory.mktemp("pass")
    config = base_config(f"sqlite:///{d / 'f.db'}", d)
    app = App.open(config, lambda: NOW)
    inbox = d / "inbox" / "new"
    for n, i in enumerate(picks):
        (inbox / f"{n}.eml").write_bytes(_mutate(CORPUS[i].read_bytes(), noise[n:] + noise[:n]))
    try:
        with Worker(app) as worker:
            result = worker.run_once()  # must not raise
        r = result.inbound
        assert r.processed + r.duplicates + r.quarantined == len(picks)
        assert count(app, InboundMessage) + count(app, Quarantine) == r.processed + r.quarantined
    finally:
        app.close()


def test_it_files_processed_mail_into_folders_only_when_configured(
    sqlite_url: str,
    tmp_path: Path,
    dovecot: DovecotServer,
    imap_user: str,
    start_worker: Callable[[App], Worker],
) -> None:
    from tests import mails

    dovecot.create_folder(imap_user, "Newsletters")
    dovecot.append(imap_user, "INBOX", human(1))
    dovecot.append(imap_user, "INBOX", mails.newsletter("sales@example.com", NOW))
    app = imap_app(sqlite_url, tmp_path, dovecot, imap_user, move_processed={"bulk": "Newsletters"})
    worker = start_worker(app)
    result = worker.run_once()
    assert result.inbound.kinds == {"reply": 1, "bulk": 1}
    assert len(dovecot.uids(imap_user, "INBOX")) == 1  # the human's message stays put
    assert len(dovecot.uids(imap_user, "Newsletters")) == 1  # the newsletter was filed
    with app.transaction() as s:
        assert s.scalar(select(func.count()).select_from(InboundMessage)) == 2


def test_the_briefings_thread_gives_every_time_in_utc(database_url: str, tmp_path: Path) -> None:
    """The thread's times say "UTC": the prospect's Date in her own zone is converted, both
    for a message read alone and for the second of a batch (whose earlier one is read
    back from the database)."""
    config = base_config(database_url, tmp_path, campaigns=[], unknown_senders="create_lead")
    app = App.open(config, lambda: NOW)

    def reply(uid: int, date: str, body: str) -> FetchedMessage:
        msg = EmailMessage()
        msg["From"] = "Ines Ruiz <ines@zona.example.org>"
        msg["To"] = "sales@example.com"
        msg["Subject"] = "Question"
        msg["Date"] = date
        msg["Message-ID"] = f"<z{uid}@zona.example.org>"
        msg.set_content(body)
        return FetchedMessage("INBOX", 1, uid, msg.as_bytes(), ())

    mb, ctx = config.mailboxes[0], classify_context(config)
    first = reply(1, "Tue, 01 Dec 2026 11:30:00 +0200", "Hello, what does it cost?")
    process_message(app, mb, first, ctx, SyncResult())
    second = [reply(2, "Tue, 01 Dec 2026 05:45:00 -0300", "And is there a trial?")]
    process_batch(app, mb, second, ctx, SyncResult())
    with app.transaction() as s:
        threads = s.scalars(
            select(OutboundMessage.context)
            .where(OutboundMessage.kind == "handoff")
            .order_by(OutboundMessage.id)
        ).all()
        types = s.scalars(select(LeadEvent.type).order_by(LeadEvent.id)).all()
    assert [[(m["at"], m["summary"]) for m in t["thread"]] for t in threads] == [
        [("2026-12-01 08:45 UTC", "this message"), ("2026-12-01 09:30 UTC", "reply")],
    ], types
    app.close()
