"""The `twoway` command line. Exit codes: 0 success, 1 the job failed, 2 bad usage or input."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import click

from worker import __version__, db
from worker.app import App
from worker.compose import compose, new_message_id
from worker.config import Config, ConfigError, clock_from_env, load_config, missing_templates
from worker.console import quarantine_rows
from worker.contexts import kinds_of, preview_context, samples
from worker.db import (
    DatabaseError,
    DatabaseUrlError,
    as_unavailable,
    is_unavailable,
    open_engine,
    url_problem,
)
from worker.handoffs import cancel_followup, waiting_leads
from worker.health import check_health
from worker.leads import (
    LeadError,
    get_lead,
    import_file,
    lead_fields,
    list_leads,
    mark_lead,
    show_lead,
)
from worker.leases import WorkerLockError
from worker.passwords import hash_password
from worker.report import build_report
from worker.samples import SamplesMissing, init_project
from worker.status import collect_status, format_status
from worker.terminal import one_line, printable

F = TypeVar("F", bound=Callable[..., Any])


class Failure(Exception):
    """The job failed (exit 1) with a message for people."""


def echo(message: str = "", *, err: bool = False) -> None:
    """Print a line for people; every text and JSON printer of the command goes through
    here, so data from CSV files and mail never reaches the terminal as control codes."""
    click.echo(printable(message), err=err)


def _die(message: str, code: int) -> NoReturn:
    echo(f"twoway: {message}", err=True)
    sys.exit(code)


@contextmanager
def _errors() -> Iterator[None]:
    """Turn the errors people can act on into a message and an exit code, never a traceback."""
    try:
        yield
    except ConfigError as e:
        _die(f"bad configuration\n{e}", 2)
    except LeadError as e:
        _die(str(e), 2)
    except DatabaseUrlError as e:
        _die(str(e), 2)
    except DatabaseError as e:
        _die(str(e), 1)
    except Failure as e:
        _die(str(e), 1)
    except WorkerLockError as e:
        _die(str(e), 2)
    except Exception as e:
        if not is_unavailable(e):
            raise
        _die(str(as_unavailable(e)), 1)  # lost mid-command (server gone, disk full, locked)


def _count_lines(path: Path) -> int:
    """Data rows in a CSV file, roughly (for the progress bar only)."""
    try:
        with path.open("rb") as f:
            return max(sum(1 for _ in f) - 1, 0)
    except OSError:
        return 0


def _prog_name() -> str:
    """How to type this program again: `twoway` when that is on PATH, else its path."""
    argv0 = Path(sys.argv[0])
    found = shutil.which("twoway")
    if argv0.name == "twoway" and (found is None or Path(found).resolve() != argv0.resolve()):
        return str(argv0)
    return "twoway"


def _print_json(data: Any) -> None:
    echo(json.dumps(data, indent=2, default=str, ensure_ascii=False))


class _State:
    def __init__(self, config_path: str | None, verbose: bool = False) -> None:
        self.config_path = config_path
        self.verbose = verbose
        self._app: App | None = None

    def app(self, *, migrate: bool = True) -> App:
        if self._app is None:
            config = load_config(self.config_path)
            self._app = App.open(config, clock_from_env(), migrate=migrate)
        return self._app


pass_state = click.make_pass_decorator(_State)


def _config_first(args: list[str]) -> list[str]:
    """Move `--config F` (or `--config=F`) given after the subcommand to the front, where
    the group parses it: `twoway config check --config F` works like `twoway --config F
    config check`. Nothing after `--` moves."""
    head: list[str] = []
    rest: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--":
            rest += args[i:]
            break
        if arg == "--config" and i + 1 < len(args):
            head += args[i : i + 2]
            i += 2
            continue
        if arg.startswith("--config="):
            head.append(arg)
        else:
            rest.append(arg)
        i += 1
    return head + rest


class _Main(click.Group):
    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        return super().parse_args(ctx, _config_first(args))


@click.group(cls=_Main, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--config",
    "config_path",
    envvar="TWOWAY_CONFIG",
    type=click.Path(dir_okay=False),
    help="Config file (default: $TWOWAY_CONFIG or config/twoway.yaml).",
)
@click.option("-v", "--verbose", is_flag=True, help="Log more.")
@click.version_option(__version__, prog_name="twoway")
@click.pass_context
def main(ctx: click.Context, config_path: str | None, verbose: bool) -> None:
    """twoway: turns one-way leads into two-way prospects."""
    if ctx.invoked_subcommand not in ("run", "serve"):  # those two set it up with their options
        _setup_logging("human", verbose, daemon=False)
    # The database, reports, outbox and quarantine hold personal data and the tokens that
    # `leads mark` accepts: whatever twoway creates is for its own user only.
    # The mask is put back when the command ends, so a command run inside another program
    # (a test, a script calling main()) leaves that program's own files as it made them.
    previous = os.umask(0o077)
    ctx.call_on_close(lambda: os.umask(previous))
    ctx.obj = _State(config_path, verbose)


# --- db ----------------------------------------------------------------------------------


@main.group("db")
def db_group() -> None:
    """Database schema."""


@db_group.command("upgrade")
@pass_state
def db_upgrade(state: _State) -> None:
    """Apply pending migrations (Alembic)."""
    with _errors():
        app = state.app(migrate=False)
        before = db.current_revision(app.engine)
        db.upgrade(app.engine)
        after = db.current_revision(app.engine)
        echo(f"database at {after}" + ("" if before == after else f" (was {before})"))


# --- config ------------------------------------------------------------------------------


@main.group("config")
def config_group() -> None:
    """Check configuration."""


@config_group.command("check")
@click.option("--connect", is_flag=True, help="Also log in to every IMAP mailbox and SMTP.")
@pass_state
def config_check(state: _State, connect: bool) -> None:
    """Validate the config file and templates (and with --connect, the servers)."""
    with _errors():
        try:
            config = load_config(state.config_path)
        except ConfigError as e:  # the missing templates too, in the same run
            e.problems += missing_templates(Path(e.path))
            raise
        problems: list[str] = []
        from worker.rendering import Renderer, lint_for

        renderer = Renderer(config.templates_path)
        names = {t for c in config.campaigns for s in c.steps for t in s.templates}
        names.add(config.handoff.template)
        if config.handoff.follow_up:
            names.add(config.handoff.follow_up.template)
        problems += [str(e) for e in lint_for(renderer, config, sorted(names))]
        problems += [p for p in [url_problem(config.database)] if p]
        if connect:
            problems += _connect_checks(config)
        if problems:
            for p in problems:
                echo(f"  {p}", err=True)
            _die(f"{config.path}: {len(problems)} problem(s)", 2 if not connect else 1)
        echo(
            f"{config.path}: OK ({len(config.mailboxes)} mailbox(es), "
            f"{len(config.campaigns)} campaign(s), {len(config.reps)} rep(s))"
            + ("; servers reachable" if connect else "")
        )


def _connect_checks(config: Config) -> list[str]:
    from worker.mailbox import probe
    from worker.mailer import probe_smtp

    problems: list[str] = []
    try:
        open_engine(config.database, busy_timeout=config.workers.busy_timeout).dispose()
    except DatabaseError as e:
        problems.append(str(e))
    except DatabaseUrlError:
        pass  # said already, without --connect
    problems += [f"mailbox {m.name}: {p}" for m in config.mailboxes if (p := probe(m))]
    if config.smtp is not None and (p := probe_smtp(config.smtp)):
        problems.append(f"smtp: {p}")
    return problems


# --- leads -------------------------------------------------------------------------------


@main.group("leads")
def leads_group() -> None:
    """Import and look at leads."""


@leads_group.command("import")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--campaign", help="Enroll every imported lead in this campaign.")
@click.option("--source", help="Source recorded for leads without a source column.")
@click.option("--strict", is_flag=True, help="Import nothing if any row is rejected.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@pass_state
def leads_import(
    state: _State, file: Path, campaign: str | None, source: str | None, strict: bool, as_json: bool
) -> None:
    """Import or update leads from a CSV file (header row; `email` required)."""
    with _errors():
        app = state.app()
        total = _count_lines(file) if sys.stderr.isatty() and not as_json else 0
        if total > 2000:
            with click.progressbar(length=total, label="importing", file=sys.stderr) as bar:
                done = [0]

                def tick(n: int) -> None:
                    bar.update(n - done[0])
                    done[0] = n

                result = import_file(
                    app, file, campaign, source=source, strict=strict, progress=tick
                )
        else:
            result = import_file(app, file, campaign, source=source, strict=strict)
        if as_json:
            _print_json({"file": str(file), **result.as_json()})
        else:
            for r in result.rejected:
                echo(f"{file}:{r.line}: rejected {r.email or '(no email)'}: {r.reason}", err=True)
            summary = f"{result.imported} imported, {result.updated} updated, {len(result.rejected)} rejected"
            if result.suppressed:
                summary += f", {result.suppressed} skipped (do-not-contact list)"
            if campaign is not None:
                summary += f", {result.enrolled} enrolled in {campaign}"
            if result.strict_failed:
                summary = f"nothing imported (--strict): {len(result.rejected)} rejected row(s)"
            echo(summary)
        if result.strict_failed or (result.rejected and not (result.imported or result.updated)):
            sys.exit(2)  # nothing usable in the file: bad input, not a success


@leads_group.command("list")
@click.option("--status", help="Only leads in this status.")
@click.option("--limit", type=click.IntRange(min=0), help="At most this many.")
@click.option(
    "--waiting",
    is_flag=True,
    help="Only prospects still waiting for their rep's first answer, oldest first.",
)
@click.option("--json", "as_json", is_flag=True)
@pass_state
def leads_list(
    state: _State, status: str | None, limit: int | None, waiting: bool, as_json: bool
) -> None:
    """List leads."""
    with _errors():
        app = state.app()
        if waiting:
            _list_waiting(app, limit, as_json)
            return
        with app.transaction() as session:
            rows = list_leads(session, status, limit)
        if as_json:
            _print_json(rows)
            return
        if not rows:
            echo("no leads" + (f" in status {status}" if status else ""))
            return
        echo(f"{'EMAIL':36} {'STATUS':12} {'SCORE':>5}  {'OWNER':28} COMPANY")
        for r in rows:
            score = "" if r["score"] is None else str(r["score"])
            owner, company = one_line(r["owner"] or "-"), one_line(r["company"] or "")
            echo(f"{r['email']:36} {r['status']:12} {score:>5}  {owner:28} {company}")


def _list_waiting(app: App, limit: int | None, as_json: bool) -> None:
    with app.transaction() as session:
        rows = waiting_leads(session, app.now(), limit or 200)
    if as_json:
        _print_json(rows)
        return
    if not rows:
        echo("no prospect is waiting for an answer")
        return
    echo(f"{'EMAIL':36} {'REP':28} {'WAITING':>9}  SINCE")
    for r in rows:
        late = "  over the SLA" if r["breached"] else ""
        minutes = f"{r['waiting_seconds'] // 60} min"
        echo(f"{r['email']:36} {r['rep']:28} {minutes:>9}  {r['since']}{late}")


@leads_group.group("followup")
def followup_group() -> None:
    """The follow-up twoway sends a prospect in the rep's name."""


