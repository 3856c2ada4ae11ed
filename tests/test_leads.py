"""Leads import, list, show and mark, through the command line, on SQLite and PostgreSQL."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import yaml
from click.testing import CliRunner, Result

from tests.conftest import ROOT
from worker.cli import main

NOW = {"TWOWAY_NOW": "2026-12-01T10:00:00Z"}


def write_config(tmp_path: Path, database_url: str) -> Path:
    cfg = {
        "database": database_url,
        "templates_dir": str(ROOT / "templates"),
        "sender": {"from": "Acme Sales <sales@example.com>"},
        "campaigns": [{"name": "welcome", "steps": [{"template": "nurture/welcome"}]}],
    }
    path = tmp_path / "twoway.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def twoway(cfg: Path, *args: str) -> Result:
    return CliRunner().invoke(main, ["--config", str(cfg), *args], env=NOW)


def make_csv(path: Path) -> None:
    """1,005 data rows: 1,000 valid (3 repeat an earlier address in other case), 5 invalid.

    996 distinct + 3 repeats + 1 more distinct = 1,000 valid rows, 997 leads."""
    lines = ["email,first_name,company,company_size,country,favourite_colour"]
    for i in range(996):
        lines.append(f"lead{i}@example.org,Lead{i},Company {i % 50},{10 + i},DE,blue")
    lines.append("LEAD1@Example.org,Again,Company 1,11,DE,red")  # line 998
    lines.append("Lead2@EXAMPLE.ORG,Again,Company 2,12,DE,red")
    lines.append("lead3@example.ORG,Again,Company 3,13,DE,red")
    lines.append("not-an-address,X,Y,1,DE,")  # line 1001
    lines.append(",Empty,Y,1,DE,")  # line 1002
    lines.append("a@@example.org,X,Y,1,DE,")  # line 1003
    lines.append("bad@example.org,X,Y,twelve,DE,")  # line 1004: bad number
    lines.append("bad2@example.org,X,Y,12,Germany,")  # line 1005: bad country
    lines.append("last@example.org,Last,Z,5,FR,green")  # line 1006: valid again
    path.write_text("\n".join(lines) + "\n")


def test_it_imports_updates_and_rejects_with_line_numbers(
    tmp_path: Path, database_url: str
) -> None:
    cfg = write_config(tmp_path, database_url)
    csv_file = tmp_path / "leads.csv"
    make_csv(csv_file)
    result = twoway(cfg, "leads", "import", str(csv_file), "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["imported"] == 997
    assert data["updated"] == 3
    assert [r["line"] for r in data["rejected"]] == [1001, 1002, 1003, 1004, 1005]
    reasons = {r["line"]: r["reason"] for r in data["rejected"]}
    assert "empty" in reasons[1002]
    assert "not a number" in reasons[1004]
    assert "ISO 3166" in reasons[1005]

    listed = json.loads(twoway(cfg, "leads", "list", "--json").stdout)
    assert len(listed) == 997
    shown = json.loads(twoway(cfg, "leads", "show", "lead1@example.org", "--json").stdout)
    assert shown["first_name"] == "Again"  # the later row updated the earlier one
    assert shown["custom"] == {"favourite_colour": "red"}
    assert shown["events"][0]["type"] == "created"


def test_it_imports_nothing_with_strict_when_a_row_is_bad(
    tmp_path: Path, database_url: str
) -> None:
    cfg = write_config(tmp_path, database_url)
    csv_file = tmp_path / "leads.csv"
    make_csv(csv_file)
    result = twoway(cfg, "leads", "import", str(csv_file), "--strict")
    assert result.exit_code == 2
    assert "leads.csv:1004: rejected bad@example.org" in result.output
    assert json.loads(twoway(cfg, "leads", "list", "--json").stdout) == []


def test_it_updates_rather_than_duplicates_on_a_second_import(
    tmp_path: Path, database_url: str
) -> None:
    cfg = write_config(tmp_path, database_url)
    csv_file = tmp_path / "leads.csv"
    csv_file.write_text("email,title\nana@example.org,CTO\n")
    assert twoway(cfg, "leads", "import", str(csv_file), "--campaign", "welcome").exit_code == 0
    csv_file.write_text("email,title\nANA@example.org,CEO\n")
    result = twoway(cfg, "leads", "import", str(csv_file), "--campaign", "welcome")
    assert "0 imported, 1 updated, 0 rejected, 0 enrolled in welcome" in result.output
    shown = json.loads(twoway(cfg, "leads", "show", "ana@example.org", "--json").stdout)
    assert shown["title"] == "CEO"
    assert len(shown["enrollments"]) == 1
    assert shown["enrollments"][0]["next_due"] == "2026-12-01T10:00:00Z"


def test_it_marks_a_lead_and_stops_its_nurture(tmp_path: Path, database_url: str) -> None:
    cfg = write_config(tmp_path, database_url)
    csv_file = tmp_path / "leads.csv"
    csv_file.write_text("email\nbo@example.org\n")
    twoway(cfg, "leads", "import", str(csv_file), "--campaign", "welcome")
    result = twoway(cfg, "leads", "mark", "bo@example.org", "customer", "--reason", "signed")
    assert result.exit_code == 0, result.output
    shown = json.loads(twoway(cfg, "leads", "show", "bo@example.org", "--json").stdout)
    assert shown["status"] == "customer"
    assert shown["enrollments"][0]["state"] == "stopped"
    last = shown["events"][-1]
    assert (last["from_status"], last["to_status"], last["cause"]) == (
        "lead",
        "customer",
        "user: signed",
    )
    assert twoway(cfg, "leads", "mark", "bo@example.org", "king").exit_code == 2
    assert twoway(cfg, "leads", "show", "nobody@example.org").exit_code == 2


def test_it_rejects_an_unknown_campaign_and_a_file_without_email_column(
    tmp_path: Path, database_url: str
) -> None:
    cfg = write_config(tmp_path, database_url)
    csv_file = tmp_path / "leads.csv"
    csv_file.write_text("mail\nx@example.org\n")
    result = twoway(cfg, "leads", "import", str(csv_file))
    assert result.exit_code == 2 and "needs an 'email' column" in result.output
    csv_file.write_text("email\nx@example.org\n")
    result = twoway(cfg, "leads", "import", str(csv_file), "--campaign", "nope")
    assert result.exit_code == 2 and "no campaign named 'nope'" in result.output


def test_it_counts_leads_per_status(tmp_path: Path, database_url: str) -> None:
    cfg = write_config(tmp_path, database_url)
    csv_file = tmp_path / "leads.csv"
    csv_file.write_text("email\na@example.org\nb@example.org\n")
    twoway(cfg, "leads", "import", str(csv_file))
    twoway(cfg, "leads", "mark", "b@example.org", "disqualified")
    data = json.loads(twoway(cfg, "status", "--json").stdout)
    assert data["leads"]["lead"] == 1 and data["leads"]["disqualified"] == 1
    assert data["quarantine"] == 0


def test_it_unsubscribes_a_lead_by_the_token_of_its_link(tmp_path: Path, database_url: str) -> None:
    cfg = write_config(tmp_path, database_url)
    csv_file = tmp_path / "leads.csv"
    csv_file.write_text("email\nlinked@example.org\n")
    twoway(cfg, "leads", "import", str(csv_file))
    from worker.app import App
    from worker.config import load_config
    from worker.leads import get_lead

    app = App.open(load_config(cfg, env={}), lambda: datetime.now(UTC))
    with app.transaction() as s:
        token = get_lead(s, "linked@example.org").reply_token
    app.close()
    result = twoway(cfg, "leads", "mark", token, "unsubscribed", "--reason", "one-click link")
    assert result.exit_code == 0, result.output
    assert "linked@example.org is now unsubscribed" in result.output
    assert twoway(cfg, "leads", "mark", "aaaaaaaaaaaaaaaa", "unsubscribed").exit_code == 2
