"""The Hugging Face transformers engine: batched `generate`, for machines without vLLM."""

from __future__ import annotations

import gc
import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from schema.errors import EngineError, ErrorCode, ModelError
from schema.jobs import GenerationRequest, GenerationResult, SamplingParams, Windows
from schema.models import resolve_model
from schema.settings import Settings, get_settings
from worker.engines import (
    Admitted,
    admit,
    context_length,
    document_windows,
    failed_result,
    hf_embed,
    hf_labels,
    hf_structured,
)
from worker.engines.base import EMBED, GENERATE, HIDDEN_STATES, SCORE_LABELS, Embedded
from worker.engines.labels import (
    Choice,
    LabelLogprobs,
    LabelQuery,
    end_token_id,
    greedy_walk,
    query_windows,
    split_runnable,
)
from worker.engines.pooling import Pooling, is_matryoshka, pooling_of
from worker.models import prepare_weights

DEFAULT_BATCH_SIZE = 32


@dataclass(frozen=True)
class _Item:
    index: int  # position in the caller's request list
    ids: list[int]
    truncated: int = 0  # document tokens cut to fit (worker.engines.fit)


def compute_dtype() -> torch.dtype:
    """bf16 on a GPU or a CPU that computes it natively (AVX-512-BF16 or AMX): there ~1.7x the float32
    speed with the same greedy answers. Elsewhere float32: on an AVX2-only CPU (AMD EPYC here) bf16 is
    emulated, 1.6 against 11.3 tokens/s for float32 (32 prompts x 24 tokens, this model)."""
    if torch.cuda.is_available() or torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported():
        return torch.bfloat16
    return torch.float32


