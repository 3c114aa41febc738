"""A one-line progress bar on stderr, redrawn in place when stderr is a terminal."""

from __future__ import annotations

import sys
import time

from schema.batch_object import BatchObject


def render(info: BatchObject, width: int = 30) -> str:
    counts = info.request_counts
    done = counts.completed + counts.failed
    share = done / counts.total if counts.total else 1.0
    bar = "#" * int(share * width) + "-" * (width - int(share * width))
    rate = f"  {done / info.elapsed_s:.1f} items/s" if info.elapsed_s else ""
    return f"[{bar}] {done}/{counts.total} ({counts.failed} failed) {info.status}{rate}"


class ProgressPrinter:
    def __init__(self, stream=sys.stderr, log_every_s: float = 5.0) -> None:  # type: ignore[no-untyped-def]
        self.stream, self.last, self.last_at = stream, "", 0.0
        self.tty, self.log_every_s = stream.isatty(), log_every_s

    def __call__(self, info: BatchObject) -> None:
        line = render(info)
        # A terminal gets every change; a log file a line every few seconds and the last one.
        quiet = not self.tty and not info.done and time.monotonic() - self.last_at < self.log_every_s
        if line == self.last or quiet:
            return
        self.last, self.last_at = line, time.monotonic()
        self.stream.write(("\r" + line) if self.tty else line + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.tty and self.last:
            self.stream.write("\n")
