"""Bootstrap confidence intervals: the mean of one sample, and the mean paired difference of two."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

_MAX_ELEMENTS = 4_000_000
"""Resampled values held at once (the bootstrap runs in batches of replicates below this)."""


class ConfidenceInterval(NamedTuple):
    estimate: float
    """The statistic on the data itself (the mean)."""
    low: float
    high: float
    n: int


def _as_array(values: Sequence[float] | np.ndarray, name: str) -> np.ndarray:
    array = np.asarray(values, dtype=float).reshape(-1)
    if np.isnan(array).any():
        raise ValueError(f"{name}: contains NaN")
    return array


def bootstrap_ci(
    values: Sequence[float] | np.ndarray,
    n_boot: int = 2000,
    alpha: float = 0.05,
    seed: int = 0,
) -> ConfidenceInterval:
    """Percentile bootstrap interval of the mean at level ``1 - alpha``; deterministic for ``seed``.

    No values give NaN everywhere; one value (or identical values) an interval of zero width.
    """
    if n_boot < 1:
        raise ValueError(f"n_boot must be at least 1, got {n_boot}")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must lie in (0, 1), got {alpha}")
    data = _as_array(values, "values")
    n = data.size
    if n == 0:
        return ConfidenceInterval(math.nan, math.nan, math.nan, 0)
    mean = float(data.mean())
    if n == 1 or np.all(data == data[0]):
        return ConfidenceInterval(mean, mean, mean, n)
    rng = np.random.default_rng(seed)
    batch = max(1, _MAX_ELEMENTS // n)
    means = np.empty(n_boot)
    for start in range(0, n_boot, batch):
        stop = min(start + batch, n_boot)
        idx = rng.integers(0, n, size=(stop - start, n))
        means[start:stop] = data[idx].mean(axis=1)
    low, high = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return ConfidenceInterval(mean, float(min(low, mean)), float(max(high, mean)), n)


def paired_bootstrap_delta(
    quantized: Sequence[float] | np.ndarray,
    baseline: Sequence[float] | np.ndarray,
    n_boot: int = 2000,
    alpha: float = 0.05,
    seed: int = 0,
) -> ConfidenceInterval:
    """Bootstrap interval of the mean of ``quantized[i] - baseline[i]`` (samples resampled in pairs)."""
    q = _as_array(quantized, "quantized")
    b = _as_array(baseline, "baseline")
    if q.shape != b.shape:
        raise ValueError(f"paired samples differ in length: {q.size} quantized vs {b.size} baseline")
    return bootstrap_ci(q - b, n_boot=n_boot, alpha=alpha, seed=seed)
