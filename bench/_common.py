"""Shared helpers of the benchmarks: child processes with their peak RSS, a throwaway
Dovecot and PostgreSQL, a bench database of leads with their sent mail, and generated mail.

Nothing here is timed by itself; each benchmark says what it measures.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SENDER = "sales@acme.example"
SENDER_DOMAIN = "acme.example"
REPS = (("Ana Lopez", "ana@acme.example"), ("Ben Okafor", "ben@acme.example"))


# --- child processes -------------------------------------------------------------------


@dataclass(frozen=True)
class ChildRun:
    """One finished child process: wall time, its own peak RSS, exit code and output."""

    seconds: float
    peak_rss_mb: float
    returncode: int
    stdout: str
    stderr: str

    def json(self) -> Any:
        """The child's stdout as JSON (the last non-empty line when it printed several)."""
        text = self.stdout.strip()
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            return json.loads(text.splitlines()[-1])


def run_child(
    cmd: Sequence[str],
    *,
    env: dict[str, str] | None = None,
    timeout: float = 1800,
    cwd: Path | None = None,
) -> ChildRun:
    """Run `cmd` to completion and return its wall time and *its own* peak RSS.

    The peak is the child's VmHWM (/proc/PID/status), read every 20 ms while it runs:
    the high-water mark of its own memory since exec. `os.wait4`'s ru_maxrss is no
    good here: on Linux it starts from the forking parent's peak, so a child smaller
    than this benchmark process would report the benchmark's size. Growth in the child's
    last 20 ms can be missed; ru_maxrss (an upper bound) is used only when no reading
    was made (a child that ended within the first interval).
    The child is killed after `timeout` seconds (reported as returncode -9).
    """
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        started = time.perf_counter()
        proc = subprocess.Popen(
            list(cmd), stdout=out, stderr=err, env=env, cwd=cwd, start_new_session=True
        )
        timer = threading.Timer(timeout, _kill_group, args=(proc.pid,))
        timer.start()
        hwm = [0]
        done = threading.Event()
        watcher = threading.Thread(target=_watch_hwm, args=(proc.pid, hwm, done), daemon=True)
        watcher.start()
        try:
            _pid, status, usage = os.wait4(proc.pid, 0)
        finally:
            timer.cancel()
            done.set()
            watcher.join()
        seconds = time.perf_counter() - started
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        return ChildRun(
            seconds=seconds,
            peak_rss_mb=round((hwm[0] or usage.ru_maxrss) / 1024, 1),
            returncode=proc.returncode,
            stdout=out.read().decode(errors="replace"),
            stderr=err.read().decode(errors="replace"),
        )


def _watch_hwm(pid: int, hwm: list[int], done: threading.Event) -> None:
    """Keep in hwm[0] the latest VmHWM (kB) of process `pid` until `done` or it is gone.
    The latest, not the largest: VmHWM only grows within one program, and a reading
    taken before the child's exec (still this process's memory) is replaced by the
    next one."""
    status = Path(f"/proc/{pid}/status")
    while not done.wait(0.02):
        try:
            text = status.read_text()
        except OSError:
            return
        for line in text.splitlines():
            if line.startswith("VmHWM:"):
                hwm[0] = int(line.split()[1])
                break


def _kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)


def peak_rss_mb() -> float:
    """This process's peak resident set size so far (VmHWM), in MB."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def check_child(run: ChildRun, what: str) -> None:
    if run.returncode != 0:
        raise SystemExit(f"{what} failed (exit {run.returncode}):\n{run.stderr[-3000:]}")


# --- servers ---------------------------------------------------------------------------


@contextlib.contextmanager
def dovecot() -> Iterator[Any]:
    """A throwaway Dovecot on 127.0.0.1 (the tests' DovecotServer), removed afterwards."""
    if shutil.which("dovecot") is None:
        raise SystemExit("dovecot is not installed (apt-get install dovecot-imapd)")
    from tests.imap_server import DovecotServer

    root = Path(tempfile.mkdtemp(prefix="twoway-bench-"))
    server = DovecotServer(root)
    try:
        server.start()
        yield server
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)


