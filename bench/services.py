"""What the benchmarks share: a fresh PostgreSQL database and Redis db, and a `gristmill worker` process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psutil
import psycopg
import redis

from schema.settings import Settings

REPO = Path(__file__).resolve().parents[1]
PG_ADMIN = os.environ.get("GRISTMILL_BENCH_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("GRISTMILL_BENCH_REDIS", "redis://127.0.0.1:6379/13")


@contextmanager
def fresh_services(workdir: Path, **settings: Any) -> Iterator[Settings]:
    """Settings over a new PostgreSQL database and an emptied Redis db, both removed afterwards."""
    name = f"gm_bench_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    client = redis.Redis.from_url(REDIS_URL)
    client.flushdb()
    db_url = PG_ADMIN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://") + f"/{name}"
    try:
        yield Settings(database_url=db_url, broker_url=REDIS_URL, home=workdir / ".gristmill", **settings)
    finally:
        client.flushdb()
        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def env_for(settings: Settings) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GRISTMILL_")}
    env.update({f"GRISTMILL_{key.upper()}": json.dumps(value) if isinstance(value, dict | list) else str(value)
                for key, value in settings.model_dump().items() if value is not None})  # None: the default
    env["PYTHONPATH"] = str(REPO)
    return env


@contextmanager
def worker_process(settings: Settings, engine: str, log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """A real `gristmill worker`; stopped with SIGTERM (warm shutdown) and its whole tree reaped."""
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "producer.cli", "worker", "--engine", engine,
                                 "--loglevel", "WARNING"], env=env_for(settings), cwd=REPO,
                                stdout=out, stderr=subprocess.STDOUT)
    try:
        yield proc
    finally:
        stop_tree(proc)


def stop_tree(proc: subprocess.Popen[bytes], grace_s: float = 60) -> None:
    """SIGTERM (a warm shutdown), then SIGKILL for whatever of the process tree is still there."""
    tree = psutil.Process(proc.pid).children(recursive=True) if proc.poll() is None else []
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    for child in psutil.wait_procs(tree, timeout=10)[1]:
        child.kill()


def wait_for(condition, timeout: float, what: str, poll_s: float = 0.05) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} did not happen within {timeout:.0f} s")
        time.sleep(poll_s)
