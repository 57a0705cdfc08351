"""`RayExecutor`: every job a Ray task with the CPUs and GPUs it declares, on a local instance or a cluster.

Without an address (and with no Ray already initialised in this process) a local Ray instance is
started and stopped with the executor; with one (``auto``, ``HOST:PORT``, ``ray://HOST:PORT``) the
executor joins a cluster started with ``ray start --head`` / ``ray start --address``. A task is not
retried by Ray: a task that fails, or whose worker dies, comes back as an `Outcome` with the error,
the others keep running, and the caller decides (a sweep reports it; running it again resumes).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

from kvstream.executors.base import Executor, ExecutorError, Outcome, Resources, describe

INSTALL_HINT = "pip install 'kvstream[cluster]'"


def import_ray() -> Any:
    """The ``ray`` module, or an `ExecutorError` saying how to install it."""
    try:
        import ray
    except ImportError:
        raise ExecutorError(f"--executor ray needs Ray, which is not installed: {INSTALL_HINT}") from None
    return ray


class RayExecutor(Executor):
    """Jobs as Ray tasks; outcomes in the order the tasks finish."""

    name = "ray"

    def __init__(self, address: str | None = None, resources: Resources = Resources()) -> None:
        ray = import_ray()
        self._ray = ray
        self._started = False
        if not ray.is_initialized():
            try:
                ray.init(
                    address=address,
                    include_dashboard=False,
                    log_to_driver=False,
                    logging_level=logging.ERROR,
                )
            except (ConnectionError, RuntimeError, ValueError) as error:
                where = f"the Ray cluster at {address}" if address else "a local Ray instance"
                raise ExecutorError(
                    f"--executor ray: could not start or reach {where} ({describe(error)}); "
                    "start a cluster with `ray start --head` and pass --address HOST:PORT, or omit --address"
                ) from None
            self._started = True
        total = ray.cluster_resources()
        gpus = resources.gpus if resources.gpus is not None else (1.0 if total.get("GPU", 0) >= 1 else 0.0)
        self.resources = Resources(cpus=resources.cpus, gpus=gpus)
        self._capacity = self._fits(total)
        self._running: dict[Any, str] = {}
        self._remote: dict[Callable[..., Any], Any] = {}

    def _fits(self, total: dict[str, float]) -> int:
        """How many jobs of this size the cluster holds at once (at least one: Ray queues the rest)."""
        counts = [math.floor(total.get("CPU", 1) / self.resources.cpus)] if self.resources.cpus else []
        if self.resources.gpus:
            counts.append(math.floor(total.get("GPU", 0) / self.resources.gpus))
        return max(1, min(counts, default=1))

    @property
    def capacity(self) -> int:
        return self._capacity

    @property
    def pending(self) -> int:
        return len(self._running)

    def submit(self, key: str, fn: Callable[..., Any], *args: Any) -> None:
        if fn not in self._remote:
            self._remote[fn] = self._ray.remote(
                num_cpus=self.resources.cpus, num_gpus=self.resources.gpus, max_retries=0
            )(fn)
        self._running[self._remote[fn].remote(*args)] = key

    def next_done(self) -> Outcome:
        ray = self._ray
        ready, _ = ray.wait(list(self._running), num_returns=1)
        key = self._running.pop(ready[0])
        try:
            return Outcome(key, value=ray.get(ready[0]))
        except ray.exceptions.RayTaskError as error:
            cause = error.cause if isinstance(error.cause, BaseException) else error
            return Outcome(key, error=describe(cause), exception=cause)
        except ray.exceptions.RayError as error:
            return Outcome(key, error=f"{type(error).__name__}: the task's worker died ({describe(error)[:200]})")

    def close(self) -> None:
        for ref in self._running:
            self._ray.cancel(ref, force=True)
        self._running.clear()
        if self._started:
            self._ray.shutdown()
            self._started = False
