"""The vLLM engine, stepped request by request so that chunks can share its continuous batching.

vLLM starts its EngineCore in a spawned child process: build this engine under
`if __name__ == "__main__":` in scripts, and never inside a daemonic process (Celery prefork children).
"""

from __future__ import annotations

import gc
import itertools
import multiprocessing
import os
from typing import TYPE_CHECKING, Any

import torch
from transformers import AutoTokenizer

from schema.errors import EngineError
from schema.jobs import GenerationRequest, GenerationResult
from schema.settings import Settings, get_settings
from worker.engines import admit, failed_result, run_to_completion
from worker.models import prepare_for_vllm, resolve_model

if TYPE_CHECKING:
    import vllm
    from vllm.outputs import RequestOutput

# The CPU build reserves this many GiB for the KV cache; its default share (0.92 of the NUMA
# node) fails at start-up on a 24 GiB machine. Plenty for a 135M model at 2048 tokens.
DEFAULT_CPU_KVCACHE_GIB = "2"

SHUTDOWN_TIMEOUT_S = 15.0

_FINISH_REASONS = {"stop": "stop", "length": "length"}


class VLLMEngine:
    """vLLM's engine driven through add/step, with per-request sampling parameters."""

    name = "vllm"

    def __init__(
        self,
        model: str,
        *,
        settings: Settings | None = None,
        max_model_len: int | None = None,
    ) -> None:
        settings = settings or get_settings()
        self.model_name = model
        self.max_model_len = max_model_len or settings.max_model_len
        self.on_cpu = not torch.cuda.is_available()
        folder = prepare_for_vllm(resolve_model(model), settings.cache_dir)
        self._tokenizer = AutoTokenizer.from_pretrained(folder)
        self._llm: vllm.LLM | None = self._start(str(folder))
        self._keys = itertools.count()
        self.max_num_seqs = int(self._llm.llm_engine.vllm_config.scheduler_config.max_num_seqs)

    def _start(self, folder: str) -> vllm.LLM:
        import vllm

        if multiprocessing.current_process().daemon:
            # vLLM must spawn its EngineCore; daemonic processes may not have children.
            raise EngineError(
                "vLLM cannot start in a daemonic process (Celery prefork): use -P solo or threads"
            )
        options: dict[str, Any] = {"dtype": "bfloat16", "max_model_len": self.max_model_len}
        if self.on_cpu:
            # Read by the EngineCore child at start-up; it inherits our environment.
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", DEFAULT_CPU_KVCACHE_GIB)
            options["enforce_eager"] = True  # no CUDA graphs / compile warm-up on the CPU
        try:
            return vllm.LLM(model=folder, tokenizer=folder, **options)
        except (RuntimeError, ValueError, OSError) as exc:
            raise EngineError(f"vLLM failed to start with model '{self.model_name}': {exc}") from exc

    def generate(self, requests: list[GenerationRequest]) -> list[GenerationResult]:
        """Run a list of requests to completion (the engine loop does the same across chunks)."""
        return run_to_completion(self, requests)

    def add(self, request: GenerationRequest) -> str | GenerationResult:
        """Queue one request in the engine; its key, or at once the failure of a request that cannot run."""
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
            llm.llm_engine.add_request(key, TokensPrompt(prompt_token_ids=runnable[0][1]), params)
        except (RuntimeError, ValueError) as exc:
            return failed_result(f"vLLM refused the request: {exc}")
        return key

    def step(self) -> list[tuple[str, GenerationResult]]:
        """One engine step: every queued sequence advances; the finished ones come back."""
        outputs = self._require_llm().llm_engine.step()
        return [(output.request_id, _result(output)) for output in outputs if output.finished]

    def has_unfinished(self) -> bool:
        return self._require_llm().llm_engine.has_unfinished_requests()

    def abort(self, keys: list[str]) -> None:
        self._require_llm().llm_engine.abort_request(keys)

    def close(self) -> None:
        """Stop the EngineCore child process; `LLM` itself has no shutdown method in vLLM 0.32."""
        llm, self._llm = self._llm, None
        if llm is None:
            return
        core = llm.llm_engine.engine_core
        manager = getattr(getattr(core, "resources", None), "engine_manager", None)
        processes = list(getattr(manager, "processes", []))
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

    sampling = request.sampling
    return SamplingParams(
        max_tokens=sampling.max_tokens,
        temperature=sampling.temperature,
        top_p=sampling.top_p,
        stop=[stop for stop in sampling.stop or [] if stop] or None,
        seed=sampling.seed,
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
