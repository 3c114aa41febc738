"""Choosing and loading an engine, plus the prompt rules every engine shares.

Engines are imported lazily: the base install may have transformers but not vLLM.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from schema.errors import EngineError, ErrorCode, ModelError
from schema.jobs import GenerationRequest, GenerationResult, Windows
from schema.settings import Settings, get_settings
from worker.engines.base import EMBED, Engine, Generator

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = [
    "ENGINES",
    "Engine",
    "admit",
    "context_error",
    "failed_result",
    "load_engine",
    "pick_engine",
    "prompt_token_ids",
]

ENGINES = ("vllm", "transformers")
DEFAULT_CONTEXT = 2048  # for a model whose config names no context length
WINDOW_MARGIN = 16  # tokens a window leaves free: its text, tokenized again, may come out a little longer

logger = logging.getLogger(__name__)


def pick_engine(engine: str = "auto") -> str:
    """The engine name to use: "auto" means vLLM when it is installed, else transformers."""
    if engine == "auto":
        return "vllm" if _vllm_imports() else "transformers"
    if engine not in ENGINES and ":" not in engine:
        raise EngineError(f"unknown engine '{engine}'; choose auto, {', '.join(ENGINES)}")
    return engine


def _vllm_imports() -> bool:
    try:
        import vllm  # noqa: F401
    except ImportError:
        return False
    except (RuntimeError, OSError) as exc:  # installed but broken (a mismatched torch, a missing .so)
        logger.warning("vllm is installed but fails to import (%s); using transformers", exc)
        return False
    return True


def load_engine(model: str, engine: str = "auto", settings: Settings | None = None,
                needs: frozenset[str] | None = None) -> Engine:
    """Load `model` (registry name, HF folder or .gguf path) into the chosen engine; slow, do it once.
    `needs`: the capabilities asked for, where an engine has variants: vLLM embeds with its pooling
    runner, which does nothing else (vLLM runs a model either to generate or to pool)."""
    settings = settings or get_settings()
    chosen = pick_engine(engine)
    try:
        if chosen in ENGINES and _is_head(model):  # a sequence-classification model: a classifier
            return _load_head(model, chosen, settings)
        if chosen == "vllm" and needs == {EMBED}:
            from worker.engines.vllm_embed import VLLMEmbedEngine

            return VLLMEmbedEngine(model, settings=settings)
        if chosen == "vllm":
            from worker.engines.vllm_engine import VLLMEngine

            return VLLMEngine(model, settings=settings)
        if ":" in chosen:  # module:Class, an engine from outside this package (the benchmarks' null engine)
            module, name = chosen.split(":", 1)
            return getattr(importlib.import_module(module), name)(model, settings=settings)  # type: ignore[no-any-return]
        from worker.engines.transformers_engine import TransformersEngine

        return TransformersEngine(model, settings=settings)
    except (ImportError, AttributeError) as exc:
        raise EngineError(f"engine '{chosen}' is not installed: {exc}") from exc


def _is_head(model: str) -> bool:
    from schema.models import head_config, resolve_model

    try:
        return head_config(resolve_model(model)) is not None
    except ModelError:
        return False  # the engine itself reports a model it cannot find


def _load_head(model: str, chosen: str, settings: Settings) -> Engine:
    if chosen == "vllm":
        from worker.engines.vllm_head import VLLMHeadEngine

        return VLLMHeadEngine(model, settings=settings)
    from worker.engines.hf_head import TransformersHeadEngine

    return TransformersHeadEngine(model, settings=settings)


def run_to_completion(engine: Generator, requests: list[GenerationRequest]) -> list[GenerationResult]:
    """Add every request, step until all finished; results in request order."""
    results: list[GenerationResult | None] = [None] * len(requests)
    slots: dict[str, int] = {}
    for index, request in enumerate(requests):
        added = engine.add(request)
        if isinstance(added, str):
            slots[added] = index
        else:
            results[index] = added
    while slots:
        for key, result in engine.step():
            if key in slots:
                results[slots.pop(key)] = result
    return [r if r is not None else failed_result("not run") for r in results]


def prompt_token_ids(tokenizer: PreTrainedTokenizerBase, request: GenerationRequest) -> list[int]:
    """The exact token ids a request runs with: chat messages through the chat template, a raw
    prompt as is. Both engines use this, so they see the same tokens and count them the same way."""
    if request.messages:
        if not tokenizer.chat_template:
            raise ModelError("the model has no chat template; send `prompt` instead of `messages`")
        messages: list[dict[str, Any]] = [m.model_dump() for m in request.messages]
        ids = tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, return_dict=False
        )
    elif request.prompt:
        ids = tokenizer(request.prompt)["input_ids"]
    else:
        raise ModelError("the request has neither `messages` nor a non-empty `prompt`")
    return list(ids)


def context_length(asked: int | None, own: int | None, engine: str, chosen: int | None = None) -> int:
    """The context an engine runs with: `asked` (GRISTMILL_MAX_MODEL_LEN) up to the model's `own`, else its
    own; `chosen`: what the engine settled on itself (vLLM fits it to its KV cache). Logs what and why."""
    context = chosen or min((n for n in (asked, own) if n), default=DEFAULT_CONTEXT)
    if asked and context == asked:
        why = "set by GRISTMILL_MAX_MODEL_LEN"
    elif asked and own and asked > own:
        why = f"the model's own (its config): GRISTMILL_MAX_MODEL_LEN asks for {asked}, more than it knows"
    elif own is None:
        why = "a default: the model's config names none"
    elif context < own:
        why = f"what the KV cache holds for one sequence (the model's own is {own})"
    else:
        why = "the model's own (its config)"
    logger.info("%s engine: context %d tokens, %s", engine, context, why)
    return context


def context_error(prompt_tokens: int, max_tokens: int, max_model_len: int) -> str | None:
    """Why a request cannot fit the context, or None when it fits."""
    if prompt_tokens >= max_model_len:
        return f"prompt is {prompt_tokens} tokens; the model's context is {max_model_len}"
    if prompt_tokens + max_tokens > max_model_len:
        return (
            f"prompt is {prompt_tokens} tokens and max_tokens is {max_tokens}; "
            f"the model's context is {max_model_len}"
        )
    return None


def failed_result(error: str, prompt_tokens: int = 0, code: ErrorCode = ErrorCode.engine_error) -> GenerationResult:
    """The result of a request that could not run; the rest of its batch still does."""
    return GenerationResult(finish_reason="error", error=error, error_code=code, prompt_tokens=prompt_tokens)


@dataclass(frozen=True)
class Admitted:
    """A request that can run: its index, its prompt's token ids, and how many document tokens were cut."""

    index: int
    ids: list[int]
    truncated: int = 0


