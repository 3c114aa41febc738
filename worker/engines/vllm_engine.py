"""The vLLM engine, stepped request by request so that chunks can share its continuous batching.

vLLM starts its EngineCore in a spawned child process: build this engine under
`if __name__ == "__main__":` in scripts, and never inside a daemonic process (Celery prefork children).
"""

from __future__ import annotations

import gc
import itertools
import json
import logging
import multiprocessing
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar, cast

import torch
from transformers import AutoTokenizer

from schema.errors import EngineError, ErrorCode
from schema.jobs import GenerationRequest, GenerationResult, Windows
from schema.models import resolve_model
from schema.settings import Settings, get_settings
from worker.engines import (
    admit,
    context_length,
    document_windows,
    failed_result,
    run_to_completion,
    vllm_labels,
)
from worker.engines.base import GENERATE, HIDDEN_STATES, SCORE_LABELS, Embedded
from worker.engines.labels import (
    Choice,
    LabelLogprobs,
    LabelQuery,
    Refused,
    query_windows,
    split_runnable,
    tokenize,
)
from worker.models import prepare_for_vllm

if TYPE_CHECKING:
    import vllm
    from vllm.outputs import RequestOutput

# The CPU build reserves this many GiB for the KV cache; its default share (0.92 of the NUMA
# node) fails at start-up on a 24 GiB machine. Plenty for a 135M model at 2048 tokens.
DEFAULT_CPU_KVCACHE_GIB = "2"

SHUTDOWN_TIMEOUT_S = 15.0
CPU_BLOCK_SIZE = 32  # tokens per KV-cache block on the CPU; vLLM's CPU backend wants multiples of 32
WARMUP_MESSAGES = [{"role": "user", "content": "Say hello."}]  # the warm-up request: this, 1 output token

log = logging.getLogger(__name__)


def vllm_dtype() -> str:
    """bf16 on a GPU and on a CPU with AVX-512-BF16. On a CPU with AMX float16: there vLLM (0.32) runs
    bf16 attention through its AMX kernel, whose greedy answers came out garbled ("capital of France?"
    -> "L'Étoile, la Marseillaise, la femme, ..."), while float16 answers "The capital of France is
    Paris.". On any other CPU float32: bf16 is emulated there, 16 against 55 tokens/s for float32 on an
    AVX2-only AMD EPYC (64 requests, bench.bare_vllm)."""
    if torch.cuda.is_available():
        return "bfloat16"
    if torch.cpu._is_amx_tile_supported():
        return "float16"
    return "bfloat16" if torch.cpu._is_avx512_bf16_supported() else "float32"


def chat_prompt_ids(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False))


