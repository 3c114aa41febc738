"""Embeddings with vLLM: the model run by its pooling runner (`convert="embed"`), pooled as
worker.engines.pooling says (the same as the transformers engine) and L2-normalised.

vLLM runs a model either to generate or to pool, so this is an engine of its own: a worker started with
`--task embed` on vLLM loads it and serves only embeddings; the transformers engine embeds beside
generating.
"""

from __future__ import annotations

from typing import Any, ClassVar

from schema.errors import EngineError, ErrorCode
from schema.models import resolve_model
from schema.settings import Settings, get_settings
from worker.engines.base import EMBED, Embedded
from worker.engines.pooling import is_matryoshka, pooling_of
from worker.engines.vllm_engine import VLLMEngine
from worker.models import prepare_for_vllm


class VLLMEmbedEngine(VLLMEngine):
    """vLLM's pooling runner behind the Embedder capability; it neither generates nor scores labels."""

    capabilities: ClassVar[frozenset[str]] = frozenset({EMBED})

    def __init__(self, model: str, *, settings: Settings | None = None, max_model_len: int | None = None) -> None:
        settings = settings or get_settings()
        folder = prepare_for_vllm(resolve_model(model), settings.cache_dir)
        self.pooling, self.matryoshka = pooling_of(folder), is_matryoshka(folder)
        super().__init__(model, settings=settings, max_model_len=max_model_len)

    def variant_options(self) -> dict[str, Any]:
        from vllm.config import PoolerConfig

        return {"runner": "pooling", "convert": "embed",
                "pooler_config": PoolerConfig(pooling_type=self.pooling, use_activation=True)}

    def embed(self, texts: list[str]) -> list[Embedded]:
        """The pooled, normalised embedding of each text; a text longer than the context fails alone."""
        from vllm.inputs import TokensPrompt

        llm = self._require_llm()
        ids = [list(self._tokenizer(text)["input_ids"]) for text in texts]  # the tokens transformers sees
        runnable = [i for i, row in enumerate(ids) if 0 < len(row) <= self.max_model_len]
        try:  # nothing else runs on a pooling engine, so LLM.embed may drive it to completion
            outputs: Any = llm.embed([TokensPrompt(prompt_token_ids=ids[i]) for i in runnable], use_tqdm=False)
        except (RuntimeError, ValueError) as exc:
            raise EngineError(f"vLLM embed failed: {exc}") from exc
        done = {i: [float(x) for x in output.outputs.embedding] for i, output in zip(runnable, outputs, strict=True)}
        return [Embedded(done[i], len(row)) if i in done else
                Embedded(prompt_tokens=len(row), error_code=ErrorCode.context_length_exceeded,
                         error=f"text is {len(row)} tokens; the model's context is {self.max_model_len}")
                for i, row in enumerate(ids)]
