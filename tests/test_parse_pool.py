"""The parsing pool (`workers.parse_processes`): the same records as parsing in-process,
in order, and a clean stop on SIGTERM with nothing lost or repeated."""

from __future__ import annotations

import contextlib
import mailbox
import multiprocessing
import os
import signal
import subprocess
from collections.abc import Iterator
from datetime import UTC, datetime
from email.message import EmailMessage
from email.utils import format_datetime
from pathlib import Path
from typing import Any

import pytest
import yaml
from sqlalchemy import func, select

from tests.conftest import PG_URL, base_config_data, pg_schema, twoway_cmd, wait_for
from worker import inbound
from worker.app import App
from worker.config import config_from_dict
from worker.leases import release_leases
from worker.models import InboundMessage, Quarantine
from worker.runner import Worker

NOW = datetime(2026, 12, 1, 10, 0, tzinfo=UTC)
N = 300  # three batches of 100: more than POOL_MIN_BATCH each


def _mail(i: int) -> bytes:
    """Replies, out-of-office answers, newsletters and, every 37th, bytes that are no email."""
    if i % 37 == 5:
        return b"\x00\x01 not an email at all\r\n"
    msg = EmailMessage()
    msg["From"] = f"Person {i} <person{i}@company{i % 40}.example.org>"
    msg["To"] = "sales@example.com"
    msg["Date"] = format_datetime(NOW)
    msg["Message-ID"] = f"<m{i}@company{i % 40}.example.org>"
    if i % 5 == 1:
        msg["Subject"] = "Automatic reply: Question"
        msg["Auto-Submitted"] = "auto-replied"
        msg.set_content(f"I am out of the office until December {10 + i % 15}, 2026.")
    elif i % 5 == 2:
        msg["Subject"] = f"Issue {i}"
        msg["List-Id"] = "News <news.example.org>"
        msg["Precedence"] = "bulk"
        msg.set_content("This week: five ideas. " * 40)
    else:
        msg["Subject"] = f"Re: Question {i}"
        msg.set_content(
            f"Could you send pricing for {i} seats?\n\nBest,\nPerson {i}\n\n"
            "On Mon, 30 Nov 2026, Acme Sales <sales@example.com> wrote:\n> Hello\n> there\n"
        )
    return msg.as_bytes()


def _config(tmp_path: Path, processes: int, mails: int = N) -> dict[str, Any]:
    inbox = tmp_path / "inbox"
    data = base_config_data(f"sqlite:///{tmp_path / 'twoway.db'}", tmp_path, campaigns=[])
    data["mailboxes"] = [
        {"name": "sales", "kind": "maildir", "path": str(inbox), "batch_size": 100}
    ]
    data["workers"] = {"parse_processes": processes}
    box = mailbox.Maildir(inbox, create=True)
    for i in range(mails):
        box.add(_mail(i))
    return data


def _records(app: App) -> list[tuple[Any, ...]]:
    with app.transaction() as s:
        rows = s.execute(
            select(
                InboundMessage.message_id,
                InboundMessage.kind,
                InboundMessage.reason,
                InboundMessage.reply_text,
                InboundMessage.return_date,
                InboundMessage.from_addr,
            ).order_by(InboundMessage.id)
        ).all()
        quarantined = s.scalars(select(Quarantine.reason).order_by(Quarantine.id)).all()
    return [tuple(r) for r in rows] + [("quarantined", q) for q in quarantined]


def _run(tmp_path: Path, processes: int) -> tuple[list[tuple[Any, ...]], int]:
    tmp_path.mkdir()
    data = _config(tmp_path, processes)
    app = App.open(config_from_dict(data, tmp_path / "twoway.yaml"), lambda: NOW)
    worker = Worker(app).start()
    try:
        result = worker.run_once()
        pool_processes = len(multiprocessing.active_children())
    finally:
        worker.close()
    assert result.inbound.processed + result.inbound.quarantined == N
    records = _records(app)
    app.close()
    return records, pool_processes


def test_the_pool_records_what_parsing_in_process_records(tmp_path: Path) -> None:
    in_process, none = _run(tmp_path / "in-process", 0)
    pooled, children = _run(tmp_path / "pool", 1)
    assert none == 0 and children == 1, "the second run parses in a pool process"
    assert len(in_process) == N
    ooo = sum(1 for i in range(N) if i % 5 == 1 and i % 37 != 5)
    assert [r[1] for r in in_process].count("auto_reply") == ooo
    assert pooled == in_process  # same rows, same order, same quarantine reasons
    assert not multiprocessing.active_children(), "closing the worker stops the pool"


def _children(pid: int) -> set[int]:
    """The processes whose parent is `pid` (from /proc)."""
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.add(int(entry.name))
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@contextlib.contextmanager
def _daemon(cfg: Path, **popen: Any) -> Iterator[subprocess.Popen[bytes]]:
    """`twoway run` on `cfg` at the tests' clock; killed if the test leaves it running."""
    env = {**os.environ, "TWOWAY_NOW": NOW.isoformat()}
    proc = subprocess.Popen(twoway_cmd(cfg, "run"), env=env, stdout=subprocess.DEVNULL, **popen)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def _assert_logged_cleanly(proc: subprocess.Popen[bytes]) -> None:
    assert proc.stderr is not None
    logged = proc.stderr.read().decode()
    assert "Traceback" not in logged and "pool failed" not in logged, logged[-2000:]


