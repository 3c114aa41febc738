"""Sending chunks of item ids to a model's queue: at submission, and again when the reconciler finds
items that SQL says should run but no message carries."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from itertools import islice
from typing import Any

from schema.settings import Settings
from worker import registry
from worker.celery_app import RUN_CHUNK, broker_options, configure, queue_for

FALLBACK_CHUNK_SIZE = 64  # before any worker of the model has reported its engine's capacity


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
    capacity = registry.capacity(settings, model)
    return fitting_chunk_size(capacity) if capacity else FALLBACK_CHUNK_SIZE


def send_chunks(settings: Settings, batch_id: str, model: str, item_ids: list[int]) -> int:
    """One task per chunk of ids; returns the number of messages sent. Raises what kombu raises."""
    size = chunk_size(settings, model)
    app = configure(settings)
    url, options = broker_options(settings)
    sent = 0
    # An explicit connection, not the app's pool: a process may talk to several brokers (tests do).
    with app.connection_for_write(url, transport_options=options) as conn, conn.Producer() as producer:
        for chunk in batched(item_ids, size):
            # A short argsrepr: Celery would otherwise repr every id into the message headers.
            app.send_task(RUN_CHUNK, args=[batch_id, chunk], queue=queue_for(model), producer=producer,
                          argsrepr=f"[{batch_id!r}, <{len(chunk)} item ids from {chunk[0]}>]")
            sent += 1
    return sent
