"""Mail sources against a real Dovecot (tests/imap_server.py) and real Maildirs on disk."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.imap_server import DovecotServer
from worker.config import MailboxConfig
from worker.mailbox import (
    UIDLIST_NAME,
    FetchedMessage,
    ImapSource,
    MailboxError,
    MaildirSource,
    open_source,
    probe_imap,
)


def message(n: int, body: str = "Hello, I would like a demo.") -> bytes:
    return (
        f"From: Lead {n} <lead{n}@customer.test>\r\n"
        f"To: sales@example.test\r\n"
        f"Subject: Re: our offer #{n}\r\n"
        f"Message-ID: <reply-{n}@customer.test>\r\n"
        f"Date: Tue, 01 Dec 2026 10:00:00 +0000\r\n"
        f"\r\n{body}\r\n-- \r\nLead {n}\r\n"
    ).encode()


def all_messages(batches: Iterator[list[FetchedMessage]]) -> list[FetchedMessage]:
    return [m for batch in batches for m in batch]


@pytest.fixture
def source(dovecot: DovecotServer, imap_user: str) -> Iterator[ImapSource]:
    """A connected IMAP source for a fresh, empty mailbox."""
    src = ImapSource(dovecot.mailbox_config(imap_user))
    src.connect()
    yield src
    src.close()


def later(seconds: float, action: object) -> threading.Thread:
    """Run `action` in a thread after `seconds` (another client doing something)."""
    assert callable(action)

    def run() -> None:
        time.sleep(seconds)
        action()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


# --- IMAP: reading -----------------------------------------------------------------------


@pytest.mark.imap
def test_it_fetches_every_new_message_in_uid_order_in_batches(
    dovecot: DovecotServer, imap_user: str, source: ImapSource
) -> None:
    sent = {dovecot.append(imap_user, "INBOX", message(i)): message(i) for i in range(25)}

    batches = list(source.fetch_new("INBOX", after_uid=0, batch_size=10))

    assert [len(b) for b in batches] == [10, 10, 5]
    got = [m for b in batches for m in b]
    assert [m.uid for m in got] == sorted(sent)
    assert all(m.raw == sent[m.uid] for m in got)
    assert {m.folder for m in got} == {"INBOX"}
    assert {m.uidvalidity for m in got} == {source.select("INBOX").uidvalidity}

    last = got[-1].uid
    assert list(source.fetch_new("INBOX", after_uid=last, batch_size=10)) == []

    new_uid = dovecot.append(imap_user, "INBOX", message(99))
    again = all_messages(source.fetch_new("INBOX", after_uid=last, batch_size=10))
    assert [(m.uid, m.raw) for m in again] == [(new_uid, message(99))]


@pytest.mark.imap
def test_it_never_changes_flags_and_reads_mail_a_person_already_opened(
    dovecot: DovecotServer, imap_user: str, source: ImapSource
) -> None:
    unread = dovecot.append(imap_user, "INBOX", message(1))
    opened = dovecot.append(imap_user, "INBOX", message(2), flags=["\\Seen"])
    before = dovecot.flags(imap_user, "INBOX")

    got = all_messages(source.fetch_new("INBOX", after_uid=0, batch_size=50))

    assert [m.uid for m in got] == [unread, opened]
    assert dovecot.flags(imap_user, "INBOX") == before
    assert "\\Seen" not in dovecot.flags(imap_user, "INBOX")[unread]
    assert {m.uid: m.flags for m in got} == {unread: (), opened: ("\\Seen",)}


@pytest.mark.imap
def test_it_shows_a_new_uidvalidity_when_a_folder_is_recreated(
    dovecot: DovecotServer, imap_user: str, source: ImapSource
) -> None:
    dovecot.append(imap_user, "Replies", message(1))
    first = source.select("Replies")

    dovecot.delete_folder(imap_user, "Replies")
    dovecot.create_folder(imap_user, "Replies")
    second = source.select("Replies")

    assert second.uidvalidity != first.uidvalidity
    assert (first.exists, second.exists) == (1, 0)


@pytest.mark.imap
def test_it_keeps_fetching_the_right_folder_when_used_between_batches(
    dovecot: DovecotServer, imap_user: str, source: ImapSource
) -> None:
    for i in range(5):
        dovecot.append(imap_user, "INBOX", message(i))
    dovecot.append(imap_user, "Sent", message(100))

    got = []
    for batch in source.fetch_new("INBOX", after_uid=0, batch_size=2):
        got.extend(batch)
        assert source.has_message_id("Sent", "<reply-100@customer.test>")

    assert [m.raw for m in got] == [message(i) for i in range(5)]


@pytest.mark.imap
def test_it_names_a_missing_folder(source: ImapSource) -> None:
    with pytest.raises(MailboxError) as err:
        list(source.fetch_new("No Such Folder", after_uid=0, batch_size=10))

    assert err.value.step == "folder"
    assert not err.value.temporary
    assert "No Such Folder" in str(err.value)


# --- IMAP: waiting -----------------------------------------------------------------------


@pytest.mark.imap
def test_it_wakes_up_within_seconds_when_mail_arrives_during_idle(
    dovecot: DovecotServer, imap_user: str, source: ImapSource
) -> None:
    assert source.supports_idle
    list(source.fetch_new("INBOX", after_uid=0, batch_size=10))
    later(0.5, lambda: dovecot.append(imap_user, "INBOX", message(1)))

    started = time.monotonic()
    woke = source.wait(timeout=30, stop=threading.Event())

    assert woke is True
    assert time.monotonic() - started < 5
    assert len(all_messages(source.fetch_new("INBOX", after_uid=0, batch_size=10))) == 1


@pytest.mark.imap
def test_it_wakes_at_once_for_mail_that_came_after_the_last_fetch(
    dovecot: DovecotServer, imap_user: str, source: ImapSource
) -> None:
    list(source.fetch_new("INBOX", after_uid=0, batch_size=10))
    dovecot.append(imap_user, "INBOX", message(1))

    started = time.monotonic()
    assert source.wait(timeout=30, stop=threading.Event()) is True
    assert time.monotonic() - started < 1


@pytest.mark.imap
def test_it_stops_waiting_promptly_when_asked_and_stays_usable(
    dovecot: DovecotServer, imap_user: str, source: ImapSource
) -> None:
    stop = threading.Event()
    later(0.3, stop.set)

    started = time.monotonic()
    woke = source.wait(timeout=30, stop=stop)

    assert woke is False
    assert time.monotonic() - started < 1.5
    dovecot.append(imap_user, "INBOX", message(1))
    assert len(all_messages(source.fetch_new("INBOX", after_uid=0, batch_size=10))) == 1


@pytest.mark.imap
def test_it_returns_false_when_nothing_arrives_before_the_timeout(source: ImapSource) -> None:
    started = time.monotonic()
    assert source.wait(timeout=1.0, stop=threading.Event()) is False
    assert 0.9 <= time.monotonic() - started < 3


@pytest.mark.imap
def test_it_only_sleeps_when_idle_is_turned_off(dovecot: DovecotServer, imap_user: str) -> None:
    src = ImapSource(dovecot.mailbox_config(imap_user, idle=False))
    src.connect()
    try:
        assert src.supports_idle is False
        later(0.2, lambda: dovecot.append(imap_user, "INBOX", message(1)))
        started = time.monotonic()
        assert src.wait(timeout=1.0, stop=threading.Event()) is False
        assert time.monotonic() - started >= 0.9
    finally:
        src.close()


# --- IMAP: faults ------------------------------------------------------------------------


@pytest.mark.imap
@pytest.mark.slow
def test_it_raises_a_temporary_error_after_a_server_restart_and_reconnects(
    dovecot: DovecotServer, imap_user: str, source: ImapSource
) -> None:
    dovecot.append(imap_user, "INBOX", message(1))
    source.select("INBOX")

    dovecot.restart()

    with pytest.raises(MailboxError) as err:
        source.select("INBOX")
    assert err.value.temporary
    with pytest.raises(MailboxError):
        source.select("INBOX")  # stays disconnected until connect(), never half-works

    source.connect()
    assert [m.raw for m in all_messages(source.fetch_new("INBOX", 0, 10))] == [message(1)]


@pytest.mark.imap
@pytest.mark.slow
def test_it_raises_a_temporary_error_when_the_server_goes_away_during_idle(
    dovecot: DovecotServer, source: ImapSource
) -> None:
    restarting = later(0.5, dovecot.restart)

    started = time.monotonic()
    with pytest.raises(MailboxError) as err:
        source.wait(timeout=30, stop=threading.Event())

    assert err.value.temporary
    assert time.monotonic() - started < 10
    restarting.join()
    source.connect()
    source.select("INBOX")


# --- IMAP: probe, TLS, login -------------------------------------------------------------


@pytest.mark.imap
def test_it_probes_a_working_mailbox_as_fine(dovecot: DovecotServer, imap_user: str) -> None:
    assert probe_imap(dovecot.mailbox_config(imap_user)) is None


@pytest.mark.imap
def test_it_probes_a_wrong_password_as_an_auth_failure_without_showing_it(
    dovecot: DovecotServer, imap_user: str
) -> None:
    problem = probe_imap(dovecot.mailbox_config(imap_user, password="Wr0ngPassw0rd"))

    assert problem is not None
    assert problem.startswith("auth failed")
    assert "Hint:" in problem
    assert "Wr0ngPassw0rd" not in problem


@pytest.mark.imap
def test_it_probes_a_closed_port_as_a_connect_failure(dovecot: DovecotServer) -> None:
    from tests.imap_server import free_port

    problem = probe_imap(dovecot.mailbox_config("sales@example.test", port=free_port()))

    assert problem is not None
    assert problem.startswith("connect failed")
    assert "refused" in problem


@pytest.mark.imap
def test_it_probes_an_unknown_folder_by_name_and_lists_the_real_ones(
    dovecot: DovecotServer, imap_user: str
) -> None:
    cfg = dovecot.mailbox_config(imap_user, folders=("INBOX", "Leads Replies"))

    problem = probe_imap(cfg)

    assert problem is not None
    assert problem.startswith("folder failed")
    assert "'Leads Replies'" in problem
    assert "INBOX" in problem.split("Hint:")[1]


@pytest.mark.imap
def test_it_probes_a_missing_sent_folder(dovecot: DovecotServer, imap_user: str) -> None:
    problem = probe_imap(dovecot.mailbox_config(imap_user, sent_folder="Sent Items"))

    assert problem is not None
    assert "'Sent Items'" in problem


@pytest.mark.imap
def test_it_refuses_a_self_signed_certificate_by_default(
    dovecot: DovecotServer, imap_user: str
) -> None:
    if not dovecot.has_tls:
        pytest.skip("openssl is not installed, the test server has no TLS")
    cfg = dovecot.mailbox_config(imap_user, security="ssl", port=dovecot.tls_port)

    problem = probe_imap(cfg)

    assert problem is not None
    assert problem.startswith("TLS failed")
    assert "certificate" in problem


@pytest.mark.imap
@pytest.mark.parametrize("security", ["ssl", "starttls"])
def test_it_reads_mail_over_tls(dovecot: DovecotServer, imap_user: str, security: str) -> None:
    if not dovecot.has_tls:
        pytest.skip("openssl is not installed, the test server has no TLS")
    port = dovecot.tls_port if security == "ssl" else dovecot.port
    cfg = dovecot.mailbox_config(imap_user, security=security, port=port, verify_tls=False)
    dovecot.append(imap_user, "INBOX", message(1))

    src = ImapSource(cfg)
    src.connect()
    try:
        assert [m.raw for m in all_messages(src.fetch_new("INBOX", 0, 10))] == [message(1)]
    finally:
        src.close()


@pytest.mark.imap
def test_it_tries_xoauth2_when_a_token_is_configured_and_never_shows_the_token(
    dovecot: DovecotServer, imap_user: str
) -> None:
    # This Dovecot offers no XOAUTH2, so the login is refused: what matters is that the
    # token was used instead of a password and does not appear in the error.
    cfg = dovecot.mailbox_config(imap_user, password=None, oauth2_token="ya29.SeCrEtToKeN")

    with pytest.raises(MailboxError) as err:
        ImapSource(cfg).connect()

    assert err.value.step == "auth"
    assert "ya29.SeCrEtToKeN" not in str(err.value)
    assert "ya29.SeCrEtToKeN" not in repr(err.value.args)


@pytest.mark.imap
def test_it_refuses_commands_when_not_connected(dovecot: DovecotServer, imap_user: str) -> None:
    with pytest.raises(MailboxError) as err:
        ImapSource(dovecot.mailbox_config(imap_user)).select("INBOX")
    assert err.value.temporary


# --- IMAP: writing -----------------------------------------------------------------------


@pytest.mark.imap
def test_it_finds_a_message_by_message_id(
    dovecot: DovecotServer, imap_user: str, source: ImapSource
) -> None:
    dovecot.append(imap_user, "Sent", message(7))

    assert source.has_message_id("Sent", "<reply-7@customer.test>") is True
    assert source.has_message_id("Sent", "<reply-8@customer.test>") is False


@pytest.mark.imap
def test_it_appends_a_message_that_others_then_see(
    dovecot: DovecotServer, imap_user: str, source: ImapSource
) -> None:
    dovecot.create_folder(imap_user, "Sent")

    source.append("Sent", message(3), flags=["\\Seen"])

    assert source.has_message_id("Sent", "<reply-3@customer.test>")
    assert list(dovecot.flags(imap_user, "Sent").values()) == [("\\Seen",)]


@pytest.mark.imap
def test_it_moves_messages_into_a_new_folder(
    dovecot: DovecotServer, imap_user: str, source: ImapSource
) -> None:
    keep = dovecot.append(imap_user, "INBOX", message(1))
    gone = dovecot.append(imap_user, "INBOX", message(2))
    validity = source.select("INBOX").uidvalidity

    source.move("INBOX", [gone], "Processed", uidvalidity=validity)

    assert dovecot.uids(imap_user, "INBOX") == [keep]
    assert len(dovecot.uids(imap_user, "Processed")) == 1
    assert source.has_message_id("Processed", "<reply-2@customer.test>")
    # Reading goes on as before after a move.
    assert [m.uid for m in all_messages(source.fetch_new("INBOX", 0, 10))] == [keep]


@pytest.mark.imap
def test_it_refuses_to_move_uids_of_an_old_uidvalidity(
    dovecot: DovecotServer, imap_user: str, source: ImapSource
) -> None:
    uid = dovecot.append(imap_user, "Replies", message(1))
    old = source.select("Replies").uidvalidity
    dovecot.delete_folder(imap_user, "Replies")
    dovecot.append(imap_user, "Replies", message(2))

    with pytest.raises(MailboxError):
        source.move("Replies", [uid], "Processed", uidvalidity=old)

    assert dovecot.uids(imap_user, "Processed") == []
    assert dovecot.uids(imap_user, "Replies") == [uid]


# --- Maildir -----------------------------------------------------------------------------


def make_maildir(root: Path) -> Path:
    for sub in ("tmp", "new", "cur"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    return root


def deliver(root: Path, name: str, raw: bytes, sub: str = "new") -> Path:
    path = root / sub / name
    path.write_bytes(raw)
    return path


def maildir_files(root: Path) -> set[str]:
    return {f"{sub}/{n}" for sub in ("new", "cur") for n in os.listdir(root / sub)}


def maildir_source(root: Path, **overrides: object) -> MaildirSource:
    fields: dict[str, object] = {"name": "demo", "kind": "maildir", "path": str(root)}
    fields.update(overrides)
    src = open_source(MailboxConfig.model_validate(fields))
    assert isinstance(src, MaildirSource)
    src.connect()
    return src


def test_it_gives_maildir_messages_stable_uids_and_never_moves_the_files(tmp_path: Path) -> None:
    root = make_maildir(tmp_path / "Maildir")
    deliver(root, "1700000001.A.host", message(1))
    deliver(root, "1700000002.B.host:2,S", message(2), sub="cur")
    files_before = maildir_files(root)

    first = all_messages(maildir_source(root).fetch_new("INBOX", 0, 10))
    again = all_messages(maildir_source(root).fetch_new("INBOX", 0, 10))

    assert [(m.uid, m.raw) for m in first] == [(1, message(1)), (2, message(2))]
    assert [(m.uidvalidity, m.uid) for m in again] == [(m.uidvalidity, m.uid) for m in first]
    assert [m.flags for m in first] == [(), ("\\Seen",)]
    assert maildir_files(root) == files_before


def test_it_picks_up_new_maildir_files_with_higher_uids(tmp_path: Path) -> None:
    root = make_maildir(tmp_path / "Maildir")
    src = maildir_source(root)
    deliver(root, "1700000001.A.host", message(1))
    last = all_messages(src.fetch_new("INBOX", 0, 10))[-1].uid

    deliver(root, "1700000003.C.host", message(3))
    deliver(root, "1700000004.D.host", message(4))
    new = all_messages(src.fetch_new("INBOX", last, 1))

    assert [m.raw for m in new] == [message(3), message(4)]
    assert [m.uid for m in new] == [last + 1, last + 2]
    assert src.select("INBOX").uidnext == last + 3


def test_it_keeps_the_uid_when_a_mail_program_marks_a_message_read(tmp_path: Path) -> None:
    root = make_maildir(tmp_path / "Maildir")
    path = deliver(root, "1700000001.A.host", message(1))
    src = maildir_source(root)
    (uid,) = [m.uid for m in all_messages(src.fetch_new("INBOX", 0, 10))]

    path.rename(root / "cur" / "1700000001.A.host:2,S")

    got = all_messages(src.fetch_new("INBOX", 0, 10))
    assert [(m.uid, m.flags) for m in got] == [(uid, ("\\Seen",))]


def test_it_starts_a_new_uidvalidity_when_the_uid_list_is_removed(tmp_path: Path) -> None:
    root = make_maildir(tmp_path / "Maildir")
    deliver(root, "1700000001.A.host", message(1))
    src = maildir_source(root)
    before = src.select("INBOX")

    (root / UIDLIST_NAME).unlink()
    after = src.select("INBOX")

    assert after.uidvalidity != before.uidvalidity
    assert after.exists == 1


def test_it_wakes_when_a_file_lands_in_the_maildir(tmp_path: Path) -> None:
    root = make_maildir(tmp_path / "Maildir")
    src = maildir_source(root)
    list(src.fetch_new("INBOX", 0, 10))
    later(0.3, lambda: deliver(root, "1700000009.Z.host", message(9)))

    started = time.monotonic()
    assert src.wait(timeout=10, stop=threading.Event()) is True
    assert time.monotonic() - started < 2


def test_it_stops_waiting_on_a_maildir_when_asked(tmp_path: Path) -> None:
    src = maildir_source(make_maildir(tmp_path / "Maildir"))
    stop = threading.Event()
    later(0.2, stop.set)

    started = time.monotonic()
    assert src.wait(timeout=10, stop=stop) is False
    assert time.monotonic() - started < 1.5


def test_it_appends_finds_and_moves_maildir_messages(tmp_path: Path) -> None:
    root = make_maildir(tmp_path / "Maildir")
    src = maildir_source(root, folders=["INBOX"], sent_folder="Sent")

    src.append("Sent", message(5), flags=["\\Seen"])
    src.append("INBOX", message(6))
    (six,) = all_messages(src.fetch_new("INBOX", 0, 10))
    src.move("INBOX", [six.uid], "Processed", uidvalidity=six.uidvalidity)

    assert src.has_message_id("Sent", "<reply-5@customer.test>")
    assert not src.has_message_id("Sent", "<reply-6@customer.test>")
    assert [m.flags for m in all_messages(src.fetch_new("Sent", 0, 10))] == [("\\Seen",)]
    assert all_messages(src.fetch_new("INBOX", 0, 10)) == []
    assert [m.raw for m in all_messages(src.fetch_new("Processed", 0, 10))] == [message(6)]
    assert (root / ".Processed" / "maildirfolder").exists()


def test_it_names_a_path_that_is_not_a_maildir(tmp_path: Path) -> None:
    cfg = MailboxConfig.model_validate({"name": "x", "kind": "maildir", "path": str(tmp_path)})

    with pytest.raises(MailboxError) as err:
        open_source(cfg).connect()

    assert str(tmp_path) in str(err.value)
    assert not err.value.temporary


def test_a_login_refused_while_the_server_shuts_down_is_retried_soon() -> None:
    """Dovecot answers a LOGIN that arrives during its shutdown with a plain "NO Shutting
    down" (seen when a test stopped it as a worker logged in): a temporary failure, so
    the worker retries with short backoff instead of waiting as after a wrong password.
    RFC 5530's AUTHENTICATIONFAILED stays permanent."""
    from imapclient.exceptions import LoginError

    from worker.mailbox import _translate

    down = _translate(LoginError("b'Shutting down.'"), "auth", "as 'sales@example.test'")
    assert down.step == "auth" and down.temporary, down
    busy = _translate(LoginError("b'[UNAVAILABLE] Internal error'"), "auth", "as 'x'")
    assert busy.temporary
    wrong = _translate(
        LoginError("b'[AUTHENTICATIONFAILED] Authentication failed.'"), "auth", "as 'x'"
    )
    assert wrong.step == "auth" and not wrong.temporary
    assert "Shutting down" in str(down) and "sales@example.test" in str(down)
