"""A sequence-classification model run with transformers: its softmax over its own labels."""

from __future__ import annotations

import gc
from typing import Any, ClassVar

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from schema.errors import EngineError, ErrorCode, ModelError
from schema.jobs import Windows
from schema.models import head_config, head_labels, resolve_model
from schema.settings import Settings, get_settings
from worker.engines import context_length
from worker.engines.base import CLASSIFY_HEAD
from worker.engines.labels import HeadScores, text_windows_alone
from worker.engines.transformers_engine import compute_dtype

DEFAULT_BATCH_SIZE = 32


class TransformersHeadEngine:
    """AutoModelForSequenceClassification: a classifier with its own labels; it neither generates nor
    scores prompted labels."""

    name = "transformers"
    capabilities: ClassVar[frozenset[str]] = frozenset({CLASSIFY_HEAD})

    def __init__(self, model: str, *, settings: Settings | None = None, max_model_len: int | None = None,
                 batch_size: int = DEFAULT_BATCH_SIZE, dtype: torch.dtype | None = None) -> None:
        settings = settings or get_settings()
        source = resolve_model(model)
        config = head_config(source)
        if config is None:
            raise ModelError(f"model '{model}' is not a sequence-classification model with id2label")
        self.model_name, self.batch_size, self.max_num_seqs = model, batch_size, batch_size
        self.head_labels = head_labels(config)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        try:
            self._tokenizer = AutoTokenizer.from_pretrained(source.folder)
            loaded = AutoModelForSequenceClassification.from_pretrained(source.folder, dtype=dtype or compute_dtype(),
                                                                        attn_implementation="eager")
        except (OSError, ValueError) as exc:
            raise ModelError(f"cannot load classification model '{model}': {exc}") from exc
        if self._tokenizer.pad_token_id is None:
            self._tokenizer.pad_token = self._tokenizer.eos_token
        self._tokenizer.padding_side = "right"  # causal: pads after the text cannot change it
        if loaded.config.pad_token_id is None:  # the model finds each row's last token by it
            loaded.config.pad_token_id = self._tokenizer.pad_token_id
        self._model: Any = loaded.to(self.device).eval()
        own = getattr(loaded.config, "max_position_embeddings", None)
        self.max_model_len = context_length(max_model_len or settings.max_model_len, own, "transformers head")

    def head_windows(self, text: str, windows: Windows) -> list[str] | None:
        """The windows of a text too long for the context (worker.engines.labels.text_windows_alone)."""
        return text_windows_alone(self._tokenizer, text, windows, self.max_model_len)

    def classify_texts(self, texts: list[str]) -> list[HeadScores]:
        """The model's softmax for each text; a text longer than the context fails alone."""
        model = self._require_model()
        results: list[HeadScores] = []
        ids = [list(self._tokenizer(text)["input_ids"]) for text in texts]
        runnable = [i for i, row in enumerate(ids) if 0 < len(row) <= self.max_model_len]
        probabilities: dict[int, list[float]] = {}
        for start in range(0, len(runnable), self.batch_size):
            batch = runnable[start : start + self.batch_size]
            padded = self._tokenizer.pad({"input_ids": [ids[i] for i in batch]}, return_tensors="pt")
            with torch.inference_mode():
                logits = model(**padded.to(self.device)).logits.float()
            probabilities.update(zip(batch, logits.softmax(-1).tolist()))
        for index, row in enumerate(ids):
            if index in probabilities:
                results.append(HeadScores(probabilities[index], len(row)))
            else:
                results.append(HeadScores(prompt_tokens=len(row), error_code=ErrorCode.context_length_exceeded,
                                          error=f"text is {len(row)} tokens; the model's context is "
                                                f"{self.max_model_len}"))
        return results

    def healthy(self) -> bool:
        return self._model is not None  # runs in this process: alive as long as the worker is

    def close(self) -> None:
        self._model = None
        gc.collect()

    def _require_model(self) -> Any:
        if self._model is None:
            raise EngineError("the transformers engine is closed")
        return self._model
