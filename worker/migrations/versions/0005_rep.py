"""speed to lead: one row per prospect handed to a rep

Revision ID: 0005_rep
Revises: 0004_scale
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005_rep"
down_revision: str | None = "0004_scale"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "handoffs",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("lead_id", sa.Integer(), nullable=False),
        sa.Column("rep", sa.String(length=320), nullable=False),
        sa.Column("inbound_id", sa.Integer(), nullable=True),
        sa.Column("handed_at", sa.DateTime(), nullable=False),
        sa.Column("sla_due", sa.DateTime(), nullable=True),
        sa.Column("escalate_due", sa.DateTime(), nullable=True),
        sa.Column("reminded_at", sa.DateTime(), nullable=True),
        sa.Column("escalated_at", sa.DateTime(), nullable=True),
        sa.Column("answered_at", sa.DateTime(), nullable=True),
        sa.Column("answered_by", sa.String(length=320), nullable=True),
        sa.Column("closed_at", sa.DateTime(), nullable=True),
        sa.Column("closed_reason", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(["lead_id"], ["leads.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("handoffs", schema=None) as batch_op:
        batch_op.create_index("ix_handoffs_lead_id", ["lead_id"], unique=False)
        batch_op.create_index("ix_handoffs_rep", ["rep"], unique=False)
        batch_op.create_index("ix_handoffs_open", ["answered_at", "closed_at"], unique=False)


def downgrade() -> None:
    op.drop_table("handoffs")
