"""The mailer against a real SMTP server (aiosmtpd on 127.0.0.1) and a real Maildir."""

from __future__ import annotations

import mailbox
import socket
import ssl
import time
from collections.abc import Callable
from email.message import EmailMessage
from pathlib import Path

import pytest

from tests.smtp_server import TOKEN, USER, SmtpServer
from worker.compose import as_wire_bytes, compose, new_message_id
from worker.config import SmtpConfig
from worker.mailer import Mailer, SendResult, probe_smtp

BOUNCES = "bounces@acme.example"


def message(to: str = "maya@northwind.example", subject: str = "Welcome, Maya") -> EmailMessage:
    return compose(
        from_addr="sales@acme.example",
        from_name="Acme Sales",
        to_addr=to,
        to_name="",
        subject=subject,
        text="Hi,\n\nWelcome.\n",
        html="<p>Hi,</p><p>Welcome.</p>",
        message_id=new_message_id("acme.example"),
        domain="acme.example",
    )


class Sleeps:
    """Records the waits the mailer asks for, instead of waiting."""

    def __init__(self) -> None:
        self.delays: list[float] = []

    def __call__(self, seconds: float) -> None:
        self.delays.append(seconds)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_it_delivers_messages_with_their_envelope(smtp_server: SmtpServer) -> None:
    with Mailer(smtp_server.config()) as mailer:
        result = mailer.send(message(), BOUNCES, ["maya@northwind.example"])
    assert result == SendResult("sent", 250, "accepted")
    [got] = smtp_server.messages
    assert got.envelope_from == BOUNCES
    assert got.rcpts == ("maya@northwind.example",)
    parsed = got.parsed()
    assert parsed["Subject"] == "Welcome, Maya"
    assert parsed["To"] == "maya@northwind.example"
    assert parsed["X-Twoway-Loop"] == "acme.example"


def test_it_reuses_one_connection_for_a_batch(smtp_server: SmtpServer) -> None:
    with Mailer(smtp_server.config()) as mailer:
        results = [
            mailer.send(message(f"lead{i}@example.net"), BOUNCES, [f"lead{i}@example.net"])
            for i in range(5)
        ]
    assert [r.status for r in results] == ["sent"] * 5
    assert smtp_server.recipients() == [f"lead{i}@example.net" for i in range(5)]
    assert smtp_server.connections == 1


@pytest.mark.parametrize("code", [421, 451])
def test_it_retries_a_temporary_failure_and_delivers_exactly_once(
    smtp_server: SmtpServer, code: int
) -> None:
    sleeps = Sleeps()
    smtp_server.fail_next(2, code)
    with Mailer(smtp_server.config(), retries=3, base_delay=0.5, sleep=sleeps) as mailer:
        result = mailer.send(message(), BOUNCES, ["maya@northwind.example"])
    assert result.status == "sent"
    assert len(smtp_server.messages) == 1
    # Two waits, growing exponentially (0.5 s, then 1 s) plus at most 0.5 s of jitter.
    assert len(sleeps.delays) == 2
    assert 0.5 <= sleeps.delays[0] <= 1.0
    assert 1.0 <= sleeps.delays[1] <= 1.5


def test_it_gives_up_after_the_bounded_retries_and_reports_temporary(
    smtp_server: SmtpServer,
) -> None:
    sleeps = Sleeps()
    smtp_server.fail_next(10, 451)
    with Mailer(smtp_server.config(), retries=3, base_delay=1, max_delay=3, sleep=sleeps) as m:
        result = m.send(message(), BOUNCES, ["maya@northwind.example"])
    assert result.status == "temporary"
    assert result.code == 451
    assert result.enhanced_status == "4.3.0"
    assert smtp_server.messages == []
    assert len(sleeps.delays) == 3  # four attempts in all
    assert len(smtp_server.faults.replies) == 10 - 4
    assert all(d <= 3 for d in sleeps.delays)  # capped at max_delay


def test_it_never_retries_an_unknown_recipient(smtp_server: SmtpServer) -> None:
    sleeps = Sleeps()
    smtp_server.reject("gone@example.net")
    with Mailer(smtp_server.config(), sleep=sleeps) as mailer:
        result = mailer.send(message("gone@example.net"), BOUNCES, ["gone@example.net"])
        after = mailer.send(message(), BOUNCES, ["maya@northwind.example"])
    assert result.status == "permanent"
    assert result.code == 550
    assert result.refused == ("gone@example.net",)
    assert result.enhanced_status == "5.1.1"
    assert "gone@example.net" in result.message
    assert sleeps.delays == []
    assert after.status == "sent"  # the connection is still good for the next message
    assert smtp_server.connections == 1


