"""Several `twoway run` processes on one PostgreSQL and three Dovecot mailboxes.

3,000 enrolled leads, 600 replies spread over the mailboxes, one worker SIGKILLed midway:
every step delivered exactly once (counted at the SMTP server), every reply processed
once, each promotion handed off once, and the dead worker's mailbox taken over.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml
from sqlalchemy import func, select

from tests import mails
from tests.conftest import PG_URL, ROOT, pg_schema, twoway_cmd, wait_for
from tests.imap_server import DovecotServer
from tests.smtp_server import SmtpServer
from worker.app import App
from worker.config import load_config
from worker.leads import import_leads
from worker.models import InboundMessage, Lead, MailboxLease, OutboundMessage

LEADS = 3000
REPLIES = 600
LEASE = 5


@pytest.fixture
def pg_url() -> Iterator[str]:
    if not PG_URL:
        pytest.skip("PostgreSQL not configured (set TWOWAY_TEST_PG_URL; .ci/run does)")
    with pg_schema(PG_URL) as url:
        yield url


def test_it_shares_the_work_between_workers_and_survives_one_dying(
    pg_url: str, tmp_path: Path, dovecot: DovecotServer, smtp_server: SmtpServer
) -> None:
    users = [dovecot.fresh_user() for _ in range(3)]
    data: dict[str, Any] = {
        "database": "sqlite:///unused.db",  # TWOWAY_DATABASE_URL gives the PostgreSQL one
        "templates_dir": str(ROOT / "templates"),
        "mailboxes": [
            dovecot.mailbox_section(u, f"box{i}", idle=True, poll_interval=1, address=u)
            for i, u in enumerate(users)
        ],
        "smtp": smtp_server.section(),
        "sender": {"from": "Acme Sales <sales@example.com>"},
        "internal_domains": ["example.com"],
        "campaigns": [{"name": "welcome", "send_window": None, "steps": [{"template": "nurture/welcome"}]}],
        "reps": [{"name": f"Rep {i}", "email": f"rep{i}@example.com"} for i in range(3)],
        "handoff": {"follow_up": {"template": "followup/thanks", "delay": "0h", "from": "rep"}},
        "workers": {"lease_seconds": LEASE},
    }  # fmt: skip
    cfg = tmp_path / "twoway.yaml"
    cfg.write_text(yaml.safe_dump(data))
    env = {**os.environ, "TWOWAY_DATABASE_URL": pg_url}
    env.pop("TWOWAY_NOW", None)
    config = load_config(cfg, env=env)
    app = App.open(config, lambda: datetime.now(UTC))
    rows = [(i + 2, {"email": f"lead{i}@company{i}.example.org"}) for i in range(LEADS)]
    with app.transaction() as s:
        import_leads(s, rows, app.now(), campaign=config.campaign("welcome"))

    cmd = twoway_cmd(cfg, "run", "--log-format", "json")
    logs = [(tmp_path / f"worker{i}.log").open("w") for i in range(3)]
    workers = [subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT) for log in logs]
    try:
        wait_for(lambda: len(smtp_server.messages) >= LEADS, 240, "step 1 to every lead")
        step1 = {m.rcpts[0]: m.parsed() for m in smtp_server.messages}
        assert len(step1) == LEADS

        def count(q: Any) -> int:
            with app.transaction() as s:
                return int(s.scalar(q) or 0)

        def holders() -> dict[str, str]:
            with app.transaction() as s:
                return {le.mailbox: le.holder for le in s.scalars(select(MailboxLease))}

        # The mailboxes end up spread: one per worker.
        wait_for(lambda: len(set(holders().values())) == 3, LEASE * 6, "one mailbox per worker")
        clients = [dovecot.client(u) for u in users]
        killed_box = None
        killed_at = 0.0
        for i in range(REPLIES):
            original = step1[f"lead{i}@company{i}.example.org"]
            raw = mails.reply(
                original, f"Yes, tell me more about pricing ({i}).", datetime.now(UTC)
            )
            clients[i % 3].append("INBOX", raw)
            if i == REPLIES // 2:
                holder = holders()
                victim_pid = workers[0].pid
                killed_box = next((b for b, h in holder.items() if f":{victim_pid}:" in h), None)
                workers[0].send_signal(signal.SIGKILL)
                workers[0].wait(10)
                killed_at = time.monotonic()
        for c in clients:
            c.logout()

        assert killed_box is not None
        if killed_box is not None:
            victim = f":{workers[0].pid}:"

            def taken_over() -> bool:
                with app.transaction() as s:
                    lease = s.get(MailboxLease, killed_box)
                    return lease is not None and victim not in lease.holder

            wait_for(taken_over, LEASE * 6, f"another worker to take over {killed_box}")
            took = time.monotonic() - killed_at
            print(f"mailbox {killed_box} taken over {took:.1f} s after the kill (lease {LEASE} s)")
            assert took < LEASE * 6

        wait_for(
            lambda: count(select(func.count()).select_from(InboundMessage)) >= REPLIES,
            240,
            "every reply read",
        )
        wait_for(
            lambda: (
                count(
                    select(func.count()).where(
                        OutboundMessage.kind.in_(("handoff", "followup")),
                        OutboundMessage.status.in_(("queued", "sending")),
                    )
                )
                == 0
                and count(select(func.count()).where(OutboundMessage.kind == "handoff")) >= REPLIES
            ),
            240,
            "every handoff and follow-up settled",
        )
    finally:
        for w in workers[1:]:
            if w.poll() is None:
                w.send_signal(signal.SIGTERM)
        for w in workers[1:]:
            try:
                assert w.wait(15) == 0
            except subprocess.TimeoutExpired:
                w.kill()
                raise
        for log in logs:
            log.close()

    # Exactly once, counted at the SMTP server.
    ids = Counter(str(m.parsed()["Message-ID"]) for m in smtp_server.messages)
    assert max(ids.values()) == 1
    per_rcpt = Counter(r for m in smtp_server.messages for r in m.rcpts)
    with app.transaction() as s:
        assert s.scalar(select(func.count()).select_from(InboundMessage)) == REPLIES
        assert s.scalar(select(func.count(func.distinct(InboundMessage.message_id)))) == REPLIES
        assert s.scalar(select(func.count()).where(Lead.status == "prospect")) == REPLIES
        statuses = Counter(
            tuple(r) for r in s.execute(select(OutboundMessage.kind, OutboundMessage.status))
        )
    assert statuses[("nurture", "sent")] + statuses[("nurture", "unknown")] == LEADS
    for kind in ("handoff", "followup"):
        assert statuses[(kind, "sent")] + statuses[(kind, "unknown")] == REPLIES, statuses
    # The SIGKILL strands at most the one send in flight, whose transaction had begun.
    assert sum(n for (_, st), n in statuses.items() if st == "unknown") <= 1, statuses
    with app.transaction() as s:
        unknown = list(
            s.scalars(select(OutboundMessage.to_addr).where(OutboundMessage.status == "unknown"))
        )
    assert smtp_server.began_for(unknown)
    handoffs = sum(per_rcpt[f"rep{i}@example.com"] for i in range(3))
    # Per prospect message, a briefing and a reply-ready copy; the send the SIGKILL left
    # `unknown` may be one of them, delivered before its outcome was written.
    sent = statuses[("handoff", "sent")] + statuses[("rep_copy", "sent")]
    to_reps = sum(1 for a in unknown if a.startswith("rep"))
    assert sent <= handoffs <= sent + to_reps, (handoffs, sent, unknown)
    for i in range(REPLIES):  # step 1 and the follow-up, never more
        assert per_rcpt[f"lead{i}@company{i}.example.org"] <= 2
    app.close()
