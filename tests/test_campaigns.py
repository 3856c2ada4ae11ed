"""Campaign controls against a real SMTP server (aiosmtpd) on SQLite and PostgreSQL:
pause/resume, enroll/unenroll, the do-not-contact list, the touch cap and variants."""

from __future__ import annotations

import itertools
import mailbox
from collections import Counter, defaultdict
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from tests import mails
from tests.conftest import base_config
from tests.smtp_server import SmtpServer
from worker.app import App
from worker.campaigns import (
    Segment,
    campaign_stats,
    enroll_segment,
    pause_campaign,
    resume_campaign,
    two_proportion_p,
    unenroll_segment,
)
from worker.leads import import_leads, show_lead
from worker.models import OutboundMessage
from worker.runner import Worker
from worker.suppression import import_suppressions

MONDAY = datetime(2026, 11, 30, 10, 0, tzinfo=UTC)
STEPS = [
    {"template": "nurture/welcome", "delay": "0d"},
    {"template": "nurture/case-study", "delay": "1d"},
    {"template": "nurture/last-call", "delay": "1d"},
]


def rows(emails: list[str], **fields: str) -> list[tuple[int, dict[str, str | None]]]:
    return [(i + 2, {"email": e, **fields}) for i, e in enumerate(emails)]


class World:
    """An app on a moving clock, a worker, and the SMTP server it sends to."""

    def __init__(self, database_url: str, tmp_path: Path, server: SmtpServer, **cfg: Any) -> None:
        self.config = base_config(database_url, tmp_path, **cfg)
        self.clock = [MONDAY]
        self.app = App.open(self.config, lambda: self.clock[0])
        self.worker = Worker(self.app).start()
        self.smtp = server
        self.inbox = mailbox.Maildir(tmp_path / "inbox")

    def run(self, at: datetime | None = None) -> int:
        if at is not None:
            self.clock[0] = at
        return self.worker.run_once().sent

    def import_(self, emails: list[str], campaign: str | None = None, **fields: str) -> Any:
        with self.app.transaction() as s:
            camp = self.config.campaign(campaign) if campaign else None
            return import_leads(s, rows(emails, **fields), self.clock[0], campaign=camp)

    def sent_to(self) -> Counter[str]:
        return Counter(self.smtp.recipients())

    def close(self) -> None:
        self.worker.close()
        self.app.close()

    def __enter__(self) -> World:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@pytest.fixture
def make_world(database_url: str, tmp_path: Path, smtp_server: SmtpServer) -> Iterator[Any]:
    made: list[World] = []

    def make(max_per_minute: int | None = None, **cfg: Any) -> World:
        cfg.setdefault("smtp", smtp_server.section(max_per_minute=max_per_minute))
        w = World(database_url, tmp_path, smtp_server, **cfg)
        made.append(w)
        return w

    yield make
    for w in made:
        w.close()


