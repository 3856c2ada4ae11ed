"""a partial index on the unverified events, for the counts in `twoway status`

Revision ID: 0006_leftover
Revises: 0005_rep
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006_leftover"
down_revision: str | None = "0005_rep"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# The same text as worker.models.UNVERIFIED_WHERE at the time of this revision.
WHERE = "type IN ('unverified_bounce', 'unverified_reply', 'unverified_unsubscribe')"


def upgrade() -> None:
    op.create_index(
        "ix_lead_events_unverified",
        "lead_events",
        ["type", "at"],
        sqlite_where=sa.text(WHERE),
        postgresql_where=sa.text(WHERE),
    )


def downgrade() -> None:
    op.drop_index("ix_lead_events_unverified", table_name="lead_events")
