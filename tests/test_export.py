"""Generation export read back and compared with SQL: CSV (commas, quotes, newlines, non-ASCII), failed,
expired and unfinished rows, the `--errors` split, and the same rows as JSONL re-parsed with schema.outputs.

Outcomes are written with worker.store (claim, write_outcomes) as a chunk would: the subject is export."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select, update

from producer import api
from schema import store
from schema.db import epoch, get_sessionmaker
from schema.kinds.generate import CSV_COLUMNS
from schema.lines import CHAT_URL, COMPLETIONS_URL
from schema.outputs import ChatCompletionBody, CompletionBody, OutputLine
from schema.states import ItemStatus
from schema.tables import Batch, Item, Result
from tests.conftest import gristmill
from worker.reconciler import expire_due

# custom_id -> (answer text, finish_reason, prompt tokens, completion tokens), or an engine error
ANSWERS: dict[str, tuple[str, str, int, int] | str] = {
    "plain": ("Paris.", "stop", 11, 2),
    "comma, \"quoted\" id": ("one, two, three", "stop", 12, 5),
    "quotes": ('She said "hi" and left: ""', "length", 13, 8),
    "newlines": ("first line\nsecond line\r\nthird\rfourth\n", "stop", 14, 9),
    "unicode": ("naïve café, Straße — 日本語 🚀", "stop", 15, 10),
    "empty": ("", "stop", 16, 0),
    "spaces": ("  padded, \n ", "length", 17, 3),
    "engine-failed": 'engine_error: bad "token", at 3\nsecond line',
}
UNRUNNABLE = "other-model"  # fails at validation: a model this deployment does not serve
RUNNING = "still-running"  # claimed, no outcome yet: not exported
EXPIRED = ["late-1", "late, 2 \"ü\""]  # queued when the completion window passed


@dataclass
class Batchset:
    batch_id: str
    handle: api.BatchHandle
    url: str


def make_batch(db_url: str, settings_for: Any, tmp_path: Path, endpoint: str = CHAT_URL) -> Batchset:
    """A batch with every kind of row export meets, in a scrambled input order."""
    settings = settings_for(db_url)
    ids = [*ANSWERS, UNRUNNABLE, RUNNING, *EXPIRED]
    order = ids[::2] + ids[1::2]  # interleaved: succeeded, failed, running and expired rows alternate

    def body(custom_id: str) -> dict[str, Any]:
        prompt: dict[str, Any] = ({"messages": [{"role": "user", "content": f"q {custom_id}"}]}
                                  if endpoint == CHAT_URL else {"prompt": f"q {custom_id}"})
        return {**prompt, "model": "gpt-4o"} if custom_id == UNRUNNABLE else prompt

    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps({"custom_id": c, "method": "POST", "url": endpoint, "body": body(c)},
                                       ensure_ascii=False) + "\n" for c in order), encoding="utf-8")
    handle = api.submit(path, settings=settings)
    sessions = get_sessionmaker(db_url)
    with sessions() as session:
        by_custom = dict(session.execute(select(Item.custom_id, Item.id).where(Item.batch_id == handle.id)).all())
    with sessions() as session, session.begin():
        claimed = store.claim(session, handle.id, [by_custom[c] for c in [*ANSWERS, RUNNING]], "host-1", 600)
        outcomes = []
        for c in claimed:
            answer = ANSWERS.get(c.custom_id)
            if isinstance(answer, str):
                outcomes.append(store.Outcome(c, error=answer, error_code="context_length_exceeded"))
            elif answer is not None:
                text, finish, prompt_tokens, completion_tokens = answer
                outcomes.append(store.Outcome(c, text=text, finish_reason=finish, prompt_tokens=prompt_tokens,
                                              completion_tokens=completion_tokens))
        started = datetime.now(UTC)
        finished = started + timedelta(seconds=2)
        eb = store.record_engine_batch(session, handle.id, "host-1", "null", "smollm2-135m-instruct", outcomes,
                                       started, finished)
        written = store.write_outcomes(session, handle.id, outcomes, engine="null", model="smollm2-135m-instruct",
                                       engine_batch_id=eb, started=started, finished=finished)
        store.count(session, handle.id, **written.ended)
    with sessions() as session, session.begin():
        session.execute(update(Batch).where(Batch.id == handle.id).values(
            expires_at=datetime.now(UTC) - timedelta(seconds=1)))
        assert expire_due(session) == [handle.id]
    return Batchset(handle.id, handle, db_url)


def sql_rows(batch: Batchset) -> list[dict[str, Any]]:
    """What SQL holds for each item, in input order."""
    with get_sessionmaker(batch.url)() as session:
        rows = session.execute(
            select(Item.id, Item.custom_id, Item.status, Item.last_error, Item.error_code, Item.model,
                   Result.output_text,
                   Result.finish_reason, Result.prompt_tokens, Result.completion_tokens, Result.truncated_tokens,
                   Result.created_at)
            .outerjoin(Result, Result.item_id == Item.id).where(Item.batch_id == batch.batch_id)
            .order_by(Item.line)).all()
    return [row._asdict() for row in rows]


def expected_csv(row: dict[str, Any]) -> dict[str, str]:
    ok = row["status"] == ItemStatus.succeeded
    return {
        "custom_id": row["custom_id"], "status": row["status"],
        "output_text": row["output_text"] if ok else "", "finish_reason": row["finish_reason"] if ok else "",
        "prompt_tokens": str(row["prompt_tokens"]) if ok else "",
        "completion_tokens": str(row["completion_tokens"]) if ok else "",
        "truncated_tokens": str(row["truncated_tokens"]) if ok else "",
        "error_code": "" if ok else row["error_code"], "error": "" if ok else row["last_error"],
    }


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == CSV_COLUMNS
        return list(reader)


def test_sql_holds_what_the_test_wrote(db_url: str, settings_for, tmp_path: Path) -> None:
    """The fixture itself: every kind of row is there, so the export tests below compare real cases."""
    rows = {r["custom_id"]: r for r in sql_rows(make_batch(db_url, settings_for, tmp_path))}
    assert rows["newlines"]["output_text"] == ANSWERS["newlines"][0]
    assert rows["unicode"]["output_text"] == ANSWERS["unicode"][0]
    assert rows["engine-failed"]["status"] == ItemStatus.failed
    assert rows["engine-failed"]["last_error"] == ANSWERS["engine-failed"]
    assert rows["engine-failed"]["error_code"] == "context_length_exceeded"
    assert rows[UNRUNNABLE]["status"] == ItemStatus.failed and "gpt-4o" in rows[UNRUNNABLE]["last_error"]
    assert rows[UNRUNNABLE]["error_code"] == "model_not_found"
    assert rows[RUNNING]["status"] == ItemStatus.running and rows[RUNNING]["error_code"] is None
    assert [rows[c]["status"] for c in EXPIRED] == [ItemStatus.expired] * 2
    assert [rows[c]["error_code"] for c in EXPIRED] == ["batch_expired"] * 2


def test_csv_inline(db_url: str, settings_for, tmp_path: Path) -> None:
    batch = make_batch(db_url, settings_for, tmp_path)
    out = tmp_path / "out.csv"
    counts = batch.handle.results(out, fmt="csv")
    rows = sql_rows(batch)
    exported = [r for r in rows if r["status"] != ItemStatus.running]
    assert read_csv(out) == [expected_csv(r) for r in exported]
    assert (counts.succeeded, counts.failed, counts.pending) == (7, 4, 1)
    assert not list(tmp_path.glob("*.tmp"))


def test_csv_errors_split_through_cli(db_url: str, settings_for, tmp_path: Path) -> None:
    batch = make_batch(db_url, settings_for, tmp_path)
    out, errors = tmp_path / "out.csv", tmp_path / "errors.csv"
    proc = gristmill("results", batch.batch_id, "-o", str(out), "--errors", str(errors), "--format", "csv",
                     settings=settings_for(db_url), cwd=tmp_path)
    assert "7 succeeded, 4 failed, 1 not finished" in proc.stderr
    rows = sql_rows(batch)
    assert read_csv(out) == [expected_csv(r) for r in rows if r["status"] == ItemStatus.succeeded]
    bad = [r for r in rows if r["status"] in (ItemStatus.failed, ItemStatus.expired)]
    assert read_csv(errors) == [expected_csv(r) for r in bad]
    assert {r["status"] for r in bad} == {ItemStatus.failed, ItemStatus.expired}


@pytest.mark.parametrize("endpoint", [CHAT_URL, COMPLETIONS_URL])
@pytest.mark.parametrize("split", [False, True], ids=["inline", "errors-file"])
def test_jsonl(endpoint: str, split: bool, db_url: str, settings_for, tmp_path: Path) -> None:
    batch = make_batch(db_url, settings_for, tmp_path, endpoint)
    out, errors = tmp_path / "out.jsonl", tmp_path / "errors.jsonl"
    counts = batch.handle.results(out, errors if split else None)
    assert (counts.succeeded, counts.failed, counts.pending) == (7, 4, 1)
    lines = [OutputLine.model_validate_json(line) for line in out.read_text(encoding="utf-8").splitlines()]
    if split:
        assert all(line.error is None for line in lines)
        lines += [OutputLine.model_validate_json(line) for line in errors.read_text(encoding="utf-8").splitlines()]
    else:
        assert not errors.exists()
    rows = [r for r in sql_rows(batch) if r["status"] != ItemStatus.running]
    ok = [r for r in rows if r["status"] == ItemStatus.succeeded]
    bad = [r for r in rows if r["status"] != ItemStatus.succeeded]
    assert [line.custom_id for line in lines] == [r["custom_id"] for r in (ok + bad if split else rows)]
    by_id = {line.custom_id: line for line in lines}
    for row in ok:
        line = by_id[row["custom_id"]]
        assert line.error is None and line.response is not None and line.id == f"batch_req_{row['id']}"
        body = line.response.body
        if endpoint == CHAT_URL:
            assert isinstance(body, ChatCompletionBody)
            text = body.choices[0].message.content
        else:
            assert isinstance(body, CompletionBody)
            text = body.choices[0].text
        assert text == row["output_text"] and body.choices[0].finish_reason == row["finish_reason"]
        assert (body.usage.prompt_tokens, body.usage.completion_tokens, body.usage.total_tokens) == (
            row["prompt_tokens"], row["completion_tokens"], row["prompt_tokens"] + row["completion_tokens"])
        assert body.model == row["model"] and body.created == epoch(row["created_at"])
    for row in bad:
        line = by_id[row["custom_id"]]
        assert line.response is None and line.error is not None
        assert (line.error.code, line.error.message) == (row["error_code"], row["last_error"])
    assert {by_id[row["custom_id"]].error.code for row in bad} == {  # type: ignore[union-attr]
        "context_length_exceeded", "model_not_found", "batch_expired"}
