"""A sequence-classification model run with vLLM's pooling runner (`LLM.classify`)."""

from __future__ import annotations

from typing import Any, ClassVar

from schema.errors import EngineError, ErrorCode, ModelError
from schema.jobs import Windows
from schema.models import head_config, head_labels, resolve_model
from schema.settings import Settings, get_settings
from worker.engines.base import CLASSIFY_HEAD
from worker.engines.labels import HeadScores, text_windows_alone
from worker.engines.vllm_engine import VLLMEngine


class VLLMHeadEngine(VLLMEngine):
    """vLLM with runner="pooling": `classify` returns the model's softmax. It runs on VLLMEngine's loading
    and lifecycle, but declares only the head capability: no generation, no prompted labels."""

    capabilities: ClassVar[frozenset[str]] = frozenset({CLASSIFY_HEAD})
    runner_options: ClassVar[dict[str, Any]] = {"runner": "pooling"}

    def __init__(self, model: str, *, settings: Settings | None = None, max_model_len: int | None = None) -> None:
        settings = settings or get_settings()
        config = head_config(resolve_model(model))
        if config is None:
            raise ModelError(f"model '{model}' is not a sequence-classification model with id2label")
        asked, own = max_model_len or settings.max_model_len, config.get("max_position_embeddings")
        super().__init__(model, settings=settings, max_model_len=min(asked, own or asked) if asked else None)
        self.head_labels = head_labels(config)

    def head_windows(self, text: str, windows: Windows) -> list[str] | None:
        """The windows of a text too long for the context (worker.engines.labels.text_windows_alone)."""
        return text_windows_alone(self._tokenizer, text, windows, self.max_model_len)

    def classify_texts(self, texts: list[str]) -> list[HeadScores]:
        """The model's softmax for each text; a text longer than the context fails alone."""
        from vllm.inputs import TokensPrompt

        llm = self._require_llm()
        ids = [list(self._tokenizer(text)["input_ids"]) for text in texts]
        runnable = [i for i, row in enumerate(ids) if 0 < len(row) <= self.max_model_len]
        try:  # nothing else runs on a pooling engine, so LLM.classify may drive it to completion
            outputs = llm.classify([TokensPrompt(prompt_token_ids=ids[i]) for i in runnable], use_tqdm=False)
        except (RuntimeError, ValueError) as exc:
            raise EngineError(f"vLLM classify failed: {exc}") from exc
        done = {i: output.outputs.probs for i, output in zip(runnable, outputs, strict=True)}
        return [HeadScores(done[i], len(row)) if i in done else
                HeadScores(prompt_tokens=len(row), error=f"text is {len(row)} tokens; the model's context is "
                                                         f"{self.max_model_len}",
                           error_code=ErrorCode.context_length_exceeded) for i, row in enumerate(ids)]