class TransformersEngine:
    """Runs requests with `model.generate`, batching those that share sampling parameters."""

    name = "transformers"
    capabilities: ClassVar[frozenset[str]] = frozenset({GENERATE, SCORE_LABELS, EMBED, HIDDEN_STATES})

    def __init__(
        self,
        model: str,
        *,
        settings: Settings | None = None,
        max_model_len: int | None = None,
        batch_size: int = DEFAULT_BATCH_SIZE,
        dtype: torch.dtype | None = None,
        layers: int | None = None,
    ) -> None:
        """`layers`: load only the first this many layers (worker.engines.vllm_engine reads hidden states so)."""
        settings = settings or get_settings()
        self.model_name = model
        self.batch_size = batch_size
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self._model: PreTrainedModel | None
        source = resolve_model(model)
        dtype = dtype or compute_dtype()
        folder = prepare_weights(source, settings.cache_dir, str(dtype).removeprefix("torch."))
        self._tokenizer, self._model = _load(source.name, folder, dtype, self.device, layers)
        self.pooling, self.matryoshka = pooling_of(source.folder), is_matryoshka(source.folder)
        own = getattr(self._model.config, "max_position_embeddings", None)
        self.max_model_len = context_length(max_model_len or settings.max_model_len, own, self.name)
        self._eos_ids = _eos_ids(self._model, self._tokenizer)
        self._enforcer_data: Any = None  # lm-format-enforcer's view of the vocabulary, on first use
        self.max_num_seqs = batch_size
        self.num_hidden_layers = int(self._model.config.num_hidden_layers)
        self._keys = itertools.count()
        self._pending: dict[str, tuple[SamplingParams, Admitted]] = {}  # key -> (sampling, prompt ids)

    def generate(self, requests: list[GenerationRequest]) -> list[GenerationResult]:
        self._require_model()
        results, runnable = admit(self._tokenizer, requests, self.max_model_len)
        # Only requests with identical sampling parameters can share one generate() call.
        groups: dict[str, tuple[SamplingParams, list[_Item]]] = {}
        for a in runnable:
            sampling = requests[a.index].sampling
            groups.setdefault(sampling.model_dump_json(), (sampling, []))[1].append(_Item(a.index, a.ids, a.truncated))
        for sampling, items in groups.values():
            for index, result in self._run_group(sampling, items):
                results[index] = result
        return [r if r is not None else failed_result("not run") for r in results]

    def add(self, request: GenerationRequest) -> str | GenerationResult:
        """Queue one request for the next step; requests that share sampling parameters run together."""
        self._require_model()
        (failure,), runnable = admit(self._tokenizer, [request], self.max_model_len)
        if failure is not None:
            return failure
        key = str(next(self._keys))
        self._pending[key] = (request.sampling, runnable[0])
        return key

    def step(self) -> list[tuple[str, GenerationResult]]:
        """Run one sub-batch: the oldest request's sampling group, up to `batch_size` requests."""
        if not self._pending:
            return []
        sampling = next(iter(self._pending.values()))[0]
        keys = [k for k, (s, _) in self._pending.items() if s == sampling][: self.batch_size]
        admitted = [self._pending.pop(key)[1] for key in keys]
        items = [_Item(index, a.ids, a.truncated) for index, a in enumerate(admitted)]
        keys_by_index = dict(enumerate(keys))
        return [(keys_by_index[index], result) for index, result in self._run_group(sampling, items)]

    def windows(self, request: GenerationRequest) -> list[str] | None:
        """The windows of a request's document too long for the context (worker.engines.document_windows)."""
        return document_windows(self._tokenizer, request, self.max_model_len)

    def has_unfinished(self) -> bool:
        return bool(self._pending)

    def healthy(self) -> bool:
        return self._model is not None  # runs in this process: alive as long as the worker is

    def abort(self, keys: list[str]) -> None:
        for key in keys:
            self._pending.pop(key, None)

    # --- embeddings ------------------------------------------------------------------------------

    def embed(self, texts: list[str]) -> list[Embedded]:
        """The model's last hidden state pooled (worker.engines.pooling) and L2-normalised, per text."""
        return self._pooled(texts, self.pooling, -1)

    def hidden_states(self, texts: list[str], layer: int) -> list[Embedded]:
        """The output of layer `layer` (1 to num_hidden_layers), averaged over each text's tokens and
        L2-normalised: what a probe (worker.kinds.probe) reads."""
        return self._pooled(texts, "MEAN", layer)

    def _pooled(self, texts: list[str], pooling: Pooling, layer: int) -> list[Embedded]:
        results = [Embedded() for _ in texts]
        runnable: list[tuple[int, list[int]]] = []
        for index, text in enumerate(texts):
            ids = list(self._tokenizer(text)["input_ids"])
            if not ids or len(ids) > self.max_model_len:
                results[index] = Embedded(prompt_tokens=len(ids), error_code=ErrorCode.context_length_exceeded,
                                          error=f"text is {len(ids)} tokens; the model's context is "
                                                f"{self.max_model_len}")
            else:
                runnable.append((index, ids))
        ordered = sorted(runnable, key=lambda item: len(item[1]))  # similar lengths pad least
        for start in range(0, len(ordered), self.batch_size):
            batch = ordered[start : start + self.batch_size]
            vectors = hf_embed.pooled(self._require_model(), self._tokenizer, [ids for _, ids in batch], pooling,
                                      layer)
            for (index, ids), vector in zip(batch, vectors, strict=True):
                results[index] = Embedded(vector, len(ids))
        return results

    # --- classification ------------------------------------------------------------------------

    def label_logprobs(self, queries: list[LabelQuery]) -> list[LabelLogprobs]:
        """Each label's token log-probabilities as a continuation of its query's prompt."""
        model = self._require_model()
        slots, runnable = split_runnable(self._tokenizer, queries, self.max_model_len)
        scores = hf_labels.token_logprobs(model, self._tokenizer, [t for _, t in runnable], self.batch_size)
        for (index, tokens), per_label in zip(runnable, scores, strict=True):
            slots[index] = LabelLogprobs(per_label, len(tokens.prompt))
        return [slot if slot is not None else LabelLogprobs(error="not run") for slot in slots]

    def label_windows(self, query: Callable[[str], LabelQuery], text: str, windows: Windows) -> list[str] | None:
        """The windows of a text too long for the context (worker.engines.labels.query_windows)."""
        return query_windows(self._tokenizer, query, text, windows, self.max_model_len)

    def choose(self, queries: list[LabelQuery]) -> list[Choice]:
        """Guided choice: constrained greedy decoding, which is a greedy walk down the labels' token
        trie; the label scores hold every logprob that walk reads."""
        model = self._require_model()
        results = [Choice() for _ in queries]
        slots, runnable = split_runnable(self._tokenizer, queries, self.max_model_len)
        for index, slot in enumerate(slots):
            if slot is not None:
                results[index].error = slot.error
        scores = hf_labels.token_logprobs(model, self._tokenizer, [t for _, t in runnable], self.batch_size)
        for (index, tokens), per_label in zip(runnable, scores, strict=True):
            picked = greedy_walk(tokens.continuations, per_label)
            generated = tokens.continuations[picked]  # then the end of turn, as guided generation does
            results[index] = Choice(queries[index].labels[picked], len(tokens.prompt),
                                    len(generated) + (generated[-1] != end_token_id(self._tokenizer)))
        return results


    def close(self) -> None:
        self._model = None
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _require_model(self) -> PreTrainedModel:
        if self._model is None:
            raise EngineError("the transformers engine is closed")
        return self._model

    def _run_group(
        self, sampling: SamplingParams, items: list[_Item]
    ) -> Iterator[tuple[int, GenerationResult]]:
        if sampling.seed is not None:
            torch.manual_seed(sampling.seed)
        # Similar lengths together: less padding per sub-batch.
        ordered = sorted(items, key=lambda item: len(item.ids))
        for start in range(0, len(ordered), self.batch_size):
            batch = ordered[start : start + self.batch_size]
            for item, result in zip(batch, self._run_batch(sampling, batch)):
                yield item.index, result

    def _run_batch(self, sampling: SamplingParams, items: list[_Item]) -> list[GenerationResult]:
        inputs = self._tokenizer.pad({"input_ids": [item.ids for item in items]}, return_tensors="pt")
        inputs = inputs.to(self.device)
        model: Any = self._require_model()  # mypy resolves `generate` through nn.Module.__getattr__
        try:
            with torch.inference_mode():
                output = model.generate(**inputs, **self._generate_kwargs(sampling))
        except hf_structured.UnsupportedSchema as exc:  # the schema, not the engine: these items fail alone
            return [failed_result(f"the JSON schema uses what constrained decoding cannot enforce: {exc}",
                                  len(item.ids), ErrorCode.unsupported) for item in items]
        new_tokens = output[:, inputs["input_ids"].shape[1] :].tolist()
        return [self._result(item, tokens, sampling) for item, tokens in zip(items, new_tokens)]

    def _generate_kwargs(self, sampling: SamplingParams) -> dict[str, Any]:
        kwargs: dict[str, Any] = {
            "max_new_tokens": sampling.max_tokens,
            "eos_token_id": sorted(self._eos_ids),
            "pad_token_id": self._tokenizer.pad_token_id,
        }
        if sampling.temperature > 0:
            # top_k=0 turns off transformers' default top-k 50, as in vLLM and the OpenAI API.
            kwargs.update(do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p, top_k=0)
        else:
            kwargs.update(do_sample=False)
        if sampling.response_format is not None:
            if self._enforcer_data is None:  # built once: it decodes the whole vocabulary
                self._enforcer_data = hf_structured.tokenizer_data(self._tokenizer, sorted(self._eos_ids))
            kwargs["prefix_allowed_tokens_fn"] = hf_structured.allowed_tokens_fn(self._enforcer_data,
                                                                                sampling.response_format)
        stops = [stop for stop in sampling.stop or [] if stop]
        if stops:
            # Stops each sequence early; the exact cut is made in _result.
            kwargs.update(stop_strings=stops, tokenizer=self._tokenizer)
        return kwargs

    def _result(self, item: _Item, tokens: list[int], sampling: SamplingParams) -> GenerationResult:
        tokens, hit_eos = self._until_eos(tokens)
        text = self._decode(tokens)
        cut = _first_stop(text, sampling.stop)
        if cut is not None:
            tokens = tokens[: self._tokens_until_stop(tokens, sampling.stop or [])]
            text = text[:cut]
        finished = hit_eos or cut is not None or len(tokens) < sampling.max_tokens
        return GenerationResult(
            text=text,
            finish_reason="stop" if finished else "length",
            prompt_tokens=len(item.ids),
            completion_tokens=len(tokens),
            truncated_tokens=item.truncated,
        )

    def _until_eos(self, tokens: list[int]) -> tuple[list[int], bool]:
        """Tokens up to and including the first EOS (counted, as vLLM does); padding dropped."""
        for position, token in enumerate(tokens):
            if token in self._eos_ids:
                return tokens[: position + 1], True
        pad = self._tokenizer.pad_token_id
        while tokens and tokens[-1] == pad:  # a sequence that stopped on a stop string, then padded
            tokens = tokens[:-1]
        return tokens, False

    def _tokens_until_stop(self, tokens: list[int], stops: list[str]) -> int:
        """The fewest leading tokens whose text contains a stop string (binary search: it only grows)."""
        low, high = 1, len(tokens)
        while low < high:
            middle = (low + high) // 2
            if _first_stop(self._decode(tokens[:middle]), stops) is None:
                low = middle + 1
            else:
                high = middle
        return high

    def _decode(self, tokens: list[int]) -> str:
        return str(self._tokenizer.decode(tokens, skip_special_tokens=True))


