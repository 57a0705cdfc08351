"""Tidy summary tables from the results store's rows.

Input: the long table of `kvstream.results.ResultsStore.rows` (one observation per row: ``run_id,
task, model, baseline, variant, cache, sample, metric, value``, every `CompressionConfig` field,
``extra``). ``variant`` is ``quantized`` or ``full_precision``; aggregate rows have no ``sample``;
``baseline`` is the digest of the key of the full-precision baseline the run was measured against.

Runs with different baselines (other prompts, model files, dtype, device or library versions) are
never compared: the quality and ablation tables group runs by task *and* baseline.

Output: small DataFrames, one row per run (or per run and metric), that the CLI renders with rich
and `kvstream.report.markdown` writes as markdown, CSV or JSON.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import pandas as pd

from kvstream.config import CompressionConfig
from kvstream.eval.stats import paired_bootstrap_delta
from kvstream.schema import FULL_PRECISION, QUANTIZED, RESOURCE_METRICS

COUNT_METRICS = ("tokens",)
"""Per-sample figures that describe the sample, not its quality (perplexity's scored tokens)."""

LOWER_IS_BETTER = {"perplexity", "nll", "loss", "error", *RESOURCE_METRICS}
QUALITY_PREFERENCE = ("accuracy", "perplexity", "qa_f1", "rouge_l", "f1", "recall", "nll")
CONFIG_FIELDS = tuple(f.name for f in fields(CompressionConfig))


# --------------------------------------------------------------------------- metric helpers


def higher_is_better(metric: str) -> bool:
    """Whether a larger value of ``metric`` is an improvement (accuracy) or not (perplexity, bytes, seconds)."""
    name = str(metric)
    if name in LOWER_IS_BETTER:
        return False
    return not name.endswith(("_bytes", "_seconds", "_seconds_per_token", "perplexity", "_nll"))


def is_quality_metric(metric: str) -> bool:
    """A task's own score (accuracy, F1, perplexity, ...), not a memory or speed figure."""
    name = str(metric)
    if name in RESOURCE_METRICS or name in COUNT_METRICS:
        return False
    return not name.endswith(("_bytes", "_seconds", "_seconds_per_token"))


def format_metric(metric: str, value: Any, *, signed: bool = False) -> str:
    """A value formatted for its metric: bytes in KiB/MiB, seconds in ms, scores with 4 digits."""
    if value is None:
        return "-"
    try:
        number = float(value)
    except (TypeError, ValueError):
        return str(value)
    if math.isnan(number):
        return "-"
    sign = "+" if signed and number > 0 else ""
    name = str(metric)
    if name.endswith("_bytes"):
        magnitude = abs(number)
        for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
            if magnitude >= scale:
                return f"{sign}{number / scale:.2f} {unit}"
        return f"{sign}{number:.0f} B"
    if name.endswith(("_seconds", "_seconds_per_token")):
        if abs(number) < 1:
            return f"{sign}{number * 1000:.1f} ms"
        return f"{sign}{number:.2f} s"
    if name == "bits_per_element":
        return f"{sign}{number:.2f}"
    return f"{sign}{number:.4g}"


def primary_metric(task: str, metrics: list[str] | set[str] | None = None) -> str | None:
    """The metric a task is judged by: its registered ``per_sample_metric`` when present, else a guess."""
    available = [m for m in (metrics or []) if is_quality_metric(m)]
    try:
        from kvstream.registry import registry

        name = getattr(registry("tasks").get(task), "per_sample_metric", None)
    except Exception:  # a task whose plugin is gone still has results worth reporting
        name = None
    if name and (metrics is None or name in available):
        return name
    for preferred in QUALITY_PREFERENCE:
        if preferred in available:
            return preferred
    return sorted(available)[0] if available else None


def parse_extra(extra: Any) -> dict[str, Any]:
    """The ``extra`` column of a row as a dict (stored as a dict or as JSON text)."""
    if isinstance(extra, dict):
        return extra
    if isinstance(extra, str) and extra.strip().startswith("{"):
        try:
            value = json.loads(extra)
        except ValueError:
            return {}
        return value if isinstance(value, dict) else {}
    return {}


def config_columns(df: pd.DataFrame) -> list[str]:
    return [c for c in CONFIG_FIELDS if c in df.columns]


def varying_fields(df: pd.DataFrame) -> list[str]:
    """Config fields that take more than one value across the rows of ``df``."""
    return [c for c in config_columns(df) if df[c].astype(str).nunique(dropna=False) > 1]


ABBREVIATIONS = {
    "chunk_size": "chunk",
    "ema_decay": "ema",
    "outlier_threshold_abs": "out_abs",
    "outlier_threshold_relative": "out_rel",
    "max_outlier_fraction": "out_max",
    "attention_sink_size": "sinks",
    "value_quant_groups": "vgroups",
    "key_rope": "rope",
    "key_symmetric": "ksym",
    "value_symmetric": "vsym",
    "decode_storage": "decode",
    "quantizer": "quantizer",
    "stats": "stats",
    "cache": "cache",
}
"""Short names of config fields in compact labels (the four bit widths become ``bits=N/M``)."""

BIT_FIELDS = ("key_bits_normal", "key_bits_sink_outlier", "value_bits_normal", "value_bits_sink_outlier")


def config_label(rec: dict[str, Any], names: list[str], *, compact: bool = True) -> str:
    """``bits=2/8 chunk=128 rope=post`` for the given fields of one run (``defaults`` if none).

    ``compact=False`` spells the fields out (``key_bits_normal=2 chunk_size=128 ...``).
    """
    if not compact:
        parts = [f"{name}={_short(rec.get(name))}" for name in names]
        return " ".join(parts) if parts else "defaults"
    parts = []
    if any(name in BIT_FIELDS for name in names):
        k = f"{_short(rec.get('key_bits_normal'))}/{_short(rec.get('key_bits_sink_outlier'))}"
        v = f"{_short(rec.get('value_bits_normal'))}/{_short(rec.get('value_bits_sink_outlier'))}"
        parts.append(f"bits={k}" if k == v else f"bits=k{k},v{v}")
    for name in names:
        if name not in BIT_FIELDS:
            parts.append(f"{ABBREVIATIONS.get(name, name)}={_short(rec.get(name))}")
    return " ".join(parts) if parts else "defaults"


def label_legend(names: list[str]) -> str:
    """``chunk = chunk_size, ...`` for the abbreviations a set of labels uses."""
    used = [f"{ABBREVIATIONS[n]} = {n}" for n in names if n in ABBREVIATIONS and ABBREVIATIONS[n] != n]
    if any(n in BIT_FIELDS for n in names):
        used.insert(0, "bits = normal/high bits (key and value; k.../v... when they differ)")
    return "; ".join(used)


def _short(value: Any) -> str:
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value)).lower()
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _is_aggregate(df: pd.DataFrame) -> pd.Series:
    if "sample" not in df.columns:
        return pd.Series(True, index=df.index)
    sample = df["sample"]
    return sample.isna() | (sample.astype(str).isin(["", "None", "nan"]))


