"""Documents longer than the model's context, through submission, a real engine (vLLM, the default
model at its own 8,192-token context) and export: they fail with context_length_exceeded unless the
batch asks to truncate, and then the answer comes from the part kept. A secret word stands at each end
of a document about three times the context; the instruction (the system prompt) is never cut."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from producer import api
from schema import windows
from schema.db import get_sessionmaker
from schema.jobs import GenerationRequest, SamplingParams
from schema.kinds.classify import Classification, ClassifyRequest, combine
from schema.queue import Queue
from schema.tables import Classification as ClassificationRow
from schema.tables import Item
from tests.conftest import gristmill
from tests.test_faults import workers_on  # noqa: F401  # a fixture
from worker import executor
from worker.runtime import Runtime

QUESTION = "What is the secret word in the user's text? Answer with the word only."
DOCUMENT = "The secret word is PINEAPPLE.\n" + "Nothing happened today. " * 6000 + "\nThe secret word is MANGO."
KEPT = 600  # prompt tokens kept (truncate_to): the answer must come from the part kept, whatever the context


def test_default_context_is_the_models_own(transformers_loop: Any, vllm_loop: Any) -> None:
    """No GRISTMILL_MAX_MODEL_LEN: both engines take the default model's own context (SmolLM2 was trained
    for 8,192 tokens; vLLM's CPU KV cache holds that for one sequence)."""
    assert transformers_loop[0].max_model_len == vllm_loop[0].max_model_len == 8192


def run(settings: Any, engine: Any, path: Path, **options: Any) -> api.BatchHandle:
    handle = api.submit(path, settings=settings, **options)
    with get_sessionmaker(settings.database_url)() as session:
        ids = list(session.scalars(select(Item.id).where(Item.batch_id == handle.id, Item.status == "queued")))
    executor.run_chunk(Runtime(settings, *engine, queue=Queue(settings)), handle.id, ids)
    assert handle.status().done
    return handle


def only_line(handle: api.BatchHandle) -> dict[str, Any]:
    (record,) = list(handle.output())
    return json.loads(record.line.model_dump_json())


def test_too_long_fails_or_keeps_the_part_asked_for(sqlite_url: str, settings_for, tmp_path: Path,  # type: ignore[no-untyped-def]
                                                    vllm_loop: Any) -> None:
    settings = settings_for(sqlite_url)
    assert vllm_loop[0].max_model_len == 8192  # the model's own: the document is about 3x that
    simple = tmp_path / "doc.jsonl"
    simple.write_text(json.dumps({"id": "doc", "text": DOCUMENT}) + "\n")

    failed = only_line(run(settings, vllm_loop, simple, system_prompt=QUESTION))
    assert failed["error"]["code"] == "context_length_exceeded" and "context is 8192" in failed["error"]["message"]

    answers = {}
    for keep in ("head", "tail"):
        handle = run(settings, vllm_loop, simple, system_prompt=QUESTION,
                     sampling=SamplingParams(max_tokens=8, truncate=keep, truncate_to=KEPT))
        line = only_line(handle)
        usage = line["response"]["body"]["usage"]
        assert usage["prompt_tokens"] <= KEPT and usage["truncated_tokens"] > 20_000
        answers[keep] = line["response"]["body"]["choices"][0]["message"]["content"]
        stats = handle.stats()
        assert (stats["truncated_items"], stats["truncated_tokens"]) == (1, usage["truncated_tokens"])
    assert "PINEAPPLE" in answers["head"] and "MANGO" not in answers["head"]
    assert "MANGO" in answers["tail"] and "PINEAPPLE" not in answers["tail"]

    # CSV export carries the count; an untruncated item's usage has no such field
    gristmill("results", handle.id, "-o", "out.csv", "--format", "csv", settings=settings, cwd=tmp_path)
    (row,) = csv.DictReader((tmp_path / "out.csv").open())
    assert int(row["truncated_tokens"]) == usage["truncated_tokens"]


