"""How a model's token states become one embedding, the same for both engines: the model's own
sentence-transformers pooling config (1_Pooling/config.json) where it has one, else the mean over its
tokens; then L2 normalisation. vLLM gets the same choice as its PoolerConfig."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

Pooling = Literal["MEAN", "CLS", "LAST"]
_MODES: dict[str, Pooling] = {"pooling_mode_mean_tokens": "MEAN", "pooling_mode_cls_token": "CLS",
                              "pooling_mode_lasttoken": "LAST"}


def pooling_of(folder: Path) -> Pooling:
    """The pooling a sentence-transformers model declares; MEAN for any other model."""
    try:
        config = json.loads((folder / "1_Pooling" / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return "MEAN"
    return next((pooling for key, pooling in _MODES.items() if config.get(key)), "MEAN")


def is_matryoshka(folder: Path) -> bool:
    """The model declares vectors that stay meaningful when truncated (as vLLM reads it)."""
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return bool(config.get("matryoshka_dimensions") or config.get("is_matryoshka"))
