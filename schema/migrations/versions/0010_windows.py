"""Windows of long documents (map-reduce): items under a parent item, by round and position

Revision ID: 0010
Revises: 0009
Create Date: 2026-11-30 19:30:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("items", schema=None) as batch_op:
        batch_op.add_column(sa.Column("parent_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=True))
        batch_op.add_column(sa.Column("round", sa.Integer(), nullable=False, server_default="0"))
        batch_op.add_column(sa.Column("window", sa.Integer(), nullable=True))
        batch_op.create_foreign_key("fk_items_parent_id", "items", ["parent_id"], ["id"], ondelete="CASCADE")
        batch_op.create_index("ix_items_parent_id", ["parent_id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("items", schema=None) as batch_op:
        batch_op.drop_index("ix_items_parent_id")
        batch_op.drop_constraint("fk_items_parent_id", type_="foreignkey")
        batch_op.drop_column("window")
        batch_op.drop_column("round")
        batch_op.drop_column("parent_id")
