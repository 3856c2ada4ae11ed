"""Conversion events to a CRM's webhook (a real HTTP receiver on 127.0.0.1): signed,
deduplicable, retried, never lost across SIGKILLs, dead-lettered when the endpoint stays
broken."""

from __future__ import annotations

import json
import mailbox
import os
import random
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from email import policy
from email.parser import BytesParser
from pathlib import Path
from typing import Any

import pytest
import yaml
from sqlalchemy import select

from tests import mails
from tests.conftest import base_config, base_config_data, twoway_cmd
from tests.webhook_receiver import Receiver
from worker.app import App
from worker.leads import import_leads, mark_lead
from worker.models import CrmEvent
from worker.runner import Worker
from worker.webhooks import retry_dead, sign, verify

SECRET = b"whsec-test-0123456789"
MONDAY = datetime(2026, 11, 30, 10, 0, tzinfo=UTC)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver(SECRET)
    yield r
    r.stop()


def hook(url: str, secret_file: Path, **extra: Any) -> dict[str, Any]:
    return {"name": "crm", "url": url, "secret_file": str(secret_file), **extra}


def test_it_signs_over_the_timestamp_and_the_body() -> None:
    body = b'{"id": "evt_1"}'
    header = sign(SECRET, 1764583200, body)
    assert header.startswith("t=1764583200,v1=") and len(header.split("v1=")[1]) == 64
    assert verify(SECRET, header, body)
    assert not verify(SECRET, header, body + b" ")
    assert not verify(b"other", header, body)
    assert not verify(SECRET, header.replace("t=1764583200", "t=1764583201"), body)
    assert not verify(SECRET, "garbage", body)


def test_it_sends_the_conversion_record_on_promotion_and_later_changes(
    database_url: str,
    tmp_path: Path,
    receiver: Receiver,
    start_worker: Callable[[App], Worker],
) -> None:
    secret = tmp_path / "hook.secret"
    secret.write_bytes(SECRET + b"\n")
    config = base_config(database_url, tmp_path, webhooks=[hook(receiver.url, secret)])
    clock = [MONDAY]
    app = App.open(config, lambda: clock[0])
    with app.transaction() as s:
        import_leads(
            s,
            [(2, {"email": "maria@acme-robotics.es", "first_name": "Maria", "last_name": "Gil",
                  "company": "Acme Robotics", "industry": "software", "company_size": "120",
                  "country": "ES", "title": "CTO", "webinar": "2026-11"})],
            clock[0],
            campaign=config.campaign("welcome"),
        )  # fmt: skip
    worker = start_worker(app)
    worker.run_once()
    outbox = mailbox.Maildir(tmp_path / "outbox")
    step1 = BytesParser(policy=policy.default).parsebytes(
        outbox.get_bytes(next(iter(outbox.keys())))
    )
    clock[0] = MONDAY + timedelta(hours=2)
    mailbox.Maildir(tmp_path / "inbox").add(
        mails.reply(step1, "Yes, send me pricing for 50 seats please.", clock[0])
    )
    assert worker.run_once().delivered == 1
    (key,) = receiver.keys()
    body = json.loads(next(iter(receiver.bodies[key])))
    assert body["id"] == key and body["type"] == "lead.promoted"
    assert body["account"] == {
        "name": "Acme Robotics", "domain": "acme-robotics.es", "industry": "software",
        "size": 120, "annual_revenue": None, "country": "ES",
    }  # fmt: skip
    assert body["contact"]["email"] == "maria@acme-robotics.es"
    assert body["contact"]["custom"] == {"webinar": "2026-11"}
    opp = body["opportunity"]
    assert opp["name"] == "Acme Robotics — Maria Gil"
    assert (opp["stage"], opp["owner"]) == ("prospect", "ana@example.com")
    assert (opp["source_campaign"], opp["source_step"]) == ("welcome", 1)
    assert "pricing for 50 seats" in opp["reply_text"]
    assert opp["score"] is not None and opp["checklist"]

    with app.transaction() as s:
        mark_lead(s, "maria@acme-robotics.es", "customer", clock[0], "signed")
    assert worker.run_once().delivered == 1
    types = sorted(json.loads(b)["type"] for bodies in receiver.bodies.values() for b in bodies)
    assert types == ["lead.customer", "lead.promoted"]
    assert receiver.bad_signatures == 0


def test_it_dead_letters_a_broken_endpoint_and_retries_it_on_request(
    database_url: str,
    tmp_path: Path,
    start_worker: Callable[[App], Worker],
) -> None:
    broken = Receiver(SECRET, ["500"])
    secret = tmp_path / "hook.secret"
    secret.write_bytes(SECRET)
    config = base_config(
        database_url, tmp_path,
        webhooks=[hook(broken.url, secret, max_attempts=3, backoff_seconds=60)],
    )  # fmt: skip
    clock = [MONDAY]
    app = App.open(config, lambda: clock[0])
    with app.transaction() as s:
        import_leads(s, [(2, {"email": "x@example.org"})], clock[0])
        mark_lead(s, "x@example.org", "disqualified", clock[0], "no budget")
    worker = start_worker(app)
    for minutes in (0, 2, 5, 10, 20):  # backoff 60 s, 120 s, …: three attempts in all
        clock[0] = MONDAY + timedelta(minutes=minutes)
        worker.run_once()
    assert broken.requests == 3
    from worker.status import collect_status

    status = collect_status(app)["webhooks"]
    assert (status["dead"], status["pending"]) == (1, 0)
    assert status["dead_letters"][0]["event"] == "lead.disqualified"
    assert status["dead_letters"][0]["last_error"] == "HTTP 500 Internal Server Error"
    with app.transaction() as s:
        assert retry_dead(s, clock[0]) == 1
    worker.run_once()
    assert broken.requests == 4
    broken.stop()


