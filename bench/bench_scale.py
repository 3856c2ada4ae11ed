"""Scale: the same inbound mail against 1,000, 200,000 and 1,000,000 leads.

Setup (not timed): a throwaway Dovecot on 127.0.0.1 holding N generated messages (the
benches' usual mix: human replies matched by token, Message-ID or sender, strangers,
out-of-office replies, DSN bounces, newsletters, 4-8 KB each), and for every size a
database of that many leads, all enrolled in a campaign with 5 nurture emails sent each,
with realistic company domains: 2 % of the leads work at 5 large employers, the others
at small companies of about four. Lead i has the same address, reply token and
Message-IDs in every database, and the messages concern leads among the first 1,000,
so every size reads exactly the same mail.

Timed, each in its own subprocess (its peak RSS is its own):

- full, per size and database: `Worker(app).run_once()` over the mailbox (a fresh copy
  of the SQLite database; the PostgreSQL schema as built), with every SQL statement
  counted; the parsing pool's process is started before the clock starts, as the daemon
  starts it once at start (the CPU of its start, read from /proc, is left out of the
  pool's figure: about a second, 0.2 ms a message at 5,000);
- ceiling: twoway's own fetch (`ImapSource.fetch_new`) + `parse` + `classify`, no
  database: the most any database work could leave;
- plain-parse: imapclient SEARCH ALL + FETCH BODY.PEEK[] by 500 + mail-parser on each
  (the yardstick of bench_inbound.py).

Prints per case messages/s, wall and CPU ms and SQL statements per message and peak
RSS (the worker's; with the parsing pool, the pool process's CPU and peak RSS beside
it, from RUSAGE_CHILDREN once the pool is joined); the CPU cost per message of each
size against the fewest leads on the same database (target <= 1.5); and the fewest-lead
SQLite and PostgreSQL rates against the ceiling (target >= 0.8) and the plain loop
(targets >= 0.25 SQLite, >= 0.15 PostgreSQL), by msg/s and by CPU per message (all of
twoway's processes; PostgreSQL's and Dovecot's CPU is not in it). The machine these run
on is shared and loaded, so wall time mostly measures the other processes; the load
average is printed with the figures.

`--rounds N` runs the ceiling and the fewest-lead SQLite worker N times each, one after
the other, and takes the best of each (the rounds' ratios are printed too): on a shared
machine a single pair can land in a slow spell on one side.

`--in-process` also runs the fewest leads with `workers.parse_processes: 0`, and
`--baseline-src DIR` with the worker of another checkout (e.g. `git worktree add DIR
main`): before/after in the same run, on the same mail and database.

    .venv/bin/python bench/bench_scale.py [-n 5000] [--sizes 1000,200000,1000000]
        [--pg-url URL | --no-pg] [--pg-sizes ...] [--parse-processes N] [--in-process]
        [--baseline-src DIR] [--rounds N] [--json]

`--pg-url` defaults to $TWOWAY_TEST_PG_URL; each size gets its own schema, dropped after.
Databases are bulk-loaded (indexes dropped, rows by COPY or large executemany, indexes
rebuilt): 1,000,000 leads take about 7 minutes on PostgreSQL here.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import itertools
import json
import os
import resource
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (
    SENDER,
    SENDER_DOMAIN,
    BenchLead,
    append_all,
    base_config,
    check_child,
    dovecot,
    emit,
    inbound_mix,
    peak_rss_mb,
    run_child,
)

STEPS = 5
TOUCHED = 1000  # the messages concern leads 0..999, present at every size
TARGET_FLAT = 1.5
TARGET_CEILING = 0.8
TARGET_PLAIN_SQLITE, TARGET_PLAIN_PG = 0.25, 0.15
TARGET_RSS_MB = 250.0
CHUNK = 10_000


def domain(i: int) -> str:
    """A few large employers (2 % of all leads), the rest small companies of about 4."""
    if i % 50 == 0:
        return f"bigcorp{(i // 50) % 5}.example.com"
    return f"co{i // 4}.example.net"


def company(i: int) -> str:
    d = domain(i)
    return ("Big Corp " + d[6]) if d.startswith("bigcorp") else f"Company {i // 4}"


def token(i: int) -> str:
    digest = hashlib.sha256(f"lead-{i}".encode()).digest()[:10]
    return base64.b32encode(digest).decode().lower()


def message_id(i: int, step: int) -> str:
    return f"step{step}.lead{i}@{SENDER_DOMAIN}"


def bench_lead(i: int) -> BenchLead:
    return BenchLead(
        f"p{i}@{domain(i)}", f"Person{i}", token(i), tuple(message_id(i, s) for s in range(STEPS))
    )


def _rows(n: int, now: datetime) -> Iterator[tuple[str, list[str], Iterator[tuple[Any, ...]]]]:
    """The rows of every table, as (table, columns, rows) with plain values (naive UTC)."""
    at, later, sent = (
        x.replace(tzinfo=None) for x in (now, now + timedelta(days=3), now - timedelta(days=2))
    )
    yield (
        "leads",
        [
            "id",
            "email",
            "first_name",
            "company",
            "company_key",
            "custom",
            "status",
            "reply_token",
            "domain",
            "created_at",
            "updated_at",
        ],
        (
            (
                i + 1,
                f"p{i}@{domain(i)}",
                f"Person{i}",
                company(i),
                company_key(company(i)),
                "{}",
                "lead",
                token(i),
                domain(i),
                at,
                at,
            )
            for i in range(n)
        ),
    )
    yield (
        "enrollments",
        ["id", "lead_id", "campaign", "step", "state", "next_due", "created_at", "updated_at"],
        ((i + 1, i + 1, "welcome", STEPS, "active", later, at, at) for i in range(n)),
    )
    yield (
        "outbound_messages",
        [
            "idempotency_key",
            "kind",
            "lead_id",
            "enrollment_id",
            "campaign",
            "step",
            "template",
            "message_id",
            "reply_token",
            "to_addr",
            "subject",
            "status",
            "attempts",
            "next_attempt_at",
            "context",
            "created_at",
            "sent_at",
        ],
        (
            (
                f"nurture:{i + 1}:{st}",
                "nurture",
                i + 1,
                i + 1,
                "welcome",
                st,
                "nurture/welcome",
                message_id(i, st),
                token(i),
                f"p{i}@{domain(i)}",
                f"Welcome, step {st + 1}",
                "sent",
                1,
                sent,
                "{}",
                sent,
                sent,
            )
            for i in range(n)
            for st in range(STEPS)
        ),
    )
    yield "lead_events", ["lead_id", "at", "type", "cause", "detail"], (
        (i + 1, at, "created", "import", "{}") for i in range(n))  # fmt: skip


def company_key(name: str) -> str:
    from worker.models import company_key as key

    return key(name) or ""


def _sqlite_value(v: Any) -> Any:
    """SQLAlchemy's SQLite datetime text (microseconds always written: it compares as text)."""
    return v.strftime("%Y-%m-%d %H:%M:%S.%f") if isinstance(v, datetime) else v


