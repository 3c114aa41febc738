"""Embeddings, the contract: OpenAI batch lines with url /v1/embeddings (`input` a string or a list of
strings, `encoding_format` float or base64, `dimensions`) or simple lines {custom_id|id, text}; out,
OpenAI batch output lines whose body is an embeddings response. Vectors are stored as float32 bytes
(schema.tables.Embedding). The worker half is worker/kinds/embed.py.
"""

from __future__ import annotations

import base64
import json
from array import array
from collections.abc import Iterator
from typing import Annotated, Any, BinaryIO, Literal

from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import Row, select
from sqlalchemy.orm import Session

from schema.db import epoch
from schema.errors import ErrorCode, InputError
from schema.kinds.base import Kind, Limits, error_code
from schema.lines import CustomId, OpenAILine, SimpleLine
from schema.outputs import ErrorRecord
from schema.reading import ParsedItem, read_items, validate_as
from schema.states import ItemStatus
from schema.tables import Batch, Embedding, Item, Result

EMBEDDINGS_URL = "/v1/embeddings"
EncodingFormat = Literal["float", "base64"]
Text = Annotated[str, Field(min_length=1)]


class EmbedSpec(BaseModel):
    """An embedding batch's parameters; an OpenAI line's body overrides them."""

    model_config = ConfigDict(extra="forbid")
    encoding_format: EncodingFormat = Field(default="float", description="vectors as float lists or base64 "
                                                                         "float32 bytes (float)")
    dimensions: Annotated[int, Field(ge=1)] | None = Field(default=None, description="shorter vectors, where the "
                                                                                     "model allows it")


class EmbedRequest(EmbedSpec):
    """One item: its texts (one vector each) and how to return them."""

    task: Literal["embed"] = "embed"
    input: list[str]


class EmbeddingBody(BaseModel):
    """The body of an OpenAI /v1/embeddings line; unknown keys (user, ...) are ignored."""

    model_config = ConfigDict(strict=True, extra="ignore")
    model: str | None = None
    input: Text | Annotated[list[Text], Field(min_length=1, max_length=2048)]
    encoding_format: EncodingFormat | None = None
    dimensions: Annotated[int, Field(ge=1)] | None = None


# --- output ---------------------------------------------------------------------------------------


class _Out(BaseModel):
    model_config = ConfigDict(extra="forbid")


class EmbeddingData(_Out):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str  # base64 of float32 little-endian bytes


class EmbeddingUsage(_Out):
    prompt_tokens: int
    total_tokens: int


class EmbeddingResponseBody(_Out):
    id: str
    object: Literal["list"] = "list"
    created: int
    model: str
    data: list[EmbeddingData]
    usage: EmbeddingUsage


class EmbeddingEnvelope(_Out):
    status_code: int = 200
    request_id: str
    body: EmbeddingResponseBody


class EmbedOutputLine(_Out):
    id: str
    custom_id: str
    response: EmbeddingEnvelope | None = None
    error: ErrorRecord | None = None


def pack(vectors: list[list[float]]) -> bytes:
    """Vectors as float32 bytes, back to back (little-endian on every platform gristmill runs on)."""
    return b"".join(array("f", vector).tobytes() for vector in vectors)


def unpack(data: bytes, dimensions: int) -> list[array[float]]:
    flat = array("f")
    flat.frombytes(data)
    return [flat[i : i + dimensions] for i in range(0, len(flat), dimensions)]


