"""The results store: finished runs and shared full-precision baselines, read and written whole.

Every run's manifest (and every baseline's meta) records its key (`kvstream.results.keys`) and
the size and checksum of each file beside it. Before a stored run is skipped or a stored baseline
paired with new rows, `ResultsStore.check_run` / `ResultsStore.check_baseline` compare both with
what is on disk and with the current key; `ResultsStore.scan` sorts every run folder into intact
runs and damaged ones, each with what is wrong.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pandas as pd

from kvstream.results.io import (
    bytes_writer,
    csv_bytes,
    file_problem,
    file_record,
    json_writer,
    read_json,
    read_rows,
    read_summary,
    write_dir_atomic,
)
from kvstream.results.keys import FORMAT_VERSION, ResultKey
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


@dataclass(frozen=True)
class Check:
    """How a stored result stands against the key it is wanted for, and why, in a few words."""

    state: Literal["missing", "same", "changed", "damaged"]
    reason: str = ""

    @property
    def reusable(self) -> bool:
        return self.state == "same"

    def why(self) -> str:
        """Why a stored copy is not reused: ``prompts changed since it was stored``, ``damaged: ...``."""
        return f"damaged: {self.reason}" if self.state == "damaged" else f"{self.reason} since it was stored"


@dataclass(frozen=True)
class Damaged:
    """A run folder that cannot be read as a finished run, and what is wrong with it."""

    run_id: str
    problem: str


def _compare(meta: dict[str, Any], key: ResultKey) -> Check:
    changes = key.changes(meta["key"])
    return Check("changed", ", ".join(changes)) if changes else Check("same")


def _problem(folder: Path, meta_name: str, data_names: tuple[str, ...]) -> tuple[str | None, dict[str, Any]]:
    """What is wrong with a stored folder (None if nothing), and its manifest or meta as far as it was read."""
    try:
        meta = read_json(folder / meta_name)
    except FileNotFoundError:
        return f"{meta_name} missing", {}
    except (OSError, ValueError) as error:
        return f"{meta_name} unreadable ({error.__class__.__name__})", {}
    if not isinstance(meta, dict):
        return f"{meta_name} is not a JSON object", {}
    if meta.get("format") != FORMAT_VERSION or not isinstance(meta.get("key"), dict):
        return f"results format {meta.get('format')} (this kvstream reads format {FORMAT_VERSION})", meta
    files = meta.get("files") or {}
    for name in data_names:
        problem = file_problem(folder / name, files.get(name))
        if problem:
            return problem, meta
    return None, meta


class ResultsStore:
    """A results folder (see `kvstream.results.layout`)."""

    def __init__(self, root: str | Path) -> None:
        self.layout = Layout(Path(root))

    @property
    def root(self) -> Path:
        return self.layout.root

    # ------------------------------------------------------------------ runs

    def has_run(self, run_id: str) -> bool:
        """Whether the files of a finished run (rows, summary and manifest) are all under ``run_id``."""
        folder = self.layout.run_dir(run_id)
        return all((folder / name).is_file() for name in RUN_FILES)

    def run_problem(self, run_id: str) -> str | None:
        """What is wrong with the stored run ``run_id`` (a file missing, truncated, altered, ...), or None."""
        return _problem(self.layout.run_dir(run_id), MANIFEST, (ROWS, SUMMARY))[0]

    def check_run(self, run_id: str, key: ResultKey) -> Check:
        """Whether the stored run ``run_id`` is intact and was measured on ``key``."""
        folder = self.layout.run_dir(run_id)
        if not folder.is_dir():
            return Check("missing")
        problem, manifest = _problem(folder, MANIFEST, (ROWS, SUMMARY))
        return Check("damaged", problem) if problem else _compare(manifest, key)

    def scan(self) -> tuple[list[str], list[Damaged]]:
        """The intact runs and the damaged ones, each sorted by id."""
        intact, damaged = [], []
        for folder in self.layout.run_dirs():
            problem = self.run_problem(folder.name)
            if problem:
                damaged.append(Damaged(folder.name, problem))
            else:
                intact.append(folder.name)
        return intact, damaged

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
        """Store a run in one rename; ``manifest`` gains the size and checksum of each file (``files``)."""
        data = {ROWS: csv_bytes(rows), SUMMARY: csv_bytes(summary)}
        manifest["files"] = {name: file_record(blob) for name, blob in data.items()}
        writers = {name: bytes_writer(blob) for name, blob in data.items()}
        folder = self.layout.run_dir(run_id)
        write_dir_atomic(folder, {**writers, MANIFEST: json_writer(manifest)})
        return folder

    def rows(self, run_ids: list[str] | None = None) -> pd.DataFrame:
        """The tidy rows of ``run_ids`` (default: every intact run), concatenated (an empty frame when none)."""
        ids = self.scan()[0] if run_ids is None else run_ids
        frames = [read_rows(self.layout.run_dir(r) / ROWS) for r in ids if self.has_run(r)]
        frames = [f for f in frames if not f.empty]
        if not frames:
            return pd.DataFrame(columns=list(TIDY_COLUMNS))
        return pd.concat(frames, ignore_index=True)

    def summaries(self, run_ids: list[str] | None = None) -> pd.DataFrame:
        """The summaries of ``run_ids`` (default: every intact run), concatenated."""
        ids = self.scan()[0] if run_ids is None else run_ids
        frames = [read_summary(self.layout.run_dir(r) / SUMMARY) for r in ids if self.has_run(r)]
        frames = [f for f in frames if not f.empty]
        if not frames:
            return pd.DataFrame(columns=list(SUMMARY_COLUMNS))
        return pd.concat(frames, ignore_index=True)

    # ------------------------------------------------------------------ baselines

    def check_baseline(self, slot: str, key: ResultKey) -> Check:
        """Whether the baseline stored in ``slot`` is intact and was measured on ``key``."""
        folder = self.layout.baseline_dir(slot)
        if not folder.is_dir():
            return Check("missing")
        problem, meta = _problem(folder, BASELINE_META, (ROWS,))
        return Check("damaged", problem) if problem else _compare(meta, key)

    def read_baseline(self, slot: str) -> tuple[pd.DataFrame, dict[str, Any]]:
        """The full-precision rows stored in ``slot`` and their meta (check them first with `check_baseline`)."""
        folder = self.layout.baseline_dir(slot)
        return read_rows(folder / ROWS), read_json(folder / BASELINE_META)

    def write_baseline(self, slot: str, rows: pd.DataFrame, meta: dict[str, Any]) -> Path:
        """Store a baseline in one rename; ``meta`` gains the size and checksum of its rows (``files``)."""
        data = csv_bytes(rows)
        meta["files"] = {ROWS: file_record(data)}
        folder = self.layout.baseline_dir(slot)
        write_dir_atomic(folder, {ROWS: bytes_writer(data), BASELINE_META: json_writer(meta)})
        return folder
