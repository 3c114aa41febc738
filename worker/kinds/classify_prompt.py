"""The prompts of classification: the text and a question about it, in one user turn of the model's
chat (or as plain text with `template: plain`); the answer is the label.

Without an instruction of its own a single-label batch asks no question: the prompt is plain text, the
text and then an answer cue (`Text: ...` / `Label:`), under several cues whose calibrated probabilities
are averaged (prompt ensembling). On a small model accuracy swings by tens of points with a question's
wording, and bench/zero_shot.py, which chose this format and the cues on the tuning halves of two
tasks, found the cue format ahead of every question format on both. With `template: chat`, and for
multi-label batches (each label's yes/no is a question), a batch without an instruction asks
DEFAULT_INSTRUCTIONS instead, question first; `layout: text-first` puts the text first, so that the
prompts of one text share it as a prefix, which vLLM's prefix cache computes once.

The labels are not listed unless the instruction asks for them with `{labels}`: the label is scored as
the answer either way, and on small models a list of options in the prompt pulls the answer toward
the list's order more than it informs it. The default questions do list them.

Few-shot examples (`--examples`) come first, asked and answered as the text will be: as plain text by
default (schema.kinds.classify: as chat turns they made the default model answer one label), or as
earlier turns with `template: chat`. Every item's prompt then starts with the same examples, which the
engine's prefix cache computes once.
"""

from __future__ import annotations

from collections.abc import Callable

from schema.jobs import ChatMessage
from schema.kinds.classify import ClassifyRequest, Example
from worker.engines.labels import LabelQuery

# Without an instruction, plain text: the text after TEXT_LEAD, then each answer cue, the label after it
# (chosen by bench/zero_shot.py: the lead and the cues of its candidates that did best on its tuning halves).
TEXT_LEAD = "Text:"
DEFAULT_CUES: tuple[str, ...] = ("Class:", "Category:", "Type:", "Label:")
# Generic questions (any labels, any texts), asked together by a batch without an instruction in the chat
# template or with multi-label.
DEFAULT_INSTRUCTIONS = (
    "Which of these labels fits the text best: {labels}?",
    "Classify the text as one of: {labels}.",
    "Which category does this text belong to: {labels}?",
    "Answer with one label for the text: {labels}.",
)
# Content-free inputs (Zhao et al. 2021): what the model answers to these is its bias, not the text's.
CONTENT_FREE = ("N/A", "", "[MASK]")
YES_NO = ["yes", "no"]
PLAIN_ANSWER = "Answer:"  # a plain prompt ends here; the label follows after a space


def asks_no_question(request: ClassifyRequest) -> bool:
    """A single-label request in plain text without an instruction: its wordings are answer cues."""
    return request.instruction is None and request.template == "plain" and not request.multi_label


def wordings(request: ClassifyRequest) -> list[str]:
    """The instructions (or cues) a request is asked under: its own, or the default ensemble."""
    if request.instruction:
        return [request.instruction]
    return list(DEFAULT_CUES if asks_no_question(request) else DEFAULT_INSTRUCTIONS)


def instruction(wording: str, labels: list[str]) -> str:
    """`wording` with `{labels}` replaced by the label list."""
    return wording.replace("{labels}", ", ".join(labels))


def single_label(request: ClassifyRequest, labels: list[str], wording: str, text: str | None = None) -> LabelQuery:
    """The query scoring each label as the answer; `text` replaces the request's (content-free input)."""
    def first_answer(example: Example) -> str:
        return example.answers()[0]

    if asks_no_question(request):  # `wording` is the answer cue
        return _query(request, lambda body: f"{TEXT_LEAD} {body}", labels, first_answer, text, cue=wording)
    question = instruction(wording, labels)
    return _query(request, lambda body: _ask(request, question, body), labels, first_answer, text)


def yes_no(request: ClassifyRequest, labels: list[str], label: str, wording: str,
           text: str | None = None) -> LabelQuery:
    """Multi-label: does `label` apply? Scored as the answers yes and no."""
    question = f'{instruction(wording, labels)}\nDoes the label "{label}" apply to this text? Answer yes or no.'
    return _query(request, lambda body: _ask(request, question, body), YES_NO,
                  lambda example: YES_NO[0] if label in example.answers() else YES_NO[1], text)


def _ask(request: ClassifyRequest, question: str, body: str) -> str:
    return f"{body}\n\n{question}" if request.layout == "text-first" else f"{question}\n{body}"


def _query(request: ClassifyRequest, ask: Callable[[str], str], labels: list[str],
           answer: Callable[[Example], str], text: str | None, cue: str = PLAIN_ANSWER) -> LabelQuery:
    """The few-shot examples asked and answered as the text will be, then the text, as chat turns or
    as one plain-text prompt, whose answers follow `cue`."""
    body = request.text if text is None else text
    shots = [(ask(example.text), answer(example)) for example in request.examples or []]
    if request.template == "plain":
        done = "".join(f"{asked}\n{cue} {answered}\n\n" for asked, answered in shots)
        return LabelQuery([], labels, prompt=f"{done}{ask(body)}\n{cue}", answer_prefix=" ")
    turns = [message for asked, answered in shots for message in (
        ChatMessage(role="user", content=asked), ChatMessage(role="assistant", content=answered))]
    return LabelQuery([*turns, ChatMessage(role="user", content=ask(body))], labels)
