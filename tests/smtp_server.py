"""aiosmtpd SMTP fixtures: a real SMTP server on 127.0.0.1 that records what it receives.

Fixtures:
- `smtp_server`: records every message (envelope from, recipients, raw bytes) and counts
  connections; faults can be switched on per test (see SmtpServer's fault methods).
- `smtp_auth_server`: the same, but AUTH is required: PLAIN/LOGIN with USER/PASSWORD and
  XOAUTH2 with USER/TOKEN (aiosmtpd with auth_require_tls=False, loopback only).
- `smtp_server_factory`: start more servers with options (auth, STARTTLS, implicit TLS).

Each server listens on a free port chosen by the OS and is stopped after the test.
"""

from __future__ import annotations

import asyncio
import base64
import email.policy
import shutil
import ssl
import subprocess
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from email.message import EmailMessage
from email.parser import BytesParser
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

from worker.config import SmtpConfig

HOST = "127.0.0.1"
USER = "mailer@example.test"
PASSWORD = "s3cret-Pa55"
TOKEN = "ya29.test-oauth-token"


@dataclass(frozen=True)
class ReceivedMessage:
    """One message as the server accepted it."""

    envelope_from: str
    rcpts: tuple[str, ...]
    raw: bytes
    connection: int  # 1-based number of the connection it arrived on
    login: str | None  # the authenticated user, if any

    def parsed(self) -> EmailMessage:
        return BytesParser(policy=email.policy.default).parsebytes(self.raw)


@dataclass
class Transaction:
    """One SMTP transaction begun (a MAIL command): the recipients its RCPTs named, and
    whether it ended with a message accepted."""

    rcpts: list[str] = field(default_factory=list)
    delivered: bool = False


@dataclass
class _Faults:
    replies: list[str] = field(default_factory=list)  # answered at end of DATA, in order
    drops: int = 0  # connections to abort at end of DATA, without an answer
    rejected: set[str] = field(default_factory=set)  # RCPT answered 550 5.1.1
    deferred: Counter[str] = field(default_factory=Counter)  # RCPT answered 450, n times


