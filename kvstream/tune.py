"""Hyper-parameter search over compression settings with optuna (what ``kvstream tune`` runs).

Two goals:

* ``quality``: maximise the task's metric subject to ``bits_per_element <= budget_bits``;
* ``bits``: minimise ``bits_per_element`` subject to the metric reaching ``min_quality`` (and the
  budget, when one is also given).

The metric's direction is respected (perplexity: lower is better, so ``min_quality`` is then a
ceiling). Infeasible trials score below every feasible one, by how far they miss, so the sampler
learns the boundary. How a config is evaluated is the caller's business (`evaluate`, or an
`Evaluation` whose jobs an executor runs, in this process or as Ray tasks): the CLI runs eval runs,
persisting every trial in the results store. The study may be shared by several processes
(`kvstream.studies`), which then reach the requested number of trials together.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from kvstream.config import CompressionConfig, ConfigError

if TYPE_CHECKING:
    from kvstream.executors import Executor
    from kvstream.studies import StudyTarget

INFEASIBLE = -1.0e6
"""Score of a trial that breaks a constraint, minus how far it misses."""

HIGH_BITS = "high_bits"
"""Search parameter setting both ``key_bits_sink_outlier`` and ``value_bits_sink_outlier``."""

SEARCH_SPACE: dict[str, tuple[Any, ...]] = {
    "key_bits_normal": (2, 3, 4),
    "value_bits_normal": (2, 3, 4),
    HIGH_BITS: (4, 8),
    "chunk_size": (128, 256, 512),
    "ema_decay": (0.5, 0.8, 0.9, 0.95, 0.99),
    "attention_sink_size": (0, 1, 4, 16),
    "outlier_threshold_abs": (0.0, 4.0, 8.0, 16.0),
    "outlier_threshold_relative": (0.0, 2.0, 4.0, 8.0),
    "key_rope": ("pre", "post"),
}
"""Categorical choices per parameter: identical configs map to one run id, so repeats cost nothing."""

_HIGH_FIELDS = ("key_bits_sink_outlier", "value_bits_sink_outlier")


def search_space(fixed: set[str] | frozenset[str] = frozenset()) -> dict[str, tuple[Any, ...]]:
    """`SEARCH_SPACE` without the fields the user fixed on the command line."""
    space = {}
    for name, choices in SEARCH_SPACE.items():
        if name == HIGH_BITS and fixed & set(_HIGH_FIELDS):
            continue
        if name in fixed:
            continue
        space[name] = choices
    return space


def apply_params(base: CompressionConfig, params: dict[str, Any]) -> CompressionConfig:
    """``base`` with a trial's parameters applied (``high_bits`` expanded to both high-precision fields)."""
    changes = {k: v for k, v in params.items() if k != HIGH_BITS}
    if HIGH_BITS in params:
        changes.update({name: params[HIGH_BITS] for name in _HIGH_FIELDS})
    return base.replace(**changes)


def params_of(config: CompressionConfig, space: dict[str, tuple[Any, ...]]) -> dict[str, Any] | None:
    """The search parameters that reproduce ``config``, or None if it lies outside ``space``."""
    values = config.to_dict()
    params: dict[str, Any] = {}
    for name, choices in space.items():
        if name == HIGH_BITS:
            if values[_HIGH_FIELDS[0]] != values[_HIGH_FIELDS[1]]:
                return None
            value = values[_HIGH_FIELDS[0]]
        else:
            value = values[name]
        if value not in choices:
            return None
        params[name] = value
    return params


