"""Structured extraction, the execution: generation under the batch's response_format (the engines
constrain decoding to the schema), each answer parsed and validated (worker.kinds.generate)."""

from __future__ import annotations

from worker.kinds.generate import Generate


class Extract(Generate):
    kind = "extract"


RUNNER = Extract()
