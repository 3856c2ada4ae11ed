"""Outbound transport: SMTP (implicit TLS, STARTTLS or plain on loopback) or a local Maildir.

This is the only module that imports smtplib and tenacity. A Mailer keeps one SMTP
connection open across a batch and reconnects when the server drops it. A message goes
out in two steps, `begin()` (MAIL FROM, RCPT TO) and `data()` (DATA), so the outbox can
claim its row in between (`begin` runs the claim while the server answers RCPT). Within
a step, 4xx replies and connection errors are retried a bounded number of times with
exponential backoff and jitter; a 5xx is never retried. What happens after that (attempt
counters, the next attempt time) is the caller's business and lives in the database, not
in a sleeping stack frame.
"""

from __future__ import annotations

import contextlib
import io
import logging
import mailbox
import re
import select
import smtplib
import socket
import ssl
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from email.generator import BytesGenerator
from email.message import EmailMessage
from email.policy import EmailPolicy
from types import TracebackType
from typing import Literal, NoReturn, TypeVar

from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception,
    retry_if_result,
    stop_after_attempt,
    wait_exponential_jitter,
)

from worker.config import SmtpConfig

logger = logging.getLogger(__name__)

_ENHANCED = re.compile(r"\b([245]\.\d{1,3}\.\d{1,3})\b")
# A connection idle this long may have been closed by the server (most close after 60 s to
# 5 min): check it with a NOOP before use rather than spending a retry on it.
_IDLE_CHECK_SECONDS = 30.0


@dataclass(frozen=True)
class SendResult:
    """What became of one message.

    `status` is "sent" (the server accepted it for at least one recipient), "temporary"
    (not sent; try again later) or "permanent" (refused; do not try again). `code` is the
    SMTP reply code when there was one, `refused` the recipients refused permanently, and
    `enhanced_status` the RFC 3463 code ("5.1.1") when the server gave one.
    """

    status: Literal["sent", "temporary", "permanent"]
    code: int | None
    message: str
    refused: tuple[str, ...] = ()
    enhanced_status: str | None = None


class _StepError(Exception):
    """Opening the connection failed at `step` (DNS, connect, TLS, auth).

    `retry` is False for what retrying now cannot fix (a refused login, an untrusted
    certificate, a missing secret): a configuration problem, not a passing one.
    """

    def __init__(
        self, step: str, detail: str, hint: str, *, code: int | None = None, retry: bool = True
    ) -> None:
        super().__init__(f"{step} failed: {detail}")
        self.step = step
        self.detail = detail
        self.hint = hint
        self.code = code
        self.retry = retry

    def describe(self) -> str:
        return f"{self.step} failed: {self.detail}. Hint: {self.hint}"

    def result(self) -> SendResult:
        """What this means for the message: temporary, unless the server refused us with
        a 5xx greeting (it will not take mail from here)."""
        final = self.code is not None and self.code >= 500 and self.step == "connect"
        return SendResult("permanent" if final else "temporary", self.code, self.describe())


def _text(resp: bytes | str) -> str:
    if isinstance(resp, bytes):
        resp = resp.decode("utf-8", "replace")
    return " ".join(resp.split())


def _one_line(value: str) -> str:
    return "".join(ch for ch in value if ch >= " " and ch != "\x7f")


def _enhanced(resp: str) -> str | None:
    m = _ENHANCED.search(resp)
    return m.group(1) if m else None


def _tls_context(cfg: SmtpConfig) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    if not cfg.verify_tls:
        # Only for tests and self-signed lab servers; the config default is to verify.
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def _xoauth2(user: str, token: str) -> Callable[..., str]:
    """The SASL XOAUTH2 responder for smtplib's `auth()`: the initial response is
    "user=..^Aauth=Bearer ..^A^A"; on an error challenge answer empty so the server sends
    its final (error) reply."""

    def respond(challenge: bytes | None = None) -> str:
        if challenge is not None:
            return ""
        return f"user={user}\x01auth=Bearer {token}\x01\x01"

    return respond


