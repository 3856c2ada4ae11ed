"""rename the lead status `engaged` to `held`

`engaged` also named the funnel stage "wrote back" (the `engaged` event); the status means
"replied below the minimum fit: waits for a person", so it gets a name of its own.

Revision ID: 0003_shape
Revises: 0002_mkt
Create Date: 2026-12-01 21:30:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003_shape"
down_revision: str | None = "0002_mkt"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _rename(old: str, new: str) -> None:
    op.execute(
        sa.text("UPDATE leads SET status = :new WHERE status = :old").bindparams(old=old, new=new)
    )
    for column in ("from_status", "to_status"):
        op.execute(
            sa.text(f"UPDATE lead_events SET {column} = :new WHERE {column} = :old").bindparams(
                old=old, new=new
            )
        )


def upgrade() -> None:
    _rename("engaged", "held")


def downgrade() -> None:
    _rename("held", "engaged")