def build(url: str, n: int) -> float:
    """Create the schema and `n` leads with enrollments, 5 sent emails and a created event
    each; then refresh the planner's statistics as `leads import` does. Returns seconds.

    Bulk-loaded the way a DBA would: the secondary indexes are dropped first and built
    again after the load (one sort each instead of a million B-tree inserts), rows go in
    by COPY on PostgreSQL and by executemany in transactions of CHUNK rows on SQLite."""
    from sqlalchemy import text

    from worker.app import App
    from worker.config import config_from_dict
    from worker.db import refresh_statistics

    t0 = time.perf_counter()
    now = datetime.now(UTC)
    app = App.open(config_from_dict(base_config(url)), lambda: now)
    pg = app.engine.dialect.name == "postgresql"
    tables = ("leads", "enrollments", "outbound_messages", "lead_events")
    with app.engine.begin() as conn:
        if pg:  # indexes that back no constraint (primary and unique keys stay)
            indexes = conn.execute(
                text(
                    "SELECT i.indexname, i.indexdef FROM pg_indexes i "
                    "WHERE i.schemaname = current_schema() AND i.tablename = ANY(:t) "
                    "AND NOT EXISTS (SELECT 1 FROM pg_constraint c "
                    "WHERE c.conname = i.indexname AND c.connamespace = "
                    "(SELECT oid FROM pg_namespace WHERE nspname = current_schema()))"
                ),
                {"t": list(tables)},
            ).all()
        else:
            indexes = conn.execute(
                text(
                    "SELECT name, sql FROM sqlite_master WHERE type = 'index' "
                    "AND sql IS NOT NULL AND tbl_name IN ({})".format(
                        ",".join(f"'{t}'" for t in tables)
                    )
                )
            ).all()
        for name, _ddl in indexes:
            conn.exec_driver_sql(f'DROP INDEX "{name}"')
    raw = app.engine.raw_connection()
    try:
        cur = raw.cursor()
        if pg:
            cur.execute("SET synchronous_commit = off")
        for table, columns, rows in _rows(n, now):
            if pg:
                with cur.copy(f"COPY {table} ({', '.join(columns)}) FROM STDIN") as copy:
                    for row in rows:
                        copy.write_row(row)
                raw.commit()
                continue
            sql = f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})"
            rows = (tuple(_sqlite_value(v) for v in row) for row in rows)
            while chunk := list(itertools.islice(rows, CHUNK * STEPS)):
                cur.execute("BEGIN")
                cur.executemany(sql, chunk)
                cur.execute("COMMIT")
        cur.close()
    finally:
        raw.close()
    with app.engine.begin() as conn:
        for _name, ddl in indexes:
            conn.exec_driver_sql(ddl)
        if pg:  # the sequences, as import's RETURNING leaves them
            for table in ("leads", "enrollments"):
                conn.exec_driver_sql(
                    f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), {n + 1})"
                )
    refresh_statistics(app.engine)
    if pg:  # as after any bulk load: else autovacuum's insert-triggered VACUUM of millions
        # of new rows runs during the timed run, on the same two cores
        with app.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.exec_driver_sql("VACUUM (ANALYZE) " + ", ".join(tables))
    app.close()
    return time.perf_counter() - t0


