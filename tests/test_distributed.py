"""The distributed deployment: real Redis, real PostgreSQL, a real `gristmill worker` subprocess, and a
separate submitting process, exactly as a user runs them."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import redis
from sqlalchemy import func, select

from schema.db import get_sessionmaker
from schema.outputs import OutputLine
from schema.queue import Queue, chunk_size, fitting_chunk_size, queue_for
from schema.tables import Result, Worker
from tests.conftest import REPO, cli_env, gristmill, messages_waiting

QUESTIONS = REPO / "examples" / "questions.jsonl"


def start_worker(settings, tmp_path: Path) -> subprocess.Popen[bytes]:  # type: ignore[no-untyped-def]
    log = open(tmp_path / "worker.log", "wb")  # noqa: SIM115  # the worker's stdout
    return subprocess.Popen([sys.executable, "-m", "producer.cli", "worker", "--engine", "vllm"],
                            env=cli_env(settings), cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT)


def stop_worker(proc: subprocess.Popen[bytes]) -> list[psutil.Process]:
    """SIGTERM (warm shutdown); returns any process of the worker's tree still alive afterwards."""
    children = psutil.Process(proc.pid).children(recursive=True) if proc.poll() is None else []
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=90)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    _, alive = psutil.wait_procs(children, timeout=30)
    for p in alive:
        p.kill()
    return alive


def test_worker_on_redis_and_postgres(pg_url: str, redis_url: str, settings_for, tmp_path: Path) -> None:
    settings = settings_for(pg_url, redis_url)
    worker = start_worker(settings, tmp_path)
    try:
        batch_id = gristmill("submit", str(QUESTIONS), settings=settings, cwd=tmp_path).stdout.strip()
        assert re.fullmatch(r"batch_[0-9a-f]{32}", batch_id)  # stdout is only the id

        status = json.loads(gristmill("status", batch_id, "--wait", "--json", settings=settings, cwd=tmp_path).stdout)
        assert status["status"] == "completed", (tmp_path / "worker.log").read_text()[-3000:]
        assert status["request_counts"] == {"total": 16, "completed": 16, "failed": 0, "cached": 0}
        assert status["created_at"] <= status["in_progress_at"] <= status["completed_at"]

        out, errors = tmp_path / "out.jsonl", tmp_path / "errors.jsonl"
        gristmill("results", batch_id, "-o", str(out), "--errors", str(errors), settings=settings, cwd=tmp_path)
        lines = [OutputLine.model_validate_json(line) for line in out.read_text().splitlines()]
        assert len(lines) == 16 and errors.read_text() == ""
        assert all(line.response and line.response.body.choices[0].message.content for line in lines)

        csv_out = tmp_path / "out.csv"
        gristmill("results", batch_id, "-o", str(csv_out), "--format", "csv", settings=settings, cwd=tmp_path)
        assert csv_out.read_text().splitlines()[0].startswith("custom_id,status,output_text")

        stats = json.loads(gristmill("stats", batch_id, "--json", settings=settings, cwd=tmp_path).stdout)
        assert stats["completion_tokens"] > 0 and stats["output_tokens_per_s"] > 0
        assert stats["workers"][0]["engine"] == "vllm"
        table = gristmill("status", settings=settings, cwd=tmp_path).stdout
        assert batch_id in table and "completed" in table

        _redeliver_first_chunk(settings, batch_id, pg_url)
        with get_sessionmaker(pg_url)() as session:
            assert session.scalar(select(func.count()).select_from(Result)) == 16
        # the worker recorded its engine's capacity (as its engine reported it), so producers cut chunks to fit
        capacity = vllm_capacity(pg_url)
        reported = re.search(r"runs (\d+) sequences at once", (tmp_path / "worker.log").read_text())
        assert capacity is not None and reported is not None, "the worker did not record its engine's capacity"
        assert capacity == int(reported[1]) > 1
        assert chunk_size(settings, settings.model) == fitting_chunk_size(capacity) == capacity // 2
    finally:
        leftovers = stop_worker(worker)
    assert worker.returncode == 0, (tmp_path / "worker.log").read_text()[-3000:]
    assert vllm_capacity(pg_url) is None, "a stopped worker stayed in the workers table"
    assert leftovers == [], "the vLLM engine process outlived its worker"


def vllm_capacity(url: str) -> int | None:
    with get_sessionmaker(url)() as session:
        return session.scalar(select(Worker.max_num_seqs).where(Worker.engine == "vllm"))


def _redeliver_first_chunk(settings, batch_id: str, pg_url: str) -> None:  # type: ignore[no-untyped-def]
    """Send a chunk that already ran once more, as a redelivery would, and wait until it is consumed."""
    from schema.tables import Item

    with get_sessionmaker(pg_url)() as session:
        ids = list(session.scalars(select(Item.id).where(Item.batch_id == batch_id).order_by(Item.line)))
    Queue(settings).send(batch_id, settings.model, "generate", [ids])
    client = redis.Redis.from_url(settings.broker_url)
    deadline = time.monotonic() + 60
    while messages_waiting(client, queue_for(settings.model, "generate")) or client.hlen("unacked"):
        assert time.monotonic() < deadline, "the duplicate chunk was never consumed"
        time.sleep(0.2)
