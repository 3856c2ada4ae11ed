"""Reply latency: a reply APPENDed to the mailbox -> the rep's handoff accepted by SMTP.

Setup: a throwaway Dovecot and an aiosmtpd server on 127.0.0.1, `--mailboxes` IMAP
mailboxes with `--folders` folders each (INBOX, Replies1, …), a SQLite database with one
lead per reply (each already sent two nurture steps), and one `twoway run` started as a
subprocess holding every mailbox (IDLE on every folder), exactly as a user runs it.

Timed: replies are APPENDed one at a time, spread round-robin over every folder of every
mailbox (sent to the lead's reply-token address); for each, the time from just before
the APPEND to the moment the SMTP server has accepted the handoff email to a rep.
p50/p95/max are printed overall and per folder (target: p95 < 1 s on every folder). At
the end every replying lead must be a prospect in the database.

Baseline, same run, same server, same APPENDs: a plain imapclient client in IDLE on each
folder records when the server's EXISTS for each APPEND reaches it. That is the floor
any IDLE-based worker sits on; the ratio is twoway p50 / IDLE p50.

    .venv/bin/python bench/bench_latency.py [-n 200] [--mailboxes 3] [--folders 2]
        [--gap 0.3] [--json]
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (
    REPS,
    ROOT,
    base_config,
    build_lead_database,
    dovecot,
    emit,
    human_reply,
    smtp_sink,
)

TARGET_P95_S = 1.0


class _Recorder:
    """aiosmtpd handler: notes when each handoff to a rep was accepted."""

    def __init__(self) -> None:
        self.reps = {e for _, e in REPS}
        self.handoffs: list[float] = []
        self.other = 0
        self.event = threading.Event()

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        now = time.monotonic()
        if any(r.lower() in self.reps for r in envelope.rcpt_tos):
            self.handoffs.append(now)
            self.event.set()
        else:
            self.other += 1
        return "250 2.0.0 OK"


def _smtp_server(handler: _Recorder) -> Any:
    return smtp_sink(handler)


class _IdleWatcher(threading.Thread):
    """The baseline: a plain imapclient IDLE session noting the time of each EXISTS."""

    def __init__(self, server: Any, user: str, folder: str = "INBOX") -> None:
        super().__init__(daemon=True)
        self.client = server.client(user)
        self.client.select_folder(folder, readonly=True)
        self.seen: dict[int, float] = {}
        self.stop = threading.Event()
        self.ready = threading.Event()

    def run(self) -> None:
        c = self.client
        c.idle()
        self.ready.set()
        started = time.monotonic()
        while not self.stop.is_set():
            for resp in c.idle_check(timeout=0.5):
                if len(resp) == 2 and resp[1] == b"EXISTS" and isinstance(resp[0], int):
                    self.seen.setdefault(resp[0], time.monotonic())
            if time.monotonic() - started > 600:  # renew well within the 29-minute rule
                c.idle_done()
                c.idle()
                started = time.monotonic()
        c.idle_done()
        c.logout()


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def _stats(values: list[float]) -> dict[str, float]:
    return {
        "p50_s": round(statistics.median(values), 3),
        "p95_s": round(_pct(values, 0.95), 3),
        "max_s": round(max(values), 3),
        "mean_s": round(statistics.fmean(values), 3),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("-n", "--replies", type=int, default=200)
    ap.add_argument(
        "--gap", type=float, default=0.3, help="seconds between a handoff and the next APPEND"
    )
    ap.add_argument("--timeout", type=float, default=30, help="give up on one reply after this")
    ap.add_argument("--mailboxes", type=int, default=3)
    ap.add_argument("--folders", type=int, default=2, help="per mailbox: INBOX, Replies1, …")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="twoway-bench-latency-"))
    recorder = _Recorder()
    smtp = _smtp_server(recorder)
    worker: subprocess.Popen[bytes] | None = None
    latencies: list[float] = []
    idle_latencies: list[float] = []
    missed = 0
    per_place: dict[tuple[str, str], list[float]] = {}
    try:
        db = work / "twoway.db"
        leads = build_lead_database(f"sqlite:///{db}", args.replies)
        with dovecot() as server:
            users = [server.fresh_user() for _ in range(args.mailboxes)]
            folders = ["INBOX"] + [f"Replies{k}" for k in range(1, args.folders)]
            for user in users:
                for folder in folders[1:]:
                    server.create_folder(user, folder)
            data = base_config(
                f"sqlite:///{db}",
                mailboxes=[
                    {
                        "name": "sales" if j == 0 else f"team{j}", "kind": "imap",
                        "host": "127.0.0.1", "port": server.port, "security": "none",
                        "username": user, "password": "${BENCH_IMAP_PASSWORD}",
                        "address": "sales@acme.example" if j == 0 else f"team{j}@acme.example",
                        "folders": folders, "idle": True, "poll_interval": 60,
                    }
                    for j, user in enumerate(users)
                ],
                smtp={"kind": "smtp", "host": "127.0.0.1", "port": smtp.port, "security": "none"},
            )  # fmt: skip
            cfg = work / "twoway.yaml"
            cfg.write_text(yaml.safe_dump(data, sort_keys=False))
            env = {**os.environ, "BENCH_IMAP_PASSWORD": server.users[users[0]]}
            env.pop("TWOWAY_NOW", None)
            log = (work / "worker.log").open("wb")
            worker = subprocess.Popen(
                [sys.executable, "-m", "worker", "--config", str(cfg), "run",
                 "--log-format", "json"],
                cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip
            places = [(u, f) for u in users for f in folders]
            watchers = {p: _IdleWatcher(server, *p) for p in places}
            for w in watchers.values():
                w.start()
                w.ready.wait(10)
            time.sleep(5)  # the worker's first pass (nothing due) and its IDLE watchers
            rng = random.Random(3)
            appenders = {u: server.client(u) for u in users}
            counts = dict.fromkeys(places, 0)
            for i, lead in enumerate(leads):
                place = places[i % len(places)]
                raw = human_reply(rng, i, lead, signal="token", at=datetime.now(UTC))
                recorder.event.clear()
                before = len(recorder.handoffs)
                t0 = time.monotonic()
                appenders[place[0]].append(place[1], raw)
                counts[place] += 1
                deadline = t0 + args.timeout
                while len(recorder.handoffs) == before and time.monotonic() < deadline:
                    recorder.event.wait(0.05)
                if len(recorder.handoffs) == before:
                    missed += 1
                else:
                    latencies.append(recorder.handoffs[before] - t0)
                    per_place.setdefault(place, []).append(recorder.handoffs[before] - t0)
                seen = watchers[place].seen.get(counts[place])
                if seen is not None:
                    idle_latencies.append(seen - t0)
                if worker.poll() is not None:
                    raise SystemExit("twoway run exited; see its log:\n" + _tail(work))
                time.sleep(args.gap)
            for a in appenders.values():
                a.logout()
            for w in watchers.values():
                w.stop.set()
            for w in watchers.values():
                w.join(5)
            prospects = _prospects(db)
    finally:
        if worker is not None and worker.poll() is None:
            worker.terminate()
            try:
                worker.wait(15)
            except subprocess.TimeoutExpired:
                worker.kill()
                worker.wait(5)
        smtp.stop()
        shutil.rmtree(work, ignore_errors=True)

    if not latencies or not idle_latencies:
        raise SystemExit("no latency measured")
    twoway = _stats(latencies)
    idle = _stats(idle_latencies)
    folder_stats = {
        f"mailbox{users.index(u)}/{f}": _stats(v) for (u, f), v in sorted(per_place.items())
    }
    worst_p95 = max(st["p95_s"] for st in folder_stats.values())
    result: dict[str, Any] = {
        "replies": args.replies,
        "mailboxes": args.mailboxes,
        "folders_per_mailbox": args.folders,
        "per_folder": folder_stats,
        "worst_folder_p95_s": worst_p95,
        "handoffs": len(latencies),
        "missed": missed,
        "prospects_in_db": prospects,
        "twoway_append_to_handoff": twoway,
        "plain_idle_append_to_exists": idle,
        "ratio_p50_twoway_vs_idle": round(twoway["p50_s"] / idle["p50_s"], 3),
        "ratio_p95_twoway_vs_idle": round(twoway["p95_s"] / idle["p95_s"], 3),
        "target_p95_s": TARGET_P95_S,
        "target_met": worst_p95 < TARGET_P95_S and missed == 0,
    }
    lines = [
        f"{args.replies} replies, one at a time, over {args.mailboxes} mailboxes x "
        f"{args.folders} folders; {len(latencies)} handoffs, {missed} missed, "
        f"{prospects} prospects in the database",
        "  APPEND -> handoff accepted by SMTP (twoway run): "
        f"p50 {twoway['p50_s']} s  p95 {twoway['p95_s']} s  max {twoway['max_s']} s",
        "  APPEND -> EXISTS seen by a plain IDLE client:  "
        f"p50 {idle['p50_s']} s  p95 {idle['p95_s']} s  max {idle['max_s']} s",
        f"  ratio p50 twoway/IDLE {result['ratio_p50_twoway_vs_idle']}, "
        f"p95 {result['ratio_p95_twoway_vs_idle']}; target p95 < {TARGET_P95_S} s on every "
        f"folder (worst {worst_p95} s): " + ("met" if result["target_met"] else "NOT met"),
        *(f"    {k}: p50 {v['p50_s']} s  p95 {v['p95_s']} s  max {v['max_s']} s"
          for k, v in folder_stats.items()),
    ]  # fmt: skip
    emit(result, args.json, lines)
    return 0


def _prospects(db: Path) -> int:
    import sqlite3

    with sqlite3.connect(db) as conn:
        row = conn.execute("SELECT count(*) FROM leads WHERE status = 'prospect'").fetchone()
    return int(row[0])


def _tail(work: Path) -> str:
    try:
        return (work / "worker.log").read_text(errors="replace")[-3000:]
    except OSError:
        return ""


if __name__ == "__main__":
    sys.exit(main())
