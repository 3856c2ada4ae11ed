"""Mail sources: read a team mailbox over IMAP or from a local Maildir without changing it.

This is the only module that imports imapclient; the rest of twoway talks to the small
types below. A source never marks mail read and never deletes it: bodies are fetched with
``BODY.PEEK[]`` from folders opened read-only (EXAMINE), and a Maildir is read in place
(files are never renamed, so a human's flags stay as they are). Mail is filed into other
folders only through `move`, which the caller uses after its database commit.

Every message is keyed by ``(folder, uidvalidity, uid)``; when a folder's UIDVALIDITY
changes, every stored UID of that folder is void and the caller resyncs.

Failures surface as `MailboxError`, whose text is for people and never contains a secret;
``temporary`` tells the caller whether reconnecting with backoff may help.

A source is not thread-safe: one source per worker thread.
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import logging
import os
import re
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from email.parser import BytesHeaderParser
from pathlib import Path
from typing import Any, Protocol

from imapclient import IMAPClient
from imapclient.exceptions import (
    CapabilityError,
    IMAPClientAbortError,
    IMAPClientError,
    LoginError,
)

from worker.config import MailboxConfig
from worker.parsing import MAX_MESSAGE_BYTES

__all__ = ["MAX_BATCH_BYTES", "MAX_MESSAGE_BYTES"]  # and the classes below

MAX_BATCH_BYTES = 32 * 1024 * 1024
"""A batch (IMAP or Maildir) holds at most this many bytes of messages (and at least one)."""

logger = logging.getLogger(__name__)

# RFC 2177 asks clients to re-issue IDLE within 29 minutes; Gmail and many NAT boxes drop
# quiet connections after about 10, so we renew well before either.
IDLE_RENEW_SECONDS = 9 * 60
# How often a blocking wait looks at the stop event: SIGTERM must act within about 1 s.
STOP_CHECK_SECONDS = 0.5
# How often a Maildir wait stats new/ and cur/.
MAILDIR_POLL_SECONDS = 0.5
UIDLIST_NAME = "twoway-uidlist"

# Server response codes (RFC 5530) after which trying again later may succeed.
_TEMPORARY_CODES = ("[UNAVAILABLE]", "[INUSE]", "[LIMIT]")
_TEMPORARY_LOGIN_WORDS = ("temporary", "shutting down", "try again")
# Maildir info letters (the part after ":2,") and the IMAP flags they stand for.
_MAILDIR_FLAGS = {
    "D": "\\Draft",
    "F": "\\Flagged",
    "P": "$Forwarded",
    "R": "\\Answered",
    "S": "\\Seen",
    "T": "\\Deleted",
}
_HINTS = {
    "DNS": "check the mailbox host name and this machine's DNS settings",
    "connect": "check host and port (993 for security: ssl, 143 for starttls) and any "
    "firewall between this machine and the server",
    "TLS": "check security (ssl on port 993, starttls on 143) and that the server's "
    "certificate is valid for the host name",
    "auth": "check username and password or token; Gmail and Microsoft 365 need OAuth2 "
    "(oauth2_token, oauth2_token_file or oauth2_token_command)",
    "folder": "check the folder names in the mailbox config",
    "connection": "the connection broke; twoway reconnects by itself",
}


@dataclass(frozen=True)
class FetchedMessage:
    """One message as stored on the server: `raw` is the exact RFC 5322 bytes."""

    folder: str
    uidvalidity: int
    uid: int
    raw: bytes
    flags: tuple[str, ...]
    size: int | None = None
    """The whole message's size when `raw` holds only its first MAX_MESSAGE_BYTES (the
    rest is left on the server or disk); None when `raw` is the whole message."""


@dataclass(frozen=True)
class FolderInfo:
    """A folder's state when it was selected; `uidnext` is None when the server omits it."""

    uidvalidity: int
    uidnext: int | None
    exists: int


class MailboxError(Exception):
    """A connection, TLS, login or protocol failure.

    `temporary` says whether a retry (after reconnecting) may help; `step` names what
    failed (``DNS``, ``connect``, ``TLS``, ``auth``, ``folder``, ``connection``,
    ``IMAP``, ``maildir``); `hint` says what a person can do. ``str()`` reads
    ``"<step> failed: <detail>"`` and never contains a secret.
    """

    def __init__(
        self, detail: str, *, temporary: bool, step: str = "IMAP", hint: str | None = None
    ) -> None:
        super().__init__(f"{step} failed: {detail}")
        self.temporary = temporary
        self.step = step
        self.hint = hint if hint is not None else _HINTS.get(step)


