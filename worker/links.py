"""A worker cut off from the database (a network partition, a failover) stops taking chunks, and takes
them again once the database answers, without a restart.

The chunks it already runs finish on the engine and keep retrying their writes for a bounded time
(worker.executor); a chunk that cannot claim its items goes back to the broker for other workers. The
broker's side is Celery's: without Redis the worker receives nothing, and it reconnects by itself.
Pausing uses Celery's own remote control (cancel_consumer / add_consumer, addressed to this worker),
which the worker's consumer thread carries out.
"""

from __future__ import annotations

import logging
import threading
import time

from celery import Celery
from sqlalchemy import text

from schema.db import get_engine
from schema.settings import Settings, redact

log = logging.getLogger(__name__)
PROBE_EVERY_S = (1.0, 15.0)  # the first pause between probes of the database, and the longest


class DatabaseLink:
    def __init__(self, settings: Settings, app: Celery, worker_id: str, queues: list[str]) -> None:
        self.settings, self.app, self.worker_id, self.queues = settings, app, worker_id, queues
        self._lock = threading.Lock()
        self._down = False

    @property
    def down(self) -> bool:
        return self._down

    def lost(self) -> None:
        """A chunk could not reach the database: take no more chunks until it answers (once per outage)."""
        with self._lock:
            if self._down:
                return
            self._down = True
        log.warning("cannot reach the database %s; taking no more chunks until it answers",
                    redact(self.settings.database_url))
        threading.Thread(target=self._until_back, name="database-link", daemon=True).start()

    def _until_back(self) -> None:
        pause, pause_max = PROBE_EVERY_S
        paused = self._consume(False)
        while not reachable(self.settings):
            time.sleep(pause)
            pause = min(2 * pause, pause_max)
            paused = paused or self._consume(False)
        while paused and not self._consume(True):  # the broker is away now: it delivers nothing meanwhile
            time.sleep(pause_max)
        with self._lock:
            self._down = False
        log.warning("the database %s answers again; taking chunks", redact(self.settings.database_url))

    def _consume(self, on: bool) -> bool:
        """Start or stop consuming this worker's queues; False when the broker did not confirm it."""
        command = self.app.control.add_consumer if on else self.app.control.cancel_consumer
        try:
            return all(command(queue, destination=[self.worker_id], reply=True, timeout=5) for queue in self.queues)
        except Exception as exc:  # noqa: BLE001  # the broker is away too
            log.warning("could not %s consuming (the broker is away too: %s)", "resume" if on else "pause",
                        type(exc).__name__)
            return False


def reachable(settings: Settings) -> bool:
    try:
        with get_engine(settings.database_url).connect() as conn:
            conn.execute(text("SELECT 1"))
        return True
    except Exception:  # noqa: BLE001  # any failure: still away
        return False
