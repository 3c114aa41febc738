"""Fault tests: real worker processes, real Redis and PostgreSQL, the real small model.

Each shows from SQL that its fault landed on work in progress (items `running` at the kill, messages
waiting at the restart, a write blocked inside its transaction), then that the recovery ran (items
ran again, the reconciler requeued, the write was retried) and ended every item exactly once: one
terminal state, at most one result, the batch's counts matching its items. Where the engine is not
the subject, `tests.fault_engine.HoldingEngine` (no inference) holds chunks running until the test
lets them finish, so no test depends on the machine's speed.
"""

from __future__ import annotations

import json
import os
import pickle
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path

import psutil
import psycopg
import pytest
import redis
from sqlalchemy import func, select, update
from sqlalchemy.exc import ProgrammingError

from producer import api
from schema.db import get_sessionmaker, utcnow
from schema.jobs import SamplingParams
from schema.queue import RUN_CHUNK, Queue, queue_for
from schema.settings import Settings
from schema.states import TERMINAL_ITEM, BatchStatus, ItemStatus
from schema.tables import Batch, Item, Result
from schema.tables import Worker as WorkerRow
from tests.conftest import PG_ADMIN, cli_env, messages_waiting

HOLDING = "tests.fault_engine:HoldingEngine"
# A killed worker's items wait out their lease, the chunk time limit: 60 s, with two chunks of 8 in
# flight, leaves room on a slow CPU (AVX2 only, 2 cores shared with another run: the transformers
# engine made about 11 tokens/s there) and keeps recovery within a minute.
FAST_RECOVERY = {"chunk_size": 8, "inflight_chunks": 2, "chunk_time_limit_s": 60, "visibility_timeout_s": 120,
                 "reconcile_interval_s": 2, "requeue_grace_s": 3, "max_attempts": 2}
# With the HoldingEngine nothing is slow but the wait for a killed worker's leases: 15 s of them.
HOLDING_RECOVERY = {**FAST_RECOVERY, "chunk_time_limit_s": 15}
# A killed worker's chunks must come back through their expired leases (the reconciler), well before
# Redis would redeliver its unacknowledged messages (the visibility timeout, 120 s).
BEFORE_REDELIVERY = 90


class Workers:
    """`gristmill worker` processes of one test; every one is stopped, its whole tree, at the end."""

    def __init__(self, settings: Settings, tmp_path: Path) -> None:
        self.settings, self.tmp_path, self.procs = settings, tmp_path, []  # type: ignore[var-annotated]

    def start(self, engine: str = "transformers") -> subprocess.Popen[bytes]:
        log = open(self.tmp_path / f"worker{len(self.procs)}.log", "wb")  # noqa: SIM115  # the worker's stdout
        proc = subprocess.Popen([sys.executable, "-m", "producer.cli", "worker", "--engine", engine],
                                env=cli_env(self.settings), cwd=self.tmp_path, stdout=log, stderr=subprocess.STDOUT)
        self.procs.append(proc)
        return proc

    def kill(self, proc: subprocess.Popen[bytes]) -> None:
        """SIGKILL the worker and everything it started, as a crash or the OOM killer would."""
        tree = psutil.Process(proc.pid).children(recursive=True)
        proc.kill()
        proc.wait()
        for child in tree:
            if child.is_running():
                child.kill()

    def logs(self, tail: int = 3000) -> str:
        return "\n".join(p.read_text(errors="replace")[-tail:] for p in sorted(self.tmp_path.glob("worker*.log")))

    def stop_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                tree = psutil.Process(proc.pid).children(recursive=True)
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    proc.kill()
                for child in psutil.wait_procs(tree, timeout=20)[1]:
                    child.kill()


@pytest.fixture
def fault_settings(pg_url: str, redis_url: str, settings_for) -> Settings:  # type: ignore[no-untyped-def]
    return settings_for(pg_url, redis_url, **FAST_RECOVERY)


@pytest.fixture
def workers(fault_settings: Settings, tmp_path: Path) -> Iterator[Workers]:
    group = Workers(fault_settings, tmp_path)
    yield group
    group.stop_all()


@pytest.fixture
def workers_on(tmp_path: Path) -> Iterator[Callable[[Settings], Workers]]:
    """Worker groups on settings of the test's own; all stopped at the end."""
    groups: list[Workers] = []

    def make(settings: Settings) -> Workers:
        groups.append(Workers(settings, tmp_path))
        return groups[-1]

    yield make
    for group in groups:
        group.stop_all()


