"""IDLE on every folder of every mailbox a worker holds.

Two Dovecot mailboxes with two folders each, polled only every 10 minutes: a reply in
any of the four folders is processed at once, because a watcher per folder is IDLE on
it, and `twoway status` shows the four folders idling.
"""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime
from email.message import EmailMessage
from email.utils import format_datetime, make_msgid
from pathlib import Path

from sqlalchemy import func, select

from tests.conftest import base_config
from tests.imap_server import DovecotServer
from worker.app import App
from worker.leads import import_leads
from worker.models import InboundMessage, Lead
from worker.runner import Worker
from worker.status import collect_status

NOW = datetime(2026, 12, 1, 10, 0, tzinfo=UTC)
FOLDERS = ["INBOX", "Replies"]


def token_reply(email: str, token: str) -> bytes:
    msg = EmailMessage()
    msg["From"] = email
    msg["To"] = f"sales+{token}@example.com"
    msg["Subject"] = "Re: welcome"
    msg["Date"] = format_datetime(NOW)
    msg["Message-ID"] = make_msgid(domain="idle.example.org")
    msg.set_content("Thanks, this looks useful. Could we talk on Thursday?")
    return msg.as_bytes()


def test_it_wakes_for_a_reply_in_any_folder_of_any_mailbox(
    tmp_path: Path, dovecot: DovecotServer
) -> None:
    users = [dovecot.fresh_user(), dovecot.fresh_user()]
    for user in users:
        dovecot.create_folder(user, "Replies")
    config = base_config(
        f"sqlite:///{tmp_path / 'twoway.db'}", tmp_path,
        mailboxes=[dovecot.mailbox_section(user, name=["sales", "reps"][i], folders=FOLDERS, idle=True,
                                           poll_interval=600, timeout=10)
                   for i, user in enumerate(users)],
        workers={"lease_seconds": 1800},
    )  # fmt: skip
    app = App.open(config, lambda: NOW)
    with app.transaction() as s:
        import_leads(s, [(i + 2, {"email": f"p{i}@idle{i}.example.org"}) for i in range(4)], NOW)
        leads = [
            (lead.email, lead.reply_token) for lead in s.scalars(select(Lead).order_by(Lead.id))
        ]
    worker = Worker(app).start()
    loop = threading.Thread(target=worker.run_forever)
    loop.start()
    try:
        deadline = time.monotonic() + 60
        while True:  # every watcher connected and IDLE
            idle = {m["name"]: m["idle_folders"] for m in collect_status(app)["mailboxes"]}
            if idle == {"sales": FOLDERS, "reps": FOLDERS}:
                break
            assert time.monotonic() < deadline, idle
            time.sleep(0.2)
        targets = [(users[1], "Replies"), (users[0], "INBOX"), (users[0], "Replies"),
                   (users[1], "INBOX")]  # fmt: skip
        for n, ((user, folder), (email, token)) in enumerate(zip(targets, leads, strict=True)):
            dovecot.append(user, folder, token_reply(email, token))
            deadline = time.monotonic() + 60  # far below the 600 s poll interval
            while True:
                with app.transaction() as s:
                    got = s.scalar(select(func.count()).select_from(InboundMessage))
                if got == n + 1:
                    break
                assert time.monotonic() < deadline, f"reply in {user}/{folder} not read"
                time.sleep(0.1)
    finally:
        worker.stop.set()
        loop.join(30)
        worker.close()
    with app.transaction() as s:
        promoted = s.scalar(select(func.count()).where(Lead.status == "prospect"))
    assert promoted == 4
    app.close()