@dataclass(frozen=True)
class Objective:
    """What a trial is scored on: the metric, its direction, and the constraint(s)."""

    metric: str
    higher_is_better: bool
    budget_bits: float | None = None
    min_quality: float | None = None

    def __post_init__(self) -> None:
        if self.budget_bits is None and self.min_quality is None:
            raise ConfigError(
                "tune needs a goal: --budget-bits B (best quality within B bits per element) "
                "or --min-quality Q (fewest bits reaching quality Q)"
            )
        if self.budget_bits is not None and self.budget_bits <= 0:
            raise ConfigError(f"--budget-bits: must be positive, got {self.budget_bits}")

    @property
    def mode(self) -> str:
        return "bits" if self.min_quality is not None else "quality"

    def describe(self) -> str:
        better = "higher" if self.higher_is_better else "lower"
        parts = []
        if self.mode == "quality":
            parts.append(f"maximise {self.metric} ({better} is better)")
        else:
            bound = ">=" if self.higher_is_better else "<="
            parts.append(f"minimise bits per element with {self.metric} {bound} {self.min_quality:g}")
        if self.budget_bits is not None:
            parts.append(f"bits per element <= {self.budget_bits:g}")
        return "; ".join(parts)

    def violation(self, quality: float, bits: float) -> float:
        """How far a result misses the constraints (0 when feasible; inf when unmeasured)."""
        if quality is None or bits is None or math.isnan(quality) or math.isnan(bits):
            return math.inf
        miss = 0.0
        if self.budget_bits is not None:
            miss += max(0.0, bits - self.budget_bits)
        if self.min_quality is not None:
            gap = self.min_quality - quality if self.higher_is_better else quality - self.min_quality
            miss += max(0.0, gap)
        return miss

    def score(self, quality: float, bits: float) -> float:
        """Higher is better: the signed metric (or minus the bits) when feasible, `INFEASIBLE` minus the miss."""
        miss = self.violation(quality, bits)
        if miss > 0:
            return INFEASIBLE - (miss if math.isfinite(miss) else 1.0e6)
        if self.mode == "bits":
            return -bits
        return quality if self.higher_is_better else -quality


@dataclass
class Measurement:
    """What evaluating one config gave: its run id, quality, effective bits, and whether it was reused."""

    run_id: str
    quality: float
    bits: float
    reused: bool = False


@dataclass
class TrialRecord:
    number: int
    params: dict[str, Any]
    config: CompressionConfig
    run_id: str
    quality: float
    bits: float
    feasible: bool
    score: float
    reused: bool


@dataclass
class TuneResult:
    objective: Objective
    trials: list[TrialRecord] = field(default_factory=list)

    @property
    def best(self) -> TrialRecord | None:
        """The feasible trial with the highest score (fewest bits, then earliest, on ties)."""
        feasible = [t for t in self.trials if t.feasible]
        if not feasible:
            return None
        return max(feasible, key=lambda t: (t.score, -t.bits, -t.number))

    @property
    def closest(self) -> TrialRecord | None:
        """The trial nearest to feasibility (when none is feasible)."""
        return max(self.trials, key=lambda t: t.score) if self.trials else None

    def table(self) -> Any:
        """Tidy DataFrame: one row per trial with its parameters, quality, bits and score."""
        import pandas as pd

        rows = []
        for t in self.trials:
            rows.append(
                {
                    "trial": t.number,
                    "run_id": t.run_id,
                    **t.params,
                    "quality": t.quality,
                    "bits_per_element": t.bits,
                    "feasible": t.feasible,
                    "score": t.score,
                    "reused": t.reused,
                }
            )
        return pd.DataFrame(rows)


class Evaluation(Protocol):
    """How trials are evaluated: a stored result reused on the spot, else a job an executor runs, measured here."""

    def reuse(self, config: CompressionConfig) -> Measurement | None: ...

    def job(self, config: CompressionConfig) -> tuple[Callable[..., Any], tuple[Any, ...]]: ...

    def measure(self, config: CompressionConfig, value: Any) -> Measurement: ...


@dataclass
class InProcess:
    """An `Evaluation` from a plain ``evaluate(config) -> Measurement`` function."""

    evaluate: Callable[[CompressionConfig], Measurement]

    def reuse(self, config: CompressionConfig) -> Measurement | None:
        return None

    def job(self, config: CompressionConfig) -> tuple[Callable[..., Any], tuple[Any, ...]]:
        return _call, (self.evaluate, config)

    def measure(self, config: CompressionConfig, value: Any) -> Measurement:
        return value


def _call(evaluate: Callable[[CompressionConfig], Measurement], config: CompressionConfig, progress: Any = None) -> Any:
    return evaluate(config)


MAX_FAILURES_IN_A_ROW = 3
"""A process stops claiming trials after this many failed evaluations in a row (a broken setup, not bad luck)."""


