"""Security as a user would check it: no secret in any output, no header injection from
lead data, TLS verification on unless switched off."""

from __future__ import annotations

import os
import subprocess
import sys
from email.utils import getaddresses
from pathlib import Path

import yaml

from tests.conftest import ROOT
from tests.imap_server import DovecotServer
from tests.smtp_server import SmtpServer
from worker.config import MailboxConfig, SmtpConfig

IMAP_SECRET = "imap-S3cret-never-shown"
SMTP_SECRET = "smtp-S3cret-never-shown"


def twoway(cfg: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "IMAP_PW": IMAP_SECRET,
        "SMTP_PW": SMTP_SECRET,
        "TWOWAY_NOW": "2026-12-01T10:00:00Z",
    }
    return subprocess.run(
        [sys.executable, "-m", "worker", "-v", "--config", str(cfg), *args],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def test_it_never_prints_or_logs_a_secret(
    tmp_path: Path, dovecot: DovecotServer, imap_user: str, smtp_auth_server: SmtpServer
) -> None:
    cfg = tmp_path / "twoway.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "database": f"sqlite:///{tmp_path / 'db.sqlite'}",
                "templates_dir": str(ROOT / "templates"),
                "mailboxes": [
                    {
                        "name": "sales",
                        "host": "127.0.0.1",
                        "port": dovecot.port,
                        "security": "none",
                        "username": imap_user,
                        "password": "${IMAP_PW}",
                    }
                ],
                "smtp": {
                    "host": "127.0.0.1",
                    "port": smtp_auth_server.port,
                    "security": "none",
                    "username": "someone",
                    "password": "${SMTP_PW}",
                },
                "sender": {"from": "Acme <sales@example.com>"},
                "campaigns": [
                    {"name": "w", "send_window": None, "steps": [{"template": "nurture/welcome"}]}
                ],
            }
        )
    )
    csv = tmp_path / "leads.csv"
    csv.write_text("email\nlead@example.org\n")
    outputs = [
        twoway(cfg, "leads", "import", str(csv), "--campaign", "w"),
        twoway(cfg, "run", "--once", "--log-format", "json"),  # both logins fail
        twoway(cfg, "status", "--json"),
        twoway(cfg, "status"),
        twoway(cfg, "config", "check", "--connect"),
        twoway(cfg, "leads", "show", "lead@example.org", "--json"),
    ]
    run = outputs[1]
    assert run.returncode == 1 and "auth" in run.stderr + run.stdout  # it did try, and failed
    for out in outputs:
        for secret in (IMAP_SECRET, SMTP_SECRET):
            assert secret not in out.stdout and secret not in out.stderr


def test_it_keeps_hostile_lead_data_out_of_the_headers(
    tmp_path: Path, smtp_server: SmtpServer
) -> None:
    cfg = tmp_path / "twoway.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "database": f"sqlite:///{tmp_path / 'db.sqlite'}",
                "templates_dir": str(ROOT / "templates"),
                "smtp": {"host": "127.0.0.1", "port": smtp_server.port, "security": "none"},
                "sender": {"from": "Acme <sales@example.com>"},
                "campaigns": [
                    {"name": "w", "send_window": None, "steps": [{"template": "nurture/welcome"}]}
                ],
            }
        )
    )
    csv = tmp_path / "leads.csv"
    csv.write_bytes(
        b"email,first_name,last_name,company\r\n"
        b'lead@example.org,"Bob\r\nBcc: victim@example.net","X\rTo: other@example.net",'
        b'"<script>alert(1)</script>"\r\n'
    )
    assert twoway(cfg, "leads", "import", str(csv), "--campaign", "w").returncode == 0
    assert twoway(cfg, "run", "--once").returncode == 0
    assert [m.rcpts for m in smtp_server.messages] == [("lead@example.org",)]
    msg = smtp_server.messages[0].parsed()
    assert msg["Bcc"] is None
    assert msg.get_all("To") is not None and len(msg.get_all("To") or []) == 1
    # The hostile text stays inside the quoted display name: one recipient, ours.
    assert [a for _, a in getaddresses([str(msg["To"])])] == ["lead@example.org"]
    html = msg.get_body(("html",))
    assert html is not None and "<script>" not in html.get_content()


def test_it_verifies_tls_certificates_unless_told_not_to() -> None:
    box = MailboxConfig(name="m", host="imap.example.com")
    smtp = SmtpConfig(host="smtp.example.com")
    assert box.verify_tls and box.security == "ssl"
    assert smtp.verify_tls and smtp.security == "starttls"
