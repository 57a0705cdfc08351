"""Evaluation: paired quantized / full-precision runs of a task, their summary, memory monitoring, bootstrap.

The runner (and torch with it) loads lazily, so the report can use `kvstream.eval.stats` and
`kvstream.eval.summary` without the engine.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_EXPORTS = {
    "EvalSpec": "kvstream.eval.runner",
    "ProgressCallback": "kvstream.eval.runner",
    "run_eval": "kvstream.eval.runner",
    "MemoryMonitor": "kvstream.eval.memory",
    "summarize": "kvstream.eval.summary",
    "ConfidenceInterval": "kvstream.eval.stats",
    "bootstrap_ci": "kvstream.eval.stats",
    "paired_bootstrap_delta": "kvstream.eval.stats",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'kvstream.eval' has no attribute {name!r}")
