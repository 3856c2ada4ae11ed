"""`twoway run` as a user runs it: a subprocess against real Dovecot and aiosmtpd."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml
from sqlalchemy import select

from tests import mails
from tests.conftest import ROOT, twoway_cmd, wait_for
from tests.imap_server import DovecotServer
from tests.smtp_server import SmtpServer
from worker.app import App
from worker.config import clock_from_env, load_config
from worker.leads import import_leads
from worker.models import Lead
from worker.runner import Worker


@pytest.fixture
def setup(
    sqlite_url: str, tmp_path: Path, dovecot: DovecotServer, imap_user: str, smtp_server: SmtpServer
) -> dict[str, Any]:
    data: dict[str, Any] = {
        "database": sqlite_url,
        "templates_dir": str(ROOT / "templates"),
        "mailboxes": [
            {
                "name": "sales", "kind": "imap", "host": "127.0.0.1", "port": dovecot.port,
                "security": "none", "username": imap_user, "password": "${TEST_IMAP_PASSWORD}",
                "idle": True, "poll_interval": 30,
            }
        ],
        "smtp": smtp_server.section(),
        "sender": {"from": "Acme Sales <sales@example.com>"},
        "internal_domains": ["example.com"],
        "campaigns": [{"name": "welcome", "mailbox": "sales", "send_window": None,
                       "steps": [{"template": "nurture/welcome"}, {"template": "nurture/case-study", "delay": "3d"}]}],
        "reps": [{"name": "Ana Lopez", "email": "ana@example.com"}],
    }  # fmt: skip
    cfg = tmp_path / "twoway.yaml"
    cfg.write_text(yaml.safe_dump(data))
    env = {**os.environ, "TEST_IMAP_PASSWORD": dovecot.users[imap_user]}
    config = load_config(cfg, env=env)
    app = App.open(config, clock_from_env({}))
    with app.transaction() as s:
        import_leads(s, [(2, {"email": "maria@nube.example.org", "first_name": "María"})], app.now(),
                     campaign=config.campaign("welcome"))  # fmt: skip
    return {
        "cfg": cfg,
        "env": env,
        "app": app,
        "smtp": smtp_server,
        "dovecot": dovecot,
        "user": imap_user,
    }


class Daemon:
    """`twoway run --log-format json` in a subprocess, and the log lines it wrote so far."""

    def __init__(self, cmd: list[str], env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(
            cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)

    def said(self, text: str, after: int = 0) -> bool:
        """Whether a log line from the `after`-th on contains `text`."""
        return any(text in line for line in self.lines[after:])

    def stop(self) -> int:
        """SIGTERM, as a service manager stops it; its exit code; all its output read."""
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(5)
        self._reader.join(5)
        return code

    @property
    def output(self) -> str:
        return "".join(self.lines)


@pytest.fixture
def daemon(setup: dict[str, Any]) -> Iterator[Daemon]:
    d = Daemon(twoway_cmd(setup["cfg"], "run", "--log-format", "json"), setup["env"])
    yield d
    if d.proc.poll() is None:
        d.proc.kill()
        d.proc.wait(10)
    setup["app"].close()


IDLING = "idle: waiting for mail"
"""What the worker logs once it waits with every folder in IDLE (mail now is pushed to it)."""


def status_of(app: App, email: str) -> str:
    with app.transaction() as s:
        lead = s.scalar(select(Lead).where(Lead.email == email))
        assert lead is not None
        return lead.status


def test_it_sees_a_reply_within_seconds_and_stops_cleanly(
    setup: dict[str, Any], daemon: Daemon
) -> None:
    smtp: SmtpServer = setup["smtp"]
    wait_for(lambda: len(smtp.messages) == 1, 30, "step 1")
    step1 = smtp.messages[0].parsed()
    wait_for(lambda: daemon.said(IDLING), 30, "the worker idling after step 1")
    setup["dovecot"].append(
        setup["user"],
        "INBOX",
        mails.reply(step1, "Sounds great, can we get pricing?", datetime.now(UTC)),
    )
    took = wait_for(lambda: any("ana@example.com" in m.rcpts for m in smtp.messages), 5, "handoff")
    assert status_of(setup["app"], "maria@nube.example.org") == "prospect"
    assert took < 5

    assert daemon.stop() == 0
    assert "stopping" in daemon.output
    assert setup["env"]["TEST_IMAP_PASSWORD"] not in daemon.output  # secrets never logged


def test_it_keeps_the_old_config_when_a_reload_brings_a_broken_one(
    setup: dict[str, Any], daemon: Daemon
) -> None:
    smtp: SmtpServer = setup["smtp"]
    wait_for(lambda: len(smtp.messages) == 1, 30, "step 1")
    good = setup["cfg"].read_text()
    assert "poll_interval: 30" in good
    setup["cfg"].write_text("campaigns: [this is not: valid\n")
    daemon.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: daemon.said("keeping the old one"), 10, "the broken config refused")
    assert daemon.proc.poll() is None  # still running

    # A good config is taken (the new worker takes over the old one's SQLite lock).
    setup["cfg"].write_text(good.replace("poll_interval: 30", "poll_interval: 20"))
    seen = len(daemon.lines)
    daemon.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: daemon.said("reloaded", seen), 10, "the good config taken")
    assert not daemon.said("keeping the old one", seen), daemon.output
    step1 = smtp.messages[0].parsed()
    setup["dovecot"].append(
        setup["user"], "INBOX", mails.reply(step1, "Let's talk next week.", datetime.now(UTC))
    )
    wait_for(
        lambda: status_of(setup["app"], "maria@nube.example.org") == "prospect", 10, "promotion"
    )
    assert daemon.stop() == 0


def test_it_reads_a_reply_while_a_large_send_backlog_goes_out(
    sqlite_url: str, tmp_path: Path, smtp_server: SmtpServer, start_worker: Callable[[App], Worker]
) -> None:
    """The daemon's passes are bounded: a backlog of sends never holds up reading mail."""
    from tests.conftest import base_config
    from worker.runner import PASS_LIMIT

    smtp = smtp_server.section()
    config = base_config(sqlite_url, tmp_path, smtp=smtp)
    app = App.open(config, clock_from_env({}))
    rows = [(i + 2, {"email": f"lead{i}@c{i}.example.org"}) for i in range(PASS_LIMIT * 3)]
    with app.transaction() as s:
        import_leads(s, rows, app.now(), campaign=config.campaign("welcome"))
        token = s.scalar(select(Lead.reply_token).where(Lead.email == "lead7@c7.example.org"))
    reply = (
        f"From: lead7@c7.example.org\r\nTo: sales+{token}@example.com\r\nSubject: Re: hi\r\n"
        "Message-ID: <r1@c7.example.org>\r\n\r\nYes, send pricing please.\r\n"
    )
    (tmp_path / "inbox" / "new" / "1.reply").write_text(reply)
    worker = start_worker(app)
    first = worker.run_once(limit=PASS_LIMIT)
    assert first.inbound.processed == 1 and first.sent == PASS_LIMIT and first.more
    assert status_of(app, "lead7@c7.example.org") == "prospect"
    while worker.run_once(limit=PASS_LIMIT).more:
        pass
    got = Counter(r for m in smtp_server.messages for r in m.rcpts)
    # Step 1 to everyone but the prospect (whose follow-up waits for the rep to answer
    # first); the rep got the briefing and the reply-ready copy.
    reps = ("ana@example.com", "ben@example.com", "chloe@example.com")
    assert sum(got.pop(r, 0) for r in reps) == 2
    assert len(got) == PASS_LIMIT * 3 - 1 and set(got.values()) == {1}
