"""Input-file parsing (schema.inputs, schema.lines) and output lines (schema.outputs)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from schema import reading
from schema.errors import InputError
from schema.inputs import ParsedItem, parse_input, parse_input_bytes, parse_input_stream
from schema.jobs import ChatMessage, SamplingParams
from schema.lines import CHAT_URL, COMPLETIONS_URL, MaxTokens, Temperature, TopP
from schema.outputs import CompletionBody, OutputLine, error_line, success_line

SERVED = "smollm2-135m-instruct"
DEFAULTS = SamplingParams(max_tokens=100, temperature=0.7, top_p=0.9, stop=["END"], seed=7)
NAME = "in.jsonl"


def parse(data: bytes | str, **overrides: Any) -> list[ParsedItem]:
    options: dict[str, Any] = {"defaults": DEFAULTS, "served_model": SERVED, "max_line_bytes": 10_000,
                               "max_items": 100} | overrides
    return parse_input_bytes(data.encode() if isinstance(data, str) else data, NAME, **options)


def fails(data: bytes | str, **overrides: Any) -> InputError:
    with pytest.raises(InputError) as info:
        parse(data, **overrides)
    assert info.value.path == NAME
    return info.value


def jsonl(*lines: dict[str, Any] | str) -> str:
    return "".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines)


def chat(custom_id: str = "a", **body: Any) -> dict[str, Any]:
    return {"custom_id": custom_id, "method": "POST", "url": CHAT_URL,
            "body": {"model": SERVED, "messages": [{"role": "user", "content": "hi"}]} | body}


def completion(custom_id: str = "a", **body: Any) -> dict[str, Any]:
    return {"custom_id": custom_id, "method": "POST", "url": COMPLETIONS_URL,
            "body": {"model": SERVED, "prompt": "Once upon"} | body}


def simple(custom_id: str = "a", text: str = "hello", key: str = "custom_id", **extra: Any) -> dict[str, Any]:
    return {key: custom_id, "text": text} | extra


# --- valid files ----------------------------------------------------------------------------------


def test_openai_chat_merges_body_sampling_over_defaults() -> None:
    line = chat("q1", max_tokens=5, temperature=1, top_p=0.5, stop="\n", seed=3, n=1, logprobs=True,
                user="u", metadata={"k": "v"})
    [item] = parse(jsonl(line))
    assert (item.line, item.custom_id, item.endpoint, item.error) == (1, "q1", CHAT_URL, None)
    assert item.request.messages == [ChatMessage(role="user", content="hi")]
    assert item.request.prompt is None
    assert item.request.sampling == SamplingParams(max_tokens=5, temperature=1.0, top_p=0.5, stop=["\n"],
                                                   seed=3)
    assert item.body == line["body"]  # verbatim, unknown keys included


def test_body_without_sampling_fields_gets_the_defaults() -> None:
    [item] = parse(jsonl(chat()))
    assert item.request.sampling == DEFAULTS
    assert item.request.sampling is not DEFAULTS  # items never share a mutable model with the caller


def test_max_completion_tokens_is_max_tokens_and_stop_list_kept() -> None:
    [a, b] = parse(jsonl(chat("a", max_completion_tokens=9, stop=["x", "y"]),
                         chat("b", max_tokens=9, max_completion_tokens=9, stop=[])))
    assert (a.request.sampling.max_tokens, a.request.sampling.stop) == (9, ["x", "y"])
    assert (b.request.sampling.max_tokens, b.request.sampling.stop) == (9, None)


def test_null_fields_mean_the_job_default() -> None:
    [item] = parse(jsonl(chat(max_tokens=None, temperature=None, stop=None, seed=None)))
    assert item.request.sampling == DEFAULTS


@pytest.mark.parametrize(("bounded", "field"), [(MaxTokens, "max_tokens"), (Temperature, "temperature"),
                                                (TopP, "top_p")])
def test_body_bounds_are_the_sampling_bounds(bounded: Any, field: str) -> None:
    # schema.lines restates SamplingParams' bounds; this keeps the two from drifting apart.
    [info] = bounded.__metadata__
    assert info.metadata == SamplingParams.model_fields[field].metadata


def test_openai_completions_file() -> None:
    items = parse(jsonl(completion("c", temperature=0), completion("d", prompt="x")))
    assert [(i.custom_id, i.endpoint) for i in items] == [("c", COMPLETIONS_URL), ("d", COMPLETIONS_URL)]
    assert items[0].request.prompt == "Once upon" and items[0].request.messages is None
    assert items[0].request.sampling.temperature == 0.0
    assert items[1].request.prompt == "x"


def test_message_content_parts_and_developer_role() -> None:
    messages = [{"role": "developer", "content": "be brief"}, {"role": "assistant", "content": ""},
                {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]
    [item] = parse(jsonl(chat(messages=messages)))
    assert item.request.messages == [ChatMessage(role="system", content="be brief"),
                                     ChatMessage(role="assistant", content=""),
                                     ChatMessage(role="user", content="ab")]


def test_simple_file_uses_defaults_and_system_prompt() -> None:
    items = parse(jsonl(simple("a", "first"), simple("b", "second", key="id", url="https://x", tag=1)),
                  system_prompt="Summarise.")
    assert [(i.custom_id, i.endpoint, i.error) for i in items] == [("a", CHAT_URL, None),
                                                                    ("b", CHAT_URL, None)]
    assert items[1].request.messages == [ChatMessage(role="system", content="Summarise."),
                                         ChatMessage(role="user", content="second")]
    assert items[1].request.sampling == DEFAULTS
    assert items[1].body == {"id": "b", "text": "second", "url": "https://x", "tag": 1}


def test_simple_file_without_system_prompt_has_one_user_message() -> None:
    [item] = parse(jsonl(simple(text="just this")))
    assert item.request.messages == [ChatMessage(role="user", content="just this")]


def test_custom_id_wins_over_id_in_simple_lines() -> None:
    [item] = parse(jsonl({"custom_id": "c", "id": "i", "text": "t"}))
    assert item.custom_id == "c"


def test_blank_lines_crlf_bom_and_no_final_newline() -> None:
    a, b = (json.dumps(simple(custom_id)).encode() for custom_id in "ab")
    data = b"\xef\xbb\xbf" + a + b"\r\n\r\n  \t\n" + b
    assert [(i.line, i.custom_id) for i in parse(data)] == [(1, "a"), (4, "b")]


def test_limits_are_inclusive() -> None:
    line = json.dumps(simple("a"))
    assert len(parse(line + "\r\n", max_line_bytes=len(line))) == 1
    assert len(parse(jsonl(simple("a"), simple("b")), max_items=2)) == 2


def test_path_and_stream_entry_points(tmp_path: Path) -> None:
    path = tmp_path / "batch.jsonl"
    path.write_text(jsonl(chat("a"), chat("b")))
    options: dict[str, Any] = {"defaults": DEFAULTS, "served_model": SERVED, "max_line_bytes": 1000,
                               "max_items": 10}
    assert [i.custom_id for i in parse_input(path, **options)] == ["a", "b"]
    assert [i.custom_id for i in parse_input(str(path), **options)] == ["a", "b"]
    with path.open("rb") as stream:
        assert len(parse_input_stream(stream, "s", **options)) == 2
    with pytest.raises(InputError) as info:
        parse_input(tmp_path / "missing.jsonl", **options)
    assert info.value.line is None and "cannot read file" in info.value.message


# --- runnable errors: valid lines that fail without reaching an engine -----------------------------


def test_runnable_errors_mark_only_their_items() -> None:
    items = parse(jsonl(chat("ok"), chat("other", model="gpt-4o"), chat("stream", stream=True),
                        chat("n", n=2), chat("nomodel", model=None, stream=False, n=1)))
    errors = {i.custom_id: i.error for i in items}
    assert errors == {
        "ok": None,
        "other": "model 'gpt-4o' is not served by this deployment (it serves 'smollm2-135m-instruct')",
        "stream": "stream is not supported in batch jobs",
        "n": "n=2 is not supported: batch jobs return one choice per request",
        "nomodel": None,
    }
    assert items[1].request.messages == [ChatMessage(role="user", content="hi")]  # still a full request


def test_body_without_model_runs_on_the_served_model() -> None:
    line = chat()
    del line["body"]["model"]
    assert parse(jsonl(line))[0].error is None


# --- file errors ----------------------------------------------------------------------------------

LONG_ID = "x" * 513
ERRORS: list[tuple[str, bytes | str, int | None, str | None, str]] = [
    # (id, file, line, field, part of the message)
    ("empty", b"", None, None, "file has no requests"),
    ("blank only", "\n  \n\t\r\n", None, None, "file has no requests"),
    ("bom only", b"\xef\xbb\xbf", None, None, "file has no requests"),
    ("utf8", jsonl(simple("a")).encode() + b'{"id": "b\xff"}\n', 2, None, "not valid UTF-8"),
    ("json", jsonl(simple("a"), '{"id": "b",'), 2, None, "not valid JSON"),
    ("array", "[1, 2]\n", 1, None, "not a JSON object (found array)"),
    ("string", '"text"\n', 1, None, "not a JSON object (found string)"),
    ("null", "null\n", 1, None, "not a JSON object (found null)"),
    ("nan", '{"id": "a", "text": "t", "x": NaN}', 1, None, "NaN is not a JSON number"),
    ("infinity", '{"id": "a", "text": "t", "x": -Infinity}', 1, None, "-Infinity is not a JSON number"),
    ("1e999", '{"id": "a", "text": "t", "x": 1e999}', 1, None, "out of range"),
    ("huge int", '{"id": "a", "text": "t", "x": ' + "9" * 5000 + "}", 1, None, "too many digits"),
    ("deep", '{"id": "a", "text": "t", "x": ' + "[" * 80 + "]" * 80 + "}", 1, None, "nested more than 64"),
    ("very deep", '{"x": ' + "[" * 5000 + "]" * 5000 + "}", 1, None, "nested too deeply"),
    ("nul", '{"id": "a", "text": "t\\u0000"}', 1, None, "NUL character"),
    ("surrogate", '{"id": "a", "text": "\\udc80"}', 1, None, "unpaired surrogate"),
    ("no custom_id", jsonl({k: v for k, v in chat().items() if k != "custom_id"}), 1, "custom_id", "missing"),
    ("empty custom_id", jsonl(chat("")), 1, "custom_id", "at least 1 character"),
    ("int custom_id", jsonl(chat() | {"custom_id": 5}), 1, "custom_id", "valid string"),
    ("long custom_id", jsonl(chat(LONG_ID)), 1, "custom_id", "at most 512 characters"),
    ("duplicate", jsonl(chat("a"), "", chat("b"), chat("a")), 4, "custom_id",
     "duplicate custom_id 'a'; first used on line 1"),
    ("method", jsonl(chat() | {"method": "GET"}), 1, "method", "'POST'"),
    ("no method", jsonl({k: v for k, v in chat().items() if k != "method"}), 1, "method", "missing"),
    ("url", jsonl(chat() | {"url": "/v1/embeddings"}), 1, "url",
     "unsupported url '/v1/embeddings'; supported: /v1/chat/completions, /v1/completions"),
    ("two urls", jsonl(chat("a"), completion("b")), 2, "url",
     "url '/v1/completions' differs from '/v1/chat/completions' on line 1; one file holds one endpoint"),
    ("no url", jsonl({k: v for k, v in chat().items() if k != "url"}), 1, "url", "missing"),
    ("no body", jsonl({k: v for k, v in chat().items() if k != "body"}), 1, "body", "missing"),
    ("body type", jsonl(chat() | {"body": "hi"}), 1, "body", "valid dictionary"),
    ("no messages", jsonl(chat() | {"body": {"model": SERVED}}), 1, "body.messages", "missing"),
    ("empty messages", jsonl(chat(messages=[])), 1, "body.messages", "at least 1 item"),
    ("messages type", jsonl(chat(messages="hi")), 1, "body.messages", "valid list"),
    ("role", jsonl(chat(messages=[{"role": "user", "content": "a"}, {"role": "tool", "content": "b"}])),
     1, "body.messages[1].role", "'system', 'developer', 'user' or 'assistant'"),
    ("no content", jsonl(chat(messages=[{"role": "user"}])), 1, "body.messages[0].content", "missing"),
    ("null content", jsonl(chat(messages=[{"role": "user", "content": None}])), 1, "body.messages[0].content",
     "valid string"),
    ("image part", jsonl(chat(messages=[{"role": "user", "content": [{"type": "image_url"}]}])), 1,
     "body.messages[0].content", "only text is supported"),
    ("message type", jsonl(chat(messages=["hi"])), 1, "body.messages[0]", "valid dictionary"),
    ("no prompt", jsonl(completion() | {"body": {}}), 1, "body.prompt", "missing"),
    ("prompt list", jsonl(completion(prompt=["a", "b"])), 1, "body.prompt", "valid string"),
    ("empty prompt", jsonl(completion(prompt="")), 1, "body.prompt", "at least 1 character"),
    ("max_tokens 0", jsonl(chat(max_tokens=0)), 1, "body.max_tokens", "greater than or equal to 1"),
    ("max_tokens big", jsonl(chat(max_tokens=40000)), 1, "body.max_tokens", "less than or equal to 32768"),
    ("max_tokens str", jsonl(chat(max_tokens="5")), 1, "body.max_tokens", "valid integer"),
    ("max_tokens bool", jsonl(chat(max_tokens=True)), 1, "body.max_tokens", "valid integer"),
    ("max_tokens float", jsonl(chat(max_tokens=1.5)), 1, "body.max_tokens", "valid integer"),
    ("max_completion_tokens", jsonl(chat(max_completion_tokens=-1)), 1, "body.max_completion_tokens",
     "greater than or equal to 1"),
    ("token conflict", jsonl(chat(max_tokens=3, max_completion_tokens=4)), 1, "body.max_completion_tokens",
     "conflicts with max_tokens (3)"),
    ("temperature low", jsonl(chat(temperature=-0.1)), 1, "body.temperature", "greater than or equal to 0"),
    ("temperature high", jsonl(completion(temperature=2.5)), 1, "body.temperature",
     "less than or equal to 2"),
    ("temperature str", jsonl(chat(temperature="0.5")), 1, "body.temperature", "valid number"),
    ("temperature bool", jsonl(chat(temperature=True)), 1, "body.temperature", "valid number"),
    ("top_p 0", jsonl(chat(top_p=0)), 1, "body.top_p", "greater than 0"),
    ("top_p high", jsonl(chat(top_p=1.5)), 1, "body.top_p", "less than or equal to 1"),
    ("stop item", jsonl(chat(stop=["a", 1])), 1, "body.stop[1]", "valid string"),
    ("stop type", jsonl(chat(stop=5)), 1, "body.stop", "valid list"),
    ("seed str", jsonl(chat(seed="1")), 1, "body.seed", "valid integer"),
    ("seed huge", jsonl(chat(seed=2**64)), 1, "body.seed", "less than or equal to"),
    ("n 0", jsonl(chat(n=0)), 1, "body.n", "greater than or equal to 1"),
    ("stream type", jsonl(chat(stream="yes")), 1, "body.stream", "valid boolean"),
    ("model type", jsonl(chat(model=5)), 1, "body.model", "valid string"),
    ("no text", jsonl(simple("a"), {"id": "b"}), 2, "text", "missing"),
    ("empty text", jsonl(simple(text="")), 1, "text", "at least 1 character"),
    ("text type", jsonl(simple() | {"text": ["a"]}), 1, "text", "valid string"),
    ("no id", jsonl({"text": "t"}), 1, "custom_id", "give 'custom_id' or 'id'"),
    ("id type", jsonl({"id": 3, "text": "t"}), 1, "id", "valid string"),
    ("simple in openai", jsonl(chat("a"), "", simple("b")), 3, None,
     "line is in the simple format, but the file is in the OpenAI batch format (from line 1)"),
    ("openai in simple", jsonl("", simple("a"), chat("b")), 3, None,
     "line is in the OpenAI batch format, but the file is in the simple format (from line 2)"),
]


@pytest.mark.parametrize(("data", "line", "field", "message"), [e[1:] for e in ERRORS],
                         ids=[e[0] for e in ERRORS])
def test_file_errors(data: bytes | str, line: int | None, field: str | None, message: str) -> None:
    error = fails(data, max_line_bytes=100_000)
    assert (error.line, error.field) == (line, field), error
    assert message in error.message
    where = NAME if line is None else f"{NAME}:{line}"
    assert str(error).startswith(f"{where}: " + (f"field '{field}': " if field else ""))


def test_error_message_shows_the_bad_value() -> None:
    error = fails(jsonl(chat(temperature=3)))
    assert str(error) == ("in.jsonl:1: field 'body.temperature': "
                          "Input should be less than or equal to 2 (got 3)")


def test_whole_file_is_validated_before_anything_returns() -> None:
    assert fails(jsonl(*(chat(str(i)) for i in range(50)), "{")).line == 51


def test_line_too_long() -> None:
    ok = json.dumps(simple("a"))
    long = json.dumps(simple("b", "y" * 500))
    error = fails(f"{ok}\n{long}\r\n{ok}\n", max_line_bytes=100)
    expected = f"line is {len(long)} bytes; the limit is 100"
    assert (error.line, error.field, error.message) == (2, None, expected)
    assert fails(f"{ok}\n{long}", max_line_bytes=100).message == expected
    assert fails("x" * 101, max_line_bytes=100).message == "line is 101 bytes; the limit is 100"


def test_line_length_counts_a_crlf_split_across_reads() -> None:
    # The over-long line is read in chunks; its "\r\n" must not be counted wherever the chunks end.
    for length in range(1_048_570, 1_048_580):
        data = b"x" * length + b"\r\n"
        assert fails(data, max_line_bytes=10).message == f"line is {length} bytes; the limit is 10"


def test_too_many_items_names_the_first_line_over_the_limit() -> None:
    error = fails(jsonl(simple("a"), "", simple("b"), simple("c")), max_items=2)
    expected = "file has more than 2 requests; the limit is 2"
    assert (error.line, error.field, error.message) == (4, None, expected)


# --- property tests: any input parses or raises InputError, nothing else -------------------------

ID_CHARS = st.characters(exclude_categories=["Cs"], exclude_characters="\x00")  # storable strings
FUZZ = settings(max_examples=300, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=5), kids, max_size=3),
    max_leaves=10,
)
valid_lines = st.sampled_from([chat, completion, simple]).flatmap(
    lambda make: st.builds(make, st.text(ID_CHARS, min_size=1, max_size=6)))


def parse_or_input_error(data: bytes | str, **overrides: Any) -> list[ParsedItem] | None:
    try:
        items = parse(data, **overrides)
    except InputError as error:
        assert error.path == NAME and error.message
        return None
    assert items and len({i.custom_id for i in items}) == len(items)
    assert all(isinstance(i.request.sampling, SamplingParams) for i in items)
    return items


@FUZZ
@given(st.binary(max_size=500), st.integers(1, 200), st.integers(1, 5))
def test_arbitrary_bytes(data: bytes, max_line_bytes: int, max_items: int) -> None:
    parse_or_input_error(data, max_line_bytes=max_line_bytes, max_items=max_items)


@FUZZ
@given(st.lists(json_values | st.dictionaries(st.sampled_from(
    ["custom_id", "id", "text", "method", "url", "body", "messages", "prompt", "max_tokens", "temperature",
     "top_p", "stop", "seed", "n", "stream", "model", "role", "content"]), json_values, max_size=6),
    min_size=1, max_size=4))
def test_arbitrary_json_lines(lines: list[Any]) -> None:
    parse_or_input_error(jsonl(*(json.dumps(line) for line in lines)))


@FUZZ
@given(st.lists(valid_lines, min_size=1, max_size=5), st.data())
def test_mutated_valid_files(lines: list[dict[str, Any]], data: st.DataObject) -> None:
    text = jsonl(*lines).encode()
    for _ in range(data.draw(st.integers(0, 4))):
        text = data.draw(st.sampled_from([flip_byte, truncate, duplicate_line, insert_bytes]))(text, data)
    limits = {"max_line_bytes": data.draw(st.integers(1, 400)), "max_items": data.draw(st.integers(1, 6))}
    parse_or_input_error(text, **limits)


@FUZZ
@given(st.lists(valid_lines, min_size=1, max_size=5))
def test_valid_files_parse(lines: list[dict[str, Any]]) -> None:
    ids = [line["custom_id"] for line in lines]
    kinds = {line.get("url") for line in lines}  # simple lines have none
    items = parse_or_input_error(jsonl(*lines).encode())
    if len(set(ids)) == len(ids) and len(kinds) == 1:
        assert items is not None and [i.custom_id for i in items] == ids


def decoded_or_error(decode: Any, raw: bytes) -> Any:
    try:
        return decode(raw)
    except InputError as error:
        return str(error)


def reference_decode(raw: bytes) -> Any:
    """decode_line with json.loads only (its path before msgspec)."""
    obj = reading._decode_slowly(raw.decode("utf-8"), NAME, 1)
    if not isinstance(obj, dict):
        raise InputError(NAME, 1, None, f"not a JSON object (found {reading._JSON_TYPES[type(obj)]})")
    if problem := reading._storage_problem(obj):
        raise InputError(NAME, 1, None, problem)
    return obj


@FUZZ
@given(st.dictionaries(st.text(), json_values | st.integers() | st.floats() | st.text(st.characters(categories=["Cs"])),
                       max_size=4), st.data())
def test_fast_decoder_agrees_with_json_loads(obj: dict[str, Any], data: st.DataObject) -> None:
    """msgspec decodes a line; what it takes or refuses must come out as json.loads' path would have it."""
    raw = json.dumps(obj, ensure_ascii=data.draw(st.booleans())).encode("utf-8", "surrogatepass")
    for _ in range(data.draw(st.integers(0, 2))):
        raw = data.draw(st.sampled_from([flip_byte, truncate, insert_bytes]))(raw, data)
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return  # refused before either decoder runs
    fast = decoded_or_error(lambda r: reading.decode_line(r, NAME, 1), raw)
    assert fast == decoded_or_error(reference_decode, raw)