# --- the timed sides (children) ------------------------------------------------------------


def _quiet() -> None:
    import logging

    logging.getLogger("mailparser").setLevel(logging.ERROR)


def _mailbox(spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": "sales", "kind": "imap", "host": "127.0.0.1", "port": spec["port"],
        "security": "none", "username": spec["user"], "password": spec["password"],
        "address": SENDER, "timeout": 300, "batch_size": spec["batch_size"],
    }  # fmt: skip


def vm_hwm_mb() -> float:
    """This process's own peak RSS (VmHWM: reset by exec, unlike ru_maxrss, which keeps
    the forking parent's peak)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024, 1)
    return peak_rss_mb()


def child_build(spec: dict[str, Any]) -> dict[str, Any]:
    return {"seconds": build(spec["database"], spec["leads"]), "peak_rss_mb": vm_hwm_mb()}


def child_full(spec: dict[str, Any]) -> dict[str, Any]:
    _quiet()
    from sqlalchemy import event

    from worker.app import App
    from worker.config import clock_from_env, config_from_dict
    from worker.runner import Worker

    data = base_config(spec["database"], mailboxes=[_mailbox(spec)])
    if spec.get("parse_processes") is not None:
        data["workers"] = {"parse_processes": spec["parse_processes"]}
    config = config_from_dict(data, Path(spec["workdir"]) / "twoway.yaml")
    app = App.open(config, clock_from_env({}))
    statements = [0]

    def count(*_args: Any) -> None:
        statements[0] += 1

    event.listen(app.engine, "before_cursor_execute", count)
    worker = Worker(app)
    if hasattr(worker, "start"):  # (a --baseline-src checkout may predate Worker.start)
        worker = worker.start()
    if hasattr(getattr(worker, "preparer", None), "warm"):
        worker.preparer.warm(wait=True)  # as the daemon at start: its pool is up before mail
    from worker import inbound

    if hasattr(inbound, "tune_gc"):
        inbound.tune_gc()  # as `twoway run` does once started
    pool_start = _pool_cpu_so_far(worker)
    started, cpu = time.perf_counter(), time.process_time()
    if spec.get("passes"):  # as the daemon reads a backlog: bounded passes, one after another
        from worker.runner import PASS_LIMIT

        r, errors = inbound.SyncResult(), []
        while True:
            one = worker.run_once(limit=PASS_LIMIT)
            for name in ("processed", "duplicates", "quarantined"):
                setattr(r, name, getattr(r, name) + getattr(one.inbound, name))
            for kind, k in one.inbound.kinds.items():
                r.kinds[kind] = r.kinds.get(kind, 0) + k
            errors += one.errors
            if not one.more:
                break
    else:
        result = worker.run_once()
        r, errors = result.inbound, result.errors
    seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
    worker.close()  # joins the parsing pool's processes: their CPU is in RUSAGE_CHILDREN now
    app.close()
    pool = resource.getrusage(resource.RUSAGE_CHILDREN)
    import worker as package

    return {
        "worker_src": str(Path(package.__file__ or "").parent.parent),
        "pool_cpu_seconds": pool.ru_utime + pool.ru_stime - pool_start,
        "pool_start_cpu_seconds": pool_start,
        "pool_peak_rss_mb": round(pool.ru_maxrss / 1024, 1),
        "messages": r.processed + r.duplicates + r.quarantined,
        "quarantined": r.quarantined,
        "kinds": r.kinds,
        "errors": errors,
        "seconds": seconds,
        "cpu_seconds": cpu,
        "statements": statements[0],
        "peak_rss_mb": vm_hwm_mb(),
    }


def _pool_cpu_so_far(worker: Any) -> float:
    """CPU seconds the parsing pool's processes have used so far (their start: importing
    twoway), from /proc; 0 when there is no pool or no /proc. Subtracted from the pool's
    CPU at the end, so its figure is the messages' alone, as the worker's is."""
    pool = getattr(getattr(worker, "preparer", None), "_pool", None)
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in list(getattr(pool, "_processes", None) or {}):
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / ticks  # utime, stime
    return total


def child_ceiling(spec: dict[str, Any]) -> dict[str, Any]:
    """twoway's fetch, parse and classify with no database at all."""
    _quiet()
    from worker.classify import ClassifyContext, classify
    from worker.config import MailboxConfig
    from worker.mailbox import ImapSource
    from worker.parsing import parse

    ctx = ClassifyContext(
        our_addresses=frozenset({SENDER}), internal_domains=frozenset({SENDER_DOMAIN})
    )
    source = ImapSource(MailboxConfig.model_validate(_mailbox(spec)))
    started, cpu = time.perf_counter(), time.process_time()
    count = 0
    source.connect()
    for batch in source.fetch_new("INBOX", 0, spec["batch_size"]):
        for fetched in batch:
            classify(parse(fetched.raw), ctx)
            count += 1
    source.close()
    return {
        "messages": count,
        "seconds": time.perf_counter() - started,
        "cpu_seconds": time.process_time() - cpu,
        "peak_rss_mb": vm_hwm_mb(),
    }


