"""`twoway serve` over real HTTP: one-click unsubscribe, health, metrics, console security."""

from __future__ import annotations

import re
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import base_config_data
from tests.imap_server import free_port
from tests.served import Served
from tests.smtp_server import SmtpServer
from worker.app import App
from worker.config import load_config
from worker.leads import get_lead, import_leads, read_csv
from worker.unsubscribe import undo_unsubscribe, unsubscribe_by_link

T0 = datetime(2026, 12, 1, 10, 0, tzinfo=UTC)
TOKEN = "console-token-0123456789"
METRICS = "metrics-token-9876543210"
SESSION = "session-secret-abcdefghij"
IMAP_SECRET = "imap-s3cret-never-shown"


def at(t: datetime) -> dict[str, str]:
    return {"TWOWAY_NOW": t.isoformat()}


def write_config(tmp_path: Path, database: str, port: int, **overrides: Any) -> Path:
    data = base_config_data(database, tmp_path, **overrides)
    data["sender"].pop("unsubscribe_url")  # serve.public_url provides it
    data.setdefault("serve", {})
    data["serve"] = {
        "public_url": f"http://127.0.0.1:{port}",
        "console": {"token": TOKEN, "session_secret": SESSION},
        **data["serve"],
    }
    cfg = tmp_path / "twoway.yaml"
    cfg.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return cfg


def import_two(cfg: Path, tmp_path: Path) -> None:
    csv = tmp_path / "leads.csv"
    csv.write_text(
        "email,first_name,company\nana@lead.example,Ana,Nube\nbo@lead.example,Bo,Kraft\n",
        encoding="utf-8",
    )
    config = load_config(cfg, env={})
    app = App.open(config, lambda: T0)
    try:
        with app.transaction() as s:
            import_leads(s, read_csv(csv), T0, campaign=config.campaign("welcome"))
    finally:
        app.close()


def run_once(cfg: Path, when: datetime) -> None:
    """One pass of the worker at `when` (as `twoway run --once` with TWOWAY_NOW)."""
    from worker.runner import Worker

    app = App.open(load_config(cfg, env={}), lambda: when)
    try:
        with Worker(app) as worker:
            assert not worker.run_once().errors
    finally:
        app.close()


def lead_json(cfg: Path, email: str) -> dict[str, Any]:
    """What `twoway leads show EMAIL --json` prints."""
    from worker.leads import show_lead

    app = App.open(load_config(cfg, env={}), lambda: T0)
    try:
        with app.transaction() as s:
            return show_lead(s, email)
    finally:
        app.close()


def _env(extra: dict[str, str]) -> dict[str, str]:
    import os

    env = {k: v for k, v in os.environ.items() if k != "TWOWAY_CONFIG"}
    env.update(extra)
    return env


@pytest.fixture
def served_smtp(
    database_url: str, tmp_path: Path, smtp_server: SmtpServer
) -> Iterator[tuple[Path, Served]]:
    """Two leads sent step 1 through a real SMTP server, and `twoway serve` beside them."""
    port = free_port()
    data_overrides: dict[str, Any] = {"smtp": smtp_server.section()}
    cfg = write_config(tmp_path, database_url, port, **data_overrides)
    import_two(cfg, tmp_path)
    run_once(cfg, T0)
    served = Served(cfg, env=at(T0 + timedelta(hours=1)), port=port)
    yield cfg, served
    served.stop()