class SmtpServer:
    """A running aiosmtpd server plus what it has seen; fault switches for tests."""

    def __init__(
        self,
        *,
        auth: bool = False,
        tls: ssl.SSLContext | None = None,
        implicit_tls: bool = False,
        size_limit: int | None = None,
    ) -> None:
        self.messages: list[ReceivedMessage] = []
        self.transactions: list[Transaction] = []
        """One per MAIL command (a transaction begun), in order."""
        self.connections = 0
        self.logins: list[str] = []
        self.failed_logins = 0
        self.faults = _Faults()
        self.on_command: Callable[[str, str], None] | None = None
        """Called in the server thread at each RCPT (with its address) and DATA (with the
        first recipient), before the server answers: to look at the client's state then."""
        self.on_mail: Callable[[str], None] | None = None
        """The same at each MAIL, with the envelope sender."""
        self.auth = auth
        self.security = "ssl" if implicit_tls else "starttls" if tls else "none"
        self._lock = threading.Lock()
        self._sessions: list[SMTP] = []
        kwargs: dict[str, Any] = {}
        if auth:
            # AUTH is enforced in handle_MAIL rather than with aiosmtpd's auth_required,
            # which warns when TLS is not required (and warnings are errors in our tests).
            kwargs.update(authenticator=self._authenticate, auth_require_tls=False)
        if tls is not None and not implicit_tls:
            kwargs.update(tls_context=tls, require_starttls=False)
        if size_limit is not None:  # advertised as SIZE in EHLO (RFC 1870) and enforced
            kwargs.update(data_size_limit=size_limit)
        self._controller = _Controller(
            self,
            _Handler(self),
            hostname=HOST,
            port=0,
            ssl_context=tls if implicit_tls else None,
            **kwargs,
        )

    # --- lifecycle --------------------------------------------------------------------

    def start(self) -> None:
        self._controller.start()
        self.connections = 0  # the controller's own readiness probe does not count
        self._sessions.clear()

    def stop(self) -> None:
        self._controller.stop()

    @property
    def port(self) -> int:
        return int(self._controller.port)

    def config(self, **overrides: Any) -> SmtpConfig:
        """An SmtpConfig pointing at this server (with the test login when auth is on)."""
        return SmtpConfig.model_validate(self.section(**overrides))

    def section(self, **overrides: Any) -> dict[str, Any]:
        """The `smtp` config section (YAML-ready) pointing at this server."""
        data: dict[str, Any] = {
            "kind": "smtp",
            "host": HOST,
            "port": self.port,
            "security": self.security,
            "timeout": 5,
        }
        if self.security != "none":
            data["verify_tls"] = False
        if self.auth:
            data.update(username=USER, password=PASSWORD)
        data.update(overrides)
        return data

    # --- reading what arrived ---------------------------------------------------------

    def parsed(self) -> list[EmailMessage]:
        """Every received message, parsed with the modern email policy."""
        return [m.parsed() for m in self.messages]

    def recipients(self) -> list[str]:
        return [r for m in self.messages for r in m.rcpts]

    def began_for(self, addresses: list[str]) -> bool:
        """True when each of `addresses` (with repeats) can be paired with an SMTP
        transaction begun here: one whose RCPT named it, or one that ended before any RCPT
        (the client died between MAIL and RCPT)."""
        named = Counter(r for t in self.transactions for r in t.rcpts)
        blind = sum(1 for t in self.transactions if not t.rcpts)
        missing = sum(max(0, n - named[a]) for a, n in Counter(addresses).items())
        return missing <= blind

    def not_begun(self, sends: list[tuple[str, str]]) -> int:
        """How many of `sends` ((recipient, Message-ID) pairs, e.g. the rows left unknown)
        no SMTP transaction begun here accounts for.

        A send whose message arrived is accounted for. Each other one needs a transaction
        of its own that delivered nothing: one whose RCPT named its recipient, or one that
        ended before any RCPT (the client died between MAIL and RCPT).
        """
        arrived = {str(m.parsed()["Message-ID"]).strip().strip("<>") for m in self.messages}
        rest = Counter(a for a, mid in sends if mid.strip().strip("<>") not in arrived)
        open_ = [t for t in self.transactions if not t.delivered]
        named = Counter(r for t in open_ for r in t.rcpts)
        blind = sum(1 for t in open_ if not t.rcpts)
        missing = sum(max(0, n - named[a]) for a, n in rest.items())
        return max(0, missing - blind)

    # --- faults -----------------------------------------------------------------------

    def fail_next(self, times: int, code: int = 451) -> None:
        """Answer the next `times` messages with a temporary error at the end of DATA.
        421 also closes the connection, as a server shutting down does."""
        text = {
            421: "421 4.3.2 Service shutting down, closing transmission channel",
            450: "450 4.2.1 Mailbox busy, try again later",
            451: "451 4.3.0 Local error in processing, try again later",
            452: "452 4.3.1 Insufficient system storage",
        }.get(code, f"{code} 4.0.0 Temporary failure")
        self.faults.replies.extend([text] * times)

    def fail_permanently_next(
        self, times: int = 1, reply: str = "554 5.7.1 Message rejected as spam"
    ) -> None:
        """Answer the next `times` messages with a permanent error at the end of DATA."""
        self.faults.replies.extend([reply] * times)

    def reject(self, *addresses: str) -> None:
        """Refuse these recipients at RCPT with 550 5.1.1 (user unknown)."""
        self.faults.rejected.update(a.lower() for a in addresses)

    def defer(self, address: str, times: int = 1) -> None:
        """Answer RCPT for `address` with 450 4.2.1 (mailbox busy) the next `times` times."""
        self.faults.deferred[address.lower()] += times

    def drop_next(self, times: int = 1) -> None:
        """Abort the connection at the end of DATA, without any answer, `times` times."""
        self.faults.drops += times

    def drop_connections(self) -> None:
        """Close every open connection now, as a server does to idle clients."""

        async def close_all() -> None:
            for session in self._sessions:
                if session.transport is not None and not session.transport.is_closing():
                    session.transport.close()
            await asyncio.sleep(0.05)  # let the close reach the socket before we return

        asyncio.run_coroutine_threadsafe(close_all(), self._controller.loop).result(5)

    # --- server-side hooks (run in the server thread) ---------------------------------

    def _new_session(self, session: SMTP) -> int:
        with self._lock:
            self.connections += 1
            self._sessions.append(session)
            return self.connections

    def _authenticate(
        self, server: SMTP, session: Session, envelope: Envelope, mechanism: str, data: Any
    ) -> AuthResult:
        if (
            isinstance(data, LoginPassword)
            and data.login == USER.encode()
            and data.password == PASSWORD.encode()
        ):
            self.logins.append(USER)
            return AuthResult(success=True, auth_data=data)
        self.failed_logins += 1
        return AuthResult(success=False, handled=False)