# --------------------------------------------------------------------------- per-run values


def run_info(df: pd.DataFrame) -> pd.DataFrame:
    """One row per run: ``run_id, task, model, baseline`` and the config fields (from its quantized rows)."""
    df = df if "baseline" in df.columns else df.assign(baseline="")
    columns = [c for c in ("run_id", "task", "model", "baseline") if c in df.columns] + config_columns(df)
    if df.empty:
        return pd.DataFrame(columns=columns)
    ordered = df.sort_values("variant", key=lambda s: s != QUANTIZED) if "variant" in df.columns else df
    return ordered[columns].drop_duplicates("run_id").reset_index(drop=True)


BASELINE_SHOWN = 8
"""Hex digits of a baseline's digest shown to the reader."""


def baseline_label(runs: pd.DataFrame) -> str:
    """``baseline 1a2b3c4d (tiny, ~300 tokens)``: one baseline's runs named by its digest, model and context."""
    digest = str(runs["baseline"].iloc[0])[:BASELINE_SHOWN] or "unknown"
    details = sorted(str(m) for m in runs["model"].dropna().unique())
    if "context_tokens" in runs.columns and runs["context_tokens"].notna().any():
        details.append(f"~{runs['context_tokens'].mean():.0f} tokens")
    return f"baseline {digest} ({', '.join(details)})" if details else f"baseline {digest}"


