"""Writing a results folder in one rename with each file's size and checksum, and reading its files back typed."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd

from kvstream.schema import STRING_COLUMNS

Writer = Callable[[Path], None]
"""Writes one file at the path it is given."""


def write_dir_atomic(target: Path, files: dict[str, Writer]) -> None:
    """Create ``target`` holding ``files`` (name -> writer of that path) in one rename.

    The files are written into a temporary sibling folder first, so an interrupted write leaves
    nothing that looks finished; an existing ``target`` is moved aside and deleted only once the
    new folder is in place.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        tmp.chmod(folder_mode(target.parent, tmp))
        for name, writer in files.items():
            writer(tmp / name)
        old = None
        if target.exists():
            old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(target, old)
        os.replace(tmp, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def umask() -> int:
    """The process's umask (read from /proc where it is shown, so no other thread sees it changed)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def folder_mode(parent: Path, folder: Path) -> int:
    """The mode a new results folder gets: what ``mkdir`` would give under the umask, never narrower than its
    parent's permissions (a tree shared with a group stays readable, and writable, to it; never world-writable
    through the parent), special bits (a group-inheriting folder's) kept.

    ``tempfile.mkdtemp`` alone makes the folder readable by its owner only, whatever the umask.
    """
    return (0o777 & ~umask()) | (parent.stat().st_mode & 0o775) | (folder.stat().st_mode & 0o7000)


def csv_bytes(frame: pd.DataFrame) -> bytes:
    """A frame as the bytes of its CSV file (no index)."""
    return frame.to_csv(index=False).encode("utf-8")


def bytes_writer(data: bytes) -> Writer:
    def write(path: Path) -> None:
        path.write_bytes(data)

    return write


def file_record(data: bytes) -> dict[str, Any]:
    """Size and SHA-256 of a file's bytes, as a manifest records them."""
    return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def file_problem(path: Path, record: Any) -> str | None:
    """What is wrong with ``path`` against its `file_record` (missing, truncated, altered), or None."""
    if not isinstance(record, dict):
        return f"{path.name} has no size and checksum in the manifest"
    try:
        data = path.read_bytes()
    except OSError:
        return f"{path.name} missing"
    if len(data) < record.get("bytes", 0):
        return f"{path.name} truncated ({len(data)} of {record['bytes']} bytes)"
    if file_record(data) != {"bytes": record.get("bytes"), "sha256": record.get("sha256")}:
        return f"{path.name} altered (its checksum differs from the manifest's)"
    return None


def json_writer(data: Any) -> Writer:
    def write(path: Path) -> None:
        path.write_text(json.dumps(data, indent=2, default=str) + "\n", encoding="utf-8")

    return write


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def read_rows(path: Path) -> pd.DataFrame:
    """A ``rows.csv`` back as the tidy frame (empty strings kept, ids kept as text)."""
    frame = pd.read_csv(path, dtype={c: str for c in STRING_COLUMNS})
    for column in STRING_COLUMNS:
        if column in frame.columns:
            frame[column] = frame[column].fillna("").astype(str)
    if "value" in frame.columns:
        frame["value"] = frame["value"].astype(float)
    return frame


def read_summary(path: Path) -> pd.DataFrame:
    """A ``summary.csv`` back (identity columns as text)."""
    return pd.read_csv(path, dtype={"run_id": str, "task": str, "model": str, "metric": str})