def flip_byte(text: bytes, data: st.DataObject) -> bytes:
    if not text:
        return text
    i = data.draw(st.integers(0, len(text) - 1))
    return text[:i] + bytes([data.draw(st.integers(0, 255))]) + text[i + 1:]


def truncate(text: bytes, data: st.DataObject) -> bytes:
    return text[: data.draw(st.integers(0, len(text)))]


def duplicate_line(text: bytes, data: st.DataObject) -> bytes:
    lines = text.split(b"\n")
    i = data.draw(st.integers(0, len(lines) - 1))
    return b"\n".join(lines[: i + 1] + lines[i:])


def insert_bytes(text: bytes, data: st.DataObject) -> bytes:
    i = data.draw(st.integers(0, len(text)))
    return text[:i] + data.draw(st.binary(min_size=1, max_size=4)) + text[i:]


# --- output lines ---------------------------------------------------------------------------------


def test_chat_success_line_round_trips() -> None:
    line = success_line("q1", "req1", SERVED, CHAT_URL, "Hello!", "stop", 10, 3, created=1_700_000_000)
    assert OutputLine.model_validate_json(line.model_dump_json()) == line
    out = json.loads(line.model_dump_json())
    assert out["id"].startswith("batch_req_") and out["custom_id"] == "q1" and out["error"] is None
    assert out["response"]["status_code"] == 200 and out["response"]["request_id"] == "req1"
    body = out["response"]["body"]
    assert (body["object"], body["model"], body["created"]) == ("chat.completion", SERVED, 1_700_000_000)
    assert body["choices"] == [{"index": 0, "message": {"role": "assistant", "content": "Hello!"},
                                "finish_reason": "stop", "logprobs": None}]
    assert body["usage"] == {"prompt_tokens": 10, "completion_tokens": 3, "total_tokens": 13}


