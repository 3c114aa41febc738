"""Generation, the execution: every claimed request goes to the engine loop, which keeps the engine
busy across chunks; the text and token counts come back as the items' outcomes. An answer under a
response_format (structured output) is parsed and validated: one that fails is an item error
(invalid_json, schema_mismatch) that keeps the raw answer in its message.

A document too long for the context in a map-reduce batch does not reach the engine: its outcome is the
requests of its windows (schema.windows), and when they have run it comes back for its reduce.
"""

from __future__ import annotations

from schema import store, windows
from schema.db import utcnow
from schema.jobs import GenerationRequest, GenerationResult
from schema.structured import check_answer
from worker.engines.base import GENERATE
from worker.kinds.base import Ran, Runner, bounded
from worker.runtime import Runtime, sessions


class Generate(Runner):
    kind = "generate"
    needs = (frozenset({GENERATE}),)

    def run(self, runtime: Runtime, claimed: list[store.Claimed]) -> Ran:
        requests = [request_of(runtime, c) for c in claimed]
        splits = split(runtime, requests)
        runnable = [i for i in range(len(claimed)) if i not in splits]
        started = utcnow()
        results = bounded(runtime, runtime.loop.submit([requests[i] for i in runnable])) if runnable else []
        finished = utcnow()
        answered = dict(zip(runnable, results, strict=True))
        outcomes = [store.Outcome(item=c, windows=windows.window_requests(requests[i], splits[i])) if i in splits
                    else outcome(c, checked(requests[i], answered[i])) for i, c in enumerate(claimed)]
        return outcomes, started, finished


def request_of(runtime: Runtime, item: store.Claimed) -> GenerationRequest:
    """The item's request; for a document back from its windows, the reduce over their answers."""
    request = GenerationRequest.model_validate(item.request)
    if item.round == 0 or item.parent_id is not None:
        return request
    with sessions(runtime)() as session:
        return windows.reduce_request(request, windows.answers(session, item.id, item.round))


def split(runtime: Runtime, requests: list[GenerationRequest]) -> dict[int, list[str]]:
    """The window texts of each map-reduce request too long for the context, by its index; the engine's
    tokenizer decides, on the engine loop's thread (the engine's objects are not shared across threads)."""
    long = [i for i, r in enumerate(requests) if r.windowing is not None]
    cut = getattr(runtime.engine, "windows", None)
    if not long or cut is None:
        return {}
    texts = bounded(runtime, runtime.loop.call(lambda: [cut(requests[i]) for i in long]))
    return {i: t for i, t in zip(long, texts, strict=True) if t}


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
