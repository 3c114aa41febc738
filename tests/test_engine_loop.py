"""worker.engine_loop.Turns: chunks share the engine, and a suspect has it to itself."""

from __future__ import annotations

import threading
import time

from worker.engine_loop import Turns


def test_a_chunk_alone_waits_for_those_sharing_and_goes_before_those_after_it() -> None:
    turns, order = Turns(), []
    first_in, first_may_leave = threading.Event(), threading.Event()

    def sharing(name: str, hold: threading.Event | None = None) -> None:
        with turns.shared():
            order.append(f"{name} in")
            if hold is not None:
                first_in.set()
                hold.wait(5)
            order.append(f"{name} out")

    def alone() -> None:
        with turns.alone():
            order.append("alone in")
            time.sleep(0.05)
            order.append("alone out")

    threads = [threading.Thread(target=sharing, args=("first", first_may_leave))]
    threads[0].start()
    assert first_in.wait(5)
    threads.append(threading.Thread(target=alone))
    threads[1].start()
    time.sleep(0.1)  # the suspect now waits for the first chunk to leave
    threads.append(threading.Thread(target=sharing, args=("later",)))
    threads[2].start()
    time.sleep(0.1)  # and the later chunk waits for the suspect, though the engine is shared now
    assert order == ["first in"]
    first_may_leave.set()
    for thread in threads:
        thread.join(5)
    assert order == ["first in", "first out", "alone in", "alone out", "later in", "later out"]


def test_chunks_share_the_engine() -> None:
    turns, inside, both_in = Turns(), [], threading.Barrier(2, timeout=5)

    def sharing() -> None:
        with turns.shared():
            inside.append(1)
            both_in.wait()  # breaks (and fails the test) unless both are in at once

    threads = [threading.Thread(target=sharing) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(5)
    assert len(inside) == 2 and not both_in.broken