def test_it_reports_recipients_refused_within_an_accepted_message(
    smtp_server: SmtpServer,
) -> None:
    smtp_server.reject("gone@example.net")
    with Mailer(smtp_server.config()) as mailer:
        result = mailer.send(message(), BOUNCES, ["maya@northwind.example", "gone@example.net"])
    assert result.status == "sent"
    assert result.refused == ("gone@example.net",)
    assert smtp_server.recipients() == ["maya@northwind.example"]


def test_it_never_retries_a_rejected_message(smtp_server: SmtpServer) -> None:
    sleeps = Sleeps()
    smtp_server.fail_permanently_next(1)
    with Mailer(smtp_server.config(), sleep=sleeps) as mailer:
        result = mailer.send(message(), BOUNCES, ["maya@northwind.example"])
    assert (result.status, result.code, result.enhanced_status) == ("permanent", 554, "5.7.1")
    assert sleeps.delays == []
    assert smtp_server.messages == []


def test_it_reconnects_when_the_server_drops_an_idle_connection_mid_batch(
    smtp_server: SmtpServer,
) -> None:
    sleeps = Sleeps()
    with Mailer(smtp_server.config(), sleep=sleeps) as mailer:
        first = [mailer.send(message(f"a{i}@example.net"), BOUNCES, [f"a{i}@example.net"]) for i in range(2)]  # fmt: skip
        smtp_server.drop_connections()
        then = [mailer.send(message(f"b{i}@example.net"), BOUNCES, [f"b{i}@example.net"]) for i in range(2)]  # fmt: skip
    assert [r.status for r in first + then] == ["sent"] * 4
    assert [m.connection for m in smtp_server.messages] == [1, 1, 2, 2]
    assert sleeps.delays == []  # a stale connection is replaced at once, not after a backoff


def test_it_resends_once_when_the_connection_breaks_during_a_transaction(
    smtp_server: SmtpServer,
) -> None:
    smtp_server.drop_next(1)
    with Mailer(smtp_server.config(), sleep=Sleeps()) as mailer:
        result = mailer.send(message(), BOUNCES, ["maya@northwind.example"])
    assert result.status == "sent"
    assert smtp_server.recipients() == ["maya@northwind.example"]
    assert smtp_server.connections == 2


def test_it_logs_in_with_a_password(smtp_auth_server: SmtpServer) -> None:
    assert probe_smtp(smtp_auth_server.config()) is None
    with Mailer(smtp_auth_server.config()) as mailer:
        result = mailer.send(message(), BOUNCES, ["maya@northwind.example"])
    assert result.status == "sent"
    assert smtp_auth_server.messages[0].login == USER


def test_it_logs_in_with_an_oauth2_token(smtp_auth_server: SmtpServer) -> None:
    cfg = smtp_auth_server.config(password=None, oauth2_token=TOKEN)
    with Mailer(cfg) as mailer:
        result = mailer.send(message(), BOUNCES, ["maya@northwind.example"])
    assert result.status == "sent"
    assert smtp_auth_server.messages[0].login == USER
    bad = probe_smtp(smtp_auth_server.config(password=None, oauth2_token="expired"))
    assert bad is not None and bad.startswith("auth failed:") and "OAuth2 token" in bad


def test_it_explains_a_wrong_password_without_revealing_it(smtp_auth_server: SmtpServer) -> None:
    cfg = smtp_auth_server.config(password="not-the-password")
    problem = probe_smtp(cfg)
    assert problem is not None
    assert problem.startswith("auth failed:")
    assert "535" in problem and USER in problem
    assert "Hint: check smtp.username and the password" in problem
    assert "not-the-password" not in problem
    sleeps = Sleeps()
    with Mailer(cfg, sleep=sleeps) as mailer:
        result = mailer.send(message(), BOUNCES, ["maya@northwind.example"])
    assert result.status == "temporary"  # not the message's fault: keep it queued
    assert result.message.startswith("auth failed:")
    assert sleeps.delays == []  # hammering a login with a bad password helps nobody
    assert smtp_auth_server.messages == []


def test_it_names_the_connect_step_for_a_closed_port() -> None:
    cfg = SmtpConfig(kind="smtp", host="127.0.0.1", port=free_port(), security="none")
    problem = probe_smtp(cfg)
    assert problem is not None
    assert problem.startswith("connect failed: 127.0.0.1:")
    assert "Hint: check smtp.host and smtp.port" in problem
    sleeps = Sleeps()
    with Mailer(cfg, retries=2, sleep=sleeps) as mailer:
        result = mailer.send(message(), BOUNCES, ["maya@northwind.example"])
    assert result.status == "temporary"
    assert len(sleeps.delays) == 2


