"""Runs a Celery worker in this process with the engine loaded once, before the first task arrives."""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
from collections.abc import Callable

from schema.settings import Settings
from worker import runtime
from worker.celery_app import configure, queue_for

log = logging.getLogger(__name__)


def serve(settings: Settings, *, model: str | None = None, engine: str | None = None,
          loglevel: str = "INFO", stop_when: Callable[[], bool] | None = None) -> runtime.Runtime:
    """Load the engine, then consume this model's queue until SIGTERM/SIGINT (or `stop_when()` is true).

    The pool is `solo`: tasks run in this process, next to the engine, and vLLM may start its own
    engine process (a prefork child is a daemon and cannot).
    """
    model = model or settings.model
    rt = runtime.start(settings, model, engine)
    log.info("engine %s loaded %s in %.1f s", rt.engine.name, model, rt.engine_start_s)
    app = configure(settings.model_copy(update={"model": model}))
    worker = app.Worker(
        pool="solo", concurrency=1, queues=[queue_for(model)], loglevel=loglevel,
        hostname=f"gristmill-{os.getpid()}@{socket.gethostname()}",
        without_mingle=True, without_gossip=True,
    )
    if stop_when is not None:
        threading.Thread(target=_stop_when, args=(stop_when,), daemon=True).start()
    try:
        worker.start()
    finally:
        runtime.stop()
    return rt


def _stop_when(condition: Callable[[], bool], poll_s: float = 0.5) -> None:
    """Ask for a warm shutdown (the same path as SIGTERM) once the condition holds."""
    stop = threading.Event()
    while not stop.wait(poll_s):
        if condition():
            os.kill(os.getpid(), signal.SIGTERM)
            return