def test_openai_lines_with_truncate_prompt_tokens(sqlite_url: str, settings_for, tmp_path: Path,  # type: ignore[no-untyped-def]
                                                 vllm_loop: Any) -> None:
    """vLLM's truncate_prompt_tokens extension in a batch body: the prompt keeps at most that many tokens,
    the document's tail (as vLLM keeps a prompt's last tokens), the system message whole."""
    settings = settings_for(sqlite_url)
    path = tmp_path / "batch.jsonl"

    def line(custom_id: str, **extra: Any) -> str:
        body = {"model": settings.model, "max_tokens": 8, "messages": [
            {"role": "system", "content": QUESTION}, {"role": "user", "content": DOCUMENT}], **extra}
        return json.dumps({"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions", "body": body}) + "\n"

    path.write_text(line("cut", truncate_prompt_tokens=KEPT) + line("short", messages=[
        {"role": "user", "content": "Say hello."}]))
    handle = api.submit(path, settings=settings)
    with get_sessionmaker(settings.database_url)() as session:
        ids = list(session.scalars(select(Item.id).where(Item.batch_id == handle.id)))
    executor.run_chunk(Runtime(settings, *vllm_loop, queue=Queue(settings)), handle.id, ids)
    lines = {r.line.custom_id: json.loads(r.line.model_dump_json()) for r in handle.output()}
    cut = lines["cut"]["response"]["body"]
    assert "MANGO" in cut["choices"][0]["message"]["content"]
    assert cut["usage"]["prompt_tokens"] <= KEPT and cut["usage"]["truncated_tokens"] > 20_000
    assert "truncated_tokens" not in lines["short"]["response"]["body"]["usage"]


