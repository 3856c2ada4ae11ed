"""Outbound throughput: twoway's Mailer against a plain smtplib loop, in the same run.

Starts an aiosmtpd sink on 127.0.0.1, builds N messages with `compose`, then sends them
with a plain `smtplib.SMTP.send_message` loop over one connection and with `Mailer` (one
reused connection, retry machinery armed). Rounds alternate the two so that a noisy,
shared machine hurts both alike; the best round of each is reported.

    .venv/bin/python bench/bench_outbound.py [-n 2000] [--rounds 3] [--json]

The ratio Mailer/plain is the figure to watch (target >= 0.7); absolute rates depend on
the machine and mostly measure the Python SMTP server. The sink runs in a process of its
own, as any SMTP server does (`--sink-in-process`: in this one, sharing its interpreter
lock, as before 2026-12-03 evening); it answers at once, the adversarial case for the
client's own work, unless `--sink-delay-ms D` makes it wait D ms before each reply to
MAIL, RCPT and DATA, as a server across a network does.

The whole send path is measured too (rounds alternate with the plain loop): N leads due
step 1 in a SQLite database, queued by `queue_due`, then `send_due` (each row claimed right
before its SMTP call, rendered from the templates, sent by a Mailer, its outcome
recorded) against the same plain smtplib loop over N pre-built messages (target >= 0.9).
With `--pg-url URL` (default $TWOWAY_TEST_PG_URL when `--pg` is given) the whole send
path runs on PostgreSQL too, each round in a throwaway schema of that database:

    .venv/bin/python bench/bench_outbound.py --json --pg
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import smtplib
import sys
import time
from email.message import EmailMessage
from multiprocessing.connection import Connection
from typing import Any

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session

from worker.compose import compose, new_message_id, reply_address
from worker.config import SmtpConfig
from worker.mailer import Mailer

HOST = "127.0.0.1"
ENVELOPE_FROM = "bounces@acme.example"


class _Sink:
    """Accepts everything; `delay` seconds before each reply to MAIL, RCPT and DATA (the
    round trip to a server across a network; 0: loopback, the adversarial case)."""

    def __init__(self, delay: float = 0.0) -> None:
        self.count = 0
        self.delay = delay

    async def handle_MAIL(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        if self.delay:
            await asyncio.sleep(self.delay)
        envelope.mail_from, envelope.mail_options = address, options
        return "250 OK"

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        if self.delay:
            await asyncio.sleep(self.delay)
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        if self.delay:
            await asyncio.sleep(self.delay)
        self.count += 1
        return "250 2.0.0 OK"


class _SinkController(Controller):
    def _trigger_server(self) -> None:
        assert isinstance(self.server, asyncio.Server)
        self.port = self.server.sockets[0].getsockname()[1]  # port 0: learn the real one
        super()._trigger_server()  # type: ignore[no-untyped-call]


def _serve(pipe: Connection, delay: float) -> None:
    """The sink in a process of its own (as an SMTP server is): sends its port, then, when
    asked, how many messages it received, and stops."""
    sink = _Sink(delay)
    controller = _SinkController(sink, hostname=HOST, port=0)
    controller.start()
    pipe.send(controller.port)
    pipe.recv()
    controller.stop()
    pipe.send(sink.count)


class _SinkProcess:
    """`_Sink` run in its own process: the client's and the server's CPU apart."""

    def __init__(self, delay: float = 0.0) -> None:
        self._pipe, theirs = multiprocessing.Pipe()
        self._process = multiprocessing.get_context("spawn").Process(
            target=_serve, args=(theirs, delay), daemon=True
        )
        self._process.start()
        self.port: int = self._pipe.recv()

    def stop(self) -> int:
        self._pipe.send("stop")
        count: int = self._pipe.recv()
        self._process.join(10)
        return count


def build_messages(n: int) -> list[tuple[EmailMessage, str]]:
    """N realistic nurture emails (about 3 KB each) and their recipients."""
    text = (
        "Hi {name},\n\nThanks for getting in touch. Most operations teams come to us with "
        "the same story: routes planned in spreadsheets and dispatch in one person's head.\n" * 6
    )
    html = "<p>" + text.replace("\n\n", "</p><p>") + "</p>"
    out = []
    for i in range(n):
        to = f"lead{i}@example.net"
        msg = compose(
            from_addr="sales@acme.example",
            from_name="Acme Sales",
            to_addr=to,
            to_name=f"Lead Number {i}",
            subject=f"Welcome, lead {i} — three ways to get started",
            text=text.format(name=f"Lead {i}"),
            html=html.format(name=f"Lead {i}"),
            message_id=new_message_id("acme.example"),
            domain="acme.example",
            reply_to=reply_address("sales@acme.example", f"tok{i:06d}"),
            unsubscribe_url=f"https://acme.example/unsubscribe/tok{i:06d}",
            unsubscribe_mailto=f"sales+unsubscribe-tok{i:06d}@acme.example",
            auto_submitted=True,
        )
        out.append((msg, to))
    return out


def run_plain(port: int, messages: list[tuple[EmailMessage, str]]) -> float:
    start = time.perf_counter()
    with smtplib.SMTP(HOST, port) as conn:
        for msg, to in messages:
            conn.send_message(msg, ENVELOPE_FROM, [to])
    return time.perf_counter() - start


def run_mailer(port: int, messages: list[tuple[EmailMessage, str]]) -> float:
    cfg = SmtpConfig(kind="smtp", host=HOST, port=port, security="none")
    start = time.perf_counter()
    with Mailer(cfg) as mailer:
        for msg, to in messages:
            result = mailer.send(msg, ENVELOPE_FROM, [to])
            if result.status != "sent":
                raise SystemExit(f"send failed: {result}")
    return time.perf_counter() - start


def run_send_due(port: int, n: int, pg_url: str | None = None) -> float:
    """`send_due` over N queued step-1 emails in a fresh SQLite database (or a fresh
    schema of the PostgreSQL at `pg_url`); seconds taken."""
    import contextlib
    import tempfile
    from datetime import UTC, datetime
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _common import ROOT, base_config

    sys.path.insert(0, str(ROOT))
    from tests.conftest import pg_schema  # the tests' throwaway schema
    from worker.app import App
    from worker.config import config_from_dict
    from worker.leads import import_leads
    from worker.outbox import send_due
    from worker.rendering import Renderer
    from worker.sequences import queue_due

    with tempfile.TemporaryDirectory() as d, contextlib.ExitStack() as stack:
        url = stack.enter_context(pg_schema(pg_url, "bench_out")) if pg_url else None
        data = base_config(
            url or f"sqlite:///{d}/out.db",
            smtp={"kind": "smtp", "host": HOST, "port": port, "security": "none"},
            sender={"from": "Acme Sales <sales@acme.example>",
                    "unsubscribe_url": "https://acme.example/u/{token}"},
        )  # fmt: skip
        data["campaigns"][0]["send_window"] = None
        config = config_from_dict(data, Path(d) / "twoway.yaml")
        now = datetime.now(UTC)
        app = App.open(config, lambda: now)
        rows = [(i + 2, {"email": f"lead{i}@example.net", "first_name": f"Lead{i}"})
                for i in range(n)]  # fmt: skip
        with app.transaction() as s:
            import_leads(s, rows, now, campaign=config.campaign("welcome"))
        queued = queue_due(app)
        if queued != n:
            raise SystemExit(f"queued {queued} of {n}")
        assert config.smtp is not None
        mailer = Mailer(config.smtp)
        start = time.perf_counter()
        sent = send_due(app, Renderer(config.templates_path), lambda _t: mailer)
        seconds = time.perf_counter() - start
        mailer.close()
        app.close()
        if sent != n:
            raise SystemExit(f"send_due sent {sent} of {n}")
        return seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("-n", "--messages", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--pg", action="store_true", help="the send path on PostgreSQL too")
    parser.add_argument("--pg-url", default=os.environ.get("TWOWAY_TEST_PG_URL"))
    parser.add_argument(
        "--sink-in-process",
        action="store_true",
        help="run the SMTP sink in this process (sharing its GIL) instead of its own",
    )
    parser.add_argument(
        "--sink-delay-ms",
        type=float,
        default=0.0,
        help="the sink waits this long before each reply to MAIL, RCPT and DATA (default 0)",
    )
    args = parser.parse_args(argv)
    if args.pg and not args.pg_url:
        parser.error("--pg needs --pg-url or TWOWAY_TEST_PG_URL")

    sink: _Sink | None = None
    if args.sink_in_process:
        sink = _Sink(args.sink_delay_ms / 1000)
        local = _SinkController(sink, hostname=HOST, port=0)
        local.start()
        controller: _SinkController | _SinkProcess = local
    else:
        controller = _SinkProcess(args.sink_delay_ms / 1000)
    try:
        messages = build_messages(args.messages)
        run_plain(controller.port, messages[:50])  # warm both paths up
        run_mailer(controller.port, messages[:50])
        plain_times, mailer_times, due_times, plain2 = [], [], [], []
        for _ in range(args.rounds):
            plain_times.append(run_plain(controller.port, messages))
            mailer_times.append(run_mailer(controller.port, messages))
        for _ in range(args.rounds):
            plain2.append(run_plain(controller.port, messages))
            due_times.append(run_send_due(controller.port, args.messages))
        pg_times, plain3 = [], []
        for _ in range(args.rounds if args.pg else 0):
            plain3.append(run_plain(controller.port, messages))
            pg_times.append(run_send_due(controller.port, args.messages, args.pg_url))
    finally:
        if isinstance(controller, _SinkProcess):
            received = controller.stop()
        else:
            controller.stop()
            received = sink.count if sink is not None else 0

    n = args.messages
    plain_rate = n / min(plain_times)
    mailer_rate = n / min(mailer_times)
    result: dict[str, Any] = {
        "messages": n,
        "rounds": args.rounds,
        "message_bytes": len(messages[0][0].as_bytes()),
        "plain_smtplib_msgs_per_s": round(plain_rate, 1),
        "mailer_msgs_per_s": round(mailer_rate, 1),
        "ratio": round(mailer_rate / plain_rate, 3),
        "send_due_msgs_per_s": round(n / min(due_times), 1),
        "plain_smtplib_msgs_per_s_2": round(n / min(plain2), 1),
        "send_due_ratio": round(min(plain2) / min(due_times), 3),
        "sink": "in this process" if args.sink_in_process else "its own process",
        "sink_delay_ms": args.sink_delay_ms,
        "received": received,
    }
    if pg_times:
        result["send_due_pg_msgs_per_s"] = round(n / min(pg_times), 1)
        result["plain_smtplib_msgs_per_s_3"] = round(n / min(plain3), 1)
        result["send_due_pg_ratio"] = round(min(plain3) / min(pg_times), 3)
    if args.json:
        print(json.dumps(result))
    else:
        print(f"messages:      {n} x {result['message_bytes']} bytes, best of {args.rounds}")
        print(f"plain smtplib: {plain_rate:8.1f} msgs/s")
        print(f"Mailer:        {mailer_rate:8.1f} msgs/s")
        print(f"ratio:         {result['ratio']:.3f} (Mailer / plain)")
        print(f"send_due:      {result['send_due_msgs_per_s']:8.1f} msgs/s (claim, render, send,")
        print(f"               record) vs plain {result['plain_smtplib_msgs_per_s_2']:8.1f}: ")
        print(f"               ratio {result['send_due_ratio']:.3f} (target >= 0.9)")
        if pg_times:
            print(f"send_due (pg): {result['send_due_pg_msgs_per_s']:8.1f} msgs/s vs plain "
                  f"{result['plain_smtplib_msgs_per_s_3']:8.1f}: ratio "
                  f"{result['send_due_pg_ratio']:.3f}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
