"""The progress of a batch on the terminal: one live display (rich) with items done, failed and total,
items/s and output tokens/s over the last minute, and the ETA; above it a phase line while something
comes first ("loading smollm2-135m-instruct (vllm) ... 31 s", "waiting for a worker ..."). When
stderr is not a terminal (CI, cron, a log file), plain lines every few seconds instead. `quiet`: nothing.
"""

from __future__ import annotations

import sys
import time
from typing import IO, Self

from rich.console import Console, Group
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from producer.service import Rates
from schema.batch_object import BatchObject


def eta_s(info: BatchObject, rate: float | None = None) -> float | None:
    """Seconds until every item is done at `rate` items/s (by default the batch's rate since it started);
    None when done, or before anything finished."""
    counts = info.request_counts
    done = counts.completed + counts.failed
    if info.done or not done or counts.total <= done:
        return None
    if rate is None and info.in_progress_at:
        elapsed = time.time() - info.in_progress_at
        rate = done / elapsed if elapsed > 0 else None
    return (counts.total - done) / rate if rate else None


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def render(info: BatchObject, rates: Rates | None = None) -> str:
    """One plain line: `120/1000 done (3 failed), in_progress, 12.5 items/s, 9800 prompt + 840 output
    tokens/s, ETA 1m10s` (the rates over the last minute)."""
    counts = info.request_counts
    line = f"{counts.completed + counts.failed}/{counts.total} done ({counts.failed} failed), {info.status}"
    if rates is not None and rates.items_per_s is not None:
        line += (f", {rates.items_per_s:.1f} items/s, {rates.prompt_tokens_per_s or 0:.0f} prompt + "
                 f"{rates.output_tokens_per_s or 0:.0f} output tokens/s")
    if not info.done:
        line += f", ETA {duration(eta_s(info, rates.items_per_s if rates else None))}"
    return line


class Progress:
    """Shows a batch's progress until closed; `update` with each new status, `phase` for what comes first."""

    def __init__(self, stream: IO[str] | None = None, quiet: bool = False, every_s: float = 5.0) -> None:
        self.stream = stream or sys.stderr
        self.quiet, self.every_s = quiet, every_s
        self.live_display = not quiet and self.stream.isatty()
        self.info: BatchObject | None = None
        self.rates: Rates | None = None
        self.phase_text: str | None = None
        self.phase_started = 0.0
        self.last_line, self.last_at = "", 0.0
        self._live: Live | None = None
        if self.live_display:
            console = Console(file=self.stream, force_terminal=True)
            self._live = Live(console=console, get_renderable=self._renderable, refresh_per_second=4,
                              transient=False, redirect_stdout=False, redirect_stderr=False)
            self._live.start()

    def phase(self, text: str | None) -> None:
        """Start a phase line (its timer counts from now), or end it (None)."""
        if text == self.phase_text:
            return
        if not self.live_display and not self.quiet:
            if text is not None:
                self._say(f"{text} ...")
            elif self.phase_text is not None:
                self._say(f"{self.phase_text}: done in {time.monotonic() - self.phase_started:.1f} s")
        self.phase_text, self.phase_started = text, time.monotonic()

    def update(self, info: BatchObject, rates: Rates | None = None) -> None:
        self.info, self.rates = info, rates
        if self.live_display or self.quiet:
            return
        line = render(info, rates)  # a log: a line every few seconds, and the last one
        if line != self.last_line and (info.done or time.monotonic() - self.last_at >= self.every_s):
            self._say(line)
            self.last_line = line

    def close(self) -> None:
        if self._live is not None:
            self._live.refresh()
            self._live.stop()
            self._live = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def _say(self, line: str) -> None:
        self.last_at = time.monotonic()
        self.stream.write(line + "\n")
        self.stream.flush()

    def _renderable(self) -> Group:
        parts: list[Text | Table] = []
        if self.phase_text is not None:
            parts.append(Text(f"{self.phase_text} ... {time.monotonic() - self.phase_started:.0f} s", style="cyan"))
        if self.info is not None:
            counts = self.info.request_counts
            row = Table.grid(padding=(0, 1))
            row.add_row(ProgressBar(total=max(counts.total, 1), completed=counts.completed + counts.failed, width=30),
                        Text(render(self.info, self.rates)))
            parts.append(row)
        return Group(*parts)