def aggregates(df: pd.DataFrame) -> pd.DataFrame:
    """``run_id, variant, metric -> value``: aggregate rows, with per-sample means filling any gap."""
    if df.empty:
        return pd.DataFrame(columns=["run_id", "variant", "metric", "value"])
    agg_mask = _is_aggregate(df)
    values = df.assign(value=pd.to_numeric(df["value"], errors="coerce"))
    agg = values[agg_mask].groupby(["run_id", "variant", "metric"], as_index=False)["value"].mean()
    per_sample = values[~agg_mask].groupby(["run_id", "variant", "metric"], as_index=False)["value"].mean()
    if not per_sample.empty:
        merged = per_sample.merge(agg, on=["run_id", "variant", "metric"], how="left", suffixes=("_mean", ""))
        gaps = merged[merged["value"].isna()][["run_id", "variant", "metric", "value_mean"]]
        gaps = gaps.rename(columns={"value_mean": "value"})
        agg = pd.concat([agg, gaps], ignore_index=True) if not gaps.empty else agg
    return agg


def _lookup(agg: pd.DataFrame) -> dict[tuple[str, str, str], float]:
    return {(r.run_id, r.variant, r.metric): float(r.value) for r in agg.itertuples(index=False)}


def context_tokens(df: pd.DataFrame) -> dict[str, float]:
    """Mean context length (tokens) per run.

    From the rows' ``extra`` (``prompt_tokens``, written by the generation tasks) or, for perplexity,
    from the per-sample ``tokens`` metric (scored tokens, one fewer than the window).
    """
    out: dict[str, float] = {}
    if df.empty:
        return out
    per_sample = df[~_is_aggregate(df)]
    for run_id, group in per_sample.groupby("run_id"):
        tokens = []
        if "extra" in group.columns:
            for extra in group["extra"]:
                value = parse_extra(extra).get("prompt_tokens")
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    tokens.append(float(value))
        if not tokens:
            scored = pd.to_numeric(group.loc[group["metric"] == "tokens", "value"], errors="coerce").dropna()
            tokens = [float(v) + 1 for v in scored]
        if tokens:
            out[str(run_id)] = float(np.mean(tokens))
    return out


def run_table(df: pd.DataFrame) -> pd.DataFrame:
    """One row per run: identity, config, the task's primary metric (quantized, fp, delta) and its costs."""
    base_columns = [
        "run_id",
        "task",
        "model",
        "baseline",
        *CONFIG_FIELDS,
        "metric",
        QUANTIZED,
        FULL_PRECISION,
        "delta",
        "bits_per_element",
        "bits_min",
        "bits_max",
        "prefill_bits_per_element",
        "peak_cache_bytes",
        "fp_peak_cache_bytes",
        "context_tokens",
    ]
    if df.empty:
        return pd.DataFrame(columns=base_columns)
    info = run_info(df)
    values = _lookup(aggregates(df))
    metrics_by_run = df.groupby("run_id")["metric"].agg(lambda s: set(s.astype(str))).to_dict()
    lengths = context_tokens(df)
    rows = []
    for rec in info.to_dict("records"):
        run_id = rec["run_id"]
        metric = primary_metric(str(rec.get("task")), metrics_by_run.get(run_id, set()))
        q = values.get((run_id, QUANTIZED, metric), math.nan) if metric else math.nan
        fp = values.get((run_id, FULL_PRECISION, metric), math.nan) if metric else math.nan
        rows.append(
            {
                **rec,
                "metric": metric,
                QUANTIZED: q,
                FULL_PRECISION: fp,
                "delta": q - fp,
                "bits_per_element": values.get((run_id, QUANTIZED, "bits_per_element"), math.nan),
                "bits_min": values.get((run_id, QUANTIZED, "bits_per_element_min"), math.nan),
                "bits_max": values.get((run_id, QUANTIZED, "bits_per_element_max"), math.nan),
                "prefill_bits_per_element": values.get((run_id, QUANTIZED, "prefill_bits_per_element"), math.nan),
                "peak_cache_bytes": values.get((run_id, QUANTIZED, "peak_cache_bytes"), math.nan),
                "fp_peak_cache_bytes": values.get((run_id, FULL_PRECISION, "peak_cache_bytes"), math.nan),
                "context_tokens": lengths.get(run_id, math.nan),
            }
        )
    table = pd.DataFrame(rows)
    return table[[c for c in base_columns if c in table.columns]]


