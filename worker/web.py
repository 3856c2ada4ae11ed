"""`twoway serve`: the one module that imports the web framework (Starlette) and server
(uvicorn).

Routes (the public contract): `/u/<token>` (unsubscribe, no login: GET shows a
confirmation page, POST `List-Unsubscribe=One-Click` unsubscribes, RFC 8058),
`/healthz` (no login), `/metrics` (optional bearer token), and behind a login `/console…`
for the team. Pages are rendered by rendering.Pages; actions call the CLI's functions.
"""

from __future__ import annotations

import logging
import re
import secrets
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable
from datetime import timedelta
from html import escape
from typing import Any
from urllib.parse import parse_qs, quote

import uvicorn
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.middleware import Middleware
from starlette.middleware.sessions import SessionMiddleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from worker.app import App
from worker.config import read_secret
from worker.console import (
    funnel_steps,
    quarantine_item,
    quarantine_rows,
    search_leads,
    waiting_prospects,
)
from worker.contexts import preview_context
from worker.health import check_health
from worker.leads import LeadError, get_lead, lead_fields, show_lead
from worker.metrics import CONTENT_TYPE, render_metrics
from worker.models import LeadStatus
from worker.passwords import same_secret, verify_password
from worker.rendering import Pages, Renderer, TemplateError, lint_for
from worker.unsubscribe import undo_unsubscribe, unsubscribe_by_link

logger = logging.getLogger(__name__)

MAX_BODY = 64 * 1024
"""Largest request body read (forms are a few hundred bytes)."""
LOGIN_WINDOW = 300.0
CSP = (
    "default-src 'none'; style-src 'self'; img-src 'self' data:; form-action 'self'; "
    "frame-src 'self'; frame-ancestors 'none'; base-uri 'none'"
)
FRAME_CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src data:; sandbox"
_MULTIPART_ONE_CLICK = re.compile(
    rb'name="?List-Unsubscribe"?\r?\n(?:[^\r\n]*\r?\n)*?\r?\nOne-Click'
)

Handler = Callable[[Request], Awaitable[Response]]


class BodyTooLarge(Exception):
    pass


class _Limiter:
    """Failed logins per client address in a sliding window (this process's memory)."""

    def __init__(self, limit: int, window: float) -> None:
        self.limit, self.window = limit, window
        self._failures: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    def blocked(self, key: str) -> bool:
        with self._lock:
            q = self._failures.get(key)
            if q is None:
                return False
            now = time.monotonic()
            while q and q[0] < now - self.window:
                q.popleft()
            return len(q) >= self.limit

    def fail(self, key: str) -> None:
        with self._lock:
            if len(self._failures) > 10_000:  # bounded memory under a spray of addresses
                self._failures.clear()
            self._failures.setdefault(key, deque()).append(time.monotonic())


class _SecureHeaders:
    """Security headers on every response; a response may bring its own CSP (the preview)."""

    def __init__(self, app: ASGIApp, hsts: bool) -> None:
        self.app, self.hsts = app, hsts

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                names = {k.lower() for k, _ in headers}
                extra = {
                    b"content-security-policy": CSP.encode(),
                    b"x-content-type-options": b"nosniff",
                    b"x-frame-options": b"DENY",
                    b"referrer-policy": b"no-referrer",
                    b"cross-origin-opener-policy": b"same-origin",
                    b"cache-control": b"no-store",
                }
                if self.hsts:
                    extra[b"strict-transport-security"] = b"max-age=31536000"
                headers += [(k, v) for k, v in extra.items() if k not in names]
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, with_headers)


async def _form(request: Request) -> dict[str, str]:
    """The urlencoded form of a POST, read up to MAX_BODY; multipart yields only the
    RFC 8058 field."""
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY:
            raise BodyTooLarge
    ctype = request.headers.get("content-type", "")
    if ctype.startswith("multipart/form-data"):
        return {"List-Unsubscribe": "One-Click"} if _MULTIPART_ONE_CLICK.search(body) else {}
    try:
        parsed = parse_qs(body.decode("utf-8"), max_num_fields=50)
    except (UnicodeDecodeError, ValueError):
        return {}
    return {k: v[0] for k, v in parsed.items()}


