"""The pipeline's own cost: 100,000 items through Redis + PostgreSQL with an engine that does no inference.

Reports items/s for submission (parse, validate, insert, enqueue) and for execution (first item started
to last item finished, from SQL), and the worker's peak RSS and RSS growth over the run; then the peak
RSS of `gristmill submit` and `gristmill results` processes on the same file and batch, and how long
one reconciler pass takes with all those items in SQL (one batch done, one queued and past the grace,
its messages in Redis). With
`--workers N` it runs the batch again with N worker processes on the same queue and reports the
execution rate's ratio to one worker's, measured in the same run.
    python -m bench.overhead [--items N] [--workers N] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import psutil
import redis
from sqlalchemy import func, select, update

from bench.services import REPO, env_for, fresh_services, worker_process
from producer import api
from schema.db import db_now, get_sessionmaker, seconds_between
from schema.queue import Queue
from schema.states import ItemStatus
from schema.tables import Item
from worker.reconciler import reconcile

NULL_ENGINE = "bench.null_engine:NullEngine"


class RssSampler(threading.Thread):
    """Samples a process tree's resident memory every 50 ms."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.process, self.stopped = psutil.Process(pid), threading.Event()
        self.samples: list[float] = []

    def rss_mb(self) -> float:
        procs = [self.process, *self.process.children(recursive=True)]
        return sum(p.memory_info().rss for p in procs) / 2**20

    def run(self) -> None:
        while not self.stopped.wait(0.05):
            self.samples.append(self.rss_mb())


