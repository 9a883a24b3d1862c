"""Progress of a long job (FID features, an evaluation's scoring and sampling, the digit classifier):
count / total, rate and ETA, one line at most every ``MEG_PROGRESS_EVERY_S`` seconds (default 10).
A job that ends before the first interval prints nothing."""

from __future__ import annotations

import math
import os
import sys
import time
from typing import TextIO


def format_duration(seconds: float) -> str:
    """h:mm:ss, or ? when unknown (the training loop's ETA uses it too)."""
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def progress_interval() -> float:
    return float(os.environ.get("MEG_PROGRESS_EVERY_S", "10"))


class Progress:
    """``advance(n)`` after each piece of work; a line when the interval has passed since the last one,
    and a closing one at ``total`` when any line was printed."""

    def __init__(
        self,
        what: str,
        total: int,
        unit: str = "",
        every_s: float | None = None,
        stream: TextIO | None = None,
        clock=time.monotonic,
    ):
        self.what, self.total, self.unit = what, total, f" {unit}" if unit else ""
        self.every_s = progress_interval() if every_s is None else every_s
        self.stream, self.clock = stream, clock
        self.count, self.printed = 0, False
        self.start = self.last = clock()

    def _write(self, line: str) -> None:
        stream = self.stream or sys.stdout  # looked up late: a test's captured stdout
        stream.write(line + "\n")
        stream.flush()
        self.printed = True

    def advance(self, n: int = 1) -> None:
        self.count += n
        now = self.clock()
        elapsed = now - self.start
        if self.count >= self.total:
            if self.printed:
                self._write(f"{self.what}: {self.count}/{self.total}{self.unit} done in {format_duration(elapsed)}")
            return
        if now - self.last < self.every_s:
            return
        self.last = now
        rate = self.count / elapsed if elapsed > 0 else float("nan")
        eta = (self.total - self.count) / rate if rate > 0 else float("nan")
        share = 100.0 * self.count / self.total
        self._write(
            f"{self.what}: {self.count}/{self.total}{self.unit} ({share:.0f}%) | {rate:.4g}{self.unit}/s "
            f"| ETA {format_duration(eta)}"
        )
