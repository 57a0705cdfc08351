"""The report folder: ``report.md`` (tables and plots), the PNGs, and optional CSV / JSON exports."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pandas as pd

from kvstream.report.tables import (
    BASELINE_SHOWN,
    ReportTables,
    baseline_label,
    build_tables,
    config_label,
    format_metric,
    label_legend,
    varying_fields,
)
from kvstream.results.store import Damaged
from kvstream.schema import FULL_PRECISION, QUANTIZED, VARIANTS

Formatter = Callable[[Any], str]


def _missing(value: Any) -> bool:
    try:
        return value is None or bool(pd.isna(value))
    except (TypeError, ValueError):
        return False


def _cell(value: Any, fmt: Formatter | None) -> str:
    if _missing(value):
        text = "-"
    elif fmt is not None:
        text = fmt(value)
    elif isinstance(value, bool):
        text = str(value).lower()
    elif isinstance(value, float):
        text = f"{value:.4g}"
    else:
        text = str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def markdown_table(
    df: pd.DataFrame, formatters: dict[str, Formatter] | None = None, *, right: set[str] | None = None
) -> str:
    """A GitHub-flavoured markdown table of ``df``; numeric columns (and ``right``) right-aligned."""
    formatters = formatters or {}
    columns = [str(c) for c in df.columns]
    if not columns:
        return "_(empty)_\n"
    numeric = {
        str(c): (pd.api.types.is_numeric_dtype(df[c]) and not pd.api.types.is_bool_dtype(df[c]))
        or str(c) in (right or set())
        for c in df.columns
    }
    lines = [
        "| " + " | ".join(c.replace("|", "\\|") for c in columns) + " |",
        "| " + " | ".join("---:" if numeric[c] else "---" for c in columns) + " |",
    ]
    for rec in df.to_dict("records"):
        lines.append("| " + " | ".join(_cell(rec[c], formatters.get(str(c))) for c in df.columns) + " |")
    return "\n".join(lines) + "\n"


def _metric_formatters(df: pd.DataFrame, columns: list[str]) -> dict[str, Formatter]:
    """Formatters for value columns when every row shares one metric (else plain numbers)."""
    metrics = df["metric"].dropna().unique() if "metric" in df.columns else []
    if len(metrics) == 1:
        metric = str(metrics[0])
        return {c: (lambda v, m=metric: format_metric(m, v)) for c in columns}
    return {}


BITS = ("bits_per_element", "bits_min", "bits_max", "prefill_bits_per_element")
BYTES = ("cache_bytes", "fp16_bytes", "peak_cache_bytes", "fp_peak_cache_bytes", "peak_rss_bytes")
SECONDS = ("prefill_seconds", "fp_prefill_seconds", "decode_seconds_per_token", "fp_decode_seconds_per_token")


def _memory_formatters() -> dict[str, Formatter]:
    out: dict[str, Formatter] = {c: (lambda v, c=c: format_metric(c, v)) for c in (*BYTES, *SECONDS)}
    for column in BITS:
        out[column] = lambda v: f"{v:.2f}"
    out["peak_ratio"] = lambda v: f"{v:.3f}"
    out["context_tokens"] = lambda v: f"{v:.0f}"
    return out


def _baseline_suffix(baseline: str, baselines: int) -> str:
    """``_1a2b3c4d`` for the files and headings of one of a task's several baselines, else nothing."""
    return f"_{str(baseline)[:BASELINE_SHOWN]}" if baselines > 1 else ""


@dataclass
class ReportFiles:
    """What `write_report` wrote."""

    markdown: Path
    plots: list[Path] = field(default_factory=list)
    exports: list[Path] = field(default_factory=list)


