"""Leases on several hosts: fencing (a claim's lease id) and one clock (the database's), at the level of
schema.store, the reconciler and the CLI. tests/test_hosts.py runs the same against worker processes on
their own network namespaces."""

from __future__ import annotations

import logging
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import func, select, update

from producer import api
from schema import store
from schema.db import db_clock, db_now, get_sessionmaker, utcnow
from schema.queue import Queue
from schema.settings import Settings
from schema.states import BatchStatus, ItemStatus
from schema.tables import Item, Result
from schema.workers import heartbeat, live, register
from tests.conftest import cli_env
from tests.test_idempotency import submit_docs
from worker.reconciler import reconcile


def claim(settings: Settings, batch_id: str, ids: list[int], host: str, lease_s: float = 60) -> list[store.Claimed]:
    with get_sessionmaker(settings.database_url)() as session, session.begin():
        return store.claim(session, batch_id, ids, host, lease_s)


def write(settings: Settings, batch_id: str, claimed: list[store.Claimed], text: str) -> list[store.Outcome]:
    now = utcnow()
    with get_sessionmaker(settings.database_url)() as session, session.begin():
        written = store.write_outcomes(session, batch_id, [store.Outcome(item=c, text=text) for c in claimed],
                                       engine="t", model="m", engine_batch_id=None,  # type: ignore[arg-type]
                                       started=now, finished=now)
        store.count(session, batch_id, **written.ended)
        store.close_if_done(session, batch_id)
    return written.succeeded


def run_out_leases(settings: Settings, batch_id: str) -> None:
    """As if the lease time had passed: every running item's lease ended a second ago."""
    with get_sessionmaker(settings.database_url)() as session, session.begin():
        session.execute(update(Item).where(Item.batch_id == batch_id, Item.status == ItemStatus.running)
                        .values(lease_expires_at=db_now(session, -1)))


def items(settings: Settings, batch_id: str) -> list[tuple[str, str | None, int]]:
    with get_sessionmaker(settings.database_url)() as session:
        return [tuple(row) for row in session.execute(  # type: ignore[misc]
            select(Item.status, Item.worker_host, Item.attempts).where(Item.batch_id == batch_id).order_by(Item.line))]


def test_a_worker_that_lost_its_lease_changes_nothing(db_url: str, settings_for, tmp_path: Path,  # type: ignore[no-untyped-def]
                                                      caplog: pytest.LogCaptureFixture) -> None:
    """Host A claims a chunk and is cut off past its lease; the reconciler requeues, host B claims the
    items again. When A comes back, its results, its release and its giving up are all refused (the
    lease id does not match), and it says so; B's results are the ones kept."""
    settings = settings_for(db_url)
    batch_id, ids = submit_docs(settings, tmp_path, n=4)
    late = claim(settings, batch_id, ids, "host-a")
    run_out_leases(settings, batch_id)
    assert reconcile(settings, Queue(settings)).leases_expired == 4
    current = claim(settings, batch_id, ids, "host-b")
    assert [c.id for c in current] == ids and {c.lease for c in current}.isdisjoint({c.lease for c in late})

    with caplog.at_level(logging.WARNING, logger="schema.store"):
        assert write(settings, batch_id, late, "late") == []
    assert "4 of 4 results discarded: their lease was lost" in caplog.text
    with get_sessionmaker(db_url)() as session, session.begin():
        store.release(session, late, "the late worker's engine failed")
        assert store.fail_claimed(session, batch_id, late, "gave up", "engine_error") == []
    assert items(settings, batch_id) == [(ItemStatus.running, "host-b", 2)] * 4

    assert len(write(settings, batch_id, current, "current")) == 4
    with get_sessionmaker(db_url)() as session:
        assert list(session.scalars(select(Result.output_text).where(Result.batch_id == batch_id))) == ["current"] * 4
    info = api.open_batch(batch_id, settings).status()
    assert info.status == BatchStatus.completed and info.request_counts.completed == 4


