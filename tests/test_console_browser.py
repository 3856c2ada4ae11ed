"""The console and the unsubscribe page in a real Chromium (Debian's chromium and
chromium-driver, driven by Selenium; nothing is downloaded). Screenshots of the main pages
are read back with tesseract (OCR) and must show their key content."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from datetime import UTC, datetime
from email import message_from_bytes, policy
from email.message import EmailMessage
from pathlib import Path

import pytest
import yaml
from selenium import webdriver
from selenium.common.exceptions import WebDriverException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support.ui import Select, WebDriverWait
from sqlalchemy import select, update

from tests.served import Served
from worker.app import App
from worker.config import load_config
from worker.demo import run_demo
from worker.leads import get_lead
from worker.models import OutboundMessage, Quarantine

CHROMIUM = shutil.which("chromium")
DRIVER = shutil.which("chromedriver")
TESSERACT = shutil.which("tesseract")
TOKEN = "browser-console-token-42"
pytestmark = pytest.mark.skipif(
    CHROMIUM is None or DRIVER is None,
    reason="Debian's chromium and chromium-driver are not installed (.ci/run installs them)",
)


def quarantine_a_reply(app: App, ws: Path) -> int:
    """A genuine reply from Emma that failed earlier (say, the database was down)."""
    with app.transaction() as s:
        ours = s.scalar(
            select(OutboundMessage).where(
                OutboundMessage.to_addr == "emma.wilson@brightline.example"
            )
        )
        assert ours is not None
        raw = (
            "From: Emma Wilson <emma.wilson@brightline.example>\r\n"
            "To: sales@acme.example\r\nSubject: Re: welcome\r\n"
            "Date: Tue, 01 Dec 2026 10:00:00 +0000\r\n"
            "Message-ID: <emma-1@brightline.example>\r\n"
            f"In-Reply-To: <{ours.message_id}>\r\nReferences: <{ours.message_id}>\r\n"
            "Content-Type: text/plain; charset=utf-8\r\n\r\n"
            "Hi, this looks useful. Could we book a demo next Tuesday?\r\n\r\nEmma\r\n"
        ).encode()
        q = Quarantine(mailbox="sales", folder="INBOX", uidvalidity=1, uid=999, raw=raw,
                       reason="OperationalError: database is locked",
                       created_at=datetime.now(UTC))  # fmt: skip
        s.add(q)
        s.flush()
        return q.id


def leave_one_send_unknown(app: App) -> str:
    with app.transaction() as s:
        row = s.scalar(
            select(OutboundMessage).where(OutboundMessage.to_addr == "raj.mehta@finlytics.example")
        )
        assert row is not None
        s.execute(
            update(OutboundMessage).where(OutboundMessage.id == row.id).values(status="unknown")
        )
        return row.message_id


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Served, int, str]]:
    ws = tmp_path_factory.mktemp("browser") / "ws"
    run_demo(ws, lambda: datetime.now(UTC), lambda _line: None)
    cfg = ws / "twoway.yaml"
    data = yaml.safe_load(cfg.read_text(encoding="utf-8"))
    data["serve"] = {"console": {"token": TOKEN}}
    cfg.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    app = App.open(load_config(cfg, env={}), lambda: datetime.now(UTC))
    try:
        qid = quarantine_a_reply(app, ws)
        unknown = leave_one_send_unknown(app)
    finally:
        app.close()
    served = Served(cfg, env={"TWOWAY_NOW": ""})
    yield ws, served, qid, unknown
    served.stop()


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WebDriver]:
    options = webdriver.ChromeOptions()
    assert CHROMIUM is not None and DRIVER is not None
    options.binary_location = CHROMIUM
    profile = tmp_path_factory.mktemp("chromium-profile")
    for flag in (
        "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--disable-dev-shm-usage", "--window-size=1280,1000", f"--user-data-dir={profile}",
    ):  # fmt: skip
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=DRIVER))
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def shot(browser: WebDriver, path: Path, *words: str) -> None:
    """Screenshot the page and check that OCR reads each of `words` on it."""
    assert browser.save_screenshot(str(path))
    assert path.stat().st_size > 10_000  # not a blank page
    if TESSERACT is None:
        pytest.skip("tesseract is not installed (.ci/run installs tesseract-ocr)")
    text = subprocess.run(
        [TESSERACT, str(path), "stdout"], capture_output=True, text=True, timeout=120, check=True
    ).stdout.lower()
    for word in words:
        assert word.lower() in text, f"{word!r} not seen in {path.name}: {text[:2000]}"


def click(browser: WebDriver, element: WebElement) -> None:
    """Click what leads to a new page, and wait until that page has replaced this one.

    The old page is told apart by a mark on its window object, which a new document does
    not have: asking an element of the old page whether it is stale can fail otherwise
    while the page is being replaced ("Node with given id does not belong to the
    document"), and a script can too, so errors while waiting are retried."""
    browser.execute_script("window.twowayOldPage = true")
    element.click()
    WebDriverWait(browser, 20, ignored_exceptions=(WebDriverException,)).until(
        lambda d: d.execute_script(
            "return !window.twowayOldPage && document.readyState === 'complete'"
        )
    )


def log_in(browser: WebDriver, served: Served) -> None:
    browser.get(served.base + "/console")
    assert "/login" in browser.current_url
    browser.find_element(By.NAME, "password").send_keys(TOKEN)
    click(browser, browser.find_element(By.CSS_SELECTOR, "form[action='/login'] button"))
    assert browser.current_url == served.base + "/console"


def test_it_logs_in_and_shows_the_funnel_per_step(
    browser: WebDriver, workspace: tuple[Path, Served, int, str], tmp_path: Path
) -> None:
    _, served, _, _ = workspace
    log_in(browser, served)
    assert browser.find_element(By.TAG_NAME, "h1").text == "Funnel"
    campaign = browser.find_element(By.ID, "campaign-welcome")
    first_step = campaign.find_elements(By.CSS_SELECTOR, "table.steps tbody tr")[0]
    cells = [c.text.strip() for c in first_step.find_elements(By.TAG_NAME, "td")]
    assert cells[:3] == ["1", "nurture/welcome", "9"]  # 10, less the one left unknown
    assert cells[3] == "3"  # replied: María, Priya and Léa ("not interested" is a reply)
    assert cells[5] == "1"  # bounced
    assert "2 prospects" in campaign.text
    shot(browser, tmp_path / "funnel.png", "Funnel", "welcome", "Unsubscribed", "Bounced")

    pause = browser.find_element(
        By.CSS_SELECTOR, "form[action='/console/campaigns/welcome/pause'] button"
    )
    click(browser, pause)
    assert "Campaign welcome paused" in browser.find_element(By.CLASS_NAME, "flash").text
    assert "paused" in browser.find_element(By.ID, "campaign-welcome").text
    resume = browser.find_element(
        By.CSS_SELECTOR, "form[action='/console/campaigns/welcome/resume'] button"
    )
    click(browser, resume)
    assert "Campaign welcome resumed" in browser.find_element(By.CLASS_NAME, "flash").text


def test_it_opens_a_leads_timeline_from_a_search(
    browser: WebDriver, workspace: tuple[Path, Served, int, str], tmp_path: Path
) -> None:
    _, served, _, _ = workspace
    browser.get(served.base + "/console/leads")
    box = browser.find_element(By.NAME, "q")
    box.send_keys("nube")
    click(browser, browser.find_element(By.CSS_SELECTOR, "form.filters button"))
    links = [a.text for a in browser.find_elements(By.CSS_SELECTOR, "td a")]
    assert links == ["carlos.ruiz@nube.example", "maria.garcia@nube.example"]
    click(browser, browser.find_element(By.LINK_TEXT, "maria.garcia@nube.example"))
    page = browser.find_element(By.TAG_NAME, "main").text
    assert "prospect" in page and "matched by reply_token" in page
    assert "Could you send pricing for 25 seats" in page  # the reply text
    assert "lead → prospect" in page  # the timeline
    shot(browser, tmp_path / "lead.png", "Enrollments", "Messages", "prospect", "handoff")


def test_it_lists_the_prospects_waiting_for_their_rep(
    browser: WebDriver, workspace: tuple[Path, Served, int, str]
) -> None:
    _, served, _, _ = workspace
    browser.get(served.base + "/console/waiting")
    rows = browser.find_elements(By.CSS_SELECTOR, "tbody tr")
    emails = [r.find_element(By.TAG_NAME, "a").text for r in rows]
    assert sorted(emails) == ["maria.garcia@nube.example", "priya.patel@ledgerly.example"]
    assert "ana@acme.example" in rows[emails.index("maria.garcia@nube.example")].text


def test_it_retries_a_quarantined_message_and_sees_it_processed(
    browser: WebDriver, workspace: tuple[Path, Served, int, str], tmp_path: Path
) -> None:
    _, served, qid, _ = workspace
    browser.get(served.base + "/console/quarantine")
    assert "database is locked" in browser.find_element(By.TAG_NAME, "table").text
    click(browser, browser.find_element(By.LINK_TEXT, str(qid)))
    assert (
        "Could we book a demo next Tuesday?"
        in browser.find_element(By.CSS_SELECTOR, "pre.raw").text
    )
    shot(browser, tmp_path / "quarantined.png", "Quarantined message", "database is locked")
    click(browser, browser.find_element(By.CSS_SELECTOR, "form[action$='/retry'] button"))
    assert f"#{qid} processed: reply" in browser.find_element(By.CLASS_NAME, "flash").text
    assert "The quarantine is empty." in browser.find_element(By.TAG_NAME, "table").text
    browser.get(served.base + "/console/leads/emma.wilson%40brightline.example")
    assert "lead → prospect" in browser.find_element(By.TAG_NAME, "main").text


def test_it_previews_a_template_for_a_lead_in_a_sandboxed_frame(
    browser: WebDriver, workspace: tuple[Path, Served, int, str], tmp_path: Path
) -> None:
    _, served, _, _ = workspace
    browser.get(served.base + "/console/templates")
    assert "Every template renders" in browser.find_element(By.TAG_NAME, "main").text
    Select(browser.find_element(By.NAME, "name")).select_by_value("nurture/welcome")
    browser.find_element(By.NAME, "lead").send_keys("maria.garcia@nube.example")
    click(browser, browser.find_element(By.CSS_SELECTOR, "form.filters button"))
    subject = browser.find_element(By.CLASS_NAME, "subject").text
    assert subject.startswith("María, welcome")
    assert "María" in browser.find_element(By.CSS_SELECTOR, "pre.raw").text
    frame = browser.find_element(By.TAG_NAME, "iframe")
    assert frame.get_attribute("sandbox") == ""  # no scripts, no same-origin access
    shot(browser, tmp_path / "preview.png", "Template preview", "Subject", "HTML part")
    browser.switch_to.frame(frame)
    try:
        assert "María" in browser.find_element(By.TAG_NAME, "body").text
    finally:
        browser.switch_to.default_content()


def test_it_settles_an_unknown_send_as_sent(
    browser: WebDriver, workspace: tuple[Path, Served, int, str]
) -> None:
    _, served, _, message_id = workspace
    browser.get(served.base + "/console/unknown")
    assert message_id in browser.find_element(By.TAG_NAME, "table").text
    click(
        browser,
        browser.find_element(By.CSS_SELECTOR, "form[action='/console/unknown/sent'] button"),
    )
    assert "marked as sent" in browser.find_element(By.CLASS_NAME, "flash").text
    assert "No send is in state unknown." in browser.find_element(By.TAG_NAME, "table").text
    browser.get(served.base + "/console/leads/raj.mehta%40finlytics.example")
    assert "send_resolved" in browser.find_element(By.TAG_NAME, "main").text


def test_it_unsubscribes_from_the_confirmation_page_and_undoes_it(
    browser: WebDriver, workspace: tuple[Path, Served, int, str], tmp_path: Path
) -> None:
    ws, served, _, _ = workspace
    mail = first_mail_to(ws, "carlos.ruiz@nube.example")
    url = str(mail["List-Unsubscribe"]).split("<", 1)[1].split(">", 1)[0]
    token = url.rsplit("/", 1)[1]
    browser.delete_all_cookies()  # a lead, not the team
    browser.get(f"{served.base}/u/{token}")
    assert browser.find_element(By.TAG_NAME, "h1").text == "Unsubscribe"
    shot(browser, tmp_path / "unsubscribe.png", "Unsubscribe", "no further messages")
    assert lead_status(ws, "carlos.ruiz@nube.example") == "lead"  # GET changed nothing
    click(browser, browser.find_element(By.CSS_SELECTOR, "button"))
    assert browser.find_element(By.TAG_NAME, "h1").text == "You are unsubscribed"
    assert lead_status(ws, "carlos.ruiz@nube.example") == "unsubscribed"
    click(browser, browser.find_element(By.CSS_SELECTOR, "button"))
    assert browser.find_element(By.TAG_NAME, "h1").text == "Subscription kept"
    assert lead_status(ws, "carlos.ruiz@nube.example") == "lead"


def first_mail_to(ws: Path, address: str) -> EmailMessage:
    for path in sorted((ws / "mail" / "outbox").glob("*/*")):
        msg = message_from_bytes(path.read_bytes(), policy=policy.default)
        if address in str(msg["To"]):
            assert isinstance(msg, EmailMessage)
            return msg
    raise AssertionError(f"no mail to {address}")


def lead_status(ws: Path, address: str) -> str:
    app = App.open(load_config(ws / "twoway.yaml", env={}), lambda: datetime.now(UTC))
    try:
        with app.transaction() as s:
            return get_lead(s, address).status
    finally:
        app.close()
