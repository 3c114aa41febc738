"""Workers on separate (simulated) hosts: each `gristmill worker` runs in its own network namespace and
reaches Redis and PostgreSQL over links the test can cut (tests/hosts.py); one host's clock can run off
(libfaketime). The engine is the no-inference HoldingEngine: the subject is delivery across a network
that drops and heals, so each test holds chunks running until it has cut the link it means to cut.
Each ends with the fault tests' SQL assertions: every item in exactly one terminal state, at most one
result, the batch's counts true.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import select

from schema import workers as worker_rows
from schema.db import db_clock, get_sessionmaker, prepare_schema
from schema.settings import Settings
from schema.states import BatchStatus, ItemStatus
from schema.tables import Item
from tests.conftest import cli_env
from tests.hosts import Host, Site
from tests.test_faults import HOLDING, assert_consistent, submit, wait_until

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root (CI runs as root)")

LEASE_S = 15  # the chunk time limit: how long a claim holds items
TIMING = {"chunk_size": 8, "inflight_chunks": 2, "chunk_time_limit_s": LEASE_S, "visibility_timeout_s": 120,
          "reconcile_interval_s": 2, "requeue_grace_s": 3, "max_attempts": 3}
_redis_dbs = itertools.cycle(range(1, 16))


@pytest.fixture(scope="module")
def site() -> Iterator[Site]:
    made = Site(hosts=2)
    yield made
    made.close()


class Cluster:
    """One test's database, its workers (one per host at most) and the settings each sees."""

    def __init__(self, site: Site, tmp_path: Path, **overrides: object) -> None:
        self.site, self.tmp_path, self.overrides = site, tmp_path, {**TIMING, **overrides}
        self.database, self.redis_db = site.database(), next(_redis_dbs)
        self.settings = self.settings_on(None)  # the test's own view, over loopback
        prepare_schema(self.settings.database_url)
        self.procs: dict[int, subprocess.Popen[bytes]] = {}

    def settings_on(self, host: Host | None, **extra: object) -> Settings:
        database_url, broker_url = self.site.urls(self.database, self.redis_db, host)
        home = self.tmp_path / (f"host{host.index}" if host else "site")
        return Settings(database_url=database_url, broker_url=broker_url, home=home, **{**self.overrides, **extra})  # type: ignore[arg-type]

    def start(self, host: Host, clock_offset: str | None = None, **extra: object) -> subprocess.Popen[bytes]:
        settings = self.settings_on(host, **extra)
        close_gate(settings)
        argv, env = host.command([sys.executable, "-m", "producer.cli", "worker", "--engine", HOLDING],
                                 cli_env(settings), clock_offset)
        log = open(self.tmp_path / f"host{host.index}.log", "ab")  # noqa: SIM115  # the worker's output
        self.procs[host.index] = subprocess.Popen(argv, env=env, cwd=self.tmp_path, stdout=log, stderr=subprocess.STDOUT)
        return self.procs[host.index]

    def worker_id(self, host: Host) -> str:
        ids = [w.id for w in worker_rows.live(self.settings) if w.id.startswith(f"gristmill-{self.procs[host.index].pid}@")]
        return ids[0] if ids else ""

    def wait_registered(self, *hosts: Host) -> None:
        for host in hosts:
            wait_until(lambda h=host: bool(self.worker_id(h)), 120, f"the worker on host {host.index} did not start", self)

    def open_gate(self, host: Host) -> None:
        (self.settings_on(host).home / "closed").unlink(missing_ok=True)

    def log(self, host: Host) -> str:
        path = self.tmp_path / f"host{host.index}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def logs(self, tail: int = 4000) -> str:
        return "\n".join(f"--- host {i}\n" + self.log(h)[-tail:] for i, h in enumerate(self.site.hosts, 1))

    def items(self, batch_id: str) -> dict[int, tuple[str, str | None, int]]:
        """Each item's (status, worker, attempts)."""
        with get_sessionmaker(self.settings.database_url)() as session:
            return {i: (s, w, a) for i, s, w, a in session.execute(
                select(Item.id, Item.status, Item.worker_host, Item.attempts).where(Item.batch_id == batch_id))}

    def held_by(self, batch_id: str, host: Host) -> set[int]:
        worker = self.worker_id(host)
        return {i for i, (s, w, _) in self.items(batch_id).items() if s == ItemStatus.running and w == worker}

    def stop(self) -> None:
        for host in self.site.hosts:
            host.heal()
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()  # the namespace's processes; Site.close kills any left
                proc.wait()


def docs(tmp_path: Path, n: int, batch: str = "first") -> Path:
    """`n` documents, different for each `batch` (the same text would be answered from the cache)."""
    path = tmp_path / f"{batch}.jsonl"
    path.write_text("".join(json.dumps({"id": f"d{i:03d}", "text": f"The {batch} batch, number {i}."}) + "\n"
                            for i in range(n)))
    return path