def docs(tmp_path: Path, n: int = 48, poison: int | None = None) -> Path:
    path = tmp_path / "docs.jsonl"
    lines = [{"id": f"d{i:03d}", "text": ("POISON " if i == poison else "") + f"Write a sentence about the number {i}."}
             for i in range(n)]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def submit(settings: Settings, path: Path, max_tokens: int = 8, **kwargs: object) -> api.BatchHandle:
    return api.submit(path, settings=settings, sampling=SamplingParams(max_tokens=max_tokens), **kwargs)  # type: ignore[arg-type]


def worker_name(proc: subprocess.Popen[bytes]) -> str:
    """The worker's name: its Celery hostname and the `worker_host` of the items it claims."""
    return f"gristmill-{proc.pid}@{socket.gethostname()}"


def registered(settings: Settings, proc: subprocess.Popen[bytes]) -> bool:
    """The worker has loaded its engine and reported itself in the `workers` table."""
    with get_sessionmaker(settings.database_url)() as session:
        try:
            return session.get(WorkerRow, worker_name(proc)) is not None
        except ProgrammingError:  # the worker has not created the tables yet
            return False


def running_ids(settings: Settings, batch_id: str, host: str | None = None) -> set[int]:
    """Items of the batch running now (held by `host`, when given)."""
    query = select(Item.id).where(Item.batch_id == batch_id, Item.status == ItemStatus.running)
    if host is not None:
        query = query.where(Item.worker_host == host)
    with get_sessionmaker(settings.database_url)() as session:
        return set(session.scalars(query))


def item_rows(settings: Settings, batch_id: str, ids: set[int] | None = None) -> dict[int, tuple[str, int]]:
    """Each item's (status, attempts): all the batch's, or those with these ids."""
    query = select(Item.id, Item.status, Item.attempts).where(Item.batch_id == batch_id)
    if ids is not None:
        query = query.where(Item.id.in_(ids))
    with get_sessionmaker(settings.database_url)() as session:
        return {item_id: (status, attempts) for item_id, status, attempts in session.execute(query).all()}


def assert_ran_again(settings: Settings, batch_id: str, ids: set[int]) -> None:
    """Every item the fault interrupted was run a second time and succeeded."""
    rows = item_rows(settings, batch_id, ids)
    assert all(status == ItemStatus.succeeded and attempts >= 2 for status, attempts in rows.values()), rows


def close_gate(settings: Settings) -> None:
    """HoldingEngine finishes nothing until the gate is opened."""
    settings.home.mkdir(parents=True, exist_ok=True)
    (settings.home / "closed").touch()


def open_gate(settings: Settings) -> None:
    (settings.home / "closed").unlink()


def results(settings: Settings) -> int:
    with get_sessionmaker(settings.database_url)() as session:
        return session.scalar(select(func.count()).select_from(Result)) or 0


def running(settings: Settings) -> int:
    with get_sessionmaker(settings.database_url)() as session:
        return session.scalar(select(func.count()).select_from(Item).where(Item.status == ItemStatus.running)) or 0


def wait_until(condition: Callable[[], bool], timeout: float, what: str, workers: Workers | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} within {timeout:.0f} s\n{workers.logs() if workers else ''}")
        time.sleep(0.2)


def assert_consistent(settings: Settings, batch_id: str) -> dict[str, int]:
    """Every item ended exactly once, at most one result each, one exactly for each success; counts match."""
    with get_sessionmaker(settings.database_url)() as session:
        items = session.execute(select(Item.id, Item.status).where(Item.batch_id == batch_id)).all()
        per_item = Counter(session.scalars(select(Result.item_id).where(Result.batch_id == batch_id)))
        batch = session.get(Batch, batch_id)
        assert batch is not None
    statuses = Counter(status for _, status in items)
    assert all(status in TERMINAL_ITEM for _, status in items), statuses
    assert max(per_item.values(), default=0) <= 1
    assert {i for i, s in items if s == ItemStatus.succeeded} == set(per_item)
    assert (batch.succeeded, batch.failed, batch.cancelled, batch.expired) == (
        statuses[ItemStatus.succeeded], statuses[ItemStatus.failed],
        statuses[ItemStatus.cancelled], statuses[ItemStatus.expired])
    assert batch.total == len(items)
    return dict(statuses)