def admit(
    tokenizer: PreTrainedTokenizerBase, requests: list[GenerationRequest], max_model_len: int
) -> tuple[list[GenerationResult | None], list[Admitted]]:
    """Tokenize every request, cutting the document of one too long for the context when it asks to be
    truncated. Returns one slot per request, already filled with the failure of those that cannot run,
    and those that can."""
    results: list[GenerationResult | None] = [None] * len(requests)
    runnable: list[Admitted] = []
    for index, request in enumerate(requests):
        try:
            ids = prompt_token_ids(tokenizer, request)
        except ModelError as exc:
            results[index] = failed_result(str(exc), code=ErrorCode.invalid_request)
            continue
        sampling = request.sampling
        error = context_error(len(ids), sampling.max_tokens, max_model_len)
        if sampling.truncate and (error or (sampling.truncate_to and len(ids) > sampling.truncate_to)):
            fitted = fit(tokenizer, request, len(ids), max_model_len)
            if fitted is not None:
                runnable.append(Admitted(index, fitted[0], fitted[1]))
                continue
        if error:
            results[index] = failed_result(error, len(ids), ErrorCode.context_length_exceeded)
        else:
            runnable.append(Admitted(index, ids))
    return results, runnable


def fit(tokenizer: PreTrainedTokenizerBase, request: GenerationRequest, prompt_tokens: int,
        max_model_len: int) -> tuple[list[int], int] | None:
    """The token ids of the request with its document (its last user message, or its raw prompt) cut to
    fit the context with room for max_tokens (and within truncate_to), keeping what `truncate` says, and
    how many document tokens went; None when the rest of the prompt alone does not fit."""
    sampling = request.sampling
    room = min(max_model_len - sampling.max_tokens, sampling.truncate_to or max_model_len)
    document = request.document()
    if document is None:
        return None
    doc_ids = list(tokenizer(document, add_special_tokens=False)["input_ids"])
    keep = len(doc_ids) - (prompt_tokens - room)
    for _ in range(4):  # the cut text, tokenized again, may split or merge a token where it was cut
        if keep <= 0:
            return None
        ids = prompt_token_ids(tokenizer, request.with_document(_cut(tokenizer, doc_ids, keep, sampling.truncate)))
        if len(ids) <= room:
            return ids, len(doc_ids) - keep
        keep -= len(ids) - room + 1
    return None


def document_windows(tokenizer: PreTrainedTokenizerBase, request: GenerationRequest,
                     max_model_len: int) -> list[str] | None:
    """The texts of the windows a request's document splits into (request.windowing), each fitting the
    context with the rest of the prompt and max_tokens (text_windows)."""
    document = request.document()
    if request.windowing is None or document is None:
        return None
    return text_windows(tokenizer, request.with_document, document, request.sampling.max_tokens,
                        request.windowing, max_model_len)


def text_windows(tokenizer: PreTrainedTokenizerBase, prompt: Callable[[str], GenerationRequest], document: str,
                 reserve: int, windowing: Windows, max_model_len: int) -> list[str] | None:
    """The texts of the windows `document` splits into so that `prompt(window)` fits the context with
    `reserve` tokens left for the answer; None when the whole document fits, or when the rest of the
    prompt leaves no room for a window longer than the overlap."""
    prompt_tokens = len(prompt_token_ids(tokenizer, prompt(document)))
    if context_error(prompt_tokens, reserve, max_model_len) is None:
        return None
    doc_ids = list(tokenizer(document, add_special_tokens=False)["input_ids"])
    room = max_model_len - reserve - (prompt_tokens - len(doc_ids)) - WINDOW_MARGIN
    size = min(windowing.window_tokens or room, room)
    if size < 2 * WINDOW_MARGIN:
        return None
    overlap = min(windowing.window_overlap, size // 2)  # at most half a window: each window moves on
    starts = range(0, max(len(doc_ids) - overlap, 1), size - overlap)
    return [str(tokenizer.decode(doc_ids[start:start + size])) for start in starts]


def _cut(tokenizer: PreTrainedTokenizerBase, ids: list[int], keep: int, how: str | None) -> str:
    """The text of `keep` of the document's tokens: its first (head), its last (tail), or half of each
    end with an ellipsis between (middle)."""
    if how == "head":
        return str(tokenizer.decode(ids[:keep]))
    if how == "tail":
        return str(tokenizer.decode(ids[-keep:]))
    front = keep // 2
    return f"{tokenizer.decode(ids[:front])} … {tokenizer.decode(ids[len(ids) - (keep - front):])}"
