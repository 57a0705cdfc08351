"""PNG plots of a report (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from kvstream.report.tables import config_label, higher_is_better, varying_fields  # noqa: E402
from kvstream.schema import FULL_PRECISION, QUANTIZED  # noqa: E402

DPI = 110
MAX_CURVES = 8


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", str(text)).strip("-") or "x"


def _save(fig: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return path


def _finite(values: pd.Series) -> pd.Series:
    return pd.to_numeric(values, errors="coerce").dropna()


def quality_vs_bits(runs: pd.DataFrame, task: str, path: Path) -> Path | None:
    """Task metric against effective bits per element, one point per run, full precision as a line."""
    sub = runs[runs["task"] == task].dropna(subset=[QUANTIZED, "bits_per_element"])
    if sub.empty:
        return None
    metric = str(sub["metric"].iloc[0])
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    labels = varying_fields(sub)
    ax.scatter(sub["bits_per_element"], sub[QUANTIZED], color="tab:blue", zorder=3, label="quantized runs")
    if len(sub) <= 12:
        for rec in sub.to_dict("records"):
            ax.annotate(
                config_label(rec, labels) if labels else rec["run_id"][:8],
                (rec["bits_per_element"], rec[QUANTIZED]),
                textcoords="offset points",
                xytext=(4, 4),
                fontsize=7,
            )
    fp = _finite(sub[FULL_PRECISION])
    if not fp.empty:
        ax.axhline(fp.mean(), color="tab:gray", linestyle="--", label="full precision")
    direction = "higher is better" if higher_is_better(metric) else "lower is better"
    ax.set_xlabel("effective bits per cached element")
    ax.set_ylabel(f"{metric} ({direction})")
    ax.set_title(f"{task}: {metric} vs effective bits")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def memory_vs_context(memory: pd.DataFrame, runs: pd.DataFrame, path: Path) -> Path | None:
    """Peak KV-cache bytes against prompt length: one line per config, and the full-precision cache."""
    data = memory.merge(runs.drop(columns=["task"], errors="ignore"), on="run_id", how="left", suffixes=("", "_run"))
    data = data.dropna(subset=["context_tokens", "peak_cache_bytes"])
    if data.empty:
        return None
    fields = varying_fields(data)
    data = data.assign(_label=[config_label(r, fields) for r in data.to_dict("records")])
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    mib = 2**20
    lengths = data.groupby("_label")["context_tokens"].nunique()
    curves = [label for label in lengths.index if lengths[label] > 1][:MAX_CURVES]
    for label in curves:
        group = data[data["_label"] == label].groupby("context_tokens", as_index=False)[["peak_cache_bytes"]].mean()
        ax.plot(group["context_tokens"], group["peak_cache_bytes"] / mib, marker="o", label=f"quantized: {label}")
    rest = data[~data["_label"].isin(curves)]
    if not rest.empty:
        ax.scatter(
            rest["context_tokens"],
            rest["peak_cache_bytes"] / mib,
            color="tab:purple",
            alpha=0.6,
            label="quantized runs" if not curves else "other quantized runs",
        )
    fp = data.dropna(subset=["fp_peak_cache_bytes"])
    if not fp.empty:
        fp = fp.groupby("context_tokens", as_index=False)[["fp_peak_cache_bytes"]].mean()
        ax.plot(
            fp["context_tokens"],
            fp["fp_peak_cache_bytes"] / mib,
            marker="s",
            linestyle="--",
            color="tab:gray",
            label="full precision",
        )
    ax.set_xlabel("context length (prompt tokens)")
    ax.set_ylabel("peak KV cache (MiB)")
    ax.set_title("Peak cache memory vs context length")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    return _save(fig, path)


def ablation_curve(ablation: pd.DataFrame, task: str, field: str, path: Path) -> Path | None:
    """Metric (quantized and fp) and effective bits against the values of one config field."""
    sub = ablation[(ablation["task"] == task) & (ablation["field"] == field)]
    if sub.empty:
        return None
    metric = str(sub["metric"].iloc[0])
    x = list(range(len(sub)))
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    ax.plot(x, sub[QUANTIZED], marker="o", color="tab:blue", label=f"{metric} quantized")
    fp = pd.to_numeric(sub[FULL_PRECISION], errors="coerce")
    if fp.notna().any():
        ax.plot(x, fp, linestyle="--", color="tab:gray", label=f"{metric} full precision")
    ax.set_xticks(x, [str(v) for v in sub["value"]])
    ax.set_xlabel(field)
    ax.set_ylabel(metric)
    ax.grid(True, alpha=0.3)
    bits = pd.to_numeric(sub["bits_per_element"], errors="coerce")
    handles, labels = ax.get_legend_handles_labels()
    if bits.notna().any() and not all(math.isnan(b) for b in bits):
        twin = ax.twinx()
        twin.plot(x, bits, marker="^", color="tab:orange", alpha=0.8, label="bits per element")
        twin.set_ylabel("effective bits per element")
        h2, l2 = twin.get_legend_handles_labels()
        handles, labels = handles + h2, labels + l2
    ax.legend(handles, labels, fontsize=8)
    ax.set_title(f"{task}: ablation of {field}")
    return _save(fig, path)
