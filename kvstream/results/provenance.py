"""Where a result came from: library versions and the revision of the kvstream source tree."""

from __future__ import annotations

import importlib.metadata as md
import platform
import subprocess
from pathlib import Path


def _version(distribution: str) -> str | None:
    try:
        return md.version(distribution)
    except md.PackageNotFoundError:
        return None


def library_versions() -> dict[str, str | None]:
    """Versions of kvstream, torch, transformers, pandas, numpy and Python."""
    import numpy as np
    import pandas as pd
    import torch
    import transformers

    import kvstream

    return {
        "kvstream": getattr(kvstream, "__version__", None) or _version("kvstream"),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "pandas": pd.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
    }


def _read_git_dir(root: Path) -> str | None:
    git = root / ".git"
    if git.is_file():
        text = git.read_text().strip()
        if not text.startswith("gitdir:"):
            return None
        git = (root / text.split(":", 1)[1].strip()).resolve()
    if not (git / "HEAD").is_file():
        return None
    head = (git / "HEAD").read_text().strip()
    if not head.startswith("ref:"):
        return head or None
    ref = head.split(":", 1)[1].strip()
    common = git
    if (git / "commondir").is_file():
        common = (git / (git / "commondir").read_text().strip()).resolve()
    for base in (git, common):
        path = base / ref
        if path.is_file():
            return path.read_text().strip() or None
    packed = common / "packed-refs"
    if packed.is_file():
        for line in packed.read_text().splitlines():
            parts = line.split()
            if len(parts) == 2 and parts[1] == ref:
                return parts[0]
    return None


def git_revision() -> str | None:
    """The commit of the kvstream source tree, when it is a git checkout (else None)."""
    root = Path(__file__).resolve().parent.parent.parent
    try:
        found = _read_git_dir(root)
    except OSError:
        found = None
    if found:
        return found
    if not (root / ".git").exists():
        return None
    try:
        done = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if done.returncode != 0:
        return None
    return done.stdout.strip() or None
