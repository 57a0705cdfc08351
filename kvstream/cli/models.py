"""Loading the model a command runs: checked first, with a spinner, with transformers' own bars and warnings off."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from kvstream.cli.checks import check_device
from kvstream.cli.console import spinner


def load_bundle(
    model: str, device: str | None = None, dtype: str | None = None, device_map: Any = None
) -> tuple[Any, Any]:
    """``(model, tokenizer)`` through `kvstream.engine.load_model` on ``device`` (or spread by ``device_map``)
    in ``dtype``, with a spinner."""
    from kvstream import engine

    if device_map is None:
        check_device(device, dtype)
    with spinner(f"Loading model {model} ..."), _quiet_transformers():
        return engine.load_model(model, dtype=dtype, device=device, device_map=device_map)


@contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence transformers' own progress bars and warnings while loading (our spinner says it all)."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:  # transformers is a dependency; stay usable without it for the commands that do not load
        yield
        return
    bars_on = hf_logging.is_progress_bar_enabled()
    verbosity = hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars_on:
            hf_logging.enable_progress_bar()
