"""Checks of what a command was asked, made before any work so a mistake costs one line and no time."""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from typing import Any

from typer._click.exceptions import UsageError

from kvstream.cli.errors import CliError
from kvstream.config import CompressionConfig
from kvstream.registry import PluginError


def check_device(device: str | None, dtype: str | None) -> None:
    """Refuse an unknown or absent device and an unknown dtype before any work (one line, exit 2)."""
    from kvstream.engine.model import resolve_device, resolve_dtype

    try:
        resolve_dtype(dtype, resolve_device(device))
    except ValueError as error:
        raise UsageError(str(error)) from error


def check_config_for_model(config: CompressionConfig, model: Any) -> None:
    """Refuse a config the model cannot run (value groups vs head size, unknown strategies) before any work."""
    from kvstream.engine import model_geometry

    check_strategies(config)
    config.validate(head_dim=model_geometry(model).head_dim)


def check_strategies(config: CompressionConfig) -> None:
    """The cache, quantizer and stats manager ``config`` names exist and load (a `PluginError` if not)."""
    from kvstream.registry import registry

    registry("caches").get(config.cache)
    if config.cache != "full":
        registry("quantizers").get(config.quantizer)
        registry("stats").get(config.stats)


def check_task(task: str) -> Any:
    """The registered task object, or a `PluginError` listing the known ones."""
    from kvstream.registry import registry
    from kvstream.suggest import did_you_mean

    tasks = registry("tasks")
    if task not in tasks.names():
        hint = did_you_mean(task, tasks.names())
        if hint:
            raise PluginError(f"unknown task {task!r}: {hint}(`kvstream plugins -g tasks` lists them)")
    return tasks.get(task)


def task_options(
    samples: int | None,
    length: int | None,
    seed: int,
    corpus: str | None,
    depths: list[float] | None = None,
    data_dir: Path | None = None,
) -> Any:
    from kvstream.tasks.base import TaskOptions

    if samples is not None and samples < 1:
        raise CliError(f"--samples: must be at least 1, got {samples}")
    if length is not None and length < 1:
        raise CliError(f"--length: must be at least 1 token, got {length}")
    for depth in depths or []:
        if not 0.0 <= depth <= 1.0:
            raise CliError(f"--depth: {depth} is not in [0, 1] (0 = start of the context, 1 = its end)")
    check_corpus(corpus)
    return TaskOptions(
        samples=samples,
        length=length,
        seed=seed,
        corpus=corpus,
        depths=list(depths) if depths else None,
        data_dir=str(data_dir) if data_dir else None,
    )


_CONTROL = re.compile(r"[\x00-\x08\x0e-\x1f\x7f-\x9f]")
"""Control characters other than the whitespace ones (tab, newlines, vertical tab, form feed)."""


MAX_CONTROL_SHARE = 0.1
"""A corpus with a larger share of control characters is binary data, not text."""


def text_problem(data: bytes) -> str | None:
    """Why ``data`` is not text (not UTF-8, or more than `MAX_CONTROL_SHARE` control characters), or None."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        return f"not valid UTF-8 (byte {error.start})"
    control = len(_CONTROL.findall(text))
    if text and control / len(text) > MAX_CONTROL_SHARE:
        return f"{control / len(text):.0%} control characters"
    return None


def check_corpus(corpus: str | None) -> None:
    """Refuse a ``--corpus`` file, or a ``.txt`` in a ``--corpus`` folder, that is not text (corpus names pass)."""
    if corpus is None:
        return
    path = Path(corpus).expanduser()
    files = sorted(path.glob("*.txt")) if path.is_dir() else [path] if path.is_file() else []
    for file in files:
        problem = text_problem(file.read_bytes())
        if problem:
            raise CliError(f"--corpus: {file} is not text ({problem}); give a UTF-8 text file or a corpus name")


def check_results_dir(results: Path) -> None:
    """Refuse a ``--results`` that is a file or a folder this user cannot write, before the first run.

    The folder (or, when it does not exist yet, its nearest existing parent) gets a probe file
    created and deleted in it; nothing is left behind, and a missing folder is not created here.
    """
    path = Path(results).expanduser()
    existing = next(p for p in (path, *path.absolute().parents) if p.exists())
    if not existing.is_dir():
        where = "" if existing == path else f" ({existing} is a file)"
        raise CliError(f"--results: {path} is not a folder{where}; give a folder for the results")
    try:
        handle, probe = tempfile.mkstemp(prefix=".kvstream-probe-", dir=existing)
    except OSError as error:
        reason = error.strerror or error.__class__.__name__
        raise CliError(f"--results: {path} is not writable ({reason} in {existing}); choose another folder") from None
    os.close(handle)
    os.unlink(probe)


def model_positions(model: str) -> int | None:
    """The model's ``max_position_embeddings`` from its ``config.json`` (no weights loaded); None when unknown."""
    from transformers import AutoConfig

    from kvstream.data.models import resolve_model

    try:
        config = AutoConfig.from_pretrained(resolve_model(model)).get_text_config(decoder=True)
    except (OSError, ValueError):  # a config transformers cannot read: loading the model reports it
        return None
    positions = getattr(config, "max_position_embeddings", None)
    return positions if isinstance(positions, int) and positions > 0 else None


def check_positions(model: str, length: int | None, option: str = "--length") -> None:
    """Refuse a token length (``--length``, ``--max-new-tokens``) beyond the model's positions, before loading it."""
    if length is None:
        return
    positions = model_positions(model)
    if positions is not None and length > positions:
        raise CliError(
            f"{option} {length} is beyond the {positions} positions of model {model} "
            f"(max_position_embeddings): use at most {positions}"
        )
