"""Structured extraction on both real engines: `--task extract --schema` and OpenAI lines with a
response_format. Every answer parses and validates against its schema; an answer that cannot is an
item error (schema_mismatch, invalid_json) with its raw text, and the rest of the batch runs."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from sqlalchemy import select

from producer import api
from schema.db import get_sessionmaker
from schema.errors import InputError
from schema.jobs import SamplingParams
from schema.outputs import OutputLine
from schema.queue import Queue
from schema.states import BatchStatus
from schema.tables import Item
from tests.conftest import gristmill
from worker import executor
from worker.engine_loop import EngineLoop
from worker.runtime import Runtime

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "city": {"type": "string", "enum": ["Paris", "Berlin", "Rome", "Madrid"]},
        "contact": {"type": "object", "properties": {"email": {"type": "string"}}, "required": ["email"],
                    "additionalProperties": False},
    },
    "required": ["name", "age", "city", "contact"],
    "additionalProperties": False,
}
TEXTS = {
    "anna": "Anna is 31 and lives in Rome. Write to anna@example.com.",
    "bob": "Bob, 45, moved to Berlin last year; his address is bob@mail.de.",
    "chloe": "Chloe (27) works in Paris. Contact: chloe.m@web.fr",
    "diego": "Diego is a 52-year-old teacher from Madrid, diego@correo.es.",
}


@pytest.fixture(params=["transformers", "vllm"])
def engine(request: pytest.FixtureRequest) -> tuple[Any, EngineLoop]:
    return request.getfixturevalue(f"{request.param}_loop")  # type: ignore[no-any-return]


def write_lines(path: Path, lines: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def run_batch(settings: Any, handle: api.BatchHandle, engine: tuple[Any, EngineLoop]) -> dict[str, Item]:
    with get_sessionmaker(settings.database_url)() as session:
        ids = list(session.scalars(select(Item.id).where(Item.batch_id == handle.id, Item.status == "queued")))
    executor.run_chunk(Runtime(settings, *engine, queue=Queue(settings)), handle.id, ids)
    assert handle.status().status == BatchStatus.completed
    with get_sessionmaker(settings.database_url)() as session:
        return {i.custom_id: i for i in session.scalars(select(Item).where(Item.batch_id == handle.id))}


def answers(handle: api.BatchHandle) -> dict[str, Any]:
    """Each succeeded line's answer, after checking every line against vLLM's own batch output model."""
    from vllm.entrypoints.launchers.run_batch import BatchRequestOutput

    found = {}
    for record in handle.output():
        text = record.line.model_dump_json()
        BatchRequestOutput.model_validate_json(text)
        line = OutputLine.model_validate_json(text)
        if line.response is not None:
            found[line.custom_id] = json.loads(line.response.body.choices[0].message.content)  # type: ignore[union-attr]
    return found


def test_extraction_follows_a_nested_schema_with_enums(sqlite_url: str, settings_for, tmp_path: Path,
                                                        engine: tuple[Any, EngineLoop]) -> None:  # type: ignore[no-untyped-def]
    settings = settings_for(sqlite_url)
    docs = write_lines(tmp_path / "people.jsonl", [{"id": k, "text": v} for k, v in TEXTS.items()])
    handle = api.submit(docs, settings=settings, task="extract", json_schema=PERSON,
                        sampling=SamplingParams(max_tokens=96))
    items = run_batch(settings, handle, engine)
    assert {c: (i.status, i.error_code) for c, i in items.items()} == {c: ("succeeded", None) for c in TEXTS}
    found = answers(handle)
    assert set(found) == set(TEXTS)
    for answer in found.values():
        jsonschema.validate(answer, PERSON)
    table = tmp_path / "people.csv"
    handle.results(table, fmt="csv")
    rows = list(csv.DictReader(table.open(encoding="utf-8")))
    assert list(rows[0]) == ["custom_id", "status", "name", "age", "city", "contact", "error_code", "error"]
    assert [(r["name"], int(r["age"]), r["city"]) for r in rows] == [
        (found[c]["name"], found[c]["age"], found[c]["city"]) for c in TEXTS]
    assert json.loads(rows[0]["contact"]) == found["anna"]["contact"]


def test_unfollowable_answers_fail_alone(sqlite_url: str, settings_for, tmp_path: Path,
                                         engine: tuple[Any, EngineLoop]) -> None:  # type: ignore[no-untyped-def]
    """OpenAI lines with response_format in one batch: an impossible schema (minimum above maximum) gives
    schema_mismatch, an answer cut by max_tokens gives invalid_json, the others succeed."""
    settings = settings_for(sqlite_url)
    impossible = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 10, "maximum": 5}},
                  "required": ["n"]}

    def line(custom_id: str, fmt: dict[str, Any], max_tokens: int = 64, text: str = TEXTS["anna"]) -> dict[str, Any]:
        return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
                "body": {"messages": [{"role": "user", "content": f"As JSON: {text}"}],
                         "max_tokens": max_tokens, "response_format": fmt}}

    person = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    # lm-format-enforcer cannot enforce a pattern with a length; vLLM's grammar can
    coded = {"type": "object", "properties": {"code": {"type": "string", "pattern": "^[A-Z]+$", "minLength": 2}},
             "required": ["code"]}
    batch = write_lines(tmp_path / "in.jsonl", [
        line("object", {"type": "json_object"}, text='the object {"ok": true}'),
        line("person", person, max_tokens=96),
        line("impossible", {"type": "json_schema", "json_schema": {"name": "n", "schema": impossible}}),
        line("cut", person, max_tokens=4),
        line("pattern", {"type": "json_schema", "json_schema": {"name": "code", "schema": coded}}, max_tokens=24),
    ])
    handle = api.submit(batch, settings=settings)
    items = run_batch(settings, handle, engine)
    codes = {c: i.error_code for c, i in items.items()}
    assert codes.pop("pattern") in (None, "schema_mismatch", "unsupported")  # it fails alone, if at all
    assert codes == {"object": None, "person": None, "impossible": "schema_mismatch", "cut": "invalid_json"}
    assert engine[1].alive  # no request's schema stopped the engine
    assert "raw answer: " in (items["cut"].last_error or "")
    found = answers(handle)
    assert isinstance(found["object"], dict)
    jsonschema.validate(found["person"], PERSON)


def test_classification_through_chat_lines(sqlite_url: str, settings_for, tmp_path: Path,
                                           engine: tuple[Any, EngineLoop]) -> None:  # type: ignore[no-untyped-def]
    """vLLM's structured_outputs.choice (and its older guided_choice) in an OpenAI chat line: the answer is
    exactly one of the choices, as the HTTP API's clients classify."""
    settings = settings_for(sqlite_url)
    labels = ["billing", "bug report", "feature request"]
    texts = {"refund": "I was charged twice this month, please refund me.",
             "crash": "The app crashes when I open the settings page.",
             "dark": "Please add a dark mode (it would be nice)."}

    def line(custom_id: str, text: str, constraint: dict[str, Any]) -> dict[str, Any]:
        return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
                "body": {"messages": [{"role": "user", "content": f"Is this ticket about billing, a bug report or "
                                                                  f"a feature request? {text}"}],
                         "max_tokens": 24, **constraint}}  # room for the longest choice, however it is tokenised

    batch = write_lines(tmp_path / "in.jsonl", [
        line(c, t, {"structured_outputs": {"choice": labels}} if c != "dark" else {"guided_choice": labels})
        for c, t in texts.items()])
    handle = api.submit(batch, settings=settings)
    items = run_batch(settings, handle, engine)
    assert {c: (i.error_code, i.last_error) for c, i in items.items()} == dict.fromkeys(texts, (None, None))
    contents = {r.line.custom_id: r.line.response.body.choices[0].message.content  # type: ignore[attr-defined]
                for r in handle.output()}
    assert set(contents) == set(texts) and set(contents.values()) <= set(labels)


