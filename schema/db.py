"""Database connections and schema upgrades; SQLite gets WAL and a busy timeout so processes can share it."""

from __future__ import annotations

import fcntl
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from functools import cache, lru_cache
from pathlib import Path
from typing import Any, TypeVar

import msgspec
from alembic import command
from alembic.config import Config
from sqlalchemy import (
    BigInteger,
    DateTime,
    Engine,
    ExceptionContext,
    FromClause,
    String,
    any_,
    bindparam,
    cast,
    column,
    create_engine,
    event,
    func,
    select,
    text,
)
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.dialects.postgresql import JSON as PG_JSON
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.sql.elements import ColumnElement
from sqlalchemy.types import TypeEngine

S = TypeVar("S")
MIGRATIONS = Path(__file__).with_name("migrations")
MIGRATION_LOCK_KEY = 0x67726973  # any constant; "gris"


def utcnow() -> datetime:
    return datetime.now(UTC)


def dialect_of(where: Session | str) -> str:
    """The database dialect's name ("postgresql", "sqlite") of a session, or that name itself."""
    return where if isinstance(where, str) else where.get_bind().dialect.name


def built_once(build: Callable[..., S]) -> Callable[..., S]:
    """`build(dialect name, *args)` runs once per dialect and arguments; the statement it returns takes its
    per-call values as named bind parameters, given at execution. Building a statement costs 0.1-0.3 ms of
    Python (coercing its clauses, then its cache key), as much as the database's work on a chunk of items,
    so the statements a worker runs for every chunk are built once and reused."""
    cached = cache(build)
    return lambda where, *args: cached(dialect_of(where), *args)


def db_now(where: Session | str, seconds: float = 0.0) -> ColumnElement[datetime]:
    """The database's clock (plus `seconds`) as an SQL expression. Leases, heartbeats and expiry are
    stamped and judged with it, never with a process's clock: the hosts of workers drift apart, the
    database is the one clock they share."""
    if dialect_of(where) == "sqlite":
        # As SQLAlchemy stores SQLite datetimes ('YYYY-MM-DD HH:MM:SS.ffffff'), so they compare as text.
        return func.strftime("%Y-%m-%d %H:%M:%f000", "now", f"{seconds:+.3f} seconds", type_=DateTime(timezone=True))
    return func.now() + timedelta(seconds=seconds) if seconds else func.now()


def db_clock(session: Session) -> datetime:
    """The database's time now, to stamp rows written from Python with the clock leases are judged by."""
    now: datetime = session.execute(select(db_now(session))).scalar_one()
    return aware(now)


def seconds(where: Session | str, start: Any, end: Any) -> ColumnElement[float]:
    """`end - start` in seconds, as an SQL expression."""
    if dialect_of(where) == "sqlite":
        return (func.julianday(end) - func.julianday(start)) * 86400.0
    return func.extract("epoch", end - start)  # type: ignore[return-value]


def among(where: Session | str, col: Any, values: list[Any] | None = None,
          type_: type[TypeEngine[Any]] = BigInteger, *, param: str | None = None) -> ColumnElement[bool]:
    """`col IN values`, or IN the list given at execution as parameter `param`. On PostgreSQL as one
    array parameter, `col = ANY(:values)`: the statement's text is the same for any number of values,
    so it is compiled and prepared once, not once per chunk size, and 20,000 values cost no 20,000
    parameters."""
    if dialect_of(where) == "postgresql":
        return col == any_(bindparam(param, values, type_=ARRAY(type_())))
    return col.in_(bindparam(param, values, expanding=True))  # type: ignore[no-any-return]


def rows_table(where: Session | str, name: str, columns: dict[str, type[TypeEngine[Any]]]) -> FromClause:
    """Rows of values (str, int, float, None) as a table for one statement to join, e.g. `UPDATE ...
    FROM` it: per-item values without a CASE per column, and one statement for any number of rows.
    The rows come at execution as one JSON parameter named `name`, `rows_json(rows)`: encoding it is one
    C call, where psycopg would dump an array parameter per column one element at a time in Python."""
    payload = bindparam(name, type_=String())
    if dialect_of(where) == "postgresql":
        each = func.json_array_elements(cast(payload, PG_JSON)).table_valued(column("value", PG_JSON()))
        values: list[ColumnElement[Any]] = [cast(each.c.value[i].astext, t()) for i, t in enumerate(columns.values())]
    else:
        each = func.json_each(payload).table_valued("value")
        values = [func.json_extract(each.c.value, f"$[{i}]", type_=t()) for i, t in enumerate(columns.values())]
    return select(*(v.label(n) for v, n in zip(values, columns, strict=True))).select_from(each).subquery(name)


