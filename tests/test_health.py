"""/healthz and `twoway status --check` see a dead worker and a failing mailbox, for real:
a SIGKILLed `twoway run` and a stopped Dovecot, then both back."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.conftest import base_config_data, twoway_cmd
from tests.imap_server import DovecotServer, free_port
from tests.served import Client, Reply, Served

LEASE = 5


def env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in ("TWOWAY_CONFIG", "TWOWAY_NOW")}


def start_worker(cfg: Path) -> subprocess.Popen[bytes]:
    log = (cfg.parent / "worker.log").open("ab")
    return subprocess.Popen(twoway_cmd(cfg, "run"), env=env(), stdout=log, stderr=log)


def wait_for(served: Served, code: int, within: float, says: str = "") -> Reply:
    """Poll /healthz until it answers `code` (and its reasons mention `says`)."""
    deadline = time.monotonic() + within
    last: Reply | None = None
    while time.monotonic() < deadline:
        last = served.client().get("/healthz")
        if last.status == code and says in " ".join(json.loads(last.body)["reasons"]):
            return last
        time.sleep(0.25)
    raise AssertionError(f"/healthz did not answer {code} ({says!r}) within {within} s: {last}")


def check(cfg: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        twoway_cmd(cfg, "status", "--check"), env=env(), capture_output=True, text=True
    )


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for p in started:
        if p.poll() is None:
            p.kill()
            p.wait()


@pytest.mark.imap
@pytest.mark.slow
def test_it_turns_503_on_a_killed_worker_and_a_stopped_imap_server_and_back(
    dovecot: DovecotServer,
    imap_user: str,
    tmp_path: Path,
    processes: list[subprocess.Popen[bytes]],
) -> None:
    data = base_config_data(
        f"sqlite:///{tmp_path / 'twoway.db'}",
        tmp_path,
        mailboxes=[dovecot.mailbox_section(imap_user, idle=False, poll_interval=0.5, timeout=5)],
        workers={"lease_seconds": LEASE},
        alarms={"mailbox_failing_seconds": 2},
    )
    cfg = tmp_path / "twoway.yaml"
    cfg.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    served = Served(cfg, env={"TWOWAY_NOW": ""})
    dovecot_down = False
    try:
        first = wait_for(served, 503, 10, "no worker")
        assert json.loads(first.body)["status"] == "failing"
        assert check(cfg).returncode == 1

        worker = start_worker(cfg)
        processes.append(worker)
        healthy = wait_for(served, 200, 30)
        assert json.loads(healthy.body) == {
            "status": "ok", "reasons": [], "workers": 1, "mailboxes_failing_seconds": {},
        }  # fmt: skip
        assert check(cfg).returncode == 0

        worker.send_signal(signal.SIGKILL)
        worker.wait()
        dead = wait_for(served, 503, LEASE * 4, "no worker has heartbeated within its lease")
        assert "the last heartbeat was" in dead.body
        failed = check(cfg)
        assert failed.returncode == 1 and "no worker" in failed.stderr

        processes.append(start_worker(cfg))
        wait_for(served, 200, 30)

        dovecot.stop()
        dovecot_down = True
        down = wait_for(served, 503, 30, "mailbox sales has been failing")
        assert no_account_in(down.body, data)
        assert check(cfg).returncode == 1
        dovecot.start()
        dovecot_down = False
        wait_for(served, 200, 90)
        assert check(cfg).returncode == 0
    finally:
        if dovecot_down:  # the session's other tests need it
            dovecot.start()
        served.stop()


def no_account_in(body: str, data: dict[str, object]) -> bool:
    """The public answer names no mailbox host or password."""
    mailboxes = data["mailboxes"]
    assert isinstance(mailboxes, list)
    return all(str(m["password"]) not in body and str(m["host"]) not in body for m in mailboxes)


def test_it_serves_from_the_worker_process_with_run_serve(
    tmp_path: Path, processes: list[subprocess.Popen[bytes]]
) -> None:
    port = free_port()
    data = base_config_data(
        f"sqlite:///{tmp_path / 'twoway.db'}",
        tmp_path,
        workers={"lease_seconds": LEASE},
        serve={"port": port},
    )
    cfg = tmp_path / "twoway.yaml"
    cfg.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    log = (tmp_path / "run.log").open("ab")
    proc = subprocess.Popen(twoway_cmd(cfg, "run", "--serve"), env=env(), stdout=log, stderr=log)
    processes.append(proc)
    web = Client(port)
    deadline = time.monotonic() + 30
    reply: Reply | None = None
    while time.monotonic() < deadline:
        try:
            reply = web.get("/healthz")
            if reply.status == 200:
                break
        except OSError:
            pass
        time.sleep(0.25)
    assert reply is not None and reply.status == 200, reply
    assert json.loads(reply.body)["workers"] == 1
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0
    with pytest.raises(OSError):
        web.get("/healthz")  # the server stopped with the worker