def test_a_release_and_a_give_up_need_the_lease(db_url: str, settings_for, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Under its own lease a worker can hand items back and fail them; the next claim gets a new lease."""
    settings = settings_for(db_url)
    batch_id, ids = submit_docs(settings, tmp_path, n=4)
    first = claim(settings, batch_id, ids[:2], "host-a")
    with get_sessionmaker(db_url)() as session, session.begin():
        store.release(session, first, "the engine failed")
    second = claim(settings, batch_id, ids[:2], "host-a")
    assert {c.lease for c in second}.isdisjoint({c.lease for c in first})
    with get_sessionmaker(db_url)() as session, session.begin():
        store.fail_claimed(session, batch_id, second, "gave up", "engine_error")
    assert items(settings, batch_id)[:2] == [(ItemStatus.failed, "host-a", 2)] * 2


def test_leases_and_heartbeats_in_the_database_clock(pg_url: str, settings_for, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A claim's lease ends `lease_s` after the database's now, and a heartbeat is stamped with it."""
    settings = settings_for(pg_url)
    batch_id, ids = submit_docs(settings, tmp_path, n=4)
    claimed = claim(settings, batch_id, ids, "host-a", lease_s=30)
    with get_sessionmaker(pg_url)() as session:
        now = db_clock(session)
        leases = list(session.scalars(select(Item.lease_expires_at).where(Item.batch_id == batch_id)))
    assert all(timedelta(seconds=25) < lease - now <= timedelta(seconds=30) for lease in leases), (leases, now)
    assert all(c.started_at is not None and abs(c.started_at - now) < timedelta(seconds=5) for c in claimed)
    register(settings, "w1", "m", "null", 8, ["generate"])
    heartbeat(settings, "w1")
    assert [w.id for w in live(settings)] == ["w1"]


def reconcile_at(settings: Settings, offset: str, cwd: Path) -> str:
    """`gristmill reconcile` in a process whose clock is off by `offset` (faketime, e.g. "+40m")."""
    done = subprocess.run(["faketime", "-f", offset, sys.executable, "-m", "producer.cli", "reconcile"],
                          env=cli_env(settings), cwd=cwd, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    return done.stdout + done.stderr


def test_a_skewed_reconciler_judges_leases_by_the_database_clock(pg_url: str, redis_url: str,  # type: ignore[no-untyped-def]
                                                                 settings_for, tmp_path: Path) -> None:
    """A reconciler whose host clock runs 40 minutes fast leaves live leases alone, and one running 40
    minutes slow requeues dead ones at once. (PostgreSQL only: SQLite's clock is the clock of the process
    running the statement; an SQLite database is one host's.)"""
    settings = settings_for(pg_url, redis_url)
    batch_id, ids = submit_docs(settings, tmp_path, n=4)
    claim(settings, batch_id, ids[:2], "host-a", lease_s=600)
    claim(settings, batch_id, ids[2:], "host-b", lease_s=600)
    with get_sessionmaker(pg_url)() as session, session.begin():
        skew_check = session.scalar(select(func.count()).select_from(Item).where(
            Item.batch_id == batch_id, Item.lease_expires_at < utcnow() + timedelta(minutes=40)))
    assert skew_check == 4  # by a clock 40 minutes fast, every one of these leases has ended
    reconcile_at(settings, "+40m", tmp_path)
    assert items(settings, batch_id) == [(ItemStatus.running, "host-a", 1)] * 2 + [(ItemStatus.running, "host-b", 1)] * 2

    with get_sessionmaker(pg_url)() as session, session.begin():  # host-b died: its leases ran out
        session.execute(update(Item).where(Item.worker_host == "host-b").values(lease_expires_at=db_now(session, -1)))
    reconcile_at(settings, "-40m", tmp_path)
    assert items(settings, batch_id) == [(ItemStatus.running, "host-a", 1)] * 2 + [(ItemStatus.queued, "host-b", 1)] * 2


def test_a_connection_cut_mid_statement_is_replaced(pg_url: str) -> None:
    """A network failure can leave a pooled connection mid-statement; the next checkout replaces it
    instead of raising psycopg's "can't change 'autocommit' now" (seen on a host whose link came back)."""
    from sqlalchemy import text

    from schema.db import get_engine

    engine = get_engine(pg_url)
    with engine.connect() as conn:
        stuck = conn.connection.dbapi_connection
    assert stuck is not None
    stuck.pgconn.send_query(b"SELECT pg_sleep(1)")  # as a statement the link went down in
    with engine.connect() as conn:
        assert conn.execute(text("SELECT 2")).scalar() == 2
        assert conn.connection.dbapi_connection is not stuck