def build_app(app: App) -> Starlette:
    """The ASGI application of `twoway serve` for `app` (config, database, clock)."""
    config = app.config
    cfg = config.serve
    pages = Pages()
    console = cfg.console
    password_hash = read_secret(console.password_hash, console.password_hash_file)
    login_token = read_secret(console.token, console.token_file)
    metrics_token = read_secret(cfg.metrics_token, cfg.metrics_token_file)
    session_secret = read_secret(
        console.session_secret, console.session_secret_file
    ) or secrets.token_urlsafe(32)
    limiter = _Limiter(console.max_login_failures, LOGIN_WINDOW)
    undo = timedelta(minutes=cfg.undo_minutes)
    https = (cfg.public_url or "").startswith("https://")
    css = pages.static("console.css")

    def page(
        request: Request | None, template: str, code: int = 200, /, **ctx: Any
    ) -> HTMLResponse:
        if request is not None and request.session.get("auth"):
            ctx.setdefault("nav", True)
            ctx.setdefault("csrf", request.session.get("csrf", ""))
            ctx.setdefault("flash", request.session.pop("flash", None))
        return HTMLResponse(pages.render(template, **ctx), status_code=code)

    def refused(status: int = 403) -> HTMLResponse:
        return HTMLResponse("<!doctype html><title>Refused</title><p>Refused.</p>", status)

    # --- unsubscribe (no login) ---------------------------------------------------------

    async def unsubscribe(request: Request) -> Response:
        token = str(request.path_params["token"])[:64]
        shown = quote(token, safe="")
        if request.method == "GET":
            return page(None, "unsubscribe.html", state="confirm", token=shown)
        try:
            form = await _form(request)
        except BodyTooLarge:
            return refused(413)
        if form.get("List-Unsubscribe") != "One-Click":
            return page(None, "unsubscribe.html", 400, state="confirm", token=shown)
        how = (
            "RFC 8058 one-click POST"
            if "text/html" not in request.headers.get("accept", "")
            else "confirmation page"
        )

        def work() -> None:
            with app.transaction() as s:
                if unsubscribe_by_link(s, token, app.now(), how):
                    logger.info("a lead unsubscribed by link (%s)", how)

        await run_in_threadpool(work)
        minutes = f"{cfg.undo_minutes:g}" if cfg.undo_minutes else ""
        return page(None, "unsubscribe.html", state="done", token=shown, undo_minutes=minutes)

    async def unsubscribe_undo(request: Request) -> Response:
        token = str(request.path_params["token"])[:64]
        try:
            await _form(request)
        except BodyTooLarge:
            return refused(413)

        def work() -> None:
            with app.transaction() as s:
                if undo_unsubscribe(s, token, app.now(), undo):
                    logger.info("a lead took back its unsubscribe")

        await run_in_threadpool(work)
        return page(None, "unsubscribe.html", state="undone", token=quote(token, safe=""))

    # --- health and metrics (no login) -------------------------------------------------

    async def healthz(request: Request) -> Response:
        health = await run_in_threadpool(check_health, app)
        return JSONResponse(health.as_json(), status_code=200 if health.ok else 503)

    async def metrics(request: Request) -> Response:
        if metrics_token is not None:
            given = request.headers.get("authorization", "")
            if not same_secret(given, f"Bearer {metrics_token}"):
                return Response("unauthorized\n", 401, {"WWW-Authenticate": "Bearer"})
        body = await run_in_threadpool(render_metrics, app)
        return Response(body, media_type=None, headers={"Content-Type": CONTENT_TYPE})

    async def stylesheet(request: Request) -> Response:
        return Response(css, media_type="text/css", headers={"Cache-Control": "max-age=3600"})

    # --- login --------------------------------------------------------------------------

    def csrf_of(request: Request) -> str:
        if "csrf" not in request.session:
            request.session["csrf"] = secrets.token_urlsafe(32)
        return str(request.session["csrf"])

    def csrf_ok(request: Request, form: dict[str, str]) -> bool:
        expected = request.session.get("csrf")
        return bool(expected) and same_secret(form.get("csrf", ""), str(expected))

    def safe_next(target: str) -> str:
        return target if re.fullmatch(r"/console(/[\w./%@+=&?-]*)?", target) else "/console"

    async def login(request: Request) -> Response:
        if request.method == "GET":
            nxt = safe_next(request.query_params.get("next", "/console"))
            return page(None, "login.html", csrf=csrf_of(request), next=nxt, error=None)
        try:
            form = await _form(request)
        except BodyTooLarge:
            return refused(413)
        if not csrf_ok(request, form):
            return refused()
        client = request.client.host if request.client else "?"
        nxt = safe_next(form.get("next", "/console"))
        if limiter.blocked(client):
            return page(
                None,
                "login.html",
                429,
                csrf=csrf_of(request),
                next=nxt,
                error="Too many failed attempts: wait a few minutes.",
            )
        given = form.get("password", "")[:4096]
        good = bool(given) and (
            (password_hash is not None and verify_password(given, password_hash))
            or (login_token is not None and same_secret(given, login_token))
        )
        if not good:
            limiter.fail(client)
            logger.warning("console: failed login from %s", client)
            error = "Wrong password or token."
            if password_hash is None and login_token is None:
                error = "No login is configured: set serve.console.password_hash or token."
            return page(None, "login.html", 401, csrf=csrf_of(request), next=nxt, error=error)
        request.session.clear()
        request.session.update({"auth": True, "csrf": secrets.token_urlsafe(32)})
        return RedirectResponse(nxt, 303)

    async def checked_form(request: Request) -> dict[str, str] | Response:
        """The POSTed form when it carries this session's CSRF token, else the refusal."""
        try:
            form = await _form(request)
        except BodyTooLarge:
            return refused(413)
        return form if csrf_ok(request, form) else refused()

    async def logout(request: Request) -> Response:
        if isinstance(form := await checked_form(request), Response):
            return form
        request.session.clear()
        return RedirectResponse("/login", 303)

    # --- the console (login required) ----------------------------------------------------

    def login_required(handler: Handler) -> Handler:
        async def guarded(request: Request) -> Response:
            if not request.session.get("auth"):
                if request.method == "GET":
                    target = quote(request.url.path, safe="/")
                    return RedirectResponse(f"/login?next={target}", 303)
                return refused()
            return await handler(request)

        return guarded

    def action(work: Callable[[Request, dict[str, str]], str], back: str) -> Handler:
        """A POST: CSRF checked, `work` run in a thread, its message flashed, then `back`."""

        async def run(request: Request) -> Response:
            if isinstance(form := await checked_form(request), Response):
                return form
            request.session["flash"] = await run_in_threadpool(work, request, form)
            return RedirectResponse(back, 303)

        return login_required(run)

    async def home(request: Request) -> Response:
        from worker.status import collect_status

        def data() -> dict[str, Any]:
            from worker.campaigns import paused_campaigns

            status = collect_status(app)
            with app.transaction() as s:
                paused = paused_campaigns(s)
                for f in status["funnel"]:
                    f["steps"] = funnel_steps(s, config, f["campaign"])
                    f["paused"] = f["campaign"] in paused
                    f["configured"] = any(c.name == f["campaign"] for c in config.campaigns)
            return status

        status = await run_in_threadpool(data)
        health = await run_in_threadpool(check_health, app)
        return page(
            request,
            "home.html",
            funnel=status["funnel"],
            leads=status["leads"],
            quarantine=status["quarantine"],
            unknown=len(status["unknown_sends"]),
            health=health,
        )

    async def leads(request: Request) -> Response:
        q = request.query_params.get("q", "")[:200]
        status = request.query_params.get("status") or None
        if status not in (None, *LeadStatus):
            status = None

        def data() -> tuple[list[dict[str, Any]], bool]:
            with app.transaction() as s:
                return search_leads(s, q, status)

        rows, more = await run_in_threadpool(data)
        return page(
            request,
            "leads.html",
            rows=rows,
            more=more,
            q=q,
            status=status or "",
            statuses=tuple(LeadStatus),
        )

    async def lead(request: Request) -> Response:
        key = str(request.path_params["email"])[:320]

        def data() -> dict[str, Any] | None:
            with app.transaction() as s:
                try:
                    return show_lead(s, key)
                except LeadError:
                    return None

        found = await run_in_threadpool(data)
        if found is None:
            return page(
                request,
                "leads.html",
                404,
                rows=[],
                more=False,
                q=key,
                status="",
                statuses=tuple(LeadStatus),
                flash=f"No lead {key}.",
            )
        return page(request, "lead.html", lead=found)

    async def waiting(request: Request) -> Response:
        def data() -> list[dict[str, Any]]:
            with app.transaction() as s:
                return waiting_prospects(s, app.now())

        return page(request, "waiting.html", rows=await run_in_threadpool(data))

    async def quarantine(request: Request) -> Response:
        def data() -> list[dict[str, Any]]:
            with app.transaction() as s:
                return quarantine_rows(s)

        return page(request, "quarantine.html", rows=await run_in_threadpool(data))

    async def quarantined(request: Request) -> Response:
        qid = int(request.path_params["qid"])

        def data() -> tuple[dict[str, Any], str, bool] | None:
            with app.transaction() as s:
                return quarantine_item(s, qid)

        found = await run_in_threadpool(data)
        if found is None:
            return page(request, "quarantine.html", 404, rows=[], flash=f"No message #{qid}.")
        q, raw, cut = found
        return page(request, "quarantine_item.html", q=q, raw=raw, truncated=cut, shown=len(raw))

    def retry(request: Request, form: dict[str, str]) -> str:
        from worker.inbound import retry_quarantined

        qid = int(request.path_params["qid"])
        try:
            return f"#{qid} processed: {retry_quarantined(app, qid)}"
        except LookupError as e:
            return str(e)
        except ValueError as e:
            return f"#{qid} still failing: {e}"

    async def unknown(request: Request) -> Response:
        from worker.status import collect_status

        status = await run_in_threadpool(collect_status, app)
        return page(request, "unknown.html", rows=status["unknown_sends"])

    def settle(request: Request, form: dict[str, str]) -> str:
        from worker.outbox import resolve_unknown

        choice = "sent" if request.path_params["choice"] == "sent" else "resend"
        message_id = form.get("message_id", "")[:998]
        try:
            with app.transaction() as s:
                row = resolve_unknown(s, message_id, choice, app.now())
                what = "marked as sent" if choice == "sent" else "queued to be sent again"
                return f"{row.template} to {row.to_addr} {what}."
        except LookupError as e:
            return str(e)

    def pause_or_resume(request: Request, form: dict[str, str]) -> str:
        from worker.campaigns import pause_campaign, resume_campaign

        name = str(request.path_params["name"])[:200]
        try:
            with app.transaction() as s:
                if request.path_params["choice"] == "pause":
                    n = pause_campaign(s, config, name, app.now(), by="console")
                    return f"Campaign {name} paused ({n} lead(s) waiting)."
                r = resume_campaign(s, config, name, app.now(), by="console")
                return f"Campaign {name} resumed ({r.leads} lead(s))."
        except LeadError as e:
            return str(e)

    def preview(name: str, lead_key: str) -> tuple[Any, str, str | None]:
        renderer = Renderer(config.templates_path)
        lead, token = None, None
        whom = "the sample lead"
        if lead_key:
            with app.transaction() as s:
                try:
                    row = get_lead(s, lead_key)
                except LeadError as e:
                    return None, whom, str(e)
                lead, token, whom = lead_fields(row), row.reply_token, row.email
        try:
            return renderer.render(name, preview_context(config, name, lead, token)), whom, None
        except TemplateError as e:
            return None, whom, str(e)

    async def templates(request: Request) -> Response:
        renderer = Renderer(config.templates_path)
        names = renderer.names()
        name = request.query_params.get("name") or (names[0] if names else "")
        lead_key = request.query_params.get("lead", "")[:320]
        problems = [str(e) for e in await run_in_threadpool(lint_for, renderer, config, names)]
        out, whom, error = (None, "", None)
        if name in names:
            out, whom, error = await run_in_threadpool(preview, name, lead_key)
        return page(
            request,
            "templates.html",
            names=names,
            name=name,
            lead=lead_key,
            problems=problems,
            out=out,
            for_whom=whom,
            error=error,
        )

    async def template_frame(request: Request) -> Response:
        name = request.query_params.get("name", "")
        lead_key = request.query_params.get("lead", "")[:320]
        if name not in Renderer(config.templates_path).names():
            return refused(404)
        out, _, error = await run_in_threadpool(preview, name, lead_key)
        html = out.html if out is not None else f"<p>{escape(error or '')}</p>"
        return HTMLResponse(
            html, headers={"Content-Security-Policy": FRAME_CSP, "X-Frame-Options": "SAMEORIGIN"}
        )

    async def root(request: Request) -> Response:
        return RedirectResponse("/console", 303)

    routes = [
        Route("/u/{token}", unsubscribe, methods=["GET", "POST"]),
        Route("/u/{token}/undo", unsubscribe_undo, methods=["POST"]),
        Route("/healthz", healthz),
        Route("/metrics", metrics),
        Route("/static/console.css", stylesheet),
        Route("/login", login, methods=["GET", "POST"]),
        Route("/logout", logout, methods=["POST"]),
        Route("/", root),
        Route("/console", login_required(home)),
        Route(
            "/console/campaigns/{name}/{choice:str}",
            action(pause_or_resume, "/console"),
            methods=["POST"],
        ),
        Route("/console/leads", login_required(leads)),
        Route("/console/leads/{email}", login_required(lead)),
        Route("/console/waiting", login_required(waiting)),
        Route("/console/quarantine", login_required(quarantine)),
        Route("/console/quarantine/{qid:int}", login_required(quarantined)),
        Route(
            "/console/quarantine/{qid:int}/retry",
            action(retry, "/console/quarantine"),
            methods=["POST"],
        ),
        Route("/console/unknown", login_required(unknown)),
        Route("/console/unknown/{choice}", action(settle, "/console/unknown"), methods=["POST"]),
        Route("/console/templates", login_required(templates)),
        Route("/console/templates/frame", login_required(template_frame)),
    ]
    middleware = [
        Middleware(_SecureHeaders, hsts=https),
        Middleware(
            SessionMiddleware,
            secret_key=session_secret,
            session_cookie="twoway_session",
            max_age=int(console.session_hours * 3600),
            same_site="strict",
            https_only=https,
        ),
    ]
    return Starlette(routes=routes, middleware=middleware)