def delta_table(df: pd.DataFrame, *, seed: int = 0) -> pd.DataFrame:
    """Quantized minus full precision for every quality metric of every run, with a paired bootstrap CI."""
    columns = ["run_id", "task", "metric", QUANTIZED, FULL_PRECISION, "delta", "ci_low", "ci_high", "n"]
    if df.empty:
        return pd.DataFrame(columns=columns)
    values = _lookup(aggregates(df))
    tasks = run_info(df).set_index("run_id")["task"].to_dict()
    per_sample = df[~_is_aggregate(df)]
    rows = []
    for run_id, metric in (
        df[["run_id", "metric"]].drop_duplicates().sort_values(["run_id", "metric"]).itertuples(index=False)
    ):
        if not is_quality_metric(str(metric)):
            continue
        samples = per_sample[(per_sample["run_id"] == run_id) & (per_sample["metric"] == metric)]
        paired = (
            samples.assign(value=pd.to_numeric(samples["value"], errors="coerce"))
            .pivot_table(index="sample", columns="variant", values="value", aggfunc="mean")
            .dropna()
        )
        q = values.get((run_id, QUANTIZED, metric), math.nan)
        fp = values.get((run_id, FULL_PRECISION, metric), math.nan)
        if QUANTIZED in paired.columns and FULL_PRECISION in paired.columns and len(paired):
            ci = paired_bootstrap_delta(paired[QUANTIZED].to_numpy(), paired[FULL_PRECISION].to_numpy(), seed=seed)
            low, high = ci.low, ci.high
            n = len(paired)
        else:
            low = high = math.nan
            n = 0
        rows.append(
            {
                "run_id": run_id,
                "task": tasks.get(run_id),
                "metric": metric,
                QUANTIZED: q,
                FULL_PRECISION: fp,
                "delta": q - fp,
                "ci_low": low,
                "ci_high": high,
                "n": n,
            }
        )
    return pd.DataFrame(rows, columns=columns)


