"""`LocalExecutor`: every job in this process, one after another, exactly as a sweep has always run."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any

from kvstream.executors.base import Executor, Outcome, ProgressFactory


class LocalExecutor(Executor):
    """Runs a job when its outcome is collected, in this process, sharing whatever the process has loaded.

    A job's exception is not caught: a local sweep stops at the first failure, with the error the
    command line reports as usual (and Ctrl-C interrupts it where it is).
    """

    name = "local"

    def __init__(self, progress: ProgressFactory | None = None) -> None:
        self._queue: deque[tuple[str, Callable[..., Any], tuple[Any, ...]]] = deque()
        self._progress = progress

    @property
    def capacity(self) -> int:
        return 1

    @property
    def pending(self) -> int:
        return len(self._queue)

    def submit(self, key: str, fn: Callable[..., Any], *args: Any) -> None:
        self._queue.append((key, fn, args))

    def next_done(self) -> Outcome:
        key, fn, args = self._queue.popleft()
        progress = self._progress(key) if self._progress else None
        return Outcome(key, value=fn(*args, progress=progress))

    def close(self) -> None:
        self._queue.clear()
