"""The marketer's commands: `campaigns`, `suppress`, `export` and `webhooks`.

Each command parses its options, calls one plain function (the console calls the same
ones) in one transaction and prints the result; `worker.cli` registers them on `twoway`.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click

from worker.campaigns import (
    Segment,
    campaign_stats,
    emails_of,
    enroll_segment,
    format_stats,
    pause_campaign,
    resume_campaign,
    unenroll_segment,
)
from worker.cli import _die, _errors, _print_json, _State, echo, pass_state
from worker.export import rows, write
from worker.leads import LeadError, read_csv
from worker.suppression import import_suppressions, list_suppressions, remove_suppressions
from worker.terminal import shown_on_terminal
from worker.webhooks import retry_dead


@click.group("campaigns")
def campaigns_group() -> None:
    """See how campaigns perform; pause, resume, enroll and unenroll."""


@campaigns_group.command("list")
@click.option("--json", "as_json", is_flag=True)
@pass_state
def campaigns_list(state: _State, as_json: bool) -> None:
    """Per campaign, step and variant: sent, replied, auto-replied, bounced, unsubscribed."""
    with _errors():
        app = state.app()
        with app.transaction() as s:
            rows = campaign_stats(s, app.config)
        if as_json:
            _print_json(rows)
        else:
            echo(format_stats(rows))


@campaigns_group.command("pause")
@click.argument("name")
@pass_state
def campaigns_pause(state: _State, name: str) -> None:
    """Stop sending a campaign's steps until it is resumed."""
    with _errors():
        app = state.app()
        with app.transaction() as s:
            n = pause_campaign(s, app.config, name, app.now())
        echo(f"{name} paused ({n} lead(s) waiting)" if n else f"{name} is paused")


@campaigns_group.command("resume")
@click.argument("name")
@pass_state
def campaigns_resume(state: _State, name: str) -> None:
    """Resume a paused campaign; what fell due goes out spread by the caps."""
    with _errors():
        app = state.app()
        with app.transaction() as s:
            r = resume_campaign(s, app.config, name, app.now())
        if not r.leads and not r.spread:
            echo(f"{name} is running")
            return
        line = f"{name} resumed ({r.leads} lead(s))"
        if r.spread and r.last_due:
            line += f"; {r.spread} due step(s) spread until {r.last_due.isoformat()}"
        echo(line)


_FILTERS = ("statuses", "countries", "industries", "sources", "imported_since", "csv_file")
"""The parameters of `_segment_options` (and `_segment`)."""


def _segment_options(f: Callable[..., None]) -> Callable[..., None]:
    """The filters that choose leads (--status, --country, ..., --file), handed to the
    command as one `segment` (with its LEADS arguments, when it takes some)."""

    @functools.wraps(f)
    def with_segment(*args: Any, **kwargs: Any) -> None:
        filters = {name: kwargs.pop(name) for name in _FILTERS}
        with _errors():
            segment = _segment(**filters, leads=kwargs.pop("leads", ()))
        f(*args, segment=segment, **kwargs)

    for opt in reversed(
        [
            click.option("--status", "statuses", multiple=True, help="Lead status (repeatable)."),
            click.option("--country", "countries", multiple=True, help="ISO 3166 alpha-2."),
            click.option("--industry", "industries", multiple=True),
            click.option("--source", "sources", multiple=True),
            click.option(
                "--imported-since", help="Leads created at or after this ISO date or instant."
            ),
            click.option(
                "--file",
                "csv_file",
                type=click.Path(dir_okay=False, path_type=Path),
                help="A CSV file whose `email` column lists the leads.",
            ),
        ]
    ):
        with_segment = opt(with_segment)
    return with_segment


def _since(text: str | None, option: str) -> datetime | None:
    if not text:
        return None
    try:
        at = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise LeadError(f"{option}: {text!r} is not an ISO date or instant") from None
    return at.replace(tzinfo=UTC) if at.tzinfo is None else at.astimezone(UTC)


def _segment(
    *,
    statuses: tuple[str, ...],
    countries: tuple[str, ...],
    industries: tuple[str, ...],
    sources: tuple[str, ...],
    imported_since: str | None,
    csv_file: Path | None,
    leads: tuple[str, ...] = (),
) -> Segment:
    emails = list(leads)
    if csv_file is not None:
        emails += [(raw.get("email") or "") for _, raw in read_csv(csv_file)]
    return Segment(
        statuses=statuses,
        countries=countries,
        industries=industries,
        sources=sources,
        imported_since=_since(imported_since, "--imported-since"),
        emails=emails_of([e for e in emails if e.strip()]),
    )