@pytest.mark.parametrize(("constraint", "message"), [
    ({"structured_outputs": {"choice": ["a", "b"], "regex": "[a-z]+"}}, "structured_outputs.regex"),
    ({"guided_choice": ["only one"]}, "guided_choice"),
    ({"guided_choice": ["a", "b"], "response_format": {"type": "json_object"}}, "give one of response_format and"),
])
def test_unusable_choices_are_refused(constraint: dict[str, Any], message: str, sqlite_url: str,  # type: ignore[no-untyped-def]
                                      settings_for, tmp_path: Path) -> None:
    lines = write_lines(tmp_path / "in.jsonl", [{"custom_id": "a", "method": "POST", "url": "/v1/chat/completions",
                                                  "body": {"messages": [{"role": "user", "content": "x"}],
                                                           **constraint}}])
    with pytest.raises(InputError, match=message) as refused:
        api.submit(lines, settings=settings_for(sqlite_url))
    assert refused.value.line == 1


@pytest.mark.parametrize(("schema", "message"), [
    ({"type": "array", "items": {"type": "string"}}, 'top level needs "type": "object"'),
    ({"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}}, "does not point inside the schema"),
    ({"type": "object", "properties": {"a": {"$ref": "https://example.com/a.json"}}}, "only local references"),
])
def test_unusable_schemas_are_refused(schema: dict[str, Any], message: str, sqlite_url: str, settings_for,  # type: ignore[no-untyped-def]
                                      tmp_path: Path) -> None:
    docs = write_lines(tmp_path / "people.jsonl", [{"id": "a", "text": "x"}])
    with pytest.raises(InputError, match=message):
        api.submit(docs, settings=settings_for(sqlite_url), task="extract", json_schema=schema)
    assert api.list_batches(settings=settings_for(sqlite_url)) == []


def test_extraction_takes_simple_lines(sqlite_url: str, settings_for, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    lines = write_lines(tmp_path / "in.jsonl", [{"custom_id": "a", "method": "POST", "url": "/v1/chat/completions",
                                                  "body": {"messages": [{"role": "user", "content": "x"}]}}])
    with pytest.raises(InputError, match="send OpenAI lines with a response_format with --task generate"):
        api.submit(lines, settings=settings_for(sqlite_url), task="extract", json_schema=PERSON)


def test_extract_from_the_cli(sqlite_url: str, settings_for, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    settings = settings_for(sqlite_url)
    (tmp_path / "person.yaml").write_text(json.dumps(PERSON))
    docs = write_lines(tmp_path / "people.jsonl", [{"id": k, "text": v} for k, v in list(TEXTS.items())[:2]])
    bad = gristmill("submit", str(docs), "--task", "extract", "--schema", str(tmp_path / "nope.json"),
                    settings=settings, cwd=tmp_path, check=False)
    assert bad.returncode == 2 and "nope.json: cannot read file" in bad.stderr
    (tmp_path / "broken.json").write_text('{"type": "objekt"}')
    bad = gristmill("submit", str(docs), "--task", "extract", "--schema", str(tmp_path / "broken.json"),
                    settings=settings, cwd=tmp_path, check=False)
    assert bad.returncode == 2 and "not a valid JSON schema" in bad.stderr, bad.stderr
    out = tmp_path / "people.csv"
    gristmill("run", str(docs), "--task", "extract", "--schema", str(tmp_path / "person.yaml"), "--max-tokens", "96",
              "--engine", "transformers", "--format", "csv", "-o", str(out), settings=settings, cwd=tmp_path)
    rows = list(csv.DictReader(out.open(encoding="utf-8")))
    assert [r["custom_id"] for r in rows] == ["anna", "bob"] and all(r["status"] == "succeeded" for r in rows)
    assert {r["city"] for r in rows} <= {"Paris", "Berlin", "Rome", "Madrid"}
