"""Rendering pandas tables with rich, or as CSV / JSON on stdout."""

from __future__ import annotations

import enum
import json
import math
from collections.abc import Callable
from typing import Any

import pandas as pd
from rich.console import Console
from rich.table import Table
from rich.text import Text

from kvstream.report.tables import format_metric, higher_is_better


class OutputFormat(str, enum.Enum):
    table = "table"
    csv = "csv"
    json = "json"


def _is_missing(value: Any) -> bool:
    try:
        return value is None or (isinstance(value, float) and math.isnan(value)) or bool(pd.isna(value))
    except (TypeError, ValueError):
        return False


def plain(value: Any) -> str:
    if _is_missing(value):
        return "-"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def short_run_id(run_id: str) -> str:
    """The config-hash part of ``task__model__confighash__optionshash`` (runs of one sweep share the rest)."""
    parts = str(run_id).split("__")
    return parts[2] if len(parts) == 4 else str(run_id)


def short_run_ids(run_ids: list[str]) -> list[str]:
    """The shortest unambiguous form of each id: the config hash, else hash/options hash, else the full id."""
    ids = [str(r) for r in run_ids]
    unique = set(ids)
    for make in (short_run_id, lambda r: "/".join(r.split("__")[2:]) if r.count("__") == 3 else r):
        shorts = [make(r) for r in ids]
        if len(set(shorts)) == len(unique):
            return shorts
    return ids


def with_short_ids(df: pd.DataFrame) -> pd.DataFrame:
    """``df`` with its ``run_id`` column replaced by a ``config`` column of short ids (for terminal tables)."""
    if "run_id" not in df.columns:
        return df
    out = df.copy()
    out.insert(list(out.columns).index("run_id"), "config", short_run_ids(list(out["run_id"])))
    return out.drop(columns="run_id")


def delta_text(metric: str, delta: Any) -> Text:
    """A signed delta, green when the quantized run is better, red when worse."""
    if _is_missing(delta):
        return Text("-", style="dim")
    text = format_metric(metric, delta, signed=True)
    if delta == 0:
        return Text(text, style="dim")
    better = (delta > 0) == higher_is_better(metric)
    return Text(text, style="green" if better else "red")


def summary_table(summary: pd.DataFrame, title: str | None = None) -> Table:
    """The runner's summary (metric, quantized, full_precision, delta, ci_low, ci_high, n) as a rich table."""
    table = Table(title=title, header_style="bold")
    table.add_column("metric")
    table.add_column("quantized", justify="right")
    table.add_column("full precision", justify="right")
    table.add_column("delta", justify="right")
    table.add_column("95% CI of delta", justify="right")
    table.add_column("n", justify="right", style="dim")
    previous_kind = None
    for rec in summary.to_dict("records"):
        metric = str(rec.get("metric"))
        kind = rec.get("kind")
        if previous_kind is not None and kind != previous_kind:
            table.add_section()
        previous_kind = kind
        low, high = rec.get("ci_low"), rec.get("ci_high")
        ci = (
            "-"
            if _is_missing(low) or _is_missing(high)
            else f"[{format_metric(metric, low, signed=True)}, {format_metric(metric, high, signed=True)}]"
        )
        n = rec.get("n")
        table.add_row(
            metric,
            format_metric(metric, rec.get("quantized")),
            format_metric(metric, rec.get("full_precision")),
            delta_text(metric, rec.get("delta")),
            ci,
            "-" if _is_missing(n) or kind == "resource" else str(int(n)),
        )
    return table


def frame_table(
    df: pd.DataFrame,
    title: str | None = None,
    *,
    formatters: dict[str, Callable[[Any], str | Text]] | None = None,
    row_styles: list[str] | None = None,
    caption: str | None = None,
    right: set[str] | None = None,
) -> Table:
    """Any DataFrame as a rich table; numbers (and ``right`` columns) right-aligned, ``formatters`` per column."""
    formatters = formatters or {}
    table = Table(title=title, header_style="bold", caption=caption)
    for column in df.columns:
        numeric = pd.api.types.is_numeric_dtype(df[column]) and not pd.api.types.is_bool_dtype(df[column])
        numeric = numeric or str(column) in (right or set())
        table.add_column(str(column), justify="right" if numeric else "left", overflow="fold")
    for i, rec in enumerate(df.to_dict("records")):
        cells = []
        for column in df.columns:
            fmt = formatters.get(column)
            value = rec[column]
            cells.append(fmt(value) if fmt and not _is_missing(value) else plain(value))
        table.add_row(*cells, style=row_styles[i] if row_styles else None)
    return table


def _jsonable(value: Any) -> Any:
    if _is_missing(value):
        return None
    if hasattr(value, "item"):
        return value.item()
    return value


def records(df: pd.DataFrame) -> list[dict[str, Any]]:
    return [{k: _jsonable(v) for k, v in rec.items()} for rec in df.to_dict("records")]


def emit(
    console: Console, df: pd.DataFrame, fmt: OutputFormat, extra: dict[str, Any] | None = None, key: str = "rows"
) -> None:
    """Write ``df`` to stdout as CSV, or as JSON: ``extra`` plus the records under ``key``."""
    if fmt is OutputFormat.csv:
        console.file.write(df.to_csv(index=False))
    elif fmt is OutputFormat.json:
        payload = {**(extra or {}), key: records(df)}
        console.file.write(json.dumps(payload, indent=2, default=str) + "\n")