@followup_group.command("cancel")
@click.argument("email")
@pass_state
def followup_cancel(state: _State, email: str) -> None:
    """Do not send EMAIL's queued follow-up (the rep answers them personally)."""
    with _errors():
        app = state.app()
        with app.transaction() as session:
            lead = get_lead(session, email)
            n = cancel_followup(session, lead, app.now(), "twoway leads followup cancel")
            address = lead.email
        if n:
            echo(f"the follow-up to {address} is cancelled")
        else:
            echo(f"no follow-up is waiting to go to {address}")


@leads_group.command("show")
@click.argument("email")
@click.option("--json", "as_json", is_flag=True)
@pass_state
def leads_show(state: _State, email: str, as_json: bool) -> None:
    """A lead's profile and whole story: enrollments, mail, transitions with causes."""
    with _errors():
        app = state.app()
        with app.transaction() as session:
            data = show_lead(session, email)
        if as_json:
            _print_json(data)
            return
        echo(_format_lead(data))


def _format_lead(d: dict[str, Any]) -> str:
    name = one_line(" ".join(x for x in (d["first_name"], d["last_name"]) if x) or "(no name)")
    lines = [
        f"{name} <{d['email']}>",
        f"  status {d['status']}   owner {d['owner'] or '-'}   score {d['score'] if d['score'] is not None else '-'}",
    ]
    org = ", ".join(
        one_line(x) for x in (d["title"], d["company"], d["industry"], d["country"]) if x
    )
    if org:
        lines.append(f"  {org}")
    if d.get("referred_by"):
        lines.append(f"  referred by {d['referred_by']}")
    q = d.get("qualification") or {}
    if q.get("checklist"):
        lines.append("qualification:")
        for item in q["checklist"]:
            lines.append(
                f"  [{item['status']:7}] {item['criterion']}: {item.get('evidence') or ''}"
            )
    if d["enrollments"]:
        lines.append("enrollments:")
        for en in d["enrollments"]:
            parts = []
            if en["paused_until"]:
                parts.append(f"paused until {en['paused_until']}")
            if en["next_due"] and not (en["paused_until"] and en["next_due"] < en["paused_until"]):
                parts.append(f"next due {en['next_due']}")  # a due time inside the pause waits
            if en.get("waiting"):
                parts.append(f"waits: {en['waiting']}")
            extra = "".join(f"; {p}" for p in parts)
            lines.append(f"  {en['campaign']}: {en['state']}, {en['step']} step(s) sent{extra}")
    if d["messages"]:
        lines.append("mail:")
        for m in d["messages"]:
            arrow = "->" if m["direction"] == "out" else "<-"
            what = m["kind"] or "?"
            if m.get("bounce"):
                what += f" ({m['bounce'].get('type')}, {m['bounce'].get('reason') or 'other'})"
            extra = (
                f" [{m['status']}]"
                if m["direction"] == "out"
                else f" matched by {m['match'] or '-'}"
            )
            cut = re.search(r"truncated: [^;]*", m.get("reason") or "")  # said where it shows
            extra += f" [{cut.group(0)}]" if cut else ""
            lines.append(f"  {m['at']} {arrow} {what}: {one_line(m['subject'] or '')}{extra}")
    lines.append("timeline:")
    for e in d["events"]:
        change = f" {e['from_status'] or '-'} -> {e['to_status']}" if e["to_status"] else ""
        lines.append(f"  {e['at']} {e['type']}{change} ({e['cause']})")
    return "\n".join(lines)


