"""Runs one chunk: claim its items, hand them to the engine, write the outcomes, move the batch on."""

from __future__ import annotations

import logging

from schema.db import utcnow
from schema.errors import EngineError
from schema.jobs import GenerationRequest
from worker import store
from worker.runtime import Runtime, sessions

log = logging.getLogger(__name__)


def run_chunk(runtime: Runtime, batch_id: str, item_ids: list[int]) -> dict[str, int]:
    make_session = sessions(runtime)
    with make_session() as session, session.begin():
        claimed = store.claim(session, batch_id, item_ids, runtime.host, runtime.settings.chunk_time_limit_s)
    if not claimed:  # a duplicate delivery, or the batch was cancelled: nothing to do
        return {"claimed": 0, "succeeded": 0, "failed": 0}
    try:
        outcomes, started, finished = _generate(runtime, claimed)
    except Exception as exc:  # the engine failed as a whole: give the chunk back, let Celery retry
        with make_session() as session, session.begin():
            store.release(session, [c.id for c in claimed], f"{type(exc).__name__}: {exc}")
        raise
    engine, model = runtime.engine.name, runtime.engine.model_name
    with make_session() as session, session.begin():  # results, states and counts land together
        eb_id = store.record_engine_batch(session, batch_id, runtime.host, engine, model, outcomes, started, finished)
        store.write_outcomes(session, batch_id, outcomes, engine=engine, model=model,
                             engine_batch_id=eb_id, started=started, finished=finished)
        store.close_if_done(session, batch_id)
    failed = sum(1 for o in outcomes if o.error)
    return {"claimed": len(claimed), "succeeded": len(outcomes) - failed, "failed": failed}


def _generate(runtime: Runtime, claimed: list[store.Claimed]):  # type: ignore[no-untyped-def]
    requests = [GenerationRequest.model_validate(c.request) for c in claimed]
    started = utcnow()
    future = runtime.loop.submit(requests)
    try:
        results = future.result(timeout=runtime.settings.chunk_time_limit_s)
    except TimeoutError as exc:  # bounded well below the broker's visibility timeout
        runtime.loop.cancel(future)
        raise EngineError(f"chunk exceeded its {runtime.settings.chunk_time_limit_s} s time limit") from exc
    finished = utcnow()
    outcomes = [
        store.Outcome(item=c, text=r.text, finish_reason=r.finish_reason, prompt_tokens=r.prompt_tokens,
                      completion_tokens=r.completion_tokens, error=r.error)
        for c, r in zip(claimed, results, strict=True)
    ]
    return outcomes, started, finished


def give_up(runtime: Runtime, batch_id: str, item_ids: list[int], error: str) -> None:
    """After the last retry: the chunk's unfinished items fail with the error, so the batch can end."""
    with sessions(runtime)() as session, session.begin():
        store.fail_open_items(session, batch_id, item_ids, error)
        store.close_if_done(session, batch_id)
