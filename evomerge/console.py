"""Where evomerge talks to the user: progress lines on stderr, tables, warnings.

Tables go through `full_width_console()`: on a terminal rich fits them to its width; in a
pipe, a log file or CI it would cut them to 80 columns ("benc…"), so there they
are printed at their full width instead (unless COLUMNS says otherwise).
Suspicious input that is not an error (NaN weights, duplicate item ids) is a
`EvomergeWarning`, shown by the CLI as one `evomerge: warning: ...` line.
"""

from __future__ import annotations

import os
import sys
import time
import warnings
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from evomerge.errors import EvomergeWarning

#: Width given to rich when stdout/stderr is not a terminal: wide enough for any table.
UNBOUNDED_WIDTH = 10_000


def say(message: str) -> None:
    """A progress line for the user, on stderr."""
    print(message, file=sys.stderr, flush=True)


def duration(seconds: float) -> str:
    """``42 s``, ``3 min 07 s``, ``1 h 02 min``: how long a phase took, as a user reads it."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def warn(message: str) -> None:
    """Report suspicious input that does not stop the run."""
    warnings.warn(message, EvomergeWarning, stacklevel=2)


@contextmanager
def one_line_warnings():
    """Within: an `EvomergeWarning` prints as `evomerge: warning: ...` (others as Python prints them)."""
    with warnings.catch_warnings():
        default = warnings.showwarning

        def show(message, category, filename, lineno, file=None, line=None):
            if issubclass(category, EvomergeWarning):
                print(f"evomerge: warning: {message}", file=sys.stderr, flush=True)
            else:
                default(message, category, filename, lineno, file, line)

        warnings.showwarning = show
        yield


def full_width_console(stderr: bool = False):
    """A rich Console that prints tables whole when its stream is not a terminal."""
    out = Console(stderr=stderr)
    if not out.is_terminal and "COLUMNS" not in os.environ:
        out = Console(stderr=stderr, width=UNBOUNDED_WIDTH)
    return out


class ProgressBar:
    """A rich progress bar (elapsed, ETA, a status text); a no-op when disabled.

    Where the output is not a terminal (a log file, CI) rich draws nothing until the end, so the
    bar prints a plain line instead at every tenth of the way and at least every `LOG_EVERY_S`,
    with the time left estimated from the pace so far."""

    LOG_EVERY_S = 60.0

    def __init__(self, label: str, total: int, completed: int = 0, enabled: bool = True):
        self._progress = None
        self.label, self.total, self._first = label, total, completed
        self._started = self._logged = time.monotonic()
        self._logged_step = completed * 10 // max(total, 1)
        self._plain = False  # outside a terminal: plain lines only (rich would print the finished bar too)
        if enabled:
            progress = Progress(
                TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                TextColumn("eta"), TimeRemainingColumn(), TextColumn("{task.fields[status]}"),
            )
            if progress.console.is_terminal:
                self._progress = progress
                self._task = progress.add_task(label, total=total, completed=completed, status="")
            else:
                self._plain = True

    def update(self, completed: int, status: str = "") -> None:
        if self._progress is not None:
            self._progress.update(self._task, completed=completed, status=status)
        elif self._plain:
            self._log_line(completed, status)

    def _log_line(self, completed: int, status: str) -> None:
        now, step = time.monotonic(), completed * 10 // max(self.total, 1)
        if step == self._logged_step and now - self._logged < self.LOG_EVERY_S:
            return
        self._logged, self._logged_step = now, step
        elapsed, done = now - self._started, completed - self._first
        left = f", about {duration(elapsed / done * (self.total - completed))} left" if 0 < done < self.total else ""
        say(f"{self.label}: {completed}/{self.total}, {duration(elapsed)} elapsed{left}" + (f", {status}" if status else ""))

    def __enter__(self) -> "ProgressBar":
        if self._progress is not None:
            self._progress.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._progress is not None:
            self._progress.stop()


def progress_bar(label: str, total: int, completed: int = 0, enabled: bool = True) -> ProgressBar:
    """A progress bar to use as a context manager: ``with progress_bar("search", 80) as bar: bar.update(3, "best 0.4")``."""
    return ProgressBar(label, total, completed, enabled)