def _open(cfg: SmtpConfig) -> smtplib.SMTP:
    """Connect, secure and log in; raise _StepError naming the step that failed."""
    host = cfg.host or ""
    port = cfg.effective_port
    try:
        socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise _StepError(
            "DNS", f"cannot resolve {host!r} ({e.strerror})", "check smtp.host and the DNS"
        ) from None
    ctx = _tls_context(cfg)
    conn: smtplib.SMTP
    try:
        if cfg.security == "ssl":
            conn = smtplib.SMTP_SSL(host, port, timeout=cfg.timeout, context=ctx)
        else:
            conn = smtplib.SMTP(host, port, timeout=cfg.timeout)
    except ssl.SSLError as e:
        raise _tls_error(e, cfg) from None
    except smtplib.SMTPConnectError as e:
        raise _StepError(
            "connect",
            f"{host}:{port} answered {e.smtp_code} {_text(e.smtp_error)}",
            "the server refuses connections from here right now",
            code=e.smtp_code,
        ) from None
    except (OSError, smtplib.SMTPException) as e:
        raise _StepError(
            "connect",
            f"{host}:{port}: {e or type(e).__name__}",
            "check smtp.host and smtp.port (465 is for security: ssl, 587 for starttls) "
            "and that a firewall lets the connection through",
        ) from None
    try:
        conn.ehlo()
        if cfg.security == "starttls":
            if not conn.has_extn("starttls"):
                raise _StepError(
                    "TLS",
                    f"{host}:{port} does not offer STARTTLS",
                    "use security: ssl (usually port 465), or a port that offers STARTTLS",
                    retry=False,
                )
            conn.starttls(context=ctx)
            conn.ehlo()
        _login(conn, cfg)
    except _StepError:
        _abandon(conn)
        raise
    except ssl.SSLError as e:
        _abandon(conn)
        raise _tls_error(e, cfg) from None
    except (OSError, smtplib.SMTPException) as e:
        _abandon(conn)
        raise _StepError(
            "connect",
            f"{host}:{port} closed the session: {e or type(e).__name__}",
            "check that smtp.security matches the port",
        ) from None
    return conn


def _tls_error(e: ssl.SSLError, cfg: SmtpConfig) -> _StepError:
    if isinstance(e, ssl.SSLCertVerificationError):
        return _StepError(
            "TLS",
            f"certificate not trusted: {e.verify_message or e.reason}",
            "the server's certificate does not match smtp.host or is not signed by a "
            "trusted authority; fix the certificate or the host name",
            retry=False,
        )
    return _StepError(
        "TLS",
        f"handshake with {cfg.host}:{cfg.effective_port} failed: {e.reason or e}",
        "check smtp.security: ssl for implicit TLS (port 465), starttls for port 587",
        retry=False,
    )


def _login(conn: smtplib.SMTP, cfg: SmtpConfig) -> None:
    try:
        kind, secret = cfg.login_secret()
    except (OSError, RuntimeError) as e:
        raise _StepError(
            "auth",
            f"cannot read the SMTP secret: {e}",
            "check smtp.password_file / oauth2_token_file / oauth2_token_command",
            retry=False,
        ) from None
    if kind == "none":
        return
    if not cfg.username:
        raise _StepError(
            "auth",
            "a password or token is set but no username",
            "set smtp.username",
            retry=False,
        )
    try:
        if kind == "password":
            conn.login(cfg.username, secret)
        else:
            conn.auth("XOAUTH2", _xoauth2(cfg.username, secret))
    except smtplib.SMTPAuthenticationError as e:
        what = "password" if kind == "password" else "OAuth2 token"
        raise _StepError(
            "auth",
            f"the server refused the login of {cfg.username!r}: {e.smtp_code} "
            f"{_text(e.smtp_error)}",
            f"check smtp.username and the {what}; some providers need an app password "
            "or OAuth2 (XOAUTH2)",
            code=e.smtp_code,
            retry=False,
        ) from None
    except smtplib.SMTPNotSupportedError:
        raise _StepError(
            "auth",
            "the server does not offer AUTH on this connection",
            "use security: starttls or ssl; many servers only allow login over TLS",
            retry=False,
        ) from None
    except smtplib.SMTPException as e:
        raise _StepError(
            "auth",
            f"login failed: {e}",
            "check the mechanism the server offers (AUTH in EHLO)",
            retry=False,
        ) from None


def _over_advertised_size(conn: smtplib.SMTP, size: int) -> str | None:
    """Why a message of `size` bytes must not be sent when it is larger than the SIZE the
    server advertised in its EHLO (RFC 1870; 0 or no number: no fixed limit); None when it
    fits."""
    advertised = conn.esmtp_features.get("size", "").strip()
    limit = int(advertised) if advertised.isdigit() else 0
    if not limit or size <= limit:
        return None
    return (
        f"the message is {size:,} bytes, over the {limit:,} bytes the server takes "
        "(SIZE in its EHLO, RFC 1870); not sent"
    )