def test_it_unsubscribes_with_the_rfc8058_post_of_a_captured_email(
    served_smtp: tuple[Path, Served], smtp_server: SmtpServer
) -> None:
    cfg, served = served_smtp
    sent = {str(m["To"]).split("<")[-1].rstrip(">"): m for m in smtp_server.parsed()}
    assert set(sent) == {"ana@lead.example", "bo@lead.example"}
    mail = sent["ana@lead.example"]
    # RFC 8058 one-click is announced for https URLs only; this test server is plain http
    # on 127.0.0.1 (behind a TLS proxy, public_url is https and the header is there).
    assert mail["List-Unsubscribe-Post"] is None
    urls = re.findall(r"<(http[^>]+)>", str(mail["List-Unsubscribe"]))
    assert len(urls) == 1 and urls[0].startswith(f"{served.base}/u/")
    text = mail.get_body(("plain",))
    assert text is not None and urls[0] in text.get_content()  # the footer link too

    # What a mailbox provider does (RFC 8058 section 3.2): POST, no cookies, no redirects.
    path = urls[0][len(served.base) :]
    reply = served.client().request(
        "POST",
        path,
        body=b"List-Unsubscribe=One-Click",
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert reply.status == 200
    lead = lead_json(cfg, "ana@lead.example")
    assert lead["status"] == "unsubscribed"
    event = lead["events"][-1]
    assert event["to_status"] == "unsubscribed" and "one-click" in event["cause"]
    assert [e["state"] for e in lead["enrollments"]] == ["stopped"]

    before = len(smtp_server.messages)
    run_once(cfg, T0 + timedelta(days=4))  # step 2 is due for both
    later = [str(m["To"]) for m in smtp_server.parsed()[before:]]
    assert len(later) == 1 and "bo@lead.example" in later[0]

    again = served.client().request("POST", path, body=b"List-Unsubscribe=One-Click",
                                    headers={"Content-Type": "application/x-www-form-urlencoded"})  # fmt: skip
    assert again.status == 200  # idempotent
    assert len(lead_json(cfg, "ana@lead.example")["events"]) == len(lead["events"])


def test_it_never_unsubscribes_on_get_and_answers_alike_for_unknown_tokens(
    served_smtp: tuple[Path, Served], smtp_server: SmtpServer
) -> None:
    cfg, served = served_smtp
    config = load_config(cfg, env={})
    app = App.open(config, lambda: T0)
    with app.transaction() as s:
        known = get_lead(s, "ana@lead.example").reply_token
    app.close()
    unknown = "a" * 16 if known != "a" * 16 else "b" * 16
    web = served.client()

    page = web.get(f"/u/{known}")
    assert page.status == 200 and "<form" in page.body and "Unsubscribe" in page.body
    assert lead_json(cfg, "ana@lead.example")["status"] == "lead"  # link scanners prefetch
    other = web.get(f"/u/{unknown}")
    assert (other.status, other.body.replace(unknown, known)) == (page.status, page.body)
    web.post("/u/ana@lead.example", {"List-Unsubscribe": "One-Click"})  # not a token
    assert lead_json(cfg, "ana@lead.example")["status"] == "lead"

    form = {"List-Unsubscribe": "One-Click"}
    done_known = web.post(f"/u/{known}", form)
    done_unknown = web.post(f"/u/{unknown}", form)
    assert done_known.status == done_unknown.status == 200
    assert done_unknown.body.replace(unknown, known) == done_known.body
    assert "You are unsubscribed" in done_known.body and "Undo" in done_known.body

    undone = web.post(f"/u/{known}/undo", {})
    assert undone.status == 200 and "Subscription kept" in undone.body
    lead = lead_json(cfg, "ana@lead.example")
    assert lead["status"] == "lead"
    assert [e["state"] for e in lead["enrollments"]] == ["active"]
    assert lead["events"][-1]["cause"] == "undo of the one-click unsubscribe"
    assert web.post(f"/u/{unknown}/undo", {}).body.replace(unknown, known) == undone.body


def test_it_takes_back_an_unsubscribe_only_within_the_undo_window(app: App) -> None:
    csv = app.config.path.parent / "one.csv"
    csv.write_text("email\ncleo@lead.example\n", encoding="utf-8")
    with app.transaction() as s:
        import_leads(s, read_csv(csv), T0, campaign=app.config.campaign("welcome"))
        token = get_lead(s, "cleo@lead.example").reply_token
    with app.transaction() as s:
        assert unsubscribe_by_link(s, token, T0, "test") is True
        assert unsubscribe_by_link(s, token, T0, "test") is False  # idempotent
    with app.transaction() as s:
        late = T0 + timedelta(minutes=11)
        assert undo_unsubscribe(s, token, late, timedelta(minutes=10)) is False
        assert get_lead(s, "cleo@lead.example").status == "unsubscribed"
    with app.transaction() as s:
        assert undo_unsubscribe(s, token, T0 + timedelta(minutes=9), timedelta(minutes=10))
        assert get_lead(s, "cleo@lead.example").status == "lead"
    with app.transaction() as s:  # no lookup by anything but a token
        assert unsubscribe_by_link(s, "cleo@lead.example", T0, "test") is False
        assert unsubscribe_by_link(s, "%" * 16, T0, "test") is False


# --- the console's security, on the demo's data ------------------------------------------------


@pytest.fixture(scope="module")
def demo_served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Served]]:
    """The demo's workspace with a console login, a metrics token and an IMAP secret."""
    from worker.demo import run_demo

    ws = tmp_path_factory.mktemp("console") / "ws"
    run_demo(ws, lambda: T0, lambda _line: None)
    cfg = ws / "twoway.yaml"
    data = yaml.safe_load(cfg.read_text(encoding="utf-8"))
    data["mailboxes"].append(
        {"name": "ana", "kind": "imap", "host": "127.0.0.1", "port": free_port(),
         "security": "none", "username": "ana@acme.example", "password": IMAP_SECRET}
    )  # fmt: skip
    data["serve"] = {
        "metrics_token": METRICS,
        "console": {"token": TOKEN, "session_secret": SESSION, "max_login_failures": 3},
    }
    cfg.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    hostile = ws / "hostile.csv"
    hostile.write_text(
        "email,first_name,company\n"
        'evil@attack.example,<script>alert(1)</script>,"<img src=x onerror=alert(2)>"\n',
        encoding="utf-8",
    )
    app = App.open(load_config(cfg, env={}), lambda: T0)
    try:
        with app.transaction() as s:
            import_leads(s, read_csv(hostile), T0)
    finally:
        app.close()
    served = Served(cfg, env=at(T0 + timedelta(minutes=30)))
    yield cfg, served
    served.stop()


