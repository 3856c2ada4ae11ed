"""Inbound throughput and memory: twoway's whole pipeline against plain imapclient loops.

Setup (not timed): a throwaway Dovecot on 127.0.0.1, a SQLite database with `--leads`
leads enrolled in a campaign and two nurture emails sent to each, and N messages APPENDed
with one connection: a mix of human replies (matched by reply token, by our Message-ID,
by sender, or from strangers), out-of-office auto-replies, DSN bounces and newsletters,
4–8 KB each.

Timed, each in its own fresh subprocess so that its peak RSS is its own:

- full:        `Worker(app).run_once()` with an IMAP mailbox on that Dovecot: sync,
               parse, classify, match, record, lifecycle (promotions, handoffs queued),
               one transaction per message, on a fresh copy of the database;
- plain-parse: imapclient SEARCH ALL + FETCH BODY.PEEK[] in batches of 500 +
               `mailparser.parse_from_bytes` on each message (the ceiling of any pipeline
               that parses with mail-parser);
- fetch:       the same without parsing.

Prints messages/s and peak RSS for each and the ratios full/plain-parse (target >= 0.5)
and full/fetch. `--memory-check 100000` also runs the full pipeline on a mailbox of that
size and compares its peak RSS with the default size (target < 200 MB, flat).
`--profile` runs the full pipeline once more under cProfile and prints where time goes.

    .venv/bin/python bench/bench_inbound.py [-n 20000] [--leads 1000] [--rounds 1]
        [--memory-check 100000] [--profile] [--json]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (
    append_all,
    base_config,
    build_lead_database,
    check_child,
    dovecot,
    emit,
    inbound_mix,
    peak_rss_mb,
    run_child,
)

PLAIN_BATCH = 500
TARGET_RATIO = 0.5
TARGET_RSS_MB = 200.0


# --- the timed sides (run in a child process) ----------------------------------------------


def _quiet_mailparser() -> None:
    import logging

    # mail-parser warns on every text/rfc822-headers part; the CLI silences it the same way.
    logging.getLogger("mailparser").setLevel(logging.ERROR)


def child_full(spec: dict[str, Any]) -> dict[str, Any]:
    """One `run_once` over the whole mailbox; the database is a fresh copy of the template."""
    _quiet_mailparser()
    from worker.app import App
    from worker.config import config_from_dict
    from worker.runner import Worker

    data = base_config(
        spec["database"],
        mailboxes=[
            {
                "name": "sales", "kind": "imap", "host": "127.0.0.1", "port": spec["port"],
                "security": "none", "username": spec["user"], "password": spec["password"],
                "address": "sales@acme.example", "timeout": 120,
                "batch_size": spec["batch_size"],
            }
        ],
    )  # fmt: skip
    config = config_from_dict(data, Path(spec["workdir"]) / "twoway.yaml")
    app = App.open(config, _real_clock())
    worker = Worker(app).start()
    profiler = None
    if spec.get("profile"):
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
    started = time.perf_counter()
    result = worker.run_once()
    seconds = time.perf_counter() - started
    if profiler is not None:
        profiler.disable()
        profiler.dump_stats(spec["profile"])
    worker.close()
    app.close()
    inbound = result.inbound
    return {
        "mode": "full",
        "messages": inbound.processed + inbound.duplicates + inbound.quarantined,
        "processed": inbound.processed,
        "quarantined": inbound.quarantined,
        "kinds": inbound.kinds,
        "errors": result.errors,
        "seconds": seconds,
        "peak_rss_mb": peak_rss_mb(),
    }


def _real_clock() -> Any:
    from worker.config import clock_from_env

    return clock_from_env({})


def child_plain(spec: dict[str, Any], parse: bool) -> dict[str, Any]:
    """imapclient SEARCH ALL, FETCH BODY.PEEK[] by 500, optionally mail-parser on each."""
    _quiet_mailparser()
    import mailparser
    from imapclient import IMAPClient

    started = time.perf_counter()
    count = size = 0
    with IMAPClient("127.0.0.1", port=spec["port"], ssl=False, timeout=120) as c:
        c.login(spec["user"], spec["password"])
        c.select_folder("INBOX", readonly=True)
        uids = sorted(c.search(["ALL"]))
        for i in range(0, len(uids), PLAIN_BATCH):
            data = c.fetch(uids[i : i + PLAIN_BATCH], ["BODY.PEEK[]"])
            for item in data.values():
                raw = item[b"BODY[]"]
                size += len(raw)
                if parse:
                    mailparser.parse_from_bytes(raw)
            count += len(data)
            del data
    seconds = time.perf_counter() - started
    return {
        "mode": "plain-parse" if parse else "fetch",
        "messages": count,
        "bytes": size,
        "seconds": seconds,
        "peak_rss_mb": peak_rss_mb(),
    }


# --- orchestration ---------------------------------------------------------------------------


def _spawn(mode: str, spec: dict[str, Any], spec_path: Path) -> dict[str, Any]:
    spec_path.write_text(json.dumps(spec))
    run = run_child([sys.executable, __file__, "--child", mode, "--spec", str(spec_path)])
    check_child(run, f"the {mode} run")
    result: dict[str, Any] = run.json()
    # The parent's view of the same child (its VmHWM, read from /proc while it ran).
    result["peak_rss_mb_outside"] = run.peak_rss_mb
    return result


def _fresh_db(template: Path, dest: Path) -> str:
    for suffix in ("-wal", "-shm"):
        Path(str(dest) + suffix).unlink(missing_ok=True)
    shutil.copyfile(template, dest)
    return f"sqlite:///{dest}"


def _summary(runs: list[dict[str, Any]], n: int) -> dict[str, Any]:
    secs = statistics.median(r["seconds"] for r in runs)
    return {
        "msgs_per_s": round(n / secs, 1),
        "seconds": round(secs, 2),
        "peak_rss_mb": max(r["peak_rss_mb"] for r in runs),
    }


def stage_breakdown(leads: list[Any], n: int = 2000) -> dict[str, float]:
    """Milliseconds per message of each pure stage, in this process, on `n` generated
    messages of the same mix (no database, no IMAP): where the CPU goes, without
    cProfile's overhead."""
    _quiet_mailparser()
    import mailparser

    from worker.bounces import analyse_bounce
    from worker.classify import ClassifyContext, classify
    from worker.parsing import parse
    from worker.replytext import extract_reply_text

    raws = list(inbound_mix(n, leads, seed=1))
    ctx = ClassifyContext(
        our_addresses=frozenset({"sales@acme.example"}),
        internal_domains=frozenset({"acme.example"}),
    )
    timings: dict[str, float] = {}

    def timed(name: str, fn: Any, items: list[Any]) -> list[Any]:
        t0 = time.perf_counter()
        out = [fn(x) for x in items]
        timings[name] = round((time.perf_counter() - t0) * 1000 / len(items), 3)
        return out

    timed("mailparser.parse_from_bytes", mailparser.parse_from_bytes, raws)
    parsed = timed("worker.parsing.parse", parse, raws)
    timed("worker.classify.classify (all of it)", lambda m: classify(m, ctx), parsed)
    timed("  worker.bounces.analyse_bounce", analyse_bounce, parsed)
    timed(
        "  worker.replytext.extract_reply_text",
        lambda m: extract_reply_text("" if m.text_from_html else m.text, m.html),
        parsed,
    )
    return timings