def _abandon(conn: smtplib.SMTP) -> None:
    with contextlib.suppress(OSError):
        conn.close()


def probe_smtp(cfg: SmtpConfig) -> str | None:
    """Check that twoway can connect, secure the connection and log in; nothing is sent.

    Returns None when all is well, else one line "<step> failed: <detail>. Hint: ..."
    where step is DNS, connect, TLS or auth (or maildir for the local transport). The
    secret never appears in the text.
    """
    if cfg.kind == "maildir":
        try:
            mailbox.Maildir(cfg.path or "", create=True)
        except OSError as e:
            return f"maildir failed: cannot create {cfg.path}: {e.strerror}. Hint: check smtp.path"
        return None
    try:
        conn = _open(cfg)
    except _StepError as e:
        return e.describe()
    try:
        conn.quit()
    except (OSError, smtplib.SMTPException):
        _abandon(conn)
    return None


def _is_temporary_reply(result: SendResult | None) -> bool:
    return result is not None and result.status == "temporary"


def _is_connection_error(e: BaseException) -> bool:
    """A broken or refused connection worth another try (smtplib's errors are OSErrors)."""
    if isinstance(e, _StepError):
        return e.retry and e.result().status == "temporary"
    return isinstance(e, OSError)


_T = TypeVar("_T")


def _replayed(attempt: Callable[[], _T], first: Callable[[], _T]) -> Callable[[], _T]:
    """`attempt`, whose first call is `first` instead: it gives back (or raises again) an
    outcome already had rather than running the attempt once more."""
    calls = 0

    def again() -> _T:
        nonlocal calls
        calls += 1
        return first() if calls == 1 else attempt()

    return again


def _raise(error: Exception) -> NoReturn:
    raise error


