"""Model preparation: turn a model into files vLLM can load (a GGUF file is converted once into the cache)."""

from __future__ import annotations

import re
import shutil
import tempfile
from pathlib import Path

from schema.errors import ModelError
from schema.models import ModelSource, resolve_model

_READY_MARKER = "config.json"


def safe_name(name: str) -> str:
    """A folder name derived from a model name: no separators, no dots at the start."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._")
    return cleaned or "model"


def prepared_folder(source: ModelSource, cache_dir: Path) -> Path:
    return Path(cache_dir) / "models" / safe_name(source.name)


def prepare_for_vllm(source: ModelSource, cache_dir: Path) -> Path:
    """A plain HF folder vLLM can load: a GGUF source is converted once into cache_dir; a folder is as is."""
    if not source.is_gguf:
        return source.folder
    target = prepared_folder(source, cache_dir)
    if (target / _READY_MARKER).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build in a sibling temp dir then rename: a crash leaves only a temp dir, never a half `target`.
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        _convert_gguf(source, tmp)
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


def _convert_gguf(source: ModelSource, out: Path) -> None:
    """Dequantize a GGUF file into safetensors (bf16) with tokenizer and generation config."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    try:
        tokenizer = AutoTokenizer.from_pretrained(source.folder, gguf_file=source.gguf_file)
        # dequantize=True: with the `kernels` package installed transformers would keep packed blocks.
        loaded = AutoModelForCausalLM.from_pretrained(
            source.folder,
            gguf_file=source.gguf_file,
            dtype=torch.bfloat16,
            quantization_config=GgufConfig(dequantize=True),
        )
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot load GGUF model '{source.name}': {exc}") from exc
    # save_pretrained refuses a GGUF-loaded model ("not serializable"): copy weights into a fresh one.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
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
