"""Shared fixtures: real databases, SQLite always and PostgreSQL when one is configured.

`TWOWAY_TEST_PG_URL` (set by .ci/run, which starts a throwaway PostgreSQL on 127.0.0.1)
makes every database test run on both. Each PostgreSQL test gets its own schema, so tests
never see each other's rows. Mail servers live in tests/imap_server.py (Dovecot) and
tests/smtp_server.py (aiosmtpd).
"""

from __future__ import annotations

import mailbox
import os
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, text

from worker.app import App
from worker.config import Config, config_from_dict
from worker.runner import Worker

pytest_plugins = ["tests.imap_server", "tests.smtp_server"]

PG_URL = os.environ.get("TWOWAY_TEST_PG_URL")
ROOT = Path(__file__).resolve().parent.parent


def twoway_cmd(cfg: Path, *args: str) -> list[str]:
    """The command line of `twoway --config CFG ARGS…`, as a user runs it (a subprocess)."""
    return [sys.executable, "-m", "worker", "--config", str(cfg), *args]


def wait_for(check: Callable[[], bool], timeout: float, what: str) -> float:
    """Poll `check` until it holds; seconds it took. Fails the test after `timeout` seconds.

    For what a test cannot be told directly (another process got somewhere): never a
    fixed sleep that guesses.
    """
    start = time.monotonic()
    while not check():
        if time.monotonic() - start > timeout:
            pytest.fail(f"not within {timeout} s: {what}")
        time.sleep(0.05)
    return time.monotonic() - start


@pytest.fixture
def start_worker() -> Iterator[Callable[[App], Worker]]:
    """`start_worker(app)`: a started Worker on `app`. It and its app are closed when the
    test ends, passed or failed, so a failing assert never leaks the SQLite lock, a lease
    thread or a connection. (A test that needs a worker gone mid-way uses `with Worker`.)"""
    started: list[Worker] = []

    def start(app: App) -> Worker:
        worker = Worker(app).start()
        started.append(worker)
        return worker

    yield start
    for worker in reversed(started):
        worker.close()
        worker.app.close()


@contextmanager
def pg_schema(base: str, prefix: str = "t") -> Iterator[str]:
    """The URL of a new, empty schema in the PostgreSQL at `base`, dropped afterwards
    (the tests' databases, and bench/bench_scale.py's)."""
    schema = f"{prefix}_{uuid.uuid4().hex[:12]}"
    admin = create_engine(base)
    with admin.begin() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    sep = "&" if "?" in base else "?"
    try:
        yield f"{base}{sep}options=-csearch_path%3D{schema}"
    finally:
        with admin.begin() as conn:
            conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh, empty database: SQLite in a temp dir, or a private PostgreSQL schema."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'twoway.db'}"
        return
    if not PG_URL:
        pytest.skip("PostgreSQL not configured (set TWOWAY_TEST_PG_URL; .ci/run does)")
    with pg_schema(PG_URL) as url:
        yield url


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    """For the heavier end-to-end tests that run on SQLite only."""
    return f"sqlite:///{tmp_path / 'twoway.db'}"


def base_config(database: str, tmp_path: Path, **overrides: Any) -> Config:
    """A small valid config for tests: one campaign, three reps, Maildir transports."""
    return config_from_dict(
        base_config_data(database, tmp_path, **overrides), tmp_path / "twoway.yaml"
    )


def base_config_data(database: str, tmp_path: Path, **overrides: Any) -> dict[str, Any]:
    """The YAML data of `base_config` (to write a file for a `twoway` subprocess)."""
    mailbox.Maildir(tmp_path / "inbox", create=True)
    data: dict[str, Any] = {
        "database": database,
        "templates_dir": str(ROOT / "templates"),
        "mailboxes": [{"name": "sales", "kind": "maildir", "path": str(tmp_path / "inbox")}],
        "smtp": {"kind": "maildir", "path": str(tmp_path / "outbox")},
        "sender": {
            "from": "Acme Sales <sales@example.com>",
            "unsubscribe_url": "https://example.com/unsubscribe/{token}",
            "unsubscribe_mailto": "sales+unsubscribe-{token}@example.com",
            "postal_address": "Acme Inc., 1 Main St, Springfield",
        },
        "internal_domains": ["example.com"],
        "campaigns": [
            {
                "name": "welcome",
                "mailbox": "sales",
                "send_window": None,
                "steps": [
                    {"template": "nurture/welcome", "delay": "0d"},
                    {"template": "nurture/case-study", "delay": "3d"},
                    {"template": "nurture/last-call", "delay": "5d"},
                ],
            }
        ],
        "reps": [
            {"name": "Ana Lopez", "email": "ana@example.com", "match": {"countries": ["ES", "MX"]}},
            {
                "name": "Ben Okafor",
                "email": "ben@example.com",
                "match": {"industries": ["software"]},
            },
            {"name": "Chloe Martin", "email": "chloe@example.com"},
        ],
    }
    data.update(overrides)
    return data


@pytest.fixture
def config(database_url: str, tmp_path: Path) -> Config:
    return base_config(database_url, tmp_path)


@pytest.fixture
def app(config: Config) -> Iterator[App]:
    from datetime import UTC, datetime

    clock = [datetime(2026, 12, 1, 10, 0, tzinfo=UTC)]
    a = App.open(config, lambda: clock[0])
    a.clock = clock  # type: ignore[attr-defined]  # tests move time by assigning clock[0]
    yield a
    a.close()
