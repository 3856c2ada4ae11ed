"""Papercuts a new user hit, each reproduced the way they met it (issue 17)."""

from __future__ import annotations

import json
from datetime import date, timedelta
from pathlib import Path

import yaml
from click.testing import CliRunner, Result

from tests.conftest import ROOT, base_config_data, twoway_cmd
from worker.cli import main

NOW = {"TWOWAY_NOW": "2026-12-01T10:00:00Z"}
EMAILS = ROOT / "tests" / "emails"


def write_config(tmp_path: Path, database_url: str) -> Path:
    cfg = tmp_path / "twoway.yaml"
    cfg.write_text(yaml.safe_dump(base_config_data(database_url, tmp_path)))
    return cfg


def run(*args: str) -> Result:
    return CliRunner().invoke(main, list(args), env=NOW)


def test_it_takes_config_before_or_after_the_subcommand(tmp_path: Path, sqlite_url: str) -> None:
    cfg = str(write_config(tmp_path, sqlite_url))
    before = run("--config", cfg, "config", "check")
    after = run("config", "check", "--config", cfg)
    equals = run("leads", "list", f"--config={cfg}", "--json")
    assert before.exit_code == after.exit_code == equals.exit_code == 0, after.output
    assert after.output == before.output and "OK" in after.output
    assert json.loads(equals.output) == []


def test_it_imports_semicolon_tab_and_utf16_csv_files(tmp_path: Path, sqlite_url: str) -> None:
    cfg = str(write_config(tmp_path, sqlite_url))
    files = {
        "semicolon.csv": b"email;first_name\nana@example.org;Ana\n",
        "tabs.tsv": b"email\tfirst_name\nbo@example.org\tBo\n",
        "utf16.csv": "email,first_name\ncel@example.org,Céline\n".encode("utf-16"),
        "utf16-no-bom.csv": "email,first_name\nda@example.org,Da\n".encode("utf-16-le"),
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
        result = run("--config", cfg, "leads", "import", str(tmp_path / name), "--json")
        assert result.exit_code == 0, (name, result.output)
        assert json.loads(result.output)["imported"] == 1, (name, result.output)
    listed = json.loads(run("--config", cfg, "leads", "list", "--json").output)
    assert {row["first_name"] for row in listed} == {"Ana", "Bo", "Céline", "Da"}

    (tmp_path / "no-email.csv").write_text("mail,name\nx@example.org,X\n")
    result = run("--config", cfg, "leads", "import", str(tmp_path / "no-email.csv"))
    assert result.exit_code == 2
    assert "columns found: 'mail', 'name'" in result.output


def test_it_fails_an_import_where_every_row_is_rejected(tmp_path: Path, sqlite_url: str) -> None:
    cfg = str(write_config(tmp_path, sqlite_url))
    (tmp_path / "bad.csv").write_text("email\nnot-an-address\nalso bad\n")
    result = run("--config", cfg, "leads", "import", str(tmp_path / "bad.csv"))
    assert result.exit_code == 2
    assert "0 imported, 0 updated, 2 rejected" in result.output
    (tmp_path / "mixed.csv").write_text("email\nnot-an-address\nok@example.org\n")
    assert run("--config", cfg, "leads", "import", str(tmp_path / "mixed.csv")).exit_code == 0


def test_it_lists_no_lead_with_limit_zero(tmp_path: Path, sqlite_url: str) -> None:
    cfg = str(write_config(tmp_path, sqlite_url))
    (tmp_path / "l.csv").write_text("email\na@example.org\nb@example.org\n")
    assert run("--config", cfg, "leads", "import", str(tmp_path / "l.csv")).exit_code == 0
    assert json.loads(run("--config", cfg, "leads", "list", "--limit", "0", "--json").output) == []
    one = json.loads(run("--config", cfg, "leads", "list", "--limit", "1", "--json").output)
    assert len(one) == 1
    assert run("--config", cfg, "leads", "list", "--limit", "-1").exit_code == 2


def test_it_fails_inspecting_a_missing_file(tmp_path: Path) -> None:
    result = run("inspect", str(tmp_path / "missing.eml"))
    assert result.exit_code == 2 and "cannot read" in result.output
    sample = next(iter(sorted(EMAILS.glob("*.eml"))))
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "a.eml").write_bytes(sample.read_bytes())
    both = run("inspect", str(tmp_path / "dir"), str(tmp_path / "gone.eml"), "--json")
    assert both.exit_code == 2  # one of them could not be read


