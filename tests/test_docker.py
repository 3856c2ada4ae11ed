"""The container files promise only what twoway really does.

There is no Docker engine in CI, so the image is not built here. Instead: every command the
Dockerfile and the compose example run is a real `twoway` command (its `--help` works with
the very arguments given), the README documents the ones people meet, and hadolint, when
it is installed (.ci/hadolint.sh installs it), finds nothing to say about the Dockerfile.
"""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT

DOCKERFILE = ROOT / "Dockerfile"
COMPOSE = ROOT / "docker-compose.example.yml"


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per Dockerfile instruction, continuation lines joined."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):  # a comment inside a continued instruction
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        word, _, rest = (pending + line).partition(" ")
        out.append((word.upper(), rest.strip()))
        pending = ""
    return out


def argv(form: str) -> list[str]:
    """The argument vector of an exec-form (JSON array) or shell-form command."""
    form = form.strip()
    if form.startswith("["):
        vector = json.loads(form)
        assert isinstance(vector, list) and all(isinstance(a, str) for a in vector)
        return vector
    return shlex.split(form)


def healthcheck_command(arguments: str) -> list[str]:
    """The command of `HEALTHCHECK [--option=value ...] CMD command`."""
    words = arguments.split()
    while words and words[0].startswith("--"):
        words.pop(0)
    assert words and words[0] == "CMD", f"HEALTHCHECK without CMD: {arguments}"
    return argv(" ".join(words[1:]))


def docker_commands() -> dict[str, list[str]]:
    """What the image runs, as full argument vectors (ENTRYPOINT + CMD when both exist)."""
    found = instructions(DOCKERFILE)
    last = {name: args for name, args in found}  # the last of each instruction wins
    entry = argv(last["ENTRYPOINT"]) if "ENTRYPOINT" in last else []
    commands = {"CMD": entry + argv(last["CMD"])}
    if "HEALTHCHECK" in last:
        commands["HEALTHCHECK"] = healthcheck_command(last["HEALTHCHECK"])
    return commands


def twoway_bin() -> Path:
    venv = ROOT / ".venv" / "bin" / "twoway"
    return venv if venv.exists() else Path(sys.executable).parent / "twoway"


def accepts(command: list[str]) -> subprocess.CompletedProcess[str]:
    """Runs `twoway <arguments> --help`: exit 0 only for a real command and real options."""
    assert command[0] == "twoway", f"not a twoway command: {command}"
    return subprocess.run(
        [str(twoway_bin()), *command[1:], "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin", "TWOWAY_CONFIG": "/nonexistent/twoway.yaml"},
    )


def test_it_runs_the_worker_and_checks_health_with_real_twoway_commands() -> None:
    commands = docker_commands()
    assert commands["CMD"] == ["twoway", "run"]
    assert commands["HEALTHCHECK"] == ["twoway", "status", "--check"]
    for where, command in commands.items():
        result = accepts(command)
        assert result.returncode == 0, f"{where} {command}: {result.stderr}"
        assert "Usage: twoway" in result.stdout


def test_it_rejects_a_command_twoway_does_not_have() -> None:
    # The check above is worth something only if a wrong command fails it.
    assert accepts(["twoway", "status", "--no-such-option"]).returncode == 2
    assert accepts(["twoway", "no-such-command"]).returncode == 2


def test_it_installs_dependencies_before_the_code_and_runs_as_a_plain_user() -> None:
    found = instructions(DOCKERFILE)
    copies = [args for name, args in found if name == "COPY"]
    pyproject = next(i for i, c in enumerate(copies) if c.startswith("pyproject.toml"))
    code = next(i for i, c in enumerate(copies) if c.startswith("worker/"))
    assert pyproject < code, "dependencies must not be reinstalled on every code change"
    user = [args for name, args in found if name == "USER"]
    assert user and user[-1].split(":")[0] not in ("root", "0")
    env = " ".join(args for name, args in found if name == "ENV")
    assert "TWOWAY_CONFIG=/app/config/twoway.yaml" in env
    volumes = next(argv(args) for name, args in found if name == "VOLUME")
    assert {"/app/config", "/app/templates", "/app/data"} <= set(volumes)


def test_it_runs_migrations_once_before_the_workers_on_postgresql() -> None:
    compose = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    services = compose["services"]
    assert services["db"]["image"] == "postgres:16"
    worker, migrate = services["worker"], services["migrate"]
    assert worker["environment"]["TWOWAY_DATABASE_URL"].startswith("postgresql+psycopg://")
    assert "@db:5432/" in worker["environment"]["TWOWAY_DATABASE_URL"]
    assert migrate["command"] == ["twoway", "db", "upgrade"]
    assert worker["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    web = services["web"]
    assert web["command"][:2] == ["twoway", "serve"]
    assert "/healthz" in " ".join(web["healthcheck"]["test"])
    assert all(p.startswith("127.0.0.1:") for p in web["ports"])
    for service in (worker, migrate, web):
        assert accepts(service["command"]).returncode == 0, service["command"]
        # Secrets are interpolated from the environment, never written in the file.
        for value in service["environment"].values():
            assert "PASSWORD" not in value or value.startswith("${")


def test_it_documents_the_commands_the_image_runs() -> None:
    readme = ROOT / "README.md"
    if not readme.exists():
        pytest.skip("README.md not written yet")
    text = readme.read_text(encoding="utf-8")
    assert "twoway run" in text
    assert "twoway status" in text


def test_it_passes_hadolint() -> None:
    venv = ROOT / ".venv" / "bin" / "hadolint"
    hadolint = str(venv) if venv.exists() else shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed (.ci/hadolint.sh installs it)")
    result = subprocess.run([hadolint, str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
