"""The rep's briefing says the original is attached only when it is (issue 12).

An original over `outbox.MAX_ATTACHED_ORIGINAL` (10 MB) is not attached, since mail
servers refuse messages that big; the briefing must then say so, and why, instead of
sending the rep looking for an attachment that is not there.
"""

from __future__ import annotations

import mailbox
import os
import subprocess
from email.message import EmailMessage
from email.utils import format_datetime, make_msgid
from pathlib import Path

import yaml
from sqlalchemy import select

from tests.conftest import base_config_data, twoway_cmd
from tests.hostile import NOW_HINT as NOW
from tests.smtp_server import SmtpServer
from worker.app import App
from worker.config import load_config
from worker.leads import import_leads
from worker.models import Lead, OutboundMessage
from worker.outbox import MAX_ATTACHED_ORIGINAL


def _reply(sender: str, attachment: bytes) -> bytes:
    msg = EmailMessage()
    msg["From"] = sender
    msg["To"] = "sales@example.com"
    msg["Subject"] = "Re: Welcome"
    msg["Date"] = format_datetime(NOW)
    msg["Message-ID"] = make_msgid(domain=sender.rsplit("@", 1)[1])
    msg.set_content("Thanks, we are interested: please send pricing for 40 seats.\n")
    if attachment:
        msg.add_attachment(
            attachment, maintype="application", subtype="pdf", filename="floor-plan.pdf"
        )
    return msg.as_bytes()


def _text(msg: EmailMessage) -> str:
    body = msg.get_body(preferencelist=("plain",))
    assert body is not None
    return " ".join(body.get_content().split())  # words, whatever the wrapping


def _html(msg: EmailMessage) -> str:
    body = msg.get_body(preferencelist=("html",))
    assert body is not None
    return " ".join(body.get_content().split())


def test_it_says_the_original_is_attached_only_when_it_is(
    sqlite_url: str, tmp_path: Path, smtp_server: SmtpServer
) -> None:
    data = base_config_data(sqlite_url, tmp_path, campaigns=[], smtp=smtp_server.section())
    cfg = tmp_path / "twoway.yaml"
    cfg.write_text(yaml.safe_dump(data))
    app = App.open(load_config(cfg, env={}), lambda: NOW)
    small, big = "small@northwind.example", "big@contoso.example"
    with app.transaction() as s:
        import_leads(s, [(2, {"email": small}), (3, {"email": big})], NOW)
    inbox = mailbox.Maildir(tmp_path / "inbox")
    inbox.add(_reply(small, b""))
    huge = _reply(big, os.urandom(MAX_ATTACHED_ORIGINAL * 3 // 4 + 512 * 1024))  # base64: 4/3
    assert len(huge) > MAX_ATTACHED_ORIGINAL
    inbox.add(huge)

    env = {**os.environ, "TWOWAY_NOW": NOW.isoformat()}
    done = subprocess.run(
        twoway_cmd(cfg, "run", "--once"), env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]

    with app.transaction() as s:
        ids = dict(
            s.execute(
                select(OutboundMessage.lead_id, OutboundMessage.message_id).where(
                    OutboundMessage.kind == "handoff"
                )
            ).all()
        )
        emails = dict(s.execute(select(Lead.id, Lead.email)).all())
    briefing = {emails[lead]: f"<{mid}>" for lead, mid in ids.items()}
    at_server = {str(m.parsed()["Message-ID"]): m.parsed() for m in smtp_server.messages}
    assert set(briefing.values()) <= set(at_server), "both briefings reached the rep"

    kept = at_server[briefing[small]]
    assert [p.get_filename() for p in kept.iter_attachments()] == ["original-reply.eml"]
    assert "The original message is attached" in _text(kept)
    assert "NOT attached" not in _text(kept)

    left_out = at_server[briefing[big]]
    assert list(left_out.iter_attachments()) == []
    text, html = _text(left_out), _html(left_out)
    size_mb = round(len(huge) / (1024 * 1024), 1)
    assert "The original message is attached" not in text
    assert (
        f"The original message is NOT attached: at {size_mb} MB it is over the 10.0 MB that "
        "mail servers accept. Find it in the sales mailbox: from big@contoso.example" in text
    ), text
    assert "The original message is not attached:" in html
    assert f"at {size_mb} MB it is over the 10.0 MB" in html
    app.close()