def test_worker_killed_mid_batch(pg_url: str, redis_url: str, settings_for, workers_on,  # type: ignore[no-untyped-def]
                                 tmp_path: Path) -> None:
    """SIGKILL a worker holding chunks (the HoldingEngine keeps them running: the subject is delivery,
    not inference); a new worker finishes the batch, running the killed worker's items again."""
    fault_settings = settings_for(pg_url, redis_url, **HOLDING_RECOVERY)
    workers = workers_on(fault_settings)
    close_gate(fault_settings)
    first = workers.start(HOLDING)
    handle = submit(fault_settings, docs(tmp_path))
    wait_until(lambda: len(running_ids(fault_settings, handle.id)) == 16, 120, "two chunks not running", workers)
    workers.kill(first)
    held = running_ids(fault_settings, handle.id)  # as the dead worker left them: no other worker runs
    assert len(held) == 16, "the worker held no item when it was killed"
    open_gate(fault_settings)
    workers.start(HOLDING)
    info = handle.wait(timeout=BEFORE_REDELIVERY)
    assert info.status == BatchStatus.completed, workers.logs()
    assert assert_consistent(fault_settings, handle.id) == {"succeeded": 48}
    assert_ran_again(fault_settings, handle.id, held)


def test_two_workers_one_killed(pg_url: str, redis_url: str, settings_for, workers_on,  # type: ignore[no-untyped-def]
                                tmp_path: Path) -> None:
    """Two workers hold chunks; one is SIGKILLed; the survivor finishes the batch, the dead one's items too."""
    fault_settings = settings_for(pg_url, redis_url, **HOLDING_RECOVERY)
    workers = workers_on(fault_settings)
    close_gate(fault_settings)
    doomed = workers.start(HOLDING)
    wait_until(lambda: registered(fault_settings, doomed), 120, "the first worker did not start", workers)
    survivor = workers.start(HOLDING)
    wait_until(lambda: registered(fault_settings, survivor), 120, "the second worker did not start", workers)
    handle = submit(fault_settings, docs(tmp_path, 64))
    wait_until(lambda: len(running_ids(fault_settings, handle.id, worker_name(doomed))) == 16
               and len(running_ids(fault_settings, handle.id, worker_name(survivor))) == 16, 120,
               "both workers did not hold two chunks", workers)
    workers.kill(doomed)
    held = running_ids(fault_settings, handle.id, worker_name(doomed))
    assert len(held) == 16, "the killed worker held no item"
    open_gate(fault_settings)
    assert handle.wait(timeout=BEFORE_REDELIVERY).status == BatchStatus.completed, workers.logs()
    assert assert_consistent(fault_settings, handle.id) == {"succeeded": 64}
    assert_ran_again(fault_settings, handle.id, held)


def test_sigterm_ends_in_flight_chunks_once(fault_settings: Settings, workers: Workers, tmp_path: Path) -> None:
    """SIGTERM mid-batch: the worker takes no new chunk, ends those it runs (each item once, results
    in SQL), exits 0; the chunks it never started wait for the next worker, which finishes the batch."""
    close_gate(fault_settings)
    worker = workers.start(HOLDING)
    handle = submit(fault_settings, docs(tmp_path, n=64), max_tokens=16)
    wait_until(lambda: len(running_ids(fault_settings, handle.id)) == 16, 120, "two chunks not running", workers)
    held = running_ids(fault_settings, handle.id)
    worker.send_signal(signal.SIGTERM)
    time.sleep(2)  # the warm shutdown has begun: no chunk may start from here on
    open_gate(fault_settings)
    assert worker.wait(timeout=180) == 0, workers.logs()
    with get_sessionmaker(fault_settings.database_url)() as session:
        after_stop = dict(session.execute(select(Item.id, Item.status).where(Item.batch_id == handle.id)).all())
    assert ItemStatus.running not in after_stop.values(), "a chunk was left running"
    assert {after_stop[i] for i in held} == {ItemStatus.succeeded}, "the chunks in flight did not finish"
    assert ItemStatus.queued in after_stop.values(), "the worker kept taking chunks after SIGTERM"
    workers.start(HOLDING)
    assert handle.wait(timeout=300).status == BatchStatus.completed, workers.logs()
    assert assert_consistent(fault_settings, handle.id) == {ItemStatus.succeeded: 64}
    ran = {i for i, status in after_stop.items() if status == ItemStatus.succeeded}
    assert {attempts for _, attempts in item_rows(fault_settings, handle.id, ran).values()} == {1}, \
        "an item finished before SIGTERM ran again"