class Mailer:
    """Sends messages through one reused SMTP connection (or into a Maildir).

    One message goes out in two steps, so that the caller can record its claim between
    them: `begin()` opens the SMTP transaction (MAIL FROM, RCPT TO; the caller's claim
    runs while the server answers RCPT) and `data()` hands the message over (DATA);
    `reset()` abandons a transaction begun. `send()` does both.

    Within each step, a 4xx reply or a connection error is retried: at most `retries` + 1
    attempts, reconnecting between them after an exponential, jittered delay between
    `base_delay` and `max_delay` seconds (waited through `sleep`). A 5xx is never retried.
    A kept connection the server has closed meanwhile is replaced at once, without
    spending an attempt. Use it as a context manager around a batch. Not thread-safe: one
    Mailer per worker thread.
    """

    def __init__(
        self,
        cfg: SmtpConfig,
        *,
        retries: int = 3,
        base_delay: float = 0.5,
        max_delay: float = 8.0,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if retries < 0:
            raise ValueError("retries must be >= 0")
        self.cfg = cfg
        self._conn: smtplib.SMTP | None = None
        self._last_used = 0.0
        self._maildir: mailbox.Maildir | None = None
        self._envelope: tuple[str, list[str], int, bool] = ("", [], 0, False)
        self._open = False  # the server holds our MAIL and RCPTs and waits for DATA
        self._meanwhile: Callable[[], bool] | None = None  # work for the waits on replies
        self._claim: Callable[[], object] | None = None  # begin's claim, until it has run
        self._refused: dict[str, tuple[int, str]] = {}
        self._retrying = Retrying(
            retry=retry_if_result(_is_temporary_reply) | retry_if_exception(_is_connection_error),
            stop=stop_after_attempt(retries + 1),
            wait=wait_exponential_jitter(initial=base_delay, max=max_delay, jitter=base_delay),
            sleep=sleep,
            before_sleep=self._reconnect,
            # Out of attempts: the last outcome stands (a result, or its exception).
            retry_error_callback=lambda state: state.outcome.result() if state.outcome else None,
        )

    def __enter__(self) -> Mailer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Say QUIT and close the connection, if one is open. The Mailer stays usable."""
        conn, self._conn = self._conn, None
        self._open = False
        if conn is None:
            return
        try:
            conn.quit()
        except (OSError, smtplib.SMTPException):
            _abandon(conn)

    def send(
        self, msg: EmailMessage | bytes, envelope_from: str, recipients: Sequence[str]
    ) -> SendResult:
        """Hand `msg` (a message, or its bytes as written once by the caller) to the server
        for `recipients` with MAIL FROM `envelope_from`: `begin()`, then `data()`.

        Never raises for a delivery problem: the SendResult says what happened.
        """
        raw = (
            msg
            if isinstance(msg, bytes)
            else _flatten(msg, _international(envelope_from, recipients))
        )
        refused = self.begin(envelope_from, recipients, size=len(raw), eight_bit=not raw.isascii())
        return refused if refused is not None else self.data(raw)

    def begin(
        self,
        envelope_from: str,
        recipients: Sequence[str],
        *,
        size: int = 0,
        eight_bit: bool = False,
        meanwhile: Callable[[], bool] | None = None,
        claim: Callable[[], object] | None = None,
    ) -> SendResult | None:
        """Open the SMTP transaction of one message of `size` bytes: MAIL FROM
        `envelope_from` (with BODY=8BITMIME for an `eight_bit` message when the server
        offers it), RCPT TO each of `recipients`.

        None: the server accepted the envelope for at least one recipient and waits for
        `data()` or `reset()`. Otherwise nothing was sent and the SendResult says why:
        "permanent" (over the server's SIZE, a 5xx to MAIL, or to every RCPT, in
        `refused`) or "temporary" (4xx or connection errors after the retries; a login or
        TLS problem at once, since it is a configuration problem, not this message's
        fault). A Maildir has no envelope step: always None.

        `meanwhile`: the caller's work for the waits on the server's replies, a part a
        call (True while parts are left). Parts run after each command is sent until its
        reply has arrived, and every part left runs before a retry's sleep. It should
        not raise: if it does, the connection is dropped and the exception propagates.

        `claim`: called at most once, as soon as the server has accepted MAIL FROM and the
        last RCPT TO is sent, before its reply is read, so that the caller's claim of the
        message overlaps the server's answer (a transaction has begun at the server
        whenever it runs). Not called when the transaction does not get that far, nor for
        a Maildir. If it raises, as for `meanwhile`.
        """
        self.reset()
        self._envelope = (envelope_from, list(recipients), size, eight_bit)
        if not recipients:
            return SendResult("permanent", None, "no recipients")
        if self.cfg.kind == "maildir":
            return None
        self._meanwhile, self._claim = meanwhile, claim
        try:
            return self._run(self._begin_attempt)
        finally:
            self._meanwhile = self._claim = None

    def data(self, raw: bytes, meanwhile: Callable[[], bool] | None = None) -> SendResult:
        """Send `raw` (CRLF lines) in the transaction `begin()` opened. Never raises for a
        delivery problem.

        A 4xx or a broken connection is retried from MAIL FROM on a fresh connection. A
        partial refusal at RCPT (some recipients accepted) is "sent", with the permanently
        refused ones in `refused`. `meanwhile`: as for `begin`.
        """
        if self.cfg.kind == "maildir":
            return self._to_maildir(raw)
        self._meanwhile = meanwhile
        try:
            return self._run(lambda: self._data_attempt(raw))
        finally:
            self._meanwhile = None

    def reset(self) -> None:
        """Abandon the transaction `begin()` opened (RSET), if one is open: nothing is sent."""
        if not self._open or self._conn is None:
            return
        self._open = False
        try:
            if self._conn.rset()[0] == 250:
                return
        except OSError:
            pass
        self._drop()

    # --- internals ---------------------------------------------------------------------

    def _run(self, attempt: Callable[[], _T]) -> _T | SendResult:
        """`attempt` under the retry policy; a connection problem that outlasts the
        retries (or must not be retried) becomes a temporary SendResult."""
        try:
            # The first attempt runs outside the retry machinery, which costs more than a
            # command on a kept connection. Anything to retry goes through it, with that
            # first outcome as its first attempt: the same count, waits and logging.
            try:
                first = attempt()
            except Exception as e:
                error = e
                return self._retrying(_replayed(attempt, lambda: _raise(error)))
            if not (isinstance(first, SendResult) and first.status == "temporary"):
                return first
            return self._retrying(_replayed(attempt, lambda: first))
        except _StepError as e:
            return e.result()
        except OSError as e:  # smtplib's disconnects, resets and timeouts
            self._drop()
            return SendResult("temporary", None, f"connection lost: {e or type(e).__name__}")

    def _reconnect(self, state: RetryCallState) -> None:
        """Between attempts: drop the connection, so the next one starts afresh (after a
        421 the server hangs up; after a failed DATA the session's state is unsure)."""
        outcome = state.outcome
        why = outcome.exception() if outcome and outcome.failed else None
        if why is None and outcome is not None:
            why = getattr(outcome.result(), "message", None)
        logger.info(
            "SMTP attempt %d failed (%s); retrying in %.1fs",
            state.attempt_number,
            why,
            state.upcoming_sleep,
        )
        self._drop()
        work = self._meanwhile
        while work is not None and work():  # the caller's work is done before any sleep
            pass

    def _connection(self) -> smtplib.SMTP:
        """The open connection (checked with a NOOP when idle long) or a new one; raises
        _StepError when a new one cannot be opened."""
        conn = self._conn
        if conn is not None and time.monotonic() - self._last_used > _IDLE_CHECK_SECONDS:
            try:
                alive = conn.noop()[0] == 250
            except OSError:
                alive = False
            if not alive:
                self._drop()
                conn = None
        if conn is None:
            conn = _open(self.cfg)
            logger.debug("connected to %s:%s", self.cfg.host, self.cfg.effective_port)
            self._conn, self._open = conn, False
            self._last_used = time.monotonic()
        return conn

    def _drop(self) -> None:
        conn, self._conn = self._conn, None
        self._open = False
        if conn is not None:
            _abandon(conn)

    def _begin_attempt(self) -> SendResult | None:
        reused = self._conn is not None
        try:
            return self._mail_rcpt(self._connection())
        except OSError:
            if not reused:
                raise
        # The server had closed the connection we kept (an idle timeout, a cap on messages
        # per connection): open a fresh one at once instead of spending an attempt on it.
        self._drop()
        return self._mail_rcpt(self._connection())

    def _mail_rcpt(self, conn: smtplib.SMTP) -> SendResult | None:
        envelope_from, recipients, size, eight_bit = self._envelope
        too_large = _over_advertised_size(conn, size)
        if too_large:
            return SendResult("permanent", None, too_large)
        options = ["BODY=8BITMIME"] if eight_bit and conn.has_extn("8bitmime") else []
        if _international(envelope_from, recipients):
            options.append("SMTPUTF8")
        try:
            if "SMTPUTF8" in options:
                code, resp = conn.mail(envelope_from, options)
            else:
                opts = "".join(" " + o for o in options)
                code, resp = self._ask(conn, "mail", f"FROM:{_quoted(envelope_from)}{opts}")
        except smtplib.SMTPNotSupportedError as e:
            # A non-ASCII address and no SMTPUTF8 at the server: retrying cannot help.
            return SendResult("permanent", None, f"the server cannot take this message: {e}")
        self._last_used = time.monotonic()
        if code != 250:
            self._rset(conn)
            return self._reply(code, resp)
        refused: dict[str, tuple[int, str]] = {}
        for i, rcpt in enumerate(recipients, 1):
            conn.putcmd("rcpt", f"TO:{_quoted(rcpt)}")
            if i == len(recipients):
                self._claim_now()
            code, resp = self._await(conn)
            if code not in (250, 251):
                refused[rcpt] = (code, _text(resp))
        if len(refused) == len(recipients):
            self._rset(conn)
            return self._all_refused(refused)
        self._open, self._refused = True, refused
        return None

    def _ask(self, conn: smtplib.SMTP, cmd: str, args: str) -> tuple[int, bytes]:
        conn.putcmd(cmd, args)
        return self._await(conn)

    def _claim_now(self) -> None:
        """Run begin's `claim`, once: its transaction has begun at the server."""
        claim, self._claim = self._claim, None
        if claim is None:
            return
        try:
            claim()
        except BaseException:
            self._drop()  # RCPT's reply is still to come: the session is out of step
            raise

    def _await(self, conn: smtplib.SMTP) -> tuple[int, bytes]:
        """The server's reply to what was just sent; the caller's `meanwhile` work, a
        part at a time, runs until the reply has arrived or no part is left."""
        work = self._meanwhile
        if work is not None:
            try:
                while work() and not _readable(conn.sock):
                    pass
            except BaseException:
                self._drop()  # its reply is still to come: the session is out of step
                raise
        return conn.getreply()

    def _rset(self, conn: smtplib.SMTP) -> None:
        """RSET after a refused MAIL or RCPTs, so the kept connection starts clean."""
        try:
            conn.rset()
        except OSError:
            self._drop()

    def _data_attempt(self, raw: bytes) -> SendResult:
        conn = self._connection()
        if not self._open:  # a retry: the last attempt's transaction went with its connection
            not_open = self._mail_rcpt(conn)
            if not_open is not None:
                return not_open
        self._open = False  # whatever DATA answers, the transaction ends with it
        reply: tuple[int, bytes | str]
        reply = self._ask(conn, "data", "")
        if reply[0] == 354:
            q = _DOT_LINE.sub(b"..", raw)
            conn.send(q + (b".\r\n" if q.endswith(b"\r\n") else b"\r\n.\r\n"))
            reply = self._await(conn)
        self._last_used = time.monotonic()
        if reply[0] != 250:
            return self._reply(*reply)
        refused = self._refused
        if not refused:
            return SendResult("sent", 250, "accepted")
        detail = "; ".join(f"{r}: {c} {t}" for r, (c, t) in refused.items())
        return SendResult(
            "sent",
            250,
            f"accepted, but refused for {detail}",
            refused=tuple(r for r, (c, _) in refused.items() if c >= 500),
            enhanced_status=_enhanced(next(iter(refused.values()))[1]),
        )

    def _reply(self, code: int, resp: bytes | str) -> SendResult:
        """An error reply: 4xx is temporary (retried), anything else permanent."""
        text = _text(resp)
        status: Literal["temporary", "permanent"] = (
            "temporary" if 400 <= code < 500 else "permanent"
        )
        return SendResult(status, code, f"{code} {text}", enhanced_status=_enhanced(text))

    def _all_refused(self, refused: dict[str, tuple[int, str]]) -> SendResult:
        """Every RCPT refused: temporary if any refusal was a 4xx, else permanent."""
        detail = "; ".join(f"{r}: {c} {t}" for r, (c, t) in refused.items())
        codes = [c for c, _ in refused.values()]
        enhanced = _enhanced(next(iter(refused.values()))[1])
        if any(400 <= c < 500 for c in codes):
            return SendResult(
                "temporary", min(codes), f"refused for {detail}", enhanced_status=enhanced
            )
        return SendResult(
            "permanent",
            codes[0],
            f"refused for {detail}",
            refused=tuple(refused),
            enhanced_status=enhanced,
        )

    def _to_maildir(self, raw: bytes) -> SendResult:
        """Deliver into the Maildir at cfg.path like a local MDA: Return-Path and
        X-Original-To headers record the envelope; mailbox writes tmp/ then moves to new/."""
        envelope_from, recipients, _, _ = self._envelope
        try:
            if self._maildir is None:
                self._maildir = mailbox.Maildir(self.cfg.path or "", create=True)
            # The envelope comes from our caller, but a stray CR/LF must not forge headers.
            envelope = f"Return-Path: <{_one_line(envelope_from)}>\n" + "".join(
                f"X-Original-To: {_one_line(r)}\n" for r in recipients
            )
            key = self._maildir.add(envelope.encode("ascii", "replace") + raw)
        except OSError as e:
            return SendResult("temporary", None, f"cannot write to maildir {self.cfg.path}: {e}")
        return SendResult("sent", None, f"delivered to maildir {self.cfg.path} as {key}")


_DOT_LINE = re.compile(rb"(?m)^\.")
_BARE = re.compile(r"^[A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]+@[A-Za-z0-9.-]+$")


def _readable(sock: socket.socket | None) -> bool:
    """Whether `sock` has something to read now (a reply has arrived, or the server hung
    up: either way getreply has it at once)."""
    if sock is None:
        return True
    if isinstance(sock, ssl.SSLSocket) and sock.pending():
        return True
    poller = select.poll()  # poll, unlike select, takes any descriptor number
    poller.register(sock, select.POLLIN)
    return bool(poller.poll(0))


def _quoted(addr: str) -> str:
    return f"<{addr}>" if _BARE.match(addr) else smtplib.quoteaddr(addr)


def _international(envelope_from: str, recipients: Sequence[str]) -> bool:
    """Whether an address needs SMTPUTF8 (RFC 6531)."""
    return not (envelope_from.isascii() and all(r.isascii() for r in recipients))


def _flatten(msg: EmailMessage, utf8: bool) -> bytes:
    """`msg` as it goes on the wire (CRLF lines), as smtplib's send_message writes it."""
    out = io.BytesIO()
    policy = msg.policy
    if utf8 and isinstance(policy, EmailPolicy):
        policy = policy.clone(utf8=True)
    BytesGenerator(out, policy=policy).flatten(msg, linesep="\r\n")
    return out.getvalue()
