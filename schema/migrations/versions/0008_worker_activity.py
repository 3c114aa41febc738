"""Worker activity in the heartbeat: chunks in flight and the engine's busy fraction (the dashboard's)

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-30 18:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("workers", schema=None) as batch_op:
        batch_op.add_column(sa.Column("chunks_in_flight", sa.Integer(), nullable=False, server_default="0"))
        batch_op.add_column(sa.Column("busy_fraction", sa.Float(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("workers", schema=None) as batch_op:
        batch_op.drop_column("busy_fraction")
        batch_op.drop_column("chunks_in_flight")
