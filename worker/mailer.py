"""Outbound transport: SMTP (implicit TLS, STARTTLS or plain on loopback) or a local Maildir.

This is the only module that imports smtplib and tenacity. A Mailer keeps one SMTP
connection open across a batch and reconnects when the server drops it. Within one
`send()`, temporary failures (connection errors, 4xx replies) are retried a bounded number
of times with exponential backoff and jitter; a 5xx is never retried. What happens after
that (attempt counters, the next attempt time) is the caller's business and lives in the
database, not in a sleeping stack frame.
"""

from __future__ import annotations

import contextlib
import logging
import mailbox
import re
import smtplib
import socket
import ssl
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from email.message import EmailMessage
from types import TracebackType
from typing import Literal

from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception_type,
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


class _Outcome(Exception):
    """Carries the SendResult of an attempt that did not deliver."""

    def __init__(self, result: SendResult) -> None:
        super().__init__(result.message)
        self.result = result


class _Temporary(_Outcome):
    """An attempt failed in a way worth retrying within this send()."""


class _Disconnected(_Outcome):
    """The connection broke during the transaction."""


class _Final(_Outcome):
    """Opening the connection failed in a way retrying now will not fix."""


class _StepError(Exception):
    """Opening the connection failed at `step` (DNS, connect, TLS, auth)."""

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


def _over_advertised_size(conn: smtplib.SMTP, msg: EmailMessage | bytes) -> str | None:
    """Why `msg` must not be sent when it is larger than the SIZE the server advertised in
    its EHLO (RFC 1870; 0 or no number: no fixed limit); None when it fits."""
    advertised = conn.esmtp_features.get("size", "").strip()
    limit = int(advertised) if advertised.isdigit() else 0
    size = len(msg) if isinstance(msg, bytes) else None
    if not limit or size is None or size <= limit:
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