def cli_peak_rss_mb(settings: Any, *args: str) -> float:
    """Peak RSS of a `gristmill` command run to its end (its whole process tree, sampled every 50 ms)."""
    proc = subprocess.Popen([sys.executable, "-m", "producer.cli", *args], env=env_for(settings), cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    sampler = RssSampler(proc.pid)
    sampler.start()
    _, err = proc.communicate()
    sampler.stopped.set()
    sampler.join()
    if proc.returncode != 0:
        raise RuntimeError(f"gristmill {' '.join(args)} failed: {err.decode()[-2000:]}")
    return max(sampler.samples, default=float("nan"))


def postgres_cpu_s() -> float:
    """CPU seconds used so far by this host's PostgreSQL processes (the benchmark's database is local)."""
    total = 0.0
    for proc in psutil.process_iter(["name", "cpu_times"]):
        if proc.info["name"] in ("postgres", "postmaster") and proc.info["cpu_times"] is not None:
            total += proc.info["cpu_times"].user + proc.info["cpu_times"].system
    return total


def write_items(path: Path, n: int) -> Path:
    with open(path, "w") as f:
        f.writelines(f'{{"id": "doc-{i}", "text": "Document number {i}: a short text to process."}}\n' for i in range(n))
    return path


def measure(n: int, workdir: Path, workers: int = 1) -> dict[str, Any]:
    with fresh_services(workdir, max_items_per_batch=max(n, 100_000)) as settings, ExitStack() as stack:
        procs = [stack.enter_context(worker_process(settings, NULL_ENGINE, workdir / f"worker{i}.log"))
                 for i in range(workers)]
        warmup = write_items(workdir / "warmup.jsonl", 1000 * workers)
        api.submit(warmup, settings=settings).wait(timeout=300)  # tables, connections, code paths warm
        sampler = RssSampler(procs[0].pid)  # the first worker's
        rss_start = sampler.rss_mb()
        sampler.start()
        path = write_items(workdir / "items.jsonl", n)
        pg_cpu = postgres_cpu_s()
        began = time.perf_counter()
        handle = api.submit(path, settings=settings)
        submit_s = time.perf_counter() - began
        handle.wait(poll_s=0.1, timeout=3600)
        sampler.stopped.set()
        sampler.join()
        rss_end = sampler.rss_mb()
        with get_sessionmaker(settings.database_url)() as session:
            first, last = session.execute(select(func.min(Item.started_at), func.max(Item.finished_at))
                                          .where(Item.batch_id == handle.id)).one()
        execute_s = seconds_between(first, last) or float("nan")
        pg_cpu = postgres_cpu_s() - pg_cpu  # submission and execution (the ANALYZE and the claims included)
        info = handle.status()
        export_rss = cli_peak_rss_mb(settings, "results", handle.id, "-o", str(workdir / "out.jsonl"))
        # The same file again, for a model no worker serves: it stays queued, only the submission is measured
        # (and what its messages take in Redis).
        broker = redis.Redis.from_url(settings.broker_url)
        redis_before = broker.info("memory")["used_memory"]
        submit_rss = cli_peak_rss_mb(settings, "submit", str(path), "--model", "nobody-serves-this", "--no-cache")
        redis_mb = (broker.info("memory")["used_memory"] - redis_before) / 2**20
        reconcile_s = reconcile_pass_s(settings)
    return {
        "items": n, "workers": workers, "succeeded": info.request_counts.completed, "submit_s": submit_s, "execute_s": execute_s,
        "submit_items_per_s": n / submit_s, "execute_items_per_s": n / execute_s,
        "worker_rss_start_mb": rss_start, "worker_rss_peak_mb": max(sampler.samples, default=rss_end),
        "worker_rss_end_mb": rss_end, "worker_rss_growth_mb": rss_end - rss_start,
        "submit_peak_rss_mb": submit_rss, "export_peak_rss_mb": export_rss,
        "redis_mb_per_million_queued": redis_mb * 1e6 / n,
        # PostgreSQL's CPU seconds per item (submitted and run) x 10,000 items/s: the cores it would use
        "postgres_cores_per_10k_items_s": pg_cpu / n * 10_000,
        "reconcile_pass_s": reconcile_s,
    }


def reconcile_pass_s(settings: Any) -> float:
    """One reconciler pass once every queued item is past the grace: it reads a page of them and the
    broker's messages, and finds each carried (the worker's own passes do the same every 30 s)."""
    with get_sessionmaker(settings.database_url)() as session, session.begin():
        session.execute(update(Item).where(Item.status == ItemStatus.queued)
                        .values(enqueued_at=db_now(session, -2 * settings.requeue_grace_s)))
    began = time.perf_counter()
    report = reconcile(settings, Queue(settings))
    if report.requeued:
        raise RuntimeError(f"the reconciler requeued items whose messages are in Redis: {report}")
    return time.perf_counter() - began


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--workers", type=int, default=1, help="also run with this many worker processes")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="gristmill-overhead-") as tmp:
        report = measure(args.items, Path(tmp))
    if args.workers > 1:
        with tempfile.TemporaryDirectory(prefix="gristmill-overhead-") as tmp:
            scaled = measure(args.items, Path(tmp), args.workers)
        report[f"execute_items_per_s_{args.workers}_workers"] = scaled["execute_items_per_s"]
        report[f"scale_{args.workers}_workers"] = scaled["execute_items_per_s"] / report["execute_items_per_s"]
    targets = {"submit_items_per_s": 50_000, "execute_items_per_s": 10_000}
    print(f"\n{'metric':<24} {'value':>12} {'target':>10}")
    for key in ("submit_items_per_s", "execute_items_per_s"):
        print(f"{key:<24} {report[key]:>12.0f} {'>= ' + str(targets[key]):>10}")
    for key in (k for k in report if k.startswith(("execute_items_per_s_", "scale_"))):
        print(f"{key:<24} {report[key]:>12.2f} {'>= 1.6' if key.startswith('scale_') else '':>10}")
    print(f"{'worker_rss_peak_mb':<24} {report['worker_rss_peak_mb']:>12.1f}")
    print(f"{'worker_rss_growth_mb':<24} {report['worker_rss_growth_mb']:>12.1f} {'<= 50':>10}")
    for key in ("submit_peak_rss_mb", "export_peak_rss_mb"):
        print(f"{key:<24} {report[key]:>12.1f} {'<= 300':>10}")
    for key in ("redis_mb_per_million_queued", "postgres_cores_per_10k_items_s", "reconcile_pass_s"):
        print(f"{key:<24} {report[key]:>12.2f}")
    print(f"succeeded {report['succeeded']}/{report['items']}", file=sys.stderr)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
