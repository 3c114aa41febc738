"""Run (a): bare `vllm.LLM.generate` over every prompt at once, the ceiling. Writes JSON to $BENCH_RESULT.

On the clock, as for run-batch: reading the input file, templating and tokenising every prompt,
generating, and writing an output JSONL (custom_id, text, completion_tokens).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("input", type=Path)
    parser.add_argument("output", type=Path)
    parser.add_argument("--model-folder", required=True)
    parser.add_argument("--engine-args", type=json.loads, required=True, help="vllm.LLM keyword arguments (JSON)")
    args = parser.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    import vllm
    from transformers import AutoTokenizer
    from vllm.inputs import TokensPrompt

    from worker.engines.vllm_engine import chat_prompt_ids, effective_options, warm_up

    began = time.perf_counter()
    llm = vllm.LLM(model=args.model_folder, **args.engine_args)
    tokenizer = AutoTokenizer.from_pretrained(args.model_folder)
    warm_up(llm, tokenizer)  # the same request, then an empty prefix cache, as gristmill's VLLMEngine
    start_s = time.perf_counter() - began

    began = time.perf_counter()
    lines = [json.loads(line) for line in args.input.read_text().splitlines()]
    prompts = [TokensPrompt(prompt_token_ids=chat_prompt_ids(tokenizer, line["body"]["messages"])) for line in lines]
    params = [vllm.SamplingParams(max_tokens=line["body"]["max_tokens"], temperature=0) for line in lines]
    outputs = llm.generate(prompts, params, use_tqdm=False)
    tokens = {line["custom_id"]: len(o.outputs[0].token_ids) for line, o in zip(lines, outputs, strict=True)}
    with args.output.open("w") as out:
        for line, o in zip(lines, outputs, strict=True):
            out.write(json.dumps({"custom_id": line["custom_id"], "text": o.outputs[0].text,
                                  "completion_tokens": tokens[line["custom_id"]]}) + "\n")
    seconds = time.perf_counter() - began

    Path(os.environ["BENCH_RESULT"]).write_text(json.dumps(
        {"requests": len(lines), "output_tokens": sum(tokens.values()), "seconds": seconds, "engine_start_s": start_s,
         "engine": effective_options(llm.llm_engine.vllm_config), "tokens": tokens}))
    llm.llm_engine.engine_core.shutdown()


if __name__ == "__main__":
    main()
