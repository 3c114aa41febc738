"""Fault tests: real worker processes, real Redis and PostgreSQL, the real small model.

Each ends by checking in SQL that every item has exactly one terminal state and at most one result,
and that the batch's counts match its items.
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
from pathlib import Path

import psutil
import psycopg
import pytest
from sqlalchemy import func, select

from producer import api
from schema.db import get_sessionmaker
from schema.jobs import SamplingParams
from schema.settings import Settings
from schema.states import TERMINAL_ITEM, BatchStatus, ItemStatus
from schema.tables import Batch, Item, Result
from tests.conftest import PG_ADMIN, cli_env

FAST_RECOVERY = {"chunk_size": 8, "chunk_time_limit_s": 30, "visibility_timeout_s": 60, "reconcile_interval_s": 2,
                 "requeue_grace_s": 3, "max_attempts": 2}


class Workers:
    """`gristmill worker` processes of one test; every one is stopped, its whole tree, at the end."""

    def __init__(self, settings: Settings, tmp_path: Path) -> None:
        self.settings, self.tmp_path, self.procs = settings, tmp_path, []  # type: ignore[var-annotated]

    def start(self, engine: str = "transformers") -> subprocess.Popen[bytes]:
        log = open(self.tmp_path / f"worker{len(self.procs)}.log", "wb")
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


def docs(tmp_path: Path, n: int = 48, poison: int | None = None) -> Path:
    path = tmp_path / "docs.jsonl"
    lines = [{"id": f"d{i:03d}", "text": ("POISON " if i == poison else "") + f"Write a sentence about the number {i}."}
             for i in range(n)]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def submit(settings: Settings, path: Path, max_tokens: int = 24, **kwargs: object) -> api.BatchHandle:
    return api.submit(path, settings=settings, sampling=SamplingParams(max_tokens=max_tokens), **kwargs)  # type: ignore[arg-type]


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


def test_worker_killed_mid_batch(fault_settings: Settings, workers: Workers, tmp_path: Path) -> None:
    first = workers.start()
    handle = submit(fault_settings, docs(tmp_path))
    wait_until(lambda: results(fault_settings) >= 8, 240, "no results", workers)
    workers.kill(first)
    workers.start()
    info = handle.wait(timeout=300)
    assert info.status == BatchStatus.completed, workers.logs()
    assert assert_consistent(fault_settings, handle.id) == {"succeeded": 48}


def test_two_workers_one_killed(fault_settings: Settings, workers: Workers, tmp_path: Path) -> None:
    doomed = workers.start()
    workers.start()
    handle = submit(fault_settings, docs(tmp_path, 64))
    wait_until(lambda: results(fault_settings) >= 8, 240, "no results", workers)
    workers.kill(doomed)
    assert handle.wait(timeout=300).status == BatchStatus.completed, workers.logs()
    assert assert_consistent(fault_settings, handle.id) == {"succeeded": 64}


def test_sigterm_ends_in_flight_chunks_once(fault_settings: Settings, workers: Workers, tmp_path: Path) -> None:
    """SIGTERM mid-batch: the worker takes no new chunk, ends those it runs (each item once, results
    in SQL), exits 0; the chunks it never started wait for the next worker, which finishes the batch."""
    worker = workers.start()
    handle = submit(fault_settings, docs(tmp_path, n=64), max_tokens=32)
    wait_until(lambda: running(fault_settings) > 0, 300, "no chunk running", workers)
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(timeout=180) == 0, workers.logs()
    with get_sessionmaker(fault_settings.database_url)() as session:
        after_stop = dict(session.execute(select(Item.id, Item.status).where(Item.batch_id == handle.id)).all())
    assert ItemStatus.running not in after_stop.values(), "a chunk was left running"
    ran = {i for i, status in after_stop.items() if status == ItemStatus.succeeded}
    assert ran, "the chunks in flight did not finish"
    assert ItemStatus.queued in after_stop.values(), "the worker kept taking chunks after SIGTERM"
    workers.start()
    assert handle.wait(timeout=300).status == BatchStatus.completed, workers.logs()
    assert assert_consistent(fault_settings, handle.id) == {ItemStatus.succeeded: 64}
    with get_sessionmaker(fault_settings.database_url)() as session:
        attempts = dict(session.execute(select(Item.id, Item.attempts).where(Item.id.in_(ran))).all())
    assert set(attempts.values()) == {1}, "an item finished before SIGTERM ran again"


def test_engine_process_killed(fault_settings: Settings, workers: Workers, tmp_path: Path) -> None:
    """SIGKILL vLLM's engine process only: the worker hands its chunks back and exits non-zero, so a
    supervisor restarts it; the restarted worker finishes the batch."""
    worker = workers.start("vllm")
    handle = submit(fault_settings, docs(tmp_path))
    wait_until(lambda: results(fault_settings) >= 8, 300, "no results", workers)
    engine_core = [p for p in psutil.Process(worker.pid).children(recursive=True)
                   if "resource_tracker" not in " ".join(p.cmdline())]
    assert engine_core, "vLLM's engine process was not found"
    for proc in engine_core:
        proc.kill()
    assert worker.wait(timeout=120) != 0, workers.logs()
    workers.start("vllm")
    assert handle.wait(timeout=300).status == BatchStatus.completed, workers.logs()
    assert assert_consistent(fault_settings, handle.id) == {"succeeded": 48}


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
        return subprocess.run(["redis-cli", "-p", str(self.port), "ping"], capture_output=True).returncode == 0

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
        group.start()
        handle = submit(settings, docs(tmp_path, 160))  # 20 chunks: most still wait in Redis at the restart
        wait_until(lambda: results(settings) >= 8, 240, "no results", group)
        server.stop()
        time.sleep(2)
        server.start()
        assert handle.wait(timeout=300).status == BatchStatus.completed, group.logs()
    finally:
        group.stop_all()
        server.stop()
    assert assert_consistent(settings, handle.id) == {"succeeded": 160}
    requeued = "reconciled" in group.logs(tail=10**9)
    assert requeued != appendonly, group.logs()  # without persistence the reconciler restored the rest


def test_postgres_drops_worker_connections(fault_settings: Settings, workers: Workers, tmp_path: Path) -> None:
    workers.start()
    handle = submit(fault_settings, docs(tmp_path))
    wait_until(lambda: results(fault_settings) >= 8, 240, "no results", workers)
    database = fault_settings.database_url.rsplit("/", 1)[1]
    with psycopg.connect(PG_ADMIN, autocommit=True) as admin:
        for _ in range(5):  # for a few seconds, every connection of the worker is cut
            admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                          "WHERE datname = %s AND pid <> pg_backend_pid()", [database])
            time.sleep(1)
    assert handle.wait(timeout=300).status == BatchStatus.completed, workers.logs()
    assert assert_consistent(fault_settings, handle.id) == {"succeeded": 48}


def test_poison_item_is_isolated(pg_url: str, redis_url: str, settings_for, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    settings = settings_for(pg_url, redis_url, **{**FAST_RECOVERY, "chunk_size": 64})
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


def test_cancel_mid_batch(fault_settings: Settings, workers: Workers, tmp_path: Path) -> None:
    workers.start()
    handle = submit(fault_settings, docs(tmp_path, 96))
    wait_until(lambda: results(fault_settings) >= 8, 240, "no results", workers)
    handle.cancel()
    info = handle.wait(timeout=120)
    assert info.status == BatchStatus.cancelled
    statuses = assert_consistent(fault_settings, handle.id)
    assert statuses["succeeded"] >= 8 and statuses.get("cancelled", 0) > 0
    assert statuses["succeeded"] + statuses["cancelled"] == 96


def test_expire_mid_batch(fault_settings: Settings, workers: Workers, tmp_path: Path) -> None:
    workers.start()
    warmup = submit(fault_settings, docs(tmp_path, 1))
    assert warmup.wait(timeout=240).status == BatchStatus.completed  # the engine is loaded
    handle = submit(fault_settings, docs(tmp_path, 192), max_tokens=32, completion_window="8s")
    info = handle.wait(timeout=180)
    assert info.status == BatchStatus.expired, workers.logs()
    wait_until(lambda: running(fault_settings) == 0, 120, "chunks running at expiry did not finish", workers)
    statuses = assert_consistent(fault_settings, handle.id)  # they kept their results
    assert statuses.get("expired", 0) > 0 and statuses.get("succeeded", 0) > 0, statuses
    out = tmp_path / "out.jsonl"
    counts = handle.results(out)
    assert (counts.succeeded, counts.failed, counts.pending) == (statuses["succeeded"], statuses["expired"], 0)
    assert '"batch_expired"' in out.read_text()


class _Exploit:
    """Unpickling this would create a file: proof that a pickled message was executed."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (os.system, (f"touch {self.marker}",))


def test_pickled_message_is_refused(fault_settings: Settings, workers: Workers, tmp_path: Path) -> None:
    from worker.celery_app import RUN_CHUNK, app, broker_options, queue_for

    marker = tmp_path / "unpickled"
    workers.start()
    handle = submit(fault_settings, docs(tmp_path, 8))
    assert handle.wait(timeout=240).status == BatchStatus.completed
    url, options = broker_options(fault_settings)
    with app.connection_for_write(url, transport_options=options) as conn, conn.Producer() as producer:
        producer.publish(pickle.dumps(((handle.id, [_Exploit(marker)]), {}, {})), serializer=None,
                         content_type="application/x-python-serialize", content_encoding="binary",
                         routing_key=queue_for(fault_settings.model), headers={"task": RUN_CHUNK, "id": "evil"})
    wait_until(lambda: "disallowed" in workers.logs().lower() or "refus" in workers.logs().lower(), 60,
               "the worker did not refuse the pickled message", workers)
    assert not marker.exists()
    assert results(fault_settings) == 8
