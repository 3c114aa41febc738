"""Model preparation: turn a model into plain weight files the engines load fast (a GGUF file is converted
once into the cache: reading a GGUF file de-quantizes every tensor again, about 40x the time of a load)."""

from __future__ import annotations

import re
import shutil
import tempfile
from pathlib import Path

from schema.errors import ModelError
from schema.models import ModelSource, resolve_model

_READY_MARKER = "config.json"
VLLM_DTYPE = "bfloat16"  # what vLLM loads; the transformers engine asks for its compute dtype


def safe_name(name: str) -> str:
    """A folder name derived from a model name: no separators, no dots at the start."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._")
    return cleaned or "model"


def prepared_folder(source: ModelSource, cache_dir: Path, dtype: str = VLLM_DTYPE) -> Path:
    name = safe_name(source.name)
    return Path(cache_dir) / "models" / (name if dtype == VLLM_DTYPE else f"{name}-{dtype}")


def prepare_for_vllm(source: ModelSource, cache_dir: Path) -> Path:
    """A plain HF folder vLLM can load: a GGUF source is converted once into cache_dir; a folder is as is."""
    return prepare_weights(source, cache_dir, VLLM_DTYPE)


def prepare_weights(source: ModelSource, cache_dir: Path, dtype: str) -> Path:
    """A plain HF folder with the weights de-quantized to `dtype` (a torch dtype's name, as `float32`), built
    once per dtype, so that an engine computing in float32 reads the same numbers as from the GGUF file."""
    if not source.is_gguf:
        return source.folder
    target = prepared_folder(source, cache_dir, dtype)
    if (target / _READY_MARKER).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build in a sibling temp dir then rename: a crash leaves only a temp dir, never a half `target`.
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        _convert_gguf(source, tmp, dtype)
        _publish(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _publish(tmp: Path, target: Path) -> None:
    try:
        tmp.rename(target)
    except OSError as exc:
        # Another process published first (rename onto a non-empty dir fails): keep theirs.
        if not (target / _READY_MARKER).is_file():
            raise ModelError(f"cannot publish the prepared model at {target}: {exc}") from exc


def _convert_gguf(source: ModelSource, out: Path, dtype_name: str = VLLM_DTYPE) -> None:
    """Dequantize a GGUF file into safetensors with tokenizer and generation config."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    dtype = getattr(torch, dtype_name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.folder, gguf_file=source.gguf_file)
        # dequantize=True: with the `kernels` package installed transformers would keep packed blocks.
        loaded = AutoModelForCausalLM.from_pretrained(
            source.folder,
            gguf_file=source.gguf_file,
            dtype=dtype,
            quantization_config=GgufConfig(dequantize=True),
        )
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot load GGUF model '{source.name}': {exc}") from exc
    # save_pretrained refuses a GGUF-loaded model ("not serializable"): copy weights into a fresh one.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    fresh = AutoModelForCausalLM.from_config(config, dtype=dtype)
    try:
        fresh.load_state_dict(loaded.state_dict())  # strict: every weight must carry over
    except RuntimeError as exc:
        raise ModelError(f"cannot convert GGUF model '{source.name}': {exc}") from exc
    fresh.generation_config = loaded.generation_config
    fresh.save_pretrained(out)
    tokenizer.save_pretrained(out)
    out.chmod(0o755)  # mkdtemp makes it 0700


def prepare(name: str, cache_dir: Path) -> Path:
    """Resolve a model name and make it loadable by vLLM; returns the folder (for `gristmill models prepare`)."""
    return prepare_for_vllm(resolve_model(name), cache_dir)
