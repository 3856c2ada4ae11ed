"""Hostile mail: the worst time per message and the peak memory of a pass over attacks.

Setup (not timed): for each attack of `tests/hostile.py` at the size issue 12 measured
(a 20 MB line, 100,000 encoded words in Subject, 200,000 Content-Type parameters, RFC 2231
continuations, 50,000 encoded words in From, a message/rfc822 nested 300 deep, 20,000
parts, 100,000 header fields, 50,000 References, an HTML bomb, 2,000,000 lines, a 70 MB
attachment), a Maildir holding that one message, from a known lead, and a fresh SQLite
database; and one Maildir of `--ordinary` short genuine replies as the baseline.

Also (unless `--no-imap`): the 70 MB attachment in a throwaway Dovecot's INBOX, read over
IMAP (`imap_big_attachment`: RFC822.SIZE, then a partial fetch of its first 16 MiB). And
the template attacks of `tests/hostile.py` (nested `range(100000)` loops, a template
writing 3 GB, 30 MB emails, and every way a value can grow), each rendered as
`templates lint` and the outbox render it, stopped by the render limits.

Timed, in one child process (its own peak RSS): `Worker(app).run_once()` on each mailbox
in turn — parse, classify, match, record, promote, and send the handoff and follow-up
(to a local Maildir outbox), i.e. everything one message causes; then each template
attack's `Renderer.render()` until it stops with its limit.

Prints per attack the seconds, the worst next to the baseline's per-message time, and
the child's peak RSS (mail and templates together); targets: worst < 2 s a message,
peak < 300 MB.

    .venv/bin/python bench/bench_hostile.py [--ordinary 50] [--no-imap] [--json]
"""

from __future__ import annotations

import argparse
import contextlib
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

from _common import check_child, dovecot, run_child  # noqa: E402

TARGET_SECONDS = 2.0
TARGET_RSS_MB = 300.0
SENDER = "attacker@hostile.example"


def child(spec: dict[str, Any]) -> dict[str, Any]:
    """Run one pass on every prepared Maildir; returns seconds per directory."""
    from tests.conftest import base_config
    from worker.app import App
    from worker.leads import import_leads
    from worker.runner import Worker

    out: dict[str, Any] = {}
    for name, directory in spec["dirs"].items():
        d = Path(directory)
        section = spec["imap"].get(name) or {
            "name": "sales",
            "kind": "maildir",
            "path": str(d / "inbox"),
        }
        config = base_config(f"sqlite:///{d / 'twoway.db'}", d, campaigns=[], mailboxes=[section])
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
    out["templates"] = templates(Path(spec["templates"]))
    out["peak_rss_mb"] = own_peak_rss_mb()
    return out


def own_peak_rss_mb() -> float:
    """This process's peak RSS since exec (VmHWM). Not os.wait4's ru_maxrss: on Linux a
    child starts with its parent's peak, and the parent built the 70 MB messages."""
    with open("/proc/self/status") as status:
        kb = next(line.split()[1] for line in status if line.startswith("VmHWM:"))
    return round(int(kb) / 1024, 1)


def templates(root: Path) -> dict[str, dict[str, Any]]:
    """Render each template attack; seconds until it stopped, and the reason it gives."""
    from tests import hostile
    from worker.rendering import Renderer, TemplateError, sample_context

    renderer = Renderer(root)
    context = sample_context()
    attacks = {
        **{name: source for name, source in hostile.TEMPLATE_ATTACKS.items()},
        **{f"growth/{name}": source for name, (source, _) in hostile.TEMPLATE_GROWTH.items()},
    }
    out: dict[str, dict[str, Any]] = {}
    for name, source in attacks.items():
        folder = root / name
        folder.mkdir(parents=True)
        (folder / "subject.txt").write_text("Hello")
        (folder / "body.txt").write_text(source + "\n")
        (folder / "body.html").write_text("<p>Hello</p>")
        started = time.perf_counter()
        try:
            renderer.render(name, context)
            reason = "rendered"
        except TemplateError as e:
            reason = e.message
        out[name] = {"seconds": round(time.perf_counter() - started, 3), "stopped": reason}
    return out


def time_now() -> Any:
    from tests.hostile import NOW_HINT

    return NOW_HINT


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ordinary", type=int, default=50)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--no-imap", action="store_true", help="skip the Dovecot case")
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
    imap: dict[str, dict[str, Any]] = {}
    with contextlib.ExitStack() as stack:
        if not args.no_imap:
            server = stack.enter_context(dovecot())
            user = server.fresh_user()
            raw = hostile.big_attachment(SENDER, user)
            server.append(user, "INBOX", raw)
            sizes["imap_big_attachment"] = len(raw)
            del raw
            d = work / "imap_big_attachment"
            d.mkdir()
            dirs["imap_big_attachment"] = str(d)
            imap["imap_big_attachment"] = server.mailbox_section(user, timeout=60)
        spec = work / "spec.json"
        spec.write_text(
            json.dumps(
                {
                    "dirs": dirs,
                    "imap": imap,
                    "ordinary": args.ordinary,
                    "templates": str(work / "templates"),
                }
            )
        )
        run = run_child([sys.executable, __file__, "--child", str(spec)], timeout=1800, cwd=ROOT)
    check_child(run, "hostile pass")
    seconds: dict[str, Any] = run.json()
    rendered: dict[str, dict[str, Any]] = seconds.pop("templates")
    peak = seconds.pop("peak_rss_mb")
    worst_template = max(rendered, key=lambda k: rendered[k]["seconds"])
    baseline = seconds.pop("ordinary") / args.ordinary
    worst = max(seconds, key=lambda k: seconds[k])
    report = {
        "attacks": {k: {"seconds": round(v, 3), "bytes": sizes[k]} for k, v in seconds.items()},
        "worst": {"attack": worst, "seconds": round(seconds[worst], 3)},
        "ordinary_seconds_per_message": round(baseline, 4),
        "ratio_worst_to_ordinary": round(seconds[worst] / baseline, 1),
        "templates": rendered,
        "worst_template": {"attack": worst_template, **rendered[worst_template]},
        "templates_all_stopped": all(r["stopped"] != "rendered" for r in rendered.values()),
        "peak_rss_mb": peak,
        "targets": {
            "worst_under_2s": seconds[worst] < TARGET_SECONDS,
            "peak_under_300mb": peak < TARGET_RSS_MB,
        },
    }
    if args.json:
        print(json.dumps(report))
        return
    for k, v in sorted(seconds.items(), key=lambda kv: -kv[1]):
        print(f"{k:24} {sizes[k] / 1e6:8.2f} MB {v:7.3f} s")
    for k, r in sorted(rendered.items(), key=lambda kv: -kv[1]["seconds"]):
        print(f"template {k:30} {r['seconds']:7.3f} s  {r['stopped'][:90]}")
    print(f"ordinary reply: {baseline:.4f} s a message ({args.ordinary} messages)")
    print(f"worst: {worst} {seconds[worst]:.3f} s (target < {TARGET_SECONDS} s)")
    print(f"peak RSS of the pass: {peak} MB (target < {TARGET_RSS_MB} MB)")


if __name__ == "__main__":
    main()