PG_BIN = Path("/usr/lib/postgresql/15/bin")


@contextlib.contextmanager
def throwaway_postgres(port: int = 15499) -> Iterator[str]:
    """A PostgreSQL 15 cluster in a temp dir (run as user postgres, fsync off); yields a URL."""
    if not (PG_BIN / "initdb").exists():
        raise SystemExit(f"PostgreSQL is not installed at {PG_BIN}")
    d = Path(tempfile.mkdtemp(prefix="twoway-bench-pg-"))
    d.chmod(0o755)
    shutil.chown(d, "postgres", "postgres")

    def as_postgres(cmd: str) -> None:
        subprocess.run(["su", "postgres", "-c", cmd], check=True, capture_output=True)

    as_postgres(f"{PG_BIN}/initdb -D {d}/data -U twoway --auth=trust -E UTF8")
    opts = f"-k {d} -p {port} -c listen_addresses=127.0.0.1 -c fsync=off"
    as_postgres(f"{PG_BIN}/pg_ctl -D {d}/data -l {d}/log -w start -o '{opts}'")
    try:
        yield f"postgresql+psycopg://twoway@127.0.0.1:{port}/postgres"
    finally:
        with contextlib.suppress(subprocess.CalledProcessError):
            as_postgres(f"{PG_BIN}/pg_ctl -D {d}/data -m fast -w stop")
        shutil.rmtree(d, ignore_errors=True)


@contextlib.contextmanager
def scratch_pg_database(url: str, name: str) -> Iterator[str]:
    """A new, empty database `name` on the server of `url`; dropped afterwards.

    Never touches the database named in `url` itself.
    """
    import psycopg
    from sqlalchemy.engine import make_url

    u = make_url(url)
    dsn = u.set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield u.set(database=name, drivername="postgresql+psycopg").render_as_string(
            hide_password=False
        )
    finally:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    mem_kb = 0
    with contextlib.suppress(OSError), open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem_kb = int(line.split()[1])
    cpu = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break

    def version(cmd: list[str]) -> str:
        try:
            return subprocess.run(cmd, capture_output=True, text=True).stdout.strip()
        except OSError:
            return "not installed"

    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "memory_gb": round(mem_kb / 1024 / 1024, 1),
        "python": sys.version.split()[0],
        "dovecot": version(["dovecot", "--version"]),
        "postgresql": version([str(PG_BIN / "postgres"), "--version"]),
        "sqlite": __import__("sqlite3").sqlite_version,
    }


# --- a bench database: leads and the nurture mail they were sent ------------------------


@dataclass(frozen=True)
class BenchLead:
    """What generated replies need to know about a lead and our mail to them."""

    email: str
    name: str
    token: str
    message_ids: tuple[str, ...]


def base_config(database: str, **extra: Any) -> dict[str, Any]:
    """A config dict for the benches (no campaigns unless given): SQLite or PostgreSQL."""
    data: dict[str, Any] = {
        "database": database,
        "templates_dir": str(ROOT / "templates"),
        "sender": {"from": f"Acme Sales <{SENDER}>"},
        "internal_domains": [SENDER_DOMAIN],
        "reps": [{"name": n, "email": e} for n, e in REPS],
        "campaigns": [
            {
                "name": "welcome",
                "send_window": None,
                "steps": [
                    {"template": "nurture/welcome"},
                    {"template": "nurture/case-study", "delay": "3d"},
                    {"template": "nurture/last-call", "delay": "5d"},
                ],
            }
        ],
    }
    data.update(extra)
    return data


