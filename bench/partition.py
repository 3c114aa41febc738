"""What a network partition costs: a 2,000-item batch on two workers, each on its own simulated host
(tests/hosts.py: a network namespace per worker, a link each to Redis and to PostgreSQL), run once with
no fault and once with host 1 cut off from both when 30% of the items are done (healed once the batch
has completed). The engine does no inference but is paced like a small model
(tests/fault_engine.PacedEngine: 4 requests every 30 ms), so engine time is what it would be.

Reports, for each run: seconds to completion, items computed more than once, extra engine runs, extra
engine seconds (extra runs x the no-fault run's engine seconds per item), and the results host 1
computed but had refused (fenced off) or abandoned.
    sudo python -m bench.partition [--items 2000] [--at 0.3] [--lease 15] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from sqlalchemy import func, select

from producer import api
from schema.db import get_sessionmaker, prepare_schema
from schema.settings import Settings
from schema.states import BatchStatus
from schema.tables import Batch, EngineBatch, Item
from tests.conftest import cli_env
from tests.hosts import Host, Site

PACED = "tests.fault_engine:PacedEngine"


def settings_on(site: Site, where: tuple[str, int], host: Host | None, lease_s: int, home: Path) -> Settings:
    database_url, broker_url = site.urls(*where, host)
    return Settings(database_url=database_url, broker_url=broker_url, home=home, chunk_size=50, inflight_chunks=2,
                    chunk_time_limit_s=lease_s, visibility_timeout_s=max(120, 2 * lease_s), reconcile_interval_s=2,
                    requeue_grace_s=3, write_retry_s=600)


def run(site: Site, n: int, cut_at: float | None, lease_s: int, workdir: Path, redis_db: int) -> dict[str, Any]:
    """One batch on two fresh workers; host 1 cut off when `cut_at` of the items are done (None: no fault)."""
    database = site.database()
    where = (database, redis_db)
    own = settings_on(site, where, None, lease_s, workdir / "site")
    prepare_schema(own.database_url)
    procs, logs = [], []
    for host in site.hosts:
        logs.append(workdir / f"{database}-host{host.index}.log")
        argv, env = host.command([sys.executable, "-m", "producer.cli", "worker", "--engine", PACED],
                                 cli_env(settings_on(site, where, host, lease_s, workdir / f"host{host.index}")))
        procs.append(subprocess.Popen(argv, env=env, stdout=open(logs[-1], "wb"), stderr=subprocess.STDOUT))  # noqa: SIM115
    try:
        _wait(lambda: _live_workers(own) == 2, 180, "the workers did not start")
        path = workdir / f"{database}.jsonl"
        path.write_text("".join(json.dumps({"id": f"d{i}", "text": f"Document {i} of the partition run."}) + "\n"
                                for i in range(n)))
        began = time.monotonic()
        handle = api.submit(path, settings=own)
        cut = None
        if cut_at is not None:
            _wait(lambda: _succeeded(own, handle.id) >= cut_at * n, 300, "the batch did not get going")
            site.hosts[0].cut()
            cut = _succeeded(own, handle.id)
        _wait(lambda: handle.status().status == BatchStatus.completed, 900, "the batch did not complete")
        seconds = time.monotonic() - began
        site.hosts[0].heal()
        time.sleep(lease_s + 5 if cut_at is not None else 0)  # host 1's writes come back and are refused
        return {**_counts(own, handle.id), "seconds": seconds, "cut_after_items": cut,
                "results_refused": _discarded(logs[0]), "results_abandoned": _abandoned(logs[0])}
    finally:
        site.hosts[0].heal()
        for proc in procs:
            proc.kill()
            proc.wait()


def _live_workers(settings: Settings) -> int:
    from schema.workers import live

    return len(live(settings))


def _succeeded(settings: Settings, batch_id: str) -> int:
    with get_sessionmaker(settings.database_url)() as session:
        return session.scalar(select(Batch.succeeded).where(Batch.id == batch_id)) or 0


def _counts(settings: Settings, batch_id: str) -> dict[str, Any]:
    with get_sessionmaker(settings.database_url)() as session:
        attempts = list(session.scalars(select(Item.attempts).where(Item.batch_id == batch_id)))
        engine_s, items = session.execute(select(func.sum(EngineBatch.engine_s), func.sum(EngineBatch.n_items))
                                          .where(EngineBatch.batch_id == batch_id)).one()
    return {"items": len(attempts), "computed_more_than_once": sum(1 for a in attempts if a > 1),
            "extra_runs": sum(a - 1 for a in attempts if a > 1), "engine_s_per_item": (engine_s or 0) / max(items or 1, 1)}


def _discarded(log: Path) -> int:
    return sum(int(m) for m in re.findall(r"(\d+) of \d+ results discarded", log.read_text(errors="replace")))


def _abandoned(log: Path) -> int:
    return sum(int(m) for m in re.findall(r"(\d+) results abandoned", log.read_text(errors="replace")))


def _wait(condition, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise SystemExit(f"bench.partition: {what} within {timeout:.0f} s")
        time.sleep(0.2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=2000)
    parser.add_argument("--at", type=float, default=0.3, help="cut host 1 off when this share of items is done")
    parser.add_argument("--lease", type=int, default=15, help="GRISTMILL_CHUNK_TIME_LIMIT_S: the items' lease")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    site = Site(hosts=2)
    try:
        with tempfile.TemporaryDirectory(prefix="gm-partition-") as folder:
            baseline = run(site, args.items, None, args.lease, Path(folder), redis_db=1)
            faulted = run(site, args.items, args.at, args.lease, Path(folder), redis_db=2)
    finally:
        site.close()
    per_item = baseline["engine_s_per_item"]
    for result in (baseline, faulted):
        result["extra_engine_s"] = result["extra_runs"] * per_item
    report = {"items": args.items, "cut_at": args.at, "lease_s": args.lease, "no_fault": baseline,
              "partitioned": faulted, "completion_ratio": faulted["seconds"] / baseline["seconds"]}
    print(f"{args.items} items, 2 workers on simulated hosts, chunks of 50, 2 in flight each; lease {args.lease} s; "
          f"host 1 cut off from Redis and PostgreSQL at {args.at:.0%}")
    print(f"{'run':<14}{'seconds':>9}{'computed >1x':>14}{'extra runs':>12}{'extra engine s':>16}"
          f"{'refused':>9}{'abandoned':>11}")
    for name, r in (("no fault", baseline), ("partitioned", faulted)):
        print(f"{name:<14}{r['seconds']:>9.1f}{r['computed_more_than_once']:>14}{r['extra_runs']:>12}"
              f"{r['extra_engine_s']:>16.2f}{r['results_refused']:>9}{r['results_abandoned']:>11}")
    print(f"time to completion, partitioned / no fault: {report['completion_ratio']:.2f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
