"""Matching at scale: the cost of `match_message` per reply with 10,000 vs N leads.

Builds databases (SQLite; PostgreSQL too with `--pg-url`) through the project's schema
(migrations), then bulk-loads N leads and 5N outbound messages (five sent nurture
emails each) with executemany in large chunks. Setup is not timed.

Timed: `match_message(session, parsed, classification, config)` for a sample of replies
already parsed and classified outside the timer, one sample per signal:

- token:      sent to our plus-address `sales+TOKEN@…` (lookup by reply token);
- message_id: threaded with In-Reply-To/References to one of ours, plain address;
- sender:     not threaded, known sender (lookup by email).

Prints microseconds per match (median, p95) at 10,000 leads and at N, the ratio N/10k
(flat is ~1.0; target <= 1.5), and the query plan of every query match_message issued
(EXPLAIN QUERY PLAN on SQLite, EXPLAIN on PostgreSQL), captured as it ran.

    .venv/bin/python bench/bench_matching.py [--leads 100000] [--sample 2000] [--pg-url URL]
    .venv/bin/python bench/bench_matching.py --leads 1000000     # the issue's figure
"""

from __future__ import annotations

import argparse
import random
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (
    SENDER,
    SENDER_DOMAIN,
    BenchLead,
    emit,
    human_reply,
    lead_email,
    scratch_pg_database,
)

SMALL = 10_000
PER_LEAD = 5
CHUNK = 50_000
TARGET_RATIO = 1.5
METHOD = {"token": "reply_token", "message_id": "message_id", "sender": "sender"}
_ALPHABET = "abcdefghijklmnopqrstuvwxyz234567"


def _token(i: int) -> str:
    """A deterministic, unique 16-character base32 token for lead `i`."""
    out = []
    x = i * 2654435761 + 12345
    for _ in range(16):
        out.append(_ALPHABET[x % 32])
        x //= 32
    return "".join(reversed(out))[:8] + "".join(_ALPHABET[(i >> (5 * k)) % 32] for k in range(8))


def _mid(i: int, step: int) -> str:
    return f"twoway.{i:012x}{step:04x}{(i * 7919 + step) % 65536:04x}@{SENDER_DOMAIN}"


def _rows(n: int) -> tuple[Any, Any]:
    """Generators of lead rows and outbound rows, for `n` leads and 5n outbound."""
    now = datetime.now(UTC).replace(tzinfo=None)
    stamp = now.strftime("%Y-%m-%d %H:%M:%S.%f")
    sent = (now - timedelta(days=3)).strftime("%Y-%m-%d %H:%M:%S.%f")

    def leads() -> Any:
        for i in range(1, n + 1):
            email = lead_email(i)
            yield (i, email, f"Lead{i}", "{}", "lead", _token(i), email.split("@")[1], stamp, stamp)

    def outbound() -> Any:
        for i in range(1, n + 1):
            email = lead_email(i)
            for step in range(PER_LEAD):
                yield (
                    (i - 1) * PER_LEAD + step + 1, f"nurture:{i}:welcome:{step}", "nurture", i,
                    "welcome", step, "nurture/welcome", _mid(i, step), _token(i), email,
                    "sent", 1, sent, "{}", sent, sent,
                )  # fmt: skip

    return leads(), outbound()


LEAD_SQL = (
    "INSERT INTO leads (id, email, first_name, custom, status, reply_token, domain, "
    "created_at, updated_at) VALUES ({})"
)
OUT_SQL = (
    "INSERT INTO outbound_messages (id, idempotency_key, kind, lead_id, campaign, step, "
    "template, message_id, reply_token, to_addr, status, attempts, next_attempt_at, context, "
    "created_at, sent_at) VALUES ({})"
)


def _chunks(gen: Any, size: int) -> Any:
    buf = []
    for row in gen:
        buf.append(row)
        if len(buf) == size:
            yield buf
            buf = []
    if buf:
        yield buf


def _migrate(url: str) -> None:
    from worker import db

    engine = db.make_engine(url)
    db.ensure_schema(engine)
    engine.dispose()