def campaign_data(name: str, steps: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return {"name": name, "mailbox": "sales", "send_window": None, "steps": steps or STEPS}


def test_it_sends_nothing_while_paused_and_resumes_within_the_caps(make_world: Any) -> None:
    w: World = make_world(campaigns=[campaign_data("welcome")], max_per_minute=5)
    config = w.config
    leads = [f"p{i}@company{i}.example.org" for i in range(12)]
    w.import_(leads, "welcome")
    with w.app.transaction() as s:
        assert pause_campaign(s, config, "welcome", w.clock[0]) == 12

    for hours in (0, 1, 30, 72):  # passes over three days: nothing leaves
        w.run(MONDAY + timedelta(hours=hours))
    assert w.smtp.messages == []
    with w.app.transaction() as s:
        shown = show_lead(s, leads[0])
    assert shown["enrollments"][0]["waiting"] == "campaign welcome is paused"
    assert "campaign_paused" in [e["type"] for e in shown["events"]]

    resumed_at = MONDAY + timedelta(days=3)
    with w.app.transaction() as s:
        r = resume_campaign(s, config, "welcome", resumed_at)
    assert (r.leads, r.spread) == (12, 12)
    per_minute: list[int] = []
    for minute in range(4):
        before = len(w.smtp.messages)
        w.run(resumed_at + timedelta(minutes=minute, seconds=1 + minute))
        per_minute.append(len(w.smtp.messages) - before)
    assert per_minute == [5, 5, 2, 0]  # spread by the cap, not one burst
    assert w.sent_to() == Counter(leads)
    with w.app.transaction() as s:
        assert "campaign_resumed" in [e["type"] for e in show_lead(s, leads[0])["events"]]


def test_it_sends_nothing_more_to_an_unenrolled_lead(make_world: Any) -> None:
    w: World = make_world(campaigns=[campaign_data("welcome")])
    leads = ["u0@example.org", "u1@example.org", "u2@example.org"]
    w.import_(leads, "welcome")
    assert w.run() == 3
    with w.app.transaction() as s:
        steps = campaign_stats(s, w.config)[0]["steps"]
    assert [(st["sent"], st["waiting"]) for st in steps] == [(3, 0), (0, 3), (0, 0)]
    with w.app.transaction() as s:
        out = unenroll_segment(
            s, w.config, "welcome", Segment(emails=("u1@example.org",)), w.clock[0]
        )
    assert out == 1
    for day in (1, 2, 3, 4):
        w.run(MONDAY + timedelta(days=day, minutes=1))
    assert w.sent_to() == Counter({"u0@example.org": 3, "u2@example.org": 3, "u1@example.org": 1})
    with w.app.transaction() as s:
        shown = show_lead(s, "u1@example.org")
    assert shown["enrollments"][0]["state"] == "stopped"
    assert [e["type"] for e in shown["events"]][-1] == "unenrolled"


def test_it_enrolls_a_segment_already_in_the_database_and_sends_step_1_once(
    make_world: Any,
) -> None:
    w: World = make_world(campaigns=[campaign_data("welcome")])
    w.import_([f"de{i}@example.org" for i in range(3)], country="DE", industry="Software")
    w.import_([f"fr{i}@example.org" for i in range(2)], country="FR", industry="Software")
    assert w.run() == 0  # nobody is enrolled yet
    segment = Segment(countries=("de",), industries=("software",))
    with w.app.transaction() as s:
        first = enroll_segment(s, w.config, "welcome", segment, w.clock[0])
    assert first.enrolled == 3
    assert w.run(MONDAY + timedelta(minutes=1)) == 3
    with w.app.transaction() as s:
        again = enroll_segment(s, w.config, "welcome", segment, w.clock[0])
    assert (again.enrolled, again.already) == (0, 3)
    w.run(MONDAY + timedelta(minutes=2))
    step1 = [m for m in w.smtp.parsed() if "welcome" in str(m["Subject"]).lower()]
    assert Counter(str(m["To"]).split("<")[-1].rstrip(">") for m in w.smtp.parsed()) == Counter(
        {f"de{i}@example.org": 1 for i in range(3)}
    )
    assert len(step1) <= 3
    with w.app.transaction() as s:
        events = [e["type"] for e in show_lead(s, "de0@example.org")["events"]]
    assert "enrolled" in events


def test_it_never_mails_a_suppressed_domain_from_any_campaign(make_world: Any) -> None:
    w: World = make_world(campaigns=[campaign_data("welcome"), campaign_data("webinar")])
    w.import_(["ok@fine.org", "early@blocked.org"], "welcome")
    w.import_(["ok@fine.org", "early@blocked.org"], "webinar")
    with w.app.transaction() as s:
        r = import_suppressions(
            s, [(2, {"email": "@Blocked.org", "reason": "competitor"})], w.clock[0]
        )
    assert r.added == 1
    late = w.import_(["late@blocked.org", "new@fine.org"], "welcome")
    assert (late.imported, late.suppressed) == (1, 1)
    for day in range(5):
        w.run(MONDAY + timedelta(days=day, minutes=1))
    assert not [a for a in w.smtp.recipients() if a.endswith("@blocked.org")]
    assert w.sent_to()["ok@fine.org"] == 6  # three steps of each campaign
    with w.app.transaction() as s:
        shown = show_lead(s, "early@blocked.org")
    assert {e["state"] for e in shown["enrollments"]} == {"stopped"}
    assert any(
        e["type"] == "suppressed" and "@blocked.org: competitor" in e["cause"]
        for e in shown["events"]
    )


def test_it_never_exceeds_the_touch_cap_across_three_campaigns(make_world: Any) -> None:
    four_daily = [{"template": "nurture/welcome", "delay": "0d"}] + [
        {"template": "nurture/case-study", "delay": "1d"} for _ in range(3)
    ]
    w: World = make_world(
        campaigns=[campaign_data(n, four_daily) for n in ("a", "b", "c")],
        sender={
            "from": "Acme Sales <sales@example.com>",
            "postal_address": "Acme Inc., 1 Main St, Springfield",
            "unsubscribe_mailto": "sales+unsubscribe-{token}@example.com",
            "max_touches": {"count": 3, "per": "7d"},
            "min_gap": "1d",
        },
    )
    leads = [f"t{i}@example.org" for i in range(4)]
    for name in ("a", "b", "c"):
        w.import_(leads, name)
    waits: set[str] = set()
    for step in range(4 * 30):  # every 6 hours for 30 days
        w.run(MONDAY + timedelta(hours=6 * step))
        if step == 2:
            with w.app.transaction() as s:
                waits |= {e["waiting"] or "" for e in show_lead(s, leads[0])["enrollments"]}
    assert any(x.startswith("minimum gap of 1d") for x in waits), waits
    with w.app.transaction() as s:
        sent: dict[str, list[datetime]] = defaultdict(list)
        for to, at in s.execute(
            select(OutboundMessage.to_addr, OutboundMessage.sent_at).where(
                OutboundMessage.status == "sent"
            )
        ):
            assert at is not None
            sent[to].append(at)
    for lead in leads:
        times = sorted(sent[lead])
        assert len(times) == 12  # every step of the three campaigns went out in the end
        for i, t in enumerate(times):
            in_window = [x for x in times if t <= x < t + timedelta(days=7)]
            assert len(in_window) <= 3, (lead, i, in_window)
        gaps = [b - a for a, b in itertools.pairwise(times)]
        assert min(gaps) >= timedelta(days=1)


def test_it_splits_variants_evenly_on_1000_leads_and_counts_their_replies(
    make_world: Any,
) -> None:
    from worker.sequences import queue_due

    steps = [{"template": ["nurture/welcome", "nurture/case-study"], "delay": "0d"}]
    w: World = make_world(campaigns=[campaign_data("ab", steps)])
    leads = [f"v{i}@lead{i}.example.org" for i in range(1000)]
    w.import_(leads, "ab")
    assert queue_due(w.app) == 1000  # each lead's variant is chosen and recorded here
    with w.app.transaction() as s:
        variant = dict(
            s.execute(select(OutboundMessage.to_addr, OutboundMessage.variant)).tuples().all()
        )
    split = Counter(variant.values())
    # A fair split of 1,000 is 500 each; allow ±50 (over three standard deviations).
    assert set(split) == {0, 1} and abs(split[0] - 500) <= 50, split
    # Building 1,000 MIME messages is most of this test's time: SQLite sends them all,
    # PostgreSQL (the same code path) the first 300, then the campaign is paused.
    limit = 1000 if w.config.database.startswith("sqlite") else 300
    assert w.worker.run_once(limit=limit).sent == limit
    with w.app.transaction() as s:
        pause_campaign(s, w.config, "ab", w.clock[0])
    got = {m.rcpts[0]: m.parsed() for m in w.smtp.messages}
    sent_split = Counter(variant[e] for e in got)
    # 20 leads who got A answer, and 8 who got B; one who got B is out of office.
    got_a = [e for e in leads if e in got and variant[e] == 0][:20]
    got_b = [e for e in leads if e in got and variant[e] == 1][:9]
    at = MONDAY + timedelta(hours=1)
    for e in got_a + got_b[:8]:
        w.inbox.add(mails.reply(got[e], "Sounds good, send me pricing please.", at))
    w.inbox.add(mails.gmail_vacation(got[got_b[8]], at))
    w.run(at)  # replies read, prospects handed off; the paused campaign sends nothing more
    with w.app.transaction() as s:
        stats = {c["campaign"]: c for c in campaign_stats(s, w.config)}["ab"]
    step = stats["steps"][0]
    a, b = step["variants"]
    assert (a["template"], a["sent"], a["replied"]) == ("nurture/welcome", sent_split[0], 20)
    assert (b["template"], b["sent"], b["replied"], b["auto_replied"]) == (
        "nurture/case-study", sent_split[1], 8, 1,
    )  # fmt: skip
    assert a["reply_rate"] == round(20 / sent_split[0], 4)
    assert (stats["sent"], stats["replied"], stats["auto_replied"]) == (limit, 28, 1)
    with w.app.transaction() as s:
        nurture = s.scalars(
            select(OutboundMessage.id).where(
                OutboundMessage.kind == "nurture", OutboundMessage.status == "sent"
            )
        ).all()
    assert len(nurture) == limit  # the paused campaign sent nothing more
    p = two_proportion_p(20, sent_split[0], 8, sent_split[1])
    assert p is not None and f"p={p:.2f}" in step["significance"]


def test_it_says_too_few_sends_for_a_small_test() -> None:
    from worker.campaigns import significance_note

    note = significance_note(
        [
            {"label": "A", "sent": 12, "replied": 3},
            {"label": "B", "sent": 12, "replied": 0},
        ]
    )
    assert note.startswith("B vs A: too few sends to tell")
    big = significance_note(
        [
            {"label": "A", "sent": 2000, "replied": 200},
            {"label": "B", "sent": 2000, "replied": 120},
        ]
    )
    assert "A replies more, significant" in big


def test_it_holds_a_step_queued_before_the_pause(make_world: Any) -> None:
    w: World = make_world(campaigns=[campaign_data("welcome")])
    w.import_(["q@example.org"], "welcome")
    from worker.sequences import queue_due

    assert queue_due(w.app) == 1  # queued, not yet sent
    with w.app.transaction() as s:
        pause_campaign(s, w.config, "welcome", w.clock[0])
    w.run(MONDAY + timedelta(minutes=5))
    w.run(MONDAY + timedelta(days=2))
    assert w.smtp.messages == []
    with w.app.transaction() as s:
        resume_campaign(s, w.config, "welcome", MONDAY + timedelta(days=2))
    w.run(MONDAY + timedelta(days=2, seconds=1))
    assert w.sent_to() == Counter({"q@example.org": 1})


def test_it_checks_suppression_and_the_cap_again_right_before_smtp(
    database_url: str, tmp_path: Path, smtp_server: SmtpServer
) -> None:
    campaigns = [campaign_data(n) for n in ("a", "b", "c")]
    from worker.sequences import queue_due

    with World(
        database_url, tmp_path, smtp_server, smtp=smtp_server.section(), campaigns=campaigns
    ) as w:
        for name in ("a", "b", "c"):
            w.import_(["capped@example.org", "late@suppressed.example"], name)
        assert queue_due(w.app) == 6  # queued while there was no cap and no suppression
        with w.app.transaction() as s:
            import_suppressions(s, [(2, {"email": "@suppressed.example"})], w.clock[0])
    sender = {
        "from": "Acme Sales <sales@example.com>",
        "postal_address": "Acme Inc., 1 Main St, Springfield",
        "unsubscribe_mailto": "sales+unsubscribe-{token}@example.com",
        "max_touches": {"count": 2, "per": "7d"},
    }
    with World(
        database_url, tmp_path, smtp_server,
        smtp=smtp_server.section(), campaigns=campaigns, sender=sender,
    ) as capped:  # fmt: skip
        capped.run(MONDAY + timedelta(minutes=1))
        assert capped.sent_to() == Counter({"capped@example.org": 2})
        with capped.app.transaction() as s:
            rows = s.execute(
                select(OutboundMessage.to_addr, OutboundMessage.status, OutboundMessage.last_error)
            ).all()
            shown = show_lead(s, "capped@example.org")
        cancelled = {(to, err) for to, st, err in rows if st == "cancelled"}
        assert cancelled == {
            ("late@suppressed.example", "on the do-not-contact list (@suppressed.example)")
        }
        assert any((e["waiting"] or "").startswith("touch cap: 2") for e in shown["enrollments"])
        capped.run(MONDAY + timedelta(days=7, minutes=2))
        assert capped.sent_to()["capped@example.org"] >= 3  # the third went out a week later


def test_a_resume_at_night_waits_for_the_window_and_still_spreads(make_world: Any) -> None:
    window = {"days": ["mon", "tue", "wed", "thu", "fri"], "start": "09:00", "end": "17:00"}
    camp = {**campaign_data("welcome"), "send_window": window}
    w: World = make_world(campaigns=[camp], max_per_minute=5)
    leads = [f"n{i}@example.org" for i in range(12)]
    w.import_(leads, "welcome")
    with w.app.transaction() as s:
        pause_campaign(s, w.config, "welcome", w.clock[0])
    saturday_night = datetime(2026, 12, 5, 2, 0, tzinfo=UTC)
    with w.app.transaction() as s:
        r = resume_campaign(s, w.config, "welcome", saturday_night)
    monday = datetime(2026, 12, 7, 9, 0, tzinfo=UTC)
    assert r.last_due == monday + timedelta(minutes=2)
    assert w.run(saturday_night) == 0
    per_minute = [w.run(monday + timedelta(minutes=m, seconds=1 + m)) for m in range(4)]
    assert per_minute == [5, 5, 2, 0]


def test_it_enrolls_and_unenrolls_from_the_command_line_by_filter_file_and_address(
    sqlite_url: str, tmp_path: Path
) -> None:
    import json

    import yaml
    from click.testing import CliRunner, Result

    from tests.conftest import base_config_data
    from worker.cli import main

    cfg = tmp_path / "twoway.yaml"
    cfg.write_text(yaml.safe_dump(base_config_data(sqlite_url, tmp_path)))

    def twoway(*args: str) -> Result:
        env = {"TWOWAY_NOW": "2026-11-30T10:00:00Z"}
        return CliRunner().invoke(main, ["--config", str(cfg), *args], env=env)

    leads = tmp_path / "leads.csv"
    leads.write_text("email,country\nana@a.example,ES\nbo@b.example,DE\ncy@c.example,ES\n")
    assert twoway("leads", "import", str(leads)).exit_code == 0
    enrolled = twoway("campaigns", "enroll", "welcome", "--country", "ES", "--json")
    assert enrolled.exit_code == 0, enrolled.output
    assert json.loads(enrolled.output)["enrolled"] == 2
    only = tmp_path / "only.csv"
    only.write_text("email\nbo@b.example\n")
    assert (
        "1 enrolled in welcome"
        in twoway("campaigns", "enroll", "welcome", "--file", str(only)).output
    )
    gone = twoway("campaigns", "unenroll", "welcome", "ana@a.example")
    assert gone.exit_code == 0 and "1 lead(s) unenrolled from welcome" in gone.output
    assert (
        "1 lead(s) unenrolled"
        in twoway("campaigns", "unenroll", "welcome", "--country", "DE").output
    )
    states = {
        email: [
            e["state"]
            for e in json.loads(twoway("leads", "show", email, "--json").output)["enrollments"]
        ]
        for email in ("ana@a.example", "bo@b.example", "cy@c.example")
    }
    assert states == {
        "ana@a.example": ["stopped"],
        "bo@b.example": ["stopped"],
        "cy@c.example": ["active"],
    }
    bad = twoway("campaigns", "enroll", "welcome", "--imported-since", "last week")
    assert bad.exit_code == 2 and "--imported-since: 'last week'" in bad.output
    assert "Traceback" not in bad.output
    unnamed = twoway("campaigns", "unenroll", "welcome")
    assert unnamed.exit_code == 2 and "name a lead or give a filter" in unnamed.output
