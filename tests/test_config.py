"""Config: the contract file is accepted, bad files name every problem, exit code 2."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from worker.cli import main
from worker.config import ConfigError, Delay, load_config

ROOT = Path(__file__).resolve().parent.parent
CONTRACT = ROOT.parent / "shared" / "twoway.contract.yaml"
SECRETS = {"IMAP_PASSWORD": "imap-s3cret", "SMTP_PASSWORD": "smtp-s3cret"}


@pytest.mark.skipif(not CONTRACT.exists(), reason="../shared not beside the project")
def test_it_accepts_the_contract_file_as_it_is() -> None:
    cfg = load_config(CONTRACT, env=SECRETS)
    assert cfg.mailboxes[0].password is not None
    assert cfg.mailboxes[0].password.get_secret_value() == "imap-s3cret"
    assert cfg.campaigns[0].steps[1].delay == Delay(3, "bd")
    assert cfg.handoff.follow_up is not None and cfg.handoff.follow_up.from_ == "rep"
    assert cfg.sender.address == "sales@example.com"


def test_it_accepts_the_example_file_with_the_documented_variables(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        main, ["--config", str(ROOT / "config/twoway.example.yaml"), "config", "check"], env=SECRETS
    )
    assert result.exit_code == 0, result.output
    assert "OK" in result.output


def test_it_names_every_problem_with_key_and_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "database: sqlite:///x.db\n"
        "smtp:\n"
        "  kind: smtp\n"
        "  host: smtp.example.com\n"
        "  max_per_day: lots\n"  # wrong type
        "sender:\n"
        "  from: 'Acme <sales@example.com>'\n"
        "  reply_tokens: true\n"  # unknown key
        "campaigns:\n"
        "  - name: welcome\n"
        "    steps:\n"
        "      - delay: 2d\n"  # template missing
    )
    result = CliRunner().invoke(main, ["--config", str(bad), "config", "check"])
    assert result.exit_code == 2
    out = result.output
    assert "line 5: smtp.max_per_day" in out
    assert "line 8: sender.reply_tokens: unknown key" in out
    assert "campaigns[0].steps[0].template: required key is missing" in out
    assert "Traceback" not in out


def test_it_reports_a_missing_environment_variable_without_its_value(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text(
        "sender: {from: 'A <a@example.com>'}\n"
        "smtp: {host: smtp.example.com, password: '${NOT_SET_ANYWHERE}'}\n"
    )
    with pytest.raises(ConfigError) as e:
        load_config(f, env={})
    assert "line 2: smtp.password: environment variable NOT_SET_ANYWHERE is not set" in str(e.value)


def test_it_reads_secrets_from_files_and_never_prints_them(tmp_path: Path) -> None:
    (tmp_path / "pw").write_text("file-s3cret\n")
    f = tmp_path / "c.yaml"
    f.write_text(
        "sender: {from: 'A <a@example.com>'}\nsmtp: {host: smtp.example.com, password_file: pw}\n"
    )
    cfg = load_config(f, env={})
    assert cfg.smtp is not None
    assert cfg.smtp.login_secret() == ("password", "file-s3cret")
    assert "file-s3cret" not in repr(cfg)


def test_it_refuses_plaintext_to_a_remote_server(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text(
        "sender: {from: 'A <a@example.com>'}\nsmtp: {host: mail.example.com, security: none}\n"
    )
    with pytest.raises(ConfigError) as e:
        load_config(f, env={})
    assert "security: none is only allowed for 127.0.0.1" in str(e.value)


def test_it_lets_the_environment_override_the_database(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("database: sqlite:///a.db\nsender: {from: 'A <a@example.com>'}\n")
    cfg = load_config(f, env={"TWOWAY_DATABASE_URL": "postgresql+psycopg://u@127.0.0.1/x"})
    assert cfg.database == "postgresql+psycopg://u@127.0.0.1/x"


def test_it_says_how_to_start_when_there_is_no_config(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["--config", str(tmp_path / "nope.yaml"), "status"])
    assert result.exit_code == 2
    assert "no such file" in result.output and "twoway demo" in result.output