def _count(app: App, model: type[InboundMessage | Quarantine]) -> int:
    with app.transaction() as s:
        return int(s.scalar(select(func.count()).select_from(model)) or 0)


def test_sigterm_stops_the_worker_and_its_pool_losing_and_repeating_nothing(
    tmp_path: Path,
) -> None:
    data = _config(tmp_path, 1)
    for i in range(N, 4 * N):  # enough mail that SIGTERM lands mid-sync
        mailbox.Maildir(tmp_path / "inbox").add(_mail(i))
    cfg = tmp_path / "twoway.yaml"
    cfg.write_text(yaml.safe_dump(data))
    env = {**os.environ, "TWOWAY_NOW": NOW.isoformat()}
    app = App.open(config_from_dict(data, tmp_path / "twoway.yaml"), lambda: NOW)
    with _daemon(cfg, stderr=subprocess.PIPE, start_new_session=True) as proc:
        wait_for(
            lambda: _count(app, InboundMessage) >= 100 and bool(_children(proc.pid)),
            120,
            "the pool at work",
        )
        pool = _children(proc.pid)
        os.killpg(proc.pid, signal.SIGTERM)  # the whole group, as systemd stops a service
        assert proc.wait(60) == 0
    _assert_logged_cleanly(proc)
    wait_for(lambda: not any(_alive(p) for p in pool), 30, "the pool processes gone")
    assert _count(app, InboundMessage) < 4 * N, "SIGTERM landed mid-sync"
    assert subprocess.run(twoway_cmd(cfg, "run", "--once"), env=env).returncode == 0
    with app.transaction() as s:
        rows = s.scalar(select(func.count()).select_from(InboundMessage))
        distinct = s.scalar(select(func.count(func.distinct(InboundMessage.message_id))))
        quarantined = s.scalar(select(func.count()).select_from(Quarantine))
    assert rows == distinct and (rows or 0) + (quarantined or 0) == 4 * N
    app.close()


def test_the_pool_does_not_outlive_a_killed_worker(tmp_path: Path) -> None:
    data = _config(tmp_path, 1)
    for i in range(N, 4 * N):
        mailbox.Maildir(tmp_path / "inbox").add(_mail(i))
    cfg = tmp_path / "twoway.yaml"
    cfg.write_text(yaml.safe_dump(data))
    with _daemon(cfg, stderr=subprocess.DEVNULL) as proc:
        wait_for(lambda: bool(_children(proc.pid)), 120, "the pool at work")
        pool = _children(proc.pid)
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    wait_for(lambda: not any(_alive(p) for p in pool), 30, "the orphaned pool processes gone")


def test_the_daemon_starts_its_parsing_process_before_the_first_mail(tmp_path: Path) -> None:
    """A backlog's first batch (and the first reply after a restart) does not wait for the
    pool process to start and import twoway: the daemon starts it with an empty mailbox."""
    data = _config(tmp_path, 1, mails=0)
    data["mailboxes"][0]["poll_interval"] = 1
    cfg = tmp_path / "twoway.yaml"
    cfg.write_text(yaml.safe_dump(data))
    app = App.open(config_from_dict(data, cfg), lambda: NOW)
    with _daemon(cfg, stderr=subprocess.PIPE) as proc:
        wait_for(lambda: bool(_children(proc.pid)), 60, "the parsing process, before any mail")
        assert _count(app, InboundMessage) == 0
        box = mailbox.Maildir(tmp_path / "inbox")
        for i in range(N):
            box.add(_mail(i))
        wait_for(
            lambda: _count(app, InboundMessage) + _count(app, Quarantine) == N,
            120,
            "the mail recorded",
        )
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    _assert_logged_cleanly(proc)
    app.close()


def test_a_system_that_refuses_the_pool_parses_in_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A container without a writable /dev/shm refuses the pool's locks (PermissionError
    from SemLock, seen in the image check): the daemon must not die of it. The refusal is
    faked here (this machine grants the locks); the image check meets the real one."""
    in_process, _ = _run(tmp_path / "in-process", 0)

    def refused(*_args: Any, **_kwargs: Any) -> None:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(inbound, "ProcessPoolExecutor", refused)
    (tmp_path / "refused").mkdir()
    data = _config(tmp_path / "refused", 1)
    app = App.open(config_from_dict(data, tmp_path / "refused" / "twoway.yaml"), lambda: NOW)
    worker = Worker(app).start()
    try:
        worker.preparer.warm()  # as `twoway run` does at start
        result = worker.run_once()
    finally:
        worker.close()
    assert result.inbound.processed + result.inbound.quarantined == N
    assert _records(app) == in_process
    assert "cannot start the parsing process" in caplog.text
    app.close()


def _counting_fetches(worker: Worker) -> list[int]:
    """How many messages the worker's (real) mail source hands out, per fetch."""
    source = worker.mailboxes[0].source
    real = source.fetch_new
    fetched: list[int] = []

    def fetch_new(folder: str, after_uid: int, batch_size: int) -> Iterator[list[Any]]:
        for batch in real(folder, after_uid, batch_size):
            fetched.append(len(batch))
            yield batch

    source.fetch_new = fetch_new  # type: ignore[method-assign]
    return fetched


