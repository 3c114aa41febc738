"""A fixed, seeded prompt set for bulk document work: summarise, extract, rewrite, reply, classify."""

from __future__ import annotations

import json
import random
from pathlib import Path

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "amazon_sentiment.tsv"

# (instruction, max_tokens): output lengths vary from a word to a paragraph, as in real batches.
TASKS = [
    ("Summarise this product review in one sentence:", 48),
    ("List the product features this review mentions, comma-separated:", 32),
    ("Rewrite this review in a formal tone:", 96),
    ("Write a short, polite reply from the seller to this review:", 128),
    ("Is this review positive or negative? Answer in one word:", 8),
]


def sentences(path: Path = DATA) -> list[str]:
    return [line.split("\t")[0] for line in path.read_text().splitlines() if line.strip()]


def build(n: int, seed: int = 1234) -> list[dict[str, object]]:
    """n OpenAI batch lines (chat completions, greedy), the same for every run with the same seed."""
    rng = random.Random(seed)
    texts = sentences()
    lines: list[dict[str, object]] = []
    for i in range(n):
        instruction, max_tokens = rng.choice(TASKS)
        text = rng.choice(texts)
        lines.append({
            "custom_id": f"req-{i:05d}", "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": "smollm2-135m-instruct", "max_tokens": max_tokens, "temperature": 0,
                     "messages": [{"role": "user", "content": f"{instruction}\n\n{text}"}]},
        })
    return lines


def write(lines: list[dict[str, object]], path: Path) -> Path:
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def output_tokens(path: Path) -> dict[str, int]:
    """Output tokens per custom_id in an OpenAI batch output file (vLLM run-batch's or gristmill's)."""
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {line["custom_id"]: line["response"]["body"]["usage"]["completion_tokens"]
            for line in lines if line.get("response")}


def prompt_tokens(lines: list[dict[str, object]], model_folder: Path) -> dict[str, int]:
    """Prompt tokens per custom_id, through the model's chat template as every engine renders them."""
    from transformers import AutoTokenizer

    from schema.jobs import GenerationRequest
    from worker.engines import prompt_token_ids

    tokenizer = AutoTokenizer.from_pretrained(model_folder)
    return {str(line["custom_id"]): len(prompt_token_ids(tokenizer, GenerationRequest.model_validate(line["body"])))
            for line in lines}