class MailSource(Protocol):
    """Where inbound mail comes from; implemented by `ImapSource` and `MaildirSource`."""

    name: str
    supports_idle: bool

    def connect(self) -> None:
        """Open and log in; raises MailboxError."""

    def close(self) -> None:
        """Let go of the connection; never raises."""

    def select(self, folder: str) -> FolderInfo:
        """Open `folder` read-only and report its UIDVALIDITY, UIDNEXT and size."""

    def fetch_new(
        self, folder: str, after_uid: int, batch_size: int
    ) -> Iterator[list[FetchedMessage]]:
        """Yield every message with uid > `after_uid`, ascending, in batches."""

    def wait(self, timeout: float, stop: threading.Event) -> bool:
        """Block until new mail may be there, `timeout` passes or `stop` is set."""

    def move(
        self,
        folder: str,
        uids: Sequence[int],
        destination: str,
        *,
        uidvalidity: int | None = None,
    ) -> None:
        """File messages into `destination` (created when missing)."""

    def has_message_id(self, folder: str, message_id: str) -> bool:
        """Whether a message with this Message-ID is in `folder`."""

    def append(self, folder: str, raw: bytes, *, flags: Sequence[str] = ()) -> None:
        """Store `raw` as a new message in `folder`."""


# --- IMAP ------------------------------------------------------------------------------


def _tls_context(verify: bool) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    if not verify:
        # Only for tests against a self-signed server; the config documents it as such.
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


_BYTES_REPR = re.compile(r"(.*?)b(['\"])(.*)\2(.*)", re.S)
_COMMAND_PREFIX = re.compile(r"^[a-z]+ failed: ", re.I)
_DOVECOT_TIMING = re.compile(r"\s*\(\d+\.\d+ \+ \d+\.\d+(?: \+ \d+\.\d+)? secs\)")


def _exc_text(exc: BaseException) -> str:
    """The server's words from an exception, without Python and protocol noise."""
    text = str(exc) or type(exc).__name__
    # imapclient wraps server answers as str(bytes): show "text", not "b'text'".
    m = _BYTES_REPR.fullmatch(text)
    if m:
        text = f"{m.group(1)}{m.group(3)}{m.group(4)}"
    text = _COMMAND_PREFIX.sub("", text)
    return _DOVECOT_TIMING.sub("", text).strip().rstrip(".")


def _scrub(text: str, secret: str) -> str:
    # Servers do not echo credentials, but a buggy one or a proxy might; never pass it on.
    if secret and len(secret) >= 4:
        text = text.replace(secret, "***")
    return text


def _translate(exc: BaseException, step: str, what: str, secret: str = "") -> MailboxError:
    """Turn an imapclient/socket/ssl exception into a MailboxError for people.

    `step` is what we were doing; transport failures keep their own step (DNS, TLS,
    connection) because that is what a person has to fix.
    """
    detail = _scrub(_exc_text(exc), secret)
    transport = "connect" if step == "connect" else "connection"
    temporary = True
    if isinstance(exc, socket.gaierror):
        step, detail = "DNS", f"cannot resolve the host name ({exc.strerror})"
    elif isinstance(exc, ssl.SSLCertVerificationError):
        step, temporary = "TLS", False
        detail = f"the server certificate was rejected ({exc.verify_message})"
    elif isinstance(exc, ssl.SSLError):
        step, temporary = "TLS", False
        detail = f"TLS handshake failed ({exc.reason or detail})"
    elif isinstance(exc, TimeoutError):
        step, detail = transport, "no answer from the server in time"
    elif isinstance(exc, ConnectionRefusedError):
        step, detail = "connect", "the server refused the connection"
    elif isinstance(exc, OSError):
        step, detail = transport, exc.strerror or detail
    elif isinstance(exc, IMAPClientAbortError):
        step, detail = transport, f"the server closed the connection ({detail})"
    else:
        # A NO or BAD answer: only a few response codes promise that later may work.
        temporary = any(code in detail.upper() for code in _TEMPORARY_CODES)
        if isinstance(exc, LoginError):
            step, detail = "auth", f"the server rejected the login {what} ({detail})"
            what = ""
            # Not the credentials: a server that says so in words, without RFC 5530's
            # [UNAVAILABLE] (Dovecot answers a LOGIN during its shutdown "NO Shutting
            # down"; others "temporary failure, try again later").
            said = detail.lower()
            temporary = temporary or any(w in said for w in _TEMPORARY_LOGIN_WORDS)
    prefix = f"{what}: " if what else ""
    return MailboxError(prefix + detail, temporary=temporary, step=step)


def _new_mail_signalled(responses: Sequence[Any]) -> bool:
    """Whether IDLE responses announce new messages (``* n EXISTS`` / ``* n RECENT``)."""
    return any(
        isinstance(r, tuple) and len(r) >= 2 and r[1] in (b"EXISTS", b"RECENT") for r in responses
    )


def _server_said_bye(responses: Sequence[Any]) -> bool:
    return any(isinstance(r, tuple) and r and r[0] == b"BYE" for r in responses)


