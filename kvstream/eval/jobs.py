"""Eval runs as jobs an executor runs anywhere, every finished run stored by the process that asked for it.

Locally (`LocalExecutor`) a sweep plans its runs on the model it loaded once and runs them one after
another in this process (`run_plan`), as sweeps always have. Remotely (Ray), a job carries what a
worker needs: the `EvalSpec` and a `ModelSource` (the model and where it runs), and a worker loads
the model once and keeps it for its next job. Remote jobs write nothing: their runs come back and
this process stores them in its one `ResultsStore`, so workers need no shared disk, no run is
written by two processes, and the results folder stays the one place `kvstream report` reads.

A remote sweep starts with one job that works out what its runs are measured on (their key: the
prompts, model files, dtype, device, versions) and, when the stored full-precision baseline does not
match that key, one job that computes the baseline; this process stores it and hands the same rows
to every run. The baseline is thus computed once, before fanning out, never by each worker.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

from kvstream.eval import runner
from kvstream.eval.runner import Baseline, EvalSpec, ProgressCallback
from kvstream.executors import Executor, ExecutorError, Outcome
from kvstream.results import ResultsStore, StoredRun
from kvstream.results.keys import ResultKey
from kvstream.results.store import Check
from kvstream.tune import Measurement


@dataclass(frozen=True)
class ModelSource:
    """Which model a job loads and where it runs: ``device``/``dtype``, or a device map (strategy or JSON)."""

    name: str
    device: str | None = None
    dtype: str | None = None
    device_map: str | None = None

    @classmethod
    def of(cls, name: str, device: str | None, dtype: str | None, device_map: Any) -> ModelSource:
        """A source from parsed options (a device map as a strategy name or a mapping)."""
        text = device_map if device_map is None or isinstance(device_map, str) else json.dumps(device_map)
        return cls(name, device, dtype, text)

    def load(self) -> tuple[Any, Any]:
        from kvstream.engine import load_model
        from kvstream.engine.placement import parse_device_map

        device_map = parse_device_map(self.device_map)
        return load_model(self.name, dtype=self.dtype, device=self.device, device_map=device_map)


_LOADED: dict[ModelSource, tuple[Any, Any]] = {}
"""The model this (worker) process has loaded, kept for the next job that names the same source."""


def worker_bundle(source: ModelSource) -> tuple[Any, Any]:
    """``(model, tokenizer)`` of ``source``, loaded on first use in this process (one model at a time)."""
    if source not in _LOADED:
        _LOADED.clear()
        _LOADED[source] = source.load()
    return _LOADED[source]


def remote_key(spec: EvalSpec, source: ModelSource, progress: Any = None) -> ResultKey:
    """A remote job: the key of ``spec``'s baseline as a worker measures it (samples built, model fingerprinted)."""
    return runner.plan_eval(spec, worker_bundle(source)).key.baseline()


def remote_baseline(spec: EvalSpec, source: ModelSource, progress: Any = None) -> Baseline:
    """A remote job: the full-precision rows ``spec``'s sweep pairs with, computed and returned, not stored."""
    return runner.compute_baseline(runner.plan_eval(spec, worker_bundle(source)))


def remote_run(spec: EvalSpec, source: ModelSource, baseline: Baseline, progress: Any = None) -> StoredRun:
    """A remote job: the run of ``spec`` paired with ``baseline``, computed and returned, not stored."""
    plan = runner.plan_eval(spec, worker_bundle(source))
    return runner.run_plan(plan, baseline=baseline, write=False)


@dataclass
class PlannedRun:
    """A run of the sweep before it runs: whether its stored copy stands, and notes on what will be replaced."""

    spec: EvalSpec
    stored: Check
    notes: list[str]


