"""Classification on the real engines and the real default model (no mocks): label scoring against
full forward passes, the two engines agreeing, calibration, guided choice, multi-label, and
classification heads built and saved by the test itself."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForSequenceClassification

from schema.errors import EngineError
from schema.jobs import ChatMessage, GenerationRequest, SamplingParams, Windows
from schema.kinds.classify import Classification, ClassifyRequest
from worker.engine_loop import EngineLoop
from worker.engines import Engine, load_engine
from worker.engines.hf_head import TransformersHeadEngine
from worker.engines.labels import LabelQuery, Tokenized, tokenize
from worker.engines.transformers_engine import TransformersEngine
from worker.engines.vllm_engine import VLLMEngine
from worker.engines.vllm_head import VLLMHeadEngine
from worker.kinds import calibration, classify_prompt, probe, served_kinds
from worker.kinds.classify import ClassifyResult, _single_key, _windows, classify

MODEL = "smollm2-135m-instruct"
ENGINE_NAMES = ["transformers", "vllm"]
TICKET = LabelQuery([ChatMessage(role="user", content="Which team should handle this ticket?\n"
                                                       "I was charged twice on my last invoice.")],
                    ["billing", "billing question", "technical problem", "sales"])
SENTIMENT = "What is the sentiment of this review?"
REVIEWS = [  # (text, gold) from shared/data/amazon_sentiment.tsv
    ("Great for the jawbone.", "positive"),
    ("The mic is great.", "positive"),
    ("Good case, Excellent value.", "positive"),
    ("Tied to charger for conversations lasting more than 45 minutes.MAJOR PROBLEMS!!", "negative"),
    ("I have to jiggle the plug to get it to line up right to get decent volume.", "negative"),
    ("If you are Razr owner...you must have this!", "positive"),
]
# Probabilities from the two engines may differ this much: both run bf16, with different kernels.
TOLERANCE = 0.06
# Few-shot prompts are 3x longer, and bf16's rounding adds up: measured 0.060 on a CPU with AVX-512 BF16
# and no AMX (the tests' machines differ in that).
FEW_SHOT_TOLERANCE = 0.09
ENSEMBLE_TOLERANCE = 0.04  # one engine, the same prompts batched differently


def reviews(**spec: Any) -> list[ClassifyRequest]:
    return [ClassifyRequest(text=text, labels=["positive", "negative"], instruction=SENTIMENT, **spec)
            for text, _ in REVIEWS]


# The session's engines (tests/conftest.py): their loops sit idle while these tests call them directly.
@pytest.fixture(scope="module")
def transformers_engine(transformers_loop: tuple[Any, EngineLoop]) -> TransformersEngine:
    engine = transformers_loop[0]
    assert isinstance(engine, TransformersEngine)
    return engine


@pytest.fixture(scope="module")
def vllm_engine(vllm_loop: tuple[Any, EngineLoop]) -> VLLMEngine:
    engine = vllm_loop[0]
    assert isinstance(engine, VLLMEngine)
    return engine


def get_engine(request: pytest.FixtureRequest, name: str) -> Engine:
    return request.getfixturevalue(f"{name}_engine")


@pytest.fixture(autouse=True)
def fresh_priors() -> Iterator[None]:
    calibration.clear_priors()
    yield
    calibration.clear_priors()


# --- label scoring --------------------------------------------------------------------------------


def full_pass_logprobs(engine: TransformersEngine, query: LabelQuery) -> list[float]:
    """The reference: each label appended to the prompt and run from scratch, one sequence at a time."""
    tokens = tokenize(engine._tokenizer, query, engine.max_model_len)
    assert isinstance(tokens, Tokenized)
    totals = []
    for continuation in tokens.continuations:
        ids = torch.tensor([tokens.prompt + continuation])
        with torch.inference_mode():
            model: Any = engine._model
            logprobs = model(input_ids=ids).logits[0].float().log_softmax(-1)
        start = len(tokens.prompt) - 1  # the row that predicts the label's first token
        totals.append(sum(float(logprobs[start + k, t]) for k, t in enumerate(continuation)))
    return totals


@pytest.mark.parametrize("name", ENGINE_NAMES)
def test_multi_token_labels_score_as_full_passes(request: pytest.FixtureRequest, name: str,
                                                 transformers_engine: TransformersEngine) -> None:
    [scored] = get_engine(request, name).label_logprobs([TICKET])
    assert scored.error is None and scored.prompt_tokens > 10
    assert [len(t) for t in scored.token_logprobs] == [3, 3, 2, 2]  # "billing" + end of turn: 3 tokens
    assert scored.totals == pytest.approx(full_pass_logprobs(transformers_engine, TICKET), abs=0.3)
    # "billing" and "billing question" share their first two tokens, so those logprobs are identical
    assert scored.token_logprobs[0][:2] == scored.token_logprobs[1][:2]


def test_engines_agree_on_label_logprobs(transformers_engine: TransformersEngine,
                                         vllm_engine: VLLMEngine) -> None:
    queries = [TICKET, classify_prompt.single_label(reviews()[0], ["positive", "negative"], SENTIMENT)]
    for hf, vl in zip(transformers_engine.label_logprobs(queries), vllm_engine.label_logprobs(queries)):
        assert hf.prompt_tokens == vl.prompt_tokens
        assert hf.totals == pytest.approx(vl.totals, abs=0.3)


@pytest.mark.parametrize("name", ENGINE_NAMES)
def test_too_long_text_fails_alone(request: pytest.FixtureRequest, name: str) -> None:
    requests = [ClassifyRequest(text="word " * 9000, labels=["a", "b"]), *reviews()[:1]]
    too_long, fine = classify(get_engine(request, name), requests)
    assert too_long.error is not None and "context" in too_long.error and too_long.classification is None
    assert fine.error is None and fine.classification is not None


@pytest.mark.parametrize("name", ENGINE_NAMES)
def test_a_long_text_splits_into_windows_that_fit(request: pytest.FixtureRequest, name: str) -> None:
    """Map-reduce: a text of about 2.5 contexts splits into windows that cover it in order, and each, in
    the prompt it is classified in (single-label, or multi-label's longest yes/no question), fits the
    context with room for the longest label, nearly filling it; a text that fits stays whole."""
    engine = get_engine(request, name)
    assert isinstance(engine, (TransformersEngine, VLLMEngine))
    long = Windows(long_documents="map-reduce")
    labels = ["positive", "a label of rather many words"]
    for multi_label in (False, True):
        item = ClassifyRequest(text="START " + "word " * 20_000 + "END", labels=labels, long=long,
                               multi_label=multi_label)
        texts = _windows(engine, item)
        assert texts is not None and len(texts) == 3, texts and [len(t) for t in texts]
        assert texts[0].startswith("START") and texts[-1].endswith("END")
        widest = max(classify_prompt.wordings(item), key=len)  # what a batch without an instruction sizes by
        for text in texts:
            queries = ([classify_prompt.yes_no(item, labels, label, widest, text) for label in labels] if multi_label
                       else [classify_prompt.single_label(item, labels, widest, text)])
            tokens = [tokenize(engine._tokenizer, query, engine.max_model_len) for query in queries]
            assert all(isinstance(t, Tokenized) for t in tokens)
        first = tokenize(engine._tokenizer, classify_prompt.single_label(item, labels, widest, texts[0]),
                         engine.max_model_len)
        assert isinstance(first, Tokenized) and len(first.prompt) > engine.max_model_len - 100
    assert _windows(engine, reviews(long=long)[0]) is None


# --- calibration, guided choice, multi-label: both engines, same answers -----------------------


def answer_of(result: ClassifyResult) -> Classification:
    assert result.error is None and result.classification is not None, result.error
    return result.classification


def assert_same(first: list[Any], second: list[Any], tolerance: float = TOLERANCE) -> None:
    """The same probabilities within `tolerance`, so the same label unless two labels are that close."""
    for a, b in zip(first, second, strict=True):
        assert a.error is None and b.error is None
        for label, p in answer_of(a).probabilities.items():
            assert p == pytest.approx(answer_of(b).probabilities[label], abs=tolerance)
        top, second_best = sorted(answer_of(a).probabilities.values(), reverse=True)[:2]
        if top - second_best > 2 * tolerance:
            assert answer_of(a).label == answer_of(b).label


def test_engines_agree_on_calibrated_and_raw_probabilities(transformers_engine: TransformersEngine,
                                                           vllm_engine: VLLMEngine) -> None:
    for spec in ({"calibrate": True}, {"calibrate": False}):
        hf, vl = classify(transformers_engine, reviews(**spec)), classify(vllm_engine, reviews(**spec))
        assert_same(hf, vl)
        assert sum(answer_of(r).label == gold for r, (_, gold) in zip(hf, REVIEWS)) >= 5
        for result in hf:
            answer = answer_of(result)
            assert answer.method == "score" and answer.calibrated is spec["calibrate"]
            assert sum(answer.probabilities.values()) == pytest.approx(1.0)
            assert answer.raw_probabilities is not None and result.prompt_tokens > 0


@pytest.mark.parametrize("name", ENGINE_NAMES)
def test_calibration_divides_out_the_content_free_prior(request: pytest.FixtureRequest, name: str) -> None:
    engine = get_engine(request, name)
    [result] = classify(engine, reviews()[:1])
    answer = answer_of(result)
    assert answer.raw_probabilities is not None
    queries = [classify_prompt.single_label(reviews()[0], ["positive", "negative"], SENTIMENT, text)
               for text in classify_prompt.CONTENT_FREE]
    prior = calibration.average([calibration.normalise(s.totals) for s in engine.label_logprobs(queries)])
    remembered = calibration.known(_single_key(engine, reviews()[0], SENTIMENT))  # estimated beside the document
    assert remembered is not None and remembered == pytest.approx(prior, abs=TOLERANCE)
    raw = list(answer.raw_probabilities.values())
    assert list(answer.probabilities.values()) == pytest.approx(calibration.calibrate(raw, remembered), abs=1e-9)
    assert abs(prior[0] - 0.5) > 0.02  # the model leans one way whatever the text: what calibration removes


def test_without_an_instruction_the_default_wordings_are_averaged(transformers_engine: TransformersEngine,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Prompt ensembling: a batch without an instruction answers with the mean of what each default
    wording answers alone, each calibrated on its own prior: the answer cues for single-label, the
    generic questions for multi-label."""
    for spec, defaults in (({}, "DEFAULT_CUES"), ({"multi_label": True}, "DEFAULT_INSTRUCTIONS")):
        plain = [ClassifyRequest(text=text, labels=["positive", "negative"], **spec) for text, _ in REVIEWS[:3]]
        together = classify(transformers_engine, plain)
        alone = []
        for wording in getattr(classify_prompt, defaults):
            with monkeypatch.context() as patch:  # the same batch, asked under one of its wordings
                patch.setattr(classify_prompt, defaults, (wording,))
                alone.append(classify(transformers_engine, plain))
        apart = 0.0  # how far the wordings' answers lie from their mean
        for index, result in enumerate(together):
            for label, p in answer_of(result).probabilities.items():
                each = [answer_of(run[index]).probabilities[label] for run in alone]
                mean = sum(each) / len(each)
                # bf16 rounds prompts padded beside others differently (one engine: measured up to 0.015)
                assert p == pytest.approx(mean, abs=ENSEMBLE_TOLERANCE)
                apart = max(apart, *(abs(q - mean) for q in each))
            assert result.prompt_tokens == sum(run[index].prompt_tokens for run in alone)
        assert apart > 2 * ENSEMBLE_TOLERANCE  # the wordings disagree by more: the mean is none of them


def test_text_first_prompts_of_one_text_share_it_as_a_prefix(transformers_engine: TransformersEngine) -> None:
    """`layout: text-first` puts the text before the question, so the ensemble's prompts for one text share
    its tokens as a prefix (vLLM's prefix cache computes them once); question first (the default) shares
    only the chat template's opening. (Without `template: chat` such a batch asks no question at all.)"""
    tokenizer, text = transformers_engine._tokenizer, "A long review of the product, " * 20

    def shared(layout: str) -> int:
        request = ClassifyRequest(text=text, labels=["positive", "negative"], layout=layout, template="chat")
        first, second = (tokenize(tokenizer, classify_prompt.single_label(request, request.labels or [], w),
                                  transformers_engine.max_model_len) for w in classify_prompt.DEFAULT_INSTRUCTIONS[:2])
        assert isinstance(first, Tokenized) and isinstance(second, Tokenized)
        return next(i for i, (a, b) in enumerate(zip(first.prompt, second.prompt)) if a != b)

    text_tokens = len(tokenizer.encode(text, add_special_tokens=False))
    assert shared("text-first") >= text_tokens > 100 > shared("question-first")


def test_engines_agree_on_plain_prompts(transformers_engine: TransformersEngine, vllm_engine: VLLMEngine) -> None:
    """`template: plain` (a model without a chat template): one text prompt ending in "Answer:", each label
    scored after a space; both engines score it alike, and it reads differently from the chat."""
    plain = reviews(template="plain")
    query = classify_prompt.single_label(plain[0], ["positive", "negative"], SENTIMENT)
    assert query.messages == [] and query.prompt is not None and query.prompt.endswith("\nAnswer:")
    assert query.prompt == f"{SENTIMENT}\n{REVIEWS[0][0]}\nAnswer:"
    assert query.continuations() == [" positive", " negative"]
    hf, vl = classify(transformers_engine, plain), classify(vllm_engine, plain)
    assert_same(hf, vl)
    chat = classify(transformers_engine, reviews())
    assert [r.prompt_tokens for r in hf] != [r.prompt_tokens for r in chat]
    hf_choice, vl_choice = (classify(engine, reviews(template="plain", method="choice"))
                            for engine in (transformers_engine, vllm_engine))
    assert sum(answer_of(a).label == answer_of(b).label for a, b in zip(hf_choice, vl_choice, strict=True)) >= 5


def test_engines_agree_on_guided_choice(transformers_engine: TransformersEngine, vllm_engine: VLLMEngine) -> None:
    hf, vl = classify(transformers_engine, reviews(method="choice")), classify(vllm_engine, reviews(method="choice"))
    assert [answer_of(r).label for r in hf] == [answer_of(r).label for r in vl]
    for result in hf + vl:
        answer = answer_of(result)
        assert answer.method == "choice" and not answer.calibrated and answer.raw_probabilities is None
        assert sorted(answer.probabilities.values()) == [0.0, 1.0]
        assert result.completion_tokens == 2  # the label's one token, then the end of turn
    [ticket_hf], [ticket_vl] = transformers_engine.choose([TICKET]), vllm_engine.choose([TICKET])
    assert ticket_hf.label == ticket_vl.label and ticket_hf.label in TICKET.labels


def test_engines_agree_on_multi_label(transformers_engine: TransformersEngine, vllm_engine: VLLMEngine) -> None:
    topics = [ClassifyRequest(text="The battery died after a week and support never answered my emails.",
                              labels=["battery", "customer support", "price"], multi_label=True,
                              instruction="Which topics does this review mention?", threshold=0.55)]
    [hf], [vl] = classify(transformers_engine, topics), classify(vllm_engine, topics)
    for answer in (answer_of(hf), answer_of(vl)):
        assert answer.method == "score" and answer.calibrated
        assert answer.labels == [label for label, p in answer.probabilities.items() if p >= 0.55]
        assert all(0.0 < p < 1.0 for p in answer.probabilities.values())  # each label on its own, yes or no
    hf_labels, vl_labels = answer_of(hf).labels or [], answer_of(vl).labels or []
    for label, p in answer_of(hf).probabilities.items():
        assert p == pytest.approx(answer_of(vl).probabilities[label], abs=TOLERANCE)
        if abs(p - 0.55) > TOLERANCE:  # the engines may only split on a label at the threshold itself
            assert (label in hf_labels) == (label in vl_labels)


SHOTS = [{"text": "Excellent product, works exactly as described.", "label": "positive"},
         {"text": "Terrible battery life, do not buy this.", "label": "negative"},
         {"text": "I love this headset, the sound is clear.", "label": "positive"},
         {"text": "It broke after two days and support never answered.", "label": "negative"}]


def test_engines_agree_on_few_shot(transformers_engine: TransformersEngine, vllm_engine: VLLMEngine) -> None:
    """Examples as chat turns (`template: chat`; the default for examples is plain text) are earlier
    turns, the same for every text; they move the answers, on both engines alike, for label scoring (its
    content-free prior estimated with them), guided choice and multi-label."""
    few = reviews(examples=SHOTS, shots=2, template="chat")
    query = classify_prompt.single_label(few[0], ["positive", "negative"], SENTIMENT)
    assert [m.role for m in query.messages] == ["user", "assistant"] * 4 + ["user"]
    assert query.messages[:-1] == classify_prompt.single_label(few[1], ["positive", "negative"], SENTIMENT).messages[:-1]
    assert [m.content for m in query.messages[1:-1:2]] == ["positive", "negative"] * 2
    hf, vl = classify(transformers_engine, few), classify(vllm_engine, few)
    assert_same(hf, vl, FEW_SHOT_TOLERANCE)
    zero_shot = classify(vllm_engine, reviews())
    moved = [abs(answer_of(a).probabilities["positive"] - answer_of(b).probabilities["positive"])
             for a, b in zip(vl, zero_shot, strict=True)]
    assert max(moved) > 0.05
    with_examples, without = (calibration.known(_single_key(vllm_engine, r, SENTIMENT)) for r in (few[0], reviews()[0]))
    assert with_examples is not None and without is not None and with_examples != without  # a prior of its own
    hf_choice, vl_choice = (classify(engine, reviews(examples=SHOTS, method="choice", template="chat"))
                            for engine in (transformers_engine, vllm_engine))
    agreed = [answer_of(a).label == answer_of(b).label for a, b in zip(hf_choice, vl_choice, strict=True)]
    assert sum(agreed) >= len(agreed) - 1  # a choice has no margin to check: a near tie may go either way
    tagged = [{**shot, "labels": [shot["label"]]} for shot in SHOTS]
    multi = [ClassifyRequest(text=REVIEWS[0][0], labels=["positive", "negative"], multi_label=True, template="chat",
                             examples=[{k: v for k, v in t.items() if k != "label"} for t in tagged])]
    yes_no = classify_prompt.yes_no(multi[0], ["positive", "negative"], "negative", classify_prompt.wordings(multi[0])[0])
    assert [m.content for m in yes_no.messages[1:-1:2]] == ["no", "yes", "no", "yes"]
    [hf_multi], [vl_multi] = classify(transformers_engine, multi), classify(vllm_engine, multi)
    for label, p in answer_of(hf_multi).probabilities.items():
        assert p == pytest.approx(answer_of(vl_multi).probabilities[label], abs=TOLERANCE)


def test_engines_agree_on_hidden_states_and_probes(transformers_engine: TransformersEngine,
                                                   vllm_engine: VLLMEngine) -> None:
    """A probe learned on one engine's hidden states answers alike on the other: vLLM reads them through
    transformers from the same weights, cut one layer past the one read (the middle), or whole (the last)."""
    texts = [text for text, _ in REVIEWS]
    middle = transformers_engine.num_hidden_layers // 2
    for layer in (middle, transformers_engine.num_hidden_layers):
        hf, vl = transformers_engine.hidden_states(texts, layer), vllm_engine.hidden_states(texts, layer)
        assert torch.allclose(torch.tensor([e.vector for e in hf]), torch.tensor([e.vector for e in vl]), atol=1e-3)
    training = [{"text": text, "label": label} for text, label in REVIEWS]
    vectors = np.array([e.vector for e in transformers_engine.hidden_states([t["text"] for t in training], middle)])
    weights, _ = probe.fit(vectors, [[t["label"]] for t in training], ["positive", "negative"], False)
    learned = probe.Trained("probe_test", middle, ["positive", "negative"], False, weights)
    requests = reviews(method="probe", probe="probe_test")
    hf_answers, vl_answers = (classify(engine, requests, {"probe_test": learned})
                              for engine in (transformers_engine, vllm_engine))
    assert_same(hf_answers, vl_answers)
    assert all(answer_of(r).method == "probe" for r in hf_answers)
    assert len({round(answer_of(r).probabilities["positive"], 3) for r in hf_answers}) > 1  # it reads the texts


# --- the engine loop: classification on the driver thread, generation untouched ----------------


def test_classification_runs_on_the_loop_thread_beside_generation(vllm_loop: tuple[Any, EngineLoop]) -> None:
    vllm_engine, loop = vllm_loop  # the session's loop: it keeps running for later tests
    story = GenerationRequest(prompt="Once upon a time", sampling=SamplingParams(max_tokens=24))
    generating = loop.submit([story])
    threads: list[str] = []

    def labelled() -> list[Any]:
        threads.append(threading.current_thread().name)
        return classify(vllm_engine, reviews()[:2])

    labels = loop.call(labelled).result(timeout=300)
    [generated] = generating.result(timeout=300)
    assert threads == ["engine-loop"]
    assert [answer_of(r).label for r in labels] == ["positive", "positive"]
    assert generated.error is None and generated.completion_tokens == 24  # not lost to the classify call
    with pytest.raises(ZeroDivisionError):
        loop.call(lambda: 1 / 0).result(timeout=60)
    assert loop.alive  # a failing call fails its caller, not the loop


# --- classification heads ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def head_model(tmp_path_factory: pytest.TempPathFactory, transformers_engine: TransformersEngine) -> Path:
    """A tiny randomly initialised Llama classifier with the default model's tokenizer, saved as a
    Hugging Face folder (head_dim 64: vLLM's CPU attention has no kernel for smaller heads)."""
    folder = tmp_path_factory.mktemp("tiny-classifier")
    tokenizer = transformers_engine._tokenizer
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
                         id2label={0: "negative", 1: "neutral", 2: "positive"},
                         label2id={"negative": 0, "neutral": 1, "positive": 2}, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    model: Any = LlamaForSequenceClassification(config)
    model.to(torch.bfloat16).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def heads(head_model: Path) -> Iterator[tuple[TransformersHeadEngine, VLLMHeadEngine]]:
    hf, vl = load_engine(str(head_model), "transformers"), load_engine(str(head_model), "vllm")
    assert isinstance(hf, TransformersHeadEngine) and isinstance(vl, VLLMHeadEngine)
    yield hf, vl
    hf.close()
    vl.close()


def test_heads_load_through_the_engine_loader_and_agree(heads: tuple[TransformersHeadEngine, VLLMHeadEngine]) -> None:
    texts = [ClassifyRequest(text=text) for text, _ in REVIEWS]
    hf, vl = (classify(engine, texts) for engine in heads)
    assert_same(hf, vl)
    for engine in heads:
        assert engine.head_labels == ["negative", "neutral", "positive"]
    for result in hf:
        answer = answer_of(result)
        assert answer.method == "head" and not answer.calibrated
        assert list(answer.probabilities) == ["negative", "neutral", "positive"]
        assert sum(answer.probabilities.values()) == pytest.approx(1.0, abs=1e-5)


def test_heads_classify_long_texts_by_windows(heads: tuple[TransformersHeadEngine, VLLMHeadEngine]) -> None:
    """A text of about three of the head's 512-token contexts splits into windows each head runs."""
    for engine in heads:
        texts = _windows(engine, ClassifyRequest(text="word " * 1500, long=Windows(long_documents="map-reduce")))
        assert texts is not None and len(texts) == 4
        results = classify(engine, [ClassifyRequest(text=text) for text in texts])
        assert all(r.error is None for r in results) and max(r.prompt_tokens for r in results) > 400


def test_heads_refuse_what_they_cannot_do(heads: tuple[TransformersHeadEngine, VLLMHeadEngine]) -> None:
    for engine in heads:
        other, multi, long = classify(engine, [
            ClassifyRequest(text="x", labels=["cat", "dog"]),
            ClassifyRequest(text="x", multi_label=True),
            ClassifyRequest(text="word " * 600),
        ])
        assert "classifies into" in (other.error or "") and other.error_code == "invalid_request"
        assert "multi-label" in (multi.error or "") and multi.error_code == "unsupported"
        assert "context is 512" in (long.error or "") and long.error_code == "context_length_exceeded"
        assert served_kinds(engine) == ["classify"]  # what its worker records: generation goes elsewhere
        loop = EngineLoop(engine)
        try:
            with pytest.raises(EngineError, match="does not generate"):
                loop.submit([GenerationRequest(prompt="Hello", sampling=SamplingParams(max_tokens=2))])
        finally:
            loop.close()
