"""Where a results folder keeps each run and each full-precision baseline.

::

    <results>/<run_id>/rows.csv        tidy rows of both variants (`kvstream.schema.TIDY_COLUMNS`)
    <results>/<run_id>/summary.csv     one row per metric (`kvstream.schema.SUMMARY_COLUMNS`)
    <results>/<run_id>/manifest.json   configuration, options, provenance, timings
    <results>/_baseline/<slot>/rows.csv, meta.json
                                       full-precision rows shared by every run of the same slot
    <results>/.<name>.tmp-*            a folder being written (never read)

Names starting with ``.`` or ``_`` are never runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

BASELINE_DIR = "_baseline"
ROWS = "rows.csv"
SUMMARY = "summary.csv"
MANIFEST = "manifest.json"
BASELINE_META = "meta.json"
RUN_FILES = (ROWS, SUMMARY, MANIFEST)
BASELINE_FILES = (ROWS, BASELINE_META)


@dataclass(frozen=True)
class Layout:
    """The paths of one results folder."""

    root: Path

    def run_dir(self, run_id: str) -> Path:
        return self.root / run_id

    def baseline_dir(self, slot: str) -> Path:
        return self.root / BASELINE_DIR / slot

    def run_dirs(self) -> list[Path]:
        """Every folder that may hold a run (finished or not), sorted by name."""
        if not self.root.is_dir():
            return []
        return [d for d in sorted(self.root.iterdir()) if d.is_dir() and not d.name.startswith((".", "_"))]