def warm_up(llm: vllm.LLM, tokenizer: Any) -> None:
    """One short greedy request, so the first real one does not pay the kernels' first run, then an
    empty prefix cache, so it leaves nothing behind. The benchmarks do the same to bare vLLM."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    llm.generate([TokensPrompt(prompt_token_ids=chat_prompt_ids(tokenizer, WARMUP_MESSAGES))],
                 SamplingParams(max_tokens=1, temperature=0), use_tqdm=False)
    if not llm.reset_prefix_cache():
        raise EngineError("vLLM could not reset its prefix cache after the warm-up request")


def effective_options(config: Any) -> dict[str, Any]:
    """The engine limits vLLM settled on (a VllmConfig), to check that runs compare like with like."""
    return {"max_num_seqs": config.scheduler_config.max_num_seqs,
            "max_num_batched_tokens": config.scheduler_config.max_num_batched_tokens,
            "block_size": config.cache_config.block_size, "enforce_eager": config.model_config.enforce_eager,
            "max_model_len": config.model_config.max_model_len}


_FINISH_REASONS = {"stop": "stop", "length": "length"}


class VLLMEngine:
    """vLLM's engine driven through add/step, with per-request sampling parameters."""

    name = "vllm"
    capabilities: ClassVar[frozenset[str]] = frozenset({GENERATE, SCORE_LABELS, HIDDEN_STATES})
    runner_options: ClassVar[dict[str, Any]] = {}  # vllm.LLM options of a variant (worker.engines.vllm_head)

    def __init__(
        self,
        model: str,
        *,
        settings: Settings | None = None,
        max_model_len: int | None = None,
    ) -> None:
        settings = settings or get_settings()
        self.model_name = model
        asked = max_model_len or settings.max_model_len or settings.vllm_options.get("max_model_len")
        self.max_model_len = asked or -1  # -1: vLLM takes the model's own, fitted to its KV cache
        self.on_cpu = not torch.cuda.is_available()
        self._vllm_options = settings.vllm_options
        folder = prepare_for_vllm(resolve_model(model), settings.cache_dir)
        self._tokenizer = AutoTokenizer.from_pretrained(folder)
        self._llm: vllm.LLM | None = self._start(str(folder))
        self._keys = itertools.count()
        self.options = effective_options(self._llm.llm_engine.vllm_config)
        self.max_num_seqs = int(self.options["max_num_seqs"])
        own = getattr(self._llm.llm_engine.model_config.hf_text_config, "max_position_embeddings", None)
        self.max_model_len = context_length(asked, own, self.name, chosen=int(self.options["max_model_len"]))
        self.num_hidden_layers = int(getattr(self._llm.llm_engine.model_config.hf_text_config, "num_hidden_layers", 0))
        self._settings = settings
        self._hidden: dict[int, Any] = {}  # layers loaded -> TransformersEngine (hidden_states)
        if self._llm.llm_engine.model_config.runner_type == "generate":
            try:
                warm_up(self._llm, self._tokenizer)
            except BaseException:
                self.close()  # no EngineCore child left behind
                raise
        log.info("vLLM engine ready: %s", json.dumps(self.options))
        # Finished generation results that a classification call stepped past; step() hands them out.
        self._stash: list[tuple[str, GenerationResult]] = []
        self._truncated: dict[str, int] = {}  # key -> document tokens cut to fit (worker.engines.fit)

    def _start(self, folder: str) -> vllm.LLM:
        import vllm

        if multiprocessing.current_process().daemon:
            # vLLM must spawn its EngineCore; daemonic processes may not have children.
            raise EngineError(
                "vLLM cannot start in a daemonic process (Celery prefork): use -P solo or threads"
            )
        options: dict[str, Any] = {"dtype": vllm_dtype(), "max_model_len": self.max_model_len}
        if self.on_cpu:
            # Read by the EngineCore child at start-up; it inherits our environment.
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", DEFAULT_CPU_KVCACHE_GIB)
            options["enforce_eager"] = True  # no CUDA graphs / compile warm-up on the CPU
            # The CPU default (128-token KV blocks) leaves prompts shorter than a block out of the
            # prefix cache. At 32 the shared instruction prefix and a label-scoring prompt's earlier
            # requests are reused; measured here: label scoring 2.5-2.8x, generation 1.1x the docs/s.
            options["block_size"] = CPU_BLOCK_SIZE
        options.update(self.variant_options())
        options.update(self._vllm_options)  # GRISTMILL_VLLM_OPTIONS, last
        try:
            return vllm.LLM(model=folder, tokenizer=folder, **options)
        except (RuntimeError, ValueError, OSError) as exc:
            raise EngineError(f"vLLM failed to start with model '{self.model_name}': {exc}") from exc

    def variant_options(self) -> dict[str, Any]:
        """vllm.LLM options of a variant of this engine (worker.engines.vllm_head, vllm_embed)."""
        return dict(self.runner_options)

    def generate(self, requests: list[GenerationRequest]) -> list[GenerationResult]:
        """Run a list of requests to completion (the engine loop does the same across chunks)."""
        return run_to_completion(self, requests)

    def add(self, request: GenerationRequest) -> str | GenerationResult:
        """Queue one request in the engine; its key, or at once the failure of a request that cannot run."""
        from vllm.exceptions import VLLMClientError
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind

        llm = self._require_llm()
        # Over-long prompts are failed here: vLLM would raise for them.
        (failure,), runnable = admit(self._tokenizer, [request], self.max_model_len)
        if failure is not None:
            return failure
        params = _sampling_params(request)
        params.output_kind = RequestOutputKind.FINAL_ONLY  # we only want finished sequences
        key = str(next(self._keys))
        try:
            llm.llm_engine.add_request(key, TokensPrompt(prompt_token_ids=runnable[0].ids), params)
        except RuntimeError as exc:  # the engine, not the request
            raise EngineError(f"vLLM could not take a request: {exc}") from exc
        except (ValueError, VLLMClientError) as exc:
            # A response_format whose schema no grammar can satisfy (minimum above maximum) is refused here.
            code = ErrorCode.schema_mismatch if params.structured_outputs else ErrorCode.invalid_request
            return failed_result(f"vLLM refused the request: {exc}", code=code)
        if runnable[0].truncated:
            self._truncated[key] = runnable[0].truncated
        return key

    def step(self) -> list[tuple[str, GenerationResult]]:
        """One engine step: every queued sequence advances; the finished ones come back."""
        stashed, self._stash = self._stash, []
        if stashed and not self._require_llm().llm_engine.has_unfinished_requests():
            return stashed
        outputs = cast("list[RequestOutput]", self._require_llm().llm_engine.step())  # a generating engine
        return stashed + [(output.request_id, self._result(output)) for output in outputs if output.finished]

    def _result(self, output: RequestOutput) -> GenerationResult:
        result = _result(output)
        truncated = self._truncated.pop(output.request_id, 0)
        return result.model_copy(update={"truncated_tokens": truncated}) if truncated else result

    def windows(self, request: GenerationRequest) -> list[str] | None:
        """The windows of a request's document too long for the context (worker.engines.document_windows)."""
        return document_windows(self._tokenizer, request, self.max_model_len)

    def has_unfinished(self) -> bool:
        return bool(self._stash) or self._require_llm().llm_engine.has_unfinished_requests()

    # --- classification (call these from the thread that steps the engine: worker.engine_loop) ------

    def label_logprobs(self, queries: list[LabelQuery]) -> list[LabelLogprobs]:
        """Each label's token log-probabilities as a continuation of its query's prompt."""
        slots, runnable = split_runnable(self._tokenizer, queries, self.max_model_len)
        max_ids = int(self._require_llm().llm_engine.model_config.max_logprobs)
        scores = vllm_labels.token_logprobs(self._run, [tokens for _, tokens in runnable], max_ids)
        for (index, tokens), per_label in zip(runnable, scores, strict=True):
            slots[index] = LabelLogprobs(per_label, len(tokens.prompt))
        return [slot if slot is not None else LabelLogprobs(error="not run") for slot in slots]

    def hidden_states(self, texts: list[str], layer: int) -> list[Embedded]:
        """vLLM's generation runner gives no hidden states: they are read through transformers from the
        same weights, loaded on first use up to one layer past `layer` (only the last layer's output
        passes the model's final norm: a model cut at `layer` would not give the full model's)."""
        from worker.engines.transformers_engine import TransformersEngine

        layers = min(layer + 1, self.num_hidden_layers)
        if layers not in self._hidden:
            self._hidden[layers] = TransformersEngine(self.model_name, settings=self._settings,
                                                      max_model_len=self.max_model_len, layers=layers)
        return cast("list[Embedded]", self._hidden[layers].hidden_states(texts, layer))

    def label_windows(self, query: Callable[[str], LabelQuery], text: str, windows: Windows) -> list[str] | None:
        """The windows of a text too long for the context (worker.engines.labels.query_windows)."""
        return query_windows(self._tokenizer, query, text, windows, self.max_model_len)

    def choose(self, queries: list[LabelQuery]) -> list[Choice]:
        """Guided choice: greedy generation constrained to one of the labels (structured outputs)."""
        results: list[Choice] = [Choice() for _ in queries]
        asks: list[tuple[int, list[int]]] = []
        for index, query in enumerate(queries):
            tokens = tokenize(self._tokenizer, query, self.max_model_len)
            if isinstance(tokens, Refused):
                results[index].error, results[index].error_code = tokens.message, tokens.code
            else:
                asks.append((index, tokens.prompt))
        outputs = self._run([(prompt, vllm_labels.choice_params(queries[i].continuations())) for i, prompt in asks])
        for (index, prompt), output in zip(asks, outputs, strict=True):
            text = output.outputs[0].text.strip()
            results[index] = Choice(label=text if text in queries[index].labels else None,
                                    prompt_tokens=len(prompt), completion_tokens=len(output.outputs[0].token_ids),
                                    error=None if text in queries[index].labels else
                                    f"guided choice ended without a label (generated {text!r})")
        return results


    def _run(self, requests: list[tuple[list[int], Any]]) -> list[RequestOutput]:
        """Run requests to completion in the engine, alongside any generation in flight (whose
        finished results are kept for step())."""
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind

        engine = self._require_llm().llm_engine
        order: dict[str, int] = {}
        try:
            for prompt, params in requests:
                params.output_kind = RequestOutputKind.FINAL_ONLY
                key = f"c{next(self._keys)}"  # never a generation key: those are plain numbers
                engine.add_request(key, TokensPrompt(prompt_token_ids=prompt), params)
                order[key] = len(order)
        except (RuntimeError, ValueError) as exc:  # labels and lengths were checked: not one bad item
            engine.abort_request(list(order))
            raise EngineError(f"vLLM refused a classification request: {exc}") from exc
        done: list[RequestOutput | None] = [None] * len(requests)
        missing = len(requests)
        while missing:
            if not engine.has_unfinished_requests():
                raise EngineError("vLLM dropped classification requests before they finished")
            for output in cast("list[RequestOutput]", engine.step()):  # a generating engine: no pooling
                if output.request_id in order and output.finished:
                    done[order[output.request_id]] = output
                    missing -= 1
                elif output.finished:
                    self._stash.append((output.request_id, _result(output)))
        return [output for output in done if output is not None]

    def abort(self, keys: list[str]) -> None:
        self._require_llm().llm_engine.abort_request(keys)
        for key in keys:
            self._truncated.pop(key, None)

    def healthy(self) -> bool:
        """False once an engine process has died: vLLM's step would then wait forever."""
        return all(process.is_alive() for process in self._processes())

    def _processes(self) -> list[multiprocessing.Process]:
        if self._llm is None:
            return []
        manager = getattr(getattr(self._llm.llm_engine.engine_core, "resources", None), "engine_manager", None)
        return list(getattr(manager, "processes", []))

    def close(self) -> None:
        """Stop the EngineCore child process; `LLM` itself has no shutdown method in vLLM 0.32."""
        for reader in self._hidden.values():
            reader.close()
        processes = self._processes()
        llm, self._llm = self._llm, None
        if llm is None:
            return
        core = llm.llm_engine.engine_core
        if not all(process.is_alive() for process in processes):  # a dead engine cannot shut down politely
            for process in processes:
                process.kill()
                process.join(timeout=SHUTDOWN_TIMEOUT_S)
            return
        # Past the timeout vLLM kills the EngineCore; the default 5 s is shorter than its teardown.
        core.shutdown(timeout=SHUTDOWN_TIMEOUT_S)
        for process in processes:
            process.join(timeout=SHUTDOWN_TIMEOUT_S)  # reap it: vLLM kills but never waits (zombie)
        del llm, core
        gc.collect()

    def _require_llm(self) -> vllm.LLM:
        if self._llm is None:
            raise EngineError("the vLLM engine is closed")
        return self._llm


