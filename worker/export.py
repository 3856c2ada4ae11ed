"""`twoway export prospects|leads|events`: CSV or JSON Lines for a CRM import.

The columns and what each maps to in Salesforce (Lead import, then Convert: account,
contact, opportunity) and HubSpot (contact + company + deal import) are listed in
README.md ("Export to a CRM"); `LEAD_COLUMNS`, `PROSPECT_COLUMNS` and `EVENT_COLUMNS`
are the source of truth. In CSV every text cell that a spreadsheet would read as a
formula (starting with `=`, `+`, `-`, `@`, a tab or a carriage return) is prefixed
with `'`, so opening the file never runs anything (OWASP "CSV injection").
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from datetime import datetime
from typing import Any, TextIO

from sqlalchemy import select
from sqlalchemy.orm import Session

from worker.leads import iso
from worker.models import Enrollment, Lead, LeadEvent

KINDS = ("prospects", "leads", "events")
LEAD_COLUMNS = (
    "email",
    "first_name",
    "last_name",
    "title",
    "company",
    "company_domain",
    "industry",
    "company_size",
    "annual_revenue",
    "country",
    "timezone",
    "source",
    "status",
    "owner",
    "score",
    "campaigns",
    "created_at",
    "updated_at",
)
PROSPECT_COLUMNS = (
    *LEAD_COLUMNS,
    "opportunity_name",
    "opportunity_stage",
    "source_campaign",
    "source_step",
    "reply_text",
    "replied_at",
    "checklist",
)
EVENT_COLUMNS = ("at", "email", "type", "from_status", "to_status", "cause", "detail")
PROSPECT_STATUSES = ("prospect", "customer")
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
_CHUNK = 900


def neutralise(value: Any) -> Any:
    """A CSV cell that no spreadsheet evaluates: text starting like a formula gets a `'`."""
    if isinstance(value, str) and value.startswith(_FORMULA_START):
        return "'" + value
    return value


def _lead_row(lead: Lead, campaigns: list[str]) -> dict[str, Any]:
    return {
        "email": lead.email,
        "first_name": lead.first_name,
        "last_name": lead.last_name,
        "title": lead.title,
        "company": lead.company,
        "company_domain": lead.domain,
        "industry": lead.industry,
        "company_size": lead.company_size,
        "annual_revenue": lead.annual_revenue,
        "country": lead.country,
        "timezone": lead.timezone,
        "source": lead.source,
        "status": lead.status,
        "owner": lead.owner,
        "score": lead.score,
        "campaigns": ";".join(sorted(campaigns)),
        "created_at": iso(lead.created_at),
        "updated_at": iso(lead.updated_at),
    }


def _leads(s: Session, since: datetime | None, prospects: bool) -> Iterator[tuple[Lead, list[str]]]:
    q = select(Lead).order_by(Lead.id)
    if prospects:
        q = q.where(Lead.status.in_(PROSPECT_STATUSES))
    if since is not None:
        q = q.where(Lead.updated_at >= since)
    leads = list(s.scalars(q))
    for i in range(0, len(leads), _CHUNK):
        chunk = leads[i : i + _CHUNK]
        names: dict[int, list[str]] = {}
        for lead_id, name in s.execute(
            select(Enrollment.lead_id, Enrollment.campaign).where(
                Enrollment.lead_id.in_([x.id for x in chunk])
            )
        ):
            names.setdefault(lead_id, []).append(name)
        for lead in chunk:
            yield lead, names.get(lead.id, [])


def rows(s: Session, kind: str, since: datetime | None = None) -> Iterator[dict[str, Any]]:
    """The records of one export, in a stable order; each has every column of its kind
    plus `custom` (a lead's custom fields) for leads and prospects."""
    if kind == "events":
        q = (
            select(LeadEvent, Lead.email)
            .join(Lead, Lead.id == LeadEvent.lead_id)
            .order_by(LeadEvent.at, LeadEvent.id)
        )
        if since is not None:
            q = q.where(LeadEvent.at >= since)
        for e, email in s.execute(q):
            yield {
                "at": iso(e.at),
                "email": email,
                "type": e.type,
                "from_status": e.from_status,
                "to_status": e.to_status,
                "cause": e.cause,
                "detail": e.detail or {},
            }
        return
    from worker.webhooks import conversion_record

    for lead, campaigns in _leads(s, since, prospects=kind == "prospects"):
        row = _lead_row(lead, campaigns)
        if kind == "prospects":
            opp = conversion_record(s, lead)["opportunity"]
            row.update(
                opportunity_name=opp["name"],
                opportunity_stage=opp["stage"],
                source_campaign=opp["source_campaign"],
                source_step=opp["source_step"],
                reply_text=opp["reply_text"],
                replied_at=opp["replied_at"],
                checklist="; ".join(
                    f"{c.get('criterion')}: {c.get('status')}" for c in opp["checklist"]
                ),
            )
        row["custom"] = dict(lead.custom or {})
        yield row


def columns(kind: str) -> tuple[str, ...]:
    return {"prospects": PROSPECT_COLUMNS, "leads": LEAD_COLUMNS, "events": EVENT_COLUMNS}[kind]


def write(out: TextIO, records: Iterator[dict[str, Any]], kind: str, fmt: str) -> int:
    """Write records as `csv` or `jsonl`; returns how many. CSV cells are neutralised and
    custom fields become `custom.<name>` columns after the documented ones."""
    count = 0
    if fmt == "jsonl":
        for r in records:
            out.write(json.dumps(r, ensure_ascii=False, default=str, sort_keys=False) + "\n")
            count += 1
        return count
    items = list(records)
    custom = sorted({k for r in items for k in r.get("custom", {})}) if kind != "events" else []
    header = [*columns(kind), *(f"custom.{k}" for k in custom)]
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow(header)
    for r in items:
        cells = [r.get(c) for c in columns(kind)]
        if kind == "events":
            cells[-1] = json.dumps(r["detail"], ensure_ascii=False, default=str)
        cells += [r.get("custom", {}).get(k) for k in custom]
        writer.writerow(["" if c is None else neutralise(c) for c in cells])
        count += 1
    return count