def test_it_names_the_dns_step_for_an_unknown_host() -> None:
    cfg = SmtpConfig(kind="smtp", host="smtp.does-not-exist.invalid", security="starttls")
    problem = probe_smtp(cfg)
    assert problem is not None
    assert problem.startswith("DNS failed: cannot resolve 'smtp.does-not-exist.invalid'")


def test_it_names_the_tls_step_when_starttls_is_not_offered(smtp_server: SmtpServer) -> None:
    problem = probe_smtp(smtp_server.config(security="starttls"))
    assert problem is not None
    assert problem.startswith("TLS failed:") and "STARTTLS" in problem


def test_it_verifies_the_server_certificate_by_default(
    smtp_server_factory: Callable[..., SmtpServer], smtp_tls_context: ssl.SSLContext
) -> None:
    server = smtp_server_factory(tls=smtp_tls_context)
    problem = probe_smtp(server.config(verify_tls=True))
    assert problem is not None
    assert problem.startswith("TLS failed: certificate not trusted")
    with Mailer(server.config(verify_tls=False)) as mailer:  # tests only
        result = mailer.send(message(), BOUNCES, ["maya@northwind.example"])
    assert result.status == "sent"


def test_it_speaks_implicit_tls(
    smtp_server_factory: Callable[..., SmtpServer], smtp_tls_context: ssl.SSLContext
) -> None:
    server = smtp_server_factory(tls=smtp_tls_context, implicit_tls=True, auth=True)
    assert server.config().security == "ssl"
    assert probe_smtp(server.config(verify_tls=True)) is not None
    with Mailer(server.config()) as mailer:
        result = mailer.send(message(), BOUNCES, ["maya@northwind.example"])
    assert result.status == "sent"
    assert server.messages[0].login == USER


def test_it_writes_into_a_maildir_for_local_delivery(tmp_path: Path) -> None:
    cfg = SmtpConfig(kind="maildir", path=tmp_path / "outbox")
    assert probe_smtp(cfg) is None
    msg = message()
    with Mailer(cfg) as mailer:
        result = mailer.send(msg, BOUNCES, ["maya@northwind.example"])
    assert result.status == "sent"
    box = mailbox.Maildir(tmp_path / "outbox", create=False)
    [stored] = list(box)
    assert stored["Message-ID"] == msg["Message-ID"]
    assert stored["Return-Path"] == f"<{BOUNCES}>"
    assert stored["X-Original-To"] == "maya@northwind.example"
    assert list((tmp_path / "outbox" / "tmp").iterdir()) == []
    assert len(list((tmp_path / "outbox" / "new").iterdir())) == 1