def close_gate(settings: Settings) -> None:
    settings.home.mkdir(parents=True, exist_ok=True)
    (settings.home / "closed").touch()


@pytest.fixture
def cluster(site: Site, tmp_path: Path) -> Iterator[Cluster]:
    made = Cluster(site, tmp_path)
    yield made
    made.stop()


def two_workers_holding(cluster: Cluster, n: int, **extra: object) -> tuple[str, set[int], set[int]]:
    """Workers on hosts 1 and 2, a batch of `n` items; returns once each holds two chunks running."""
    a, b = cluster.site.hosts
    cluster.start(a, **extra)
    cluster.start(b)
    cluster.wait_registered(a, b)
    handle = submit(cluster.settings, docs(cluster.tmp_path, n))
    wait_until(lambda: len(cluster.held_by(handle.id, a)) == 16 and len(cluster.held_by(handle.id, b)) == 16, 60,
               "each worker did not hold two chunks", cluster)
    return handle.id, cluster.held_by(handle.id, a), cluster.held_by(handle.id, b)


def wait_done(cluster: Cluster, batch_id: str, timeout: float) -> None:
    from producer import api

    handle = api.open_batch(batch_id, cluster.settings)
    wait_until(lambda: handle.status().status == BatchStatus.completed, timeout, "the batch did not complete", cluster)


def test_partitioned_past_its_lease_the_late_writer_is_fenced_off(cluster: Cluster) -> None:
    """Host 1 is cut off from Redis and PostgreSQL while it runs two chunks, for longer than their lease:
    host 2's reconciler requeues them and host 2 claims them. The link heals while host 2 still runs
    some: host 1's results are all refused by the lease id (it says so), no item is finished twice,
    and the batch completes (host 1, back, may take part in it)."""
    a, b = cluster.site.hosts
    cluster.start(a, write_retry_s=300)
    cluster.wait_registered(a)
    handle = submit(cluster.settings, docs(cluster.tmp_path, 16))
    wait_until(lambda: len(cluster.held_by(handle.id, a)) == 16, 60, "host 1 did not hold two chunks", cluster)
    worker_a = cluster.worker_id(a)
    a.cut()
    cluster.open_gate(a)  # host 1's engine finishes; its writes cannot land
    cluster.start(b, chunk_time_limit_s=60)  # it holds them until host 1 is back: no time limit hit meanwhile
    cluster.wait_registered(b)
    # Both chunks' leases end (they were claimed a moment apart) and host 2 takes the items: requeued
    # items were interrupted, so it splits their chunks (to isolate a failing item) and holds two pieces.
    wait_until(lambda: not any(w == worker_a for _, w, _ in cluster.items(handle.id).values())
               and bool(cluster.held_by(handle.id, b)), 60, "host 2 did not take host 1's items", cluster)
    a.heal()
    # Host 2 holds some of them running whenever host 1's writes come: without the lease id those
    # writes would finish them ("n of 8 discarded", n < 8).
    wait_until(lambda: cluster.log(a).count("8 of 8 results discarded: their lease was lost") == 2, 90,
               "host 1 did not find both chunks' results fenced off", cluster)
    cluster.open_gate(b)
    wait_done(cluster, handle.id, timeout=60)
    assert min(n for _, _, n in cluster.items(handle.id).values()) >= 2, "an item kept host 1's first run"
    assert assert_consistent(cluster.settings, handle.id) == {ItemStatus.succeeded: 16}


def test_partition_shorter_than_the_lease(cluster: Cluster) -> None:
    """Host 1 is cut off for 8 s (its lease is 60 s) while its engine finishes two chunks: after the link
    heals it writes them itself, nothing is requeued, and it takes the next batch without a restart."""
    a = cluster.site.hosts[0]
    proc = cluster.start(a, chunk_time_limit_s=60)
    cluster.wait_registered(a)
    handle = submit(cluster.settings, docs(cluster.tmp_path, 16))
    wait_until(lambda: len(cluster.held_by(handle.id, a)) == 16, 60, "host 1 did not hold two chunks", cluster)
    worker_a = cluster.worker_id(a)
    a.cut()
    cluster.open_gate(a)
    time.sleep(8)
    a.heal()
    wait_done(cluster, handle.id, timeout=120)
    assert set(cluster.items(handle.id).values()) == {(ItemStatus.succeeded, worker_a, 1)}, cluster.logs()
    assert "reconciled" not in cluster.log(a)
    again = submit(cluster.settings, docs(cluster.tmp_path, 16, "second"))
    wait_done(cluster, again.id, timeout=120)
    assert proc.poll() is None and set(cluster.items(again.id).values()) == {(ItemStatus.succeeded, worker_a, 1)}
    assert assert_consistent(cluster.settings, handle.id) == {ItemStatus.succeeded: 16}