def load_sqlite(path: Path, n: int) -> float:
    """Schema by migration, then bulk rows with sqlite3 executemany; returns seconds."""
    t0 = time.perf_counter()
    _migrate(f"sqlite:///{path}")
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA synchronous=OFF")
    leads, outbound = _rows(n)
    for rows in _chunks(leads, CHUNK):
        conn.executemany(LEAD_SQL.format(", ".join("?" * 9)), rows)
    for rows in _chunks(outbound, CHUNK):
        conn.executemany(OUT_SQL.format(", ".join("?" * 16)), rows)
    conn.commit()
    conn.execute("ANALYZE")
    conn.close()
    return time.perf_counter() - t0


def load_postgres(url: str, n: int) -> float:
    import psycopg

    t0 = time.perf_counter()
    _migrate(url)
    dsn = url.replace("postgresql+psycopg://", "postgresql://")
    leads, outbound = _rows(n)
    with psycopg.connect(dsn) as conn, conn.cursor() as cur:
        with cur.copy(
            "COPY leads (id, email, first_name, custom, status, reply_token, domain, "
            "created_at, updated_at) FROM STDIN"
        ) as cp:
            for row in leads:
                cp.write_row(row)
        with cur.copy(
            "COPY outbound_messages (id, idempotency_key, kind, lead_id, campaign, step, "
            "template, message_id, reply_token, to_addr, status, attempts, next_attempt_at, "
            "context, created_at, sent_at) FROM STDIN"
        ) as cp:
            for row in outbound:
                cp.write_row(row)
        for table in ("leads", "outbound_messages"):
            cur.execute(f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), {n * PER_LEAD})")
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("VACUUM ANALYZE")
    return time.perf_counter() - t0


def sample(n: int, size: int, seed: int = 5) -> dict[str, list[Any]]:
    """Parsed and classified replies per signal, from leads spread over 1..n."""
    from worker.classify import ClassifyContext, classify
    from worker.parsing import parse

    rng = random.Random(seed)
    ctx = ClassifyContext(
        our_addresses=frozenset({SENDER}), internal_domains=frozenset({SENDER_DOMAIN})
    )
    out: dict[str, list[Any]] = {}
    at = datetime.now(UTC)
    for signal in ("token", "message_id", "sender"):
        items = []
        for k in range(size):
            i = rng.randint(1, n)
            lead = BenchLead(
                lead_email(i), f"Lead{i}", _token(i), tuple(_mid(i, s) for s in range(PER_LEAD))
            )
            msg = parse(human_reply(rng, k, lead, signal=signal, at=at))
            items.append((msg, classify(msg, ctx), i))
        out[signal] = items
    return out


def measure(url: str, n: int, size: int) -> dict[str, Any]:
    """Time match_message per signal; check each match found the right lead and signal."""
    from sqlalchemy import event

    from worker.app import App
    from worker.config import config_from_dict
    from worker.match import match_message
    from worker.models import Lead

    config = config_from_dict({"database": url, "sender": {"from": f"Acme <{SENDER}>"},
                               "internal_domains": [SENDER_DOMAIN]})  # fmt: skip
    app = App.open(config, lambda: datetime.now(UTC), migrate=False)
    samples = sample(n, size)
    statements: dict[str, list[tuple[str, Any]]] = {}
    capture: list[tuple[str, Any]] = []

    def grab(conn: Any, cursor: Any, statement: str, params: Any, context: Any, many: bool) -> None:
        capture.append((statement, params))

    out: dict[str, Any] = {}
    with app.sessions() as s:
        for signal, items in samples.items():
            for msg, cls, _i in items[:50]:  # warm the statement cache and the page cache
                match_message(s, msg, cls, config)
            times = []
            wrong = 0
            for msg, cls, i in items:
                t0 = time.perf_counter()
                m = match_message(s, msg, cls, config)
                times.append(time.perf_counter() - t0)
                lead = s.get(Lead, m.lead_id) if m.lead_id else None
                if m.method != METHOD[signal] or lead is None or lead.email != lead_email(i):
                    wrong += 1
                s.expunge_all()
            event.listen(app.engine, "before_cursor_execute", grab)
            capture.clear()
            match_message(s, items[0][0], items[0][1], config)
            event.remove(app.engine, "before_cursor_execute", grab)
            statements[signal] = list(capture)
            times.sort()
            out[signal] = {
                "median_us": round(statistics.median(times) * 1e6, 1),
                "p95_us": round(times[int(0.95 * (len(times) - 1))] * 1e6, 1),
                "wrong": wrong,
            }
    # After the session: on SQLite it holds the write lock (BEGIN IMMEDIATE).
    out["plans"] = {sig: _plans(app.engine, stmts) for sig, stmts in statements.items()}
    app.close()
    return out