_SIZES_PER_FETCH = 1000
"""UIDs whose sizes one FETCH asks for (a few dozen bytes of answer each)."""


def _groups(sizes: list[tuple[int, int]], batch_size: int) -> Iterator[list[tuple[int, int]]]:
    """`sizes` ((uid, bytes) in order) cut into groups of at most `batch_size` messages
    and MAX_BATCH_BYTES (counting each message as at most MAX_MESSAGE_BYTES, what is
    fetched of it); a group holds at least one message."""
    group: list[tuple[int, int]] = []
    total = 0
    for uid, size in sizes:
        cost = min(size, MAX_MESSAGE_BYTES)
        if group and (len(group) >= batch_size or total + cost > MAX_BATCH_BYTES):
            yield group
            group, total = [], 0
        group.append((uid, size))
        total += cost
    if group:
        yield group


class ImapSource:
    """A `MailSource` over IMAP4rev1 (kind ``imap``).

    Folders are opened with EXAMINE and bodies fetched with ``BODY.PEEK[]``, so reading
    never sets ``\\Seen``. A broken connection raises ``MailboxError(temporary=True)`` and
    leaves the source disconnected; the caller calls `connect` again (with backoff).
    """

    def __init__(self, cfg: MailboxConfig) -> None:
        if cfg.kind != "imap" or not cfg.host:
            raise ValueError(f"mailbox {cfg.name!r} is not an IMAP mailbox")
        self.cfg = cfg
        self.name = cfg.name
        self.supports_idle = False
        self._host: str = cfg.host
        self._client: IMAPClient | None = None
        self._caps: frozenset[bytes] = frozenset()
        self._selected: tuple[str, bool] | None = None  # (folder, read-only)
        # UIDNEXT seen when a fetch started, per folder: if the server has moved past it by
        # the time we IDLE, mail came in between and wait() must not sleep on it.
        self._fetched_uidnext: dict[str, int] = {}

    # -- connection -----------------------------------------------------------------

    def connect(self) -> None:
        """Open the connection (implicit TLS, STARTTLS or plain loopback) and log in.

        Capabilities are read again after login, since servers announce only a few before.
        Raises MailboxError naming the step (DNS, connect, TLS, auth) that failed.
        """
        self.close()
        cfg = self.cfg
        ctx = _tls_context(cfg.verify_tls) if cfg.security != "none" else None
        where = f"{self._host}:{cfg.effective_port}"
        try:
            client = IMAPClient(
                self._host,
                port=cfg.effective_port,
                ssl=cfg.security == "ssl",
                ssl_context=ctx,
                timeout=cfg.timeout,
            )
        except (OSError, IMAPClientError) as e:
            raise _translate(e, "connect", where) from None
        try:
            if cfg.security == "starttls":
                self._starttls(client, ctx, where)
            self._login(client)
            try:
                self._caps = frozenset(c.upper() for c in client.capabilities())
            except (OSError, IMAPClientError) as e:
                raise _translate(e, "IMAP", "CAPABILITY") from None
        except BaseException:
            with contextlib.suppress(Exception):
                client.shutdown()
            raise
        self._client = client
        self._selected = None
        self.supports_idle = cfg.idle and b"IDLE" in self._caps
        logger.debug("connected to %s as %s", where, self._username)

    def _starttls(self, client: IMAPClient, ctx: ssl.SSLContext | None, where: str) -> None:
        try:
            client.starttls(ctx)
        except CapabilityError:
            raise MailboxError(
                f"{where} does not offer STARTTLS", temporary=False, step="TLS"
            ) from None
        except (OSError, IMAPClientError) as e:
            raise _translate(e, "TLS", where) from None

    @property
    def _username(self) -> str:
        return self.cfg.username or self.cfg.address or ""

    def _login(self, client: IMAPClient) -> None:
        user = self._username
        try:
            how, secret = self.cfg.login_secret()
        except OSError as e:
            raise MailboxError(
                f"cannot read the secret file ({e.strerror})", temporary=False, step="auth"
            ) from None
        except subprocess.TimeoutExpired:
            # Its text would repeat the command line, which may hold a client secret.
            raise MailboxError(
                "oauth2_token_command did not finish in time", temporary=True, step="auth"
            ) from None
        except RuntimeError as e:
            # The token command usually asks an identity provider over the network.
            raise MailboxError(str(e), temporary=True, step="auth") from None
        if how == "none" or not user:
            raise MailboxError(
                "no username and password or OAuth2 token configured",
                temporary=False,
                step="auth",
            )
        try:
            if how == "xoauth2":
                client.oauth2_login(user, secret)
            else:
                client.login(user, secret)
        except (OSError, IMAPClientError) as e:
            raise _translate(e, "auth", f"as {user!r}", secret) from None

    def close(self) -> None:
        """Log out; never raises (a dead connection is simply dropped)."""
        client, self._client = self._client, None
        self._selected = None
        if client is None:
            return
        try:
            client.logout()
        except Exception:
            with contextlib.suppress(Exception):
                client.shutdown()

    def _drop(self) -> None:
        client, self._client = self._client, None
        self._selected = None
        if client is not None:
            with contextlib.suppress(Exception):
                client.shutdown()

    @contextlib.contextmanager
    def _call(self, step: str, what: str = "") -> Iterator[IMAPClient]:
        """Run IMAP commands, translating failures; a broken connection is dropped."""
        if self._client is None:
            raise MailboxError("not connected", temporary=True, step="connection")
        try:
            yield self._client
        except (OSError, IMAPClientError) as e:
            err = _translate(e, step, what)
            if err.step in ("connection", "connect", "TLS") or isinstance(e, IMAPClientAbortError):
                self._drop()
            raise err from None

    # -- reading --------------------------------------------------------------------

    def list_folders(self) -> list[str]:
        """The names of all folders on the server (for hints and `config check`)."""
        with self._call("IMAP", "LIST") as c:
            return [_text(name) for _flags, _delim, name in c.list_folders()]

    def select(self, folder: str) -> FolderInfo:
        """EXAMINE `folder` (read-only: nothing a later command does can change flags)."""
        self._selected = None
        with self._call("folder", repr(folder)) as c:
            resp = c.select_folder(folder, readonly=True)
        self._selected = (folder, True)
        validity = resp.get(b"UIDVALIDITY")
        if not isinstance(validity, int):
            raise MailboxError(f"{folder!r}: the server reported no UIDVALIDITY", temporary=False)
        uidnext = resp.get(b"UIDNEXT")
        return FolderInfo(
            uidvalidity=validity,
            uidnext=uidnext if isinstance(uidnext, int) else None,
            exists=int(resp.get(b"EXISTS", 0)),
        )

    def fetch_new(
        self, folder: str, after_uid: int, batch_size: int
    ) -> Iterator[list[FetchedMessage]]:
        """Yield every message with uid > `after_uid`, ascending, `batch_size` at a time.

        UIDs are searched first, then their RFC822.SIZE, and bodies are fetched one group
        at a time, each of at most `batch_size` messages and MAX_BATCH_BYTES, so only one
        batch of bodies is in memory. Of a message over MAX_MESSAGE_BYTES only the start is
        fetched (``BODY.PEEK[]<0.N>``), and its FetchedMessage has the whole `size`: it is
        recorded as truncated and never holds up the messages behind it.
        ``UID n:*`` returns the highest UID even when it is below
        n, so the result is filtered here. A message expunged between search and fetch is
        left out. If the folder's UIDVALIDITY changes mid-way, MailboxError(temporary)
        is raised and the caller resyncs.
        """
        if batch_size <= 0:
            raise ValueError("batch_size must be positive")
        info = self.select(folder)
        if info.uidnext is not None:
            self._fetched_uidnext[folder] = info.uidnext
        if info.exists == 0 or (info.uidnext is not None and info.uidnext <= after_uid + 1):
            return
        with self._call("IMAP", f"searching {folder!r}") as c:
            found = c.search(["UID", f"{after_uid + 1}:*"])
        uids = sorted(u for u in found if u > after_uid)
        for start in range(0, len(uids), _SIZES_PER_FETCH):
            sizes = self._sizes(folder, info.uidvalidity, uids[start : start + _SIZES_PER_FETCH])
            for group in _groups(sizes, batch_size):
                batch = self._bodies(folder, info.uidvalidity, group)
                if batch:
                    yield batch

    def _sizes(self, folder: str, uidvalidity: int, uids: list[int]) -> list[tuple[int, int]]:
        """(uid, RFC822.SIZE) of each message still there, in `uids`' order."""
        self._ensure_examined(folder, uidvalidity)
        with self._call("IMAP", f"fetching sizes from {folder!r}") as c:
            data = c.fetch(uids, ["RFC822.SIZE"])
        out = []
        for uid in uids:
            item = data.get(uid)
            if item is not None:
                size = item.get(b"RFC822.SIZE")
                out.append((uid, int(size) if isinstance(size, int) else 0))
        return out

    def _bodies(
        self, folder: str, uidvalidity: int, group: list[tuple[int, int]]
    ) -> list[FetchedMessage]:
        """Fetch one group: at most MAX_MESSAGE_BYTES of each message (a partial FETCH,
        whatever RFC822.SIZE claimed), and its flags."""
        self._ensure_examined(folder, uidvalidity)
        part = f"BODY.PEEK[]<0.{MAX_MESSAGE_BYTES}>"
        with self._call("IMAP", f"fetching from {folder!r}") as c:
            data = c.fetch([uid for uid, _ in group], ["FLAGS", part])
        batch = []
        for uid, size in group:
            item = data.get(uid)
            raw = None if item is None else item.get(b"BODY[]<0>", item.get(b"BODY[]"))
            if item is None or raw is None:
                continue  # expunged meanwhile
            # \Recent only says which session saw the message first: not a property
            # of the message, and it would differ from one run to the next.
            flags = tuple(_text(f) for f in item.get(b"FLAGS", ()) if f.upper() != b"\\RECENT")
            raw = bytes(raw)
            whole = size if size > len(raw) and len(raw) >= MAX_MESSAGE_BYTES else None
            batch.append(FetchedMessage(folder, uidvalidity, uid, raw, flags, whole))
        return batch

    def _ensure_examined(self, folder: str, uidvalidity: int) -> None:
        # The caller may use this source between two batches (a Sent-folder check, say);
        # come back to the folder, and refuse to mix up UIDs of two UIDVALIDITY epochs.
        if self._selected == (folder, True):
            return
        info = self.select(folder)
        if info.uidvalidity != uidvalidity:
            raise MailboxError(
                f"UIDVALIDITY of {folder!r} changed during the fetch; resync needed",
                temporary=True,
            )

    def wait(self, timeout: float, stop: threading.Event) -> bool:
        """Block until new mail may be there, `timeout` seconds pass, or `stop` is set.

        With IDLE (offered by the server and ``idle`` configured) this watches the first
        configured folder and returns True as soon as the server announces EXISTS or
        RECENT, or at once when mail arrived since the last `fetch_new`. Without IDLE it
        just sleeps and returns False. Returns within about 0.5 s of `stop` being set.
        """
        deadline = time.monotonic() + timeout
        if not self.supports_idle:
            stop.wait(max(0.0, timeout))
            return False
        folder = self.cfg.folders[0]
        info = self.select(folder)
        seen = self._fetched_uidnext.get(folder)
        if seen is not None and info.uidnext is not None and info.uidnext > seen:
            return True
        while not stop.is_set():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            if self._idle_once(min(remaining, IDLE_RENEW_SECONDS), stop):
                return True
        return False

    def watch(self, folder: str, seconds: float, stop: threading.Event) -> bool:
        """IDLE on `folder` for at most `seconds` (renewed every IDLE_RENEW_SECONDS).

        For a watcher that holds its own connection to one folder: True as soon as the
        server announces new mail (also when it came since this source last looked:
        UIDNEXT moved, or an EXISTS arrived between two IDLE commands), False on timeout
        or stop. Raises MailboxError; needs IDLE (`supports_idle`).
        """
        if not self.supports_idle:
            raise MailboxError("the server does not offer IDLE", temporary=False)
        deadline = time.monotonic() + seconds
        if self._selected != (folder, True):
            info = self.select(folder)
            seen = self._fetched_uidnext.get(folder)
            if info.uidnext is not None:
                self._fetched_uidnext[folder] = info.uidnext
            if seen is None or (info.uidnext is not None and info.uidnext > seen):
                return True  # first look, or mail came while we were not idling
        while not stop.is_set():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            with self._call("IMAP", "NOOP") as c:
                _, pending = c.noop()
            if _new_mail_signalled(pending):
                return True
            if self._idle_once(min(remaining, IDLE_RENEW_SECONDS), stop):
                return True
        return False

    def _idle_once(self, seconds: float, stop: threading.Event) -> bool:
        """One IDLE command of at most `seconds`; True when new mail was announced."""
        with self._call("IMAP", "IDLE") as c:
            c.idle()
        new_mail = False
        end = time.monotonic() + seconds
        try:
            while not stop.is_set():
                left = end - time.monotonic()
                if left <= 0:
                    break
                step = min(left, STOP_CHECK_SECONDS)
                started = time.monotonic()
                with self._call("IMAP", "IDLE") as c:
                    responses = c.idle_check(timeout=step)
                if _server_said_bye(responses):
                    self._drop()
                    raise MailboxError(
                        "the server closed the connection (BYE)",
                        temporary=True,
                        step="connection",
                    )
                if _new_mail_signalled(responses):
                    new_mail = True
                    break
                if not responses and time.monotonic() - started < step / 2:
                    # The socket was readable but held no complete line: usually EOF.
                    # Ending IDLE either works or raises the connection error.
                    break
        finally:
            if self._client is not None:
                # Never send another command during IDLE: end it first, even on errors.
                with self._call("IMAP", "IDLE") as c:
                    _text, late = c.idle_done()
                # An EXISTS that came just before DONE must not be lost.
                new_mail = new_mail or _new_mail_signalled(late)
        return new_mail

    # -- writing (only after the caller's commit) -------------------------------------

    def move(
        self,
        folder: str,
        uids: Sequence[int],
        destination: str,
        *,
        uidvalidity: int | None = None,
    ) -> None:
        """Move messages from `folder` into `destination`, creating it when missing.

        Uses MOVE when offered, else COPY, ``\\Deleted`` and UID EXPUNGE (with UIDPLUS;
        without it the originals stay flagged ``\\Deleted``, because a plain EXPUNGE
        would also remove mail a person had marked). When `uidvalidity` is given and the
        folder's differs, nothing is moved and MailboxError is raised: the UIDs are stale.
        """
        if not uids:
            return
        with self._call("folder", repr(destination)) as c:
            if not c.folder_exists(destination):
                c.create_folder(destination)
        self._selected = None
        with self._call("folder", repr(folder)) as c:
            resp = c.select_folder(folder)  # read-write: moving needs it
        self._selected = (folder, False)
        if uidvalidity is not None and resp.get(b"UIDVALIDITY") != uidvalidity:
            raise MailboxError(
                f"UIDVALIDITY of {folder!r} changed; not moving stale UIDs", temporary=False
            )
        with self._call("IMAP", f"moving to {destination!r}") as c:
            if b"MOVE" in self._caps:
                c.move(list(uids), destination)
            else:
                c.copy(list(uids), destination)
                c.delete_messages(list(uids))
                if b"UIDPLUS" in self._caps:
                    c.uid_expunge(list(uids))

    def has_message_id(self, folder: str, message_id: str) -> bool:
        """Whether `folder` holds a message whose Message-ID header contains `message_id`."""
        self.select(folder)
        with self._call("IMAP", f"searching {folder!r}") as c:
            return bool(c.search(["HEADER", "Message-ID", message_id]))

    def append(self, folder: str, raw: bytes, *, flags: Sequence[str] = ()) -> None:
        """APPEND `raw` to `folder` (which must exist) with `flags` (e.g. ``\\Seen``)."""
        with self._call("folder", repr(folder)) as c:
            c.append(folder, raw, flags=tuple(flags))