def test_engine_process_killed(fault_settings: Settings, workers: Workers, tmp_path: Path) -> None:
    """SIGKILL vLLM's engine process only, while chunks run in it: the worker hands them back and
    exits non-zero, so a supervisor restarts it; the restarted worker runs them again (on transformers:
    what it restarts on is not the subject, and a second vLLM start would cost CI about a minute)."""
    worker = workers.start("vllm")
    handle = submit(fault_settings, docs(tmp_path, 48), max_tokens=16)
    wait_until(lambda: bool(running_ids(fault_settings, handle.id)), 300, "no chunk running", workers)
    engine_core = [p for p in psutil.Process(worker.pid).children(recursive=True)
                   if "resource_tracker" not in " ".join(p.cmdline())]
    assert engine_core, "vLLM's engine process was not found"
    for proc in engine_core:
        proc.kill()
    assert worker.wait(timeout=120) != 0, workers.logs()
    with get_sessionmaker(fault_settings.database_url)() as session:
        handed_back = set(session.scalars(select(Item.id).where(
            Item.batch_id == handle.id, Item.status == ItemStatus.queued, Item.interrupted.is_(True))))
    assert handed_back, "no chunk was in the engine when it died"
    assert not running_ids(fault_settings, handle.id), "the dying worker left items running"
    workers.start("transformers")
    assert handle.wait(timeout=300).status == BatchStatus.completed, workers.logs()
    assert assert_consistent(fault_settings, handle.id) == {"succeeded": 48}
    assert_ran_again(fault_settings, handle.id, handed_back)