def build_lead_database(database: str, leads: int, sent_per_lead: int = 2) -> list[BenchLead]:
    """Create the schema and `leads` leads enrolled in `welcome`, each already sent
    `sent_per_lead` nurture steps (status sent, with Message-IDs), next step due in 3 days.

    Uses the project's own import (`import_leads`) so tokens and enrollments are real.
    """
    from sqlalchemy import insert, select, update

    from worker.app import App
    from worker.compose import new_message_id
    from worker.config import config_from_dict
    from worker.leads import import_leads
    from worker.models import Enrollment, Lead, OutboundMessage

    config = config_from_dict(base_config(database))
    now = datetime.now(UTC)
    app = App.open(config, lambda: now)
    rows: list[tuple[int, dict[str, str | None]]] = [
        (i + 2, {"email": lead_email(i), "first_name": f"Lead{i}", "company": f"Co {i % 700}"})
        for i in range(leads)
    ]
    with app.transaction() as s:
        import_leads(s, rows, now, campaign=config.campaign("welcome"))
    out: list[BenchLead] = []
    with app.transaction() as s:
        s.execute(update(Enrollment).values(step=sent_per_lead, next_due=now + timedelta(days=3)))
        found = s.execute(select(Lead.id, Lead.email, Lead.reply_token).order_by(Lead.id)).all()
        outbound: list[dict[str, Any]] = []
        for lead_id, email, token in found:
            mids = tuple(new_message_id(SENDER_DOMAIN) for _ in range(sent_per_lead))
            for step, mid in enumerate(mids):
                sent = now - timedelta(days=2 * (sent_per_lead - step))
                outbound.append(
                    {
                        "idempotency_key": f"nurture:{lead_id}:welcome:{step}",
                        "kind": "nurture",
                        "lead_id": lead_id,
                        "campaign": "welcome",
                        "step": step,
                        "template": "nurture/welcome",
                        "message_id": mid,
                        "reply_token": token,
                        "to_addr": email,
                        "subject": f"Welcome, step {step + 1}",
                        "status": "sent",
                        "attempts": 1,
                        "next_attempt_at": sent,
                        "context": {},
                        "created_at": sent,
                        "sent_at": sent,
                    }
                )
            out.append(BenchLead(email, email.split("@")[0].title(), token, mids))
        for i in range(0, len(outbound), 5000):
            s.execute(insert(OutboundMessage), outbound[i : i + 5000])
    app.close()
    return out


def lead_email(i: int) -> str:
    return f"lead{i}@customer{i % 997}.example.net"


# --- generated mail --------------------------------------------------------------------

_PROSE = (
    "thanks for the note we are looking at options for our fleet next quarter and the "
    "routing piece matters most to the operations team please send details on rollout "
    "timing integration with our current dispatch tools and what support looks like"
)
_WORDS = _PROSE.split(" ")
_QUOTED = (
    "> Most operations teams come to us with the same story: routes planned in\r\n"
    "> spreadsheets and dispatch living in one person's head. Here is how three of\r\n"
    "> them cut their planning time in half within a month of switching over.\r\n"
)


def _date(at: datetime) -> str:
    return at.strftime("%a, %d %b %Y %H:%M:%S +0000")


