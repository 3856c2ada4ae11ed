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


@pytest.mark.parametrize("command", [c for c in COMMANDS if c != "twoway run"])
def test_it_runs_the_readme_command(command: str, workspace: Path, tmp_path: Path) -> None:
    text = (
        command.replace("[--leads]", "--leads")
        .replace("maria@example.org", "maria.garcia@nube.example")
        .replace("leads.csv", str(workspace / "leads.csv"))
        .replace("/tmp/w.html", str(tmp_path / "w.html"))
        .replace("report.html", str(tmp_path / "report.html"))
    )
    args = shlex.split(text)[1:]
    result = CliRunner().invoke(main, ["--config", str(workspace / "twoway.yaml"), *args])
    assert result.exit_code == 0, f"{command}\n{result.output}"
    assert "Traceback" not in result.output


def test_it_documents_the_daemon_command() -> None:
    result = CliRunner().invoke(main, ["run", "--help"])
    assert result.exit_code == 0 and "--once" in result.output