def test_the_daemons_passes_read_a_backlog_once_with_the_next_batch_prepared_meanwhile(
    tmp_path: Path,
) -> None:
    """The daemon reads a backlog a bounded pass at a time (sending between passes). The
    batches a pass fetched ahead and handed to the pool are kept for the next passes, not
    dropped and fetched again: every message is fetched once, and the records are those
    of one `run --once` drain."""
    drained, _ = _run(tmp_path / "drained", 0)
    (tmp_path / "passes").mkdir()
    data = _config(tmp_path / "passes", 1)
    app = App.open(config_from_dict(data, tmp_path / "passes" / "twoway.yaml"), lambda: NOW)
    worker = Worker(app).start()
    fetched = _counting_fetches(worker)
    passes = []
    try:
        while True:
            result = worker.run_once(limit=100)
            passes.append(result.inbound.processed + result.inbound.quarantined)
            if not result.more:
                break
    finally:
        worker.close()
    assert passes == [100, 100, 100, 0]
    assert sum(fetched) == N, f"fetched {fetched}: a batch fetched twice"
    assert _records(app) == drained
    app.close()


def test_a_batch_kept_for_the_next_pass_is_dropped_when_another_worker_read_on(
    tmp_path: Path,
) -> None:
    """Between two passes another worker (the mailbox's lease moved) read the folder: the
    batch the first one kept is not the next one any more, and is not recorded again.
    Several workers share a PostgreSQL database only."""
    if not PG_URL:
        pytest.skip("PostgreSQL not configured (set TWOWAY_TEST_PG_URL; .ci/run does)")
    with pg_schema(PG_URL) as url:
        _kept_batch_dropped(tmp_path, url)


def _kept_batch_dropped(tmp_path: Path, url: str) -> None:
    data = {**_config(tmp_path, 1), "database": url}
    cfg = config_from_dict(data, tmp_path / "twoway.yaml")
    app, other_app = App.open(cfg, lambda: NOW), App.open(cfg, lambda: NOW)
    first, other = Worker(app).start(), Worker(other_app).start()
    try:
        assert first.run_once(limit=100).more
        release_leases(app, first.id)  # as when its lease lapsed (the worker stalled)
        rest = other.run_once()
        assert rest.inbound.processed + rest.inbound.quarantined == N - 100
        release_leases(other_app, other.id)  # and the other one stopped
        fetched = _counting_fetches(first)
        again = first.run_once(limit=100)
    finally:
        first.close()
        other.close()
    assert (again.inbound.processed, again.inbound.duplicates, again.inbound.quarantined) == (
        0,
        0,
        0,
    )
    assert sum(fetched) == 0
    assert _count(app, InboundMessage) + _count(app, Quarantine) == N
    app.close()
    other_app.close()


def test_the_batches_ahead_hold_no_more_mail_than_one_batch_ahead_did() -> None:
    """Two batches are fetched ahead of the one being processed, unless the mail held
    would pass MAX_BATCH_BYTES; a fetch adds at most MAX_BATCH_BYTES, so what is held
    while a batch is processed is at most twice MAX_BATCH_BYTES, however the sizes fall
    (the loop of `sync_mailbox`, driven with batches of random sizes)."""
    import random
    from collections import deque

    from worker.mailbox import MAX_BATCH_BYTES, FetchedMessage

    rng = random.Random(14)
    mb = MAX_BATCH_BYTES

    def batch(size: int) -> inbound.Ahead:
        return [FetchedMessage("INBOX", 1, 1, b"x" * size, ())], list

    small = deque([batch(1000), batch(1000)])
    assert not inbound._ahead_full(small)  # one behind: fetch a second one ahead
    small.append(batch(1000))
    assert inbound._ahead_full(small)  # two behind: process the first
    assert not inbound._ahead_full(deque([batch(mb)]))  # nothing behind yet
    assert inbound._ahead_full(deque([batch(mb // 2), batch(mb // 2)]))  # enough held
    processed_behind = []
    for _ in range(300):
        pending: deque[inbound.Ahead] = deque()
        for _ in range(8):
            pending.append(batch(rng.choice([10, 10_000, mb // 3, mb // 2, mb - 1, mb])))
            while inbound._ahead_full(pending):
                held = sum(len(f.raw) for b, _ in pending for f in b)
                assert held <= 2 * mb, [len(b[0][0].raw) for b in pending]
                processed_behind.append(len(pending) - 1)
                pending.popleft()
    assert set(processed_behind) == {1, 2}  # both bounds were met along the way