def memory_speed_table(df: pd.DataFrame) -> pd.DataFrame:
    """Memory and speed of each run, quantized against full precision."""
    columns = [
        "run_id",
        "task",
        "context_tokens",
        "bits_per_element",
        "prefill_bits_per_element",
        "cache_bytes",
        "fp16_bytes",
        "peak_cache_bytes",
        "fp_peak_cache_bytes",
        "peak_ratio",
        "prefill_seconds",
        "fp_prefill_seconds",
        "decode_seconds_per_token",
        "fp_decode_seconds_per_token",
        "peak_rss_bytes",
    ]
    if df.empty:
        return pd.DataFrame(columns=columns)
    values = _lookup(aggregates(df))
    lengths = context_tokens(df)
    rows = []
    for rec in run_info(df).to_dict("records"):
        run_id = rec["run_id"]

        def get(variant: str, metric: str, run_id: str = run_id) -> float:
            return values.get((run_id, variant, metric), math.nan)

        peak, fp_peak = get(QUANTIZED, "peak_cache_bytes"), get(FULL_PRECISION, "peak_cache_bytes")
        rows.append(
            {
                "run_id": run_id,
                "task": rec.get("task"),
                "context_tokens": lengths.get(run_id, math.nan),
                "bits_per_element": get(QUANTIZED, "bits_per_element"),
                "prefill_bits_per_element": get(QUANTIZED, "prefill_bits_per_element"),
                "cache_bytes": get(QUANTIZED, "cache_bytes"),
                "fp16_bytes": get(QUANTIZED, "fp16_bytes"),
                "peak_cache_bytes": peak,
                "fp_peak_cache_bytes": fp_peak,
                "peak_ratio": peak / fp_peak if fp_peak and not math.isnan(fp_peak) else math.nan,
                "prefill_seconds": get(QUANTIZED, "prefill_seconds"),
                "fp_prefill_seconds": get(FULL_PRECISION, "prefill_seconds"),
                "decode_seconds_per_token": get(QUANTIZED, "decode_seconds_per_token"),
                "fp_decode_seconds_per_token": get(FULL_PRECISION, "decode_seconds_per_token"),
                "peak_rss_bytes": get(QUANTIZED, "peak_rss_bytes"),
            }
        )
    return pd.DataFrame(rows, columns=columns)


def quality_table(runs: pd.DataFrame) -> pd.DataFrame:
    """Quality against effective bits per task and baseline: one row per run, sorted by task, baseline and bits.

    ``bits_per_element`` is the mean over the run's samples, ``bits_min``/``bits_max`` their range, and
    ``prefill_bits_per_element`` the mean at the end of prefill.
    """
    columns = [
        "task",
        "model",
        "baseline",
        "run_id",
        "settings",
        "context_tokens",
        "metric",
        "bits_per_element",
        QUANTIZED,
        FULL_PRECISION,
        "delta",
        "bits_min",
        "bits_max",
        "prefill_bits_per_element",
    ]
    if runs.empty:
        return pd.DataFrame(columns=columns)
    labels = pd.Series("", index=runs.index, dtype=object)
    for _, group in runs.groupby(["task", "baseline"], sort=False, dropna=False):
        shown = varying_fields(group)
        labels[group.index] = [config_label(r, shown) for r in group.to_dict("records")]
    table = runs.assign(settings=labels)
    table = table.sort_values(["task", "baseline", "bits_per_element", "run_id"], na_position="last")
    return table[columns].reset_index(drop=True)


def ablation_table(runs: pd.DataFrame) -> pd.DataFrame:
    """For each task, baseline and config field that varies among their runs: the metric at every value of it.

    Values are means over the runs sharing that value (other fields may vary too).
    """
    columns = [
        "task",
        "baseline",
        "metric",
        "field",
        "value",
        QUANTIZED,
        FULL_PRECISION,
        "delta",
        "bits_per_element",
        "runs",
    ]
    out = []
    for (task, baseline, metric), group in runs.groupby(["task", "baseline", "metric"], sort=True, dropna=False):
        for name in varying_fields(group):
            keyed = group.assign(_value=group[name].map(_short))
            for value, sub in keyed.groupby("_value", sort=False):
                out.append(
                    {
                        "task": task,
                        "baseline": baseline,
                        "metric": metric,
                        "field": name,
                        "value": value,
                        QUANTIZED: sub[QUANTIZED].mean(),
                        FULL_PRECISION: sub[FULL_PRECISION].mean(),
                        "delta": sub["delta"].mean(),
                        "bits_per_element": sub["bits_per_element"].mean(),
                        "runs": len(sub),
                        "_order": sub[name].iloc[0],
                    }
                )
    if not out:
        return pd.DataFrame(columns=columns)
    table = pd.DataFrame(out)
    table["_key"] = table["_order"].map(lambda v: (0, float(v)) if _numeric(v) else (1, str(v)))
    table = table.sort_values(["task", "baseline", "field", "_key"], kind="stable")
    return table[columns].reset_index(drop=True)


def _numeric(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))


