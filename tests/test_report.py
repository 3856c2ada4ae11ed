"""`twoway report --html`: the funnel and daily activity as one self-contained page.

The data is written straight into a real database (SQLite, and PostgreSQL when configured)
so every number on the page is known in advance; the screenshot test renders the page in
headless Chromium, as a person would open it.
"""

from __future__ import annotations

import re
import shutil
import struct
import subprocess
import zlib
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner
from sqlalchemy import select
from sqlalchemy.orm import Session

from tests.conftest import base_config
from worker.app import App
from worker.cli import main
from worker.demo import run_demo
from worker.models import Enrollment, Handoff, InboundMessage, Lead, LeadEvent, OutboundMessage
from worker.report import build_report

NOW = datetime(2026, 12, 1, 10, 0, tzinfo=UTC)
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


class Seeder:
    """Writes leads and their mail with unique keys, so tests state only what matters."""

    def __init__(self, s: Session) -> None:
        self.s = s
        self.n = 0

    def _next(self) -> int:
        self.n += 1
        return self.n

    def lead(self, campaign: str, status: str = "lead") -> Lead:
        i = self._next()
        lead = Lead(
            email=f"lead{i}@company{i}.example.org",
            reply_token=f"tok{i:06d}",
            domain=f"company{i}.example.org",
            status=status,
            custom={},
            created_at=NOW - timedelta(days=40),
            updated_at=NOW,
        )
        self.s.add(lead)
        self.s.flush()
        self.s.add(
            Enrollment(
                lead_id=lead.id, campaign=campaign, created_at=lead.created_at, updated_at=NOW
            )
        )
        return lead

    def send(
        self, lead: Lead, kind: str, at: datetime | None, status: str = "sent", error: str = ""
    ) -> None:
        i = self._next()
        self.s.add(
            OutboundMessage(
                idempotency_key=f"k{i}",
                kind=kind,
                lead_id=lead.id,
                template=f"{kind}/x",
                message_id=f"<m{i}@example.com>",
                to_addr=lead.email,
                status=status,
                last_error=error or None,
                next_attempt_at=at or NOW,
                created_at=at or NOW,
                sent_at=at if status == "sent" else None,
            )
        )

    def reply(self, lead: Lead, at: datetime, kind: str = "reply") -> None:
        i = self._next()
        self.s.add(
            InboundMessage(
                mailbox="sales",
                folder="INBOX",
                uidvalidity=1,
                uid=i,
                message_id=f"<in{i}@lead.example.org>",
                from_addr=lead.email,
                kind=kind,
                lead_id=lead.id,
                received_at=at,
            )
        )

    def event(self, lead: Lead, type_: str, at: datetime) -> None:
        self.s.add(LeadEvent(lead_id=lead.id, at=at, type=type_, cause="test", detail={}))


def day(n: int, hour: int = 9) -> datetime:
    """`n` days before the test's today, at `hour` UTC."""
    return datetime(2026, 12, 1, hour, 0, tzinfo=UTC) - timedelta(days=n)


def populate(app: App) -> None:
    """Two campaigns with known funnels, a month of varied sends, replies and promotions.

    welcome: 120 leads -> 18 engaged -> 12 prospects -> 10 handed off.
    webinar: 40 leads -> 6 engaged -> 3 prospects -> 3 handed off.
    Today (1 Dec): 7 nurture, 2 handoffs, 1 follow-up sent; 3 replies; 2 promotions.
    """
    with app.transaction() as s:
        seed = Seeder(s)
        for campaign, total, engaged, prospects, handed in (
            ("welcome", 120, 18, 12, 10),
            ("webinar", 40, 6, 3, 3),
        ):
            for i in range(total):
                status = (
                    "prospect" if i < prospects else ("unsubscribed" if i % 17 == 0 else "lead")
                )
                lead = seed.lead(campaign, status)
                back = 5 + (i * 7) % 25  # step 1 spread over the month, never in the last 4 days
                seed.send(lead, "nurture", day(back, 8 + i % 9))
                if i % 3 == 0:
                    seed.send(lead, "nurture", day(back - 3, 10))
                if i < engaged:
                    seed.reply(lead, day(back - 1, 15))
                    seed.event(lead, "engaged", day(back - 1, 15))
                if i < prospects:
                    seed.event(lead, "promoted", day(back - 1, 15))
                if i < handed:
                    seed.send(lead, "handoff", day(back - 1, 16))
        today = [seed.lead("welcome", "prospect") for _ in range(2)] + [
            seed.lead("welcome") for _ in range(5)
        ]
        for lead in today:
            seed.send(lead, "nurture", day(0, 8))
        for lead in today[:2]:
            seed.send(lead, "handoff", day(0, 9))
            seed.event(lead, "engaged", day(0, 9))
            seed.event(lead, "promoted", day(0, 9))
        seed.send(today[0], "followup", day(0, 9))
        for lead in today[:3]:
            seed.reply(lead, day(0, 9))
        seed.reply(today[4], day(0, 9), kind="auto_reply")  # not a genuine reply
        seed.send(today[5], "nurture", day(45))  # before the window
        seed.send(today[6], "nurture", None, status="queued")  # not sent yet
        # Speed to lead: Ana answered in 10, 20 and 60 minutes (SLA 30 min: one breach);
        # Chloe has not answered the prospect handed to her 50 minutes ago.
        handed_to = s.scalars(
            select(Lead).where(Lead.status == "prospect").order_by(Lead.id).limit(4)
        ).all()
        for minutes, prospect in zip((10, 20, 60), handed_to, strict=False):
            handed_at = day(2, 9)
            s.add(
                Handoff(
                    lead_id=prospect.id, rep="ana@example.com",
                    handed_at=handed_at, sla_due=handed_at + timedelta(minutes=30),
                    answered_at=handed_at + timedelta(minutes=minutes), answered_by="ana@example.com",
                )
            )  # fmt: skip
        waiting = handed_to[3]
        s.add(
            Handoff(
                lead_id=waiting.id, rep="chloe@example.com", handed_at=NOW - timedelta(minutes=50),
                sla_due=NOW - timedelta(minutes=20),
            )
        )  # fmt: skip


