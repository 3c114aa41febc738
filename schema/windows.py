"""Long documents by map-reduce, in SQL: a document item too long for the context waits while its windows
(items under it, of one round) run; when the last window of the round ends, the document is queued
again for its reduce (a request built from the windows' answers), or fails when a window failed, or is
answered at once when its kind combines the answers itself (Kind.answer_from_windows: classification
averages the windows' probabilities, extraction may merge fields by rule). A reduce too long for the context splits again into
the next round's windows. The worker decides the split (it has the tokenizer); this module writes it.

Windows are items with every delivery guarantee of items (leases, retries, the reconciler, cancel,
expiry) but not the batch's items: they are not counted in the batch's counters and not exported.
The caller owns the transaction.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import insert, select, update
from sqlalchemy.orm import Session

from schema import store
from schema.errors import ErrorCode
from schema.jobs import ChatMessage, GenerationRequest
from schema.states import TERMINAL_ITEM, ItemStatus
from schema.tables import Item, Result

if TYPE_CHECKING:  # the kinds import this module
    from schema.kinds.base import Kind

DEFAULT_REDUCE = ("The user's message lists answers to one instruction, each given for one consecutive part of a "
                  "long document. Combine them into one answer for the whole document, as the instruction asks.")
SEPARATOR = "\u241f"  # in a window's custom_id, between its document's and its place: `doc␟1.0`


def window_requests(request: GenerationRequest, texts: list[str]) -> list[dict[str, Any]]:
    """The request once per window: its document (last user message, or raw prompt) replaced by the
    window's text. A window is sized to fit, so it does not split again."""
    plain = request.model_copy(update={"windowing": None})
    return [plain.with_document(text).model_dump(mode="json") for text in texts]


def reduce_request(original: GenerationRequest, answers: list[str]) -> GenerationRequest:
    """The request that combines the windows' answers: the reduce prompt with the item's own instruction
    (its system messages) as system message, the numbered answers as the document."""
    assert original.windowing is not None
    instruction = "\n".join(m.content for m in original.messages or [] if m.role == "system")
    system = original.windowing.reduce_prompt or DEFAULT_REDUCE
    if instruction:
        system += f"\n\nThe instruction: {instruction}"
    document = "\n\n".join(f"Part {k}:\n{answer.strip()}" for k, answer in enumerate(answers, 1))
    return GenerationRequest(messages=[ChatMessage(role="system", content=system),
                                       ChatMessage(role="user", content=document)],
                             sampling=original.sampling, windowing=original.windowing)


def answers(session: Session, document_id: int, round_: int) -> list[str]:
    """The answers of a document's windows of one round, in window order."""
    return list(session.scalars(select(Result.output_text).join(Item, Item.id == Result.item_id)
                                .where(Item.parent_id == document_id, Item.round == round_).order_by(Item.window)))


def add(session: Session, batch_id: str, split: list[store.Outcome], now: datetime) -> list[int]:
    """The windows of documents that have just gone waiting (write_outcomes); returns their ids to send.
    A repeat of the same chunk finds its documents in the next round already and adds nothing."""
    ids: list[int] = []
    for outcome in split:
        item, requests = outcome.item, outcome.windows or []
        moved = session.execute(
            update(Item).where(Item.id == item.id, Item.status == ItemStatus.waiting, Item.round == item.round)
            # splitting ran nothing: the claim is no attempt (an interrupted reduce may still retry)
            .values(round=item.round + 1, attempts=Item.attempts - 1, interrupted=False)
            .returning(Item.line, Item.endpoint)).one_or_none()
        if moved is None:
            continue
        line, endpoint = moved
        rows = [{"batch_id": batch_id, "line": line, "custom_id": f"{item.custom_id}{SEPARATOR}{item.round + 1}.{k}",
                 "endpoint": endpoint, "request": request, "body": {}, "status": ItemStatus.queued, "attempts": 0,
                 "interrupted": False, "enqueued_at": now, "parent_id": item.id, "round": item.round + 1, "window": k}
                for k, request in enumerate(requests)]
        ids += session.scalars(insert(Item).returning(Item.id), rows).all()
    return ids


def documents_ready(session: Session, batch_id: str, kind: Kind, document_ids: set[int], now: datetime) -> list[int]:
    """Move on each waiting document whose windows of its round have all ended: failed when one failed,
    answered when its kind combines the windows' answers itself (classification, extraction merged by
    rule), else queued for its reduce; returns the ids to send. The document's row is locked first, so of
    two workers finishing its last two windows at once, the second sees the first's window ended and
    moves it, once."""
    ready: list[int] = []
    for document_id in sorted(document_ids):
        document = session.execute(select(Item).where(Item.id == document_id).with_for_update()
                                   .execution_options(populate_existing=True)).scalar_one()
        if document.status != ItemStatus.waiting:
            continue
        windows = session.execute(select(Item.status, Item.last_error, Item.error_code)
                                  .where(Item.parent_id == document_id, Item.round == document.round)).all()
        if any(status not in TERMINAL_ITEM for status, _, _ in windows):
            continue
        failed = [(error, code) for status, error, code in windows if status != ItemStatus.succeeded]
        if failed:
            _end(session, batch_id, document, now, error=f"{len(failed)} of {len(windows)} windows failed; the first: "
                                                        f"{failed[0][0]}", code=failed[0][1] or ErrorCode.engine_error)
        elif (text := kind.answer_from_windows(session, document, now)) is not None:
            _answer(session, batch_id, document, now, text)
        else:
            document.status, document.enqueued_at = ItemStatus.queued, now
            ready.append(document_id)
    return ready


def merge(texts: list[str], rule: str) -> str:
    """Extraction answers (JSON objects, validated) merged field by field: the first non-null value, or
    (`concat`) lists concatenated and other values the first non-null."""
    merged: dict[str, Any] = {}
    for answer in (json.loads(text) for text in texts):
        for key, value in answer.items():
            if rule == "concat" and isinstance(value, list) and isinstance(merged.get(key), list):
                merged[key] = merged[key] + value
            elif merged.get(key) is None:
                merged[key] = value
    return json.dumps(merged, ensure_ascii=False)


def _end(session: Session, batch_id: str, document: Item, now: datetime, error: str, code: str) -> None:
    document.status, document.last_error, document.error_code, document.finished_at = (
        ItemStatus.failed, error, str(code), now)
    store.count(session, batch_id, failed=1)


def _answer(session: Session, batch_id: str, document: Item, now: datetime, text: str) -> None:
    tokens = session.execute(select(Result.prompt_tokens, Result.completion_tokens).join(Item, Item.id == Result.item_id)
                             .where(Item.parent_id == document.id)).all()
    document.status, document.finished_at = ItemStatus.succeeded, now
    store.insert_ignore(session, Result, [{
        "item_id": document.id, "batch_id": batch_id, "custom_id": document.custom_id, "output_text": text,
        "finish_reason": "stop", "prompt_tokens": sum(p for p, _ in tokens), "completion_tokens": sum(c for _, c in tokens),
        "created_at": now}])
    store.count(session, batch_id, succeeded=1)
