"""The do-not-contact list from the command line, and the migration that adds it."""

from __future__ import annotations

import json
import subprocess
from datetime import datetime
from pathlib import Path

import yaml
from alembic import command
from sqlalchemy import inspect, text

from tests.conftest import base_config_data, twoway_cmd
from worker import db


def run(cfg: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {"TWOWAY_NOW": "2026-12-01T10:00:00Z", "PATH": "/usr/bin:/bin"}
    return subprocess.run(twoway_cmd(cfg, *args), capture_output=True, text=True, env=env)


def test_it_imports_lists_and_removes_entries_and_skips_them_on_lead_import(
    database_url: str, tmp_path: Path
) -> None:
    cfg = tmp_path / "twoway.yaml"
    cfg.write_text(yaml.safe_dump(base_config_data(database_url, tmp_path)))
    sup = tmp_path / "dnc.csv"
    sup.write_text(
        "email,reason\n@Blocked.ORG,competitor\nceo@fine.org,asked by phone\nnot an address,\n"
    )
    out = run(cfg, "suppress", "import", str(sup), "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["added"] == 2
    assert json.loads(out.stdout)["rejected"][0]["line"] == 4

    listed = json.loads(run(cfg, "suppress", "list", "--json").stdout)
    assert [(r["email"], r["reason"]) for r in listed] == [
        ("@blocked.org", "competitor"),
        ("ceo@fine.org", "asked by phone"),
    ]
    leads = tmp_path / "leads.csv"
    leads.write_text("email\nann@blocked.org\nCEO@fine.org\nbob@fine.org\n")
    imported = run(cfg, "leads", "import", str(leads), "--campaign", "welcome")
    assert imported.returncode == 0, imported.stderr
    assert "1 imported" in imported.stdout and "2 skipped (do-not-contact list)" in imported.stdout

    assert run(cfg, "suppress", "remove", "@blocked.org").stdout.strip() == "1 entry removed"
    bad = run(cfg, "suppress", "remove", "@@nope")
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    again = json.loads(run(cfg, "leads", "import", str(leads), "--json").stdout)
    assert (again["imported"], again["suppressed"]) == (1, 1)


def test_it_upgrades_a_database_made_by_the_previous_revision(database_url: str) -> None:
    engine = db.make_engine(database_url)
    command.upgrade(db._alembic_config(engine), "0001")
    now = datetime(2026, 12, 1, 10, 0)
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO leads (id, email, custom, status, reply_token, domain, created_at,"
                " updated_at) VALUES (1, 'a@x.org', '{}', 'lead', 'tok', 'x.org', :n, :n)"
            ),
            {"n": now},
        )
        conn.execute(
            text(
                "INSERT INTO enrollments (lead_id, campaign, step, state, created_at, updated_at)"
                " VALUES (1, 'welcome', 1, 'active', :n, :n)"
            ),
            {"n": now},
        )
    db.upgrade(engine)
    assert db.current_revision(engine) == db.head_revision()
    names = set(inspect(engine).get_table_names())
    assert {"suppressions", "campaign_states", "crm_events", "webhook_deliveries"} <= names
    with engine.connect() as conn:
        row = conn.execute(text("SELECT step, waiting FROM enrollments")).one()
    assert tuple(row) == (1, None)
    engine.dispose()


def test_it_refuses_a_20_mb_field_with_the_file_and_line(sqlite_url: str, tmp_path: Path) -> None:
    cfg = tmp_path / "twoway.yaml"
    cfg.write_text(yaml.safe_dump(base_config_data(sqlite_url, tmp_path)))
    big = tmp_path / "big.csv"
    big.write_text("email,reason\n@ok.example,fine\nx@y.org," + "z" * 20_000_000 + "\n")
    out = run(cfg, "suppress", "import", str(big))
    assert out.returncode == 2
    assert f"{big}:3: not a readable CSV row" in out.stderr and "Traceback" not in out.stderr
    assert json.loads(run(cfg, "suppress", "list", "--json").stdout) == []  # all or nothing
