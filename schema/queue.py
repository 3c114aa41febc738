"""The queue contract both sides share: task and queue names, the Celery app built from settings, and
sending chunks of item ids. Nothing happens at import: an app exists once `Queue(settings)` is made.

A producer sends chunks at submission; a worker sends them again when it splits a chunk, and the
reconciler when SQL says items should run but no message carries them. The task itself is bound to
the app by the worker (worker.tasks); a producer sends it by name and needs no engine code.
"""

from __future__ import annotations

import re
import ssl
from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager
from itertools import islice
from typing import Any

from celery import Celery
from kombu import Connection

from schema import workers
from schema.errors import ConfigError
from schema.settings import EMBEDDED_BROKER, Settings

RUN_CHUNK = "gristmill.run_chunk"
FALLBACK_CHUNK_SIZE = 64  # before any worker of the model has reported its engine's capacity

# Priorities: a batch's level, 0 (lowest) to 9 (most urgent); the names are the usual three. Redis keeps
# a list per level for each queue (kombu's priority_steps) and workers read the most urgent list first.
PRIORITIES = {"low": 2, "normal": 5, "high": 8}
DEFAULT_PRIORITY = PRIORITIES["normal"]
# A batch's first chunks go at its level, the rest one level lower: a small batch submitted behind a
# huge one of the same priority starts after the chunks already running, not after the huge one. The
# names are 3 levels apart, so a demoted chunk never passes the next name down.
FULL_PRIORITY_CHUNKS = 4
PRIORITY_SEP = "\x06\x16"  # kombu's: a queue's list for level L is queue + PRIORITY_SEP + str(9 - L)


# Chunk messages per Redis round trip: each send_task was its own LPUSH (782 for 100,000 items, 0.49-0.65 s
# here; 0.42 s pipelined, the rest is Celery building the messages). A failed flush raises to the sender as
# a failed send did; what it held is still queued in SQL, and the reconciler sends it again.
PUBLISH_BATCH = 500


def parse_priority(value: str | int) -> int:
    """`high`, `normal`, `low`, or a level 0-9 (9 most urgent)."""
    level = PRIORITIES.get(str(value).strip().lower())
    if level is None and str(value).strip().isdigit():
        level = int(value)
    if level is None or not 0 <= level <= 9:
        raise ConfigError(f"priority must be high, normal, low or a level 0-9 (9 most urgent), not {value!r}")
    return level


def broker_lists(queue: str) -> list[str]:
    """The Redis lists holding a queue's messages, one per priority level."""
    return [queue] + [f"{queue}{PRIORITY_SEP}{step}" for step in range(1, 10)]


def queue_for(model: str, kind: str) -> str:
    """A queue per model and task kind, so a worker only takes work its engine can run: the model it has
    loaded, and a kind its engine serves (a vLLM generation engine does not embed, a pooling one only does)."""
    return "gristmill." + re.sub(r"[^A-Za-z0-9_.\-]+", "_", model).strip("_")[-180:] + "." + kind


def batched(iterable: Iterable[Any], size: int) -> Iterator[list[Any]]:
    iterator = iter(iterable)
    while chunk := list(islice(iterator, size)):
        yield chunk


