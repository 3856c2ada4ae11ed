"""indexes and counters that keep per-message cost flat as the database grows

- leads.company_key: the normalised company name, indexed with owner (account owners);
  leads(domain, owner) replaces leads(domain) (colleagues, account owners);
- enrollments(lead_id, state), outbound_messages(lead_id, status) and
  lead_events(lead_id, type, at): the per-lead statements of the inbound path name both
  columns, so no planner (with or without statistics) prefers a status index;
- rep_assignments: prospects assigned per rep and UTC day, filled from the "assigned"
  events, so round robin and daily caps stop counting events.

Revision ID: 0004_scale
Revises: 0003_shape
"""

from collections import Counter
from collections.abc import Sequence
from datetime import date, datetime
from typing import Any

import sqlalchemy as sa
from alembic import op

revision: str = "0004_scale"
down_revision: str | None = "0003_shape"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_CHUNK = 5000


def _key(name: str | None) -> str | None:
    # Frozen copy of worker.models.company_key as of this revision.
    key = " ".join((name or "").split()).casefold()[:300]
    return key or None


def _day(value: Any) -> date:
    if isinstance(value, datetime):
        return value.date()
    if isinstance(value, date):
        return value
    return datetime.fromisoformat(str(value)).date()


def upgrade() -> None:
    conn = op.get_bind()
    op.add_column("leads", sa.Column("company_key", sa.String(length=300), nullable=True))
    leads = sa.table(
        "leads", sa.column("id", sa.Integer), sa.column("company", sa.String),
        sa.column("company_key", sa.String),
    )  # fmt: skip
    last = 0
    while True:
        rows = conn.execute(
            sa.select(leads.c.id, leads.c.company)
            .where(leads.c.id > last, leads.c.company.is_not(None))
            .order_by(leads.c.id)
            .limit(_CHUNK)
        ).all()
        if not rows:
            break
        last = rows[-1][0]
        conn.execute(
            leads.update().where(leads.c.id == sa.bindparam("lid")).values(company_key=sa.bindparam("k")),
            [{"lid": i, "k": _key(c)} for i, c in rows],
        )  # fmt: skip
    op.drop_index("ix_leads_domain", table_name="leads")
    op.create_index("ix_leads_domain_owner", "leads", ["domain", "owner"])
    op.create_index("ix_leads_company_key_owner", "leads", ["company_key", "owner"])
    op.create_index("ix_enrollments_lead_state", "enrollments", ["lead_id", "state"])
    op.drop_index("ix_outbound_messages_lead_id", table_name="outbound_messages")
    op.create_index("ix_outbound_lead_status", "outbound_messages", ["lead_id", "status"])
    op.drop_index("ix_lead_events_lead_id", table_name="lead_events")
    op.create_index("ix_lead_events_lead_type", "lead_events", ["lead_id", "type", "at"])

    counters = op.create_table(
        "rep_assignments",
        sa.Column("rep", sa.String(length=320), nullable=False),
        sa.Column("day", sa.Date(), nullable=False),
        sa.Column("assigned", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("rep", "day"),
    )
    events = sa.table(
        "lead_events", sa.column("type", sa.String), sa.column("at", sa.DateTime),
        sa.column("detail", sa.JSON),
    )  # fmt: skip
    tally: Counter[tuple[str, date]] = Counter()
    for at, detail in conn.execute(
        sa.select(events.c.at, events.c.detail).where(events.c.type == "assigned")
    ):
        rep = (detail or {}).get("rep") if isinstance(detail, dict) else None
        if isinstance(rep, str) and rep:
            tally[(rep, _day(at))] += 1
    if tally:
        conn.execute(
            counters.insert(),
            [{"rep": rep, "day": day, "assigned": n} for (rep, day), n in sorted(tally.items())],
        )


def downgrade() -> None:
    op.drop_table("rep_assignments")
    op.drop_index("ix_lead_events_lead_type", table_name="lead_events")
    op.create_index("ix_lead_events_lead_id", "lead_events", ["lead_id"])
    op.drop_index("ix_outbound_lead_status", table_name="outbound_messages")
    op.create_index("ix_outbound_messages_lead_id", "outbound_messages", ["lead_id"])
    op.drop_index("ix_enrollments_lead_state", table_name="enrollments")
    op.drop_index("ix_leads_company_key_owner", table_name="leads")
    op.drop_index("ix_leads_domain_owner", table_name="leads")
    op.create_index("ix_leads_domain", "leads", ["domain"])
    with op.batch_alter_table("leads") as batch_op:
        batch_op.drop_column("company_key")
