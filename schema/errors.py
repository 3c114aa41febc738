"""One error tree for the whole project; every error gristmill raises on purpose is a GristmillError."""

from __future__ import annotations

from enum import StrEnum


class GristmillError(Exception):
    """Base class of every error gristmill raises on purpose."""


class ConfigError(GristmillError):
    """A setting is missing or malformed."""


class InputError(GristmillError):
    """An input file is invalid; names the file, line and field at fault."""

    def __init__(self, path: str, line: int | None, field: str | None, message: str) -> None:
        self.path, self.line, self.field, self.message = path, line, field, message
        where = path if line is None else f"{path}:{line}"
        what = f"field '{field}': " if field else ""
        super().__init__(f"{where}: {what}{message}")


class ModelError(GristmillError):
    """A model cannot be found, prepared or loaded."""


class EngineError(GristmillError):
    """The inference engine failed as a whole (not one item)."""


class BatchNotFound(GristmillError):
    """No batch has the given id."""


class BatchStateError(GristmillError):
    """The batch is not in a state that allows the requested action."""


class NotServed(GristmillError):
    """The live workers of the batch's model cannot run its task kind."""


class BrokerError(GristmillError):
    """The broker could not be reached to enqueue or consume work."""


class ErrorCode(StrEnum):
    """Why one item failed: stored with it (`items.error_code`) and exported as the OpenAI error line's code."""

    invalid_request = "invalid_request"  # the request cannot run as given (no chat template, no labels, ...)
    context_length_exceeded = "context_length_exceeded"
    model_not_found = "model_not_found"  # the line names a model this deployment does not serve
    unsupported = "unsupported"  # valid, but not something batch jobs or this model do (stream, n > 1, ...)
    engine_error = "engine_error"  # the engine failed on it, or kept failing until attempts ran out
    timeout = "timeout"  # its chunk ran past the chunk time limit until attempts ran out
    invalid_json = "invalid_json"  # structured output that does not parse
    schema_mismatch = "schema_mismatch"  # structured output that parses but does not match its schema
    batch_cancelled = "batch_cancelled"
    batch_expired = "batch_expired"


class ChunkTimeout(EngineError):
    """A chunk ran past its time limit; its items go back to the queue."""
