"""Embeddings, the execution: every text of the chunk goes to the engine in one call on its own thread;
an item's vectors are cut to its `dimensions` (where the model allows it) and stored as float32 bytes
in the embeddings table, in the transaction that records the item's outcome."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import datetime

from sqlalchemy.orm import Session

from schema import store
from schema.db import utcnow
from schema.errors import ErrorCode
from schema.kinds.embed import EmbedRequest, pack
from schema.tables import Embedding
from worker.engines.base import EMBED, Embedded, Embedder
from worker.kinds.base import Ran, Runner, bounded
from worker.runtime import Runtime


@dataclass
class EmbedOutcome(store.Outcome):
    vectors: list[list[float]] = field(default_factory=list)


class Embed(Runner):
    kind = "embed"
    needs = (frozenset({EMBED}),)

    def run(self, runtime: Runtime, claimed: list[store.Claimed]) -> Ran:
        engine: Embedder = runtime.engine  # type: ignore[assignment]  # serves() checked the capability
        requests = [EmbedRequest.model_validate(c.request) for c in claimed]
        texts = [text for request in requests for text in request.input]
        started = utcnow()
        embedded = iter(bounded(runtime, runtime.loop.call(lambda: engine.embed(texts))))
        finished = utcnow()
        outcomes: list[store.Outcome] = [
            _outcome(c, r, [next(embedded) for _ in r.input], engine.matryoshka)
            for c, r in zip(claimed, requests, strict=True)]
        return outcomes, started, finished

    def stage(self, session: Session, batch_id: str, succeeded: list[store.Outcome], finished: datetime) -> None:
        rows = [{"item_id": o.item.id, "batch_id": batch_id, "custom_id": o.item.custom_id,
                 "count": len(o.vectors), "dimensions": len(o.vectors[0]), "vectors": pack(o.vectors),
                 "created_at": finished}
                for o in succeeded if isinstance(o, EmbedOutcome) and o.vectors]
        if rows:
            store.insert_ignore(session, Embedding, rows)


def _outcome(item: store.Claimed, request: EmbedRequest, embedded: list[Embedded], matryoshka: bool) -> EmbedOutcome:
    tokens = sum(e.prompt_tokens for e in embedded)
    failed = next((e for e in embedded if e.error is not None), None)
    if failed is not None:
        return EmbedOutcome(item=item, prompt_tokens=tokens, error=failed.error, error_code=failed.error_code)
    vectors = [e.vector for e in embedded]
    if request.dimensions is not None and request.dimensions != len(vectors[0]):
        if not matryoshka or request.dimensions > len(vectors[0]):
            return EmbedOutcome(item=item, prompt_tokens=tokens, error_code=ErrorCode.unsupported,
                                error=f"dimensions={request.dimensions}: the model gives {len(vectors[0])}-dimension "
                                      f"vectors and does not allow shorter ones")
        vectors = [_normalised(v[: request.dimensions]) for v in vectors]
    return EmbedOutcome(item=item, text="", prompt_tokens=tokens, vectors=vectors)


def _normalised(vector: list[float]) -> list[float]:
    norm = math.sqrt(sum(x * x for x in vector)) or 1.0
    return [x / norm for x in vector]


RUNNER = Embed()