def _print_profile(path: str, top: int = 30) -> list[str]:
    import io
    import pstats

    out = io.StringIO()
    stats = pstats.Stats(path, stream=out)
    stats.sort_stats("cumulative").print_stats(top)
    out.write("\n--- by own time ---\n")
    stats.sort_stats("tottime").print_stats(top)
    return out.getvalue().splitlines()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("-n", "--messages", type=int, default=20000)
    ap.add_argument("--leads", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=1, help="runs of each side; median reported")
    ap.add_argument("--batch-size", type=int, default=500, help="the mailbox's batch_size")
    ap.add_argument("--memory-check", type=int, metavar="N", help="also: full pipeline on N")
    ap.add_argument("--profile", action="store_true", help="also profile the full pipeline")
    ap.add_argument("--profile-out", help="with --profile: keep the cProfile dump here")
    ap.add_argument("--skip-default", action="store_true", help="with --memory-check: only it")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--child", choices=["full", "plain-parse", "fetch"], help=argparse.SUPPRESS)
    ap.add_argument("--spec", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.child:
        spec = json.loads(Path(args.spec).read_text())
        if args.child == "full":
            out = child_full(spec)
        else:
            out = child_plain(spec, parse=args.child == "plain-parse")
        print(json.dumps(out))
        return 0

    work = Path(tempfile.mkdtemp(prefix="twoway-bench-inbound-"))
    result: dict[str, Any] = {
        "messages": args.messages,
        "leads": args.leads,
        "batch_size": args.batch_size,
        "plain_batch": PLAIN_BATCH,
        "rounds": args.rounds,
    }
    lines: list[str] = []
    try:
        template = work / "template.db"
        leads = build_lead_database(f"sqlite:///{template}", args.leads)
        with dovecot() as server:
            base = {
                "port": server.port,
                "password": "s3cret",
                "workdir": str(work),
                "batch_size": args.batch_size,
            }
            spec_path = work / "spec.json"
            sizes = [] if args.skip_default else [args.messages]
            if args.memory_check:
                sizes.append(args.memory_check)
            for n in sizes:
                user = server.fresh_user()
                t0 = time.perf_counter()
                appended = append_all(server, user, inbound_mix(n, leads, seed=n))
                append_s = time.perf_counter() - t0
                spec = {**base, "user": user}
                _spawn("fetch", spec, spec_path)  # warm Dovecot's index and the page cache
                runs: dict[str, list[dict[str, Any]]] = {"full": [], "plain-parse": [], "fetch": []}
                rounds = args.rounds if n == args.messages else 1
                modes: tuple[str, ...] = ("plain-parse", "full", "fetch")
                if n != args.messages:
                    modes = ("full",)
                for _ in range(rounds):
                    for mode in modes:  # alternate so drift hits each side alike
                        if mode == "full":
                            spec["database"] = _fresh_db(template, work / "run.db")
                        runs[mode].append(_spawn(mode, spec, spec_path))
                for r in runs["full"]:
                    if r["messages"] != appended or r["errors"]:
                        raise SystemExit(f"the full run did not read everything: {r}")
                entry: dict[str, Any] = {
                    "messages": appended,
                    "append_msgs_per_s": round(appended / append_s),
                    "full": {**_summary(runs["full"], appended), "kinds": runs["full"][0]["kinds"],
                             "quarantined": runs["full"][0]["quarantined"]},
                }  # fmt: skip
                if runs["plain-parse"]:
                    entry["plain_parse"] = _summary(runs["plain-parse"], appended)
                    entry["fetch"] = _summary(runs["fetch"], appended)
                    entry["mb"] = round(runs["fetch"][0]["bytes"] / 1e6, 1)
                    full = entry["full"]["msgs_per_s"]
                    entry["ratio_full_vs_plain_parse"] = round(
                        full / entry["plain_parse"]["msgs_per_s"], 3
                    )
                    entry["ratio_full_vs_fetch"] = round(full / entry["fetch"]["msgs_per_s"], 3)
                    entry["target_ratio"] = TARGET_RATIO
                    entry["target_met"] = entry["ratio_full_vs_plain_parse"] >= TARGET_RATIO
                    result["default"] = entry
                else:
                    result["memory_check"] = entry
                if args.profile and n == sizes[0]:
                    prof = work / "full.prof"
                    spec["database"] = _fresh_db(template, work / "run.db")
                    spec["profile"] = str(prof)
                    _spawn("full", spec, spec_path)
                    spec.pop("profile")
                    result["profile"] = _print_profile(str(prof))
                    if args.profile_out:
                        shutil.copy(prof, args.profile_out)
                    result["stages_ms_per_msg"] = stage_breakdown(leads)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    if "memory_check" in result:
        mc = result["memory_check"]
        rss = mc["full"]["peak_rss_mb"]
        mc["target_rss_mb"] = TARGET_RSS_MB
        mc["target_met"] = rss < TARGET_RSS_MB
        if "default" in result:
            mc["rss_vs_default"] = round(rss / result["default"]["full"]["peak_rss_mb"], 3)

    if "default" in result:
        d = result["default"]
        lines += [
            f"{d['messages']} messages ({d['mb']} MB), {args.leads} leads, "
            f"mailbox batch_size {args.batch_size}, median of {args.rounds}",
            f"  full pipeline (run_once): {d['full']['msgs_per_s']:>8} msgs/s  "
            f"peak RSS {d['full']['peak_rss_mb']} MB  kinds {d['full']['kinds']}",
            f"  plain fetch + mail-parser: {d['plain_parse']['msgs_per_s']:>7} msgs/s  "
            f"peak RSS {d['plain_parse']['peak_rss_mb']} MB",
            f"  plain fetch only:          {d['fetch']['msgs_per_s']:>7} msgs/s  "
            f"peak RSS {d['fetch']['peak_rss_mb']} MB",
            f"  ratio full/plain-parse: {d['ratio_full_vs_plain_parse']} "
            f"(target >= {TARGET_RATIO}: {'met' if d['target_met'] else 'NOT met'})",
            f"  ratio full/fetch:       {d['ratio_full_vs_fetch']}",
        ]
    if "memory_check" in result:
        mc = result["memory_check"]
        lines.append(
            f"memory check: {mc['messages']} messages, full pipeline peak RSS "
            f"{mc['full']['peak_rss_mb']} MB ({mc['full']['msgs_per_s']} msgs/s); "
            f"target < {TARGET_RSS_MB} MB: {'met' if mc['target_met'] else 'NOT met'}"
            + (f"; {mc['rss_vs_default']}x the default size's" if "rss_vs_default" in mc else "")
        )
    if "stages_ms_per_msg" in result:
        lines += ["", "pure stages, ms per message (same mix, in-process, no I/O):"]
        lines += [f"  {k:<40} {v:8.3f}" for k, v in result["stages_ms_per_msg"].items()]
    if "profile" in result:
        lines += ["", "cProfile of the full pipeline:", *result["profile"]]
    emit(result, args.json, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
