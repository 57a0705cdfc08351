"""Names of stored results: a run's id and the slot of its full-precision baseline, both deterministic."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from typing import Any

FORMAT_VERSION = 1
"""Version of the stored layout; a result of another version is not read as current."""


def digest(value: Any, length: int = 16) -> str:
    """Hex SHA-256 of ``value`` as canonical JSON, cut to ``length`` digits."""
    blob = json.dumps(value, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:length]


def slug(text: str, limit: int = 60) -> str:
    """A filesystem-safe form of ``text``; a short hash is appended when characters had to change."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.") or "x"
    if safe != text or len(safe) > limit:
        safe = f"{safe[:limit]}-{digest(text, 6)}"
    return safe


def options_dict(options: Any) -> dict[str, Any]:
    """Task options (a dataclass) as a plain dict."""
    return dataclasses.asdict(options)


def options_hash(options: Any) -> str:
    """Stable short hash of the task options."""
    return digest(options_dict(options), 8)


def run_id(task: str, model: str, config_hash: str, options: Any) -> str:
    """``<task>__<model>__<config hash>__<options hash>``: the folder name of a run."""
    return f"{slug(task)}__{slug(model)}__{config_hash}__{options_hash(options)}"


def baseline_slot(task: str, model: str, options: Any) -> str:
    """Folder name under ``_baseline/`` of the full-precision rows for (task, model, options)."""
    key = {"task": task, "model": model, "options": options_dict(options), "format": FORMAT_VERSION}
    return f"{slug(task)}__{slug(model)}__{digest(key)}"