def child_plain(spec: dict[str, Any]) -> dict[str, Any]:
    from bench_inbound import child_plain as plain

    cpu = time.process_time()
    out = plain(spec, parse=True)
    out["cpu_seconds"] = time.process_time() - cpu
    out["peak_rss_mb"] = vm_hwm_mb()
    return out


def child_stages(spec: dict[str, Any]) -> dict[str, Any]:
    """Where a message's CPU goes, in-process and without IMAP, on the same mail and a
    copy of the database: parse and classify timed apart, then the batches' database
    work (`process_batch` on the prepared batches) once plainly and once under cProfile,
    whose shares split that time into matching, the lifecycle, ORM flushes, the event
    executemany and commits."""
    import cProfile
    import pstats

    _quiet()
    from worker.app import App
    from worker.classify import classify
    from worker.config import clock_from_env, config_from_dict
    from worker.inbound import (
        Prepared,
        SyncResult,
        _header_key,
        _state,
        classify_context,
        message_key,
        process_batch,
    )
    from worker.mailbox import FetchedMessage
    from worker.parsing import parse

    raws = list(inbound_mix(spec["messages"], [bench_lead(i) for i in range(TOUCHED)], seed=14))
    fetched = [FetchedMessage("INBOX", 1, i + 1, r, ()) for i, r in enumerate(raws)]
    n, size = len(fetched), spec["batch_size"]
    out: dict[str, Any] = {"messages": n}
    ms = {}

    def one_pass(db: str, profile: cProfile.Profile | None) -> float:
        data = base_config(db, mailboxes=[_mailbox(spec)])
        app = App.open(config_from_dict(data, Path(spec["workdir"]) / "s.yaml"), clock_from_env({}))
        mb, ctx, result = app.config.mailboxes[0], classify_context(app.config), SyncResult()
        with app.transaction() as s:
            _state(s, mb.name, "INBOX")
        today = app.now().date()
        started = time.process_time()
        parsed = [parse(f.raw) for f in fetched]
        ms["parse"] = (time.process_time() - started) * 1000 / n
        started = time.process_time()
        prepared = [
            Prepared(
                f,
                m,
                classify(m, ctx, today=today),
                key=message_key(m, f.raw),
                header_key=_header_key(f.raw),
            )
            for f, m in zip(fetched, parsed, strict=True)
        ]
        ms["classify"] = (time.process_time() - started) * 1000 / n
        started = time.process_time()
        if profile:
            profile.enable()
        for i in range(0, n, size):
            process_batch(app, mb, fetched[i : i + size], ctx, result, prepared[i : i + size])
        if profile:
            profile.disable()
        app.close()
        return (time.process_time() - started) * 1000 / n

    template = Path(spec["template"])
    for label in ("plain", "profiled"):
        db = Path(spec["workdir"]) / f"stages-{label}.db"
        shutil.copyfile(template, db)
        profile = cProfile.Profile() if label == "profiled" else None
        database_ms = one_pass(f"sqlite:///{db}", profile)
        if profile is None:
            plain_ms = database_ms
            out["ms_per_msg"] = {**{k: round(v, 3) for k, v in ms.items()},
                                 "database work (all below)": round(database_ms, 3)}  # fmt: skip
            continue
        stats = pstats.Stats(profile)
        total = sum(tt for (_f, _l, _n), (_c, _nc, tt, _ct, _cl) in stats.stats.items())
        parts = {
            "matching (prefetch + match_message)": ("match.py", ("prefetch", "match_message")),
            "lifecycle (apply_inbound: promotions, handoffs, events, webhooks)": (
                "lifecycle.py", ("apply_inbound",)),
            "ORM flushes (row INSERTs and UPDATEs)": ("session.py", ("_flush",)),
            "events executemany": ("leads.py", ("flush_events",)),
            "commits": ("base.py", ("commit",)),
        }  # fmt: skip
        for name, (file, funcs) in parts.items():
            cum = sum(
                ct
                for (f, _l, fn), (_c, _nc, _tt, ct, _cl) in stats.stats.items()
                if f.endswith(file) and fn in funcs
            )
            out["ms_per_msg"][f"  {name}"] = round(plain_ms * cum / total, 3)
    out["note"] = "the indented parts overlap (flushes happen inside the lifecycle)"
    return out


