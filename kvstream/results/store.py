"""The results store: finished runs and shared full-precision baselines, read and written whole."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from kvstream.results.io import csv_writer, json_writer, read_json, read_rows, read_summary, write_dir_atomic
from kvstream.results.keys import FORMAT_VERSION
from kvstream.results.layout import BASELINE_META, MANIFEST, ROWS, RUN_FILES, SUMMARY, Layout
from kvstream.schema import SUMMARY_COLUMNS, TIDY_COLUMNS


@dataclass
class StoredRun:
    """One run: its tidy rows of both variants, its summary, its manifest and its folder."""

    run_id: str
    rows: pd.DataFrame
    summary: pd.DataFrame
    manifest: dict[str, Any]
    path: Path


class ResultsStore:
    """A results folder (see `kvstream.results.layout`)."""

    def __init__(self, root: str | Path) -> None:
        self.layout = Layout(Path(root))

    @property
    def root(self) -> Path:
        return self.layout.root

    # ------------------------------------------------------------------ runs

    def has_run(self, run_id: str) -> bool:
        """Whether a finished run (rows, summary and manifest) is stored under ``run_id``."""
        folder = self.layout.run_dir(run_id)
        return all((folder / name).is_file() for name in RUN_FILES)

    def run_ids(self) -> list[str]:
        """The finished runs, sorted by id."""
        return [d.name for d in self.layout.run_dirs() if self.has_run(d.name)]

    def read_run(self, run_id: str) -> StoredRun:
        folder = self.layout.run_dir(run_id)
        if not self.has_run(run_id):
            raise FileNotFoundError(f"no finished run {run_id!r} in {self.root}")
        return StoredRun(
            run_id=run_id,
            rows=read_rows(folder / ROWS),
            summary=read_summary(folder / SUMMARY),
            manifest=read_json(folder / MANIFEST),
            path=folder,
        )

    def write_run(self, run_id: str, rows: pd.DataFrame, summary: pd.DataFrame, manifest: dict[str, Any]) -> Path:
        folder = self.layout.run_dir(run_id)
        write_dir_atomic(
            folder, {ROWS: csv_writer(rows), SUMMARY: csv_writer(summary), MANIFEST: json_writer(manifest)}
        )
        return folder

    def rows(self) -> pd.DataFrame:
        """Every finished run's tidy rows, concatenated (an empty frame when none)."""
        frames = [read_rows(self.layout.run_dir(r) / ROWS) for r in self.run_ids()]
        frames = [f for f in frames if not f.empty]
        if not frames:
            return pd.DataFrame(columns=list(TIDY_COLUMNS))
        return pd.concat(frames, ignore_index=True)

    def summaries(self) -> pd.DataFrame:
        """Every finished run's summary, concatenated."""
        frames = [read_summary(self.layout.run_dir(r) / SUMMARY) for r in self.run_ids()]
        frames = [f for f in frames if not f.empty]
        if not frames:
            return pd.DataFrame(columns=list(SUMMARY_COLUMNS))
        return pd.concat(frames, ignore_index=True)

    # ------------------------------------------------------------------ baselines

    def read_baseline(self, slot: str, sample_ids: list[str]) -> pd.DataFrame | None:
        """The full-precision rows stored in ``slot`` for exactly these samples, else None."""
        folder = self.layout.baseline_dir(slot)
        try:
            meta = read_json(folder / BASELINE_META)
            if meta.get("format") != FORMAT_VERSION or meta.get("samples") != sample_ids:
                return None
            return read_rows(folder / ROWS)
        except (OSError, ValueError):
            return None

    def write_baseline(self, slot: str, rows: pd.DataFrame, meta: dict[str, Any]) -> Path:
        folder = self.layout.baseline_dir(slot)
        write_dir_atomic(folder, {ROWS: csv_writer(rows), BASELINE_META: json_writer(meta)})
        return folder
