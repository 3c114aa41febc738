"""Generation, the execution: every claimed request goes to the engine loop, which keeps the engine
busy across chunks; the text and token counts come back as the items' outcomes. An answer under a
response_format (structured output) is parsed and validated: one that fails is an item error
(invalid_json, schema_mismatch) that keeps the raw answer in its message."""

from __future__ import annotations

from schema import store
from schema.db import utcnow
from schema.jobs import GenerationRequest, GenerationResult
from schema.structured import check_answer
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
        outcomes = [outcome(c, checked(request, r)) for c, request, r in zip(claimed, requests, results, strict=True)]
        return outcomes, started, finished


def checked(request: GenerationRequest, result: GenerationResult) -> GenerationResult:
    """The result, failed when it does not follow the request's response_format."""
    fmt = request.sampling.response_format
    problem = check_answer(result.text, fmt) if fmt is not None and result.error is None else None
    if problem is None:
        return result
    code, message = problem
    return result.model_copy(update={"error": message, "error_code": code})


def outcome(item: store.Claimed, r: GenerationResult) -> store.Outcome:
    return store.Outcome(item=item, text=r.text, finish_reason=r.finish_reason, prompt_tokens=r.prompt_tokens,
                         completion_tokens=r.completion_tokens, truncated_tokens=r.truncated_tokens, error=r.error,
                         error_code=r.error_code)


RUNNER = Generate()
