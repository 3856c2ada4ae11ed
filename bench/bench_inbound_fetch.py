"""Inbound fetch throughput: twoway's ImapSource.fetch_new against plain imapclient.

Starts a throwaway Dovecot on 127.0.0.1 (the test fixture's server), APPENDs N replies of
about 8 KB, then reads them all back in batches of 500 both ways, each run in its own
subprocess so that peak RSS is that run's alone. Prints messages/s for both, the ratio
(twoway / plain: 1.0 means the wrapper costs nothing) and peak RSS.

    .venv/bin/python bench/bench_inbound_fetch.py [-n 5000] [--rounds 3] [--json]

Needs Dovecot (apt-get install dovecot-imapd) and root (Dovecot's mail uid), like the
tests. Absolute figures depend on the machine; compare the ratio within one run.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from imapclient import IMAPClient  # noqa: E402

from tests.imap_server import PASSWORD, DovecotServer  # noqa: E402
from worker.mailbox import ImapSource  # noqa: E402

BATCH = 500


def reply(n: int, size: int = 8192) -> bytes:
    """A plausible reply of about `size` bytes (headers, new text, quoted history)."""
    head = (
        f"From: Lead {n} <lead{n}@customer.test>\r\nTo: sales@example.test\r\n"
        f"Subject: Re: Your demo request #{n}\r\nMessage-ID: <r{n}@customer.test>\r\n"
        f"In-Reply-To: <o{n}@sales.example.test>\r\nDate: Tue, 01 Dec 2026 10:00:00 +0000\r\n"
        "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n"
        "Thanks, we would like pricing for 40 seats.\r\n\r\n"
    )
    quote = "> Earlier message text that the lead's mail program quoted below the reply.\r\n"
    body = head + quote * ((size - len(head)) // len(quote) + 1)
    return body.encode()[:size]


def populate(server: DovecotServer, user: str, count: int) -> None:
    with server.client(user) as c:
        for start in range(0, count, 200):
            c.multiappend("INBOX", [reply(n) for n in range(start, min(count, start + 200))])


def child(mode: str, port: int, user: str) -> dict[str, Any]:
    """One read of the whole INBOX; runs in a fresh process."""
    started = time.perf_counter()
    count = size = 0
    if mode == "twoway":
        from worker.config import MailboxConfig

        cfg = MailboxConfig.model_validate(
            {"name": "bench", "host": "127.0.0.1", "port": port, "security": "none",
             "username": user, "password": PASSWORD, "timeout": 60}
        )  # fmt: skip
        src = ImapSource(cfg)
        src.connect()
        for batch in src.fetch_new("INBOX", after_uid=0, batch_size=BATCH):
            count += len(batch)
            size += sum(len(m.raw) for m in batch)
        src.close()
    else:
        with IMAPClient("127.0.0.1", port=port, ssl=False, timeout=60) as c:
            c.login(user, PASSWORD)
            c.select_folder("INBOX", readonly=True)
            uids = sorted(c.search(["ALL"]))
            for i in range(0, len(uids), BATCH):
                data = c.fetch(uids[i : i + BATCH], ["FLAGS", "BODY.PEEK[]"])
                count += len(data)
                size += sum(len(d[b"BODY[]"]) for d in data.values())
    seconds = time.perf_counter() - started
    rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"mode": mode, "messages": count, "bytes": size, "seconds": seconds,
            "peak_rss_mb": round(rss_kb / 1024, 1)}  # fmt: skip


def run_child(mode: str, port: int, user: str) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, __file__, "--child", mode, "--port", str(port), "--user", user],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    result: dict[str, Any] = json.loads(out.stdout)
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", "--messages", type=int, default=5000)
    ap.add_argument("--rounds", type=int, default=3, help="runs of each kind; median reported")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--child", choices=["twoway", "plain"], help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--user", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.port, args.user)))
        return 0
    if shutil.which("dovecot") is None:
        print("dovecot is not installed (apt-get install dovecot-imapd)", file=sys.stderr)
        return 1

    root = Path(tempfile.mkdtemp(prefix="twoway-bench-"))
    server = DovecotServer(root)
    try:
        server.start()
        user = server.fresh_user()
        t0 = time.perf_counter()
        populate(server, user, args.messages)
        append_s = time.perf_counter() - t0
        run_child("plain", server.port, user)  # warm Dovecot's index and the page cache
        runs: dict[str, list[dict[str, Any]]] = {"twoway": [], "plain": []}
        for _ in range(args.rounds):
            for mode in ("twoway", "plain"):  # alternate so drift hits both alike
                runs[mode].append(run_child(mode, server.port, user))
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)

    def summary(mode: str) -> dict[str, Any]:
        rs = runs[mode]
        assert all(r["messages"] == args.messages for r in rs), rs
        secs = statistics.median(r["seconds"] for r in rs)
        return {
            "msgs_per_s": round(args.messages / secs),
            "mb_per_s": round(rs[0]["bytes"] / secs / 1e6, 1),
            "seconds": round(secs, 3),
            "peak_rss_mb": max(r["peak_rss_mb"] for r in rs),
        }

    result = {
        "messages": args.messages,
        "message_bytes": len(reply(0)),
        "batch_size": BATCH,
        "rounds": args.rounds,
        "append_msgs_per_s": round(args.messages / append_s),
        "twoway": summary("twoway"),
        "plain_imapclient": summary("plain"),
    }
    result["ratio"] = round(
        result["twoway"]["msgs_per_s"] / result["plain_imapclient"]["msgs_per_s"], 3
    )
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        tw, pl = result["twoway"], result["plain_imapclient"]
        print(f"{args.messages} messages of {result['message_bytes']} bytes, batches of {BATCH}, "
              f"median of {args.rounds}")  # fmt: skip
        print(f"  twoway fetch_new : {tw['msgs_per_s']:>7} msgs/s  {tw['mb_per_s']:>6} MB/s  "
              f"peak RSS {tw['peak_rss_mb']} MB")  # fmt: skip
        print(f"  plain imapclient : {pl['msgs_per_s']:>7} msgs/s  {pl['mb_per_s']:>6} MB/s  "
              f"peak RSS {pl['peak_rss_mb']} MB")  # fmt: skip
        print(f"  ratio twoway/plain: {result['ratio']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
