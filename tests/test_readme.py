"""Every `twoway …` command README shows works as printed (on the demo's workspace)."""

from __future__ import annotations

import re
import shlex
from datetime import UTC, datetime
from pathlib import Path

import pytest
from click.testing import CliRunner

from tests.conftest import ROOT
from worker.cli import main
from worker.demo import run_demo

README = (ROOT / "README.md").read_text()


def readme_commands() -> list[str]:
    blocks = re.findall(r"```sh\n(.*?)```", README, flags=re.S)
    out = []
    for block in blocks:
        for line in block.splitlines():
            line = line.split("  #", 1)[0].strip()
            if line.startswith("twoway "):
                out.append(line)
    return out


COMMANDS = readme_commands()


def test_it_finds_the_documented_commands() -> None:
    assert len(COMMANDS) >= 15
    assert "twoway run --once" in COMMANDS and "twoway status --json" in COMMANDS


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    ws = tmp_path_factory.mktemp("readme") / "ws"
    run_demo(ws, lambda: datetime.now(UTC), lambda _line: None)
    return ws


@pytest.mark.parametrize(
    "command", [c for c in COMMANDS if c != "twoway run" and "status --check" not in c]
)
def test_it_runs_the_readme_command(command: str, workspace: Path, tmp_path: Path) -> None:
    text = (
        command.replace("[--leads]", "--leads")
        .replace("maria@example.org", "maria.garcia@nube.example")
        .replace("leads.csv", str(workspace / "leads.csv"))
        .replace("/tmp/w.html", str(tmp_path / "w.html"))
        .replace("report.html", str(tmp_path / "report.html"))
    )
    if " acme" in text:  # `twoway init acme` and the commands on what it wrote
        if "acme/" in text:
            CliRunner().invoke(main, ["init", str(tmp_path / "acme")])
        text = text.replace(" acme", f" {tmp_path / 'acme'}")
    if "k3x9q2m7abcdefgh" in text:  # the example token: use a real lead's
        text = text.replace("k3x9q2m7abcdefgh", token_of(workspace, "carlos.ruiz@nube.example"))
    args = shlex.split(text)[1:]
    result = CliRunner().invoke(main, ["--config", str(workspace / "twoway.yaml"), *args])
    assert result.exit_code == 0, f"{command}\n{result.output}"
    assert "Traceback" not in result.output


def token_of(workspace: Path, email: str) -> str:
    from worker.app import App
    from worker.config import load_config
    from worker.leads import get_lead

    app = App.open(load_config(workspace / "twoway.yaml", env={}), lambda: datetime.now(UTC))
    with app.transaction() as s:
        token = get_lead(s, email).reply_token
    app.close()
    return token


def test_it_documents_the_daemon_command() -> None:
    result = CliRunner().invoke(main, ["run", "--help"])
    assert result.exit_code == 0 and "--once" in result.output


def test_no_file_holds_an_unresolved_merge() -> None:
    """A merge left half-done once published both sides of two README paragraphs."""
    marker = re.compile(r"^(<{7}|>{7}) |^={7}$", re.M)
    tracked = [
        p
        for pattern in ("*.md", "*.py", "*.yaml", "*.yml", "*.toml", "*.txt", "*.html", "*.j2")
        for p in ROOT.rglob(pattern)
        if not {".venv", ".git", "node_modules"} & set(p.relative_to(ROOT).parts)
    ]
    bad = [
        str(p.relative_to(ROOT))
        for p in tracked
        if marker.search(p.read_text(encoding="utf-8", errors="replace"))
    ]
    assert len(tracked) > 50
    assert not bad, f"unresolved merge in {bad}"
