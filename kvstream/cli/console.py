"""Where the command line writes: results on stdout, notes and progress on stderr (bars or plain log lines)."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text


def _console(stderr: bool) -> Console:
    console = Console(stderr=stderr, highlight=False)
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console = Console(stderr=stderr, highlight=False, width=160)
    return console


def out() -> Console:
    """Console on stdout (results); built per call so redirected streams are honoured."""
    return _console(stderr=False)


def err() -> Console:
    """Console on stderr (progress, notes, errors)."""
    return _console(stderr=True)


def note(message: str | Text, *, console: Console | None = None) -> None:
    """A one-line status message on stderr (or ``console``)."""
    (console or err()).print(message, soft_wrap=True)


STEP_LABELS = {
    "samples": "building samples",
    "quantized": "quantized cache",
    "full_precision": "full-precision baseline",
    "full_precision (cached)": "full-precision baseline (reused)",
    "prefill": "tokens prefilled",
}
"""Friendlier names for the steps `run_eval` reports."""


PERIODIC_STEPS = {"prefill"}
"""Steps that finish once per sample: in a log their lines come every `ProgressBars.LOG_SECONDS` only."""


class ProgressBars:
    """rich progress bars on stderr, one per label; plain log lines instead when stderr is not a terminal.

    A log gets a line per bar when it completes and, while it runs, at most one every `LOG_SECONDS`
    (the tokens prefilled inside a sample only the latter), so a long sample shows it is moving.
    """

    LOG_SECONDS = 10.0

    def __init__(self, console: Console | None = None) -> None:
        self.console = console or err()
        self.plain = not self.console.is_terminal
        self._logged: dict[str, float] = {}
        self._periodic: set[str] = set()
        self._start = time.monotonic()
        self.progress = Progress(
            SpinnerColumn(),
            TextColumn("[progress.description]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=self.console,
            transient=True,
            disable=not self.console.is_terminal,
        )
        self._tasks: dict[str, TaskID] = {}

    def __enter__(self) -> ProgressBars:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.progress.__exit__(*exc)

    def update(self, label: str, done: float, total: float | None, *, periodic: bool = False) -> None:
        """Set bar ``label`` to ``done`` of ``total`` (created on first use); ``periodic``: log no completions."""
        if label not in self._tasks:
            self._tasks[label] = self.progress.add_task(label, total=total or None)
            self._logged[label] = time.monotonic()
            if periodic:
                self._periodic.add(label)
        self.progress.update(self._tasks[label], completed=done, total=total or None)
        if self.plain:
            self._log(label, done, total)

    def _log(self, label: str, done: float, total: float | None) -> None:
        now = time.monotonic()
        finished = bool(total) and done >= (total or 0) and label not in self._periodic
        if not finished and now - self._logged[label] < self.LOG_SECONDS:
            return
        self._logged[label] = now
        of = f"/{total:.0f}" if total else ""
        self.console.print(f"[{now - self._start:6.0f}s] {label}: {done:.0f}{of}", markup=False, highlight=False)

    def remove(self, label: str) -> None:
        task = self._tasks.pop(label, None)
        if task is not None:
            self.progress.remove_task(task)

    def remove_prefix(self, prefix: str) -> None:
        """Drop every bar whose label starts with ``prefix`` (a finished run's bars)."""
        for label in [name for name in self._tasks if name.startswith(prefix)]:
            self.remove(label)

    def callback(self, prefix: str = "") -> Callable[[str, float, float], None]:
        """A ``(what, done, total)`` callback (run_eval, download) drawing one bar per ``what``."""

        def report(what: str, done: float, total: float) -> None:
            self.update(f"{prefix}{STEP_LABELS.get(what, what)}", done, total, periodic=what in PERIODIC_STEPS)

        return report

    def counter(self, label: str) -> Callable[[int, int], None]:
        """A ``(done, total)`` callback (chunked prefill) drawing bar ``label``."""

        def report(done: int, total: int) -> None:
            self.update(label, done, total, periodic=True)

        return report


@contextmanager
def spinner(message: str) -> Iterator[None]:
    console = err()
    if console.is_terminal:
        with console.status(message):
            yield
    else:
        yield


def human_bytes(n: float | None) -> str:
    if n is None or n != n:
        return "-"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.2f} {unit}"
        value /= 1024
    return f"{value:.2f} GiB"
