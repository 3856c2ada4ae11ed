"""Dovecot IMAP fixtures (see MAILSTACK.md): a real server on 127.0.0.1 for the whole session.

Fixtures:

- ``dovecot`` (session): a running Dovecot 2.3 with users ``sales@example.test`` and
  ``rep1..rep3@example.test`` (password ``s3cret``). Plain IMAP on ``port``; when openssl
  is present also implicit TLS on ``tls_port`` and STARTTLS on ``port``, with a
  self-signed certificate (so ``verify_tls: false`` is needed to log in over TLS).
- ``imap_user`` (function): the address of a brand-new user with an empty mailbox, so
  tests never see each other's mail.

Skipped when ``dovecot`` is not installed.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from imapclient import IMAPClient

from worker.config import MailboxConfig

PASSWORD = "s3cret"
DOMAIN = "example.test"
DEFAULT_USERS = ("sales", "rep1", "rep2", "rep3")
FRESH_USER_POOL = 300

_CONF = """\
protocols = imap
listen = 127.0.0.1
base_dir = {d}/run
state_dir = {d}/state
log_path = {d}/dovecot.log
{ssl}
disable_plaintext_auth = no
auth_mechanisms = plain login
mail_location = maildir:{d}/mail/%u
protocol imap {{
  imap_idle_notify_interval = 2 secs
}}
service imap-login {{
  inet_listener imap {{
    address = 127.0.0.1
    port = {port}
  }}
  inet_listener imaps {{
    address = 127.0.0.1
    port = {tls_port}
  }}
}}
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {d}/users
}}
userdb {{
  driver = static
  args = uid=nobody gid=nogroup home={d}/mail/%u
}}
"""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _group_alive(group: int) -> bool:
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return False
    return True


def _self_signed_cert(d: Path) -> bool:
    if shutil.which("openssl") is None:
        return False
    done = subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-days", "2", "-subj", "/CN=localhost", "-keyout", str(d / "key.pem"),
         "-out", str(d / "cert.pem")],
        capture_output=True, check=False,
    )  # fmt: skip
    return done.returncode == 0


class DovecotServer:
    """A throwaway Dovecot: its config, users and mail all live in `root`."""

    host = "127.0.0.1"

    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = free_port()
        root.chmod(0o755)  # the auth process runs as user dovecot and must enter it
        for sub in ("run", "state", "mail"):
            (root / sub).mkdir(exist_ok=True)
            (root / sub).chmod(0o755)  # whatever the umask of the test process
        shutil.chown(root / "mail", "nobody", "nogroup")
        self.has_tls = _self_signed_cert(root)
        self.tls_port: int | None = free_port() if self.has_tls else None
        ssl_conf = (
            f"ssl = yes\nssl_cert = <{root}/cert.pem\nssl_key = <{root}/key.pem"
            if self.has_tls
            else "ssl = no"
        )
        self.conf = root / "dovecot.conf"
        self.conf.write_text(
            _CONF.format(d=root, port=self.port, tls_port=self.tls_port or 0, ssl=ssl_conf)
        )
        self.users: dict[str, str] = {}
        self._proc: subprocess.Popen[bytes] | None = None
        self._serial = itertools.count(1)
        # Dovecot re-reads the passwd file at most once a second, so a user added on the
        # fly may not log in at once: keep a pool of unused users written before start.
        self._pool = [f"t{n}@{DOMAIN}" for n in range(1, FRESH_USER_POOL + 1)]
        lines = [f"{name}@{DOMAIN}" for name in DEFAULT_USERS] + self._pool
        (root / "users").write_text("".join(f"{a}:{{PLAIN}}{PASSWORD}\n" for a in lines))
        (root / "users").chmod(0o644)  # read by the auth process, which runs as dovecot
        self.users.update(dict.fromkeys(lines, PASSWORD))

    # -- process ----------------------------------------------------------------------

    def start(self) -> None:
        """Start `dovecot -F` in its own process group and wait until it accepts connections."""
        self._proc = subprocess.Popen(
            ["dovecot", "-F", "-c", str(self.conf)],
            stdout=subprocess.DEVNULL,
            stderr=(self.root / "fg.out").open("ab"),
            start_new_session=True,
        )
        deadline = time.monotonic() + 10
        while not _port_open(self.port):
            if self._proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"dovecot did not start:\n{self.log()}")
            time.sleep(0.05)

    def stop(self) -> None:
        """Terminate Dovecot with every process it started, and wait for them.

        The master alone leaves running imap sessions (and their log process) behind, so
        the whole process group we created gets SIGTERM, as a real shutdown would send.
        """
        proc, self._proc = self._proc, None
        if proc is None:
            return
        group = proc.pid  # start_new_session: the master leads its own group
        with contextlib.suppress(ProcessLookupError):
            os.killpg(group, signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        deadline = time.monotonic() + 10
        while _group_alive(group):
            if time.monotonic() > deadline:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(group, signal.SIGKILL)
            time.sleep(0.05)

    def restart(self) -> None:
        """Stop and start the same config with the same mail (connections are cut)."""
        self.stop()
        self.start()

    def log(self) -> str:
        parts = []
        for name in ("dovecot.log", "fg.out"):
            with contextlib.suppress(OSError):
                parts.append((self.root / name).read_text(errors="replace")[-4000:])
        return "\n".join(parts)

    # -- users and mail ---------------------------------------------------------------

    def fresh_user(self) -> str:
        """A user whose mailbox nobody has used yet (from the pool, else a new one)."""
        if self._pool:
            return self._pool.pop(0)
        return self.add_user(f"x{next(self._serial)}-{time.monotonic_ns()}@{DOMAIN}")

    def add_user(self, address: str, password: str = PASSWORD) -> str:
        """Add a user to the passwd file; waits until Dovecot can have re-read it."""
        with (self.root / "users").open("a") as f:
            f.write(f"{address}:{{PLAIN}}{password}\n")
        self.users[address] = password
        time.sleep(1.1)
        return address

    def maildir(self, user: str) -> Path:
        """The user's mail directory on disk (root of its Maildir)."""
        return self.root / "mail" / user

    def client(self, user: str) -> IMAPClient:
        """A logged-in imapclient for `user`; the caller logs out (use `with`)."""
        c = IMAPClient(self.host, port=self.port, ssl=False, timeout=10)
        c.login(user, self.users[user])
        return c

    def append(self, user: str, folder: str, raw: bytes, flags: Sequence[str] = ()) -> int:
        """APPEND a message as another client would; return its UID."""
        with self.client(user) as c:
            if not c.folder_exists(folder):
                c.create_folder(folder)
            resp = c.append(folder, raw, flags=tuple(flags))
        m = re.search(rb"APPENDUID \d+ (\d+)", resp)
        assert m, resp
        return int(m.group(1))

    def flags(self, user: str, folder: str) -> dict[int, tuple[str, ...]]:
        """Every message's flags in `folder` (without \\Recent), as the server has them now."""
        with self.client(user) as c:
            c.select_folder(folder, readonly=True)
            got = c.get_flags(c.search(["ALL"]))
        # \Recent belongs to whichever session saw the message first, not to the message.
        return {uid: tuple(f.decode() for f in fl if f != b"\\Recent") for uid, fl in got.items()}

    def uids(self, user: str, folder: str) -> list[int]:
        with self.client(user) as c:
            if not c.folder_exists(folder):
                return []
            c.select_folder(folder, readonly=True)
            return sorted(c.search(["ALL"]))

    def create_folder(self, user: str, folder: str) -> None:
        with self.client(user) as c:
            c.create_folder(folder)

    def delete_folder(self, user: str, folder: str) -> None:
        with self.client(user) as c:
            c.delete_folder(folder)

    def mailbox_section(self, user: str, name: str = "sales", **overrides: Any) -> dict[str, Any]:
        """The `mailboxes[]` entry (YAML-ready) that reads `user` here over plain IMAP."""
        return {
            "name": name,
            "kind": "imap",
            "host": self.host,
            "port": self.port,
            "security": "none",
            "username": user,
            "password": self.users.get(user, PASSWORD),
            **overrides,
        }

    def mailbox_config(self, user: str, **overrides: Any) -> MailboxConfig:
        """A plain (security: none) IMAP mailbox config for `user` on this server."""
        fields = self.mailbox_section(user, user.split("@")[0], timeout=10, address=user)
        fields.update(overrides)
        return MailboxConfig.model_validate(fields)


@pytest.fixture(scope="session")
def dovecot() -> Iterator[DovecotServer]:
    """A Dovecot IMAP server on 127.0.0.1 for the whole test session."""
    if shutil.which("dovecot") is None:
        pytest.skip("dovecot is not installed (apt-get install dovecot-imapd)")
    # Not under pytest's basetemp: that is 0700, and Dovecot's auth process (user dovecot)
    # must be able to reach the users file.
    root = Path(tempfile.mkdtemp(prefix="twoway-dovecot-"))
    server = DovecotServer(root)
    try:
        check = subprocess.run(
            ["dovecot", "-n", "-c", str(server.conf)], capture_output=True, text=True, check=False
        )
        if check.returncode != 0:
            pytest.skip(f"this dovecot does not take our 2.3 config: {check.stderr.strip()}")
        server.start()
        yield server
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def imap_user(dovecot: DovecotServer) -> str:
    """A fresh user with an empty mailbox on the session's Dovecot."""
    return dovecot.fresh_user()
