"""Where evaluation jobs run: in this process (``local``, the default) or as Ray tasks (``ray``).

`ExecutorSettings` is what the command line asks for; `ExecutorSettings.open` gives the executor.
Both executors share the `Executor` interface, so sweeps and studies are written once.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kvstream.executors.base import Executor, ExecutorError, Outcome, ProgressFactory, Resources
from kvstream.executors.local import LocalExecutor

EXECUTORS = ("local", "ray")


@dataclass(frozen=True)
class ExecutorSettings:
    """Which executor, the cluster address (Ray) and what each job declares it needs."""

    name: str = "local"
    address: str | None = None
    resources: Resources = field(default_factory=Resources)

    @property
    def remote(self) -> bool:
        """True when jobs run outside this process (their results come back to be stored here)."""
        return self.name != "local"

    def check(self) -> None:
        """Refuse an unknown executor or a missing Ray before any work (an `ExecutorError`)."""
        from kvstream.executors.ray import import_ray

        if self.name not in EXECUTORS:
            raise ExecutorError(f"--executor: {self.name!r} is not one of {', '.join(EXECUTORS)}")
        if self.address and self.name != "ray":
            raise ExecutorError("--address: names a Ray cluster, so it needs --executor ray")
        if self.resources.cpus <= 0 or (self.resources.gpus or 0) < 0:
            raise ExecutorError("--cpus-per-run must be positive and --gpus-per-run at least 0")
        if self.name == "ray":
            import_ray()

    def open(self, progress: ProgressFactory | None = None) -> Executor:
        """The executor, ready to take jobs (``progress`` feeds the local one's bars)."""
        self.check()
        if self.name == "ray":
            from kvstream.executors.ray import RayExecutor

            return RayExecutor(self.address, self.resources)
        return LocalExecutor(progress)


__all__ = ["EXECUTORS", "Executor", "ExecutorError", "ExecutorSettings", "LocalExecutor", "Outcome", "Resources"]
