"""One error tree for the whole project; every error gristmill raises on purpose is a GristmillError."""

from __future__ import annotations


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


class BrokerError(GristmillError):
    """The broker could not be reached to enqueue or consume work."""