def test_completion_success_line_round_trips() -> None:
    line = success_line("q2", "req2", SERVED, COMPLETIONS_URL, " a time", "length", 4, 2, created=5,
                        line_id="batch_req_fixed")
    again = OutputLine.model_validate_json(line.model_dump_json())
    assert again == line and again.id == "batch_req_fixed"
    assert again.response is not None and isinstance(again.response.body, CompletionBody)
    assert again.response.body.object == "text_completion"
    assert again.response.body.choices[0].text == " a time"


def test_error_line_round_trips() -> None:
    line = error_line("q3", "model_not_found", "model 'gpt-4o' is not served")
    assert OutputLine.model_validate_json(line.model_dump_json()) == line
    out = json.loads(line.model_dump_json())
    assert out["response"] is None
    assert out["error"] == {"code": "model_not_found", "message": "model 'gpt-4o' is not served"}


def test_output_line_has_exactly_one_outcome() -> None:
    with pytest.raises(ValidationError):
        OutputLine(id="batch_req_x", custom_id="q")
    good = success_line("q", "r", SERVED, CHAT_URL, "t", "stop", 1, 1, created=0)
    with pytest.raises(ValidationError):
        OutputLine(id="x", custom_id="q", response=good.response, error=error_line("q", "c", "m").error)
    with pytest.raises(ValueError):
        success_line("q", "r", SERVED, "/v1/embeddings", "t", "stop", 1, 1, created=0)


@settings(max_examples=100, deadline=None, database=None)
@given(st.text(st.characters(exclude_categories=["Cs"])), st.text(st.characters(exclude_categories=["Cs"])),
       st.sampled_from([CHAT_URL, COMPLETIONS_URL]), st.sampled_from(["stop", "length"]),
       st.integers(0, 10**6), st.integers(0, 10**6))
def test_output_lines_round_trip_any_text(custom_id: str, text: str, url: str, finish: Any, p: int,
                                          c: int) -> None:
    for line in (success_line(custom_id, "r", SERVED, url, text, finish, p, c, created=1),
                 error_line(custom_id, "engine_error", text)):
        assert OutputLine.model_validate_json(line.model_dump_json()) == line
        assert json.loads(line.model_dump_json().encode())["custom_id"] == custom_id