class EvalRuns:
    """Runs of one model on an executor; every finished run ends in ``store`` (see the module docstring)."""

    def __init__(
        self,
        executor: Executor,
        source: ModelSource,
        store: ResultsStore,
        load: Callable[[], tuple[Any, Any]] | None = None,
    ) -> None:
        self.executor = executor
        self.source = source
        self.store = store
        self.remote = executor.name != "local"
        self._load = load or source.load
        self._bundle: tuple[Any, Any] | None = None
        self._plans: dict[str, runner.EvalPlan] = {}
        self._first: runner.EvalPlan | None = None
        self._key: ResultKey | None = None
        self._baseline: Baseline | None = None

    def bundle(self) -> tuple[Any, Any]:
        """The model in this process (local runs), loaded on first use."""
        if self._bundle is None:
            self._bundle = self._load()
        return self._bundle

    def prepare(self, spec: EvalSpec, progress: ProgressCallback | None = None) -> list[str]:
        """Work out what the runs of ``spec``'s slot are measured on, and their baseline; notes on what is replaced.

        Locally ``spec`` is planned on the model loaded here (its samples serve every later run).
        Remotely one job measures the key on a worker and, when the stored baseline does not match
        it, one more computes the baseline, stored here at once. Either job failing raises
        `ExecutorError` with its error: no run can start without them.
        """
        if not self.remote:
            self._first = runner.plan_eval(spec, self.bundle(), progress=progress)
            self._plans[spec.run_id()] = self._first
            return []
        slot = spec.baseline_slot()
        self._key = self._remote(slot, "measuring the runs' key", remote_key, spec)
        check = self.store.check_baseline(slot, self._key)
        if check.reusable:
            self._baseline = Baseline(slot, *self.store.read_baseline(slot))
            return []
        self._baseline = self._remote(slot, "computing the full-precision baseline", remote_baseline, spec)
        self.store.write_baseline(slot, self._baseline.rows, self._baseline.meta)
        return [f"recomputed baseline {slot}: {check.why()}"] if check.state in ("changed", "damaged") else []

    def check(self, spec: EvalSpec) -> PlannedRun:
        """Whether the stored run of ``spec`` stands against its key (after `prepare`)."""
        if not self.remote:
            plan = self._plans.get(spec.run_id()) or runner.plan_eval(spec, self.bundle(), samples=self._first.samples)
            self._plans[spec.run_id()] = plan
            return PlannedRun(spec, plan.stored, plan.notes())
        stored = self.store.check_run(spec.run_id(), dataclasses.replace(self._key, config=spec.config.config_hash()))
        notes = [f"re-run {spec.run_id()}: {stored.why()}"] if stored.state in ("changed", "damaged") else []
        return PlannedRun(spec, stored, notes)

    def plan(
        self, specs: list[EvalSpec], progress: ProgressCallback | None = None
    ) -> tuple[list[PlannedRun], list[str]]:
        """`prepare` on the first spec and `check` of every spec; the baseline notes apart."""
        notes = self.prepare(specs[0], progress)
        return [self.check(spec) for spec in specs], notes

    def _remote(self, key: str, what: str, fn: Callable[..., Any], *args: Any) -> Any:
        """One job run to its end on the executor; its value, or `ExecutorError` saying ``what`` failed and why."""
        [outcome] = self.executor.run_all([(key, fn, (*args, self.source))])
        if not outcome.ok:
            raise ExecutorError(f"{what} on a worker failed: {outcome.error}")
        return outcome.value

    def job(self, spec: EvalSpec) -> tuple[Callable[..., Any], tuple[Any, ...]]:
        """What the executor runs for ``spec`` (after `check`): `run_plan` here, or `remote_run` on a worker."""
        if self.remote:
            return remote_run, (spec, self.source, self._baseline)
        return partial(runner.run_plan, self._plans[spec.run_id()]), ()

    def submit(self, spec: EvalSpec) -> None:
        fn, args = self.job(spec)
        self.executor.submit(spec.run_id(), fn, *args)

    def keep(self, run: StoredRun) -> StoredRun:
        """A finished run as stored: a remote one is written to the store now, a local one already is."""
        if not self.remote:
            return run
        return dataclasses.replace(run, path=self.store.write_run(run.run_id, run.rows, run.summary, run.manifest))

    @property
    def pending(self) -> int:
        return self.executor.pending

    def next_done(self) -> Outcome:
        """The next finished run, stored (a failed one comes back with its error)."""
        outcome = self.executor.next_done()
        return dataclasses.replace(outcome, value=self.keep(outcome.value)) if outcome.ok else outcome


class EvalTrials:
    """Trials of `kvstream.tune.tune` as eval runs on an `EvalRuns` (its `kvstream.tune.Evaluation`).

    A config whose run is stored with the same key is measured from the store on the spot; any
    other becomes a job of the runs' executor, and its finished run is stored, then measured.
    """

    def __init__(
        self,
        runs: EvalRuns,
        spec_for: Callable[[Any], EvalSpec],
        measure: Callable[[Any, str], tuple[float, float]],
        check: Callable[[Any], None] | None = None,
        note: Callable[[str], None] | None = None,
    ) -> None:
        self.runs = runs
        self.spec_for = spec_for
        self._measure = measure
        self._check = check
        self._note = note

    def reuse(self, config: Any) -> Measurement | None:
        if self._check:
            self._check(config)
        planned = self.runs.check(self.spec_for(config))
        run_id = planned.spec.run_id()
        if planned.stored.reusable:
            return Measurement(run_id, *self._measure(self.runs.store.read_run(run_id).rows, run_id), reused=True)
        for line in planned.notes:
            if self._note:
                self._note(line)
        return None

    def job(self, config: Any) -> tuple[Callable[..., Any], tuple[Any, ...]]:
        return self.runs.job(self.spec_for(config))

    def measure(self, config: Any, value: Any) -> Measurement:
        run = self.runs.keep(value)
        return Measurement(run.run_id, *self._measure(run.rows, run.run_id))
