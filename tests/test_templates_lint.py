"""`templates lint` and `preview` render what the worker would send, as an admin runs them.

Each template is linted with the context of the kind of email the config sends it as
(worker.contexts builds both), nurture bodies must keep the legal footer, and a
problem all leads share is said once.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import yaml
from click.testing import CliRunner, Result
from sqlalchemy import select

from tests.conftest import ROOT, base_config_data
from worker.cli import main
from worker.db import make_engine
from worker.models import Lead

NOW = {"TWOWAY_NOW": "2026-12-01T10:00:00Z"}


def setup(tmp_path: Path, database_url: str) -> tuple[Path, Path]:
    """A config whose templates are a private copy of the shipped ones."""
    templates = tmp_path / "templates"
    shutil.copytree(ROOT / "templates", templates)
    data = base_config_data(database_url, tmp_path, templates_dir=str(templates))
    cfg = tmp_path / "twoway.yaml"
    cfg.write_text(yaml.safe_dump(data))
    return cfg, templates


def twoway(cfg: Path, *args: str) -> Result:
    return CliRunner().invoke(main, ["--config", str(cfg), *args], env=NOW)


def import_leads(cfg: Path, tmp_path: Path, csv_text: str) -> None:
    path = tmp_path / "leads.csv"
    path.write_text(csv_text)
    assert twoway(cfg, "leads", "import", str(path), "--campaign", "welcome").exit_code == 0


def add_line(templates: Path, template: str, line: str) -> None:
    path = templates / template / "body.txt"
    text = path.read_text()
    path.write_text(text.replace("{% block body %}\n", "{% block body %}\n" + line + "\n", 1))


def test_it_accepts_the_readme_custom_field_and_checks_it_per_lead(
    tmp_path: Path, database_url: str
) -> None:
    cfg, templates = setup(tmp_path, database_url)
    add_line(templates, "nurture/welcome", "See you at {{ lead.custom.webinar }}.")
    assert twoway(cfg, "templates", "lint").exit_code == 0  # no lead to tell otherwise

    import_leads(cfg, tmp_path, "email,webinar\nann@example.org,Shipping 101\n")
    result = twoway(cfg, "templates", "lint", "--leads")
    assert result.exit_code == 0, result.output

    import_leads(cfg, tmp_path, "email\nbob@example.org\n")  # no webinar column
    result = twoway(cfg, "templates", "lint", "--leads")
    assert result.exit_code == 2
    assert "nurture/welcome/body.txt:3" in result.output and "webinar" in result.output
    assert "(lead bob@example.org)" in result.output and "ann@example.org" not in result.output


def test_it_says_a_syntax_error_once_however_many_leads(tmp_path: Path, database_url: str) -> None:
    cfg, templates = setup(tmp_path, database_url)
    import_leads(cfg, tmp_path, "email\n" + "".join(f"l{i}@example.org\n" for i in range(5)))
    add_line(templates, "nurture/case-study", "{% if %}")
    result = twoway(cfg, "templates", "lint", "--leads")
    assert result.exit_code == 2
    errors = [line for line in result.output.splitlines() if "syntax error" in line]
    assert len(errors) == 1, result.output
    assert "1 template problem(s)" in result.output


def test_it_fails_a_nurture_template_that_drops_the_legal_footer(
    tmp_path: Path, database_url: str
) -> None:
    cfg, templates = setup(tmp_path, database_url)
    body = templates / "nurture" / "last-call" / "body.txt"
    body.write_text('{% extends "layout.txt" %}\n{% block body %}Last call.\n{% endblock %}\n'
                    "{% block footer %}{% endblock %}\n")  # fmt: skip
    result = twoway(cfg, "templates", "lint")
    assert result.exit_code == 2
    found = [line for line in result.output.splitlines() if "last-call/body.txt" in line]
    assert any("unsubscribe link" in line for line in found), result.output
    assert any("postal address" in line for line in found), result.output
    assert "last-call/body.html" not in result.output  # that part still has its footer
    assert twoway(cfg, "config", "check").exit_code == 2  # the config names the template


def test_it_lints_each_template_with_what_its_kind_of_email_gets(
    tmp_path: Path, database_url: str
) -> None:
    """A nurture step has no rep: a template that uses one would fail when sent."""
    cfg, templates = setup(tmp_path, database_url)
    assert twoway(cfg, "templates", "lint").exit_code == 0
    add_line(templates, "nurture/welcome", "Your rep: {{ rep.name }}")
    result = twoway(cfg, "templates", "lint")
    assert result.exit_code == 2
    assert "nurture/welcome/body.txt:3" in result.output and "'rep' is undefined" in result.output


def test_it_previews_for_a_lead_with_the_leads_own_unsubscribe_link(
    tmp_path: Path, database_url: str
) -> None:
    cfg, _ = setup(tmp_path, database_url)
    import_leads(cfg, tmp_path, "email,first_name\ncai@example.org,Cai\n")
    engine = make_engine(database_url)
    with engine.connect() as conn:
        token = conn.execute(select(Lead.reply_token)).scalar_one()
    engine.dispose()
    result = twoway(cfg, "templates", "preview", "nurture/welcome", "--lead", "cai@example.org")
    assert result.exit_code == 0, result.output
    assert "Hi Cai" in result.output
    assert "k3x9q2m7" not in result.output  # not the sample's placeholder token
    link = [w for w in result.output.split() if w.startswith("https://example.com/unsubscribe/")]
    assert link == [f"https://example.com/unsubscribe/{token}"]
