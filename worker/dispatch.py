"""Sending chunks of item ids to a model's queue: at submission, and again when the reconciler finds
items that SQL says should run but no message carries."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from itertools import islice
from typing import Any

from schema.settings import Settings
from worker.celery_app import RUN_CHUNK, broker_options, configure, queue_for


def batched(iterable: Iterable[Any], size: int) -> Iterator[list[Any]]:
    iterator = iter(iterable)
    while chunk := list(islice(iterator, size)):
        yield chunk


def send_chunks(settings: Settings, batch_id: str, model: str, item_ids: list[int]) -> int:
    """One task per `chunk_size` ids; returns the number of messages sent. Raises what kombu raises."""
    app = configure(settings)
    url, options = broker_options(settings)
    sent = 0
    # An explicit connection, not the app's pool: a process may talk to several brokers (tests do).
    with app.connection_for_write(url, transport_options=options) as conn, conn.Producer() as producer:
        for chunk in batched(item_ids, settings.chunk_size):
            app.send_task(RUN_CHUNK, args=[batch_id, chunk], queue=queue_for(model), producer=producer)
            sent += 1
    return sent