class RedisServer:
    """A test-owned redis-server on its own port, restartable, stopped by its pid."""

    def __init__(self, folder: Path, appendonly: bool) -> None:
        self.folder, self.appendonly = folder, appendonly
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        persistence = ["--appendonly", "yes", "--appendfsync", "always"] if self.appendonly else ["--appendonly", "no"]
        self.proc = subprocess.Popen(["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                      "--dir", str(self.folder), *persistence], stdout=subprocess.DEVNULL)
        wait_until(self._answers, 10, "redis-server did not start")

    def _answers(self) -> bool:
        return subprocess.run(["redis-cli", "-p", str(self.port), "ping"], capture_output=True, check=False).returncode == 0

    def stop(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)  # with AOF on, everything acknowledged is on disk
        self.proc.wait(timeout=30)


@pytest.mark.parametrize("appendonly", [False, True], ids=["persistence-off", "aof"])
def test_redis_restart(appendonly: bool, pg_url: str, settings_for, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    server = RedisServer(tmp_path, appendonly)
    server.start()
    settings = settings_for(pg_url, server.url, **FAST_RECOVERY)
    group = Workers(settings, tmp_path)
    try:
        close_gate(settings)
        group.start(HOLDING)
        handle = submit(settings, docs(tmp_path, 160))  # 20 chunks: most still wait in Redis at the restart
        wait_until(lambda: len(running_ids(settings, handle.id)) == 16, 120, "two chunks not running", group)
        broker = redis.Redis.from_url(server.url)
        waiting = messages_waiting(broker, queue_for(settings.model, "generate"))
        server.stop()
        assert waiting > 0, "no message was waiting in Redis when it stopped"
        time.sleep(2)
        server.start()
        kept = messages_waiting(broker, queue_for(settings.model, "generate"))  # before any worker could requeue (grace 3 s)
        assert (kept > 0) == appendonly, (waiting, kept)
        open_gate(settings)
        assert handle.wait(timeout=300).status == BatchStatus.completed, group.logs()
    finally:
        group.stop_all()
        server.stop()
    assert assert_consistent(settings, handle.id) == {"succeeded": 160}
    requeued = "reconciled" in group.logs(tail=10**9)
    assert requeued != appendonly, group.logs()  # without persistence the reconciler restored the rest


def test_database_connection_lost_inside_result_write(fault_settings: Settings, workers: Workers,
                                                      tmp_path: Path) -> None:
    """The worker's connection dies inside its result-writing transaction: the write is retried in
    place (the results are in memory), so no item runs twice and each has one result.

    Deterministic: the test locks the batch's row, so the write blocks on it (the engine-batch row's
    foreign key); the test terminates exactly the backends waiting on that lock, then lets go."""
    close_gate(fault_settings)
    workers.start(HOLDING)
    handle = submit(fault_settings, docs(tmp_path, 16))
    wait_until(lambda: len(running_ids(fault_settings, handle.id)) == 16, 120, "chunks not running", workers)
    database = fault_settings.database_url.rsplit("/", 1)[1]
    with psycopg.connect(PG_ADMIN.rsplit("/", 1)[0] + f"/{database}") as lock:
        lock.execute("SELECT 1 FROM batches WHERE id = %s FOR UPDATE", [handle.id])
        open_gate(fault_settings)
        with psycopg.connect(PG_ADMIN, autocommit=True) as admin:
            blocked = f"SELECT pid FROM pg_stat_activity WHERE datname = '{database}' AND wait_event_type = 'Lock'"
            wait_until(lambda: admin.execute(blocked).fetchone() is not None, 60, "no write blocked", workers)
            time.sleep(1)  # let every chunk's write reach the lock
            killed = admin.execute(f"SELECT pg_terminate_backend(pid) FROM ({blocked}) AS w").fetchall()
        lock.rollback()
    assert handle.wait(timeout=120).status == BatchStatus.completed, workers.logs()
    assert killed and "retrying" in workers.logs(tail=10**9), workers.logs()
    assert assert_consistent(fault_settings, handle.id) == {"succeeded": 16}
    assert {attempts for _, attempts in item_rows(fault_settings, handle.id).values()} == {1}, "an item ran twice"


def test_poison_item_is_isolated(pg_url: str, redis_url: str, settings_for, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Two chunks in flight, so the poison's failure fails its neighbours too (the engine fails all it
    holds): the chunks are split until it is alone, and only the poison is given up, none of the items
    that failed beside it (each, once alone, runs with the engine to itself)."""
    settings = settings_for(pg_url, redis_url, **{**FAST_RECOVERY, "chunk_size": 16})
    group = Workers(settings, tmp_path)
    try:
        group.start("tests.fault_engine:PoisonableEngine")
        handle = submit(settings, docs(tmp_path, 64, poison=17), max_tokens=8)
        assert handle.wait(timeout=400).status == BatchStatus.completed, group.logs()
    finally:
        group.stop_all()
    assert assert_consistent(settings, handle.id) == {"succeeded": 63, "failed": 1}
    with get_sessionmaker(settings.database_url)() as session:
        poison = session.scalars(select(Item).where(Item.batch_id == handle.id, Item.status == "failed")).one()
    assert poison.custom_id == "d017" and "gave up after 2 attempts" in (poison.last_error or "")
    beside = [attempts for status, attempts in item_rows(settings, handle.id).values() if status == ItemStatus.succeeded]
    assert max(beside) > settings.max_attempts, "no item failed beside the poison often enough to be at risk"


def test_cancel_while_a_chunk_runs(pg_url: str, redis_url: str, settings_for, workers_on,  # type: ignore[no-untyped-def]
                                   tmp_path: Path) -> None:
    """Cancel with chunks provably running: the batch is `cancelling` until they end, they keep their
    results, queued items are cancelled, it ends `cancelled`, and a redelivered chunk claims nothing."""
    settings = settings_for(pg_url, redis_url, **FAST_RECOVERY)
    close_gate(settings)
    group = workers_on(settings)
    group.start(HOLDING)
    handle = submit(settings, docs(tmp_path, 64))
    wait_until(lambda: len(running_ids(settings, handle.id)) == 16, 120, "two chunks not running", group)
    held = running_ids(settings, handle.id)
    assert handle.cancel().status == BatchStatus.cancelling
    assert assert_open(settings, handle.id) == {"running": 16, "cancelled": 48}
    open_gate(settings)
    assert handle.wait(timeout=60).status == BatchStatus.cancelled, group.logs()
    assert assert_consistent(settings, handle.id) == {"succeeded": 16, "cancelled": 48}
    assert {status for status, _ in item_rows(settings, handle.id, held).values()} == {ItemStatus.succeeded}
    before = item_rows(settings, handle.id)
    redeliver(settings, handle.id, sorted(before))
    assert item_rows(settings, handle.id) == before and results(settings) == 16


def assert_open(settings: Settings, batch_id: str) -> dict[str, int]:
    with get_sessionmaker(settings.database_url)() as session:
        return dict(Counter(session.scalars(select(Item.status).where(Item.batch_id == batch_id))))


def redeliver(settings: Settings, batch_id: str, item_ids: list[int]) -> None:
    """Send these items as one chunk again, as a redelivery would, and wait until it was consumed."""
    Queue(settings).send(batch_id, settings.model, "generate", [item_ids])
    client = redis.Redis.from_url(settings.broker_url)
    wait_until(lambda: not messages_waiting(client, queue_for(settings.model, "generate")) and not client.hlen("unacked"), 60,
               "the redelivered chunk was not consumed")


def test_expire_mid_batch(pg_url: str, redis_url: str, settings_for, workers_on, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """The completion window passes (the test moves it into the past) with chunks running and items
    queued: queued items expire, the running chunks finish and keep their results."""
    settings = settings_for(pg_url, redis_url, **FAST_RECOVERY)
    close_gate(settings)
    group = workers_on(settings)
    group.start(HOLDING)
    handle = submit(settings, docs(tmp_path, 48), completion_window="1h")
    wait_until(lambda: len(running_ids(settings, handle.id)) == 16, 120, "two chunks not running", group)
    with get_sessionmaker(settings.database_url)() as session, session.begin():
        session.execute(update(Batch).where(Batch.id == handle.id).values(expires_at=utcnow() - timedelta(seconds=1)))
    wait_until(lambda: handle.status().status == BatchStatus.expired, 30, "the worker did not expire it", group)
    assert assert_open(settings, handle.id) == {"running": 16, "expired": 32}
    open_gate(settings)
    wait_until(lambda: not running_ids(settings, handle.id), 60, "the running chunks did not finish", group)
    assert assert_consistent(settings, handle.id) == {"succeeded": 16, "expired": 32}
    assert handle.status().status == BatchStatus.expired
    out = tmp_path / "out.jsonl"
    counts = handle.results(out)
    assert (counts.succeeded, counts.failed, counts.pending) == (16, 32, 0)
    assert out.read_text().count('"batch_expired"') == 32


def test_chunk_time_limit(pg_url: str, redis_url: str, settings_for, workers_on, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """An item that never finishes: its chunk is stopped at the time limit and handed back, the rest
    of it runs again and succeeds, the item fails alone; nothing hangs."""
    settings = settings_for(pg_url, redis_url, **{**FAST_RECOVERY, "chunk_size": 4, "chunk_time_limit_s": 10})
    group = workers_on(settings)
    group.start(HOLDING)
    path = docs(tmp_path, 12)
    lines = path.read_text().splitlines()
    lines[5] = lines[5].replace("Write", "HANG. Write")
    path.write_text("\n".join(lines) + "\n")
    handle = submit(settings, path)
    assert handle.wait(timeout=180).status == BatchStatus.completed, group.logs()
    assert assert_consistent(settings, handle.id) == {"succeeded": 11, "failed": 1}
    with get_sessionmaker(settings.database_url)() as session:
        items = {i.custom_id: i for i in session.scalars(select(Item).where(Item.batch_id == handle.id))}
    assert "time limit" in (items["d005"].last_error or ""), items["d005"].last_error
    assert items["d005"].error_code == "timeout"
    assert all(items[f"d00{i}"].attempts >= 2 for i in (4, 6, 7)), "the rest of the chunk did not run again"


class _Exploit:
    """Unpickling this would create a file: proof that a pickled message was executed."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (os.system, (f"touch {self.marker}",))


def test_pickled_message_is_refused(fault_settings: Settings, workers: Workers, tmp_path: Path) -> None:
    marker = tmp_path / "unpickled"
    workers.start(HOLDING)
    handle = submit(fault_settings, docs(tmp_path, 8))
    assert handle.wait(timeout=240).status == BatchStatus.completed
    with Queue(fault_settings).connection() as conn, conn.Producer() as producer:
        producer.publish(pickle.dumps(((handle.id, [_Exploit(marker)]), {}, {})), serializer=None,
                         content_type="application/x-python-serialize", content_encoding="binary",
                         routing_key=queue_for(fault_settings.model, "generate"), headers={"task": RUN_CHUNK, "id": "evil"})
    wait_until(lambda: "disallowed" in workers.logs().lower() or "refus" in workers.logs().lower(), 60,
               "the worker did not refuse the pickled message", workers)
    assert not marker.exists()
    assert results(fault_settings) == 8