def _load(
    name: str, folder: Path, dtype: torch.dtype, device: torch.device, layers: int | None = None
) -> tuple[PreTrainedTokenizerBase, PreTrainedModel]:
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
        # Eager attention: on the CPU, SDPA in bf16 garbles left-padded rows of a batch (measured here:
        # the shortest of 16 prompts answered nonsense); eager is as fast and exact.
        model = AutoModelForCausalLM.from_pretrained(
            folder, dtype=dtype, attn_implementation="eager", **({"num_hidden_layers": layers} if layers else {}),
        )
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot load model '{name}': {exc}") from exc
    tokenizer.padding_side = "left"  # decoder-only: new tokens must follow the prompt directly
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.to(device)  # type: ignore[arg-type]  # transformers' decorator hides the signature
    return tokenizer, model.eval()


def _eos_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> set[int]:
    configured = model.generation_config.eos_token_id
    ids = set(configured if isinstance(configured, list) else [configured])
    ids.add(tokenizer.eos_token_id)
    ids.discard(None)
    if not ids:
        raise ModelError("the model defines no end-of-sequence token")
    return ids  # type: ignore[return-value]


def _first_stop(text: str, stops: list[str] | None) -> int | None:
    """Where the earliest stop string starts in `text`, or None."""
    found = [position for stop in stops or [] if stop and (position := text.find(stop)) >= 0]
    return min(found) if found else None