def test_it_reports_an_unwritable_maildir(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    problem = probe_smtp(SmtpConfig(kind="maildir", path=blocker / "outbox"))
    assert problem is not None and problem.startswith("maildir failed:")


def test_it_opens_the_transaction_first_and_sends_the_message_on_data(
    smtp_server: SmtpServer,
) -> None:
    raw = message().as_bytes()
    with Mailer(smtp_server.config()) as mailer:
        assert mailer.begin(BOUNCES, ["maya@northwind.example"]) is None
        assert [(t.rcpts, t.delivered) for t in smtp_server.transactions] == [
            (["maya@northwind.example"], False)
        ]  # the server holds the envelope, and nothing has arrived yet
        assert smtp_server.messages == []
        assert mailer.data(raw) == SendResult("sent", 250, "accepted")
    assert [m.rcpts for m in smtp_server.messages] == [("maya@northwind.example",)]
    assert smtp_server.transactions[0].delivered


def test_it_sends_nothing_for_a_transaction_it_resets(smtp_server: SmtpServer) -> None:
    with Mailer(smtp_server.config()) as mailer:
        assert mailer.begin(BOUNCES, ["maya@northwind.example"]) is None
        mailer.reset()
        after = mailer.send(message("next@example.net"), BOUNCES, ["next@example.net"])
    assert after.status == "sent"
    assert smtp_server.recipients() == ["next@example.net"]
    assert smtp_server.connections == 1  # RSET keeps the connection good


def test_it_retries_a_deferred_recipient_before_the_transaction_is_open(
    smtp_server: SmtpServer,
) -> None:
    sleeps = Sleeps()
    smtp_server.defer("maya@northwind.example", times=2)
    with Mailer(smtp_server.config(), retries=3, sleep=sleeps) as mailer:
        assert mailer.begin(BOUNCES, ["maya@northwind.example"]) is None
        result = mailer.data(message().as_bytes())
    assert result.status == "sent"
    assert len(sleeps.delays) == 2
    assert smtp_server.recipients() == ["maya@northwind.example"]


def test_it_reports_a_recipient_refused_at_rcpt_before_any_data(smtp_server: SmtpServer) -> None:
    smtp_server.reject("gone@example.net")
    with Mailer(smtp_server.config(), sleep=Sleeps()) as mailer:
        refused = mailer.begin(BOUNCES, ["gone@example.net"])
    assert refused is not None
    assert (refused.status, refused.code, refused.enhanced_status) == ("permanent", 550, "5.1.1")
    assert refused.refused == ("gone@example.net",)
    assert smtp_server.messages == []


def test_it_opens_the_transaction_again_when_the_connection_dies_before_data(
    smtp_server: SmtpServer,
) -> None:
    sleeps = Sleeps()
    with Mailer(smtp_server.config(), sleep=sleeps) as mailer:
        assert mailer.begin(BOUNCES, ["maya@northwind.example"]) is None
        smtp_server.drop_connections()
        result = mailer.data(message().as_bytes())
    assert result.status == "sent"
    assert len(sleeps.delays) == 1  # the message's own attempt: a backoff, then again
    assert [(t.rcpts, t.delivered) for t in smtp_server.transactions] == [
        (["maya@northwind.example"], False),
        (["maya@northwind.example"], True),
    ]
    assert [m.connection for m in smtp_server.messages] == [2]


def test_it_needs_no_envelope_step_for_a_maildir(tmp_path: Path) -> None:
    with Mailer(SmtpConfig(kind="maildir", path=tmp_path / "outbox")) as mailer:
        assert mailer.begin(BOUNCES, ["maya@northwind.example"]) is None
        assert list((tmp_path / "outbox").glob("*/*")) == []
        assert mailer.data(message().as_bytes()).status == "sent"
    [stored] = list(mailbox.Maildir(tmp_path / "outbox", create=False))
    assert stored["Return-Path"] == f"<{BOUNCES}>"


class Parts:
    """Work for the mailer's waits: `n` parts, each recorded with what the server had
    seen of the current message when it ran."""

    def __init__(self, server: SmtpServer, n: int, fail_at: int | None = None) -> None:
        self.server, self.left, self.fail_at = server, n, fail_at
        self.ran: list[int] = []  # the server's transactions at each part

    def __call__(self) -> bool:
        if self.left == 0:
            return False
        if self.fail_at is not None and len(self.ran) == self.fail_at:
            raise RuntimeError("a part failed")
        self.ran.append(len(self.server.transactions))
        self.left -= 1
        time.sleep(0.0005)  # a part of real work takes time; the server's thread runs
        return self.left > 0


def test_it_runs_the_callers_work_while_it_waits_for_the_servers_replies(
    smtp_server: SmtpServer,
) -> None:
    parts = Parts(smtp_server, 1000)  # more than the waits can take
    raw = as_wire_bytes(message())
    with Mailer(smtp_server.config()) as mailer:
        assert mailer.begin(BOUNCES, ["maya@northwind.example"], meanwhile=parts) is None
        begun = len(parts.ran)
        result = mailer.data(raw, meanwhile=parts)
    assert result.status == "sent"
    assert smtp_server.messages[0].raw.replace(b"\r\n", b"\n") == raw.replace(b"\r\n", b"\n")
    # At least one part in each wait (MAIL, RCPT; DATA and its end), and no more once a
    # reply is there: what is left is the caller's, for later.
    assert begun >= 2 and 4 <= len(parts.ran) < 200


def test_work_left_before_a_retry_is_done_before_the_mailer_sleeps(
    smtp_server: SmtpServer,
) -> None:
    sleeps = Sleeps()
    parts = Parts(smtp_server, 400)
    smtp_server.fail_next(1, 451)
    with Mailer(smtp_server.config(), retries=2, base_delay=0.5, sleep=sleeps) as mailer:
        assert mailer.begin(BOUNCES, ["maya@northwind.example"], meanwhile=parts) is None
        result = mailer.data(as_wire_bytes(message()), meanwhile=parts)
    assert result.status == "sent" and len(smtp_server.messages) == 1
    assert len(sleeps.delays) == 1
    assert parts.left == 0  # a retry's wait is seconds: the caller's work does not wait


def test_a_failing_part_drops_the_connection_and_the_next_message_goes_out(
    smtp_server: SmtpServer,
) -> None:
    parts = Parts(smtp_server, 10, fail_at=0)
    with Mailer(smtp_server.config()) as mailer:
        with pytest.raises(RuntimeError, match="a part failed"):
            mailer.begin(BOUNCES, ["maya@northwind.example"], meanwhile=parts)
        # The MAIL FROM's reply was never read: that session is out of step, so it is
        # gone, and the next message starts on a fresh one.
        result = mailer.send(message(), BOUNCES, ["maya@northwind.example"])
    assert result == SendResult("sent", 250, "accepted")
    assert smtp_server.connections == 2
    assert [m.connection for m in smtp_server.messages] == [2]