def fitting_chunk_size(max_num_seqs: int) -> int:
    """Half of what the engine runs at once: two chunks fill it while a third is fetched or written."""
    return max(1, max_num_seqs // 2)


def chunk_size(settings: Settings, model: str) -> int:
    """GRISTMILL_CHUNK_SIZE when set; else sized to the live workers' engines for this model."""
    if settings.chunk_size:
        return settings.chunk_size
    capacity = workers.capacity(settings, model)
    return fitting_chunk_size(capacity) if capacity else FALLBACK_CHUNK_SIZE


# A host cut off from Redis must find out in seconds: without a socket timeout a publish on a dead
# connection waits for ever; kombu drops a consumer's connection whose BRPOP reply is overdue by the
# health-check interval, and Celery then reconnects.
REDIS_NETWORK_TIMEOUTS = {"socket_timeout": 30, "socket_connect_timeout": 10, "socket_keepalive": True,
                          "health_check_interval": 10}


def broker_options(settings: Settings) -> tuple[str, dict[str, Any]]:
    """The broker URL and its transport options (no side effects; see `prepare_broker`)."""
    if settings.broker_url != EMBEDDED_BROKER:
        # Redelivery of an unacked message (a dead worker's prefetched chunk) happens only after this long:
        # longer than any chunk runs. Workers look for such messages every 10 s (kombu's
        # unacked_restore_interval); throttle 1: at every look, not every tenth, or they come back up to
        # 100 s late.
        return settings.broker_url, {"visibility_timeout": settings.visibility_timeout_s,
                                     "unacked_restore_throttle": 1, "priority_steps": list(range(10)),
                                     "sep": PRIORITY_SEP, **REDIS_NETWORK_TIMEOUTS}
    folder = settings.broker_folder.resolve()
    options = {
        "data_folder_in": str(folder / "queue"),
        "data_folder_out": str(folder / "queue"),
        "control_folder": str(folder / "control"),
        "polling_interval": 0.2,
    }
    return EMBEDDED_BROKER, options


def prepare_broker(settings: Settings) -> None:
    """The embedded broker's folders must exist before anyone sends or consumes."""
    if settings.broker_url == EMBEDDED_BROKER:
        for sub in ("queue", "control"):
            (settings.broker_folder / sub).mkdir(parents=True, exist_ok=True)


def tls_options(url: str) -> dict[str, Any] | None:
    """`rediss://` URLs: verify the server's certificate unless the URL itself says otherwise."""
    if url.startswith("rediss://") and "ssl_cert_reqs" not in url:
        return {"ssl_cert_reqs": ssl.CERT_REQUIRED}
    return None


def make_app(settings: Settings, model: str | None = None) -> Celery:
    """A Celery app for these settings: JSON only, late acks, the model's queue by default."""
    url, options = broker_options(settings)
    app = Celery("gristmill", set_as_current=False)
    app.conf.update(
        broker_use_ssl=tls_options(url),
        broker_url=url,
        broker_transport_options=options,
        broker_connection_retry_on_startup=True,
        result_backend=None,
        task_ignore_result=True,
        task_serializer="json",
        accept_content=["json"],  # a pickled message is refused, never executed
        result_accept_content=["json"],
        task_acks_late=True,  # a chunk is acked only after its results are in SQL
        task_reject_on_worker_lost=True,  # a killed worker's chunk goes back to the queue
        worker_prefetch_multiplier=1,
        worker_cancel_long_running_tasks_on_connection_loss=True,
        task_default_queue=queue_for(model or settings.model, "generate"),  # every send names its queue
        worker_hijack_root_logger=False,
        worker_redirect_stdouts=False,
    )
    return app


class Queue:
    """Sends chunk tasks to the model queues of one broker; build one per process and settings."""

    def __init__(self, settings: Settings, app: Celery | None = None) -> None:
        self.settings = settings
        self.app = app or make_app(settings)
        prepare_broker(settings)

    def connection(self) -> AbstractContextManager[Connection]:
        # An explicit connection, not the app's pool: a process may talk to several brokers (tests do).
        url, options = broker_options(self.settings)
        return self.app.connection_for_write(url, transport_options=options)  # type: ignore[no-any-return]

    def send_chunks(self, batch_id: str, model: str, kind: str, item_ids: Iterable[int],
                    priority: int = DEFAULT_PRIORITY) -> int:
        """One task per chunk of ids, sized for the model's engines; returns the number of messages sent.
        Raises what kombu raises."""
        return self.send(batch_id, model, kind, batched(item_ids, chunk_size(self.settings, model)), priority)

    def send(self, batch_id: str, model: str, kind: str, chunks: Iterable[list[int]],
             priority: int = DEFAULT_PRIORITY) -> int:
        """One task per chunk as given (a split or a redelivery keeps its own cut), the first
        FULL_PRIORITY_CHUNKS at `priority` and the rest one level lower. (The embedded broker, one
        process's, has no priorities: it delivers in order.) On Redis the messages go in pipelined
        batches (kombu's Producer.batch): one round trip per PUBLISH_BATCH messages, not one each."""
        sent = 0
        with self.connection() as conn, conn.Producer() as producer, producer.batch(PUBLISH_BATCH):
            for chunk in chunks:
                level = priority if sent < FULL_PRIORITY_CHUNKS else max(priority - 1, 0)
                # A short argsrepr: Celery would otherwise repr every id into the message headers.
                self.app.send_task(RUN_CHUNK, args=[batch_id, chunk], queue=queue_for(model, kind), producer=producer,
                                   priority=9 - level, argsrepr=f"[{batch_id!r}, <{len(chunk)} item ids from {chunk[0]}>]")
                sent += 1
        return sent
