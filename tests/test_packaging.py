"""`twoway init` writes the packaged samples; they are the top-level folders themselves."""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner

from tests.conftest import ROOT
from worker.cli import main

SECRETS = {"IMAP_PASSWORD": "imap-s3cret", "SMTP_PASSWORD": "smtp-s3cret"}


def files_under(root: Path) -> dict[str, bytes]:
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in root.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    }


def test_it_writes_a_starting_point_that_passes_config_check(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["init", str(tmp_path / "acme")])
    assert result.exit_code == 0, result.output
    assert files_under(tmp_path / "acme" / "templates") == files_under(ROOT / "templates")
    cfg = tmp_path / "acme" / "config" / "twoway.yaml"
    assert cfg.read_bytes() == (ROOT / "config" / "twoway.example.yaml").read_bytes()
    assert (tmp_path / "acme" / "config" / "sample-leads.csv").is_file()
    check = CliRunner().invoke(main, ["--config", str(cfg), "config", "check"], env=SECRETS)
    assert check.exit_code == 0, check.output
    assert f"{cfg}: OK" in check.output


def test_it_never_overwrites_an_existing_project(tmp_path: Path) -> None:
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "twoway.yaml").write_text("mine\n")
    result = CliRunner().invoke(main, ["init", str(tmp_path)])
    assert result.exit_code == 2
    assert "already exists" in result.output
    assert (tmp_path / "config" / "twoway.yaml").read_text() == "mine\n"
    assert not (tmp_path / "templates").exists()


# Building the wheel and running `twoway demo` from it in a fresh venv outside the checkout
# is .ci/wheel.sh (CI runs it beside the tests: it takes a minute).
