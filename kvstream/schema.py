"""Names shared by the results store and the report: the two variants of a run and its resource metrics.

Kept free of torch so the report can read results without loading the engine.
"""

QUANTIZED = "quantized"
FULL_PRECISION = "full_precision"
VARIANTS = (QUANTIZED, FULL_PRECISION)

RESOURCE_METRICS: tuple[str, ...] = (
    "bits_per_element",
    "ratio_to_fp16",
    "cache_bytes",
    "peak_cache_bytes",
    "fp16_bytes",
    "peak_rss_bytes",
    "peak_accelerator_bytes",
    "prefill_seconds",
    "decode_seconds_per_token",
    "key_outlier_ratio",
    "value_outlier_ratio",
)
"""Aggregate-only rows (``sample == ""``) of each variant, besides the task's own quality metrics."""
