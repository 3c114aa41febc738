"""The executor's classification path: run a chunk of classification items, stage their SQL rows.

The executor calls `run` instead of its generation path when a chunk's items are classification
requests, and `stage` in the transaction that writes the items' outcomes, so an item's state, its
result and its classification land together.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

from schema.classify import Classification, ClassifyRequest, is_classify_request
from schema.db import utcnow
from schema.errors import EngineError
from schema.tables import Classification as ClassificationRow
from worker import store
from worker.classify import classify
from worker.runtime import Runtime


@dataclass
class ClassifyOutcome(store.Outcome):
    """An outcome whose Result row holds the label; the classification itself goes to its own table."""

    classification: Classification | None = None


def is_classify(claimed: list[store.Claimed]) -> bool:
    return bool(claimed) and is_classify_request(claimed[0].request)


def run(runtime: Runtime, claimed: list[store.Claimed]) -> tuple[list[store.Outcome], datetime, datetime]:
    """Classify the claimed items on the engine's own thread; bounded by the chunk time limit."""
    requests = [ClassifyRequest.model_validate(c.request) for c in claimed]
    started = utcnow()
    future = runtime.loop.call(lambda: classify(runtime.engine, requests))
    try:
        results = future.result(timeout=runtime.settings.chunk_time_limit_s)
    except TimeoutError as exc:
        runtime.loop.cancel(future)
        raise EngineError(f"chunk exceeded its {runtime.settings.chunk_time_limit_s} s time limit") from exc
    finished = utcnow()
    outcomes: list[store.Outcome] = [
        ClassifyOutcome(item=c, text=_text(r.classification), prompt_tokens=r.prompt_tokens,
                        completion_tokens=r.completion_tokens, error=r.error, classification=r.classification)
        for c, r in zip(claimed, results, strict=True)
    ]
    return outcomes, started, finished


def _text(result: Classification | None) -> str:
    if result is None:
        return ""
    return ",".join(result.labels) if result.labels is not None else result.label


def stage(session: Session, batch_id: str, outcomes: list[store.Outcome], finished: datetime) -> None:
    """Insert the classifications of succeeded outcomes (a repeat of the chunk inserts nothing)."""
    rows = [{"item_id": o.item.id, "batch_id": batch_id, "custom_id": o.item.custom_id,
             **o.classification.model_dump(), "created_at": finished}
            for o in outcomes if isinstance(o, ClassifyOutcome) and o.classification and o.error is None]
    if not rows:
        return
    insert = pg_insert if session.get_bind().dialect.name == "postgresql" else sqlite_insert
    session.execute(insert(ClassificationRow).on_conflict_do_nothing(index_elements=["item_id"]), rows)
