"""The admin tools and the demo, run as a user runs them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner

from tests.conftest import ROOT
from tests.imap_server import DovecotServer
from tests.smtp_server import SmtpServer
from worker.cli import main

EMAILS = ROOT / "tests" / "emails"


def test_it_runs_the_demo_and_shows_a_prospect_and_a_handoff(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "worker", "demo", "--dir", str(tmp_path / "ws")],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "Funnel (leads -> engaged -> prospects -> handed off):" in text
    assert "welcome: 10 -> 3 -> 2 -> 2" in text
    assert "María García <maria.garcia@nube.example>" in text
    assert "The handoff email the rep received:" in text
    assert "Attached: message/rfc822" in text
    assert "tom.becker@kraftwerk.example: lead, nurture paused" in text
    assert "old.contact@gone.example: bounced" in text
    assert str(tmp_path / "ws") in text
    assert "Traceback" not in out.stderr
    shown = subprocess.run(
        [sys.executable, "-m", "worker", "--config", str(tmp_path / "ws" / "twoway.yaml"), "leads", "show",
         "maria.garcia@nube.example", "--json"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    data = json.loads(shown.stdout)
    assert data["status"] == "prospect" and data["owner"] == "ana@acme.example"
    assert [e["type"] for e in data["events"]][:2] == ["created", "engaged"]


def test_it_inspects_a_message_offline_without_config(tmp_path: Path) -> None:
    sample = next(p for p in sorted(EMAILS.glob("*.eml")) if "bounce" in p.name or "dsn" in p.name)
    result = CliRunner().invoke(
        main, ["--config", str(tmp_path / "none.yaml"), "inspect", str(sample), "--json"]
    )
    # An explicit --config that does not exist is an error; without one, inspect needs nothing.
    assert result.exit_code == 2
    result = CliRunner().invoke(main, ["inspect", str(sample), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["kind"] in ("bounce", "notification")
    assert set(data) >= {
        "kind",
        "bounce",
        "return_date",
        "reply_text",
        "intent",
        "message_id",
        "in_reply_to",
        "from",
    }


def test_it_inspects_a_directory_one_json_line_per_file(tmp_path: Path) -> None:
    (tmp_path / "a.eml").write_bytes(
        (EMAILS / sorted(p.name for p in EMAILS.glob("*.eml"))[0]).read_bytes()
    )
    (tmp_path / "b.eml").write_bytes(b"")
    result = CliRunner().invoke(main, ["inspect", str(tmp_path), "--json"])
    assert result.exit_code == 0
    lines = [json.loads(line) for line in result.output.splitlines()]
    assert [Path(str(r["file"])).name for r in lines] == ["a.eml", "b.eml"]
    assert lines[0]["kind"] is not None and lines[1]["kind"] is None and lines[1]["error"]


def test_it_names_file_and_line_of_a_broken_template(tmp_path: Path) -> None:
    import shutil

    shutil.copytree(ROOT / "templates", tmp_path / "templates")
    body = tmp_path / "templates" / "nurture" / "welcome" / "body.txt"
    lines = body.read_text().splitlines()
    lines.insert(2, "Hi {{ lead.frist_name }},")
    body.write_text("\n".join(lines) + "\n")
    cfg = tmp_path / "c.yaml"
    cfg.write_text("sender: {from: 'Acme <sales@example.com>'}\n")
    result = CliRunner().invoke(main, ["--config", str(cfg), "templates", "lint"])
    assert result.exit_code == 2
    assert "nurture/welcome/body.txt:3" in result.output and "frist_name" in result.output
    ok = CliRunner().invoke(
        main, ["--config", str(cfg), "templates", "preview", "nurture/case-study"]
    )
    assert ok.exit_code == 0 and ok.output.startswith("Subject: ")


def test_it_names_the_failing_step_of_config_check_connect(
    tmp_path: Path, dovecot: DovecotServer, imap_user: str, smtp_auth_server: SmtpServer
) -> None:
    def check(imap_password: str, imap_port: int) -> str:
        cfg = tmp_path / "c.yaml"
        cfg.write_text(
            f"""
sender: {{from: 'Acme <sales@example.com>'}}
mailboxes:
  - {{name: sales, host: 127.0.0.1, port: {imap_port}, security: none, username: {imap_user}, password: '{imap_password}'}}
smtp: {{host: 127.0.0.1, port: {smtp_auth_server.port}, security: none, username: nobody, password: wrong}}
"""
        )
        result = CliRunner().invoke(main, ["--config", str(cfg), "config", "check", "--connect"])
        assert result.exit_code == 1
        return result.output

    out = check("wrong-password", dovecot.port)
    assert "mailbox sales: auth failed" in out
    assert "smtp: auth failed" in out
    assert "wrong-password" not in out
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed = sock.getsockname()[1]
    out = check(dovecot.users[imap_user], closed)
    assert "mailbox sales: connect failed" in out


def test_it_leaves_the_calling_programs_umask_as_it_was(tmp_path: Path) -> None:
    """twoway keeps its own files private; a program calling main() keeps its own mask."""
    import os

    previous = os.umask(0o022)
    try:
        result = CliRunner().invoke(main, ["inspect", str(tmp_path / "missing.eml"), "--json"])
        assert result.exit_code == 2
        made = tmp_path / "made-after"
        made.write_text("x")
        assert made.stat().st_mode & 0o777 == 0o644
    finally:
        os.umask(previous)
