"""The `twoway` command line. Exit codes: 0 success, 1 the job failed, 2 bad usage or input."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import click

from worker import __version__
from worker.app import App
from worker.config import ConfigError, clock_from_env, load_config
from worker.db import DatabaseError

F = TypeVar("F", bound=Callable[..., Any])


class Failure(Exception):
    """The job failed (exit 1) with a message for people."""


def _die(message: str, code: int) -> NoReturn:
    click.echo(f"twoway: {message}", err=True)
    sys.exit(code)


@contextmanager
def _errors() -> Iterator[None]:
    """Turn the errors people can act on into a message and an exit code, never a traceback."""
    from worker.leads import LeadError

    try:
        yield
    except ConfigError as e:
        _die(f"bad configuration\n{e}", 2)
    except LeadError as e:
        _die(str(e), 2)
    except DatabaseError as e:
        _die(str(e), 1)
    except Failure as e:
        _die(str(e), 1)


def _print_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, default=str, ensure_ascii=False))


class _State:
    def __init__(self, config_path: str | None) -> None:
        self.config_path = config_path
        self._app: App | None = None

    def app(self, *, migrate: bool = True) -> App:
        if self._app is None:
            config = load_config(self.config_path)
            self._app = App.open(config, clock_from_env(), migrate=migrate)
        return self._app


pass_state = click.make_pass_decorator(_State)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
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
    if not logging.getLogger().handlers:
        logging.basicConfig(
            level=logging.DEBUG if verbose else logging.WARNING,
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        )
    ctx.obj = _State(config_path)


# --- db ----------------------------------------------------------------------------------


@main.group("db")
def db_group() -> None:
    """Database schema."""


@db_group.command("upgrade")
@pass_state
def db_upgrade(state: _State) -> None:
    """Apply pending migrations (Alembic)."""
    from worker import db

    with _errors():
        app = state.app(migrate=False)
        before = db.current_revision(app.engine)
        db.upgrade(app.engine)
        after = db.current_revision(app.engine)
        click.echo(f"database at {after}" + ("" if before == after else f" (was {before})"))


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
        config = load_config(state.config_path)
        problems: list[str] = []
        try:
            from worker.rendering import Renderer, sample_context

            renderer = Renderer(config.templates_path)
            names = {s.template for c in config.campaigns for s in c.steps}
            names.add(config.handoff.template)
            if config.handoff.follow_up:
                names.add(config.handoff.follow_up.template)
            problems += [str(e) for e in renderer.lint(sample_context(), sorted(names))]
        except ImportError:  # pragma: no cover - rendering ships with the package
            pass
        if connect:
            problems += _connect_checks(config)
        if problems:
            for p in problems:
                click.echo(f"  {p}", err=True)
            _die(f"{config.path}: {len(problems)} problem(s)", 2 if not connect else 1)
        click.echo(
            f"{config.path}: OK ({len(config.mailboxes)} mailbox(es), "
            f"{len(config.campaigns)} campaign(s), {len(config.reps)} rep(s))"
            + ("; servers reachable" if connect else "")
        )


def _connect_checks(config: Any) -> list[str]:
    from worker.mailbox import probe_imap

    problems: list[str] = []
    for m in config.mailboxes:
        found = probe_imap(m)
        if found:
            problems.append(f"mailbox {m.name}: {found}")
    if config.smtp is not None:
        from worker.mailer import probe_smtp

        found = probe_smtp(config.smtp)
        if found:
            problems.append(f"smtp: {found}")
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
    from worker.leads import campaign_for, import_leads, read_csv

    with _errors():
        app = state.app()
        camp = campaign_for(app.config, campaign)
        rows = list(read_csv(file))
        show_bar = sys.stderr.isatty() and not as_json and len(rows) > 2000
        with app.transaction() as session:
            if show_bar:
                with click.progressbar(length=len(rows), label="importing", file=sys.stderr) as bar:
                    done = [0]

                    def tick(n: int) -> None:
                        bar.update(n - done[0])
                        done[0] = n

                    result = import_leads(
                        session,
                        rows,
                        app.now(),
                        campaign=camp,
                        source=source,
                        strict=strict,
                        progress=tick,
                    )
            else:
                result = import_leads(
                    session, rows, app.now(), campaign=camp, source=source, strict=strict
                )
            if result.strict_failed:
                session.rollback()
        if as_json:
            _print_json({"file": str(file), **result.as_json()})
        else:
            for r in result.rejected:
                click.echo(
                    f"{file}:{r.line}: rejected {r.email or '(no email)'}: {r.reason}", err=True
                )
            summary = f"{result.imported} imported, {result.updated} updated, {len(result.rejected)} rejected"
            if camp is not None:
                summary += f", {result.enrolled} enrolled in {camp.name}"
            if result.strict_failed:
                summary = f"nothing imported (--strict): {len(result.rejected)} rejected row(s)"
            click.echo(summary)
        if result.strict_failed:
            sys.exit(2)


@leads_group.command("list")
@click.option("--status", help="Only leads in this status.")
@click.option("--limit", type=int, help="At most this many.")
@click.option("--json", "as_json", is_flag=True)
@pass_state
def leads_list(state: _State, status: str | None, limit: int | None, as_json: bool) -> None:
    """List leads."""
    from worker.leads import list_leads

    with _errors():
        app = state.app()
        with app.transaction() as session:
            rows = list_leads(session, status, limit)
        if as_json:
            _print_json(rows)
            return
        if not rows:
            click.echo("no leads" + (f" in status {status}" if status else ""))
            return
        click.echo(f"{'EMAIL':36} {'STATUS':12} {'SCORE':>5}  {'OWNER':28} COMPANY")
        for r in rows:
            score = "" if r["score"] is None else str(r["score"])
            click.echo(
                f"{r['email']:36} {r['status']:12} {score:>5}  {r['owner'] or '-':28} {r['company'] or ''}"
            )


@leads_group.command("show")
@click.argument("email")
@click.option("--json", "as_json", is_flag=True)
@pass_state
def leads_show(state: _State, email: str, as_json: bool) -> None:
    """A lead's profile and whole story: enrollments, mail, transitions with causes."""
    from worker.leads import show_lead

    with _errors():
        app = state.app()
        with app.transaction() as session:
            data = show_lead(session, email)
        if as_json:
            _print_json(data)
            return
        click.echo(_format_lead(data))