def tune(
    evaluate: Callable[[CompressionConfig], Measurement] | Evaluation,
    base: CompressionConfig,
    objective: Objective,
    *,
    trials: int,
    seed: int = 0,
    space: dict[str, tuple[Any, ...]] | None = None,
    on_trial: Callable[[TrialRecord, int], None] | None = None,
    on_failure: Callable[[int, CompressionConfig, str], None] | None = None,
    study: StudyTarget | None = None,
    fingerprint: dict[str, Any] | None = None,
    executor: Executor | None = None,
) -> TuneResult:
    """A TPE study reaching ``trials`` complete trials; the first trial is ``base`` when it lies in the space.

    ``study`` (default: in memory) may be shared with other processes, which then split the
    trials; ``executor`` (default: this process, one at a time) runs up to its capacity at once.
    ``on_trial(record, done)`` follows every trial this process finishes (``done``: the study's
    complete trials); ``on_failure(number, config, error)`` every evaluation that failed. The
    result holds every complete trial of the study.
    """
    import optuna

    from kvstream.executors import LocalExecutor
    from kvstream.studies import SharedStudy, StudyTarget, sampler_seed

    if trials < 1:
        raise ConfigError(f"--trials: must be at least 1, got {trials}")
    space = SEARCH_SPACE if space is None else space
    evaluation: Evaluation = evaluate if hasattr(evaluate, "job") else InProcess(evaluate)  # type: ignore[arg-type]
    executor = executor or LocalExecutor()
    study = study or StudyTarget()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sampler = optuna.samplers.TPESampler(
        seed=sampler_seed(seed, study.shared),
        n_startup_trials=min(10, max(2, trials // 2)),
        constant_liar=study.shared or executor.capacity > 1,
    )
    shared = SharedStudy(study, sampler, fingerprint or {})
    start = params_of(base, space)
    if start:
        shared.enqueue(start)
    running: dict[str, tuple[Any, dict[str, Any], CompressionConfig]] = {}
    failed_in_a_row = 0

    def finish(trial: Any, params: dict[str, Any], config: CompressionConfig, measured: Measurement) -> None:
        score = objective.score(measured.quality, measured.bits)
        shared.complete(trial, score, _attrs(config, measured))
        if on_trial:
            record = _record(trial.number, params, config, measured, objective, score)
            on_trial(record, len(shared.completed()))

    try:
        with shared.heartbeats():
            while True:
                while len(running) < executor.capacity and failed_in_a_row < MAX_FAILURES_IN_A_ROW:
                    trial = shared.claim(trials)
                    if trial is None:
                        break
                    params = {name: trial.suggest_categorical(name, list(choices)) for name, choices in space.items()}
                    config = apply_params(base, params)
                    reused = evaluation.reuse(config)
                    if reused is not None:
                        finish(trial, params, config, reused)
                        continue
                    fn, args = evaluation.job(config)
                    shared.start_beating(trial)
                    running[str(trial.number)] = (trial, params, config)
                    executor.submit(str(trial.number), fn, *args)
                if not running:
                    break
                outcome = executor.next_done()
                trial, params, config = running.pop(outcome.key)
                if outcome.ok:
                    failed_in_a_row = 0
                    finish(trial, params, config, evaluation.measure(config, outcome.value))
                else:
                    failed_in_a_row += 1
                    shared.fail(trial, outcome.error or "failed")
                    if on_failure:
                        on_failure(trial.number, config, outcome.error or "failed")
    except BaseException:
        for trial, _, _ in running.values():
            shared.release(trial)
        raise
    result = TuneResult(objective=objective)
    for frozen in shared.completed():
        attrs = frozen.user_attrs
        config = (
            CompressionConfig.from_dict(attrs["config"]) if "config" in attrs else apply_params(base, frozen.params)
        )
        measured = Measurement(
            attrs.get("run_id", ""),
            attrs.get("quality", math.nan),
            attrs.get("bits_per_element", math.nan),
            attrs.get("reused", False),
        )
        result.trials.append(_record(frozen.number, dict(frozen.params), config, measured, objective, frozen.value))
    return result


def _attrs(config: CompressionConfig, measured: Measurement) -> dict[str, Any]:
    """What a complete trial keeps in the study, so any process can list it without the results store."""
    return {
        "run_id": measured.run_id,
        "quality": measured.quality,
        "bits_per_element": measured.bits,
        "reused": measured.reused,
        "config": config.to_dict(),
    }


def _record(
    number: int,
    params: dict[str, Any],
    config: CompressionConfig,
    measured: Measurement,
    objective: Objective,
    score: float,
) -> TrialRecord:
    return TrialRecord(
        number=number,
        params=params,
        config=config,
        run_id=measured.run_id,
        quality=measured.quality,
        bits=measured.bits,
        feasible=objective.violation(measured.quality, measured.bits) == 0,
        score=score,
        reused=measured.reused,
    )
