"""Hostile mail: the worst time per message and the peak memory of a pass over attacks.

Setup (not timed): for each attack of `tests/hostile.py` at the size issue 12 measured
(a 20 MB line, 100,000 encoded words in Subject, 200,000 Content-Type parameters, RFC 2231
continuations, 50,000 encoded words in From, a message/rfc822 nested 300 deep, 20,000
parts, 100,000 header fields, 50,000 References, an HTML bomb, 2,000,000 lines, a 70 MB
attachment), a Maildir holding that one message, from a known lead, and a fresh SQLite
database; and one Maildir of `--ordinary` short genuine replies as the baseline.

Timed, in one child process (its own peak RSS): `Worker(app).run_once()` on each Maildir
in turn — parse, classify, match, record, promote, and send the handoff and follow-up
(to a local Maildir outbox), i.e. everything one message causes.

Prints per attack the seconds, the worst next to the baseline's per-message time, and
the child's peak RSS; targets: worst < 2 s a message, peak < 300 MB.

    .venv/bin/python bench/bench_hostile.py [--ordinary 50] [--json]
"""

from __future__ import annotations

import argparse
import json
import mailbox
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import check_child, run_child  # noqa: E402

TARGET_SECONDS = 2.0
TARGET_RSS_MB = 300.0
SENDER = "attacker@hostile.example"


def child(spec: dict[str, Any]) -> dict[str, Any]:
    """Run one pass on every prepared Maildir; returns seconds per directory."""
    from tests.conftest import base_config
    from worker.app import App
    from worker.leads import import_leads
    from worker.runner import Worker

    out: dict[str, float] = {}
    for name, directory in spec["dirs"].items():
        d = Path(directory)
        config = base_config(
            f"sqlite:///{d / 'twoway.db'}",
            d,
            campaigns=[],
            mailboxes=[{"name": "sales", "kind": "maildir", "path": str(d / "inbox")}],
        )
        app = App.open(config, time_now)
        with app.transaction() as s:
            rows = [(2, {"email": SENDER})] + [
                (i + 3, {"email": f"buyer{i}@company{i}.example.org"})
                for i in range(spec["ordinary"])
            ]
            import_leads(s, rows, time_now())
        worker = Worker(app).start()
        started = time.perf_counter()
        result = worker.run_once()
        out[name] = time.perf_counter() - started
        worker.close()
        app.close()
        assert result.inbound.processed >= 1, (name, result)
    return out


def time_now() -> Any:
    from tests.hostile import NOW_HINT

    return NOW_HINT


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ordinary", type=int, default=50)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(Path(args.child).read_text()))))
        return

    from tests import hostile

    work = Path(tempfile.mkdtemp(prefix="twoway-hostile-"))
    dirs: dict[str, str] = {}
    sizes: dict[str, int] = {}
    scales = {"long_line": 100.0}  # the 20 MB line
    for name, build in hostile.ATTACKS.items():
        d = work / name
        raw = build(SENDER, "sales@example.com", scales.get(name, 1.0))
        sizes[name] = len(raw)
        d.mkdir()
        mailbox.Maildir(d / "inbox", create=True).add(raw)
        del raw
        dirs[name] = str(d)
    d = work / "ordinary"
    d.mkdir()
    box = mailbox.Maildir(d / "inbox", create=True)
    for i in range(args.ordinary):
        box.add(hostile.long_line(f"buyer{i}@company{i}.example.org", "sales@example.com", 0.0001))
    dirs["ordinary"] = str(d)
    spec = work / "spec.json"
    spec.write_text(json.dumps({"dirs": dirs, "ordinary": args.ordinary}))
    run = run_child([sys.executable, __file__, "--child", str(spec)], timeout=1800, cwd=ROOT)
    check_child(run, "hostile pass")
    seconds: dict[str, float] = run.json()
    baseline = seconds.pop("ordinary") / args.ordinary
    worst = max(seconds, key=lambda k: seconds[k])
    report = {
        "attacks": {k: {"seconds": round(v, 3), "bytes": sizes[k]} for k, v in seconds.items()},
        "worst": {"attack": worst, "seconds": round(seconds[worst], 3)},
        "ordinary_seconds_per_message": round(baseline, 4),
        "ratio_worst_to_ordinary": round(seconds[worst] / baseline, 1),
        "peak_rss_mb": run.peak_rss_mb,
        "targets": {
            "worst_under_2s": seconds[worst] < TARGET_SECONDS,
            "peak_under_300mb": run.peak_rss_mb < TARGET_RSS_MB,
        },
    }
    if args.json:
        print(json.dumps(report))
        return
    for k, v in sorted(seconds.items(), key=lambda kv: -kv[1]):
        print(f"{k:24} {sizes[k] / 1e6:8.2f} MB {v:7.3f} s")
    print(f"ordinary reply: {baseline:.4f} s a message ({args.ordinary} messages)")
    print(f"worst: {worst} {seconds[worst]:.3f} s (target < {TARGET_SECONDS} s)")
    print(f"peak RSS of the pass: {run.peak_rss_mb} MB (target < {TARGET_RSS_MB} MB)")


if __name__ == "__main__":
    main()
