"""Schedules (runs per slot, items seen, the beat's lock) and the result cache

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-30 15:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    with op.batch_alter_table("batches", schema=None) as batch_op:
        batch_op.add_column(sa.Column("cached", sa.Integer(), nullable=False, server_default="0"))
    with op.batch_alter_table("items", schema=None) as batch_op:
        batch_op.add_column(sa.Column("cache_key", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("cached", sa.Boolean(), nullable=False, server_default="0"))
    op.create_table(
        "result_cache",
        sa.Column("key", sa.String(length=64), nullable=False),
        sa.Column("kind", sa.String(length=32), nullable=False),
        sa.Column("rows", JSON, nullable=False),
        sa.Column("engine", sa.String(length=32), nullable=True),
        sa.Column("engine_s", sa.Float(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("key"),
    )
    op.create_table(
        "schedule_runs",
        sa.Column("id", ID, autoincrement=True, nullable=False),
        sa.Column("schedule", sa.String(length=128), nullable=False),
        sa.Column("slot", sa.DateTime(timezone=True), nullable=False),
        sa.Column("manual", sa.Boolean(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("batch_id", sa.String(length=64), nullable=True),
        sa.Column("since", sa.DateTime(timezone=True), nullable=True),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("items", sa.Integer(), nullable=False),
        sa.Column("new", sa.Integer(), nullable=False),
        sa.Column("changed", sa.Integer(), nullable=False),
        sa.Column("unchanged", sa.Integer(), nullable=False),
        sa.Column("failed", sa.Integer(), nullable=False),
        sa.Column("engine_s_saved", sa.Float(), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("schedule", "slot"),
    )
    op.create_table(
        "schedule_items",
        sa.Column("schedule", sa.String(length=128), nullable=False),
        sa.Column("item_id", sa.String(length=512), nullable=False),
        sa.Column("content_hash", sa.String(length=64), nullable=False),
        sa.PrimaryKeyConstraint("schedule", "item_id"),
    )
    op.create_table(
        "beat_locks",
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("holder", sa.String(length=255), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("name"),
    )


def downgrade() -> None:
    op.drop_table("beat_locks")
    op.drop_table("schedule_items")
    op.drop_table("schedule_runs")
    op.drop_table("result_cache")
    with op.batch_alter_table("items", schema=None) as batch_op:
        batch_op.drop_column("cached")
        batch_op.drop_column("cache_key")
    with op.batch_alter_table("batches", schema=None) as batch_op:
        batch_op.drop_column("cached")