CHILDREN = {
    "build": child_build,
    "stages": child_stages,
    "full": child_full,
    "ceiling": child_ceiling,
    "plain-parse": child_plain,
}


def _spawn(mode: str, spec: dict[str, Any], work: Path, src: str | None = None) -> dict[str, Any]:
    """Run one side in a child; `src`: a checkout of twoway whose `worker` it imports."""
    path = work / "spec.json"
    path.write_text(json.dumps(spec))
    env = {**os.environ, "TWOWAY_BENCH_SRC": src} if src else None
    cmd = [sys.executable, __file__, "--child", mode, "--spec", str(path)]
    run = run_child(cmd, timeout=7200, env=env)
    check_child(run, f"the {mode} run")
    out: dict[str, Any] = run.json()
    return out


# --- orchestration ---------------------------------------------------------------------------


def _case(mode_out: dict[str, Any], n: int) -> dict[str, Any]:
    secs = mode_out["seconds"]
    out = {
        "msgs_per_s": round(n / secs, 1),
        "ms_per_msg": round(secs * 1000 / n, 3),
        "cpu_ms_per_msg": round(mode_out["cpu_seconds"] * 1000 / n, 3),
        "peak_rss_mb": mode_out["peak_rss_mb"],
    }
    if mode_out.get("pool_cpu_seconds"):
        out["pool_cpu_ms_per_msg"] = round(mode_out["pool_cpu_seconds"] * 1000 / n, 3)
        out["pool_peak_rss_mb"] = mode_out["pool_peak_rss_mb"]
    out["all_cpu_ms_per_msg"] = round(
        (mode_out["cpu_seconds"] + mode_out.get("pool_cpu_seconds", 0)) * 1000 / n, 3
    )
    if "statements" in mode_out:
        out["statements_per_msg"] = round(mode_out["statements"] / n, 2)
        out["quarantined"] = mode_out["quarantined"]
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("-n", "--messages", type=int, default=5000)
    ap.add_argument("--sizes", default="1000,200000,1000000")
    ap.add_argument("--batch-size", type=int, default=200)
    ap.add_argument("--pg-url", default=os.environ.get("TWOWAY_TEST_PG_URL"))
    ap.add_argument("--no-pg", action="store_true")
    ap.add_argument("--pg-sizes", help="sizes for PostgreSQL (default: --sizes)")
    ap.add_argument(
        "--parse-processes", type=int, help="workers.parse_processes (default: its own)"
    )
    ap.add_argument("--in-process", action="store_true", help="also: parse_processes 0")
    ap.add_argument(
        "--daemon-passes",
        action="store_true",
        help="also: the backlog read as the daemon reads it (bounded passes), fewest leads",
    )
    ap.add_argument(
        "--baseline-src", help="also: the fewest leads with the worker of this checkout"
    )
    ap.add_argument("--stages", action="store_true", help="also: CPU per stage, fewest leads")
    ap.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="the ceiling and twoway at the fewest SQLite leads, this many times each, "
        "alternately; the best of each is reported, with every round's ratio",
    )
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--child", choices=sorted(CHILDREN), help=argparse.SUPPRESS)
    ap.add_argument("--spec", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        if os.environ.get("TWOWAY_BENCH_SRC"):  # --baseline-src: that checkout's worker
            sys.path.insert(0, os.environ["TWOWAY_BENCH_SRC"])
        print(json.dumps(CHILDREN[args.child](json.loads(Path(args.spec).read_text()))))
        return 0

    sizes = [int(x) for x in args.sizes.split(",") if x]  # "" : PostgreSQL only
    pg_sizes = [int(x) for x in (args.pg_sizes or args.sizes).split(",")]
    leads = [bench_lead(i) for i in range(TOUCHED)]
    result: dict[str, Any] = {"messages": args.messages, "batch_size": args.batch_size}
    cases: list[dict[str, Any]] = []
    ceilings: list[dict[str, Any]] = []
    twoway_rounds: list[dict[str, Any]] = []
    work = Path(tempfile.mkdtemp(prefix="twoway-bench-scale-"))
    try:
        with dovecot() as server:
            user = server.fresh_user()
            appended = append_all(server, user, inbound_mix(args.messages, leads, seed=14))
            spec: dict[str, Any] = {
                "port": server.port, "user": user, "password": "s3cret",
                "workdir": str(work), "batch_size": args.batch_size,
            }  # fmt: skip
            _spawn("plain-parse", spec, work)  # warm Dovecot's index and the page cache
            result["plain_parse"] = _case(_spawn("plain-parse", spec, work), appended)
            ceilings = [_spawn("ceiling", spec, work)]
            variants: list[tuple[str, str | None, int | None, bool]] = [
                ("twoway", None, args.parse_processes, False)
            ]
            if args.in_process:
                variants.append(("in-process", None, 0, False))
            if args.baseline_src:
                variants.append(("baseline", args.baseline_src, None, False))
            if args.daemon_passes:
                variants.append(("daemon passes", None, args.parse_processes, True))
                if args.baseline_src:
                    variants.append(("baseline daemon passes", args.baseline_src, None, True))

            def full(db: str, n: int, built: float, out: dict[str, Any], label: str) -> None:
                if out["messages"] != appended or out["errors"]:
                    raise SystemExit(f"the full run did not read everything: {out}")
                cases.append({"database": db, "leads": n, "variant": label,
                              "worker_src": out["worker_src"],
                              "build_s": round(built, 1), **_case(out, appended),
                              "kinds": out["kinds"]})  # fmt: skip
                print(f"{db} {n} {label}: {cases[-1]}", file=sys.stderr, flush=True)

            for n in sizes:
                template = work / f"leads-{n}.db"
                spec_build = {"database": f"sqlite:///{template}", "leads": n}
                built = _spawn("build", spec_build, work)["seconds"]
                run_db = work / "run.db"
                for label, src, procs, passes in variants if n == min(sizes) else variants[:1]:
                    # --rounds: ceiling, twoway, ceiling, twoway... (the first ceiling ran)
                    repeat = args.rounds if n == min(sizes) and label == "twoway" else 1
                    runs = []
                    for k in range(repeat):
                        if k:
                            ceilings.append(_spawn("ceiling", spec, work))
                        for suffix in ("", "-wal", "-shm"):
                            Path(f"{run_db}{suffix}").unlink(missing_ok=True)
                        if src:  # its own migrations: a database that checkout can open
                            _spawn(
                                "build", {**spec_build, "database": f"sqlite:///{run_db}"},
                                work, src,
                            )  # fmt: skip
                        else:
                            shutil.copyfile(template, run_db)
                        one = {**spec, "database": f"sqlite:///{run_db}",
                               "parse_processes": procs, "passes": passes}  # fmt: skip
                        runs.append(_spawn("full", one, work, src))
                    full("sqlite", n, built, min(runs, key=lambda o: o["seconds"]), label)
                    if repeat > 1:
                        twoway_rounds = runs
                if args.stages and n == min(sizes):
                    stages = {**spec, "template": str(template), "messages": args.messages}
                    result["stages"] = _spawn("stages", stages, work)
                    print(f"stages: {result['stages']}", file=sys.stderr, flush=True)
                template.unlink()
            if args.pg_url and not args.no_pg:
                from tests.conftest import pg_schema  # the tests' throwaway schema

                for n in pg_sizes:
                    for label, src, procs, passes in (
                        variants if n == min(pg_sizes) else variants[:1]
                    ):
                        with pg_schema(args.pg_url, "bench_scale") as url:
                            spec_build = {"database": url, "leads": n}
                            built = _spawn("build", spec_build, work, src)["seconds"]
                            one = {**spec, "database": url, "parse_processes": procs,
                                   "passes": passes}  # fmt: skip
                            full("postgresql", n, built, _spawn("full", one, work, src), label)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    result["cases"] = cases
    result["ceiling"] = _case(min(ceilings, key=lambda o: o["seconds"]), appended)
    if len(ceilings) > 1 and twoway_rounds:
        result["rounds"] = [
            {"ceiling_msgs_per_s": round(appended / c["seconds"], 1),
             "twoway_msgs_per_s": round(appended / t["seconds"], 1),
             "ratio_vs_ceiling": round(c["seconds"] / t["seconds"], 3)}
            for c, t in zip(ceilings, twoway_rounds, strict=False)
        ]  # fmt: skip
    lines = [
        f"{appended} messages, batch_size {args.batch_size}; messages concern leads 0..999",
        f"  plain fetch + mail-parser: {result['plain_parse']['msgs_per_s']:>8} msg/s "
        f"({result['plain_parse']['cpu_ms_per_msg']} CPU ms/msg)",
        f"  ceiling (fetch+parse+classify, no DB): {result['ceiling']['msgs_per_s']:>8} msg/s"
        f"  ({result['ceiling']['cpu_ms_per_msg']} CPU ms/msg)",
    ]
    if "rounds" in result:
        lines.append(
            f"  {len(result['rounds'])} rounds (ceiling, twoway at the fewest SQLite leads): "
            + ", ".join(
                f"{r['ceiling_msgs_per_s']}/{r['twoway_msgs_per_s']} = {r['ratio_vs_ceiling']}"
                for r in result["rounds"]
            )
            + "; the best of each is used below"
        )
    ceiling, plain = result["ceiling"], result["plain_parse"]
    for db_name in ("sqlite", "postgresql"):
        every = [c for c in cases if c["database"] == db_name]
        mine = [c for c in every if c["variant"] == "twoway"]
        if not mine:
            continue
        small = min(mine, key=lambda c: c["leads"])
        for c in every:
            c["cost_vs_smallest"] = round(c["all_cpu_ms_per_msg"] / small["all_cpu_ms_per_msg"], 3)
            c["wall_vs_smallest"] = round(c["ms_per_msg"] / small["ms_per_msg"], 3)
            c["rss_ok"] = max(c["peak_rss_mb"], c.get("pool_peak_rss_mb", 0)) < TARGET_RSS_MB
            pool = (
                f" + pool {c['pool_cpu_ms_per_msg']} ({c['pool_peak_rss_mb']} MB)"
                if "pool_cpu_ms_per_msg" in c
                else ""
            )
            lines.append(
                f"  {db_name:10} {c['leads']:>9} leads {c['variant']:>10}: {c['msgs_per_s']:>7} "
                f"msg/s {c['ms_per_msg']:>7} ms/msg wall, CPU ms/msg {c['cpu_ms_per_msg']}{pool}"
                f", {c['statements_per_msg']:>6} stmt/msg, peak {c['peak_rss_mb']} MB; CPU "
                f"{c['cost_vs_smallest']}x (wall {c['wall_vs_smallest']}x) of "
                f"{small['leads']} leads (target <= {TARGET_FLAT})"
            )
        plain_target = TARGET_PLAIN_SQLITE if db_name == "sqlite" else TARGET_PLAIN_PG
        # msg/s ratios (what the targets are) and CPU ratios (all of twoway's processes),
        # which the other processes on a shared machine move less.
        small["ratio_vs_ceiling"] = round(small["msgs_per_s"] / ceiling["msgs_per_s"], 3)
        small["ratio_vs_plain_parse"] = round(small["msgs_per_s"] / plain["msgs_per_s"], 3)
        cpu = small["all_cpu_ms_per_msg"]
        small["cpu_ratio_vs_ceiling"] = round(ceiling["cpu_ms_per_msg"] / cpu, 3)
        small["cpu_ratio_vs_plain_parse"] = round(plain["cpu_ms_per_msg"] / cpu, 3)
        lines.append(
            f"  {db_name} at {small['leads']} leads: {small['ratio_vs_ceiling']}x the ceiling "
            f"(CPU {small['cpu_ratio_vs_ceiling']}x; target >= {TARGET_CEILING}), "
            f"{small['ratio_vs_plain_parse']}x the plain loop (CPU "
            f"{small['cpu_ratio_vs_plain_parse']}x; target >= {plain_target})"
        )
        for c in every:
            if c is not small and c["leads"] == small["leads"]:
                c["speedup_of_twoway"] = round(c["ms_per_msg"] / small["ms_per_msg"], 3)
                c["cpu_speedup_of_twoway"] = round(c["all_cpu_ms_per_msg"] / cpu, 3)
                lines.append(
                    f"  {db_name} at {small['leads']} leads: twoway is "
                    f"{c['speedup_of_twoway']}x as fast as {c['variant']} by wall clock, "
                    f"{c['cpu_speedup_of_twoway']}x by CPU"
                )
    if "stages" in result:
        lines.append("  CPU per message by stage (in-process, sqlite, fewest leads):")
        lines += [f"    {k:<72} {v:>7}" for k, v in result["stages"]["ms_per_msg"].items()]
    result["load_average"] = os.getloadavg()
    lines.append(f"  load average at the end: {result['load_average']}")
    emit(result, args.json, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
