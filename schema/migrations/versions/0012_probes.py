"""Probes: classifiers learned from labelled texts on a model's hidden states

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-01 11:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None

_JSON = sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql")


def upgrade() -> None:
    op.create_table(
        "probes",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("model", sa.String(length=255), nullable=False),
        sa.Column("layer", sa.Integer(), nullable=True),
        sa.Column("labels", _JSON, nullable=False),
        sa.Column("multi_label", sa.Boolean(), nullable=False),
        sa.Column("training", _JSON, nullable=False),
        sa.Column("version", sa.Integer(), nullable=True),
        sa.Column("weights", _JSON, nullable=True),
        sa.Column("metrics", _JSON, nullable=True),
        sa.Column("trained_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("trained_by", sa.String(length=255), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )


def downgrade() -> None:
    op.drop_table("probes")