def test_every_event_arrives_across_sigkills_and_bursts_of_failures(
    sqlite_url: str, tmp_path: Path
) -> None:
    flaky = Receiver(SECRET, ["ok"] * 4 + ["500"] * 3 + ["timeout"] * 2 + ["ok"] * 3, hang=1.5)
    broken = Receiver(SECRET, ["500"])
    data = base_config_data(
        sqlite_url, tmp_path,
        webhooks=[
            {"name": "crm", "url": flaky.url, "secret": "${HOOK_SECRET}", "timeout": 0.5,
             "backoff_seconds": 0.05, "max_attempts": 100},
            {"name": "broken", "url": broken.url, "secret": "${HOOK_SECRET}",
             "events": ["lead.customer"], "timeout": 0.5, "backoff_seconds": 0.05,
             "max_attempts": 2},
        ],
    )  # fmt: skip
    data["mailboxes"][0]["poll_interval"] = 0.2
    cfg = tmp_path / "twoway.yaml"
    cfg.write_text(yaml.safe_dump(data))
    config = base_config(sqlite_url, tmp_path, **{k: v for k, v in data.items() if k == "smtp"})
    app = App.open(config, lambda: datetime.now(UTC))
    n = 30
    with app.transaction() as s:
        import_leads(s, [(i + 2, {"email": f"c{i}@example.org"}) for i in range(n)], app.now())
        for i in range(n):
            status = "customer" if i % 2 else "unsubscribed"
            mark_lead(s, f"c{i}@example.org", status, app.now(), "by hand")
    with app.transaction() as s:
        keys = set(s.scalars(select(CrmEvent.key)))
    app.close()
    assert len(keys) == n
    env = {**os.environ, "HOOK_SECRET": SECRET.decode()}
    env.pop("TWOWAY_NOW", None)
    rng = random.Random(16)

    def start() -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            twoway_cmd(cfg, "run"), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )

    kills = 0
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        proc = start()
        if kills < 6:
            time.sleep(rng.uniform(0.5, 1.5))
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            kills += 1
            continue
        while time.monotonic() < deadline and flaky.keys() != keys:
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0, proc.stderr.read() if proc.stderr else ""
        break
    assert flaky.keys() == keys  # every event arrived at least once
    # Deduplicated by the idempotency key, each event is exactly one body.
    assert all(len(bodies) == 1 for bodies in flaky.bodies.values())
    assert flaky.bad_signatures == 0 and broken.bad_signatures == 0
    assert flaky.requests > n  # failures and kills made it send some more than once
    print(
        f"{n} events: {flaky.requests} requests to the flaky endpoint, "
        f"{broken.requests} to the broken one, {kills} SIGKILLs"
    )
    out = subprocess.run(
        twoway_cmd(cfg, "status", "--json"), env=env, capture_output=True, text=True, check=True
    )
    hooks = json.loads(out.stdout)["webhooks"]
    assert hooks["dead"] == n // 2  # the customers' events, to the endpoint that always fails
    assert {d["endpoint"] for d in hooks["dead_letters"]} == {"broken"}
    text = subprocess.run(
        twoway_cmd(cfg, "status"), env=env, capture_output=True, text=True, check=True
    ).stdout
    assert f"dead {n // 2}" in text and "to broken after 2 attempt(s): HTTP 500" in text
    flaky.stop()
    broken.stop()


def test_two_workers_delivering_at_once_send_each_event_once(
    database_url: str, tmp_path: Path, receiver: Receiver
) -> None:
    import threading

    from worker.webhooks import deliver_due

    secret = tmp_path / "hook.secret"
    secret.write_bytes(SECRET)
    config = base_config(database_url, tmp_path, webhooks=[hook(receiver.url, secret)])
    apps = [App.open(config, lambda: datetime.now(UTC)) for _ in range(2)]
    with apps[0].transaction() as s:
        import_leads(s, [(i + 2, {"email": f"w{i}@example.org"}) for i in range(40)], MONDAY)
        for i in range(40):
            mark_lead(s, f"w{i}@example.org", "customer", MONDAY, None)
    delivered: list[int] = []
    threads = [threading.Thread(target=lambda a=a: delivered.append(deliver_due(a))) for a in apps]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert sum(delivered) == 40
    assert receiver.requests == 40 and len(receiver.keys()) == 40  # none sent twice
    for a in apps:
        a.close()
