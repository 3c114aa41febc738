"""Shared fixtures: a fresh PostgreSQL database, SQLite file and Redis db per test, and settings over them.

The services are real and must be running (.ci/run starts them): a test that cannot reach one fails.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import redis

from schema.queue import broker_lists
from schema.settings import Settings

PG_ADMIN = os.environ.get("GRISTMILL_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_BASE = os.environ.get("GRISTMILL_TEST_REDIS", "redis://127.0.0.1:6379")
REPO = Path(__file__).resolve().parents[1]
MODEL = "smollm2-135m-instruct"
_redis_dbs = itertools.cycle(range(1, 16))

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may come from a model hub
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture
def pg_url() -> Iterator[str]:
    name = f"gm_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = PG_ADMIN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://") + f"/{name}"
    yield url
    from schema.db import get_engine

    get_engine(url).dispose()
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:  # FORCE: a worker subprocess may linger
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'gristmill.db'}"


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest) -> str:
    return request.getfixturevalue("sqlite_url" if request.param == "sqlite" else "pg_url")


@pytest.fixture
def redis_url() -> Iterator[str]:
    url = f"{REDIS_BASE}/{next(_redis_dbs)}"
    client = redis.Redis.from_url(url)
    client.flushdb()
    yield url
    client.flushdb()
    client.close()


def _engine_loop(engine: str) -> Iterator[tuple[Any, Any]]:
    from worker.engine_loop import EngineLoop
    from worker.engines import load_engine

    loaded = load_engine(MODEL, engine)
    loop = EngineLoop(loaded)
    yield loaded, loop
    loop.close()
    loaded.close()


@pytest.fixture(scope="session")
def transformers_loop() -> Iterator[tuple[Any, Any]]:
    """The transformers engine on the default model and its engine loop, shared by every test that runs
    chunks in process (worker.executor) and leaves the engine as it found it."""
    yield from _engine_loop("transformers")


@pytest.fixture(scope="session")
def vllm_loop() -> Iterator[tuple[Any, Any]]:
    """vLLM's generation engine on the default model and its loop, shared as transformers_loop is."""
    yield from _engine_loop("vllm")


@pytest.fixture
def settings_for(tmp_path: Path):  # type: ignore[no-untyped-def]
    def make(database_url: str, broker_url: str = "filesystem://", **extra: Any) -> Settings:
        return Settings(database_url=database_url, broker_url=broker_url, home=tmp_path / ".gristmill", **extra)

    return make


def cli_env(settings: Settings) -> dict[str, str]:
    """The environment a `gristmill` subprocess needs to run on these settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GRISTMILL_")}
    env.update({f"GRISTMILL_{key.upper()}": str(value) for key, value in settings.model_dump().items()
                if value is not None})
    env["PYTHONPATH"] = str(REPO)
    return env


def gristmill_in_terminal(*args: str, settings: Settings, cwd: Path, timeout: float = 600) -> tuple[int, str]:
    """Run the real CLI on a pseudo-terminal, as a user at a terminal sees it: its exit code, and what it
    wrote to the terminal (stdout and stderr together), with rich's colours and cursor moves removed."""
    import fcntl
    import pty
    import re
    import select
    import struct
    import termios

    master, child = pty.openpty()
    fcntl.ioctl(child, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 160, 0, 0))  # 160 columns: no wrapped lines
    proc = subprocess.Popen([sys.executable, "-m", "producer.cli", *args], env=cli_env(settings), cwd=cwd,
                            stdin=child, stdout=child, stderr=child, close_fds=True)
    os.close(child)
    seen, deadline = bytearray(), time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if select.select([master], [], [], 1.0)[0]:
                try:
                    data = os.read(master, 1 << 16)
                except OSError:  # EIO: every writer has closed the terminal
                    break
                if not data:
                    break
                seen += data
            elif proc.poll() is not None:
                break
        code = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
    return code, re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", seen.decode(errors="replace")).replace("\r\n", "\n")


def gristmill(*args: str, settings: Settings, cwd: Path, timeout: float = 600,
              check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run the real CLI in a subprocess, as a user would."""
    proc = subprocess.run([sys.executable, "-m", "producer.cli", *args], env=cli_env(settings), cwd=cwd,
                          capture_output=True, text=True, timeout=timeout, check=False)
    if check and proc.returncode != 0:
        raise AssertionError(f"gristmill {' '.join(args)} exited {proc.returncode}:\n{proc.stderr[-4000:]}")
    return proc


def messages_waiting(client: redis.Redis, queue: str) -> int:
    """Messages waiting in a queue: the sum over its Redis lists, one per priority level."""
    return sum(int(client.llen(key)) for key in broker_lists(queue))  # type: ignore[arg-type]