class _Controller(Controller):
    """aiosmtpd's Controller on an OS-chosen port, numbering each connection."""

    def __init__(self, owner: SmtpServer, handler: Any, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self._owner = owner

    def factory(self) -> SMTP:
        smtp = SMTP(self.handler, **self.SMTP_kwargs)
        smtp.twoway_connection = self._owner._new_session(smtp)  # type: ignore[attr-defined]
        return smtp

    def _trigger_server(self) -> None:
        # Port 0 asks the OS for a free port; learn which before probing it.
        assert isinstance(self.server, asyncio.Server)
        self.port = self.server.sockets[0].getsockname()[1]
        super()._trigger_server()  # type: ignore[no-untyped-call]


class _Handler:
    def __init__(self, owner: SmtpServer) -> None:
        self.owner = owner

    async def handle_MAIL(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        if self.owner.auth and not session.authenticated:
            return "530 5.7.0 Authentication required"
        if self.owner.on_mail is not None:
            self.owner.on_mail(address)
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        self.owner.transactions.append(Transaction())
        session.twoway_transaction = self.owner.transactions[-1]  # type: ignore[attr-defined]
        return "250 2.1.0 OK"

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        began: Transaction | None = getattr(session, "twoway_transaction", None)
        if began is not None:
            began.rcpts.append(address)
        if self.owner.on_command is not None:
            self.owner.on_command("RCPT", address)
        deferred = self.owner.faults.deferred
        if deferred[address.lower()] > 0:
            deferred[address.lower()] -= 1
            return f"450 4.2.1 <{address}>: Mailbox busy, try again later"
        if address.lower() in self.owner.faults.rejected:
            return f"550 5.1.1 <{address}>: Recipient address rejected: User unknown"
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        faults = self.owner.faults
        if self.owner.on_command is not None:
            self.owner.on_command("DATA", envelope.rcpt_tos[0] if envelope.rcpt_tos else "")
        if faults.drops > 0:
            faults.drops -= 1
            assert isinstance(server.transport, asyncio.Transport)
            server.transport.abort()
            return "250 2.0.0 never seen by the client"
        if faults.replies:
            reply = faults.replies.pop(0)
            if reply.startswith("421"):
                assert server.transport is not None
                asyncio.get_running_loop().call_soon(server.transport.close)
            return reply
        user = getattr(session.auth_data, "login", None)
        login = user.decode() if isinstance(user, bytes) else None
        self.owner.messages.append(
            ReceivedMessage(
                envelope_from=envelope.mail_from or "",
                rcpts=tuple(envelope.rcpt_tos),
                raw=envelope.original_content or b"",
                connection=getattr(server, "twoway_connection", 0),
                login=login,
            )
        )
        began: Transaction | None = getattr(session, "twoway_transaction", None)
        if began is not None:
            began.delivered = True
        return f"250 2.0.0 OK queued as {len(self.owner.messages)}"

    async def auth_XOAUTH2(self, server: SMTP, args: list[str]) -> AuthResult:
        """SASL XOAUTH2 as Gmail and Microsoft 365 speak it: on failure a 334 JSON
        challenge, then 535 after the client's empty answer."""
        expected = f"user={USER}\x01auth=Bearer {TOKEN}\x01\x01".encode()
        blob = base64.b64decode(args[1]) if len(args) > 1 else b""
        if blob == expected:
            self.owner.logins.append(USER)
            return AuthResult(success=True, auth_data=LoginPassword(USER.encode(), b""))
        self.owner.failed_logins += 1
        await server.challenge_auth(b'{"status":"401","schemes":"bearer","scope":"mail"}')
        return AuthResult(
            success=False, handled=False, message="535 5.7.8 Username and Password not accepted"
        )


# --- TLS material ------------------------------------------------------------------------


@pytest.fixture(scope="session")
def smtp_tls_context(tmp_path_factory: pytest.TempPathFactory) -> ssl.SSLContext:
    """A server TLS context with a self-signed certificate for localhost (needs openssl)."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl is not installed")
    d: Path = tmp_path_factory.mktemp("smtp-tls")
    key, cert = d / "key.pem", d / "cert.pem"
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
         "-subj", "/CN=localhost", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    return ctx


# --- fixtures ----------------------------------------------------------------------------


@pytest.fixture
def smtp_server_factory() -> Iterator[Callable[..., SmtpServer]]:
    """Start SMTP servers with options: auth=True, tls=<server SSLContext>, implicit_tls=True,
    size_limit=<bytes> (the SIZE the server advertises and enforces)."""
    started: list[SmtpServer] = []

    def make(**options: Any) -> SmtpServer:
        srv = SmtpServer(**options)
        srv.start()
        started.append(srv)
        return srv

    yield make
    for srv in started:
        srv.stop()


@pytest.fixture
def smtp_server(smtp_server_factory: Callable[..., SmtpServer]) -> SmtpServer:
    """A recording SMTP server without AUTH on 127.0.0.1 (faults off until a test asks)."""
    return smtp_server_factory()


@pytest.fixture
def smtp_auth_server(smtp_server_factory: Callable[..., SmtpServer]) -> SmtpServer:
    """A recording SMTP server that requires AUTH (USER / PASSWORD, or XOAUTH2 with TOKEN)."""
    return smtp_server_factory(auth=True)