def console_routes() -> list[tuple[str, str]]:
    """(method, path) of every route but the public ones, with sample path parameters."""
    from starlette.routing import Route

    from worker.config import config_from_dict
    from worker.web import build_app

    config = config_from_dict({"database": "sqlite://", "sender": {"from": "a@example.com"}})
    web = build_app(App(config, None, None, lambda: T0))  # type: ignore[arg-type]
    public = {"/u/{token}", "/u/{token}/undo", "/healthz", "/metrics", "/static/console.css",
              "/login", "/"}  # fmt: skip
    out = []
    for route in web.routes:
        assert isinstance(route, Route)
        if route.path in public:
            continue
        path = (
            route.path.replace("{email}", "maria.garcia@nube.example")
            .replace("{qid:int}", "1")
            .replace("{choice}", "sent")
            .replace("{name}", "welcome")
            .replace("{choice:str}", "pause")
        )
        for method in sorted(route.methods or {"GET"}):
            if method != "HEAD":
                out.append((method, path))
    return out


def test_it_refuses_every_console_route_without_a_session(
    demo_served: tuple[Path, Served],
) -> None:
    _, served = demo_served
    routes = console_routes()
    assert ("GET", "/console") in routes and ("POST", "/console/quarantine/1/retry") in routes
    stranger = served.client()
    for method, path in routes:
        reply = stranger.request(method, path, form={} if method == "POST" else None)
        if method == "GET":
            assert reply.status == 303, path
            assert reply.headers["location"].startswith("/login?next="), path
        else:
            assert reply.status == 403, path
        assert "maria" not in reply.body.lower(), path


def test_it_refuses_a_forged_csrf_token(demo_served: tuple[Path, Served]) -> None:
    _, served = demo_served
    web = served.client()
    assert web.post("/login", {"csrf": "forged", "password": TOKEN}).status == 403
    assert web.login(TOKEN).status == 303
    assert web.get("/console").status == 200
    for forged in ({"csrf": "forged"}, {}, {"csrf": ""}):
        assert web.post("/console/unknown/sent", {**forged, "message_id": "x"}).status == 403
        assert web.post("/logout", forged).status == 403
    other = served.client()  # a real token, but from another session
    other.login(TOKEN)
    theirs = other.csrf("/console/quarantine")
    assert web.post("/logout", {"csrf": theirs}).status == 403
    assert web.post("/logout", {"csrf": web.csrf("/console")}).status == 303
    assert web.get("/console").status == 303  # logged out


def test_it_previews_a_template_for_a_lead_with_the_leads_own_unsubscribe_link(
    demo_served: tuple[Path, Served],
) -> None:
    cfg, served = demo_served
    app = App.open(load_config(cfg, env={}), lambda: T0)
    try:
        with app.transaction() as s:
            token = get_lead(s, "maria.garcia@nube.example").reply_token
    finally:
        app.close()
    web = served.client()
    assert web.login(TOKEN).status == 303
    page = web.get("/console/templates?name=nurture/welcome&lead=maria.garcia%40nube.example")
    assert page.status == 200 and "María" in page.body
    assert f"https://acme.example/unsubscribe/{token}" in page.body
    assert "k3x9q2m7" not in page.body  # not the sample's placeholder token


