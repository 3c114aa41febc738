"""The prompts of classification: instruction, then text, in one user turn; the answer is the label.

The labels are not listed unless the instruction asks for them with `{labels}`: the label is scored as
the answer either way, and on small models a list of options in the prompt pulls the answer toward
the list's order more than it informs it. The default instruction does list them: without an
instruction they are all the model learns about the task.
"""

from __future__ import annotations

from schema.jobs import ChatMessage
from schema.kinds.classify import ClassifyRequest
from worker.engines.labels import LabelQuery

DEFAULT_INSTRUCTION = "Which of these labels fits the text best: {labels}?"
# Content-free inputs (Zhao et al. 2021): what the model answers to these is its bias, not the text's.
CONTENT_FREE = ("N/A", "", "[MASK]")
YES_NO = ["yes", "no"]


def instruction(request: ClassifyRequest, labels: list[str]) -> str:
    """The request's instruction (or the default) with `{labels}` replaced by the label list."""
    return (request.instruction or DEFAULT_INSTRUCTION).replace("{labels}", ", ".join(labels))


def single_label(request: ClassifyRequest, labels: list[str], text: str | None = None) -> LabelQuery:
    """The query scoring each label as the answer; `text` replaces the request's (content-free input)."""
    body = request.text if text is None else text
    return LabelQuery([ChatMessage(role="user", content=f"{instruction(request, labels)}\n{body}")], labels)


def yes_no(request: ClassifyRequest, labels: list[str], label: str, text: str | None = None) -> LabelQuery:
    """Multi-label: does `label` apply? Scored as the answers yes and no."""
    body = request.text if text is None else text
    question = f'{instruction(request, labels)}\nDoes the label "{label}" apply to this text? Answer yes or no.'
    return LabelQuery([ChatMessage(role="user", content=f"{question}\n{body}")], YES_NO)
