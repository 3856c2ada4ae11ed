"""Mail filing (`move_processed`) happens on every pass, also one stopped by its limit.

The daemon reads at most a limited number of messages per pass so that sending is never
held up by a backlog; the messages such a pass did read are filed all the same, not left
in INBOX for good (issue 12 item 10).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from tests import mails
from tests.imap_server import DovecotServer
from tests.test_inbound_e2e import NOW, imap_app
from worker.app import App
from worker.runner import Worker


def test_it_files_the_mail_a_pass_read_when_it_stops_at_its_limit(
    sqlite_url: str,
    tmp_path: Path,
    dovecot: DovecotServer,
    imap_user: str,
    start_worker: Callable[[App], Worker],
) -> None:
    dovecot.create_folder(imap_user, "Newsletters")
    for _ in range(5):
        dovecot.append(imap_user, "INBOX", mails.newsletter("sales@example.com", NOW))
    app = imap_app(
        sqlite_url, tmp_path, dovecot, imap_user, batch_size=3,
        move_processed={"bulk": "Newsletters"},
    )  # fmt: skip
    worker = start_worker(app)
    filed = []
    for _ in range(3):
        result = worker.run_once(limit=2)  # as the daemon does: a bounded pass
        filed.append(
            (result.inbound.kinds.get("bulk", 0), len(dovecot.uids(imap_user, "INBOX")),
             len(dovecot.uids(imap_user, "Newsletters")))
        )  # fmt: skip
    # (read, left in INBOX, filed) after each pass: every message read is filed at once.
    assert filed == [(2, 3, 2), (2, 1, 4), (1, 0, 5)]
