"""The one interface of every executor: submit jobs under a key, collect their outcomes as they finish.

A job is a module-level function and its arguments. `Executor.submit` queues it; `Executor.next_done`
blocks until one job has finished and returns its `Outcome`: the value, or the one-line error it
failed with. `Executor.capacity` says how many jobs run at once, so a caller that decides what to
run next from what finished (an optuna study) keeps that many in flight.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from types import TracebackType
from typing import Any

ProgressFactory = Callable[[str], Callable[[str, int, int], None] | None]
"""``factory(key)``: the ``progress(what, done, total)`` callback a job of that key reports to, or None."""


class ExecutorError(ValueError):
    """An executor that cannot be used as asked: unknown, Ray missing, no cluster at the address."""


@dataclass(frozen=True)
class Resources:
    """What one job declares it needs on the machine that runs it."""

    cpus: float = 1.0
    gpus: float | None = None
    """None: one GPU per job where the cluster has GPUs, else none."""


@dataclass(frozen=True)
class Outcome:
    """A finished job: its value, or the exception it raised and that exception as one line."""

    key: str
    value: Any = None
    error: str | None = None
    exception: BaseException | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


class Executor(ABC):
    """Runs jobs somewhere; subclasses say where (`LocalExecutor`, `RayExecutor`)."""

    name: str = ""

    @property
    @abstractmethod
    def capacity(self) -> int:
        """How many jobs run at once."""

    @property
    @abstractmethod
    def pending(self) -> int:
        """Jobs submitted and not yet collected."""

    @abstractmethod
    def submit(self, key: str, fn: Callable[..., Any], *args: Any) -> None:
        """Queue ``fn(*args, progress=...)`` under ``key`` (unique among the pending jobs)."""

    @abstractmethod
    def next_done(self) -> Outcome:
        """Block until a pending job has finished; its outcome."""

    @abstractmethod
    def close(self) -> None:
        """Stop what is still running and let go of the resources."""

    def run_all(self, jobs: Iterable[tuple[str, Callable[..., Any], tuple[Any, ...]]]) -> Iterator[Outcome]:
        """Submit every ``(key, fn, args)`` job, then yield the outcomes in the order they finish."""
        for key, fn, args in jobs:
            self.submit(key, fn, *args)
        while self.pending:
            yield self.next_done()

    def __enter__(self) -> Executor:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def one_line(text: object) -> str:
    return " ".join(str(text).split())


def describe(exc: BaseException) -> str:
    """``message`` of an error, as one line; the exception's type when it has no message."""
    return one_line(exc) or type(exc).__name__
