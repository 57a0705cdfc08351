"""Tidy tables, plots and a markdown report built from the results store (`kvstream.results.ResultsStore.rows`)."""

from kvstream.report.markdown import markdown_table, write_report
from kvstream.report.tables import (
    ReportTables,
    build_tables,
    format_metric,
    higher_is_better,
    is_quality_metric,
    primary_metric,
    run_table,
)

__all__ = [
    "ReportTables",
    "build_tables",
    "format_metric",
    "higher_is_better",
    "is_quality_metric",
    "markdown_table",
    "primary_metric",
    "run_table",
    "write_report",
]
