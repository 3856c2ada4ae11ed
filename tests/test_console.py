"""What the console shows, on SQLite and PostgreSQL, after a real pass of the worker."""

from __future__ import annotations

import mailbox
from datetime import timedelta
from email import message_from_bytes, policy
from email.message import EmailMessage

from tests import mails
from worker.app import App
from worker.console import (
    funnel_steps,
    quarantine_item,
    quarantine_rows,
    search_leads,
    waiting_prospects,
)
from worker.health import check_health
from worker.leads import import_leads, read_csv
from worker.metrics import render_metrics
from worker.models import Quarantine
from worker.runner import Worker


def outbox(app: App) -> dict[str, EmailMessage]:
    assert app.config.smtp is not None and app.config.smtp.path is not None
    box = mailbox.Maildir(app.config.smtp.path, create=False)
    out: dict[str, EmailMessage] = {}
    for key in box.iterkeys():
        msg = message_from_bytes(box.get_bytes(key), policy=policy.default)
        assert isinstance(msg, EmailMessage)
        out.setdefault(str(msg["To"]).split("<")[-1].rstrip(">"), msg)
    return out


def test_it_counts_each_step_and_lists_who_waits_for_a_rep(app: App) -> None:
    csv = app.config.path.parent / "leads.csv"
    csv.write_text(
        "email,first_name,company,industry\n"
        "ana@nube.example,Ana,Nube,software\n"
        "bo@kraft.example,Bo,Kraft,logistics\n"
        "cy@gone.example,Cy,Gone,retail\n",
        encoding="utf-8",
    )
    with app.transaction() as s:
        import_leads(s, read_csv(csv), app.now(), campaign=app.config.campaign("welcome"))
    with Worker(app) as worker:
        worker.run_once()
        sent = outbox(app)
        later = app.now() + timedelta(minutes=5)
        inbox_path = app.config.mailboxes[0].path
        assert inbox_path is not None
        inbox = mailbox.Maildir(inbox_path, create=False)
        inbox.add(mails.reply(sent["ana@nube.example"], "Could we see pricing?", later))
        inbox.add(
            mails.dsn(
                sent["cy@gone.example"], "cy@gone.example", "5.1.1", "550 5.1.1 User unknown", later
            )
        )
        worker.run_once()

    with app.transaction() as s:
        steps = funnel_steps(s, app.config, "welcome")
        assert [st["step"] for st in steps] == [1, 2, 3]
        first = steps[0]
        assert (first["template"], first["sent"], first["replied"], first["bounced"]) == (
            "nurture/welcome", 3, 1, 1,
        )  # fmt: skip
        assert steps[1]["sent"] == 0
        waiting = waiting_prospects(s, app.now())
        assert [w["email"] for w in waiting] == ["ana@nube.example"]
        rows, more = search_leads(s, "KRAFT", None)
        assert [r["email"] for r in rows] == ["bo@kraft.example"] and not more
        assert search_leads(s, "%", None)[0] == []  # LIKE wildcards are plain text
        assert [r["email"] for r in search_leads(s, "", "bounced")[0]] == ["cy@gone.example"]
        assert quarantine_rows(s) == []
        s.add(Quarantine(mailbox="sales", folder="INBOX", uidvalidity=1, uid=7,
                         raw=b"x" * 300_000, reason="broken", created_at=app.now()))  # fmt: skip
    with app.transaction() as s:
        [q] = quarantine_rows(s)
        found = quarantine_item(s, q["id"])
        assert found is not None and found[2] is True and len(found[1]) == 256 * 1024
        assert quarantine_item(s, q["id"] + 1) is None

    text = render_metrics(app).decode()
    assert 'twoway_leads{status="prospect"} 1.0' in text
    assert 'twoway_bounces_total{type="hard"} 1.0' in text
    assert "twoway_reply_to_handoff_seconds_count 1.0" in text
    health = check_health(app)
    assert not health.ok and "no worker" in health.reasons[0]  # the worker above has stopped
