"""One settings object, read from GRISTMILL_* environment variables; defaults run with no servers."""

from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

EMBEDDED_BROKER = "filesystem://"


class Settings(BaseSettings):
    """Deployment settings. Every field is GRISTMILL_<FIELD> in the environment."""

    model_config = SettingsConfigDict(env_prefix="GRISTMILL_", extra="ignore")

    database_url: str = "sqlite:///gristmill.db"
    broker_url: str = EMBEDDED_BROKER
    model: str = "smollm2-135m-instruct"
    engine: str = "auto"  # auto | vllm | transformers
    home: Path = Path(".gristmill")  # embedded broker folder lives here
    cache_dir: Path = Path.home() / ".cache" / "gristmill"  # prepared models
    chunk_size: int = Field(default=0, ge=0)  # items per task; 0: half the engine's max_num_seqs (schema.queue)
    inflight_chunks: int = Field(default=0, ge=0)  # chunks a worker runs at once; 0: from the engine's capacity
    # Context length (prompt + output); None: the model's own (its config), capped by what vLLM's KV cache
    # holds for one sequence.
    max_model_len: int | None = Field(default=None, ge=64)
    max_line_bytes: int = Field(default=1_000_000, ge=1)
    max_items_per_batch: int = Field(default=10_000_000, ge=1)
    max_upload_bytes: int = Field(default=200 * 2**20, ge=1)  # a file uploaded to the HTTP API (OpenAI's: 200 MB)
    # Per project of the HTTP API (0: no limit): requests a minute, items queued at once, bytes of files stored.
    project_requests_per_minute: int = Field(default=600, ge=0)
    project_queued_items: int = Field(default=1_000_000, ge=0)
    project_stored_bytes: int = Field(default=10 * 2**30, ge=0)
    visibility_timeout_s: int = Field(default=3600, ge=60)
    chunk_time_limit_s: int = Field(default=1800, ge=10)
    max_attempts: int = Field(default=3, ge=1)  # an item that fails its engine this often is marked failed
    reconcile_interval_s: int = Field(default=30, ge=1)
    beat_lease_s: float = Field(default=30.0, gt=0)  # a standby beat takes over this long after the holder died
    requeue_grace_s: int = Field(default=60, ge=0)  # queued items younger than this are not reconciled
    # A worker cut off from the database keeps a finished chunk's results this long, retrying, then
    # abandons them: its items go back to the queue when their lease (the chunk time limit) ends.
    write_retry_s: float = Field(default=120.0, ge=0)
    log_format: Literal["text", "json"] = "text"  # json: one object per line (batch id, chunk, worker, durations)
    # Extra vllm.LLM keyword arguments (a JSON object in the environment), applied after gristmill's own,
    # e.g. {"max_num_seqs": 256, "tensor_parallel_size": 2, "gpu_memory_utilization": 0.8}.
    vllm_options: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _chunks_end_before_redelivery(self) -> Settings:
        # A chunk still running when the visibility timeout passes would be delivered a second time.
        if self.chunk_time_limit_s * 2 > self.visibility_timeout_s:
            raise ValueError(
                f"GRISTMILL_CHUNK_TIME_LIMIT_S ({self.chunk_time_limit_s}) must be at most half of "
                f"GRISTMILL_VISIBILITY_TIMEOUT_S ({self.visibility_timeout_s})"
            )
        return self

    @property
    def broker_folder(self) -> Path:
        return self.home / "broker"


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()


_SECRET_IN_URL = re.compile(r"(?P<scheme>[a-z0-9+.\-]+://)(?P<user>[^:@/]*):(?P<password>[^@/]*)@", re.IGNORECASE)


def redact(url: str) -> str:
    """A URL with its password replaced, safe for logs and error messages."""
    return _SECRET_IN_URL.sub(lambda m: f"{m['scheme']}{m['user']}:***@", url)