# --- Maildir ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _MaildirIndex:
    uidvalidity: int
    uidnext: int
    messages: list[tuple[int, Path]]  # present files, ascending uid


class MaildirSource:
    """A `MailSource` over a local Maildir (kind ``maildir``; the demo and tests).

    ``INBOX`` is the Maildir root; any other folder is a Maildir++ subfolder ``.Name``
    (``A/B`` is ``.A.B``). A Maildir has no UIDs, so, like Dovecot, twoway keeps a uid
    list per folder (``twoway-uidlist``: first line the UIDVALIDITY, then ``uid base``
    lines, appended and fsynced as new files appear). Files are matched on the part of
    their name before ``:``, which stays the same when a mail program changes flags or
    moves them from new/ to cur/. Reading never renames or moves a file. Deleting the
    uid list gives a new UIDVALIDITY (a resync).
    """

    supports_idle = True  # wait() watches the directories and returns True on a change

    def __init__(self, cfg: MailboxConfig) -> None:
        if cfg.kind != "maildir" or cfg.path is None:
            raise ValueError(f"mailbox {cfg.name!r} is not a Maildir mailbox")
        self.cfg = cfg
        self.name = cfg.name
        self.root = Path(cfg.path)
        self._stamps: dict[str, tuple[int, int]] = {}
        self._issued_validity: dict[str, int] = {}
        self._counter = itertools.count()

    def connect(self) -> None:
        """Check that the root is a Maildir (has new/ and cur/)."""
        if not ((self.root / "new").is_dir() and (self.root / "cur").is_dir()):
            raise MailboxError(
                f"{self.root} is not a Maildir (it needs new/ and cur/ directories)",
                temporary=False,
                step="maildir",
                hint="check the mailbox path, or create the Maildir",
            )

    def close(self) -> None:
        """Nothing to let go of."""

    def _dir(self, folder: str) -> Path:
        if folder.upper() == "INBOX":
            return self.root
        if not folder or folder.startswith(".") or ".." in folder or "\\" in folder:
            raise MailboxError(
                f"{folder!r} is not a valid folder name", temporary=False, step="folder"
            )
        return self.root / ("." + folder.replace("/", "."))

    def _existing_dir(self, folder: str) -> Path:
        d = self._dir(folder)
        if not ((d / "new").is_dir() and (d / "cur").is_dir()):
            raise MailboxError(
                f"{folder!r} does not exist in {self.root}", temporary=False, step="folder"
            )
        return d

    @staticmethod
    def _stamp(d: Path) -> tuple[int, int]:
        try:
            return ((d / "new").stat().st_mtime_ns, (d / "cur").stat().st_mtime_ns)
        except FileNotFoundError:
            return (0, 0)

    def _index(self, folder: str) -> _MaildirIndex:
        """Scan new/ and cur/, give new files the next UIDs, and return what is there."""
        d = self._existing_dir(folder)
        # Taken before listing, so that a file arriving during the scan wakes wait().
        self._stamps[folder] = self._stamp(d)
        present: dict[str, Path] = {}
        for sub in ("new", "cur"):
            with os.scandir(d / sub) as entries:
                for e in entries:
                    if not e.name.startswith(".") and e.is_file():
                        present[e.name.split(":", 1)[0]] = Path(e.path)
        fd = os.open(d / UIDLIST_NAME, os.O_RDWR | os.O_CREAT, 0o600)
        with open(fd, "r+", encoding="utf-8", newline="\n") as f:
            fcntl.flock(f, fcntl.LOCK_EX)  # another twoway process may be scanning too
            text = f.read()
            lines = text.splitlines()
            known: dict[str, int] = {}
            validity = int(lines[0]) if lines and lines[0].strip().isdigit() else 0
            if validity:
                for line in lines[1:]:
                    parts = line.split(" ")
                    if len(parts) == 2 and parts[0].isdigit() and parts[1]:
                        known[parts[1]] = int(parts[0])
            else:
                # A new (or unreadable) list starts a new UIDVALIDITY epoch; make sure it
                # differs from the one we handed out before even within the same second.
                validity = max(int(time.time()), self._issued_validity.get(folder, 0) + 1)
                f.seek(0)
                f.truncate()
                text = f"{validity}\n"
                f.write(text)
            self._issued_validity[folder] = validity
            next_uid = max(known.values(), default=0) + 1
            fresh = [b for b in present if b not in known]
            if fresh:
                fresh.sort(key=lambda b: (_mtime_ns(present[b]), b))
                out = [] if text.endswith("\n") else [""]  # finish a torn last line
                for base in fresh:
                    known[base] = next_uid
                    out.append(f"{next_uid} {base}")
                    next_uid += 1
                f.seek(0, os.SEEK_END)
                f.write("\n".join(out) + "\n")
            f.flush()
            # The caller commits "last uid" to its database; the uid list must not lose
            # a line the database already relies on.
            os.fsync(f.fileno())
        messages = sorted((known[b], p) for b, p in present.items())
        return _MaildirIndex(validity, next_uid, messages)

    def select(self, folder: str) -> FolderInfo:
        """Scan the folder and report its UIDVALIDITY, next UID and message count."""
        idx = self._index(folder)
        return FolderInfo(idx.uidvalidity, idx.uidnext, len(idx.messages))

    def fetch_new(
        self, folder: str, after_uid: int, batch_size: int
    ) -> Iterator[list[FetchedMessage]]:
        """Yield every message with uid > `after_uid`, ascending, `batch_size` at a time.

        A file renamed by a mail program meanwhile is found again by its base name; one
        deleted meanwhile is left out.
        """
        if batch_size <= 0:
            raise ValueError("batch_size must be positive")
        idx = self._index(folder)
        todo = [(uid, path) for uid, path in idx.messages if uid > after_uid]
        batch: list[FetchedMessage] = []
        size = 0
        for uid, path in todo:
            found = self._read(path)
            if found is None:
                continue
            raw, name, whole = found
            if batch and size + len(raw) > MAX_BATCH_BYTES:  # memory: bytes bound too
                yield batch
                batch, size = [], 0
            batch.append(FetchedMessage(folder, idx.uidvalidity, uid, raw, _flags(name), whole))
            size += len(raw)
            if len(batch) >= batch_size:
                yield batch
                batch, size = [], 0
        if batch:
            yield batch

    @staticmethod
    def _read(path: Path) -> tuple[bytes, str, int | None] | None:
        """(the first MAX_MESSAGE_BYTES, the file name, the file's size when it is larger)."""
        candidates = [path]
        base = path.name.split(":", 1)[0]
        folder_dir = path.parent.parent
        for _ in range(2):
            for p in candidates:
                with contextlib.suppress(FileNotFoundError), p.open("rb") as f:
                    # Past this, the rest of a message is never looked at (parsing reads
                    # 2 MB): reading it would only cost memory.
                    size = os.fstat(f.fileno()).st_size
                    raw = f.read(MAX_MESSAGE_BYTES)
                    return raw, p.name, size if size > len(raw) else None
            candidates = [
                folder_dir / sub / n
                for sub in ("cur", "new")
                for n in os.listdir(folder_dir / sub)
                if n.split(":", 1)[0] == base
            ]
        return None

    def wait(self, timeout: float, stop: threading.Event) -> bool:
        """Poll the mtimes of new/ and cur/ of every configured folder every 0.5 s.

        True as soon as one differs from what the last scan saw (or from the start of
        this wait when there was no scan); False on timeout or when `stop` is set.
        """
        deadline = time.monotonic() + timeout
        dirs = {f: self._dir(f) for f in self.cfg.folders}
        base = {f: self._stamps.get(f) or self._stamp(d) for f, d in dirs.items()}
        while True:
            if any(self._stamp(d) != base[f] for f, d in dirs.items()):
                return True
            left = deadline - time.monotonic()
            if left <= 0 or stop.wait(min(left, MAILDIR_POLL_SECONDS)):
                return False

    def move(
        self,
        folder: str,
        uids: Sequence[int],
        destination: str,
        *,
        uidvalidity: int | None = None,
    ) -> None:
        """Move the files into `destination` (created when missing), keeping their names."""
        if not uids:
            return
        idx = self._index(folder)
        if uidvalidity is not None and idx.uidvalidity != uidvalidity:
            raise MailboxError(
                f"UIDVALIDITY of {folder!r} changed; not moving stale UIDs",
                temporary=False,
                step="maildir",
            )
        dest = self._make_folder(destination)
        wanted = set(uids)
        for uid, path in idx.messages:
            if uid in wanted:
                with contextlib.suppress(FileNotFoundError):
                    path.rename(dest / path.parent.name / path.name)

    def has_message_id(self, folder: str, message_id: str) -> bool:
        """Whether a message in `folder` has this Message-ID (angle brackets optional)."""
        want = message_id.strip().strip("<>")
        parser = BytesHeaderParser()
        for _uid, path in reversed(self._index(folder).messages):
            try:
                with path.open("rb") as fh:
                    headers = parser.parse(fh)
            except FileNotFoundError:
                continue
            if str(headers.get("Message-ID", "")).strip().strip("<>") == want:
                return True
        return False

    def append(self, folder: str, raw: bytes, *, flags: Sequence[str] = ()) -> None:
        """Deliver `raw` into `folder` (created when missing): write to tmp/, rename.

        With flags the file goes to cur/ with its ``:2,`` info, else to new/.
        """
        d = self._make_folder(folder)
        now = time.time()
        host = socket.gethostname().replace("/", "\\057").replace(":", "\\072")
        name = (
            f"{int(now)}.M{int(now * 1e6) % 1_000_000}P{os.getpid()}Q{next(self._counter)}.{host}"
        )
        letters = "".join(sorted(k for k, v in _MAILDIR_FLAGS.items() if v in flags))
        tmp = d / "tmp" / name
        with tmp.open("wb") as fh:
            fh.write(raw)
            fh.flush()
            os.fsync(fh.fileno())
        target = d / "cur" / f"{name}:2,{letters}" if flags else d / "new" / name
        tmp.rename(target)

    def _make_folder(self, folder: str) -> Path:
        d = self._dir(folder)
        for sub in ("tmp", "new", "cur"):
            (d / sub).mkdir(parents=True, exist_ok=True)
        if d != self.root:
            (d / "maildirfolder").touch()
        return d


