"""Where a result came from: library versions and the revision of the kvstream source tree."""

from __future__ import annotations

import platform
import subprocess
from pathlib import Path
from typing import Any

UNKNOWN = "unknown"


def library_versions() -> dict[str, str]:
    """Versions of kvstream, torch, transformers, pandas, numpy and Python."""
    import numpy as np
    import pandas as pd
    import torch
    import transformers

    import kvstream

    return {
        "kvstream": kvstream.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "pandas": pd.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
    }


def code_revision(package_dir: Path | None = None) -> dict[str, Any]:
    """``{"commit": sha, "dirty": bool}`` of the git checkout holding the kvstream package.

    ``dirty`` is whether any file under the package differs from the commit (untracked ones
    included). Both are ``"unknown"`` when the package is not tracked by git (an installed wheel)
    or git cannot be run.
    """
    import kvstream

    folder = package_dir or Path(kvstream.__file__).resolve().parent

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", *args], cwd=folder, capture_output=True, text=True, timeout=10, check=False)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    tracked = git("ls-files", "--", "__init__.py")
    commit = git("rev-parse", "HEAD") if tracked else None
    if not commit:
        return {"commit": UNKNOWN, "dirty": UNKNOWN}
    status = git("status", "--porcelain", "--", ".")
    return {"commit": commit, "dirty": UNKNOWN if status is None else bool(status)}


def short_revision(revision: dict[str, Any]) -> str:
    """A `code_revision` as people read it: ``abc1234``, ``abc1234+dirty`` or ``unknown``."""
    commit = str(revision.get("commit", UNKNOWN))
    if commit == UNKNOWN:
        return UNKNOWN
    return commit[:7] + ("+dirty" if revision.get("dirty") is True else "")
