"""Fault injection for tests/test_faults.py, as engines a `gristmill worker --engine module:Class` loads.

PoisonableEngine: the real transformers engine, except that a request that mentions POISON stalls it,
then fails everything in it, as an engine does on an input it cannot handle. HoldingEngine: no inference,
but requests finish only when the test says so (or never), so a test knows a chunk is running.
CountingEngine: no inference, counting the requests that reach it (what the result cache saved).
PacedEngine: no inference, at a steady pace (a few requests per step), so a batch's charts have a shape.
WindowingEngine: HoldingEngine's gate, one request a step, a word for a token: it splits documents into
windows (map-reduce) and answers each request with the capitalised words of its document, a model that
never misses a fact, so a test sees what reached each window and each reduce.
"""

from __future__ import annotations

import json
import time

from bench.null_engine import NullEngine
from schema.errors import EngineError
from schema.jobs import GenerationRequest, GenerationResult
from schema.settings import Settings, get_settings
from worker.engines.transformers_engine import TransformersEngine

MARKER = "POISON"


class CountingEngine(NullEngine):
    def __init__(self, model: str, settings: Settings | None = None) -> None:
        super().__init__(model, settings)
        self.received = 0

    def add(self, request: GenerationRequest) -> str:
        self.received += 1
        return super().add(request)


class PoisonableEngine(TransformersEngine):
    """A request that mentions POISON stalls the engine for STALL_S, then breaks it: whatever came in
    meanwhile fails with it, as beside an input that crashes a real engine mid-generation."""

    STALL_S = 0.5  # long enough that a chunk sent beside the poison's (the other half of a split) is caught

    def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*args, **kwargs)
        self._poisoned: dict[str, float] = {}  # key -> when it came in

    def add(self, request: GenerationRequest) -> str | GenerationResult:
        if not _mentions(request, MARKER):
            return super().add(request)
        key = str(next(self._keys))
        self._poisoned[key] = time.monotonic()
        return key

    def step(self) -> list[tuple[str, GenerationResult]]:
        if self._poisoned:
            if time.monotonic() - min(self._poisoned.values()) < self.STALL_S:
                time.sleep(0.02)
                return []
            raise EngineError("the engine cannot run this batch (injected fault)")
        return super().step()

    def has_unfinished(self) -> bool:
        return bool(self._poisoned) or super().has_unfinished()

    def abort(self, keys: list[str]) -> None:
        super().abort(keys)
        for key in keys:
            self._poisoned.pop(key, None)


class HoldingEngine(NullEngine):
    """The no-inference engine, except that it holds requests back: every request while the file
    `<GRISTMILL_HOME>/closed` exists (a test opens the gate by deleting it), and a request that
    mentions HANG for ever, as a runaway generation would. Aborted requests are dropped."""

    def __init__(self, model: str, settings: Settings | None = None) -> None:
        super().__init__(model, settings)
        self._gate = (settings or get_settings()).home / "closed"
        self._held: dict[str, GenerationRequest] = {}

    def add(self, request: GenerationRequest) -> str:
        key = str(next(self._keys))
        self._held[key] = request
        return key

    def step(self) -> list[tuple[str, GenerationResult]]:
        if self._gate.exists():
            time.sleep(0.05)  # the engine loop steps while requests are unfinished: do not spin
            return []
        done = [key for key, request in self._held.items() if not _mentions(request, HANG)]
        for key in done:
            del self._held[key]
        if self._held:
            time.sleep(0.05)
        return [(key, GenerationResult(text="ok", prompt_tokens=1, completion_tokens=1)) for key in done]

    def has_unfinished(self) -> bool:
        return bool(self._held)

    def abort(self, keys: list[str]) -> None:
        for key in keys:
            self._held.pop(key, None)


class PacedEngine(NullEngine):
    """Finishes PER_STEP requests a step, a step every STEP_S seconds, each with as many output tokens as
    its request has characters (so the tokens/s chart differs from the items/s one)."""

    PER_STEP, STEP_S = 4, 0.03

    def add(self, request: GenerationRequest) -> str:
        key = str(next(self._keys))
        tokens = sum(len(m.content) for m in request.messages or [])
        self._done.append((key, GenerationResult(text="ok", prompt_tokens=tokens, completion_tokens=tokens)))
        return key

    def step(self) -> list[tuple[str, GenerationResult]]:
        time.sleep(self.STEP_S)
        done, self._done = self._done[:self.PER_STEP], self._done[self.PER_STEP:]
        return done


class WindowingEngine(HoldingEngine):
    max_model_len = 60  # words: a document of more is split into windows

    def windows(self, request: GenerationRequest) -> list[str] | None:
        words = (request.document() or "").split()
        windowing = request.windowing
        if windowing is None or len(words) <= self.max_model_len:
            return None
        size = windowing.window_tokens or 20
        overlap = min(windowing.window_overlap, size // 2)
        return [" ".join(words[i:i + size]) for i in range(0, max(len(words) - overlap, 1), size - overlap)]

    def step(self) -> list[tuple[str, GenerationResult]]:
        time.sleep(0.05)
        if self._gate.exists() or not self._held:
            return []
        key = next(iter(self._held))
        request = self._held.pop(key)
        words = (request.document() or "").split()
        fmt = request.sampling.response_format
        if fmt is not None and fmt.json_schema is not None:  # extraction: `field: VALUE` in the text
            found = {w.rstrip(":"): words[i + 1] for i, w in enumerate(words[:-1]) if w.endswith(":")}
            text = json.dumps({name: found.get(name) for name in fmt.json_schema["properties"]})
        else:
            capitals = [w.strip(".,:") for w in words if w.strip(".,:").isupper()]
            text = " ".join(dict.fromkeys(w for w in capitals if len(w) > 2)) or "none"
        return [(key, GenerationResult(text=text, prompt_tokens=1, completion_tokens=1))]


HANG = "HANG"


def _mentions(request: GenerationRequest, marker: str) -> bool:
    return any(marker in m.content for m in request.messages or [])