def test_clocks_40_minutes_apart(cluster: Cluster) -> None:
    """Host 1's clock runs 40 minutes fast, host 2's 40 minutes slow. Both are live by their heartbeats;
    no running item is requeued early (host 1's reconciler would see every lease as long over by its own
    clock); when host 1 is killed, host 2 requeues its items as their leases end by the database's clock
    (by its own it would wait 40 minutes more)."""
    a, b = cluster.site.hosts
    cluster.overrides["chunk_time_limit_s"] = 30
    cluster.start(a, clock_offset="+40m")
    cluster.start(b, clock_offset="-40m")
    cluster.wait_registered(a, b)  # live: their heartbeats are in the database's clock
    handle = submit(cluster.settings, docs(cluster.tmp_path, 48))
    wait_until(lambda: len(cluster.held_by(handle.id, a)) == 16 and len(cluster.held_by(handle.id, b)) == 16, 60,
               "each worker did not hold two chunks", cluster)
    held_a, held = cluster.held_by(handle.id, a), cluster.held_by(handle.id, a) | cluster.held_by(handle.id, b)
    time.sleep(10)  # five reconciling rounds on each host
    rows = cluster.items(handle.id)
    assert {rows[i][0] for i in held} == {ItemStatus.running} and {rows[i][2] for i in held} == {1}, \
        "an item was requeued early"

    cluster.procs[a.index].kill()
    with get_sessionmaker(cluster.settings.database_url)() as session:
        lease_end = max(session.scalars(select(Item.lease_expires_at).where(Item.id.in_(held_a))))
    wait_until(lambda: all(cluster.items(handle.id)[i][0] != ItemStatus.running or cluster.items(handle.id)[i][2] == 2
                           for i in held_a), 60, "host 1's items were not requeued", cluster)
    with get_sessionmaker(cluster.settings.database_url)() as session:
        late_s = (db_clock(session) - lease_end).total_seconds()
    assert late_s < 3 * TIMING["reconcile_interval_s"] + 2, f"requeued {late_s:.1f} s after the lease ended"
    cluster.open_gate(b)
    wait_done(cluster, handle.id, timeout=90)
    assert assert_consistent(cluster.settings, handle.id) == {ItemStatus.succeeded: 48}


def test_redis_unreachable_from_one_host(cluster: Cluster) -> None:
    """Host 1 loses Redis only: it finishes and writes what it runs (the database is reachable) but takes
    nothing more; host 2 carries the rest of the batch."""
    a, b = cluster.site.hosts
    batch_id, held_a, _ = two_workers_holding(cluster, 64)
    worker_a, worker_b = cluster.worker_id(a), cluster.worker_id(b)
    a.cut(db_link=False)
    cluster.open_gate(a)
    cluster.open_gate(b)
    wait_done(cluster, batch_id, timeout=90)
    rows = cluster.items(batch_id)
    assert {rows[i] for i in held_a} == {(ItemStatus.succeeded, worker_a, 1)}, cluster.logs()
    assert {rows[i] for i in set(rows) - held_a} == {(ItemStatus.succeeded, worker_b, 1)}, cluster.logs()
    assert assert_consistent(cluster.settings, batch_id) == {ItemStatus.succeeded: 64}


def test_database_unreachable_from_one_host(cluster: Cluster) -> None:
    """Host 1 loses PostgreSQL only: it retries its writes for a bounded time, abandons them, and takes no
    chunks; host 2 runs the abandoned items when their lease ends, and the rest. When the link heals,
    host 1 takes chunks again without a restart."""
    a, b = cluster.site.hosts
    batch_id, held_a, _ = two_workers_holding(cluster, 64, write_retry_s=5)
    worker_b = cluster.worker_id(b)
    a.cut(redis_link=False)
    cluster.open_gate(a)
    cluster.open_gate(b)
    wait_done(cluster, batch_id, timeout=120)
    # Its write waits out the TCP user timeout (15 s) before it fails: host 2 may be done before that.
    wait_until(lambda: "results abandoned" in cluster.log(a) and "taking no more chunks" in cluster.log(a), 60,
               "host 1 did not abandon its results and pause", cluster)
    rows = cluster.items(batch_id)
    assert {rows[i] for i in held_a} == {(ItemStatus.succeeded, worker_b, 2)}, cluster.logs()
    assert assert_consistent(cluster.settings, batch_id) == {ItemStatus.succeeded: 64}

    a.heal()
    wait_until(lambda: "answers again; taking chunks" in cluster.log(a), 60, "host 1 did not resume", cluster)
    close_gate(cluster.settings_on(b))  # host 2 holds its two chunks: host 1 must run the rest
    again = submit(cluster.settings, docs(cluster.tmp_path, 48, "second"))
    wait_until(lambda: sum(1 for s, w, _ in cluster.items(again.id).values()
                           if s == ItemStatus.succeeded and w == cluster.worker_id(a)) >= 16, 90,
               "host 1 took no chunk after the link healed", cluster)
    cluster.open_gate(b)
    wait_done(cluster, again.id, timeout=90)
    assert assert_consistent(cluster.settings, again.id) == {ItemStatus.succeeded: 48}
