"""Embeddings with transformers: the last hidden state of a left-padded batch, pooled as the model says
(worker.engines.pooling) and L2-normalised, as vLLM's pooling runner does."""

from __future__ import annotations

from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from worker.engines.pooling import Pooling


def pooled(model: Any, tokenizer: PreTrainedTokenizerBase, rows: list[list[int]], pooling: Pooling,
           layer: int = -1) -> list[list[float]]:
    """One normalised vector per row of token ids, from the output of `layer` (-1: the last)."""
    inputs = tokenizer.pad({"input_ids": rows}, return_tensors="pt").to(model.device)  # left padding
    mask = inputs["attention_mask"]
    positions = (mask.cumsum(-1) - 1).clamp_min(0)  # each row counts from its own first token
    with torch.inference_mode():
        out = model(input_ids=inputs["input_ids"], attention_mask=mask, position_ids=positions,
                    output_hidden_states=True)
    states = out.hidden_states[layer].float()
    if pooling == "LAST":
        vectors = states[:, -1]
    elif pooling == "CLS":
        vectors = states[torch.arange(len(rows)), mask.argmax(-1)]  # the first real token
    else:
        weights = mask.unsqueeze(-1).to(states.dtype)
        vectors = (states * weights).sum(1) / weights.sum(1)
    return torch.nn.functional.normalize(vectors, dim=-1).tolist()  # type: ignore[no-any-return]
