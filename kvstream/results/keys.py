"""Names and keys of stored results.

A run's *id* (its folder) and its baseline's *slot* name what was asked for: task, model name,
config and task options. A `ResultKey` says what it was measured on: the prompts' token ids, the
generation settings, the model's files, dtype, device, the baseline's prefill chunk size and the
library versions. A stored result is reused only when its key equals the current one; otherwise
`ResultKey.changes` names what differs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

FORMAT_VERSION = 2
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
    name = {"task": task, "model": model, "options": options_dict(options), "format": FORMAT_VERSION}
    return f"{slug(task)}__{slug(model)}__{digest(name)}"


LABELS = {
    "task": "task",
    "prompts": "prompts",
    "generation": "generation settings",
    "model": "model files",
    "dtype": "dtype",
    "device": "device",
    "baseline_chunk_size": "baseline prefill chunk size",
    "torch": "torch version",
    "transformers": "transformers version",
    "kvstream": "kvstream version",
    "config": "config",
}
"""How a changed key component is named to the user."""

HASHED = {"prompts", "generation", "model", "config"}
"""Components that are hashes: a change is named, not shown."""


@dataclass(frozen=True)
class ResultKey:
    """What a stored result was measured on; ``config`` is empty for a full-precision baseline."""

    task: str
    prompts: str
    """Hash of every sample's id, prompt token ids and gold answers."""
    generation: str
    """Hash of the decoding settings (greedy, end-of-sequence ids, new tokens per sample)."""
    model: str
    """Hash of the model's files (weights, config, tokenizer); see `kvstream.results.fingerprint`."""
    dtype: str
    device: str
    baseline_chunk_size: int
    torch: str
    transformers: str
    kvstream: str
    config: str = ""
    """Config hash of the quantized variant."""

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def digest(self) -> str:
        return digest(self.as_dict())

    def baseline(self) -> ResultKey:
        """The key of the full-precision baseline this result pairs with."""
        return dataclasses.replace(self, config="")

    def changes(self, stored: Mapping[str, Any]) -> list[str]:
        """What differs in ``stored`` (a key as saved): ``["prompts changed", "dtype changed (a -> b)"]``."""
        out = []
        for name, value in self.as_dict().items():
            old = stored.get(name)
            if old is None or str(old) != str(value):
                shown = "" if name in HASHED or old is None else f" ({old} -> {value})"
                out.append(f"{LABELS[name]} changed{shown}")
        return out