def rows_json(rows: list[tuple[Any, ...]]) -> str:
    """The parameter of a `rows_table`."""
    return msgspec.json.encode(rows).decode()


def is_disconnect(exc: BaseException) -> bool:
    """The database could not be reached or dropped the connection (not: the statement was wrong)."""
    return isinstance(exc, OperationalError) or (isinstance(exc, DBAPIError) and exc.connection_invalidated)


def aware(value: datetime) -> datetime:
    """SQLite hands back naive datetimes, which we always store as UTC."""
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def epoch(value: datetime | None) -> int | None:
    """Unix seconds."""
    if value is None:
        return None
    return int(aware(value).timestamp())


def seconds_between(start: datetime | None, end: datetime | None) -> float | None:
    if start is None or end is None:
        return None
    return (aware(end) - aware(start)).total_seconds()


def _sqlite_pragmas(dbapi_conn, _record) -> None:  # type: ignore[no-untyped-def]
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.close()


@lru_cache(maxsize=8)
def get_engine(url: str) -> Engine:
    engine = create_engine(url, pool_pre_ping=True, future=True, connect_args=_connect_args(url))
    if engine.dialect.name == "sqlite":
        event.listen(engine, "connect", _sqlite_pragmas)
    event.listen(engine, "handle_error", _failed_ping_is_lost)
    return engine


def _failed_ping_is_lost(context: ExceptionContext) -> None:
    """A pooled connection that fails its ping is replaced, whatever the error: one that a network failure
    cut mid-statement comes back still "in transaction", and psycopg refuses it with a programming error
    that SQLAlchemy would otherwise raise to the caller instead of reconnecting."""
    if context.is_pre_ping:
        context.is_disconnect = True


# A host cut off from PostgreSQL must find out in seconds, not after the kernel's 15 minutes of TCP
# retransmissions: bounded connects, and TCP acknowledgements and keepalives that time out.
PG_NETWORK_TIMEOUTS = {"connect_timeout": 10, "tcp_user_timeout": 15000, "keepalives": 1,
                       "keepalives_idle": 10, "keepalives_interval": 5, "keepalives_count": 3}


def _connect_args(url: str) -> dict[str, Any]:
    return dict(PG_NETWORK_TIMEOUTS) if url.startswith("postgresql") else {}


def get_sessionmaker(url: str) -> sessionmaker:
    return sessionmaker(get_engine(url), expire_on_commit=False)


def upgrade(url: str, revision: str = "head") -> None:
    """Bring the database to the latest schema (Alembic); a no-op when it is already there.

    Workers and producers may start at the same moment on a new database: a lock makes the second
    wait for the first instead of both creating the same tables.
    """
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.attributes["connection_url"] = url
    with _migration_lock(url):
        command.upgrade(cfg, revision)


@lru_cache(maxsize=8)
def prepare_schema(url: str) -> None:
    """`upgrade` once per process and database: what a service or worker does when it starts (quietly;
    `gristmill db upgrade` shows each migration)."""
    log = logging.getLogger("alembic")
    level = log.level
    log.setLevel(logging.WARNING)
    try:
        upgrade(url)
    finally:
        log.setLevel(level)


@contextmanager
def _migration_lock(url: str) -> Iterator[None]:
    engine = get_engine(url)
    if engine.dialect.name == "postgresql":
        with engine.connect() as conn:
            conn.execute(text("SELECT pg_advisory_lock(:key)"), {"key": MIGRATION_LOCK_KEY})
            try:
                yield
            finally:
                conn.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": MIGRATION_LOCK_KEY})
    elif engine.dialect.name == "sqlite" and engine.url.database not in (None, "", ":memory:"):
        with open(f"{engine.url.database}.migrate-lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield
    else:
        yield