def serve(app: App, host: str, port: int) -> None:
    """Run the server until SIGTERM/SIGINT (uvicorn handles both)."""
    server = _server(app, host, port)
    logger.warning("twoway serve: listening on http://%s:%d", host, port)
    server.run()


def serve_in_thread(app: App, host: str, port: int) -> Callable[[], None]:
    """Serve from a thread of this process (`twoway run --serve`); returns how to stop it.

    The signals stay the caller's: uvicorn installs its handlers only in the main thread.
    """
    server = _server(app, host, port)
    thread = threading.Thread(target=server.run, name="serve", daemon=True)
    thread.start()
    logger.info("twoway run --serve: listening on http://%s:%d", host, port)

    def stop() -> None:
        server.should_exit = True
        thread.join(timeout=15)

    return stop


def _server(app: App, host: str, port: int) -> uvicorn.Server:
    https = (app.config.serve.public_url or "").startswith("https://")
    return uvicorn.Server(
        uvicorn.Config(
            # Outside Starlette's error handler too, so a 500 page carries them as well.
            _SecureHeaders(build_app(app), hsts=https),
            host=host,
            port=port,
            log_level="warning",
            access_log=False,  # the paths carry unsubscribe tokens
            proxy_headers=True,
            forwarded_allow_ips=list(app.config.serve.trusted_proxies),
            server_header=False,
        )
    )
