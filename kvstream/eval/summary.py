"""A run's summary: per metric both variants' means, their difference and its paired bootstrap interval."""

from __future__ import annotations

import math
from typing import Any

import pandas as pd

from kvstream.eval.stats import paired_bootstrap_delta
from kvstream.schema import FULL_PRECISION, QUANTIZED, SUMMARY_COLUMNS, VARIANTS


def _ratio_row(ratios: Any, n_boot: int, alpha: float, seed: int) -> dict[str, Any]:
    """``perplexity_ratio``: the mean over samples of quantized / full-precision perplexity, with the paired
    bootstrap interval of its distance from 1."""
    ci = paired_bootstrap_delta(ratios, [1.0] * len(ratios), n_boot=n_boot, alpha=alpha, seed=seed)
    return {
        "metric": "perplexity_ratio",
        "kind": "task",
        QUANTIZED: float(ratios.mean()),
        FULL_PRECISION: 1.0,
        "delta": ci.estimate,
        "ci_low": ci.low,
        "ci_high": ci.high,
        "n": len(ratios),
    }


def summarize(rows: pd.DataFrame, n_boot: int = 2000, alpha: float = 0.05, seed: int = 0) -> pd.DataFrame:
    """One row per metric: both variants' means, the difference and its paired bootstrap interval.

    Task metrics (those with per-sample rows) are paired by sample id; resource metrics (aggregate
    rows only) get the difference of the two aggregates and no interval.
    """
    out: list[dict[str, Any]] = []
    if rows.empty:
        return pd.DataFrame(columns=list(SUMMARY_COLUMNS))
    run_id, task, model = (str(rows[c].iloc[0]) for c in ("run_id", "task", "model"))
    per = rows[rows["sample"] != ""]
    agg = rows[rows["sample"] == ""]
    task_metrics = list(dict.fromkeys(per["metric"]))
    for metric in task_metrics:
        series = {
            variant: per[(per["variant"] == variant) & (per["metric"] == metric)]
            .drop_duplicates("sample")
            .set_index("sample")["value"]
            for variant in VARIANTS
        }
        q, b = series[QUANTIZED], series[FULL_PRECISION]
        common = [s for s in q.index if s in b.index]
        q_mean = float(q.mean()) if len(q) else math.nan
        b_mean = float(b.mean()) if len(b) else math.nan
        if common:
            ci = paired_bootstrap_delta(
                q.loc[common].to_numpy(), b.loc[common].to_numpy(), n_boot=n_boot, alpha=alpha, seed=seed
            )
            delta, low, high = ci.estimate, ci.low, ci.high
        else:
            delta, low, high = q_mean - b_mean, math.nan, math.nan
        out.append(
            {
                "metric": metric,
                "kind": "task",
                QUANTIZED: q_mean,
                FULL_PRECISION: b_mean,
                "delta": delta,
                "ci_low": low,
                "ci_high": high,
                "n": len(common),
            }
        )
        if metric == "perplexity" and common:
            out.append(_ratio_row(q.loc[common].to_numpy() / b.loc[common].to_numpy(), n_boot, alpha, seed))
    for metric in dict.fromkeys(agg["metric"]):
        if metric in task_metrics:
            continue
        values = {v: agg[(agg["variant"] == v) & (agg["metric"] == metric)]["value"] for v in VARIANTS}
        q_val = float(values[QUANTIZED].iloc[0]) if len(values[QUANTIZED]) else math.nan
        b_val = float(values[FULL_PRECISION].iloc[0]) if len(values[FULL_PRECISION]) else math.nan
        out.append(
            {
                "metric": metric,
                "kind": "resource",
                QUANTIZED: q_val,
                FULL_PRECISION: b_val,
                "delta": q_val - b_val,
                "ci_low": math.nan,
                "ci_high": math.nan,
                "n": 1,
            }
        )
    frame = pd.DataFrame.from_records(out, columns=[c for c in SUMMARY_COLUMNS if c not in ("run_id", "task", "model")])
    frame.insert(0, "model", model)
    frame.insert(0, "task", task)
    frame.insert(0, "run_id", run_id)
    return frame[list(SUMMARY_COLUMNS)]