@leads_group.command("mark")
@click.argument("email")
@click.argument("status")
@click.option("--reason", help="Why (kept in the timeline).")
@pass_state
def leads_mark(state: _State, email: str, status: str, reason: str | None) -> None:
    """Change a lead's status by hand (customer, disqualified, ...)."""
    with _errors():
        app = state.app()
        with app.transaction() as session:
            lead = mark_lead(session, email, status, app.now(), reason)
            echo(f"{lead.email} is now {lead.status}")


# --- status ------------------------------------------------------------------------------


@main.command("status")
@click.option("--json", "as_json", is_flag=True)
@click.option(
    "--check",
    is_flag=True,
    help="Health check only: exit 1 unless a worker is alive and no mailbox is failing.",
)
@pass_state
def status_cmd(state: _State, as_json: bool, check: bool) -> None:
    """Funnel, outbox, mailbox health, quarantine and alarms."""
    with _errors():
        app = state.app()
        if check:
            health = check_health(app)
            if as_json:
                _print_json(health.as_json())
            else:
                for reason in health.reasons:
                    echo(f"twoway: {reason}", err=True)
                echo("healthy" if health.ok else "not healthy")
            sys.exit(0 if health.ok else 1)
        data = collect_status(app)
        if as_json:
            _print_json(data)
        else:
            echo(format_status(data))


