"""A database that cannot be opened is one line naming it, never a traceback (issue 12).

Exit 1 when the database cannot be reached or opened (a closed PostgreSQL port, an
SQLite file where no file can be made), 2 when its URL is not one twoway can use; the
password is never shown. Every command that opens the database says it the same way.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import click
import pytest
import yaml
from click.testing import CliRunner

from tests.conftest import base_config_data, twoway_cmd
from tests.imap_server import free_port
from worker.cli import main

PASSWORD = "s3cret-Pa55"


def _config(tmp_path: Path, url: str) -> Path:
    cfg = tmp_path / "twoway.yaml"
    cfg.write_text(yaml.safe_dump(base_config_data(url, tmp_path)))
    return cfg


def _closed_port_url() -> tuple[str, str]:
    port = free_port()  # nothing listens there
    return (
        f"postgresql://twoway:{PASSWORD}@127.0.0.1:{port}/twoway",
        f"cannot open the database postgresql+psycopg://twoway:***@127.0.0.1:{port}/twoway: ",
    )


def _unwritable_folder_url(tmp_path: Path) -> tuple[str, str]:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the database's folder should be\n")
    db = blocker / "data" / "twoway.db"
    return f"sqlite:///{db}", f"cannot open the database sqlite:///{db}: "


CASES = {
    "postgresql on a closed port": 1,
    "sqlite inside a file": 1,
    "sqlite in a folder nobody can write": 1,
    "not a url": 2,
    "mysql": 2,
    "a driver that is not installed": 2,
}


def _case(name: str, tmp_path: Path) -> tuple[str, str]:
    """The database URL of case `name` and how its message starts (after `twoway: `)."""
    if name == "postgresql on a closed port":
        return _closed_port_url()
    if name == "sqlite inside a file":
        return _unwritable_folder_url(tmp_path)
    if name == "sqlite in a folder nobody can write":  # /proc refuses new files, root too
        return "sqlite:////proc/twoway.db", "cannot open the database sqlite:////proc/twoway.db: "
    if name == "not a url":
        return (
            f"twoway:{PASSWORD}@db.example",
            "bad database URL 'twoway:***@db.example': not a URL",
        )
    if name == "mysql":
        return (
            f"mysql://twoway:{PASSWORD}@127.0.0.1/twoway",
            "bad database URL 'mysql://twoway:***@127.0.0.1/twoway': twoway works with sqlite "
            "and postgresql, not mysql",
        )
    return (
        f"postgresql+pg8000://twoway:{PASSWORD}@127.0.0.1/twoway",
        "bad database URL 'postgresql+pg8000://twoway:***@127.0.0.1/twoway': driver "
        "postgresql+pg8000 is not installed",
    )


@pytest.mark.parametrize("case", sorted(CASES))
def test_it_names_a_database_it_cannot_open_in_one_line(case: str, tmp_path: Path) -> None:
    url, starts = _case(case, tmp_path)
    cfg = _config(tmp_path, url)
    # The command an operator starts with; the test below tries every other one.
    for args in (["db", "upgrade"],):
        done = subprocess.run(
            twoway_cmd(cfg, *args), capture_output=True, text=True, timeout=120, env=os.environ
        )
        said = done.stderr.splitlines()
        assert done.returncode == CASES[case], (args, done.stderr)
        assert len(said) == 1, (args, done.stderr)  # no traceback, no log noise
        assert said[0].startswith(f"twoway: {starts}"), (args, said[0])
        assert PASSWORD not in done.stderr + done.stdout
        assert done.stdout == ""
    if case == "postgresql on a closed port":
        assert "refused" in said[0].lower()
    if case == "sqlite inside a file":
        assert "Not a directory" in said[0]


# Every command that opens the database, with the arguments it needs; `run` and `serve`
# are tried as subprocesses (they install signal handlers and would start serving).
OPENS_THE_DATABASE = {
    "db upgrade": [],
    "leads import": ["{csv}"],
    "leads list": ["--waiting"],
    "leads followup cancel": ["ana@example.org"],
    "leads show": ["ana@example.org"],
    "leads mark": ["ana@example.org", "customer"],
    "status": ["--check"],
    "inspect": ["{eml}"],
    "quarantine list": [],
    "quarantine retry": ["1"],
    "templates lint": ["--leads"],
    "templates preview": ["nurture/welcome", "--lead", "ana@example.org"],
    "outbox mark-sent": ["<x@example.com>"],
    "outbox resend": ["<x@example.com>"],
    "report": ["--html", "{html}"],
    "campaigns list": [],
    "campaigns pause": ["welcome"],
    "campaigns resume": ["welcome"],
    "campaigns enroll": ["welcome"],
    "campaigns unenroll": ["welcome", "ana@example.org"],
    "suppress import": ["{csv}"],
    "suppress list": [],
    "suppress remove": ["ana@example.org"],
    "webhooks retry": ["--all"],
    "export": ["leads"],
}
SUBPROCESS_ONLY = {"run": ["--once"], "serve": ["--port", "0"]}
NO_DATABASE = {"config check", "demo", "init", "hash-password", "templates send-test"}


def _leaves(cmd: click.Command, path: str = "") -> list[str]:
    if isinstance(cmd, click.Group):
        return [leaf for n, c in cmd.commands.items() for leaf in _leaves(c, f"{path} {n}")]
    return [path.strip()]


def test_every_command_that_opens_the_database_says_why_it_cannot(tmp_path: Path) -> None:
    known = set(OPENS_THE_DATABASE) | set(SUBPROCESS_ONLY) | NO_DATABASE
    assert set(_leaves(main)) == known, "a new command: add it to the lists above"
    url, starts = _closed_port_url()
    cfg = _config(tmp_path, url)
    files = {
        "csv": tmp_path / "leads.csv",
        "eml": tmp_path / "reply.eml",
        "html": tmp_path / "report.html",
    }
    files["csv"].write_text("email\nana@example.org\n")
    files["eml"].write_bytes(b"From: ana@example.org\r\nSubject: hi\r\n\r\nCall me.\r\n")
    for command, args in OPENS_THE_DATABASE.items():
        argv = [*command.split(), *(a.format(**files) for a in args)]
        result = CliRunner().invoke(main, ["--config", str(cfg), *argv])
        assert isinstance(result.exception, SystemExit), (command, result.exception)
        assert result.exit_code == 1, (command, result.output)
        assert result.stderr.splitlines() == [result.stderr.strip()], (command, result.stderr)
        assert result.stderr.startswith(f"twoway: {starts}"), (command, result.stderr)
        assert PASSWORD not in result.output
    for command, args in SUBPROCESS_ONLY.items():
        done = subprocess.run(twoway_cmd(cfg, command, *args), capture_output=True, text=True)
        assert done.returncode == 1, (command, done.stderr)
        assert done.stderr.startswith(f"twoway: {starts}"), (command, done.stderr)
        assert len(done.stderr.splitlines()) == 1, (command, done.stderr)


def test_config_check_names_a_bad_database_url_and_connect_an_unreachable_one(
    tmp_path: Path,
) -> None:
    cfg = _config(tmp_path, f"mysql://twoway:{PASSWORD}@127.0.0.1/twoway")
    bad = CliRunner().invoke(main, ["--config", str(cfg), "config", "check"])
    assert bad.exit_code == 2
    assert "bad database URL 'mysql://twoway:***@127.0.0.1/twoway'" in bad.stderr
    url, starts = _closed_port_url()
    cfg = _config(tmp_path, url)
    assert CliRunner().invoke(main, ["--config", str(cfg), "config", "check"]).exit_code == 0
    down = CliRunner().invoke(main, ["--config", str(cfg), "config", "check", "--connect"])
    assert down.exit_code == 1
    assert f"  {starts}" in down.stderr
    assert PASSWORD not in down.output