@campaigns_group.command("enroll")
@click.argument("name")
@_segment_options
@click.option("--json", "as_json", is_flag=True)
@pass_state
def campaigns_enroll(state: _State, name: str, segment: Segment, as_json: bool) -> None:
    """Enroll leads already in the database (default: every lead in status `lead`)."""
    with _errors():
        app = state.app()
        with app.transaction() as s:
            r = enroll_segment(s, app.config, name, segment, app.now())
        if as_json:
            _print_json({"campaign": name, **r.as_json()})
            return
        echo(
            f"{r.enrolled} enrolled in {name}"
            + (f", {r.reactivated} continue where they stopped" if r.reactivated else "")
            + f"; skipped {r.already} already in it, {r.not_lead} not in status lead, "
            f"{r.suppressed} on the do-not-contact list"
        )


@campaigns_group.command("unenroll")
@click.argument("name")
@click.argument("leads", nargs=-1)
@_segment_options
@pass_state
def campaigns_unenroll(state: _State, name: str, segment: Segment) -> None:
    """Take leads (addresses, or the leads matching the filters) out of a campaign."""
    with _errors():
        if segment.is_empty():
            _die("campaigns unenroll: name a lead or give a filter (--status, --file, …)", 2)
        app = state.app()
        with app.transaction() as s:
            n = unenroll_segment(s, app.config, name, segment, app.now())
        echo(f"{n} lead(s) unenrolled from {name}")


# --- suppression -------------------------------------------------------------------------


@click.group("suppress")
def suppress_group() -> None:
    """The do-not-contact list: addresses and whole domains never mailed."""


@suppress_group.command("import")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True)
@pass_state
def suppress_import(state: _State, file: Path, as_json: bool) -> None:
    """Add a CSV (`email`: an address or @domain; optional `reason`) to the list."""
    with _errors():
        app = state.app()
        rows = read_csv(file)
        with app.transaction() as s:
            r = import_suppressions(s, rows, app.now())
        if as_json:
            _print_json({"file": str(file), **r.as_json()})
        else:
            for line, value, reason in r.rejected:
                echo(f"{file}:{line}: rejected {value or '(empty)'}: {reason}", err=True)
            echo(f"{r.added} added, {r.updated} already listed, {len(r.rejected)} rejected")
        if r.rejected and not (r.added or r.updated):
            sys.exit(2)


@suppress_group.command("list")
@click.option("--json", "as_json", is_flag=True)
@pass_state
def suppress_list(state: _State, as_json: bool) -> None:
    """Every entry with its reason."""
    with _errors():
        app = state.app()
        with app.transaction() as s:
            rows = list_suppressions(s)
        if as_json:
            _print_json(rows)
        elif not rows:
            echo("the do-not-contact list is empty")
        else:
            for r in rows:
                echo(f"{r['email']:40} {r['at']}  {r['reason'] or ''}".rstrip())


@suppress_group.command("remove")
@click.argument("entries", nargs=-1, required=True)
@pass_state
def suppress_remove(state: _State, entries: tuple[str, ...]) -> None:
    """Remove addresses or @domains from the list."""
    with _errors():
        app = state.app()
        try:
            with app.transaction() as s:
                n = remove_suppressions(s, entries)
        except ValueError as e:
            _die(str(e), 2)
        echo(f"{n} entr{'y' if n == 1 else 'ies'} removed")


# --- webhooks ----------------------------------------------------------------------------


@click.group("webhooks")
def webhooks_group() -> None:
    """Conversion events sent to the CRM's webhooks."""


@webhooks_group.command("retry")
@click.argument("ids", nargs=-1, type=int)
@click.option("--all", "retry_all", is_flag=True, help="Every dead delivery.")
@pass_state
def webhooks_retry(state: _State, ids: tuple[int, ...], retry_all: bool) -> None:
    """Give dead deliveries (by id, as `status` shows them, or --all) a fresh set of tries."""
    if not ids and not retry_all:
        _die("webhooks retry: give delivery ids or --all", 2)
    with _errors():
        app = state.app()
        with app.transaction() as s:
            n = retry_dead(s, app.now(), None if retry_all else list(ids))
        echo(f"{n} deliver{'y' if n == 1 else 'ies'} queued again")


# --- export ------------------------------------------------------------------------------


@click.command("export")
@click.argument("kind", type=click.Choice(["prospects", "leads", "events"]))
@click.option(
    "--format", "fmt", type=click.Choice(["csv", "jsonl"]), default="csv", show_default=True
)
@click.option("--since", help="Only records changed (events: that happened) at or after this.")
@pass_state
def export_cmd(state: _State, kind: str, fmt: str, since: str | None) -> None:
    """Write prospects, leads or timeline events to standard output for a CRM import."""
    with _errors():
        at = _since(since, "--since")
        app = state.app()
        with app.transaction() as s:
            n = write(shown_on_terminal(sys.stdout), rows(s, kind, at), kind, fmt)
        echo(f"{n} {kind} exported", err=True)
