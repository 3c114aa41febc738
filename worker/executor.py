"""Runs one chunk: claim its items, hand them to the engine, write the outcomes, move the batch on.

Failure handling, driven by what SQL keeps per item (attempts, and whether the last run was interrupted):
- a chunk holding an item whose last run failed or never ended (its worker or engine died, or the
  engine raised) is split in two and sent again, so a poison item ends up alone;
- an item alone in its chunk that ran before has the engine to itself (a failing engine fails every
  chunk in it, so a poison's neighbours fail beside it); alone, interrupted and past `max_attempts`
  runs, it is marked failed with its last error;
- writing results retries with backoff when the database drops the connection or cannot be reached
  (the results are in memory, nothing is acknowledged before they are in SQL), for `write_retry_s`;
  then the worker abandons them and its items go back to the queue when their lease ends. A worker that
  cannot reach the database takes no chunks meanwhile (worker.links).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import TypeVar

from sqlalchemy import select
from sqlalchemy.orm import Session

from schema import cache, kinds, store, windows
from schema.db import is_disconnect, utcnow
from schema.errors import ChunkTimeout, ErrorCode
from schema.queue import DEFAULT_PRIORITY
from schema.states import ItemStatus
from schema.tables import Batch
from worker import metrics
from worker.kinds import runner_for
from worker.kinds.base import Runner
from worker.runtime import Runtime, sessions

log = logging.getLogger(__name__)
T = TypeVar("T")
WRITE_RETRY_PAUSES_S = (0.5, 15.0)  # the first pause between attempts to write results, and the longest


class ResultsAbandoned(Exception):
    """The database stayed out of reach for `write_retry_s`: this chunk's results are dropped."""


def run_chunk(runtime: Runtime, batch_id: str, item_ids: list[int]) -> dict[str, int]:
    make_session = sessions(runtime)
    settings = runtime.settings
    with make_session() as session, session.begin():
        kind, priority = _route(session, batch_id)
        claimed = store.claim(session, batch_id, item_ids, runtime.host, settings.chunk_time_limit_s)
        # answered since submission by an identical request? (no query for a batch without the cache)
        answered = cache.lookup(session, [c.cache_key for c in claimed if c.cache_key])
    if not claimed:  # a duplicate delivery, or the batch was cancelled: nothing to do
        return {"claimed": 0, "succeeded": 0, "failed": 0}
    claimed = _answer_from_cache(runtime, batch_id, claimed) if answered else claimed
    if not claimed:
        return {"claimed": 0, "succeeded": 0, "failed": 0, "cached": len(item_ids)}
    runner = runner_for(kind or "", runtime.engine)
    if runner is None:  # no retry can help: this engine lacks the capability the kind needs
        engine = runtime.engine
        give_up(runtime, batch_id, claimed, f"the {engine.name} engine of {engine.model_name} "
                f"cannot run task kind {kind!r}", ErrorCode.unsupported)
        return {"claimed": len(claimed), "succeeded": 0, "failed": len(claimed)}
    if len(claimed) > 1 and any(c.interrupted for c in claimed):
        return _split(runtime, batch_id, runner.kind, priority, claimed)
    if claimed[0].interrupted and claimed[0].attempts > settings.max_attempts:  # a poison item, alone
        give_up(runtime, batch_id, claimed[:1], f"gave up after {settings.max_attempts} attempts; "
                                                    f"last error: {claimed[0].last_error}",
                claimed[0].error_code or ErrorCode.engine_error)
        return {"claimed": 1, "succeeded": 0, "failed": 1}
    try:
        with _turn(runtime, claimed):
            outcomes, started, finished = runner.run(runtime, claimed)
    except Exception as exc:  # the engine failed as a whole: give the chunk back, the task retries it
        with make_session() as session, session.begin():
            code = ErrorCode.timeout if isinstance(exc, ChunkTimeout) else ErrorCode.engine_error
            store.release(session, claimed, f"{type(exc).__name__}: {exc}", code=code)
        metrics.RETRIES.labels(runner.kind, runtime.engine.model_name, code).inc()
        raise
    written = time.perf_counter()
    try:
        chunk_id, to_send = _with_retries(runtime, lambda: _write(runtime, runner, batch_id, outcomes, started, finished))
    except ResultsAbandoned as exc:
        log.warning("batch %s: %d results abandoned: %s; their items go back to the queue when their lease ends",
                    batch_id, len(outcomes), exc, extra={"batch_id": batch_id, "worker": runtime.host})
        return {"claimed": len(claimed), "succeeded": 0, "failed": 0, "abandoned": len(outcomes)}
    if to_send:  # windows of long documents, and documents back from theirs
        _send(runtime, batch_id, runner.kind, priority, to_send)
    failed = sum(1 for o in outcomes if o.error)
    engine_s, write_s = (finished - started).total_seconds(), time.perf_counter() - written
    log.info("batch %s: chunk %s of %d items done (%d failed): engine %.2f s, write %.3f s", batch_id, chunk_id,
             len(outcomes), failed, engine_s, write_s, extra={
                 "batch_id": batch_id, "chunk_id": chunk_id, "worker": runtime.host, "kind": runner.kind,
                 "items": len(outcomes), "failed": failed, "engine_s": round(engine_s, 4), "write_s": round(write_s, 4)})
    return {"claimed": len(claimed), "succeeded": len(outcomes) - failed, "failed": failed}