def _pad(rng: random.Random, lo: int, hi: int, head_len: int) -> str:
    """Quoted history so that the whole message is between `lo` and `hi` bytes."""
    target = rng.randint(lo, hi) - head_len
    reps = max(1, target // len(_QUOTED))
    return _QUOTED * reps


def _sentence(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(_WORDS) for _ in range(n)).capitalize() + "."


def human_reply(
    rng: random.Random, n: int, lead: BenchLead | None, *, signal: str, at: datetime
) -> bytes:
    """A top-posted human reply of 4–8 KB. `signal` is how it can be matched: "token"
    (sent to our plus-address, threaded), "message_id" (threaded, plain address),
    "sender" (not threaded, from the lead) or "unknown" (a stranger)."""
    sender = lead.email if lead else f"stranger{n}@elsewhere{n % 50}.example.org"
    name = lead.name if lead else f"Stranger {n}"
    to = f"sales+{lead.token}@{SENDER_DOMAIN}" if lead and signal == "token" else SENDER
    threading_ = ""
    if lead and signal in ("token", "message_id"):
        ours = lead.message_ids[-1]
        refs = " ".join(f"<{m}>" for m in lead.message_ids)
        threading_ = f"In-Reply-To: <{ours}>\r\nReferences: {refs}\r\n"
    asks = rng.choice(
        (
            "Could you send pricing for 40 seats and a demo slot next week?",
            "Interesting. What does the rollout look like for a team of our size?",
            "We are evaluating vendors this quarter; happy to talk on Thursday.",
        )
    )
    head = (
        f"From: {name} <{sender}>\r\nTo: {to}\r\nSubject: Re: Welcome, step 2\r\n"
        f"Date: {_date(at)}\r\nMessage-ID: <r{n}.{rng.getrandbits(40):x}@mail.example.net>\r\n"
        f"{threading_}MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n"
        "Content-Transfer-Encoding: 8bit\r\n\r\n"
        f"Hi,\r\n\r\n{asks} {_sentence(rng, 25)}\r\n\r\nBest,\r\n{name}\r\n\r\n"
        f"On {_date(at - timedelta(days=1))}, Acme Sales <{SENDER}> wrote:\r\n"
    )
    return (head + _pad(rng, 4096, 8192, len(head))).encode()


def auto_reply(rng: random.Random, n: int, lead: BenchLead, at: datetime) -> bytes:
    """An Exchange-style out-of-office with a return date, threaded to our mail."""
    back = (at + timedelta(days=rng.randint(2, 20))).strftime("%B %d, %Y")
    head = (
        f"From: {lead.name} <{lead.email}>\r\nTo: sales+{lead.token}@{SENDER_DOMAIN}\r\n"
        f"Subject: Automatic reply: Welcome, step 2\r\nDate: {_date(at)}\r\n"
        f"Message-ID: <ooo{n}.{rng.getrandbits(40):x}@mail.example.net>\r\n"
        f"In-Reply-To: <{lead.message_ids[-1]}>\r\nAuto-Submitted: auto-replied\r\n"
        "X-Auto-Response-Suppress: All\r\nMIME-Version: 1.0\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n\r\n"
        f"Thank you for your email. I am out of the office until {back} with limited "
        "access to email. For urgent matters please contact reception.\r\n\r\n"
    )
    filler = "This mailbox is monitored on working days only; replies may take a while.\r\n"
    return (head + filler * ((rng.randint(4096, 8192) - len(head)) // len(filler))).encode()


def bounce(rng: random.Random, n: int, lead: BenchLead, at: datetime) -> bytes:
    """A Postfix RFC 3464 report returning our headers: mostly soft (mailbox full)."""
    hard = rng.random() < 0.25
    status, diag = (
        ("5.1.1", "550 5.1.1 User unknown") if hard else ("4.2.2", "452 4.2.2 Mailbox full")
    )
    head = (
        "From: MAILER-DAEMON@mx.example.net (Mail Delivery System)\r\n"
        f"To: sales+{lead.token}@{SENDER_DOMAIN}\r\n"
        "Subject: Undelivered Mail Returned to Sender\r\n"
        f"Date: {_date(at)}\r\nMessage-ID: <dsn{n}.{rng.getrandbits(40):x}@mx.example.net>\r\n"
        "Auto-Submitted: auto-replied\r\nMIME-Version: 1.0\r\n"
        'Content-Type: multipart/report; report-type=delivery-status; boundary="B"\r\n\r\n'
        "--B\r\nContent-Type: text/plain\r\n\r\n"
        "This is the mail system at host mx.example.net.\r\n\r\n"
        "I'm sorry to have to inform you that your message could not\r\n"
        f"be delivered to one or more recipients.\r\n\r\n<{lead.email}>: {diag}\r\n\r\n"
    )
    tail = (
        "\r\n--B\r\nContent-Type: message/delivery-status\r\n\r\n"
        "Reporting-MTA: dns; mx.example.net\r\n\r\n"
        f"Final-Recipient: rfc822; {lead.email}\r\nAction: failed\r\nStatus: {status}\r\n"
        f"Diagnostic-Code: smtp; {diag}\r\n\r\n"
        "--B\r\nContent-Type: text/rfc822-headers\r\n\r\n"
        f"From: Acme Sales <{SENDER}>\r\nTo: {lead.email}\r\nSubject: Welcome, step 2\r\n"
        f"Message-ID: <{lead.message_ids[-1]}>\r\n\r\n--B--\r\n"
    )
    log = "Transcript: the remote server answered after DATA; delivery was retried.\r\n"
    room = rng.randint(4096, 8192) - len(head) - len(tail)
    return (head + log * max(1, room // len(log)) + tail).encode()


def newsletter(rng: random.Random, n: int, at: datetime) -> bytes:
    """List mail to the sales mailbox (List-Id, Precedence: bulk)."""
    head = (
        "From: Growth Weekly <news@growthweekly.example.org>\r\n"
        f"To: {SENDER}\r\nSubject: Issue {n}: five pipeline ideas\r\nDate: {_date(at)}\r\n"
        f"Message-ID: <nl{n}.{rng.getrandbits(40):x}@growthweekly.example.org>\r\n"
        "List-Id: Growth Weekly <weekly.growthweekly.example.org>\r\n"
        "List-Unsubscribe: <https://growthweekly.example.org/u/123>\r\nPrecedence: bulk\r\n"
        "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n"
    )
    line = _sentence(rng, 12) + "\r\n"
    return (head + line * max(1, (rng.randint(4096, 8192) - len(head)) // len(line))).encode()


MIX = (
    ("reply_token", 0.40),
    ("reply_message_id", 0.15),
    ("reply_sender", 0.08),
    ("reply_unknown", 0.05),
    ("auto_reply", 0.15),
    ("bounce", 0.08),
    ("newsletter", 0.09),
)


def inbound_mix(n: int, leads: Sequence[BenchLead], seed: int = 7) -> Iterator[bytes]:
    """`n` messages in the MIX proportions (shuffled, reproducible), about 4–8 KB each."""
    rng = random.Random(seed)
    kinds = [k for k, _ in MIX]
    weights = [w for _, w in MIX]
    at = datetime.now(UTC) - timedelta(hours=1)
    for i in range(n):
        kind = rng.choices(kinds, weights)[0]
        lead = leads[rng.randrange(len(leads))]
        if kind.startswith("reply_"):
            sig = kind.removeprefix("reply_")
            yield human_reply(rng, i, None if sig == "unknown" else lead, signal=sig, at=at)
        elif kind == "auto_reply":
            yield auto_reply(rng, i, lead, at)
        elif kind == "bounce":
            yield bounce(rng, i, lead, at)
        else:
            yield newsletter(rng, i, at)


def append_all(server: Any, user: str, messages: Iterator[bytes], chunk: int = 200) -> int:
    """APPEND every message with one connection (MULTIAPPEND, `chunk` at a time)."""
    count = 0
    with server.client(user) as c:
        buf: list[bytes] = []
        for raw in messages:
            buf.append(raw)
            if len(buf) == chunk:
                c.multiappend("INBOX", buf)
                count += len(buf)
                buf = []
        if buf:
            c.multiappend("INBOX", buf)
            count += len(buf)
    return count


def emit(result: dict[str, Any], as_json: bool, lines: list[str]) -> None:
    """Print the JSON object, or the human-readable lines."""
    if as_json:
        print(json.dumps(result, indent=2))
    else:
        print("\n".join(lines))


def smtp_sink(handler: Any) -> Any:
    """An aiosmtpd server on 127.0.0.1 and a free port, started; `.port`, `.stop()`."""
    from aiosmtpd.controller import Controller

    class _Ctl(Controller):
        def _trigger_server(self) -> None:
            # Port 0 asks the OS for a free port; learn which before probing it.
            assert isinstance(self.server, asyncio.Server)
            self.port = self.server.sockets[0].getsockname()[1]
            super()._trigger_server()  # type: ignore[no-untyped-call]

    ctl = _Ctl(handler, hostname="127.0.0.1", port=0)
    ctl.start()
    return ctl
