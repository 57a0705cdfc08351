"""``kvstream report``: tidy tables, plots and report.md from the results store."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import pandas as pd
import typer
import yaml
from rich.text import Text

from kvstream.cli.config_fields import bits_changes, build_config, show_config
from kvstream.cli.console import note, out
from kvstream.cli.errors import CliError, handle_errors
from kvstream.cli.options import CONFIG_PANEL, complete_presets
from kvstream.cli.render import OutputFormat, frame_table, with_short_ids
from kvstream.config import resolve_config_path
from kvstream.report.tables import BASELINE_SHOWN, ReportTables, baseline_label, build_tables, format_metric
from kvstream.schema import FULL_PRECISION, QUANTIZED

EPILOG = (
    "[bold]Examples[/bold]\n"
    "  [cyan]kvstream report[/cyan]\n"
    "  [cyan]kvstream report --results runs --out site --format csv[/cyan]\n"
    "  [cyan]kvstream report --task passkey -c kivi-like[/cyan]   (runs with kivi-like's settings)\n"
    "\n"
    "Tables: quality vs effective bits per task, deltas against full precision with 95% bootstrap "
    "CIs, memory and speed, ablations (metric vs each config field that varies). Plots: quality vs "
    "bits per task, peak memory vs context length (runs at several --length), one curve per ablated "
    "field. report.md holds all of them; --format csv|json also exports every table. docs/guide.md "
    "explains how to read them."
)


def _filter_config(df: pd.DataFrame, config_file: str | None, bits: str | None) -> pd.DataFrame:
    """Runs whose config has the values of every field the config file names and ``--bits`` sets."""
    if not config_file and not bits:
        return df
    wanted = build_config(config_file, bits).to_dict()
    names: set[str] = set(bits_changes(config_file, bits))
    if config_file:
        data = yaml.safe_load(resolve_config_path(config_file).read_text()) or {}
        names |= {str(k) for k in data if k != "description"}
    quantized = df[df["variant"] == QUANTIZED] if "variant" in df.columns else df
    mask = pd.Series(True, index=quantized.index)
    for name in sorted(names):
        if name in quantized.columns:
            mask &= quantized[name].astype(str) == _text(wanted[name])
    return df[df["run_id"].isin(set(quantized.loc[mask, "run_id"]))]


def _text(value: object) -> str:
    """A config value as the results store writes it to CSV and reads it back as text."""
    return str(value)


@handle_errors
def report_command(
    results: Annotated[
        Path, typer.Option("--results", "-r", help="Results folder written by eval/ablate/tune.")
    ] = Path("results"),
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Folder for report.md, the PNGs and exports.")] = Path(
        "reports"
    ),
    fmt: Annotated[
        OutputFormat,
        typer.Option("--format", "-F", help="table: terminal + report.md; csv/json: also export every table."),
    ] = OutputFormat.table,
    task: Annotated[
        list[str] | None, typer.Option("--task", "-t", metavar="TASK", help="Only these tasks (repeatable).")
    ] = None,
    config: Annotated[
        str | None,
        typer.Option(
            "--config",
            "-c",
            metavar="FILE|PRESET",
            help="Only runs with the settings this YAML file or preset lists.",
            autocompletion=complete_presets,
            rich_help_panel=CONFIG_PANEL,
        ),
    ] = None,
    bits: Annotated[
        str | None,
        typer.Option(
            "--bits", "-b", metavar="N/M", help="Only runs with these bit widths.", rich_help_panel=CONFIG_PANEL
        ),
    ] = None,
) -> None:
    """Build tables and plots from every stored run and write report.md."""
    if not results.is_dir():
        raise CliError(f"no results folder {results}: run `kvstream eval --task passkey` first or pass --results DIR")
    from kvstream.report.markdown import write_report
    from kvstream.results import ResultsStore

    store = ResultsStore(results)
    intact, damaged = store.scan()
    df = store.rows(intact)
    if task:
        df = df[df["task"].isin(task)] if not df.empty else df
    df = _filter_config(df, config, bits) if not df.empty else df
    if df.empty:
        what = f" for task(s) {', '.join(task)}" if task else ""
        what += " with that config" if config or bits else ""
        if damaged:
            what += f" ({len(damaged)} damaged, {damaged[0].run_id}: {damaged[0].problem})"
        raise CliError(f"no runs in {results}{what}: run `kvstream eval` or `kvstream ablate` first")
    for broken in damaged:
        note(
            Text(
                f"damaged run {broken.run_id}: {broken.problem} (left out; `kvstream eval` or `ablate` re-runs it)",
                style="yellow",
            )
        )

    console = out()
    if config or bits:
        show_config(build_config(config, bits), config, console=console)
    tables = build_tables(df)
    export = None if fmt is OutputFormat.table else fmt.value
    files = write_report(df, out_dir, tables=tables, source=results, export=export, damaged=damaged)

    render_tables(console, tables)
    console.print(
        Text.assemble(("report: ", "bold"), (str(files.markdown), "underline"), f"  ({len(files.plots)} plot(s))"),
        soft_wrap=True,
    )
    for path in files.exports:
        note(f"exported {path}", console=console)


MEMORY_COLUMNS = {
    "run_id": "run_id",
    "task": "task",
    "context_tokens": "tokens",
    "bits_per_element": "bits",
    "prefill_bits_per_element": "prefill bits",
    "peak_cache_bytes": "peak cache",
    "fp_peak_cache_bytes": "fp peak",
    "peak_ratio": "peak ratio",
    "prefill_seconds": "prefill",
    "fp_prefill_seconds": "fp prefill",
    "decode_seconds_per_token": "decode/token",
    "fp_decode_seconds_per_token": "fp decode/token",
}


def _bits_range(low: float, high: float) -> str:
    """The per-sample range of a run's effective bits, ``4.41-4.62`` (``-`` when not recorded)."""
    return f"{low:.2f}-{high:.2f}" if pd.notna(low) and pd.notna(high) else "-"


