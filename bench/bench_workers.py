"""Scale-out: total throughput of 1, 2 and 4 `twoway run` processes on one PostgreSQL.

Setup, once: a throwaway PostgreSQL, a throwaway Dovecot and an aiosmtpd sink on
127.0.0.1. Then, for each worker count, from scratch: a new database, four new Dovecot
mailboxes, and this workload:

- `--leads` leads (default 2,000) enrolled in a one-step campaign, due now: the nurture
  sends;
- `--replies` further leads (default 1,000), each already sent one nurture email (a sent
  outbox row with its Message-ID), and one genuine reply from each, threaded to that
  email and addressed to the lead's reply-token address, spread evenly over the four
  mailboxes (APPENDed before the workers start). Each reply promotes its lead once: a
  handoff to a rep with its reply-ready copy, and an in-thread follow-up to the lead.

Timed: from starting the worker processes (`twoway run --log-format json`, real daemons,
`workers.lease_seconds: 10`, `poll_interval: 1`) until the database shows everything
settled: every nurture, handoff, reply-ready copy and follow-up `sent`, nothing queued or
sending, and one inbound row per reply. Messages handled = replies read + emails sent.
The speed-up is against the one-worker run of the same invocation. The time until the
mailbox leases are balanced (each worker holding its fair share) is watched too.

Checked in every run: no Message-ID arrived twice at the SMTP sink, the sink got exactly
the emails the database says were sent, inbound rows == replies, every replier a prospect.

    .venv/bin/python bench/bench_workers.py [--leads 2000] [--replies 1000]
        [--workers 1 2 4] [--timeout 600] [--json]

Expect little gain past two workers on a two-core machine: the workers, PostgreSQL,
Dovecot and the SMTP sink all share the same cores.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.parser import BytesHeaderParser
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (
    REPS,
    ROOT,
    SENDER,
    SENDER_DOMAIN,
    BenchLead,
    append_all,
    base_config,
    dovecot,
    emit,
    human_reply,
    lead_email,
    machine,
    scratch_pg_database,
    smtp_sink,
    throwaway_postgres,
)

MAILBOXES = 4
LEASE_SECONDS = 10
POLL_SECONDS = 0.25


# --- the SMTP sink ---------------------------------------------------------------------


class _Sink:
    """aiosmtpd handler: keeps the Message-ID and recipients of every accepted email."""

    def __init__(self) -> None:
        self.received: list[tuple[str, tuple[str, ...]]] = []
        self._headers = BytesHeaderParser()

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        headers = self._headers.parsebytes(envelope.original_content or b"")
        self.received.append((str(headers.get("Message-ID", "")), tuple(envelope.rcpt_tos)))
        return "250 2.0.0 OK"


def _smtp_server(handler: _Sink) -> Any:
    return smtp_sink(handler)


# --- one run ---------------------------------------------------------------------------


@dataclass
class _Run:
    """What one worker count measured."""

    workers: int
    seconds: float = 0.0
    balanced_s: float | None = None
    inbound_done_s: float | None = None
    nurture_done_s: float | None = None
    settled: bool = False
    counts: dict[str, int] = field(default_factory=dict)
    checks: dict[str, Any] = field(default_factory=dict)
    cpu: dict[str, Any] = field(default_factory=dict)
    sends_per_worker: list[int] = field(default_factory=list)

    @property
    def handled(self) -> int:
        return self.counts.get("inbound", 0) + self.counts.get("sent", 0)

    def as_json(self, baseline: _Run | None) -> dict[str, Any]:
        rate = self.handled / self.seconds if self.seconds else 0.0
        base = baseline.handled / baseline.seconds if baseline and baseline.seconds else 0.0
        return {
            "workers": self.workers,
            "settled": self.settled,
            "seconds": round(self.seconds, 2),
            "messages": self.handled,
            "msgs_per_s": round(rate, 1),
            "speedup_vs_1": round(rate / base, 2) if base else None,
            "balanced_after_s": None if self.balanced_s is None else round(self.balanced_s, 1),
            "all_replies_read_after_s": _round(self.inbound_done_s),
            "all_nurture_sent_after_s": _round(self.nurture_done_s),
            "counts": self.counts,
            "sends_per_worker": self.sends_per_worker,
            "cpu": self.cpu,
            "checks": self.checks,
        }


def _config(imap_port: int, users: list[tuple[str, str]], smtp_port: int) -> dict[str, Any]:
    one_step = [
        {"name": "welcome", "send_window": None, "steps": [{"template": "nurture/welcome"}]}
    ]
    mailboxes = [
        {
            "name": f"box{i}", "kind": "imap", "host": "127.0.0.1", "port": imap_port,
            "security": "none", "username": user, "password": password, "idle": True,
            "poll_interval": 1, "address": SENDER,
        }
        for i, (user, password) in enumerate(users)
    ]  # fmt: skip
    return base_config(
        "sqlite:///unused.db",  # TWOWAY_DATABASE_URL gives the PostgreSQL one
        campaigns=one_step,
        mailboxes=mailboxes,
        smtp={"kind": "smtp", "host": "127.0.0.1", "port": smtp_port, "security": "none"},
        handoff={"follow_up": {"template": "followup/thanks", "delay": "0h", "from": "rep"}},
        workers={"lease_seconds": LEASE_SECONDS},
    )


def _seed(cfg: Path, env: dict[str, str], leads: int, replies: int) -> list[BenchLead]:
    """Leads 0..leads-1 enrolled and due now; the next `replies` leads each already sent
    one nurture email (their replies thread to it). Returns the replying leads."""
    from sqlalchemy import insert, select

    from worker.app import App
    from worker.compose import new_message_id
    from worker.config import load_config
    from worker.leads import import_leads
    from worker.models import Lead, OutboundMessage

    config = load_config(cfg, env=env)
    now = datetime.now(UTC)
    app = App.open(config, lambda: now)
    rows_in: list[tuple[int, dict[str, str | None]]] = [
        (i + 2, {"email": lead_email(i), "first_name": f"Lead{i}"}) for i in range(leads + replies)
    ]
    enrolled, repliers = rows_in[:leads], rows_in[leads:]
    with app.transaction() as s:
        import_leads(s, enrolled, now, campaign=config.campaign("welcome"))
        import_leads(s, repliers, now)
    out: list[BenchLead] = []
    sent = now - timedelta(days=1)
    with app.transaction() as s:
        emails = {str(r[1]["email"]) for r in repliers}
        rows: list[dict[str, Any]] = []
        for lead_id, email, token in s.execute(
            select(Lead.id, Lead.email, Lead.reply_token).order_by(Lead.id)
        ).all():
            if email not in emails:
                continue
            mid = new_message_id(SENDER_DOMAIN)
            rows.append(
                {
                    "idempotency_key": f"bench:{lead_id}", "kind": "nurture", "lead_id": lead_id,
                    "campaign": "welcome", "step": 0, "template": "nurture/welcome",
                    "message_id": mid, "reply_token": token, "to_addr": email,
                    "subject": "Welcome", "status": "sent", "attempts": 1,
                    "next_attempt_at": sent, "context": {}, "created_at": sent, "sent_at": sent,
                }
            )  # fmt: skip
            out.append(BenchLead(email, email.split("@")[0].title(), token, (mid,)))
        s.execute(insert(OutboundMessage), rows)
    app.close()
    return out


def _cpu_busy() -> tuple[int, int]:
    """(busy, total) jiffies of the whole machine, from /proc/stat."""
    with open("/proc/stat") as f:
        parts = [int(x) for x in f.readline().split()[1:]]
    idle = parts[3] + parts[4]  # idle + iowait
    return sum(parts) - idle, sum(parts)


def _sends_in_log(path: Path) -> int:
    """Emails this worker sent, summed from its `sent N message(s)` log lines."""
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        with contextlib.suppress(json.JSONDecodeError, ValueError, IndexError):
            msg = str(json.loads(line).get("message", ""))
            if msg.startswith("sent ") and msg.endswith("message(s)"):
                total += int(msg.split()[1])
    return total


def _stop(proc: subprocess.Popen[bytes]) -> tuple[int, float]:
    """SIGTERM, wait (SIGKILL after 20 s); returns (exit code, CPU seconds it used)."""
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 20
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            proc.returncode = os.waitstatus_to_exitcode(status)
            return proc.returncode, usage.ru_utime + usage.ru_stime
        if time.monotonic() > deadline:
            proc.kill()
            _pid, status, usage = os.wait4(proc.pid, 0)
            proc.returncode = os.waitstatus_to_exitcode(status)
            return proc.returncode, usage.ru_utime + usage.ru_stime
        time.sleep(0.1)


def run_workers(
    n: int,
    *,
    pg_url: str,
    imap: Any,
    sink: _Sink,
    smtp_port: int,
    leads: int,
    replies: int,
    timeout: float,
    work: Path,
) -> _Run:
    """One measured run with `n` worker processes, on a fresh database and mailboxes."""
    from sqlalchemy import create_engine, func, select

    from worker.models import InboundMessage, Lead, MailboxLease, OutboundMessage

    run = _Run(workers=n)
    users = [imap.fresh_user() for _ in range(MAILBOXES)]
    rng = random.Random(n)
    with scratch_pg_database(pg_url, f"bench_workers_{n}") as url:
        cfg = work / f"twoway-{n}.yaml"
        cfg.write_text(
            yaml.safe_dump(
                _config(imap.port, [(u, imap.users[u]) for u in users], smtp_port),
                sort_keys=False,
            )
        )
        env = {**os.environ, "TWOWAY_DATABASE_URL": url}
        env.pop("TWOWAY_NOW", None)
        repliers = _seed(cfg, env, leads, replies)
        at = datetime.now(UTC) - timedelta(minutes=5)
        for b, user in enumerate(users):
            mine = repliers[b::MAILBOXES]
            msgs = (
                human_reply(rng, b * replies + i, lead, signal="token", at=at)
                for i, lead in enumerate(mine)
            )
            append_all(imap, user, msgs)
        sink.received.clear()
        # Each reply: the rep's briefing, its reply-ready copy and the in-thread follow-up.
        expected_sent = leads + 3 * replies
        engine = create_engine(url)

        def scalar(q: Any) -> int:
            with engine.connect() as c:
                return int(c.execute(q).scalar() or 0)

        def balanced() -> bool:
            with engine.connect() as c:
                held = Counter(c.execute(select(MailboxLease.holder)).scalars())
            fair = -(-MAILBOXES // n)
            return (
                sum(held.values()) == MAILBOXES
                and len(held) == min(n, MAILBOXES)
                and max(held.values()) <= fair
            )

        def settled(now: float) -> bool:
            read = scalar(select(func.count()).select_from(InboundMessage)) >= replies
            if read and run.inbound_done_s is None:
                run.inbound_done_s = now
            nurture = OutboundMessage.kind == "nurture", OutboundMessage.status == "sent"
            if run.nurture_done_s is None and scalar(select(func.count()).where(*nurture)) >= (
                leads + replies
            ):
                run.nurture_done_s = now
            open_ = OutboundMessage.status.in_(("queued", "sending"))
            return (
                read
                and scalar(select(func.count()).where(open_)) == 0
                and scalar(
                    select(func.count()).where(
                        OutboundMessage.status == "sent", OutboundMessage.sent_at >= at
                    )
                )
                >= expected_sent
            )

        cmd = [sys.executable, "-m", "worker", "--config", str(cfg), "run", "--log-format", "json"]
        logs = [work / f"worker-{n}-{i}.log" for i in range(n)]
        procs: list[subprocess.Popen[bytes]] = []
        busy0, total0 = _cpu_busy()
        t0 = time.monotonic()
        try:
            for path in logs:
                with path.open("wb") as log:
                    procs.append(
                        subprocess.Popen(
                            cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT
                        )
                    )
            deadline = t0 + timeout
            while time.monotonic() < deadline:
                now = time.monotonic() - t0
                if n > 1 and run.balanced_s is None and balanced():
                    run.balanced_s = now
                if settled(now):
                    run.settled = True
                    break
                if any(p.poll() is not None for p in procs):
                    raise SystemExit(f"a worker exited early; see {work}:\n{_tail(logs)}")
                time.sleep(POLL_SECONDS)
            run.seconds = time.monotonic() - t0
            busy1, total1 = _cpu_busy()
            while n > 1 and run.balanced_s is None and time.monotonic() - t0 < 6 * LEASE_SECONDS:
                if balanced():  # the work finished first; still say when it balanced
                    run.balanced_s = time.monotonic() - t0
                time.sleep(POLL_SECONDS)
        finally:
            stopped = [_stop(p) for p in procs]
        run.cpu = {
            "machine_busy_pct": round(100 * (busy1 - busy0) / max(total1 - total0, 1), 1),
            "worker_cpu_s": [round(c, 1) for _rc, c in stopped],
        }
        run.sends_per_worker = [_sends_in_log(p) for p in logs]

        with engine.connect() as c:
            statuses = Counter(
                f"{k}:{st}"
                for k, st in c.execute(select(OutboundMessage.kind, OutboundMessage.status))
            )
            inbound = int(c.execute(select(func.count()).select_from(InboundMessage)).scalar() or 0)
            prospects = int(
                c.execute(select(func.count()).where(Lead.status == "prospect")).scalar() or 0
            )
        engine.dispose()

    ids = Counter(mid for mid, _rcpts in sink.received)
    reps = {e for _n, e in REPS}
    per_kind_sent = {
        k: statuses[f"{k}:sent"] for k in ("nurture", "handoff", "rep_copy", "followup")
    }
    per_kind_sent["nurture"] -= replies  # the seeded, already-sent rows
    run.counts = {
        "inbound": inbound,
        "sent": sum(per_kind_sent.values()),
        **{f"sent_{k}": v for k, v in per_kind_sent.items()},
        "at_smtp_sink": len(sink.received),
    }
    run.checks = {
        "duplicate_message_ids_at_sink": sum(c - 1 for c in ids.values() if c > 1),
        "sink_equals_db_sent": len(sink.received) == run.counts["sent"],
        "inbound_equals_replies": inbound == replies,
        "prospects_equal_replies": prospects == replies,
        "handoffs_to_reps_at_sink": sum(1 for _m, r in sink.received if reps & set(r)),
        "other_statuses": {k: v for k, v in statuses.items() if not k.endswith(":sent")},
        "worker_exit_codes": [rc for rc, _c in stopped],
    }
    run.checks["ok"] = (
        run.settled
        and run.checks["duplicate_message_ids_at_sink"] == 0
        and run.checks["sink_equals_db_sent"]
        and run.checks["inbound_equals_replies"]
        and run.checks["prospects_equal_replies"]
        and run.counts["sent"] == leads + 3 * replies
        and not run.checks["other_statuses"]
        and all(rc == 0 for rc, _c in stopped)
    )
    return run


def _round(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds, 1)


def _tail(logs: list[Path]) -> str:
    return "\n".join(p.read_text(errors="replace")[-1500:] for p in logs if p.exists())


# --- main ------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--leads", type=int, default=2000, help="enrolled leads (nurture sends)")
    ap.add_argument("--replies", type=int, default=1000, help="replies, one per lead")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--timeout", type=float, default=600, help="per run, seconds")
    ap.add_argument("--pg-port", type=int, default=15498, help="for the throwaway PostgreSQL")
    ap.add_argument("--keep", action="store_true", help="keep the config and worker logs")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    counts = sorted(set(args.workers))
    if counts[0] != 1:
        counts.insert(0, 1)  # the baseline of the speed-up

    work = Path(tempfile.mkdtemp(prefix="twoway-bench-workers-"))
    sink = _Sink()
    smtp = _smtp_server(sink)
    runs: list[_Run] = []
    try:
        with throwaway_postgres(args.pg_port) as pg_url, dovecot() as imap:
            for n in counts:
                runs.append(
                    run_workers(
                        n, pg_url=pg_url, imap=imap, sink=sink, smtp_port=smtp.port,
                        leads=args.leads, replies=args.replies, timeout=args.timeout, work=work,
                    )
                )  # fmt: skip
    finally:
        smtp.stop()
        if args.keep:
            print(f"worker logs and configs kept in {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)

    base = runs[0]
    rows = [r.as_json(base) for r in runs]
    result: dict[str, Any] = {
        "leads": args.leads,
        "replies": args.replies,
        "mailboxes": MAILBOXES,
        "lease_seconds": LEASE_SECONDS,
        "nproc": machine()["nproc"],
        "runs": rows,
        "all_checks_ok": all(r.checks["ok"] for r in runs),
    }
    lines = [
        f"{args.leads} nurture sends + {args.replies} replies (each: handoff + follow-up) "
        f"over {MAILBOXES} mailboxes, {result['nproc']} CPU(s); times from worker start",
        f"{'workers':>7} {'seconds':>8} {'messages':>9} {'msg/s':>7} {'speed-up':>8} "
        f"{'replies read':>12} {'nurture sent':>12} {'balanced':>9} {'CPU busy':>8}  "
        "sends per worker   checks",
    ]

    def s_(x: float | None) -> str:
        return "—" if x is None else f"{x} s"

    for r in rows:
        lines.append(
            f"{r['workers']:>7} {r['seconds']:>8} {r['messages']:>9} {r['msgs_per_s']:>7} "
            f"{r['speedup_vs_1']!s:>8} {s_(r['all_replies_read_after_s']):>12} "
            f"{s_(r['all_nurture_sent_after_s']):>12} {s_(r['balanced_after_s']):>9} "
            f"{r['cpu']['machine_busy_pct']:>7}%  "
            f"{'/'.join(map(str, r['sends_per_worker'])):<17}  "
            + ("ok" if r["checks"]["ok"] else f"FAILED {r['checks']}")
        )
    emit(result, args.json, lines)
    return 0 if result["all_checks_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