def render(app: App, tmp_path: Path, days: int = 30) -> str:
    page = build_report(app, days)
    (tmp_path / "report.html").write_text(page, encoding="utf-8")
    return page


def test_it_shows_each_campaigns_funnel_with_its_conversion_rates(app: App, tmp_path: Path) -> None:
    populate(app)
    page = render(app, tmp_path)
    # welcome: 120 + the 7 leads of today = 127 enrolled; 18 + 2 engaged; 12 + 2 prospects.
    assert "Funnel for welcome: Leads 127, Engaged 20, Prospects 14, Handed off 12" in page
    assert "127 leads enrolled, 11% became prospects" in page
    assert "Funnel for webinar: Leads 40, Engaged 6, Prospects 3, Handed off 3" in page
    assert "40 leads enrolled, 7.5% became prospects" in page
    assert "↓ 70% of engaged" in page  # welcome: 14 of 20 engaged became prospects
    assert "↓ 50% of engaged" in page  # webinar: 3 of 6
    assert page.count("<svg") == 3  # two funnels and the daily chart


def test_it_charts_sends_by_kind_replies_and_promotions_per_day(app: App, tmp_path: Path) -> None:
    populate(app)
    page = render(app, tmp_path)
    for tooltip in (
        "1 Dec: 7 nurture</title>",
        "1 Dec: 2 handoff to rep</title>",
        "1 Dec: 1 follow-up to prospect</title>",
        "1 Dec: 3 genuine replies</title>",  # the auto-reply does not count
        "1 Dec: 2 promotions to prospect</title>",
    ):
        assert tooltip in page
    # Legend totals cover the window only: the send of 45 days ago and the queued one are out.
    nurture = (120 + 40) + (40 + 14) + 7  # step 1 for all, step 2 for every third, today
    legend = re.search(r'<ul class="legend".*?</ul>', page, re.S)
    assert legend is not None
    assert f"Nurture <b>{nurture}</b>" in legend.group(0)
    assert "Genuine replies <b>27</b>" in legend.group(0)
    assert "Promotions to prospect <b>17</b>" in legend.group(0)
    assert ">today</text>" in page and "Day (UTC)" in page and "Emails sent" in page
    assert "<details><summary>Show the numbers" in page


def test_it_narrows_the_chart_to_the_days_asked_for(app: App, tmp_path: Path) -> None:
    populate(app)
    page = render(app, tmp_path, days=7)
    assert "activity over the last 7 days (25 Nov – 1 Dec, UTC days)" in page
    assert "24 Nov:" not in page
    with pytest.raises(ValueError, match="at least 1"):
        build_report(app, 0)


def test_it_tabulates_leads_outbox_mailboxes_and_alarms(app: App, tmp_path: Path) -> None:
    populate(app)
    with app.transaction() as s:
        seed = Seeder(s)
        seed.n = 10_000
        lead = seed.lead("<script>alert(1)</script>")
        seed.send(lead, "nurture", None, status="failed", error="550 5.1.1 <b>no such user</b>")
        seed.send(lead, "nurture", None, status="unknown")
    page = render(app, tmp_path)
    assert "<b>prospect</b>" in page and "<b>unsubscribed</b>" in page
    assert '<td class="n"><b>168</b></td>' in page  # every lead in the total
    assert "550 5.1.1 &lt;b&gt;no such user&lt;/b&gt;" in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page and "<script>" not in page
    assert 'class="alarm banner"><b>1 alarm</b>: 1 send(s) in state unknown' in page
    assert "never synced" in page  # the test mailbox was never read


