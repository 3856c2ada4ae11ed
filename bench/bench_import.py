"""Lead import: `twoway leads import FILE.csv` against plain csv + executemany, same rows.

Generates N CSV rows (every known column plus one custom column), then times, each as a
subprocess with its own peak RSS (its VmHWM, read while it runs):

- twoway:   `python -m worker --config CFG leads import FILE --json` on a migrated, empty
            SQLite database (the real command: validation, reply tokens, timeline
            events, one transaction);
- baseline: a fresh Python running csv.DictReader + sqlite3 executemany of the same rows
            into a one-table database (no validation, no events) — the floor.

Prints rows/s for both and the ratio twoway/baseline. With `--pg-url URL` the same is run
against PostgreSQL (twoway through TWOWAY_DATABASE_URL, the baseline with psycopg
executemany), each in a scratch database created on that server and dropped afterwards.

    .venv/bin/python bench/bench_import.py [-n 100000] [--pg-url URL] [--json]
"""

from __future__ import annotations

import argparse
import csv
import os
import random
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import ROOT, base_config, check_child, emit, run_child, scratch_pg_database

COLUMNS = (
    "email", "first_name", "last_name", "company", "title", "industry", "company_size",
    "annual_revenue", "country", "timezone", "source", "crm_id",
)  # fmt: skip

_BASELINE_SQLITE = """
import csv, sqlite3, sys
path, db = sys.argv[1], sys.argv[2]
conn = sqlite3.connect(db)
cols = {cols!r}
conn.execute("CREATE TABLE leads (id INTEGER PRIMARY KEY, " + ", ".join(c + " TEXT" for c in cols) + ")")
with open(path, newline="", encoding="utf-8") as f:
    rows = [tuple(r[c] for c in cols) for r in csv.DictReader(f)]
conn.executemany("INSERT INTO leads (" + ", ".join(cols) + ") VALUES (" + ", ".join("?" * len(cols)) + ")", rows)
conn.commit()
print(len(rows))
"""

_BASELINE_PG = """
import csv, psycopg, sys
path, dsn = sys.argv[1], sys.argv[2]
cols = {cols!r}
with psycopg.connect(dsn) as conn:
    conn.execute("CREATE TABLE leads (id BIGSERIAL PRIMARY KEY, " + ", ".join(c + " TEXT" for c in cols) + ")")
    with open(path, newline="", encoding="utf-8") as f:
        rows = [tuple(r[c] for c in cols) for r in csv.DictReader(f)]
    with conn.cursor() as cur:
        cur.executemany("INSERT INTO leads (" + ", ".join(cols) + ") VALUES (" + ", ".join(["%s"] * len(cols)) + ")", rows)
print(len(rows))
"""


def write_csv(path: Path, n: int, seed: int = 11) -> None:
    """N plausible, valid lead rows with every known column and one custom column."""
    rng = random.Random(seed)
    industries = ("Logistics", "Retail", "Manufacturing", "Healthcare", "Software")
    titles = ("Head of Operations", "CTO", "Fleet Manager", "VP Sales", "Analyst")
    zones = (("FR", "Europe/Paris"), ("DE", "Europe/Berlin"), ("US", "America/New_York"),
             ("GB", "Europe/London"), ("ES", "Europe/Madrid"))  # fmt: skip
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(COLUMNS)
        for i in range(n):
            country, tz = zones[i % len(zones)]
            w.writerow(
                [
                    f"person{i}@company{i % 5000}.example.com", f"First{i}", f"Last{i}",
                    f"Company {i % 5000}", rng.choice(titles), rng.choice(industries),
                    rng.choice((12, 50, 200, 1200)), rng.choice((900_000, 5_000_000, 42_000_000)),
                    country, tz, "trade-show", f"CRM-{i:07d}",
                ]
            )  # fmt: skip


def _twoway(csv_path: Path, database: str, work: Path) -> dict[str, Any]:
    cfg = work / "twoway.yaml"
    cfg.write_text(yaml.safe_dump(base_config(database), sort_keys=False))
    env = {k: v for k, v in os.environ.items() if not k.startswith("TWOWAY_")}
    base = [sys.executable, "-m", "worker", "--config", str(cfg)]
    check_child(run_child([*base, "db", "upgrade"], env=env, cwd=ROOT), "twoway db upgrade")
    run = run_child([*base, "leads", "import", str(csv_path), "--json"], env=env, cwd=ROOT)
    check_child(run, "twoway leads import")
    out = run.json()
    if out.get("rejected"):
        raise SystemExit(f"rows were rejected: {out['rejected'][:3]}")
    return {"seconds": run.seconds, "peak_rss_mb": run.peak_rss_mb, "imported": out["imported"]}


def _baseline(script: str, csv_path: Path, target: str) -> dict[str, Any]:
    run = run_child(
        [sys.executable, "-c", script.format(cols=list(COLUMNS)), str(csv_path), target]
    )
    check_child(run, "the baseline")
    return {"seconds": run.seconds, "peak_rss_mb": run.peak_rss_mb, "imported": int(run.stdout)}


def _side(n: int, twoway: dict[str, Any], base: dict[str, Any]) -> dict[str, Any]:
    for r in (twoway, base):
        r["rows_per_s"] = round(n / r["seconds"])
        r["seconds"] = round(r["seconds"], 2)
    return {
        "twoway": twoway,
        "baseline": base,
        "ratio": round(base["seconds"] / twoway["seconds"], 3),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("-n", "--rows", type=int, default=100_000)
    ap.add_argument("--pg-url", help="also run on PostgreSQL (scratch databases on this server)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="twoway-bench-import-"))
    result: dict[str, Any] = {"rows": args.rows}
    try:
        csv_path = work / "leads.csv"
        write_csv(csv_path, args.rows)
        result["csv_mb"] = round(csv_path.stat().st_size / 1e6, 1)
        base = _baseline(_BASELINE_SQLITE, csv_path, str(work / "plain.db"))
        tw = _twoway(csv_path, f"sqlite:///{work / 'twoway.db'}", work)
        result["sqlite"] = _side(args.rows, tw, base)
        if args.pg_url:
            import psycopg  # noqa: F401  (fail early with a clear ImportError)

            with scratch_pg_database(args.pg_url, "twoway_bench_import_tw") as tw_url:
                tw = _twoway(csv_path, tw_url, work)
            with scratch_pg_database(args.pg_url, "twoway_bench_import_plain") as plain_url:
                dsn = plain_url.replace("postgresql+psycopg://", "postgresql://")
                base = _baseline(_BASELINE_PG, csv_path, dsn)
            result["postgresql"] = _side(args.rows, tw, base)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    lines = [f"{args.rows} CSV rows ({result['csv_mb']} MB)"]
    for db in ("sqlite", "postgresql"):
        if db in result:
            r = result[db]
            lines += [
                f"  {db}: twoway leads import {r['twoway']['rows_per_s']:>8} rows/s "
                f"({r['twoway']['seconds']} s, peak RSS {r['twoway']['peak_rss_mb']} MB)",
                f"  {db}: csv + executemany   {r['baseline']['rows_per_s']:>8} rows/s "
                f"({r['baseline']['seconds']} s, peak RSS {r['baseline']['peak_rss_mb']} MB)",
                f"  {db}: ratio twoway/baseline {r['ratio']}",
            ]
    emit(result, args.json, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
