"""What a task kind's worker half provides: run a chunk of claimed items on the engine, and stage any
rows of its own in the transaction that records the outcomes (so state, result and rows land together)."""

from __future__ import annotations

from concurrent.futures import Future
from datetime import datetime
from typing import TypeVar

from sqlalchemy.orm import Session

from schema import store
from schema.errors import ChunkTimeout
from worker.engines.base import Engine
from worker.runtime import Runtime

T = TypeVar("T")
Ran = tuple[list[store.Outcome], datetime, datetime]  # outcomes in claim order, engine start, engine end


class Runner:
    kind: str  # the schema kind it executes
    needs: tuple[frozenset[str], ...]  # engine capabilities it runs on: any one of these sets

    def serves(self, engine: Engine) -> bool:
        return any(need <= engine.capabilities for need in self.needs)

    def run(self, runtime: Runtime, claimed: list[store.Claimed]) -> Ran:
        """One outcome per claimed item, in order; a request that cannot run fails alone. Raises only
        when the engine failed as a whole (the chunk is handed back)."""
        raise NotImplementedError

    def stage(self, session: Session, batch_id: str, succeeded: list[store.Outcome], finished: datetime) -> None:
        """Write the kind's own rows for the items that just succeeded (none by default)."""


def bounded(runtime: Runtime, future: Future[T]) -> T:
    """The engine's answer within the chunk time limit, which is well below the broker's visibility
    timeout; past it the work is stopped and the chunk handed back."""
    try:
        return future.result(timeout=runtime.settings.chunk_time_limit_s)
    except TimeoutError as exc:
        runtime.loop.cancel(future)
        raise ChunkTimeout(f"chunk exceeded its {runtime.settings.chunk_time_limit_s} s time limit") from exc