def _mtime_ns(path: Path) -> int:
    try:
        return path.stat().st_mtime_ns
    except FileNotFoundError:
        return 0


def _flags(filename: str) -> tuple[str, ...]:
    _, sep, info = filename.partition(":2,")
    if not sep:
        return ()
    return tuple(_MAILDIR_FLAGS[c] for c in info if c in _MAILDIR_FLAGS)


# --- entry points ----------------------------------------------------------------------


def open_source(cfg: MailboxConfig) -> MailSource:
    """The source for a configured mailbox (not yet connected)."""
    if cfg.kind == "maildir":
        return MaildirSource(cfg)
    return ImapSource(cfg)


def probe(cfg: MailboxConfig) -> str | None:
    """`config check --connect` for one mailbox: None when it can be read, else why not
    (an IMAP account as `probe_imap` says; a Maildir whose folders cannot be opened)."""
    if cfg.kind != "maildir":
        return probe_imap(cfg)
    source = open_source(cfg)
    try:
        source.connect()
        for folder in cfg.folders:
            source.select(folder)
    except MailboxError as e:
        return str(e)
    finally:
        source.close()
    return None


def probe_imap(cfg: MailboxConfig) -> str | None:
    """Connect, secure, log in and select every configured folder (and the Sent folder).

    Returns None when all of that works, else one line for a person:
    ``"<step> failed: <detail>. Hint: <what to do>"`` where step is DNS, connect, TLS,
    auth or folder. Never raises MailboxError and never shows a secret.
    """
    source = ImapSource(cfg)
    try:
        source.connect()
        folders = [*cfg.folders, *([cfg.sent_folder] if cfg.sent_folder else [])]
        for folder in folders:
            try:
                source.select(folder)
            except MailboxError as e:
                if e.step != "folder":
                    raise
                with contextlib.suppress(MailboxError):
                    names = source.list_folders()
                    e.hint = f"the server has: {', '.join(sorted(names)[:20])}"
                raise
    except MailboxError as e:
        text = str(e).rstrip(".")
        return f"{text}. Hint: {e.hint}" if e.hint else text
    finally:
        source.close()
    return None
