"""Label scoring with transformers: one forward pass for the prompt, its KV cache reused for each label.

The prompt pass yields every label's first token; a label with more tokens runs only those tokens on
top of the cached prompt, and the cache is cropped back after it. N labels cost one prompt pass plus
their own few tokens, not N passes over the prompt.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from worker.engines.labels import Tokenized


def token_logprobs(model: Any, tokenizer: PreTrainedTokenizerBase, items: list[Tokenized],
                   batch_size: int) -> list[list[list[float]]]:
    """For each item, per label, the log-probability of each label token; batched, in item order."""
    results: list[list[list[float]] | None] = [None] * len(items)
    # Items with the same labels share their label passes; similar prompt lengths pad least.
    groups: dict[tuple[tuple[int, ...], ...], list[int]] = defaultdict(list)
    for index in sorted(range(len(items)), key=lambda i: len(items[i].prompt)):
        groups[tuple(map(tuple, items[index].continuations))].append(index)
    for continuations, indices in groups.items():
        for start in range(0, len(indices), batch_size):
            batch = indices[start : start + batch_size]
            scores = _batch(model, tokenizer, [items[i].prompt for i in batch], [list(c) for c in continuations])
            for index, score in zip(batch, scores):
                results[index] = score
    return [r if r is not None else [] for r in results]


@torch.inference_mode()
def _batch(model: Any, tokenizer: PreTrainedTokenizerBase, prompts: list[list[int]],
           continuations: list[list[int]]) -> list[list[list[float]]]:
    device = model.device
    inputs = tokenizer.pad({"input_ids": prompts}, return_tensors="pt").to(device)  # left padding
    mask = inputs["attention_mask"]
    # Left padding shifts positions: each row counts from its own first real token, as unpadded.
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    out = model(input_ids=inputs["input_ids"], attention_mask=mask, position_ids=positions,
                use_cache=True, logits_to_keep=1)
    first = out.logits[:, -1].float().log_softmax(-1)
    cache, lengths = out.past_key_values, mask.sum(-1, keepdim=True)
    per_label = [_label(model, cache, mask, lengths, first, c) for c in continuations]
    return [[scores[row] for scores in per_label] for row in range(len(prompts))]


def _label(model: Any, cache: Any, mask: torch.Tensor, lengths: torch.Tensor,
           first: torch.Tensor, tokens: list[int]) -> list[list[float]]:
    """Log-probabilities of one label's tokens for every row of the batch."""
    columns = [first[:, tokens[0]]]
    if len(tokens) > 1:
        rows, steps = mask.shape[0], len(tokens) - 1
        fed = torch.tensor([tokens[:-1]] * rows, device=mask.device)
        extended = torch.cat([mask, torch.ones(rows, steps, dtype=mask.dtype, device=mask.device)], dim=1)
        positions = lengths + torch.arange(steps, device=mask.device)
        out = model(input_ids=fed, attention_mask=extended, position_ids=positions, past_key_values=cache,
                    use_cache=True)
        logprobs = out.logits.float().log_softmax(-1)
        columns += [logprobs[:, k, tokens[k + 1]] for k in range(steps)]
        cache.crop(-steps)  # back to the prompt alone for the next label
    return torch.stack(columns, dim=1).tolist()
