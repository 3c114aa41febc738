"""Run (d), the naive pattern: one Celery task per document, each calling `generate` on one prompt.

Started as its own worker (`celery -A bench.naive_celery worker -P solo`); the engine is loaded once at
worker start (gristmill's VLLMEngine, with its warm-up and GRISTMILL_VLLM_OPTIONS), as a careful user
would, so the only difference from gristmill is one prompt per call.
"""

from __future__ import annotations

import os
from typing import Any

from celery import Celery, signals

BROKER = os.environ.get("NAIVE_BROKER_URL", "redis://127.0.0.1:6379/14")
app = Celery("naive", broker=BROKER, backend=BROKER)
app.conf.update(task_serializer="json", accept_content=["json"], result_serializer="json",
                task_acks_late=True, worker_prefetch_multiplier=1)
_engine: Any = None


@signals.worker_init.connect
def _load_engine(**_: Any) -> None:
    global _engine
    from worker.engines import load_engine

    _engine = load_engine(os.environ.get("GRISTMILL_MODEL", "smollm2-135m-instruct"), "vllm")


@signals.worker_shutdown.connect
def _close_engine(**_: Any) -> None:
    if _engine is not None:
        _engine.close()


@app.task(name="naive.engine")
def engine_options() -> dict[str, Any]:
    """The loaded engine's effective options; its answer also says the worker is ready."""
    return dict(_engine.options)


@app.task(name="naive.generate")
def generate(messages: list[dict[str, str]], max_tokens: int) -> dict[str, Any]:
    from schema.jobs import GenerationRequest

    request = GenerationRequest.model_validate({"messages": messages, "sampling": {"max_tokens": max_tokens}})
    result = _engine.generate([request])[0]
    return {"text": result.text, "completion_tokens": result.completion_tokens}
