"""Label scoring and guided choice with vLLM.

Scoring walks the labels' token trie one depth at a time. Each request is a prompt plus the label
tokens so far, generating one token with `logprob_token_ids` set to the next tokens of every label at
that trie node: labels sharing their first tokens share requests, and single-token labels (the usual
case) all come from one request per document. Deeper requests start with the shallower ones' tokens,
so vLLM's prefix cache serves their prompt (whole KV blocks of it) instead of recomputing it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from worker.engines.labels import Tokenized

if TYPE_CHECKING:
    import vllm

# (prompt token ids, sampling params) -> one finished output per request, in order.
Runner = Callable[[list[tuple[list[int], "vllm.SamplingParams"]]], list[Any]]
Node = tuple[int, tuple[int, ...]]  # (item index, label tokens so far)


def token_logprobs(run: Runner, items: list[Tokenized], max_ids: int) -> list[list[list[float]]]:
    """For each item, per label, the log-probability of each label token (see the module docstring)."""
    needed: dict[Node, set[int]] = {}
    for index, item in enumerate(items):
        for tokens in item.continuations:
            for depth, token in enumerate(tokens):
                needed.setdefault((index, tuple(tokens[:depth])), set()).add(token)
    known: dict[tuple[Node, int], float] = {}
    deepest = max((len(t) for item in items for t in item.continuations), default=0)
    for depth in range(deepest):  # in depth order, so each level finds the previous one cached
        asks = [(node, chunk) for node, tokens in needed.items() if len(node[1]) == depth
                for chunk in _chunks(sorted(tokens), max_ids)]
        outputs = run([(items[node[0]].prompt + list(node[1]), _scoring_params(chunk)) for node, chunk in asks])
        for (node, chunk), output in zip(asks, outputs, strict=True):
            logprobs = output.outputs[0].logprobs[0]
            known.update(((node, token), float(logprobs[token].logprob)) for token in chunk)
    return [[[known[((index, tuple(tokens[:depth])), tokens[depth])] for depth in range(len(tokens))]
             for tokens in item.continuations] for index, item in enumerate(items)]


def _chunks(tokens: list[int], size: int) -> list[list[int]]:
    return [tokens[start : start + size] for start in range(0, len(tokens), size)]


def _scoring_params(token_ids: list[int]) -> vllm.SamplingParams:
    from vllm import SamplingParams

    # One token, greedy; only the logprobs of `token_ids` matter. They are raw logprobs, computed
    # before any sampling transformation (vLLM's default logprobs_mode).
    return SamplingParams(max_tokens=1, temperature=0.0, logprob_token_ids=token_ids, detokenize=False)


def choice_params(labels: list[str]) -> vllm.SamplingParams:
    """Greedy generation constrained to exactly one of `labels` (vLLM structured outputs)."""
    from vllm import SamplingParams
    from vllm.sampling_params import StructuredOutputsParams

    # A byte is the shortest token, so no label takes more tokens than bytes; +1 for the end token.
    longest = max(len(label.encode("utf-8")) for label in labels) + 1
    return SamplingParams(max_tokens=longest, temperature=0.0,
                          structured_outputs=StructuredOutputsParams(choice=list(labels)))
