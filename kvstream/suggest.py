"""One "did you mean" for every name a user types: tasks, presets, model aliases, config fields."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


def closest(name: str, choices: Iterable[str]) -> str | None:
    """The known name ``name`` was most likely meant to be (a near miss), or None."""
    found = difflib.get_close_matches(name, sorted(choices), n=1, cutoff=0.6)
    return found[0] if found else None


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """``did you mean X? `` for a near miss of ``choices``, else an empty string (a message prefix)."""
    match = closest(name, choices)
    return f"did you mean {match}? " if match else ""