# --------------------------------------------------------------------------- sweeps


def quality_per_bit(quality: float, bits: float, higher_better: bool) -> float:
    """The score the sweep summary ranks by: quality (1/value for lower-is-better metrics) per effective bit."""
    if bits is None or math.isnan(bits) or bits <= 0 or quality is None or math.isnan(quality):
        return math.nan
    if not higher_better:
        quality = 1.0 / quality if quality > 0 else math.nan
    return quality / bits


def pareto_front(quality: list[float], bits: list[float], higher_better: bool) -> list[bool]:
    """Runs no other run beats on both quality and bits (ties allowed)."""
    signed = [q if higher_better else -q for q in quality]
    flags = []
    for i, (qi, bi) in enumerate(zip(signed, bits, strict=True)):
        if math.isnan(qi) or math.isnan(bi):
            flags.append(False)
            continue
        dominated = any(
            j != i and not (math.isnan(qj) or math.isnan(bj)) and qj >= qi and bj <= bi and (qj > qi or bj < bi)
            for j, (qj, bj) in enumerate(zip(signed, bits, strict=True))
        )
        flags.append(not dominated)
    return flags


def sweep_table(df: pd.DataFrame, run_ids: list[str]) -> pd.DataFrame:
    """The summary of a sweep (ablate, tune): varying config values, metric q vs fp, delta, bits, ranking.

    Rows follow ``run_ids``; ``pareto`` marks runs no other beats on quality and bits together and
    ``best`` the one with the highest quality per effective bit.
    """
    runs = run_table(df[df["run_id"].isin(run_ids)]) if not df.empty else run_table(df)
    if runs.empty:
        return pd.DataFrame(columns=["run_id", "metric", QUANTIZED, FULL_PRECISION, "delta", "bits_per_element"])
    order = {run_id: i for i, run_id in enumerate(run_ids)}
    runs = runs.assign(_order=runs["run_id"].map(order)).sort_values("_order").drop(columns="_order")
    shown = varying_fields(runs)
    metric = str(runs["metric"].dropna().iloc[0]) if runs["metric"].notna().any() else ""
    higher = higher_is_better(metric)
    quality = runs[QUANTIZED].astype(float).tolist()
    bits = runs["bits_per_element"].astype(float).tolist()
    scores = [quality_per_bit(q, b, higher) for q, b in zip(quality, bits, strict=True)]
    table = runs[["run_id", *shown, "metric", QUANTIZED, FULL_PRECISION, "delta", "bits_per_element"]].copy()
    table["quality_per_bit"] = scores
    table["pareto"] = pareto_front(quality, bits, higher)
    best = _best_index(scores, quality, bits, higher)
    table["best"] = [i == best for i in range(len(table))]
    return table.reset_index(drop=True)


def _best_index(scores: list[float], quality: list[float], bits: list[float], higher: bool) -> int | None:
    candidates = [i for i, s in enumerate(scores) if not math.isnan(s) and s > 0]
    if not candidates:
        return None
    return max(candidates, key=lambda i: (scores[i], quality[i] if higher else -quality[i], -bits[i]))


# --------------------------------------------------------------------------- everything at once


@dataclass
class ReportTables:
    """The tables of a report, each tidy and ready for rich, markdown, CSV or JSON."""

    runs: pd.DataFrame
    quality: pd.DataFrame
    deltas: pd.DataFrame
    memory_speed: pd.DataFrame
    ablations: pd.DataFrame

    def items(self) -> list[tuple[str, pd.DataFrame]]:
        return [
            ("quality", self.quality),
            ("deltas", self.deltas),
            ("memory_speed", self.memory_speed),
            ("ablations", self.ablations),
            ("runs", self.runs),
        ]


def build_tables(df: pd.DataFrame) -> ReportTables:
    runs = run_table(df)
    return ReportTables(
        runs=runs,
        quality=quality_table(runs),
        deltas=delta_table(df),
        memory_speed=memory_speed_table(df),
        ablations=ablation_table(runs),
    )
