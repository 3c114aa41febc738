"""Generation, the execution: every claimed request goes to the engine loop, which keeps the engine
busy across chunks; the text and token counts come back as the items' outcomes."""

from __future__ import annotations

from schema import store
from schema.db import utcnow
from schema.jobs import GenerationRequest
from worker.engines.base import GENERATE
from worker.kinds.base import Ran, Runner, bounded
from worker.runtime import Runtime


class Generate(Runner):
    kind = "generate"
    needs = (frozenset({GENERATE}),)

    def run(self, runtime: Runtime, claimed: list[store.Claimed]) -> Ran:
        requests = [GenerationRequest.model_validate(c.request) for c in claimed]
        started = utcnow()
        results = bounded(runtime, runtime.loop.submit(requests))
        finished = utcnow()
        outcomes = [
            store.Outcome(item=c, text=r.text, finish_reason=r.finish_reason, prompt_tokens=r.prompt_tokens,
                          completion_tokens=r.completion_tokens, error=r.error, error_code=r.error_code)
            for c, r in zip(claimed, results, strict=True)
        ]
        return outcomes, started, finished


RUNNER = Generate()
