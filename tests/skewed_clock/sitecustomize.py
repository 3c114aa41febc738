"""Loaded (through PYTHONPATH) by a worker whose clock libfaketime sets off (tests/hosts.py).

The skew is libfaketime's: every wall-clock read in the process, C libraries included, is off. But
libfaketime 0.9.10 fails `clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME)` with EINVAL when the
monotonic clock is left real, and that is how Python's `time.sleep` sleeps; so sleep on a condition
variable instead, which it leaves alone.
"""

import threading
import time

_never = threading.Event()


def _sleep(seconds: float) -> None:
    if seconds < 0:
        raise ValueError("sleep length must be non-negative")
    _never.wait(seconds)


time.sleep = _sleep
