"""Everything that puts work in and reads it out: the Python API and the CLI over it."""

from producer.api import BatchHandle, list_batches, open_batch, submit

__all__ = ["BatchHandle", "list_batches", "open_batch", "submit"]