class Mailer:
    """Sends messages through one reused SMTP connection (or into a Maildir).

    Use it as a context manager around a batch. `retries` is how many times one send()
    retries a temporary failure (so at most retries + 1 attempts), waiting an exponential,
    jittered delay between `base_delay` and `max_delay` seconds through `sleep`. Not
    thread-safe: one Mailer per worker thread.
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
        self._retrying = Retrying(
            stop=stop_after_attempt(retries + 1),
            wait=wait_exponential_jitter(initial=base_delay, max=max_delay, jitter=base_delay),
            retry=retry_if_exception_type(_Temporary),
            sleep=sleep,
            before_sleep=self._before_retry,
            reraise=True,
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
        if conn is None:
            return
        try:
            conn.quit()
        except (OSError, smtplib.SMTPException):
            _abandon(conn)

    def connect(self) -> None:
        """Open the connection now if none is open (nothing to do for a Maildir). A failure
        is not raised: the next send() retries it and reports it in its SendResult."""
        if self.cfg.kind != "maildir":
            with contextlib.suppress(_Outcome):
                self._connection()

    def send(
        self, msg: EmailMessage | bytes, envelope_from: str, recipients: Sequence[str]
    ) -> SendResult:
        """Hand `msg` (a message, or its bytes as written once by the caller) to the server
        for `recipients` with MAIL FROM `envelope_from`.

        Never raises for a delivery problem: the SendResult says what happened. A partial
        refusal (some recipients accepted) is "sent", with the permanently refused ones in
        `refused`; it is not retried, because that would send the message twice to those
        who got it. A login or TLS-verification failure is "temporary" without in-call
        retries: it is a configuration problem, not this message's fault.
        """
        if not recipients:
            return SendResult("permanent", None, "no recipients")
        if self.cfg.kind == "maildir":
            return self._to_maildir(msg, envelope_from, recipients)
        try:
            return self._retrying(self._attempt, msg, envelope_from, list(recipients))
        except _Temporary as e:
            return e.result

    # --- internals ---------------------------------------------------------------------

    def _before_retry(self, state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        logger.info(
            "SMTP attempt %d failed (%s); retrying in %.1fs",
            state.attempt_number,
            exc,
            state.upcoming_sleep,
        )

    def _connection(self) -> smtplib.SMTP:
        conn = self._conn
        if conn is not None and time.monotonic() - self._last_used > _IDLE_CHECK_SECONDS:
            try:
                alive = conn.noop()[0] == 250
            except (OSError, smtplib.SMTPException):
                alive = False
            if not alive:
                self._drop()
                conn = None
        if conn is None:
            try:
                conn = _open(self.cfg)
            except _StepError as e:
                result = SendResult(
                    "permanent"
                    if e.code is not None and e.code >= 500 and e.step == "connect"
                    else "temporary",
                    e.code,
                    e.describe(),
                    enhanced_status=None,
                )
                if e.retry and result.status == "temporary":
                    raise _Temporary(result) from None
                raise _Final(result) from None
            logger.debug("connected to %s:%s", self.cfg.host, self.cfg.effective_port)
            self._conn = conn
            self._last_used = time.monotonic()
        return conn

    def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            _abandon(conn)

    def _attempt(
        self, msg: EmailMessage | bytes, envelope_from: str, recipients: list[str]
    ) -> SendResult:
        reused = self._conn is not None
        try:
            return self._transmit(msg, envelope_from, recipients)
        except _Disconnected as e:
            if not reused:
                raise _Temporary(e.result) from None
        # The server had closed the connection we kept (an idle timeout, a cap on messages
        # per connection): open a fresh one at once instead of spending an attempt on it.
        try:
            return self._transmit(msg, envelope_from, recipients)
        except _Disconnected as e:
            raise _Temporary(e.result) from None

    def _transmit(
        self, msg: EmailMessage | bytes, envelope_from: str, recipients: list[str]
    ) -> SendResult:
        try:
            conn = self._connection()
        except _Final as e:
            return e.result
        too_large = _over_advertised_size(conn, msg)
        if too_large:
            return SendResult("permanent", None, too_large)
        try:
            if isinstance(msg, bytes):
                eight_bit = not msg.isascii() and conn.has_extn("8bitmime")
                options = ["BODY=8BITMIME"] if eight_bit else []
                refused = conn.sendmail(envelope_from, recipients, msg, options)
            else:
                refused = conn.send_message(msg, envelope_from, recipients)
        except smtplib.SMTPRecipientsRefused as e:
            return self._all_refused(e.recipients)
        except smtplib.SMTPResponseException as e:
            # SMTPSenderRefused, SMTPDataError, and replies to RSET/MAIL alike.
            return self._reply(e.smtp_code, _text(e.smtp_error))
        except smtplib.SMTPNotSupportedError as e:
            # e.g. the message needs SMTPUTF8 and the server lacks it: retrying cannot help.
            self._last_used = time.monotonic()
            return SendResult("permanent", None, f"the server cannot take this message: {e}")
        except (OSError, smtplib.SMTPException) as e:
            # SMTPServerDisconnected, resets, timeouts: the connection is gone.
            self._drop()
            raise _Disconnected(
                SendResult("temporary", None, f"connection lost: {e or type(e).__name__}")
            ) from None
        self._last_used = time.monotonic()
        if not refused:
            return SendResult("sent", 250, "accepted")
        permanent = tuple(r for r, (code, _) in refused.items() if code >= 500)
        first = next(iter(refused.values()))
        detail = "; ".join(f"{r}: {c} {_text(t)}" for r, (c, t) in refused.items())
        return SendResult(
            "sent",
            250,
            f"accepted, but refused for {detail}",
            refused=permanent,
            enhanced_status=_enhanced(_text(first[1])),
        )

    def _reply(self, code: int, text: str) -> SendResult:
        """Classify an error reply: 4xx is retried (after reconnecting), 5xx is final."""
        if 400 <= code < 500:
            # Reconnect for the next attempt: after a 421 the server hangs up, and after a
            # failed DATA we cannot be sure what state the session is in.
            self._drop()
            raise _Temporary(
                SendResult("temporary", code, f"{code} {text}", enhanced_status=_enhanced(text))
            )
        self._last_used = time.monotonic()
        return SendResult("permanent", code, f"{code} {text}", enhanced_status=_enhanced(text))

    def _all_refused(self, refused: dict[str, tuple[int, bytes]]) -> SendResult:
        self._last_used = time.monotonic()
        detail = "; ".join(f"{r}: {c} {_text(t)}" for r, (c, t) in refused.items())
        codes = [c for c, _ in refused.values()]
        first_text = _text(next(iter(refused.values()))[1])
        if any(400 <= c < 500 for c in codes):
            self._drop()
            raise _Temporary(
                SendResult(
                    "temporary",
                    min(codes),
                    f"refused for {detail}",
                    enhanced_status=_enhanced(first_text),
                )
            )
        return SendResult(
            "permanent",
            codes[0],
            f"refused for {detail}",
            refused=tuple(refused),
            enhanced_status=_enhanced(first_text),
        )

    def _to_maildir(
        self, msg: EmailMessage | bytes, envelope_from: str, recipients: Sequence[str]
    ) -> SendResult:
        """Deliver into the Maildir at cfg.path like a local MDA: Return-Path and
        X-Original-To headers record the envelope; mailbox writes tmp/ then moves to new/."""
        try:
            if self._maildir is None:
                self._maildir = mailbox.Maildir(self.cfg.path or "", create=True)
            # The envelope comes from our caller, but a stray CR/LF must not forge headers.
            envelope = f"Return-Path: <{_one_line(envelope_from)}>\n" + "".join(
                f"X-Original-To: {_one_line(r)}\n" for r in recipients
            )
            raw = msg if isinstance(msg, bytes) else msg.as_bytes()
            key = self._maildir.add(envelope.encode("ascii", "replace") + raw)
        except OSError as e:
            return SendResult("temporary", None, f"cannot write to maildir {self.cfg.path}: {e}")
        return SendResult("sent", None, f"delivered to maildir {self.cfg.path} as {key}")
