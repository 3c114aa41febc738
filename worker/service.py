"""Runs a Celery worker in this process with the engine loaded once, before the first task arrives."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable

from schema import workers
from schema.errors import EngineError
from schema.queue import Queue, queue_for
from schema.settings import Settings, redact
from worker import metrics, runtime, tasks
from worker.kinds import RUNNERS, served_kinds
from worker.links import DatabaseLink
from worker.reconciler import reconcile

log = logging.getLogger(__name__)


def serve(settings: Settings, *, model: str | None = None, engine: str | None = None, task: str | None = None,
          loglevel: str = "INFO", stop_when: Callable[[], bool] | None = None,
          metrics_port: int | None = None, on_ready: Callable[[], None] | None = None) -> runtime.Runtime:
    """Load the engine, then consume the model's queues of every task kind the engine serves until
    SIGTERM/SIGINT (or `stop_when()` is true). `on_ready()` runs once the engine is loaded and this
    worker is registered with its capacity, before it consumes.

    The pool is `threads`: tasks run in this process next to the engine (vLLM may start its engine
    process; a prefork child is a daemon and cannot), several chunks at once, all fed to the one
    engine loop so it never drains between chunks.
    """
    model = model or settings.model
    if metrics_port:
        metrics.serve(metrics_port)  # before the engine loads: a scrape sees the worker while it starts
    needs = RUNNERS[task].needs[0] if task else None  # the engine variant for this task, where it matters
    rt = runtime.start(settings, model, engine, on_engine_failure=_shut_down, needs=needs)
    kinds = served_kinds(rt.engine)
    if not kinds:
        runtime.stop()
        raise EngineError(f"the {rt.engine.name} engine serves no task kind (capabilities: "
                          f"{', '.join(sorted(rt.engine.capabilities)) or 'none'})")
    log.info("engine %s loaded %s in %.1f s; it runs %d sequences at once; %d chunks in flight; serves %s",
             rt.engine.name, model, rt.engine_start_s, rt.engine.max_num_seqs, rt.inflight_chunks, ", ".join(kinds),
             extra={"worker": rt.host, "engine": rt.engine.name, "model": model, "engine_start_s": rt.engine_start_s})
    app = rt.queue.app
    tasks.bind(app)
    worker_id = rt.host
    queues = [queue_for(model, kind) for kind in kinds]
    worker = app.Worker(
        pool="threads", concurrency=rt.inflight_chunks, queues=queues, loglevel=loglevel,
        hostname=worker_id, without_mingle=True, without_gossip=True,
        quiet=stop_when is not None or loglevel not in ("DEBUG", "INFO"),  # no banner inside a command (`run`)
    )
    rt.database = DatabaseLink(settings, app, worker_id, queues)
    workers.register(settings, worker_id, model, rt.engine.name, rt.engine.max_num_seqs, kinds)
    try:
        if on_ready is not None:  # before the reconciler's first pass, which would resend what it sends
            on_ready()
        threading.Thread(target=_reconcile_every, args=(settings, rt.queue, worker_id), name="reconciler",
                         daemon=True).start()
        if stop_when is not None:
            threading.Thread(target=_stop_when, args=(stop_when,), daemon=True).start()
        worker.start()
        if not rt.loop.alive:  # exit non-zero so a supervisor restarts the worker with a fresh engine
            raise EngineError("the engine failed; in-flight chunks went back to the queue")
    finally:
        workers.unregister(settings, worker_id)
        runtime.stop()
    return rt


def _shut_down() -> None:
    """Warm shutdown, the same path as SIGTERM: running chunks hand their items back and retry."""
    os.kill(os.getpid(), signal.SIGTERM)


FIRST_PASS_AFTER_S = 5


def _reconcile_every(settings: Settings, queue: Queue, worker_id: str) -> None:
    """At start and then periodically: say this worker is alive and how busy, requeue what no one holds,
    expire overdue batches."""
    last: tuple[float, float] | None = None  # (busy seconds, monotonic time) at the previous heartbeat
    resume_after = 0  # where the next pass's scan for lost messages goes on
    try:
        workers.heartbeat(settings, worker_id, 0, None)  # seen at once, by submissions and the dashboard
    except Exception:
        log.exception("the first heartbeat failed")
    # The consumer starts with this thread: give it a moment to claim the messages it takes. A message
    # taken but not yet claimed is in no queue (the embedded broker shows none once taken), and a first
    # pass right now would resend its items (seen after an engine start longer than the requeue grace).
    time.sleep(min(settings.reconcile_interval_s, FIRST_PASS_AFTER_S))
    while True:
        try:
            chunks, busy = metrics.activity()
            now = time.monotonic()
            fraction = min(1.0, (busy - last[0]) / (now - last[1])) if last and now > last[1] else None
            last = busy, now
            workers.heartbeat(settings, worker_id, chunks, fraction)
            report = reconcile(settings, queue, resume_after)
            resume_after = report.resume_after
            metrics.REQUEUES.inc(report.requeued)
        except Exception as exc:  # noqa: BLE001  # the broker or database is away; the next round tries again
            log.warning("heartbeat and reconciling failed (%s: %s); trying again in %d s", type(exc).__name__,
                        redact(str(exc)).splitlines()[0] if str(exc) else "", settings.reconcile_interval_s)
        time.sleep(settings.reconcile_interval_s)


def _stop_when(condition: Callable[[], bool], poll_s: float = 0.5) -> None:
    """Ask for a warm shutdown (the same path as SIGTERM) once the condition holds."""
    while not condition():
        time.sleep(poll_s)
    _shut_down()