def export_tables(tables: ReportTables, out_dir: Path, fmt: str) -> list[Path]:
    """Each table as ``<name>.csv`` or ``<name>.json`` (records) in ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, table in tables.items():
        path = out_dir / f"{name}.{fmt}"
        if fmt == "csv":
            table.to_csv(path, index=False)
        else:
            records = json.loads(table.to_json(orient="records", double_precision=10))
            path.write_text(json.dumps(records, indent=2) + "\n")
        written.append(path)
    return written


def write_report(
    df: pd.DataFrame,
    out_dir: str | Path,
    *,
    tables: ReportTables | None = None,
    source: str | Path | None = None,
    export: str | None = None,
    damaged: list[Damaged] | None = None,
) -> ReportFiles:
    """Write ``report.md`` and its PNGs into ``out_dir`` (plus ``export`` = csv/json tables).

    ``damaged`` runs of the store are listed with what is wrong with each, not left out unsaid.
    """
    from kvstream.report import plots

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tables = tables or build_tables(df)
    runs = tables.runs
    files = ReportFiles(markdown=out_dir / "report.md")

    md: list[str] = ["# kvstream report", ""]
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    tasks = sorted(str(t) for t in runs["task"].dropna().unique()) if not runs.empty else []
    models = sorted(str(m) for m in runs["model"].dropna().unique()) if not runs.empty else []
    md.append(
        f"{len(runs)} run(s) from `{source or 'results'}`; tasks: {', '.join(tasks) or '-'}; "
        f"models: {', '.join(models) or '-'}. Generated {stamp}."
    )
    md.append("")
    md += [
        "Every run evaluates one compression config on one task with the quantized cache and, on the same "
        "samples, with the full-precision cache. *Effective bits* count every byte the cache holds "
        "(codes, scales, zero-points, outlier indices, sinks, the full-precision tail) per cached key or "
        "value element; fp16 is 16. `bits_per_element` is the mean over a run's samples at the end of generation "
        "(`bits_min`/`bits_max` their range), `prefill_bits_per_element` the mean at the end of prefill.",
        "",
        "Runs measured against different full-precision baselines (other prompts, model files, dtype, device or "
        "library versions) are never compared: each baseline of a task gets its own table and plot.",
        "",
    ]
    if damaged:
        md += ["## Damaged runs", ""]
        md += ["Left out of every table below; `kvstream eval` or `kvstream ablate` runs them again.", ""]
        md += [f"- `{d.run_id}`: {d.problem}" for d in damaged]
        md.append("")

    md += ["## Quality vs effective bits", ""]
    if tables.quality.empty:
        md += ["_No runs._", ""]
    for task in tasks:
        md += [f"### {task}", ""]
        groups = list(runs[runs["task"] == task].groupby("baseline", sort=True))
        for baseline, group in groups:
            suffix = _baseline_suffix(baseline, len(groups))
            if suffix:
                md += [f"#### {baseline_label(group)}", ""]
            quality = tables.quality
            sub = quality[(quality["task"] == task) & (quality["baseline"] == baseline)]
            fmts = _metric_formatters(sub, [QUANTIZED, FULL_PRECISION])
            fmts["delta"] = lambda v, m=str(sub["metric"].iloc[0]): format_metric(m, v, signed=True)
            for column in BITS:
                fmts[column] = lambda v: f"{v:.2f}"
            fmts["context_tokens"] = lambda v: f"{v:.0f}"
            md.append(markdown_table(sub.drop(columns=["task", "baseline"]), fmts))
            legend = label_legend(varying_fields(group))
            if legend:
                md += [f"Settings: {legend}.", ""]
            png = plots.quality_vs_bits(group, task, out_dir / f"quality_vs_bits_{plots.slug(task)}{suffix}.png")
            if png:
                files.plots.append(png)
                md += [f"![{task}: quality vs bits]({png.name})", ""]

    md += ["## Deltas against full precision", ""]
    md += [
        "`delta` = quantized - full precision on the same samples; `ci_low`/`ci_high` bound the 95% "
        "paired bootstrap interval of the mean difference over `n` samples. An interval containing 0 "
        "means no measurable loss at this sample size.",
        "",
    ]
    deltas = tables.deltas
    if not deltas.empty:
        shown = deltas.copy()
        for column in (QUANTIZED, FULL_PRECISION, "delta", "ci_low", "ci_high"):
            shown[column] = [
                format_metric(m, v, signed=column in ("delta", "ci_low", "ci_high"))
                for m, v in zip(deltas["metric"], deltas[column], strict=True)
            ]
        md.append(markdown_table(shown, right={QUANTIZED, FULL_PRECISION, "delta", "ci_low", "ci_high"}))
    else:
        md += ["_No quality metrics._", ""]

    md += ["## Memory and speed", ""]
    md += [
        "`peak_cache_bytes` is the largest the cache got during the run (prefill included); "
        "`peak_ratio` divides it by the full-precision cache's peak on the same prompts.",
        "",
    ]
    md.append(markdown_table(tables.memory_speed, _memory_formatters()))
    png = plots.memory_vs_context(tables.memory_speed, runs, out_dir / "memory_vs_context.png")
    if png:
        files.plots.append(png)
        md += [f"![peak memory vs context length]({png.name})", ""]

    md += ["## Ablations", ""]
    if tables.ablations.empty:
        md += ["_No config field varies between runs of the same task: run `kvstream ablate` for curves._", ""]
    else:
        md += ["Mean over the runs that share each value (other fields may vary as well).", ""]
        ablations = tables.ablations
        for (task, baseline, name), sub in ablations.groupby(["task", "baseline", "field"], sort=True):
            suffix = _baseline_suffix(baseline, ablations.loc[ablations["task"] == task, "baseline"].nunique())
            own = f" ({baseline_label(runs[runs['baseline'] == baseline])})" if suffix else ""
            md += [f"### {task}: {name}{own}", ""]
            metric = str(sub["metric"].iloc[0])
            fmts = {
                QUANTIZED: lambda v, m=metric: format_metric(m, v),
                FULL_PRECISION: lambda v, m=metric: format_metric(m, v),
                "delta": lambda v, m=metric: format_metric(m, v, signed=True),
                "bits_per_element": lambda v: f"{v:.2f}",
            }
            md.append(markdown_table(sub.drop(columns=["task", "baseline", "field"]), fmts))
            png = plots.ablation_curve(
                sub, task, name, out_dir / f"ablation_{plots.slug(task)}_{plots.slug(name)}{suffix}.png"
            )
            if png:
                files.plots.append(png)
                md += [f"![{task}: {name}]({png.name})", ""]

    md += ["## Runs", ""]
    if not runs.empty:
        shown_fields = varying_fields(runs)
        overview = pd.DataFrame(
            {
                "run_id": runs["run_id"],
                "task": runs["task"],
                "model": runs["model"],
                "baseline": runs["baseline"].str[:BASELINE_SHOWN],
                "settings": [config_label(r, shown_fields) for r in runs.to_dict("records")],
                "metric": runs["metric"],
                **{
                    variant: [format_metric(m, v) for m, v in zip(runs["metric"], runs[variant], strict=True)]
                    for variant in VARIANTS
                },
                "bits_per_element": runs["bits_per_element"],
            }
        )
        md.append(markdown_table(overview, {"bits_per_element": lambda v: f"{v:.2f}"}, right=set(VARIANTS)))
        legend = label_legend(shown_fields)
        if legend:
            md += [f"Settings: {legend}.", ""]

    if export:
        files.exports = export_tables(tables, out_dir, export)
        md += ["## Exported tables", ""]
        md += [f"- [{p.name}]({p.name})" for p in files.exports]
        md.append("")

    files.markdown.write_text("\n".join(md).rstrip() + "\n")
    return files
