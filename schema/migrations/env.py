"""Alembic environment: the URL comes from the caller (schema.db.upgrade), never from a file."""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine, pool

from schema.tables import Base

url = str(context.config.attributes.get("connection_url") or context.config.get_main_option("sqlalchemy.url"))


def run() -> None:
    engine = create_engine(url, poolclass=pool.NullPool)
    with engine.connect() as connection:
        context.configure(
            connection=connection,
            target_metadata=Base.metadata,
            render_as_batch=connection.dialect.name == "sqlite",
        )
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()


run()