def test_it_prints_one_json_object_per_line_for_a_directory(tmp_path: Path) -> None:
    samples = sorted(EMAILS.glob("*.eml"))[:2]
    for p in samples:
        (tmp_path / p.name).write_bytes(p.read_bytes())
    result = run("inspect", str(tmp_path))  # no --json: README promises JSON lines
    assert result.exit_code == 0
    lines = [json.loads(line) for line in result.output.splitlines()]
    assert [Path(str(r["file"])).name for r in lines] == [p.name for p in samples]


def test_it_reports_every_config_problem_in_one_run_with_its_line(
    tmp_path: Path, sqlite_url: str
) -> None:
    data = base_config_data(sqlite_url, tmp_path)
    data["campaigns"][0]["mailbox"] = "sales-typo"  # a name that points nowhere
    data["campaigns"][0]["steps"][1]["template"] = "nurture/missing"  # no such template
    data["reps"][0]["match"]["countries"] = ["Spain", "MX"]  # a name, not a code
    data["reps"][1]["match"]["countries"] = ["UK"]
    data["alarms"] = {"silent_hourz": 3}  # a schema error
    cfg = tmp_path / "twoway.yaml"
    cfg.write_text(yaml.safe_dump(data, sort_keys=False))
    lines = cfg.read_text().splitlines()

    def line_of(text: str) -> int:
        return next(i for i, line in enumerate(lines, 1) if text in line)

    result = run("config", "check", "--config", str(cfg))
    assert result.exit_code == 2 and "Traceback" not in result.output
    out = result.output
    assert f"line {line_of('silent_hourz')}: alarms.silent_hourz: unknown key" in out
    assert (
        f"line {line_of('sales-typo')}: campaigns[0].mailbox: no mailbox named 'sales-typo'" in out
    )
    assert f"line {line_of('nurture/missing')}: campaigns[0].steps[1].template: no template" in out
    assert "reps[0].match.countries" in out and "'Spain' is not an ISO 3166" in out
    assert "reps[1].match.countries" in out and "the United Kingdom is GB" in out
    assert "5 problem(s)" in out


def test_it_rejects_uk_in_a_leads_csv_saying_it_means_gb(tmp_path: Path, sqlite_url: str) -> None:
    cfg = str(write_config(tmp_path, sqlite_url))
    (tmp_path / "l.csv").write_text("email,country\nuk@example.org,UK\ngb@example.org,gb\n")
    result = run("--config", cfg, "leads", "import", str(tmp_path / "l.csv"))
    assert "l.csv:2: rejected uk@example.org: country 'UK' is not an ISO 3166 code" in result.output
    assert "the United Kingdom is GB" in result.output and "1 imported" in result.output


def test_it_logs_an_exception_as_json_with_its_whole_traceback() -> None:
    import io
    import logging

    from worker.cli import JsonFormatter

    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(JsonFormatter())
    log = logging.getLogger("tests.json")
    log.addHandler(handler)
    try:
        try:
            raise KeyError("the cause")
        except KeyError as cause:
            raise RuntimeError("first line\nsecond line of the message") from cause
    except RuntimeError:
        log.exception("the pass failed")
    finally:
        log.removeHandler(handler)
    record = json.loads(out.getvalue())
    assert record["message"] == "the pass failed" and record["level"] == "error"
    assert record["error"] == "RuntimeError: first line"
    assert "second line of the message" in record["traceback"]
    assert "KeyError: 'the cause'" in record["traceback"]  # the chained cause too
    assert "Traceback (most recent call last)" in record["traceback"]


