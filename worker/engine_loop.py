"""Keeps one engine busy across chunks: several chunks in flight, one thread driving the engine.

Task threads hand their chunk to `EngineLoop.submit` and wait on the future while the driver thread
feeds every pending request to the engine and steps it. With vLLM that is continuous batching across
chunk boundaries: a chunk's slow tail decodes next to the next chunk's first tokens instead of
leaving the engine idle. Results go back to the task threads, which write them to SQL while the
engine keeps stepping.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, InvalidStateError
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast

from schema.errors import EngineError
from schema.jobs import GenerationRequest, GenerationResult
from worker import metrics
from worker.engines.base import GENERATE, Engine, Generator

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass
class _Submission:
    requests: list[GenerationRequest]
    future: Future[list[GenerationResult]] = field(default_factory=Future)
    results: dict[int, GenerationResult] = field(default_factory=dict)

    def settle(self, index: int, result: GenerationResult) -> None:
        self.results[index] = result
        if len(self.results) == len(self.requests) and not self.future.done():
            self.future.set_result([self.results[i] for i in range(len(self.requests))])


@dataclass
class _Call:
    """A function to run on the driver thread between two engine steps."""

    fn: Callable[[], Any]
    future: Future[Any] = field(default_factory=Future)

    def run(self) -> None:
        if not self.future.set_running_or_notify_cancel():
            return  # its caller gave up before it ran
        try:
            result = self.fn()
        except Exception as exc:  # noqa: BLE001  # the caller's failure, not the loop's: the engine runs on
            self.fail(exc)
        else:
            try:
                self.future.set_result(result)
            except InvalidStateError:  # the watchdog failed it already: its engine died under it
                pass

    def fail(self, error: BaseException) -> None:
        try:
            self.future.set_exception(error)
        except InvalidStateError:  # settled already (the watchdog, or the call itself): first one wins
            pass


class Turns:
    """Who may use the engine: any number of chunks together, or one chunk alone.

    A failing engine fails everything in it, so an item under suspicion (it was tried before) runs
    alone: then its failure is its own, and the chunks beside it are not blamed for it. A chunk waiting
    to run alone goes before chunks that come after it, so it waits for no more than the ones running.
    """

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._sharing = 0  # chunks in the engine together
        self._alone = False  # a chunk has the engine to itself
        self._waiting_alone = 0

    @contextmanager
    def shared(self) -> Iterator[None]:
        with self._changed:
            self._changed.wait_for(lambda: not self._alone and not self._waiting_alone)
            self._sharing += 1
        try:
            yield
        finally:
            with self._changed:
                self._sharing -= 1
                self._changed.notify_all()

    @contextmanager
    def alone(self) -> Iterator[None]:
        with self._changed:
            self._waiting_alone += 1
            self._changed.wait_for(lambda: not self._alone and not self._sharing)
            self._waiting_alone -= 1
            self._alone = True
        try:
            yield
        finally:
            with self._changed:
                self._alone = False
                self._changed.notify_all()


class EngineLoop:
    """One driver thread per engine; any number of threads may submit chunks to it."""

    def __init__(self, engine: Engine, on_failure: Callable[[], None] | None = None) -> None:
        self.engine, self.on_failure = engine, on_failure
        # An engine that does not generate (a classification head) only runs calls.
        self._generator = cast(Generator, engine) if GENERATE in engine.capabilities else None
        self._inbox: queue.SimpleQueue[_Submission | _Call | None] = queue.SimpleQueue()
        self._owners: dict[str, tuple[_Submission, int]] = {}
        self._closing = False
        self._dead = False
        self._calling: _Call | None = None  # the call the driver is in, for the watchdog
        self.turns = Turns()  # chunks hold a turn while their requests are in the engine
        self._thread = threading.Thread(target=self._drive, name="engine-loop", daemon=True)
        self._thread.start()
        threading.Thread(target=self._watch, name="engine-watchdog", daemon=True).start()
        metrics.ENGINE_SEQUENCES.labels("running").set_function(lambda: len(self._owners))
        metrics.ENGINE_SEQUENCES.labels("waiting").set_function(self._inbox.qsize)

    def submit(self, requests: list[GenerationRequest]) -> Future[list[GenerationResult]]:
        if not self.alive:
            raise EngineError("the engine loop has stopped")
        if self._generator is None:
            raise EngineError(f"the {self.engine.name} engine of {self.engine.model_name} does not generate")
        submission = _Submission(requests)
        if not requests:
            submission.future.set_result([])
        else:
            self._inbox.put(submission)
        return submission.future

    def call(self, fn: Callable[[], T]) -> Future[T]:
        """Run `fn()` on the driver thread, between engine steps, and return its future.

        For work that drives the engine itself (classification): vLLM's LLM is not thread-safe, so
        nothing but this thread may touch it. Generation in flight keeps its place in the engine.
        """
        if not self.alive:
            raise EngineError("the engine loop has stopped")
        call = _Call(fn)
        self._inbox.put(call)
        return call.future

    def cancel(self, future: Future[Any]) -> None:
        """Stop the requests of a submission whose caller gave up on it (time limit, shutdown)."""
        future.cancel()
        self._inbox.put(None)  # wake the driver, after the cancel: it aborts requests whose future is done

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._dead

    def _watch(self, every_s: float = 1.0) -> None:
        """An engine process that dies leaves the driver blocked in step(): notice it from outside."""
        while self._thread.is_alive() and not self._closing:
            time.sleep(every_s)
            if not self._closing and not self.engine.healthy():
                self._dead = True
                log.error("the engine process died")
                for submission, _ in list(self._owners.values()):  # the driver is stuck: no race on results
                    if not submission.future.done():
                        submission.future.set_exception(EngineError("the engine process died"))
                if self._calling is not None:  # a classification call stuck in the dead engine
                    self._calling.fail(EngineError("the engine process died"))
                if self.on_failure:
                    self.on_failure()
                return

    def close(self) -> None:
        self._closing = True
        self._inbox.put(None)
        self._thread.join(timeout=30)

    def _drive(self) -> None:
        try:
            while not self._closing:
                self._take(block=not self._busy())
                if self._busy():
                    self._step()
        except Exception as exc:  # the engine died: every waiting chunk must hear it, not hang
            log.exception("engine loop stopped")
            self._fail_all(EngineError(f"engine failed: {type(exc).__name__}: {exc}"))
            if self.on_failure:
                self.on_failure()

    def _busy(self) -> bool:
        return self._generator is not None and self._generator.has_unfinished()

    def _step(self) -> None:
        assert self._generator is not None
        started = time.perf_counter()
        try:
            finished = self._generator.step()
        except Exception as exc:
            if not isinstance(exc, EngineError) and not self.engine.healthy():
                raise  # the engine died: _drive fails everything and stops
            # This step failed but the engine lives on: fail what was in it (its chunks go back to the
            # queue and are split until a request that breaks the engine fails alone).
            log.warning("engine step failed: %s: %s", type(exc).__name__, exc)
            self._generator.abort(list(self._owners))
            self._fail_owners(exc if isinstance(exc, EngineError) else EngineError(f"{type(exc).__name__}: {exc}"))
            return
        finally:
            metrics.ENGINE_BUSY.inc(time.perf_counter() - started)
        for key, result in finished:
            owner = self._owners.pop(key, None)
            if owner:
                owner[0].settle(owner[1], result)

    def _take(self, block: bool) -> None:
        """Move every waiting submission into the engine; wait for one only when the engine is idle."""
        while True:
            try:
                submission = self._inbox.get(block=block)
            except queue.Empty:
                return
            block = False
            if submission is None:
                self._drop_abandoned()
                continue
            if isinstance(submission, _Call):
                self._calling = submission
                submission.run()
                self._calling = None
                continue
            assert self._generator is not None  # submit() takes no requests otherwise
            for index, request in enumerate(submission.requests):
                added = self._generator.add(request)
                if isinstance(added, str):
                    self._owners[added] = (submission, index)
                else:
                    submission.settle(index, added)

    def _drop_abandoned(self) -> None:
        abandoned = [key for key, (sub, _) in self._owners.items() if sub.future.done()]
        if abandoned and self._generator is not None:
            self._generator.abort(abandoned)
            for key in abandoned:
                self._owners.pop(key)

    def _fail_owners(self, error: Exception) -> None:
        for submission, _ in list(self._owners.values()):
            if not submission.future.done():
                submission.future.set_exception(error)
        self._owners.clear()

    def _fail_all(self, error: Exception) -> None:
        self._fail_owners(error)
        while True:
            try:
                pending = self._inbox.get_nowait()
            except queue.Empty:
                return
            if pending is not None and not pending.future.done():
                pending.future.set_exception(error)
