"""A partial index of queued items by id: the reconciler pages through them (a keyset scan) in time
proportional to the page, however many items the table holds

Revision ID: 0015
Revises: 0014
Create Date: 2026-12-01 18:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0015"
down_revision = "0014"
branch_labels = None
depends_on = None

QUEUED = sa.text("status = 'queued'")


def upgrade() -> None:
    op.create_index("ix_items_queued", "items", ["id"], postgresql_where=QUEUED, sqlite_where=QUEUED)


def downgrade() -> None:
    op.drop_index("ix_items_queued", table_name="items")