class Embed(Kind):
    name = "embed"
    spec_model = EmbedSpec
    summary = "a vector per text (OpenAI /v1/embeddings lines, or simple {custom_id|id, text})"
    answer_tables = (Result, Embedding)

    def parse(self, stream: BinaryIO, name: str, spec: EmbedSpec, limits: Limits) -> Iterator[ParsedItem]:
        openai: list[bool] = []  # the first line's format is the file's

        def make_item(obj: dict[str, Any], lineno: int) -> ParsedItem:
            if not openai:
                openai.append("body" in obj or "url" in obj)
            return _openai_item(obj, lineno, name, spec, limits) if openai[0] else _simple_item(obj, lineno, name,
                                                                                                 spec)

        return read_items(stream, name, limits.max_line_bytes, limits.max_items, make_item)

    def rows(self, session: Session, batch: Batch) -> Iterator[Row[Any]]:
        stmt = (
            select(Item.id, Item.custom_id, Item.status, Item.last_error, Item.error_code, Item.model, Item.request,
                   Embedding.count, Embedding.dimensions, Embedding.vectors, Embedding.created_at,
                   Result.prompt_tokens)
            .outerjoin(Embedding, Embedding.item_id == Item.id)
            .outerjoin(Result, Result.item_id == Item.id)
            .where(Item.batch_id == batch.id)
            .order_by(Item.line)
            .execution_options(yield_per=500)
        )
        yield from session.execute(stmt)  # type: ignore[misc]  # a typed Row is a Row

    def line(self, row: Row[Any], batch: Batch) -> EmbedOutputLine | None:
        line_id = f"batch_req_{row.id}"
        if row.status == ItemStatus.succeeded and row.vectors is not None:
            base64_wanted = row.request.get("encoding_format") == "base64"
            data = [EmbeddingData(index=i, embedding=base64.b64encode(v.tobytes()).decode() if base64_wanted
                                  else v.tolist()) for i, v in enumerate(unpack(row.vectors, row.dimensions))]
            tokens = row.prompt_tokens or 0
            body = EmbeddingResponseBody(id=f"embd-req_{row.id}", created=epoch(row.created_at) or 0,
                                         model=row.model or batch.model, data=data,
                                         usage=EmbeddingUsage(prompt_tokens=tokens, total_tokens=tokens))
            return EmbedOutputLine(id=line_id, custom_id=row.custom_id,
                                   response=EmbeddingEnvelope(request_id=f"req_{row.id}", body=body))
        if row.status in (ItemStatus.failed, ItemStatus.cancelled, ItemStatus.expired):
            error = ErrorRecord(code=error_code(row), message=row.last_error or str(row.status))
            return EmbedOutputLine(id=line_id, custom_id=row.custom_id, error=error)
        return None

    def csv_columns(self, session: Session, batch: Batch) -> list[str]:
        return ["custom_id", "status", "dimensions", "embedding", "error_code", "error"]

    def csv_row(self, row: Row[Any], line: BaseModel) -> dict[str, Any]:
        if row.status != ItemStatus.succeeded:
            return {"custom_id": row.custom_id, "status": row.status, "error_code": error_code(row),
                    "error": row.last_error}
        vectors = [v.tolist() for v in unpack(row.vectors, row.dimensions)]
        return {"custom_id": row.custom_id, "status": row.status, "dimensions": row.dimensions,
                "embedding": json.dumps(vectors[0] if len(vectors) == 1 else vectors)}


def _openai_item(obj: dict[str, Any], lineno: int, name: str, spec: EmbedSpec, limits: Limits) -> ParsedItem:
    line = validate_as(OpenAILine, obj, name, lineno, "")
    if line.url != EMBEDDINGS_URL:
        raise InputError(name, lineno, "url", f"url {line.url!r} in an embedding batch; it takes {EMBEDDINGS_URL} "
                                              f"(send chat and completion lines with --task generate)")
    body = validate_as(EmbeddingBody, line.body, name, lineno, "body")
    texts = [body.input] if isinstance(body.input, str) else body.input
    request = EmbedRequest(input=texts, encoding_format=body.encoding_format or spec.encoding_format,
                           dimensions=body.dimensions or spec.dimensions)
    if body.model is not None and body.model != limits.model:
        return ParsedItem(lineno, line.custom_id, EMBEDDINGS_URL, request, line.body,
                          f"model {body.model!r} is not served by this deployment (it serves {limits.model!r})",
                          ErrorCode.model_not_found)
    return ParsedItem(lineno, line.custom_id, EMBEDDINGS_URL, request, line.body)


def _simple_item(obj: dict[str, Any], lineno: int, name: str, spec: EmbedSpec) -> ParsedItem:
    if "body" in obj or "url" in obj:
        raise InputError(name, lineno, None, "an OpenAI batch line in a file of simple lines; use one format")
    line = validate_as(SimpleLine, obj, name, lineno, "")
    custom_id: CustomId | None = line.custom_id or line.id
    if custom_id is None:
        raise InputError(name, lineno, "custom_id", "required field is missing (give 'custom_id' or 'id')")
    request = EmbedRequest(input=[line.text], **spec.model_dump())
    return ParsedItem(lineno, custom_id, EMBEDDINGS_URL, request, obj)


KIND = Embed()
