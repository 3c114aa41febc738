"""What a task kind's contract provides. A kind is a plug-in: this half (in schema/kinds/<kind>.py) says
what a batch of it takes and gives back; its other half (worker/kinds/<kind>.py) runs it.

Everything kind-specific the producer needs goes through a `Kind`: the spec a batch runs with (stored
in `batches.params`), parsing an input stream into items, and reading finished items back out as
output lines and CSV rows (and combining a long document's windows' answers). Submission, export, the API and the CLI hold no kind-specific branch.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any, BinaryIO, ClassVar

from pydantic import BaseModel, ValidationError
from sqlalchemy import Row
from sqlalchemy.orm import Session

from schema.errors import ErrorCode, InputError
from schema.kinds.flags import FileFlags
from schema.reading import ParsedItem
from schema.states import ItemStatus
from schema.tables import Batch, Item, Result

# An item that ended without a result, and the code its error line has when SQL holds none (rows
# written before items had error codes).
ERROR_CODES = {ItemStatus.failed: ErrorCode.engine_error, ItemStatus.cancelled: ErrorCode.batch_cancelled,
               ItemStatus.expired: ErrorCode.batch_expired}


def error_code(row: Row[Any]) -> str:
    """The error line's code of an item that ended without a result (`row` has status and error_code)."""
    return str(row.error_code or ERROR_CODES[row.status])


@dataclass(frozen=True)
class Stored:
    """A row a batch brings that is not an item (Kind.prepare): inserted unless its key exists."""

    table: Any
    row: dict[str, Any]
    key: str = "id"


@dataclass(frozen=True)
class Limits:
    """What every input stream is parsed against, whatever its kind."""

    model: str  # the model the batch runs on
    max_line_bytes: int
    max_items: int


class Kind(ABC):
    """A task kind's contract: name, spec, input parsing, output lines, CSV layout."""

    name: str  # "generate", "classify", ...: the batch's `kind` column and `--task` value
    spec_model: type[BaseModel]  # the batch's parameters; the CLI derives its flags from it
    version: int = 1  # bump when the same request would now get another answer (its cached ones are void)
    summary: str  # one line for `--task` help
    file_flags: ClassVar[FileFlags] = {}  # spec fields that may also come from a file: `--labels-file`
    answer_tables: ClassVar[tuple[Any, ...]] = (Result,)  # the rows by item_id that make up an answer (schema.cache)

    def spec(self, **values: Any) -> BaseModel:
        """The batch spec from keyword values (the API's, or the CLI's flags); InputError names the field."""
        try:
            return self.spec_model(**{k: v for k, v in values.items() if v is not None})
        except ValidationError as exc:
            error = exc.errors(include_url=False)[0]
            field = ".".join(str(part) for part in error["loc"]) or self.name
            message = str(error.get("ctx", {}).get("error", error["msg"]))
            raise InputError(field, None, None, message) from None

    @abstractmethod
    def parse(self, stream: BinaryIO, name: str, spec: Any, limits: Limits) -> Iterator[ParsedItem]:
        """Every line of the stream as a ParsedItem, as it is read; InputError (name:line: field) when
        the first bad line is reached (schema.reading.read_items)."""

    @abstractmethod
    def rows(self, session: Session, batch: Batch) -> Iterator[Row[Any]]:
        """The batch's items with their results, in input order (streamed: `yield_per`)."""

    @abstractmethod
    def line(self, row: Row[Any], batch: Batch) -> BaseModel | None:
        """The output line of a finished item (its error line when it failed); None while it runs."""

    @abstractmethod
    def csv_columns(self, session: Session, batch: Batch) -> list[str]:
        """The CSV header of the batch's export."""

    @abstractmethod
    def csv_row(self, row: Row[Any], line: BaseModel) -> dict[str, Any]:
        """One CSV row (keys from csv_columns) of a finished item."""

    def prepare(self, session: Session, spec: Any, model: str, now: datetime) -> tuple[Any, list[Stored]]:
        """The spec the batch's items carry, and rows to store with the batch (in its transaction) that the
        spec refers to: classification turns a training set into a probe. InputError for what cannot be."""
        return spec, []

    def answer_from_windows(self, session: Session, document: Item, now: datetime) -> str | None:
        """The answer of a long document whose windows (schema.windows) have all succeeded, when the kind
        combines their answers itself (storing any rows of its own); None: the document goes back to the
        engine for its reduce."""
        return None
