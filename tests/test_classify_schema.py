"""Classification without an engine: labels, labels files, input lines, output lines, calibration math,
and the token rules both engines share (on the real model's tokenizer)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
from transformers import AutoTokenizer

from schema.errors import InputError
from schema.kinds import KINDS
from schema.kinds.classify import ClassifyOutputLine, ClassifyRequest, ClassifySpec, parse_classify_stream
from schema.kinds.flags import split_list as split_labels
from schema.labels import check_labels, load_labels_file
from schema.models import resolve_model
from schema.outputs import ErrorRecord
from worker.engines.labels import continuation_ids, end_token_id, greedy_walk
from worker.kinds import calibration, classify_prompt

LIMITS: dict[str, Any] = {"max_line_bytes": 10_000, "max_items": 100}


def classify_spec(labels: list[str] | None, **options: Any) -> ClassifySpec:
    return KINDS["classify"].spec(labels=labels, **options)  # type: ignore[return-value]


def parse_classify_input(path: Path, spec: ClassifySpec, **limits: Any) -> list[Any]:
    with open(path, "rb") as stream:
        return list(parse_classify_stream(stream, str(path), spec, **limits))


# --- labels --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("labels", "message"), [
    (["positive"], "at least two labels"),
    ([], "at least two labels"),
    (["a", "b", "a"], "duplicate label 'a'"),
    (["a", ""], "label 2 is empty"),
    (["a", "   "], "label 2 is empty"),
    (["a", " b"], "leading or trailing whitespace"),
])
def test_bad_labels_are_refused_with_a_reason(labels: list[str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        check_labels(labels)
    with pytest.raises(InputError, match=message):
        classify_spec(labels)


def test_split_labels_from_the_command_line() -> None:
    assert split_labels("positive, negative") == ["positive", "negative"]
    assert split_labels("billing question,technical problem") == ["billing question", "technical problem"]
    assert split_labels("a,,b") == ["a", "", "b"]  # the empty one is then refused
    assert split_labels("") == []


def test_labels_file_list_or_mapping(tmp_path: Path) -> None:
    listed = tmp_path / "labels.yaml"
    listed.write_text("- billing question\n- technical problem\n- sales\n")
    assert load_labels_file(listed) == ["billing question", "technical problem", "sales"]
    mapped = tmp_path / "mapped.yaml"
    mapped.write_text("labels: [spam, ham]\n")
    assert load_labels_file(mapped) == ["spam", "ham"]


def test_labels_file_that_does_not_parse_names_the_line(tmp_path: Path) -> None:
    bad = tmp_path / "labels.yaml"
    bad.write_text("- billing\n- [unclosed\n- sales\n")
    with pytest.raises(InputError, match=r"labels\.yaml:\d+: labels file is not valid YAML"):
        load_labels_file(bad)


@pytest.mark.parametrize(("text", "message"), [
    ("just a string\n", "expected a list of labels"),
    ("- yes\n- no\n", "quote such labels"),  # YAML 1.1 reads them as booleans
    ("- a\n- a\n", "duplicate label"),
    ("- only\n", "at least two labels"),
])
def test_labels_file_content_is_checked(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "labels.yaml"
    path.write_text(text)
    with pytest.raises(InputError, match=message):
        load_labels_file(path)


def test_missing_labels_file(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="cannot read labels file"):
        load_labels_file(tmp_path / "nope.yaml")


def test_spec_rejects_multi_label_guided_choice_and_bad_thresholds() -> None:
    with pytest.raises(InputError, match="multi-label"):
        classify_spec(["a", "b"], method="choice", multi_label=True)
    with pytest.raises(InputError, match="threshold"):
        classify_spec(["a", "b"], multi_label=True, threshold=1.5)
    assert ClassifySpec(labels=["a", "b"], instruction="  ").instruction is None
    with pytest.raises(InputError, match="layout"):
        classify_spec(["a", "b"], layout="text-last")


def test_prompt_format_options_are_stored_only_when_asked() -> None:
    """`layout` and `template` left at their defaults stay out of the stored request (earlier batches'
    requests, and their cache keys, read the same); asked for, they are kept."""
    assert not {"layout", "template"} & set(classify_spec(["a", "b"]).model_dump())
    asked = classify_spec(["a", "b"], layout="text-first", template="plain")
    again = ClassifyRequest.model_validate({**asked.model_dump(), "text": "x"})
    assert (again.layout, again.template) == ("text-first", "plain")


# --- input lines ---------------------------------------------------------------------------------


def write_lines(tmp_path: Path, *lines: object) -> Path:
    path = tmp_path / "in.jsonl"
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def test_lines_take_the_batch_labels_or_their_own(tmp_path: Path) -> None:
    path = write_lines(tmp_path, {"id": "a", "text": "Great."},
                       {"custom_id": "b", "text": "Invoice wrong.", "labels": ["billing", "other"]})
    spec = ClassifySpec(labels=["positive", "negative"], instruction="Sentiment?", calibrate=False)
    first, second = parse_classify_input(path, spec, **LIMITS)
    assert (first.custom_id, first.line, first.request.labels) == ("a", 1, ["positive", "negative"])
    assert (second.custom_id, second.request.labels) == ("b", ["billing", "other"])
    assert first.request.calibrate is False and first.request.instruction == "Sentiment?"
    stored = ClassifyRequest.model_validate(second.request.model_dump(exclude_none=True))
    assert stored == second.request  # what items.request holds reads back the same


@pytest.mark.parametrize(("line", "where", "message"), [
    ({"id": "a", "text": "x", "labels": ["one"]}, "2: field 'labels'", "at least two labels"),
    ({"id": "a", "text": "x", "labels": ["p", "p"]}, "2: field 'labels'", "duplicate label"),
    ({"id": "a", "text": ""}, "2: field 'text'", "at least 1 character"),
    ({"text": "x"}, "2: field 'custom_id'", "required"),
    ({"id": "z", "text": "x"}, "2: field 'custom_id'", "duplicate custom_id 'z'"),
    ({"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": {}}, "2: field 'url'",
     "url is '/v1/classify', not '/v1/chat/completions'"),
    ({"custom_id": "a", "method": "POST", "url": "/v1/classify", "body": "x"}, "2: field 'body'", "object"),
    ({"custom_id": "a", "method": "POST", "url": "/v1/classify", "body": {"text": ""}}, "2: field 'body.text'",
     "at least 1 character"),
    ("{not json", "2:", "not valid JSON"),
])
def test_a_bad_line_names_its_line(tmp_path: Path, line: object, where: str, message: str) -> None:
    path = write_lines(tmp_path, {"id": "z", "text": "fine"}, line)
    with pytest.raises(InputError, match=message) as caught:
        parse_classify_input(path, ClassifySpec(labels=["p", "n"]), **LIMITS)
    assert where in str(caught.value)


def test_batch_request_lines_for_the_classify_endpoint(tmp_path: Path) -> None:
    """The HTTP API's input files hold batch requests: {custom_id, method, url: /v1/classify, body: {text,
    labels?}} reads as the plain line {custom_id, text, labels?} does."""
    path = write_lines(tmp_path, {"custom_id": "r1", "method": "POST", "url": "/v1/classify",
                                  "body": {"text": "Great mic.", "labels": ["yes", "no"]}}, {"id": "r2", "text": "Meh."})
    first, second = parse_classify_input(path, ClassifySpec(labels=["p", "n"]), **LIMITS)
    assert (first.custom_id, first.request.text, first.request.labels) == ("r1", "Great mic.", ["yes", "no"])
    assert (second.custom_id, second.request.labels, first.endpoint) == ("r2", ["p", "n"], "/v1/classify")


def test_lines_need_labels_from_somewhere(tmp_path: Path) -> None:
    path = write_lines(tmp_path, {"id": "a", "text": "x"})
    with pytest.raises(InputError, match="no labels"):
        parse_classify_input(path, ClassifySpec(), **LIMITS)
    items = parse_classify_input(path, ClassifySpec(), head_labels=["neg", "pos"], **LIMITS)
    assert items[0].request.labels is None  # a classification model brings its own


def test_a_head_model_refuses_other_labels(tmp_path: Path) -> None:
    path = write_lines(tmp_path, {"id": "a", "text": "x", "labels": ["cat", "dog"]})
    with pytest.raises(InputError, match="classifier with labels"):
        parse_classify_input(path, ClassifySpec(), head_labels=["neg", "pos"], **LIMITS)


def test_too_many_lines_and_empty_files(tmp_path: Path) -> None:
    path = write_lines(tmp_path, *({"id": str(i), "text": "x"} for i in range(3)))
    with pytest.raises(InputError, match="more than 2 requests"):
        parse_classify_input(path, ClassifySpec(labels=["p", "n"]), max_line_bytes=1000, max_items=2)
    empty = write_lines(tmp_path, "")
    with pytest.raises(InputError, match="no requests"):
        parse_classify_input(empty, ClassifySpec(labels=["p", "n"]), **LIMITS)


# --- few-shot examples ----------------------------------------------------------------------------

EXAMPLES = [{"text": f"review {i}", "label": "positive" if i % 3 else "negative"} for i in range(12)]


def test_examples_are_chosen_balanced_and_whatever_the_file_order() -> None:
    """k of each label, by a hash of the text (not the file's order), shown label after label in turn;
    choosing again from the chosen (each item's request is validated again) keeps them."""
    spec = classify_spec(["positive", "negative"], examples=EXAMPLES, shots=3)
    assert spec.examples is not None and [e.label for e in spec.examples] == ["positive", "negative"] * 3
    again = classify_spec(["positive", "negative"], examples=list(reversed(EXAMPLES)), shots=3)
    assert again.examples == spec.examples
    request = ClassifyRequest(**spec.model_dump(), text="x")
    assert request.examples == spec.examples
    assert "examples" not in classify_spec(["positive", "negative"]).model_dump()  # other batches: as before
    few = classify_spec(["positive", "negative"], examples=EXAMPLES, shots=20)  # fewer than asked: all of them
    assert few.examples is not None and sorted(e.text for e in few.examples) == sorted(e["text"] for e in EXAMPLES)


def test_examples_read_as_plain_text_unless_chat_is_asked_for() -> None:
    """With examples a prompt is plain text, 8 of each label by default (chat turns made the default model
    answer one label); `template: chat` keeps them as turns. The choice is stored, so it survives the
    item's validation again in the worker."""
    spec = classify_spec(["positive", "negative"], examples=EXAMPLES, instruction="Sentiment?")
    assert spec.template == "plain" and spec.shots == 8 and spec.examples is not None and len(spec.examples) == 12
    request = ClassifyRequest(**spec.model_dump(), text="great value")
    assert request.template == "plain"
    query = classify_prompt.single_label(request, ["positive", "negative"], "Sentiment?")
    assert query.messages == [] and query.prompt is not None
    blocks = query.prompt.split("\n\n")
    assert blocks[0] == f"Sentiment?\n{spec.examples[0].text}\nAnswer: positive" and len(blocks) == 13
    assert blocks[-1] == "Sentiment?\ngreat value\nAnswer:"
    chat = classify_spec(["positive", "negative"], examples=EXAMPLES, template="chat")
    assert ClassifyRequest(**chat.model_dump(), text="x").template == "chat"
    assert classify_spec(["positive", "negative"], instruction="Sentiment?").template == "chat"  # no examples


def test_without_an_instruction_a_prompt_is_the_text_and_an_answer_cue() -> None:
    """A single-label batch without an instruction asks no question: plain text, the text, then each
    default cue (bench/zero_shot.py chose them), the label after it; examples read the same way. The
    template is its usual one, so it is not stored. With `template: chat`, or multi-label (a yes/no is
    a question), the generic questions instead."""
    spec = classify_spec(["positive", "negative"])
    assert spec.template == "plain" and "template" not in spec.model_dump()
    request = ClassifyRequest(**spec.model_dump(), text="great value")
    assert classify_prompt.wordings(request) == list(classify_prompt.DEFAULT_CUES)
    query = classify_prompt.single_label(request, ["positive", "negative"], "Category:")
    assert query.messages == [] and query.prompt == "Text: great value\nCategory:"
    assert query.continuations() == [" positive", " negative"]
    few = classify_spec(["positive", "negative"], examples=EXAMPLES, shots=1)
    shown = classify_prompt.single_label(ClassifyRequest(**few.model_dump(), text="great value"),
                                         ["positive", "negative"], "Label:")
    assert few.examples is not None and shown.prompt is not None
    assert shown.prompt.split("\n\n")[0] == f"Text: {few.examples[0].text}\nLabel: {few.examples[0].label}"
    for asked in (classify_spec(["positive", "negative"], template="chat"),
                  classify_spec(["positive", "negative"], multi_label=True)):
        again = ClassifyRequest(**asked.model_dump(), text="x")
        assert again.template == "chat" and classify_prompt.wordings(again) == list(classify_prompt.DEFAULT_INSTRUCTIONS)
    assert classify_spec(["positive", "negative"], template="chat").model_dump()["template"] == "chat"


@pytest.mark.parametrize(("examples", "options", "message"), [
    ([{"text": "a", "label": "positive"}], {}, "no example has label 'negative'"),
    ([{"text": "a", "label": "neutral"}], {}, "label 'neutral', not one of"),
    ([{"text": "a", "labels": ["positive"]}], {}, 'a single-label batch\'s examples give "label"'),
    ([{"text": "a", "label": "positive", "labels": ["positive"]}], {}, 'give "label"'),
])
def test_bad_examples_are_refused_with_a_reason(examples: list[Any], options: dict[str, Any], message: str) -> None:
    with pytest.raises(InputError, match=message):
        classify_spec(["positive", "negative"], examples=examples, **options)


def test_multi_label_examples_count_for_each_of_their_labels() -> None:
    examples = [{"text": "both", "labels": ["a", "b"]}, {"text": "none", "labels": []}, {"text": "only a", "labels": ["a"]}]
    spec = classify_spec(["a", "b", "c"], examples=examples, shots=1, multi_label=True)  # no example of c: allowed
    assert spec.examples is not None and [e.text for e in spec.examples] in (["both"], ["only a", "both"])


def test_examples_file_from_the_command_line_names_a_bad_line(tmp_path: Path) -> None:
    """`--examples labelled.jsonl`: one example a line; a bad line is named by file, line and field."""
    from schema.kinds.flags import spec_flags

    load = next(f for f in spec_flags(ClassifySpec) if f.option == "--examples").load
    assert load is not None
    path = tmp_path / "labelled.jsonl"
    path.write_text(json.dumps(EXAMPLES[0]) + "\n\n" + json.dumps({"id": 7, **EXAMPLES[1]}) + "\n")
    assert load(str(path)) == [EXAMPLES[0], EXAMPLES[1]]  # blank lines skipped, other keys dropped
    path.write_text(json.dumps(EXAMPLES[0]) + "\n" + json.dumps({"text": "", "label": "positive"}) + "\n")
    with pytest.raises(InputError) as raised:
        load(str(path))
    assert str(raised.value).startswith(f"{path}:2: field 'text': String should have at least 1 character")


def test_lines_of_a_few_shot_batch_keep_its_labels(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    path.write_text(json.dumps({"id": "a", "text": "x", "labels": ["cat", "dog"]}) + "\n")
    with pytest.raises(InputError, match="in.jsonl:1: field 'labels': the batch's examples or probe"):
        parse_classify_input(path, classify_spec(["positive", "negative"], examples=EXAMPLES), **LIMITS)


# --- output lines --------------------------------------------------------------------------------


def test_output_lines_have_exactly_one_outcome() -> None:
    from schema.kinds.classify import Classification

    answer = Classification(label="p", probabilities={"p": 0.7, "n": 0.3}, method="score", calibrated=True,
                            raw_probabilities={"p": 0.9, "n": 0.1})
    ok = ClassifyOutputLine(custom_id="a", **answer.model_dump())
    again = ClassifyOutputLine.model_validate_json(ok.model_dump_json())
    assert again == ok and again.error is None
    assert set(json.loads(ok.model_dump_json())) >= {"custom_id", "label", "probabilities", "error"}
    bad = ClassifyOutputLine(custom_id="b", error=ErrorRecord(code="item_failed", message="too long"))
    assert bad.label is None and bad.error is not None and bad.error.message == "too long"
    with pytest.raises(ValueError, match="exactly one"):
        ClassifyOutputLine(custom_id="c")
    with pytest.raises(ValueError, match="probability for its label"):
        ClassifyOutputLine(custom_id="c", label="x", probabilities={"y": 1.0})


# --- calibration ---------------------------------------------------------------------------------


def test_calibration_divides_out_the_prior() -> None:
    raw = calibration.normalise([math.log(0.8), math.log(0.2)])
    assert raw == pytest.approx([0.8, 0.2])
    # A model that says "positive" 90% of the time on content-free input: 0.8 is weak evidence.
    calibrated = calibration.calibrate(raw, [0.9, 0.1])
    assert sum(calibrated) == pytest.approx(1.0)
    assert calibrated[0] < 0.5
    assert calibration.calibrate([0.5, 0.5], [0.5, 0.5]) == pytest.approx([0.5, 0.5])
    assert calibration.average([[0.9, 0.1], [0.7, 0.3]]) == pytest.approx([0.8, 0.2])
    assert calibration.calibrate([0.5, 0.5], [1.0, 0.0])[1] == pytest.approx(1.0)  # no division by zero


def test_priors_are_remembered_least_recently_used_first_out(monkeypatch: pytest.MonkeyPatch) -> None:
    calibration.clear_priors()
    monkeypatch.setattr(calibration, "MAX_PRIORS", 2)
    calibration.remember("a", [0.6, 0.4])
    calibration.remember("b", [0.5, 0.5])
    assert calibration.known("a") == [0.6, 0.4]  # now the most recently used
    calibration.remember("c", [0.1, 0.9])
    assert calibration.known("b") is None and calibration.known("a") == [0.6, 0.4]
    calibration.clear_priors()
    assert calibration.known("a") is None


# --- token rules on the real tokenizer ----------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer():  # type: ignore[no-untyped-def]
    source = resolve_model("smollm2-135m-instruct")
    return AutoTokenizer.from_pretrained(source.folder, gguf_file=source.gguf_file)


def test_a_label_that_starts_another_is_scored_with_the_end_of_turn(tokenizer) -> None:  # type: ignore[no-untyped-def]
    end = end_token_id(tokenizer)
    billing, question, sales = continuation_ids(tokenizer, ["billing", "billing question", "sales"], end)
    assert billing[-1] == end and question[: len(billing) - 1] == billing[:-1]
    assert len(question) > 1 and end not in question  # the full multi-token label, no end token
    assert end not in sales


def test_greedy_walk_follows_the_likeliest_prefix() -> None:
    labels = [[1, 2], [1, 3], [4]]
    # token 1 beats token 4, then token 3 beats token 2: the walk reaches label 1
    assert greedy_walk(labels, [[-0.1, -2.0], [-0.1, -0.5], [-1.0]]) == 1
    # the walk is greedy: label 2's single token loses to the shared first token even if 1+2 ends lower
    assert greedy_walk(labels, [[-0.5, -5.0], [-0.5, -5.0], [-0.9]]) in (0, 1)
