"""The prompts of classification: instruction, then text, in one user turn; the answer is the label.

The labels are not listed unless the instruction asks for them with `{labels}`: the label is scored as
the answer either way, and on small models a list of options in the prompt pulls the answer toward
the list's order more than it informs it. The default instruction does list them: without an
instruction they are all the model learns about the task.

Few-shot examples (`--examples`) come first, as earlier turns asked and answered as the text will be:
every item's prompt then starts with the same turns, which the engine's prefix cache computes once.
"""

from __future__ import annotations

from collections.abc import Callable

from schema.jobs import ChatMessage
from schema.kinds.classify import ClassifyRequest, Example
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
    def ask(body: str) -> str:
        return f"{instruction(request, labels)}\n{body}"

    body = request.text if text is None else text
    shots = _shots(request, ask, lambda example: example.answers()[0])
    return LabelQuery([*shots, ChatMessage(role="user", content=ask(body))], labels)


def yes_no(request: ClassifyRequest, labels: list[str], label: str, text: str | None = None) -> LabelQuery:
    """Multi-label: does `label` apply? Scored as the answers yes and no."""
    def ask(body: str) -> str:
        return f'{instruction(request, labels)}\nDoes the label "{label}" apply to this text? Answer yes or no.\n{body}'

    body = request.text if text is None else text
    shots = _shots(request, ask, lambda example: YES_NO[0] if label in example.answers() else YES_NO[1])
    return LabelQuery([*shots, ChatMessage(role="user", content=ask(body))], YES_NO)


def _shots(request: ClassifyRequest, ask: Callable[[str], str], answer: Callable[[Example], str]) -> list[ChatMessage]:
    """The few-shot examples as earlier turns of the chat, asked and answered as the text will be."""
    return [message for example in request.examples or [] for message in (
        ChatMessage(role="user", content=ask(example.text)), ChatMessage(role="assistant", content=answer(example)))]
