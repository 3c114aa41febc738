"""Run (b): vLLM's own batch runner (`vllm run-batch`), timed without its engine start-up.

It calls the runner's `run_batch` coroutine on an engine client built exactly as its `main` does, so
the clock covers what `run_batch` does: building its OpenAI serving objects, reading the file,
templating and tokenising, running every request and writing the output file. Before the clock, the
engine is warmed as gristmill's VLLMEngine warms its own (the same 1-token request, then an empty
prefix cache). Writes JSON to $BENCH_RESULT.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from bench.prompts import output_tokens


async def timed(args) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    from transformers import AutoTokenizer
    from vllm import SamplingParams
    from vllm.entrypoints.launchers import run_batch as runner
    from vllm.entrypoints.launchers.api_server.entry import build_async_engine_client
    from vllm.inputs import TokensPrompt
    from vllm.usage.usage_lib import UsageContext

    from worker.engines.vllm_engine import WARMUP_MESSAGES, chat_prompt_ids, effective_options

    runner.validate_run_batch_args(args)
    began = time.perf_counter()
    async with build_async_engine_client(args, usage_context=UsageContext.OPENAI_BATCH_RUNNER) as client:
        warmup = TokensPrompt(prompt_token_ids=chat_prompt_ids(AutoTokenizer.from_pretrained(args.model), WARMUP_MESSAGES))
        async for _ in client.generate(warmup, SamplingParams(max_tokens=1, temperature=0), "warmup"):
            pass
        if not await client.reset_prefix_cache():
            raise RuntimeError("vLLM could not reset its prefix cache after the warm-up request")
        start_s = time.perf_counter() - began
        began = time.perf_counter()
        await runner.run_batch(client, args)
        seconds = time.perf_counter() - began
        engine = effective_options(client.vllm_config)
    return {"seconds": seconds, "engine_start_s": start_s, "engine": engine}


def main() -> None:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    from vllm.entrypoints.launchers import run_batch as runner

    sys.argv = ["run_batch", *sys.argv[1:]]
    args = runner.parse_args()
    timing = asyncio.run(timed(args))
    lines = [json.loads(line) for line in Path(args.output_file).read_text().splitlines()]
    tokens = output_tokens(Path(args.output_file))
    errors = sum(1 for line in lines if line.get("error"))
    Path(os.environ["BENCH_RESULT"]).write_text(json.dumps(
        {"requests": len(lines), "errors": errors, "output_tokens": sum(tokens.values()), **timing, "tokens": tokens}))


if __name__ == "__main__":
    main()