def _format_lead(d: dict[str, Any]) -> str:
    name = " ".join(x for x in (d["first_name"], d["last_name"]) if x) or "(no name)"
    lines = [
        f"{name} <{d['email']}>",
        f"  status {d['status']}   owner {d['owner'] or '-'}   score {d['score'] if d['score'] is not None else '-'}",
    ]
    org = ", ".join(str(x) for x in (d["title"], d["company"], d["industry"], d["country"]) if x)
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
            extra = f" next due {en['next_due']}" if en["next_due"] else ""
            if en["paused_until"]:
                extra += f" paused until {en['paused_until']}"
            lines.append(f"  {en['campaign']}: {en['state']}, {en['step']} step(s) sent{extra}")
    if d["messages"]:
        lines.append("mail:")
        for m in d["messages"]:
            arrow = "->" if m["direction"] == "out" else "<-"
            what = m["kind"] or "?"
            extra = (
                f" [{m['status']}]"
                if m["direction"] == "out"
                else f" matched by {m['match'] or '-'}"
            )
            lines.append(f"  {m['at']} {arrow} {what}: {m['subject'] or ''}{extra}")
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
    from worker.leads import mark_lead

    with _errors():
        app = state.app()
        with app.transaction() as session:
            lead = mark_lead(session, email, status, app.now(), reason)
            click.echo(f"{lead.email} is now {lead.status}")


# --- status ------------------------------------------------------------------------------


@main.command("status")
@click.option("--json", "as_json", is_flag=True)
@pass_state
def status_cmd(state: _State, as_json: bool) -> None:
    """Funnel, outbox, mailbox health, quarantine and alarms."""
    from worker.status import collect_status, format_status

    with _errors():
        app = state.app()
        data = collect_status(app)
        if as_json:
            _print_json(data)
        else:
            click.echo(format_status(data))


def run() -> None:  # pragma: no cover - console entry for tools that want a plain function
    main()
