"""The worker process's long-lived state: settings, the loaded engine, the database. Loaded once."""

from __future__ import annotations

import math
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from schema.db import get_sessionmaker, prepare_schema
from schema.errors import EngineError
from schema.queue import FALLBACK_CHUNK_SIZE, Queue, fitting_chunk_size, make_app
from schema.settings import Settings
from worker.engine_loop import EngineLoop
from worker.engines import load_engine
from worker.engines.base import Engine
from worker.links import DatabaseLink


@dataclass
class Runtime:
    settings: Settings
    engine: Engine
    loop: EngineLoop  # the only thread that touches the engine
    queue: Queue  # for chunks this worker sends again (a split)
    host: str = field(default_factory=lambda: worker_id())  # who claimed an item, in SQL
    engine_start_s: float = 0.0
    engine_stop_s: float = 0.0  # set by stop()
    database: DatabaseLink | None = None  # a worker process's (worker.service); None where tests run chunks

    @property
    def inflight_chunks(self) -> int:
        """Chunks run at once: by default enough that the engine always has a full batch waiting, even
        when the chunks were cut to the fallback size before this worker reported its capacity."""
        if self.settings.inflight_chunks:
            return self.settings.inflight_chunks
        seqs = self.engine.max_num_seqs
        chunk = self.settings.chunk_size or min(fitting_chunk_size(seqs), FALLBACK_CHUNK_SIZE)
        return max(2, math.ceil(seqs / chunk) + 1)


def worker_id() -> str:
    """This worker process's name: its Celery hostname, its row in `workers`, its items' `worker_host`."""
    return f"gristmill-{os.getpid()}@{socket.gethostname()}"


_current: Runtime | None = None


def start(settings: Settings, model: str | None = None, engine: str | None = None,
          on_engine_failure: Callable[[], None] | None = None, needs: frozenset[str] | None = None) -> Runtime:
    """Prepare the database and load the engine (with the capabilities `needs` names, where the engine
    has variants); every task in this process then uses them."""
    global _current
    prepare_schema(settings.database_url)
    model = model or settings.model
    began = time.perf_counter()
    loaded = load_engine(model, engine or settings.engine, settings, needs)
    started_s = time.perf_counter() - began
    _current = Runtime(settings=settings, engine=loaded, loop=EngineLoop(loaded, on_engine_failure),
                       queue=Queue(settings, make_app(settings, model)), engine_start_s=started_s)
    return _current


def current() -> Runtime:
    if _current is None:
        raise EngineError("no engine is loaded in this process; start it with `gristmill worker`")
    return _current


def stop() -> None:
    global _current
    if _current is not None:
        began = time.perf_counter()
        if _current.loop.alive:
            _current.loop.close()
        _current.engine.close()
        _current.engine_stop_s = time.perf_counter() - began
        _current = None


def sessions(runtime: Runtime):  # type: ignore[no-untyped-def]
    return get_sessionmaker(runtime.settings.database_url)