def test_it_shows_a_paused_enrollment_and_a_reply_before_what_it_caused(
    tmp_path: Path, sqlite_url: str
) -> None:
    import email
    import mailbox
    from datetime import UTC, date, datetime
    from email.message import EmailMessage
    from email.policy import default

    from tests import mails

    cfg = str(write_config(tmp_path, sqlite_url))
    (tmp_path / "l.csv").write_text("email,first_name\nola@example.org,Ola\npia@example.org,Pia\n")
    assert (
        run(
            "--config", cfg, "leads", "import", str(tmp_path / "l.csv"), "--campaign", "welcome"
        ).exit_code
        == 0
    )
    assert run("--config", cfg, "run", "--once").exit_code == 0
    sent: dict[str, EmailMessage] = {}
    for m in mailbox.Maildir(tmp_path / "outbox"):
        parsed = email.message_from_bytes(m.as_bytes(), policy=default)
        assert isinstance(parsed, EmailMessage)
        sent[str(parsed["To"]).split("<")[-1].rstrip(">")] = parsed
    at = datetime(2026, 12, 1, 11, 0, tzinfo=UTC)
    inbox = tmp_path / "inbox" / "new"
    (inbox / "ooo").write_bytes(mails.exchange_ooo(sent["ola@example.org"], date(2026, 12, 10), at))
    (inbox / "reply").write_bytes(mails.reply(sent["pia@example.org"], "Yes, send pricing.", at))
    later = {"TWOWAY_NOW": "2026-12-01T11:00:00Z"}
    assert CliRunner().invoke(main, ["--config", cfg, "run", "--once"], env=later).exit_code == 0

    ola = run("--config", cfg, "leads", "show", "ola@example.org").output
    line = next(x for x in ola.splitlines() if x.strip().startswith("welcome:"))
    assert "; paused until 2026-12-1" in line and "next due" not in line, line
    pia = run("--config", cfg, "leads", "show", "pia@example.org").output
    mail = [x for x in pia.splitlines() if "->" in x or "<-" in x]
    reply = next(i for i, x in enumerate(mail) if "<- reply" in x)
    handoff = next(i for i, x in enumerate(mail) if "-> handoff" in x)
    assert reply < handoff, mail


def test_it_asks_only_logistics_leads_about_their_fleet() -> None:
    from worker.contexts import samples
    from worker.rendering import Renderer

    renderer = Renderer(ROOT / "templates")
    for industry, fleet in (("logistics", True), ("fintech", False), ("software", False)):
        ctx = samples(lead={"industry": industry, "first_name": "Sam"})["nurture"]
        out = renderer.render("nurture/case-study", ctx)
        for text in (out.text, out.html):
            assert ("vehicles" in text) is fleet and "fleet size" not in text, (industry, text)
        assert "do this work today" in out.text or fleet


def test_it_tells_in_the_demo_what_matched_and_when_the_lead_is_away(tmp_path: Path) -> None:
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-m", "worker", "demo", "--dir", str(tmp_path / "ws")],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "threaded by In-Reply-To/References" not in out.stdout
    assert "it carries our reply token" in out.stdout
    away = next(line for line in out.stdout.splitlines() if "out-of-office" in line)
    assert "away until" in away and "back on" not in away
    # What `inspect` says of that out-of-office agrees: back the day after "away until".
    cfg = tmp_path / "ws" / "twoway.yaml"
    until = date.fromisoformat(away.rsplit("away until ", 1)[1].strip())
    seen = subprocess.run(
        twoway_cmd(cfg, "inspect", str(tmp_path / "ws" / "mail" / "inbox")),
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )  # fmt: skip
    results = [json.loads(line) for line in seen.stdout.splitlines()]
    (ooo,) = [r for r in results if r["from"] == "tom.becker@kraftwerk.example"]
    assert ooo["kind"] == "auto_reply" and ooo["return_date"] == str(until + timedelta(days=1))
    # The case study asks only a logistics lead about its vehicles, never about a "fleet".
    for email, vehicles in (
        ("emma.wilson@brightline.example", True),  # logistics
        ("raj.mehta@finlytics.example", False),  # fintech
        ("maria.garcia@nube.example", False),  # software
    ):
        shown = subprocess.run(
            twoway_cmd(cfg, "templates", "preview", "nurture/case-study", "--lead", email),
            capture_output=True, text=True, timeout=120, cwd=tmp_path,
        )  # fmt: skip
        assert shown.returncode == 0, shown.stderr
        assert ("vehicles" in shown.stdout) is vehicles and "fleet" not in shown.stdout, email
