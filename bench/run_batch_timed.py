"""Run (b): vLLM's own batch runner (`vllm run-batch`), timed without its engine start-up.

It calls the runner's `run_batch` coroutine on an engine client built exactly as its `main` does, so
the clock covers reading the file, running every request and writing the output. Writes JSON to
$BENCH_RESULT.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from pathlib import Path


async def timed(args) -> dict[str, float]:  # type: ignore[no-untyped-def]
    from vllm.entrypoints.launchers import run_batch as runner
    from vllm.entrypoints.launchers.api_server.entry import build_async_engine_client
    from vllm.usage.usage_lib import UsageContext

    runner.validate_run_batch_args(args)
    began = time.perf_counter()
    async with build_async_engine_client(args, usage_context=UsageContext.OPENAI_BATCH_RUNNER) as client:
        start_s = time.perf_counter() - began
        began = time.perf_counter()
        await runner.run_batch(client, args)
        seconds = time.perf_counter() - began
    return {"seconds": seconds, "engine_start_s": start_s}


def main() -> None:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    from vllm.entrypoints.launchers import run_batch as runner

    sys.argv = ["run_batch", *sys.argv[1:]]
    args = runner.parse_args()
    timing = asyncio.run(timed(args))
    lines = [json.loads(line) for line in Path(args.output_file).read_text().splitlines()]
    tokens = sum(line["response"]["body"]["usage"]["completion_tokens"] for line in lines if line.get("response"))
    errors = sum(1 for line in lines if line.get("error"))
    Path(os.environ["BENCH_RESULT"]).write_text(
        json.dumps({"requests": len(lines), "errors": errors, "output_tokens": tokens, **timing}))


if __name__ == "__main__":
    main()