def test_it_shows_each_reps_first_response_times_and_who_still_waits(
    app: App, tmp_path: Path
) -> None:
    populate(app)
    page = render(app, tmp_path)
    speed = page[page.index("<h2>Speed to lead</h2>") : page.index("<h2>Daily activity</h2>")]
    ana = speed[speed.index("<b>Ana Lopez</b>") :].split("</tr>")[0]
    cells = re.findall(r'<td class="n">(.*?)</td>', ana)
    assert cells == ["3", "3", "20 min", "1 h 00 min", '<span class="pill bad">1</span>']
    chloe = speed[speed.index("<b>Chloe Martin</b>") :].split("</tr>")[0]
    assert re.findall(r'<td class="n">(.*?)</td>', chloe)[:3] == ["1", "0", "–"]
    waiting = speed[speed.index("Waiting for a first answer") :]
    assert "chloe@example.com" in waiting and "50 min" in waiting and "over the SLA" in waiting


def test_it_renders_an_empty_database_as_a_friendly_page(app: App, tmp_path: Path) -> None:
    page = render(app, tmp_path)
    assert page.startswith("<!DOCTYPE html>")
    assert "No leads enrolled yet" in page
    assert "Nothing sent or received in the last 30 days" in page
    assert "No alarms" in page
    assert "<svg" not in page


def test_it_writes_the_page_from_the_command_line_and_prints_its_path(tmp_path: Path) -> None:
    ws = tmp_path / "demo"
    assert run_demo(ws, lambda: NOW, lambda _line: None) == 0
    out = tmp_path / "out" / "report.html"
    out.parent.mkdir()
    env = {"TWOWAY_NOW": "2026-12-01T10:05:00Z"}
    args = ["--config", str(ws / "twoway.yaml"), "report", "--html", str(out), "--days", "14"]
    result = CliRunner().invoke(main, args, env=env)
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == str(out.resolve())
    page = out.read_text(encoding="utf-8")
    assert "Funnel for welcome: Leads 10, Engaged 3, Prospects 2, Handed off 2" in page
    assert "last 14 days" in page
    assert "http://" not in page and "https://" not in page  # nothing to fetch


def test_it_exits_2_without_an_html_file_or_with_a_missing_folder(tmp_path: Path) -> None:
    cfg = tmp_path / "twoway.yaml"
    cfg.write_text("sender: {from: a@example.com}\ncampaigns: []\n")
    missing = CliRunner().invoke(main, ["--config", str(cfg), "report"])
    assert missing.exit_code == 2
    assert "--html" in missing.output
    nowhere = tmp_path / "no" / "such" / "report.html"
    bad = CliRunner().invoke(main, ["--config", str(cfg), "report", "--html", str(nowhere)])
    assert bad.exit_code == 2
    assert "no such folder" in bad.output
    assert not nowhere.exists()


# --- what a person sees ------------------------------------------------------------------


def screenshot(page: Path, png: Path, profile: Path) -> None:
    assert CHROMIUM is not None
    subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={profile}",
            f"--screenshot={png}",
            "--window-size=1200,1600",
            page.as_uri(),
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def png_pixels_bytes(data: bytes) -> bytes:
    """The PNG's image data, decompressed (still filtered: enough to tell blank from busy)."""
    pos, chunks = 8, []
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        if data[pos + 4 : pos + 8] == b"IDAT":
            chunks.append(data[pos + 8 : pos + 8 + length])
        pos += 12 + length
    return zlib.decompress(b"".join(chunks))


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed")
def test_it_renders_in_a_browser_at_1200_pixels(tmp_path: Path) -> None:
    config = base_config(f"sqlite:///{tmp_path / 'twoway.db'}", tmp_path)
    app = App.open(config, lambda: NOW)
    try:
        populate(app)
        render(app, tmp_path)
    finally:
        app.close()
    blank = tmp_path / "blank.html"
    blank.write_text("<!DOCTYPE html><title>blank</title>", encoding="utf-8")
    screenshot(tmp_path / "report.html", tmp_path / "report.png", tmp_path / "profile")
    screenshot(blank, tmp_path / "blank.png", tmp_path / "profile")

    shot = (tmp_path / "report.png").read_bytes()
    empty = (tmp_path / "blank.png").read_bytes()
    assert png_size(shot) == (1200, 1600)
    # A page of charts and text compresses far worse than a white one.
    assert len(shot) > 20_000
    assert len(shot) > 5 * len(empty)
    # The scanlines of a white page hold a handful of distinct byte values; text and
    # coloured charts use nearly all of them.
    assert len(set(png_pixels_bytes(empty))) < 16
    assert len(set(png_pixels_bytes(shot))) > 128
