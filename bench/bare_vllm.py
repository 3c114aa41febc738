"""Run (a): bare `vllm.LLM.generate` over every prompt at once, the ceiling. Writes JSON to $BENCH_RESULT."""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("input", type=Path)
    parser.add_argument("--model-folder", required=True)
    parser.add_argument("--max-model-len", type=int, default=2048)
    args = parser.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    import torch
    import vllm
    from transformers import AutoTokenizer
    from vllm.inputs import TokensPrompt

    from worker.engines.vllm_engine import CPU_BLOCK_SIZE, vllm_dtype

    lines = [json.loads(line) for line in args.input.read_text().splitlines()]
    tokenizer = AutoTokenizer.from_pretrained(args.model_folder)
    prompts = [TokensPrompt(prompt_token_ids=list(tokenizer.apply_chat_template(
        line["body"]["messages"], add_generation_prompt=True, tokenize=True, return_dict=False))) for line in lines]
    params = [vllm.SamplingParams(max_tokens=line["body"]["max_tokens"], temperature=0) for line in lines]
    began = time.perf_counter()
    on_cpu = not torch.cuda.is_available()
    # The engine options gristmill's VLLMEngine uses (worker/engines/vllm_engine.py), so only the
    # pipeline differs between the runs.
    cpu_options = {"enforce_eager": True, "block_size": CPU_BLOCK_SIZE} if on_cpu else {}
    llm = vllm.LLM(model=args.model_folder, dtype=vllm_dtype(), max_model_len=args.max_model_len, **cpu_options)
    start_s = time.perf_counter() - began
    began = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - began
    tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    Path(os.environ["BENCH_RESULT"]).write_text(json.dumps(
        {"requests": len(lines), "output_tokens": tokens, "seconds": seconds, "engine_start_s": start_s}))
    llm.llm_engine.engine_core.shutdown()


if __name__ == "__main__":
    main()