def test_map_reduce_on_a_real_engine(sqlite_url: str, settings_for, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """`gristmill run --long-documents map-reduce` as a user runs it (transformers, a 1,024-token context
    so a document of about three contexts stays quick): the document goes to windows through the broker,
    the first window's answer names the fact at the start and the last the fact at the end, the reduce
    runs over both, and the export has one line per input line. (Whether the 135M model's reduce keeps
    both facts is the model's business: it often keeps one; the faults tests below use an engine that
    never misses one, to show that both always reach the reduce.)"""
    settings = settings_for(sqlite_url, max_model_len=1024)
    document = "The secret word is PINEAPPLE.\n" + "Nothing happened today. " * 700 + "\nThe secret word is MANGO."
    (tmp_path / "doc.jsonl").write_text(json.dumps({"id": "doc", "text": document}) + "\n"
                                        + json.dumps({"id": "short", "text": "Say hi."}) + "\n")
    gristmill("run", "doc.jsonl", "-o", "out.jsonl", "--engine", "transformers", "--long-documents", "map-reduce",
              "--system", "What is the secret word in the user's text? Answer with the word only.",
              "--max-tokens", "16", settings=settings, cwd=tmp_path)
    lines = {line["custom_id"]: line for line in map(json.loads, (tmp_path / "out.jsonl").read_text().splitlines())}
    assert list(lines) == ["doc", "short"]  # one line per input line, in input order: no window
    assert lines["doc"]["response"]["body"]["choices"][0]["message"]["content"].strip()
    with get_sessionmaker(sqlite_url)() as session:
        items = session.scalars(select(Item).order_by(Item.id)).all()
        document_item = next(i for i in items if i.custom_id == "doc")
        answers = windows.answers(session, document_item.id, 1)
    window_items = [i for i in items if i.parent_id == document_item.id]
    assert len(window_items) == len(answers) >= 3 and [w.window for w in window_items] == list(range(len(answers)))
    assert all(w.status == "succeeded" and w.attempts == 1 and w.round == 1 for w in window_items)
    assert (document_item.status, document_item.round, document_item.attempts) == ("succeeded", 1, 1)  # its reduce
    assert "PINEAPPLE" in answers[0] and "MANGO" in answers[-1] and "MANGO" not in answers[0]
    reduce = windows.reduce_request(GenerationRequest.model_validate(document_item.request), answers)
    assert reduce.messages is not None and "secret word" in reduce.messages[0].content  # the instruction kept
    assert "PINEAPPLE" in reduce.messages[-1].content and "MANGO" in reduce.messages[-1].content


def test_classification_averages_its_windows(sqlite_url: str, settings_for, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """`gristmill run --task classify --long-documents map-reduce` (transformers, a 512-token context): a
    review of about three contexts, praise then complaints, is classified window by window; its answer,
    stored and exported as any line's, is the windows' probabilities averaged; a short line runs whole."""
    settings = settings_for(sqlite_url, max_model_len=512)
    review = " ".join(["The battery lasts all day and the screen is lovely."] * 40
                      + ["It broke after a week and support never answered."] * 80)
    (tmp_path / "in.jsonl").write_text(json.dumps({"id": "review", "text": review}) + "\n"
                                       + json.dumps({"id": "short", "text": "I love it."}) + "\n")
    gristmill("run", "in.jsonl", "-o", "out.jsonl", "--engine", "transformers", "--task", "classify",
              "--labels", "positive,negative", "--long-documents", "map-reduce", settings=settings, cwd=tmp_path)
    lines = {line["custom_id"]: line for line in map(json.loads, (tmp_path / "out.jsonl").read_text().splitlines())}
    assert list(lines) == ["review", "short"] and lines["short"]["label"]  # one line per input line
    with get_sessionmaker(sqlite_url)() as session:
        document = session.scalars(select(Item).where(Item.custom_id == "review")).one()
        parts = session.scalars(select(Item).where(Item.parent_id == document.id).order_by(Item.window)).all()
        found = {row.item_id: row.probabilities for row in session.scalars(select(ClassificationRow))}
    assert len(parts) >= 3 and all(w.status == "succeeded" and w.attempts == 1 for w in parts)
    assert (document.status, document.round) == ("succeeded", 1)
    windows_p = [found[w.id] for w in parts]
    assert windows_p[0]["positive"] > windows_p[-1]["positive"]  # praise first, complaints last
    answer = lines["review"]
    for label in ("positive", "negative"):
        assert answer["probabilities"][label] == pytest.approx(sum(p[label] for p in windows_p) / len(windows_p))
    assert answer["label"] == max(answer["probabilities"], key=answer["probabilities"].get)
    assert found[document.id] == answer["probabilities"]


def test_combining_classified_windows() -> None:
    """Single-label: probabilities averaged; multi-label: each label's highest, applied from the threshold."""
    def part(positive: float, negative: float) -> Classification:
        return Classification(label="positive", probabilities={"positive": positive, "negative": negative},
                              raw_probabilities={"positive": positive, "negative": negative}, method="score",
                              calibrated=True)

    parts = [part(0.9, 0.1), part(0.2, 0.8), part(0.1, 0.9)]
    single = combine(parts, ClassifyRequest(text="x", labels=["positive", "negative"]))
    assert single.probabilities == pytest.approx({"positive": 0.4, "negative": 0.6}) and single.label == "negative"
    assert single.labels is None and single.text() == "negative"
    multi = combine(parts, ClassifyRequest(text="x", labels=["positive", "negative"], multi_label=True, threshold=0.85))
    assert multi.probabilities == {"positive": 0.9, "negative": 0.9} and multi.labels == ["positive", "negative"]
    assert multi.raw_probabilities == multi.probabilities and multi.text() == "positive,negative"


def test_merging_extracted_answers() -> None:
    answers = ['{"invoice": 4471, "customer": null, "items": ["a"]}', '{"invoice": null, "customer": null, "items": []}',
               '{"invoice": 9, "customer": "Ada", "items": ["b", "c"]}']
    assert json.loads(windows.merge(answers, "first")) == {"invoice": 4471, "customer": "Ada", "items": ["a"]}
    assert json.loads(windows.merge(answers, "concat")) == {"invoice": 4471, "customer": "Ada", "items": ["a", "b", "c"]}


# --- map-reduce's delivery, on the no-inference WindowingEngine in real worker processes --------------

WINDOWING = "tests.fault_engine:WindowingEngine"  # 60 words of context, windows of 20 words


def map_reduce_batch(settings: Any, tmp_path: Path) -> api.BatchHandle:
    """Two long documents, a fact at each end: one of 10 windows, one of 25 (whose 25 answers are too long
    for one reduce: a second round of windows combines them first)."""
    lines = [{"id": "ten", "text": "ALPHA " + "word " * 198 + "OMEGA"},
             {"id": "many", "text": "FIRST " + "word " * 498 + "LAST"}]
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return api.submit(tmp_path / "docs.jsonl", settings=settings, sampling=SamplingParams(max_tokens=8),
                      long={"long_documents": "map-reduce", "window_overlap": 0})


def windows_of(settings: Any, batch_id: str, status: str | None = None) -> dict[int, tuple[str, int]]:
    """The batch's windows (items under a document): id -> (status, attempts)."""
    query = select(Item.id, Item.status, Item.attempts).where(Item.batch_id == batch_id, Item.parent_id.is_not(None))
    with get_sessionmaker(settings.database_url)() as session:
        rows = session.execute(query).all()
    return {i: (s, a) for i, s, a in rows if status is None or s == status}


def unfinished(settings: Any, batch_id: str) -> list[Any]:
    """What has not ended: (custom_id, status, round, attempts, last error), for a failure's message."""
    with get_sessionmaker(settings.database_url)() as session:
        return list(session.execute(select(Item.custom_id, Item.status, Item.round, Item.attempts, Item.last_error)
                                    .where(Item.batch_id == batch_id, Item.status.not_in(["succeeded"]))).all())


def assert_documents_consistent(settings: Any, batch_id: str) -> dict[str, dict[str, int]]:
    """Every item, document or window, ended once with at most one result, one for each success; the
    batch's counters count the documents only. Returns the statuses of documents and of windows."""
    from collections import Counter

    from schema.states import TERMINAL_ITEM
    from schema.tables import Batch, Result

    with get_sessionmaker(settings.database_url)() as session:
        items = session.execute(select(Item.id, Item.status, Item.parent_id).where(Item.batch_id == batch_id)).all()
        per_item = Counter(session.scalars(select(Result.item_id).where(Result.batch_id == batch_id)))
        batch = session.get(Batch, batch_id)
    assert batch is not None and all(status in TERMINAL_ITEM for _, status, _ in items)
    assert max(per_item.values()) == 1 and set(per_item) == {i for i, s, _ in items if s == "succeeded"}
    documents = Counter(s for _, s, parent in items if parent is None)
    assert batch.total == sum(documents.values())
    assert (batch.succeeded, batch.failed, batch.cancelled) == (
        documents["succeeded"], documents["failed"], documents["cancelled"])
    return {"documents": dict(documents), "windows": dict(Counter(s for _, s, p in items if p is not None))}


def test_map_reduce_survives_a_killed_worker(pg_url: str, redis_url: str, settings_for, workers_on,  # type: ignore[no-untyped-def]  # noqa: F811
                                             tmp_path: Path) -> None:
    """SIGKILL the worker after some windows finished and while others run: another worker runs those
    again; every window and every document ends with exactly one result, and both ends' facts reach
    the answers, through two rounds for the document of 25 windows."""
    from tests.test_faults import HOLDING_RECOVERY, close_gate, open_gate, wait_until

    settings = settings_for(pg_url, redis_url, **HOLDING_RECOVERY)
    workers = workers_on(settings)
    close_gate(settings)
    first = workers.start(WINDOWING)
    handle = map_reduce_batch(settings, tmp_path)
    wait_until(lambda: len(windows_of(settings, handle.id, "running")) == 16, 120, "windows not running", workers)
    open_gate(settings)  # one window a step: they finish one by one
    wait_until(lambda: len(windows_of(settings, handle.id, "succeeded")) >= 3, 60, "no window finished", workers)
    workers.kill(first)
    held = set(windows_of(settings, handle.id, "running"))
    assert held, "the worker held no window when it was killed"
    workers.start(WINDOWING)
    try:  # by the reconciler (leases of 15 s) or, failing that, Redis' redelivery (120 s): either path delivers
        handle.wait(timeout=180)
    except TimeoutError as exc:
        raise AssertionError(f"{unfinished(settings, handle.id)}\n{workers.logs(8000)}") from exc
    statuses = assert_documents_consistent(settings, handle.id)
    assert statuses["documents"] == {"succeeded": 2} and set(statuses["windows"]) == {"succeeded"}
    after = windows_of(settings, handle.id)
    assert all(after[i][1] >= 2 for i in held), after  # the killed worker's windows ran again
    lines = {r.line.custom_id: r.line.response.body.choices[0].message.content for r in handle.output()}  # type: ignore[union-attr]
    assert lines == {"ten": "ALPHA OMEGA", "many": "FIRST LAST"}
    with get_sessionmaker(settings.database_url)() as session:
        rounds = dict(session.execute(select(Item.custom_id, Item.round).where(Item.parent_id.is_(None))).all())
    assert rounds == {"ten": 1, "many": 2}


def test_cancel_map_reduce_midway(pg_url: str, redis_url: str, settings_for, workers_on,  # type: ignore[no-untyped-def]  # noqa: F811
                                  tmp_path: Path) -> None:
    """Cancel while windows run: windows not started are cancelled, those finished keep their results,
    the waiting documents end cancelled, and nothing runs their reduce."""
    from tests.test_faults import HOLDING_RECOVERY, close_gate, open_gate, wait_until

    settings = settings_for(pg_url, redis_url, **HOLDING_RECOVERY)
    workers = workers_on(settings)
    close_gate(settings)
    workers.start(WINDOWING)
    handle = map_reduce_batch(settings, tmp_path)
    wait_until(lambda: len(windows_of(settings, handle.id, "running")) == 16, 120, "windows not running", workers)
    open_gate(settings)
    wait_until(lambda: len(windows_of(settings, handle.id, "succeeded")) >= 3, 60, "no window finished", workers)
    close_gate(settings)
    handle.cancel()
    open_gate(settings)  # the windows still running finish, and keep their results
    wait_until(lambda: not windows_of(settings, handle.id, "running"), 60, "windows still running", workers)
    assert handle.status().status == "cancelled"
    statuses = assert_documents_consistent(settings, handle.id)
    assert statuses["documents"].get("cancelled", 0) >= 1 and statuses["windows"]["succeeded"] >= 3
    assert statuses["windows"]["cancelled"] >= 1


def test_extraction_merges_fields_from_different_windows(pg_url: str, redis_url: str, settings_for,  # type: ignore[no-untyped-def]
                                                         workers_on, tmp_path: Path) -> None:  # noqa: F811
    """Two fields of an extraction schema stand in different windows of a long document: after the merge
    (first non-null value of each field, or lists concatenated) both are in its one answer."""
    from tests.test_faults import HOLDING_RECOVERY

    settings = settings_for(pg_url, redis_url, **HOLDING_RECOVERY)
    workers_on(settings).start(WINDOWING)
    schema = {"type": "object", "properties": {"invoice": {"type": ["string", "null"]},
                                               "customer": {"type": ["string", "null"]}}}
    (tmp_path / "docs.jsonl").write_text(json.dumps(
        {"id": "long", "text": "invoice: INV42 " + "word " * 100 + "customer: ADA"}) + "\n")
    handle = api.submit(tmp_path / "docs.jsonl", settings=settings, task="extract", json_schema=schema,
                        long={"long_documents": "map-reduce", "window_overlap": 0, "merge": "first"})
    assert handle.wait(timeout=120).status == "completed"
    (record,) = list(handle.output())
    assert json.loads(record.line.response.body.choices[0].message.content) == {  # type: ignore[union-attr]
        "invoice": "INV42", "customer": "ADA"}
    assert assert_documents_consistent(settings, handle.id)["windows"] == {"succeeded": 6}
