"""Evaluation: paired quantized / full-precision runs of a task, memory monitoring and bootstrap statistics."""

from kvstream.eval.memory import MemoryMonitor
from kvstream.eval.runner import (
    FULL_PRECISION,
    QUANTIZED,
    SUMMARY_COLUMNS,
    TIDY_COLUMNS,
    EvalResult,
    EvalSpec,
    ProgressCallback,
    load_results,
    load_run,
    load_summaries,
    run_eval,
    run_exists,
)
from kvstream.eval.stats import ConfidenceInterval, bootstrap_ci, paired_bootstrap_delta

__all__ = [
    "FULL_PRECISION",
    "QUANTIZED",
    "SUMMARY_COLUMNS",
    "TIDY_COLUMNS",
    "ConfidenceInterval",
    "EvalResult",
    "EvalSpec",
    "MemoryMonitor",
    "ProgressCallback",
    "bootstrap_ci",
    "load_results",
    "load_run",
    "load_summaries",
    "paired_bootstrap_delta",
    "run_eval",
    "run_exists",
]