def _plans(engine: Any, statements: list[tuple[str, Any]]) -> list[dict[str, Any]]:
    prefix = "EXPLAIN QUERY PLAN " if engine.dialect.name == "sqlite" else "EXPLAIN "
    plans = []
    with engine.connect() as conn:
        for sql, params in statements:
            rows = conn.exec_driver_sql(prefix + sql, params).all()
            text = [str(r[-1]) for r in rows]
            plans.append({"sql": " ".join(sql.split()), "plan": text})
    return plans


def run_backend(name: str, make_url: Any, leads: int, size: int) -> dict[str, Any]:
    res: dict[str, Any] = {}
    for n in (SMALL, leads):
        url = make_url(n)
        load_s = (
            load_sqlite(Path(url[len("sqlite:///") :]), n)
            if name == "sqlite"
            else load_postgres(url, n)
        )
        res[str(n)] = {"load_seconds": round(load_s, 1), **measure(url, n, size)}
    small, big = res[str(SMALL)], res[str(leads)]
    res["ratio"] = {
        sig: round(big[sig]["median_us"] / small[sig]["median_us"], 3)
        for sig in ("token", "message_id", "sender")
    }
    res["target_met"] = all(r <= TARGET_RATIO for r in res["ratio"].values())
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--leads", type=int, default=100_000)
    ap.add_argument("--sample", type=int, default=2000, help="replies timed per signal")
    ap.add_argument("--pg-url", help="also on PostgreSQL (scratch databases on this server)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="twoway-bench-matching-"))
    result: dict[str, Any] = {"leads": args.leads, "outbound": args.leads * PER_LEAD,
                              "small": SMALL, "sample_per_signal": args.sample,
                              "target_ratio": TARGET_RATIO}  # fmt: skip
    try:
        result["sqlite"] = run_backend(
            "sqlite", lambda n: f"sqlite:///{work / f'm{n}.db'}", args.leads, args.sample
        )
        for n in (SMALL, args.leads):
            (work / f"m{n}.db").unlink(missing_ok=True)
        if args.pg_url:
            scratch: list[Any] = []

            def pg(n: int) -> str:
                cm = scratch_pg_database(args.pg_url, f"twoway_bench_match_{n}")
                scratch.append(cm)
                return cm.__enter__()

            try:
                result["postgresql"] = run_backend("postgresql", pg, args.leads, args.sample)
            finally:
                for cm in scratch:
                    cm.__exit__(None, None, None)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    lines = [f"match_message per reply, {args.sample} replies per signal; "
             f"N = {args.leads} leads, {args.leads * PER_LEAD} outbound"]  # fmt: skip
    for db in ("sqlite", "postgresql"):
        if db not in result:
            continue
        r = result[db]
        small, big = r[str(SMALL)], r[str(args.leads)]
        lines.append(f"{db} (load {small['load_seconds']} s / {big['load_seconds']} s):")
        for sig in ("token", "message_id", "sender"):
            lines.append(
                f"  {sig:<10} {SMALL:>8} leads: {small[sig]['median_us']:>8} us (p95 "
                f"{small[sig]['p95_us']})  {args.leads:>8} leads: {big[sig]['median_us']:>8} us "
                f"(p95 {big[sig]['p95_us']})  ratio {r['ratio'][sig]}  wrong {big[sig]['wrong']}"
            )
        lines.append(f"  target ratio <= {TARGET_RATIO}: {'met' if r['target_met'] else 'NOT met'}")
        for sig, plans in big["plans"].items():
            for p in plans:
                lines.append(f"  [{sig}] {p['sql'][:150]}")
                lines += [f"      {row}" for row in p["plan"]]
    emit(result, args.json, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