# --- the worker --------------------------------------------------------------------------


class JsonFormatter(logging.Formatter):
    """One JSON object per line: at, level, logger, message; with an exception, `error`
    (its type and first line) and `traceback` (all of it: a multi-line message or a
    chained cause is the part that says what went wrong)."""

    def format(self, record: logging.LogRecord) -> str:
        data = {
            "at": self.formatTime(record, "%Y-%m-%dT%H:%M:%S%z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info and record.exc_info[1] is not None:
            exc = record.exc_info[1]
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            data["error"] = f"{exc.__class__.__name__}: {first}".rstrip(": ")
            data["traceback"] = self.formatException(record.exc_info)
        if record.stack_info:
            data["stack"] = self.formatStack(record.stack_info)
        return printable(json.dumps(data, ensure_ascii=False))


class _TextFormatter(logging.Formatter):
    """The log line people read: subjects and addresses in it are shown, never obeyed."""

    def format(self, record: logging.LogRecord) -> str:
        return printable(super().format(record))


def _setup_logging(fmt: str | None, verbose: bool, *, daemon: bool = True) -> None:
    """The process's logging, set up once, at the entry point: to standard error, as
    `human` lines or `json` objects (None: human on a terminal, json otherwise). The
    daemons (`run`, `serve`) log from INFO; the other commands only warnings, and leave
    logging alone when the program calling them has set it up. -v: from DEBUG."""
    root = logging.getLogger()
    if not daemon and root.handlers:
        return
    for h in list(root.handlers):
        root.removeHandler(h)
    handler = logging.StreamHandler(sys.stderr)
    if (fmt or ("human" if sys.stderr.isatty() else "json")) == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(_TextFormatter("%(asctime)s %(levelname)-7s %(message)s", "%H:%M:%S"))
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose else logging.INFO if daemon else logging.WARNING)
    for noisy in ("imapclient", "sqlalchemy", "alembic"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # mail-parser logs every part type it does not render; our parser handles those.
    logging.getLogger("mailparser").setLevel(logging.ERROR)


@main.command("run")
@click.option(
    "--once",
    is_flag=True,
    help="One pass: read every message now in the mailbox(es), send what is due, exit.",
)
@click.option(
    "--log-format",
    type=click.Choice(["human", "json"]),
    default=None,
    help="Default: human on a terminal, json otherwise.",
)
@click.option(
    "--json", "as_json", is_flag=True, help="With --once: print what the pass did as JSON."
)
@click.option(
    "--serve",
    "with_serve",
    is_flag=True,
    help="Also run `twoway serve` (serve.host, serve.port) in this process.",
)
@pass_state
def run_cmd(
    state: _State, once: bool, log_format: str | None, as_json: bool, with_serve: bool
) -> None:
    """The worker: sync mailboxes (IDLE or polling), process replies, send what is due."""
    from worker.inbound import tune_gc
    from worker.runner import Worker, run_daemon

    _setup_logging(log_format, state.verbose)
    with _errors():
        app = state.app()
        tune_gc()
        if not once:
            serve = app.config.serve
            run_daemon(
                app,
                lambda: load_config(state.config_path),
                (serve.host, serve.port) if with_serve else None,
            )
            return
        with Worker(app) as worker:
            result = worker.run_once_retrying()
        if as_json:
            _print_json(result.as_json())
        else:
            kinds = ", ".join(f"{k} {v}" for k, v in sorted(result.inbound.kinds.items()))
            echo(
                f"read {result.inbound.processed} message(s)"
                + (f" ({kinds})" if kinds else "")
                + f", quarantined {result.inbound.quarantined}, queued {result.queued} step(s), sent {result.sent}"
            )
            for e in result.errors:
                echo(f"error: {e}", err=True)
        if result.errors:
            sys.exit(1)


# --- inspect -----------------------------------------------------------------------------


@main.command("inspect")
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option(
    "--json", "as_json", is_flag=True, help="One JSON object per file (one per line for several)."
)
@pass_state
def inspect_cmd(state: _State, paths: tuple[Path, ...], as_json: bool) -> None:
    """Classify messages offline: kind, bounce details, return date, reply text, intent."""
    from worker.inspect import format_human, inspect_files

    app: App | None = None
    if state.config_path or Path("config/twoway.yaml").exists():
        with _errors():
            app = state.app()
    with _errors():
        results = inspect_files(list(paths), app)
    single = len(paths) == 1 and paths[0].is_file()
    for r in results:
        if single and not as_json:
            echo(format_human(r))
        else:  # several files: one JSON object per line, with or without --json
            echo(json.dumps(r, indent=2 if single else None, default=str, ensure_ascii=False))
    unreadable = [r for r in results if str(r.get("error", "")).startswith("cannot read")]
    for r in unreadable if not single else ():
        echo(f"twoway: {r['file']}: {r['error']}", err=True)
    if unreadable or (single and results and results[0].get("kind") is None):
        sys.exit(2)


# --- quarantine --------------------------------------------------------------------------


@main.group("quarantine")
def quarantine_group() -> None:
    """Messages that could not be processed."""


@quarantine_group.command("list")
@click.option(
    "--all", "show_all", is_flag=True, help="Include messages already retried successfully."
)
@click.option("--json", "as_json", is_flag=True)
@pass_state
def quarantine_list(state: _State, show_all: bool, as_json: bool) -> None:
    """List quarantined messages with their reason."""
    with _errors():
        app = state.app()
        with app.transaction() as s:
            rows = quarantine_rows(s, resolved_too=show_all)
        if as_json:
            _print_json(rows)
        elif not rows:
            echo("quarantine is empty")
        else:
            for r in rows:
                echo(
                    f"#{r['id']} {r['mailbox']}/{r['folder']} uid {r['uid']} ({r['size']} bytes): {r['reason']}"
                )


@quarantine_group.command("retry")
@click.argument("qid", type=int)
@pass_state
def quarantine_retry(state: _State, qid: int) -> None:
    """Process a quarantined message again (after a fix)."""
    from worker.inbound import retry_quarantined

    with _errors():
        app = state.app()
        try:
            kind = retry_quarantined(app, qid)
        except LookupError as e:
            _die(str(e), 2)
        except ValueError as e:
            _die(f"still failing: {e}", 1)
        echo(f"#{qid} processed: {kind}")


# --- templates ---------------------------------------------------------------------------


@main.group("templates")
def templates_group() -> None:
    """Check and try email templates."""


@templates_group.command("lint")
@click.option(
    "--leads",
    "with_leads",
    is_flag=True,
    help="Also render every template for every enrolled lead.",
)
@pass_state
def templates_lint(state: _State, with_leads: bool) -> None:
    """Render every template against sample data (and enrolled leads); name file:line of each problem."""
    from worker.rendering import Renderer, lint_for

    with _errors():
        config = load_config(state.config_path)
        renderer = Renderer(config.templates_path)
        names = renderer.names()
        problems = [str(e) for e in lint_for(renderer, config, names)]
        checked = len(names)
        by_lead: dict[str, list[str]] = {}
        if with_leads:
            from worker.sequences import lint_enrolled

            app = state.app()
            with app.transaction() as s:
                renders, by_lead = lint_enrolled(s, renderer, config)
            checked += renders
        # A problem every lead shares (a syntax error) is said once, as sample data found
        # it; one of some leads' data (a custom field they lack) names them.
        by_lead = {p: emails for p, emails in by_lead.items() if p not in problems}
        for p in dict.fromkeys(problems):
            echo(p, err=True)
        for p, emails in by_lead.items():
            who = ", ".join(dict.fromkeys(emails[:3])) + (
                f" and {len(set(emails)) - 3} more" if len(set(emails)) > 3 else ""
            )
            echo(f"{p} (lead {who})", err=True)
        count = len(set(problems)) + len(by_lead)
        if count:
            _die(f"{count} template problem(s)", 2)
        echo(f"{checked} template render(s) OK in {config.templates_path}")


@templates_group.command("preview")
@click.argument("name")
@click.option("--lead", "lead_email", help="Render for this lead instead of sample data.")
@click.option(
    "--html",
    "html_file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Also write the HTML part here.",
)
@pass_state
def templates_preview(
    state: _State, name: str, lead_email: str | None, html_file: Path | None
) -> None:
    """Print a template's subject and text as a lead would get them."""
    from worker.rendering import Renderer, TemplateError

    with _errors():
        config = load_config(state.config_path)
        renderer = Renderer(config.templates_path)
        lead, token = None, None
        if lead_email:
            with state.app().transaction() as s:
                found = get_lead(s, lead_email)
                lead, token = lead_fields(found), found.reply_token
        try:
            out = renderer.render(name, preview_context(config, name, lead, token))
        except TemplateError as e:
            _die(str(e), 2)
        echo(f"Subject: {out.subject}\n\n{out.text}")
        if html_file:
            partial = html_file.with_name(f".{html_file.name}.partial")
            partial.write_text(out.html, encoding="utf-8")
            partial.replace(html_file)  # replaces a symlink there instead of following it
            echo(f"(HTML written to {html_file})", err=True)


@templates_group.command("send-test")
@click.argument("name")
@click.option("--to", "to_addr", required=True, help="Where to send the test.")
@pass_state
def templates_send_test(state: _State, name: str, to_addr: str) -> None:
    """Send one rendering of a template (sample data) to an address, through the configured SMTP."""
    from worker.mailer import Mailer
    from worker.rendering import Renderer, TemplateError

    with _errors():
        config = load_config(state.config_path)
        if config.smtp is None:
            _die("no smtp section in the config", 2)
        renderer = Renderer(config.templates_path)
        try:
            ctx = samples(config.sender)[kinds_of(config, [name])[name]]
            out = renderer.render(name, ctx)
            msg = compose(
                from_addr=config.sender.address,
                from_name=config.sender.display_name,
                to_addr=to_addr,
                to_name="",
                subject=f"[test] {out.subject}",
                text=out.text,
                html=out.html,
                message_id=new_message_id(config.sender.domain),
                domain=config.sender.domain,
            )
        except TemplateError as e:
            _die(str(e), 2)
        except ValueError as e:
            _die(f"--to: {e}", 2)
        with Mailer(config.smtp) as mailer:
            result = mailer.send(msg, config.sender.address, [to_addr])
        if result.status != "sent":
            _die(f"not sent ({result.status}): {result.code or ''} {result.message}", 1)
        echo(f"sent {name} to {to_addr}")


# --- demo --------------------------------------------------------------------------------


@main.command("demo")
@click.option(
    "--dir",
    "workspace",
    type=click.Path(file_okay=False, path_type=Path),
    help="Workspace folder (default: a new temp folder).",
)
def demo_cmd(workspace: Path | None) -> None:
    """The whole flow on the embedded default: SQLite, a Maildir inbox and outbox, no setup."""
    from worker.demo import DemoError, run_demo

    with _errors():
        try:
            code = run_demo(workspace, clock_from_env(), echo, _prog_name())
        except DemoError as e:
            _die(str(e), 1)
        sys.exit(code)


@main.command("init")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
def init_cmd(directory: Path) -> None:
    """Write a starting point into DIRECTORY: config/twoway.yaml, sample leads, templates/."""
    try:
        written = init_project(directory)
    except FileExistsError as e:
        _die(str(e), 2)
    except SamplesMissing as e:
        _die(str(e), 1)
    echo(f"wrote {len(written)} file(s) into {directory}")
    cfg = directory / "config" / "twoway.yaml"
    echo(f"next: edit {cfg} (mailboxes, smtp, sender), then")
    echo(f"  twoway --config {cfg} config check --connect")
    echo(
        f"  twoway --config {cfg} leads import {directory / 'config' / 'sample-leads.csv'}"
        " --campaign welcome"
    )


# --- serve -------------------------------------------------------------------------------


@main.command("serve")
@click.option("--host", help="Address to bind (default: serve.host, 127.0.0.1).")
@click.option("--port", type=click.IntRange(0, 65535), help="Port (default: serve.port).")
@click.option(
    "--log-format",
    type=click.Choice(["human", "json"]),
    default=None,
    help="Default: human on a terminal, json otherwise.",
)
@pass_state
def serve_cmd(state: _State, host: str | None, port: int | None, log_format: str | None) -> None:
    """The web side: /u/TOKEN unsubscribe, /healthz, /metrics and the console (login)."""
    from worker.web import serve

    _setup_logging(log_format, state.verbose)
    with _errors():
        app = state.app()
        cfg = app.config.serve
        try:
            serve(app, host or cfg.host, cfg.port if port is None else port)
        finally:
            app.close()


@main.command("hash-password")
def hash_password_cmd() -> None:
    """Print the hash of a console password (read from the terminal, or standard input)."""
    if sys.stdin.isatty():
        password = click.prompt("Console password", hide_input=True, confirmation_prompt=True)
    else:
        password = sys.stdin.readline().rstrip("\r\n")
    if len(password) < 10:
        _die("a console password needs at least 10 characters", 2)
    echo(hash_password(password))


# --- outbox ------------------------------------------------------------------------------


@main.group("outbox")
def outbox_group() -> None:
    """Settle sends left in state unknown by a crash."""


@outbox_group.command("mark-sent")
@click.argument("message_id")
@pass_state
def outbox_mark_sent(state: _State, message_id: str) -> None:
    """An unknown send did arrive (seen in the recipient's thread): record it as sent."""
    _settle(state, message_id, "sent")


@outbox_group.command("resend")
@click.argument("message_id")
@pass_state
def outbox_resend(state: _State, message_id: str) -> None:
    """An unknown send did not arrive: queue it again (same Message-ID)."""
    _settle(state, message_id, "resend")


def _settle(state: _State, message_id: str, action: str) -> None:
    from worker.outbox import resolve_unknown

    with _errors():
        app = state.app()
        try:
            with app.transaction() as s:
                row = resolve_unknown(s, message_id, action, app.now())
                to, template = row.to_addr, row.template
        except LookupError as e:
            _die(str(e), 2)
        echo(f"{template} to {to}: " + ("sent" if action == "sent" else "queued again"))


# --- report ------------------------------------------------------------------------------


@main.command("report")
@click.option(
    "--html",
    "html_file",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write the page here (one self-contained HTML file).",
)
@click.option(
    "--days",
    type=click.IntRange(min=1, max=3660),
    default=30,
    show_default=True,
    help="Days of activity to chart, today included.",
)
@pass_state
def report_cmd(state: _State, html_file: Path, days: int) -> None:
    """Write the funnel, daily activity and health as an HTML page; print its path."""
    # The folder is resolved, not the file: a symlink there is replaced, never followed.
    target = html_file.parent.resolve() / html_file.name
    if not target.parent.is_dir():
        _die(f"--html: no such folder {html_file.parent}", 2)
    with _errors():
        page = build_report(state.app(), days)
        # Written beside the target and renamed, so a reader never sees half a page.
        partial = target.with_name(f".{target.name}.partial")
        try:
            partial.write_text(page, encoding="utf-8")
            partial.replace(target)
        except OSError as e:
            partial.unlink(missing_ok=True)
            raise Failure(f"cannot write {html_file}: {e.strerror or e}") from None
        echo(str(target))


# --- the marketer's commands (worker/cli_marketing.py) -------------------------------------


def _register_marketing() -> None:
    from worker import cli_marketing as m

    for group in (m.campaigns_group, m.suppress_group, m.webhooks_group, m.export_cmd):
        main.add_command(group)


_register_marketing()