def render_tables(console: Any, tables: ReportTables) -> None:
    """The report's tables in the terminal: short run ids (config hashes), compact config labels, one quality
    table per task and baseline (runs measured against different baselines are not compared)."""
    quality = tables.quality
    for (t, baseline), group in quality.groupby(["task", "baseline"], sort=True):
        several = quality.loc[quality["task"] == t, "baseline"].nunique() > 1
        sub = with_short_ids(group.drop(columns=["task", "baseline"]))
        if sub["model"].nunique() <= 1:
            sub = sub.drop(columns=["model"])
        metric = str(sub["metric"].iloc[0])
        ranges = [_bits_range(low, high) for low, high in zip(sub["bits_min"], sub["bits_max"], strict=True)]
        sub = sub.assign(range=ranges).drop(columns=["metric", "bits_min", "bits_max"])
        sub = sub.rename(
            columns={"bits_per_element": "bits", "prefill_bits_per_element": "prefill bits", "context_tokens": "tokens"}
        )
        own = f" ({baseline_label(tables.runs[tables.runs['baseline'] == baseline])})" if several else ""
        console.print(
            frame_table(
                sub,
                title=f"{t}: {metric} vs effective bits{own}",
                formatters={
                    QUANTIZED: lambda v, m=metric: format_metric(m, v),
                    FULL_PRECISION: lambda v, m=metric: format_metric(m, v),
                    "delta": lambda v, m=metric: format_metric(m, v, signed=True),
                    "bits": lambda v: f"{v:.2f}",
                    "prefill bits": lambda v: f"{v:.2f}",
                    "tokens": lambda v: f"{v:.0f}",
                },
            )
        )
    deltas = tables.deltas
    if not deltas.empty:
        shown = deltas.copy()
        for column in (QUANTIZED, FULL_PRECISION, "delta", "ci_low", "ci_high"):
            shown[column] = [
                format_metric(m, v, signed=column in ("delta", "ci_low", "ci_high"))
                for m, v in zip(deltas["metric"], deltas[column], strict=True)
            ]
        console.print(
            frame_table(
                with_short_ids(shown),
                title="Deltas against full precision (95% paired bootstrap CI)",
                right={QUANTIZED, FULL_PRECISION, "delta", "ci_low", "ci_high"},
            )
        )
    memory = tables.memory_speed[list(MEMORY_COLUMNS)].rename(columns=MEMORY_COLUMNS)
    formatters = {
        "tokens": lambda v: f"{v:.0f}",
        "bits": lambda v: f"{v:.2f}",
        "prefill bits": lambda v: f"{v:.2f}",
        "peak cache": lambda v: format_metric("peak_cache_bytes", v),
        "fp peak": lambda v: format_metric("peak_cache_bytes", v),
        "peak ratio": lambda v: f"{v:.3f}",
    }
    for column in ("prefill", "fp prefill", "decode/token", "fp decode/token"):
        formatters[column] = lambda v: format_metric("prefill_seconds", v)
    console.print(frame_table(with_short_ids(memory), title="Memory and speed", formatters=formatters))
    if not tables.ablations.empty:
        ablations = tables.ablations.assign(baseline=tables.ablations["baseline"].str[:BASELINE_SHOWN])
        console.print(
            frame_table(
                ablations if ablations["baseline"].nunique() > 1 else ablations.drop(columns=["baseline"]),
                title="Ablations (mean per value)",
                formatters={"bits_per_element": lambda v: f"{v:.2f}"},
            )
        )