def test_it_limits_failed_logins_per_address(demo_served: tuple[Path, Served]) -> None:
    _, served = demo_served
    web = served.client()
    # Through the trusted proxy (127.0.0.1): the limit is per client address, not per proxy.
    web.always["X-Forwarded-For"] = "203.0.113.7"
    for _ in range(3):
        assert web.login("wrong-password").status == 401
    blocked = web.login(TOKEN)  # even the right one, for a while
    assert blocked.status == 429 and "Too many" in blocked.body
    assert web.get("/console").status == 303
    someone_else = served.client()
    someone_else.always["X-Forwarded-For"] = "203.0.113.8"
    assert someone_else.login(TOKEN).status == 303


def test_it_shows_no_secret_in_any_page_or_metrics(demo_served: tuple[Path, Served]) -> None:
    _, served = demo_served
    web = served.client()
    assert web.login(TOKEN).status == 303
    pages = [web.get(path) for method, path in console_routes() if method == "GET"]
    pages += [
        web.get("/console/leads?q=nube"),
        web.get("/console/templates?name=nurture/welcome&lead=maria.garcia%40nube.example"),
    ]
    pages += [web.get("/healthz"), web.get("/u/" + "a" * 16), web.get("/login")]
    metrics = served.client().request(
        "GET", "/metrics", headers={"Authorization": f"Bearer {METRICS}"}
    )
    assert metrics.status == 200 and "twoway_leads{" in metrics.body
    for reply in [*pages, metrics]:
        for secret in (TOKEN, METRICS, SESSION, IMAP_SECRET):
            assert secret not in reply.body
            assert all(secret not in v for v in reply.headers.values())
    assert any("María" in p.body for p in pages)  # the pages did show data
    assert served.log.read_text().count(TOKEN) == 0


def test_it_serves_metrics_only_with_the_token(demo_served: tuple[Path, Served]) -> None:
    _, served = demo_served
    anon = served.client()
    assert anon.get("/metrics").status == 401
    bad = anon.request("GET", "/metrics", headers={"Authorization": "Bearer nope"})
    assert bad.status == 401
    good = anon.request("GET", "/metrics", headers={"Authorization": f"Bearer {METRICS}"})
    assert good.headers["content-type"].startswith("text/plain; version=0.0.4")
    body = good.body
    assert 'twoway_leads{status="prospect"} 2.0' in body
    assert 'twoway_messages_read_total{kind="reply"}' in body
    assert 'twoway_sends{state="sent"}' in body
    assert "twoway_reply_to_handoff_seconds_bucket" in body
    assert 'twoway_bounces_total{type="hard"} 1.0' in body
    assert "twoway_quarantine_messages 0.0" in body


def test_it_sends_security_headers(demo_served: tuple[Path, Served]) -> None:
    _, served = demo_served
    page = served.client().get("/login")
    assert "frame-ancestors 'none'" in page.headers["content-security-policy"]
    assert page.headers["x-frame-options"] == "DENY"
    assert page.headers["x-content-type-options"] == "nosniff"
    assert "httponly" in page.headers["set-cookie"].lower()
    assert "samesite=strict" in page.headers["set-cookie"].lower()


def test_it_escapes_what_leads_wrote(demo_served: tuple[Path, Served]) -> None:
    _, served = demo_served
    web = served.client()
    web.login(TOKEN)
    for path in ("/console/leads?q=attack", "/console/leads/evil%40attack.example"):
        page = web.get(path)
        assert page.status == 200
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page.body
        assert "<script>" not in page.body and "<img src=x" not in page.body


def test_it_bounds_what_it_reads(demo_served: tuple[Path, Served]) -> None:
    _, served = demo_served
    web = served.client()
    big = web.request(
        "POST",
        "/u/" + "a" * 16,
        body=b"List-Unsubscribe=One-Click&" + b"x" * (20 * 1024 * 1024),
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert big.status == 413
    long_path = web.get("/u/" + "a" * 5000)
    assert long_path.status == 200 and "a" * 100 not in long_path.body
    multipart = web.request(
        "POST",
        "/u/" + "b" * 16,
        body=(
            b'--xyz\r\nContent-Disposition: form-data; name="List-Unsubscribe"\r\n\r\n'
            b"One-Click\r\n--xyz--\r\n"
        ),
        headers={"Content-Type": "multipart/form-data; boundary=xyz"},
    )
    assert multipart.status == 200 and "You are unsubscribed" in multipart.body
    assert web.get("/healthz").status in (200, 503)  # still serving
