"""The samples ship inside the package: `twoway demo` and `twoway init` work from a wheel."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
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


@pytest.mark.slow
def test_it_runs_the_demo_from_a_wheel_installed_outside_the_checkout(tmp_path: Path) -> None:
    dist = tmp_path / "dist"
    subprocess.run(
        [sys.executable, "-m", "build", "--outdir", str(dist), str(ROOT)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    wheel = next(dist.glob("twoway-*.whl"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    subprocess.run(
        [str(venv / "bin" / "pip"), "install", "-q", str(wheel)],
        check=True,
        capture_output=True,
        timeout=600,
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TWOWAY_CONFIG")}
    twoway = str(venv / "bin" / "twoway")
    demo = subprocess.run(
        [twoway, "demo", "--dir", str(elsewhere / "ws")],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert demo.returncode == 0, demo.stderr
    assert "Prospects (2)" in demo.stdout
    assert "The handoff email the rep received" in demo.stdout
    init = subprocess.run(
        [twoway, "init", str(elsewhere / "acme")], cwd=elsewhere, env=env, capture_output=True
    )
    assert init.returncode == 0, init.stderr
    assert files_under(elsewhere / "acme" / "templates") == files_under(ROOT / "templates")
    pages = subprocess.run(  # the pages of `twoway serve` ship too
        [str(venv / "bin" / "python"), "-c",
         "from worker.rendering import Pages; p = Pages();"
         "print(p.render('login.html', next='/console', error=None), p.static('console.css'))"],
        cwd=elsewhere, env=env, capture_output=True, text=True,
    )  # fmt: skip
    assert pages.returncode == 0, pages.stderr
    assert "twoway console" in pages.stdout and "--accent" in pages.stdout
