"""Names shared by the results store and the report: the variants of a run, its metrics, its columns.

Kept free of torch so the report can read results without loading the engine.
"""

import dataclasses

from kvstream.config import CompressionConfig

QUANTIZED = "quantized"
FULL_PRECISION = "full_precision"
VARIANTS = (QUANTIZED, FULL_PRECISION)

RESOURCE_METRICS: tuple[str, ...] = (
    "bits_per_element",
    "bits_per_element_min",
    "bits_per_element_max",
    "prefill_bits_per_element",
    "prefill_bits_per_element_min",
    "prefill_bits_per_element_max",
    "ratio_to_fp16",
    "cache_bytes",
    "peak_cache_bytes",
    "fp16_bytes",
    "peak_rss_bytes",
    "peak_accelerator_bytes",
    "prefill_seconds",
    "decode_seconds_per_token",
    "answer_score_seconds",
    "key_outlier_ratio",
    "value_outlier_ratio",
)
"""Aggregate-only rows (``sample == ""``) of each variant, besides the task's own quality metrics.

``bits_per_element`` is the mean over the samples' caches when each is done (after generation),
``prefill_bits_per_element`` the same at the end of prefill; ``_min`` / ``_max`` give their range."""

CONFIG_COLUMNS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(CompressionConfig) if f.name != "cache")
TIDY_COLUMNS: tuple[str, ...] = (
    "run_id",
    "task",
    "model",
    "baseline",
    "variant",
    "cache",
    "sample",
    "metric",
    "value",
    *CONFIG_COLUMNS,
    "extra",
)
"""Columns of a run's ``rows.csv``, one observation per row. ``baseline`` is the digest of the key of the
full-precision baseline the run pairs with; ``cache`` is the config's strategy, its other fields follow."""

SUMMARY_COLUMNS: tuple[str, ...] = (
    "run_id",
    "task",
    "model",
    "metric",
    "kind",
    QUANTIZED,
    FULL_PRECISION,
    "delta",
    "ci_low",
    "ci_high",
    "n",
)
"""Columns of a run's ``summary.csv``: one row per metric."""

_TEXT_FIELDS = (
    f.name for f in dataclasses.fields(CompressionConfig) if f.type in ("str", str) or "Literal" in str(f.type)
)
STRING_COLUMNS: tuple[str, ...] = tuple(
    dict.fromkeys(
        ("run_id", "task", "model", "baseline", "variant", "cache", "sample", "metric", "extra", *_TEXT_FIELDS)
    )
)
"""Columns read back as text (empty strings kept: an aggregate row's ``sample`` is ``""``)."""