def _sampling_params(request: GenerationRequest) -> vllm.SamplingParams:
    from vllm import SamplingParams
    from vllm.sampling_params import StructuredOutputsParams

    sampling = request.sampling
    fmt = sampling.response_format
    structured = None if fmt is None else (  # vLLM's structured outputs (xgrammar) constrain decoding
        StructuredOutputsParams(choice=list(fmt.choice)) if fmt.choice is not None
        else StructuredOutputsParams(json=fmt.json_schema) if fmt.json_schema is not None
        else StructuredOutputsParams(json_object=True))
    return SamplingParams(
        max_tokens=sampling.max_tokens,
        temperature=sampling.temperature,
        top_p=sampling.top_p,
        stop=[stop for stop in sampling.stop or [] if stop] or None,
        seed=sampling.seed,
        structured_outputs=structured,
    )


def _result(output: RequestOutput) -> GenerationResult:
    completion = output.outputs[0]
    reason = _FINISH_REASONS.get(completion.finish_reason or "")
    prompt_tokens = len(output.prompt_token_ids or [])
    if reason is None:
        return failed_result(f"vLLM finished with '{completion.finish_reason}'", prompt_tokens)
    return GenerationResult(
        text=completion.text,
        finish_reason=reason,  # type: ignore[arg-type]
        prompt_tokens=prompt_tokens,
        completion_tokens=len(completion.token_ids),
    )