def _turn(runtime: Runtime, claimed: list[store.Claimed]) -> AbstractContextManager[None]:
    """The engine to itself for an item alone that ran before (a suspect, or the innocent neighbour
    of one): an engine failure fails every chunk in it, and only a failure alone may count against it."""
    suspect = len(claimed) == 1 and (claimed[0].attempts > 1 or claimed[0].interrupted)
    return runtime.loop.turns.alone() if suspect else runtime.loop.turns.shared()


def _answer_from_cache(runtime: Runtime, batch_id: str, claimed: list[store.Claimed]) -> list[store.Claimed]:
    """The claimed items still to compute: those an identical request answered since submission are
    answered from the cache now."""
    keys = [c.cache_key for c in claimed if c.cache_key]
    if not keys:  # a batch submitted without the cache: no query
        return claimed
    with sessions(runtime)() as session, session.begin():
        answered = set(cache.answer(session, batch_id, keys, ItemStatus.running, utcnow(), [c.id for c in claimed],
                                    holding=store.holding(claimed)))
        if answered:
            store.close_if_done(session, batch_id)
            kind = session.scalar(select(Batch.kind).where(Batch.id == batch_id)) or ""
            metrics.CACHE_HITS.labels(kind, runtime.engine.model_name).inc(len(answered))
            metrics.ITEMS.labels(kind, runtime.engine.model_name, "succeeded").inc(len(answered))
    return [c for c in claimed if c.id not in answered]


_routes: dict[str, tuple[str, int]] = {}  # batch id -> (kind, priority): neither changes once submitted


def _route(session: Session, batch_id: str) -> tuple[str, int]:
    """The batch's task kind and priority (chunks this worker sends go at it); read once per batch."""
    if batch_id not in _routes:
        row = session.execute(select(Batch.kind, Batch.priority).where(Batch.id == batch_id)).one_or_none()
        if row is None:
            return "", DEFAULT_PRIORITY
        if len(_routes) > 10_000:
            _routes.clear()
        _routes[batch_id] = (row.kind, row.priority)
    return _routes[batch_id]


def _split(runtime: Runtime, batch_id: str, kind: str, priority: int, claimed: list[store.Claimed]) -> dict[str, int]:
    """Send the chunk again as two halves (this claim does not count as an attempt)."""
    ids = [c.id for c in claimed]
    with sessions(runtime)() as session, session.begin():
        store.release(session, claimed, "chunk split to isolate a failing item", refund_attempt=True)
    metrics.RETRIES.labels(kind, runtime.engine.model_name, "split").inc()
    half = len(ids) // 2
    model = runtime.engine.model_name  # the queues this worker consumes
    runtime.queue.send(batch_id, model, kind, [ids[:half], ids[half:]], priority)
    log.warning("batch %s: split a chunk of %d items that failed before", batch_id, len(ids),
                extra={"batch_id": batch_id, "worker": runtime.host, "items": len(ids)})
    return {"claimed": 0, "succeeded": 0, "failed": 0, "split": len(ids)}


def _write(runtime: Runtime, runner: Runner, batch_id: str, outcomes: list[store.Outcome], started, finished) -> tuple[int, list[int]]:  # type: ignore[no-untyped-def]
    """Returns the chunk's id in SQL (its engine_batches row) and the items to send: windows of documents
    that split, and documents whose windows have all ended (schema.windows)."""
    engine, model = runtime.engine.name, runtime.engine.model_name
    with sessions(runtime)() as session, session.begin():  # results, states and counts land together
        eb_id = store.record_engine_batch(session, batch_id, runtime.host, engine, model, outcomes, started, finished)
        written = store.write_outcomes(session, batch_id, outcomes, engine=engine, model=model,
                                       engine_batch_id=eb_id, started=started, finished=finished)
        succeeded = written.succeeded
        runner.stage(session, batch_id, succeeded, finished)  # the kind's own rows, if any
        share = (finished - started).total_seconds() / max(len(outcomes), 1)
        keyed = {o.item.id: o.item.cache_key for o in succeeded if o.item.cache_key}  # none: submitted without the cache
        if keyed:
            cache.remember(session, keyed, runner.kind, engine, finished, share, kinds.get(runner.kind).answer_tables)
        to_send = windows.add(session, batch_id, [o for o in outcomes if o.windows is not None], finished)
        to_send += windows.documents_ready(session, batch_id, kinds.get(runner.kind),
                                           {o.item.parent_id for o in outcomes if o.item.parent_id}, finished)
        store.close_if_done(session, batch_id, **written.ended)  # last: the batch's row stays locked until the commit
    try:  # after the commit: counting must never fail work that is done
        metrics.finished(runner.kind, model, outcomes, succeeded, started, finished)
    except Exception:
        log.exception("counting a finished chunk in the metrics failed")
    return eb_id, to_send


def _with_retries(runtime: Runtime, write: Callable[[], T]) -> T:
    """`write()`, again with growing pauses while the database is out of reach, for `write_retry_s`."""
    deadline = time.monotonic() + runtime.settings.write_retry_s
    pause, pause_max = WRITE_RETRY_PAUSES_S
    while True:
        try:
            return write()
        except Exception as exc:
            if not is_disconnect(exc):
                raise
            if runtime.database is not None:
                runtime.database.lost()
            left = deadline - time.monotonic()
            if left <= 0:
                raise ResultsAbandoned(f"the database was out of reach for {runtime.settings.write_retry_s:.0f} s "
                                       f"({type(exc).__name__})") from exc
            log.warning("database out of reach while writing results (%s); retrying in %.1f s",
                        type(exc).__name__, min(pause, left))
            time.sleep(min(pause, left))
            pause = min(2 * pause, pause_max)


def _send(runtime: Runtime, batch_id: str, kind: str, priority: int, item_ids: list[int]) -> None:
    """Send chunks of items this chunk made ready; they are queued in SQL, so if the broker is away the
    reconciler sends them later."""
    try:
        runtime.queue.send_chunks(batch_id, runtime.engine.model_name, kind, item_ids, priority)
    except Exception as exc:  # noqa: BLE001  # kombu raises many kinds
        log.warning("batch %s: could not send %d items to the broker (%s); the reconciler will", batch_id,
                    len(item_ids), type(exc).__name__)


def give_up(runtime: Runtime, batch_id: str, claimed: list[store.Claimed], error: str, code: str) -> None:
    """The claimed items fail with the error, so the batch can end."""
    with sessions(runtime)() as session, session.begin():
        documents = store.fail_claimed(session, batch_id, claimed, error, code)
        kind, priority = _route(session, batch_id)
        ready = windows.documents_ready(session, batch_id, kinds.get(kind), set(documents),  # a window that failed
                                        utcnow()) if documents else []
        store.close_if_done(session, batch_id)
    if ready:
        _send(runtime, batch_id, kind, priority, ready)
    metrics.gave_up(kind, runtime.engine.model_name, len(claimed), code)
