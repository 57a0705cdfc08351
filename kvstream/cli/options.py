"""The options of the command line, each declared once: single options (``--config``, ``--bits``,
``--format``, ``--results``), their completions, and groups several commands share.

A command lists a group as one keyword-only parameter annotated with the group's class
(``model: ModelOptions``); `with_option_groups` shows the group's fields to Typer as ordinary
options, in their help panel, and hands the command one instance built from them. `--help`
therefore lists every option with its own help, and a change to a shared option is made here.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import MISSING, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar, get_type_hints

import typer
from typer._click.exceptions import UsageError

from kvstream.cli.checks import check_device, task_options
from kvstream.cli.models import load_bundle
from kvstream.cli.render import OutputFormat
from kvstream.config import CONFIG_DIR
from kvstream.data.models import DEFAULT_MODEL
from kvstream.executors import ExecutorSettings, Resources

if TYPE_CHECKING:
    from kvstream.engine.placement import DeviceMap
    from kvstream.eval.jobs import ModelSource
    from kvstream.tasks.base import TaskOptions

F = TypeVar("F", bound=Callable[..., Any])
MODEL_PANEL = "Model"
TASK_PANEL = "Task inputs"
EXECUTOR_PANEL = "Where runs execute"
CONFIG_PANEL = "Compression config"


def complete_presets(incomplete: str) -> list[str]:
    """Shell completion of ``--config``: the preset names in configs/."""
    names = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
    return [n for n in names if n.startswith(incomplete)]


def complete_group(group: str) -> Callable[[str], list[str]]:
    """Shell completion of the strategies registered in ``group`` (never failing loudly)."""

    def complete(incomplete: str) -> list[str]:
        from kvstream.registry import registry

        try:
            names = registry(group).names()
        except Exception:  # completion must never fail loudly
            return []
        return [n for n in names if n.startswith(incomplete)]

    return complete


complete_tasks = complete_group("tasks")


ConfigOpt = Annotated[
    str | None,
    typer.Option(
        "--config",
        "-c",
        metavar="FILE|PRESET",
        help="YAML config file, or a preset name from configs/ (base, kivi-like, kvquant-like, ...).",
        autocompletion=complete_presets,
        rich_help_panel=CONFIG_PANEL,
    ),
]
BitsOpt = Annotated[
    str | None,
    typer.Option(
        "--bits",
        "-b",
        metavar="N/M",
        help="N bits for normal keys and values, M for sink tokens and outliers (`--bits 4` keeps M). "
        "Without --config, N = 2 or 3 also brings the strategy measured best at that width (rotated values "
        "with Lloyd-Max levels); --config base keeps plain uniform codes.",
        rich_help_panel=CONFIG_PANEL,
    ),
]
FormatOpt = Annotated[OutputFormat, typer.Option("--format", "-F", help="How to print the summary.")]
ResultsOpt = Annotated[Path, typer.Option("--results", "-r", help="Results folder (one sub-folder per run).")]


class OptionGroup:
    """Base of a dataclass whose fields are Typer options (``Annotated[type, typer.Option(...)] = default``)."""


def rewrite_signature(
    func: Callable[..., Any], params: list[inspect.Parameter], call: Callable[[dict[str, Any]], dict[str, Any]]
) -> Callable[..., Any]:
    """``func`` as Typer sees it with ``params`` (all keyword-only), called with ``call(kwargs)``."""
    names = [p.name for p in params]
    clashes = {n for n in names if names.count(n) > 1}
    if clashes:
        raise RuntimeError(f"{func.__name__}: option names given twice: {', '.join(sorted(clashes))}")

    @functools.wraps(func)
    def wrapper(**kwargs: Any) -> Any:
        return func(**call(kwargs))

    keyword = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in params]
    wrapper.__signature__ = inspect.Signature(keyword)  # type: ignore[attr-defined]
    wrapper.__annotations__ = {p.name: p.annotation for p in keyword}
    return wrapper


def with_option_groups(func: F) -> F:
    """Expand every parameter annotated with an `OptionGroup` class into the group's options."""
    hints = get_type_hints(func, include_extras=True)
    params: list[inspect.Parameter] = []
    groups: dict[str, tuple[type[OptionGroup], list[str]]] = {}
    for name, param in inspect.signature(func).parameters.items():
        hint = hints.get(name, param.annotation)
        if isinstance(hint, type) and issubclass(hint, OptionGroup):
            group_hints = get_type_hints(hint, include_extras=True)
            members = fields(hint)  # type: ignore[arg-type]
            for f in members:
                default = f.default if f.default is not MISSING else f.default_factory()  # type: ignore[misc]
                params.append(
                    inspect.Parameter(
                        f.name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=group_hints[f.name]
                    )
                )
            groups[name] = (hint, [f.name for f in members])
        else:
            params.append(param.replace(annotation=hint))

    def call(kwargs: dict[str, Any]) -> dict[str, Any]:
        for name, (cls, members) in groups.items():
            kwargs[name] = cls(**{m: kwargs.pop(m) for m in members if m in kwargs})
        return kwargs

    return rewrite_signature(func, params, call)  # type: ignore[return-value]


@dataclass(frozen=True)
class ModelOptions(OptionGroup):
    """The model a command loads and where it runs: one device, or a device map over several."""

    model: Annotated[
        str,
        typer.Option(
            "--model",
            "-m",
            help="Model alias (smollm2-135m), local folder, .gguf file or Hub id.",
            rich_help_panel=MODEL_PANEL,
        ),
    ] = DEFAULT_MODEL
    device: Annotated[
        str | None,
        typer.Option(
            "--device",
            help="Where the model runs: cpu, cuda, cuda:N \\[default: cuda when present, else cpu].",
            rich_help_panel=MODEL_PANEL,
            show_default=False,
        ),
    ] = None
    dtype: Annotated[
        str | None,
        typer.Option(
            "--dtype",
            help="float32, bfloat16 or float16 \\[default: float32 on cpu, bfloat16 on cuda].",
            rich_help_panel=MODEL_PANEL,
            show_default=False,
        ),
    ] = None
    device_map: Annotated[
        str | None,
        typer.Option(
            "--device-map",
            metavar="MAP",
            help="Spread the layers over devices (accelerate): auto, balanced, sequential, or a JSON object "
            'or file mapping modules to a GPU index, cpu or disk, e.g. {"model.layers.0": 0, "lm_head": "cpu"}. '
            "Replaces --device.",
            rich_help_panel=MODEL_PANEL,
            show_default=False,
        ),
    ] = None

    @property
    def label(self) -> str:
        """The model as a title names it: ``smollm2-135m``, plus the device, dtype and device map given on the
        command line, ``smollm2-135m (cuda, bfloat16)``; the defaults (None here) are left unsaid."""
        given = [part for part in (self.device, self.dtype) if part is not None]
        if self.device_map is not None:
            given.append(f"device map {self.device_map}")
        return f"{self.model} ({', '.join(given)})" if given else self.model

    def parsed_map(self, here: bool = True) -> DeviceMap | None:
        from kvstream.engine.placement import parse_device_map

        try:
            return parse_device_map(self.device_map, here=here)
        except ValueError as error:
            raise UsageError(str(error)) from None

    def check(self, here: bool = True) -> None:
        """Refuse an unknown dtype, an absent device or a bad device map before any work (one line, exit 2).

        ``here=False``: the model runs on other machines (Ray workers), so devices are checked for their
        form only, not for being on this one.
        """
        if self.device is not None and self.device_map is not None:
            raise UsageError("give --device or --device-map, not both (a device map names every module's device)")
        from kvstream.engine.placement import main_device

        device_map = self.parsed_map(here)
        device = self.device if device_map is None else str(main_device(device_map))
        if here:
            check_device(device, self.dtype)
            return
        import torch

        from kvstream.engine.model import resolve_dtype

        try:
            target = torch.device(device or "cpu")
        except (RuntimeError, TypeError):
            raise UsageError(f"device: {device!r} is not a torch device (cpu, cuda, cuda:1, ...)") from None
        try:
            resolve_dtype(self.dtype, target)
        except ValueError as error:
            raise UsageError(str(error)) from None

    def load(self) -> tuple[Any, Any]:
        """``(model, tokenizer)`` in this process, with a spinner."""
        return load_bundle(self.model, self.device, self.dtype, self.parsed_map())

    def source(self) -> ModelSource:
        """What a job (here or on a worker) loads."""
        from kvstream.eval.jobs import ModelSource

        return ModelSource.of(self.model, self.device, self.dtype, self.parsed_map(here=False))


@dataclass(frozen=True)
class TaskInputs(OptionGroup):
    """What the task's samples are made of (`kvstream.tasks.base.TaskOptions`)."""

    samples: Annotated[
        int | None, typer.Option("--samples", "-n", help="At most this many samples.", rich_help_panel=TASK_PANEL)
    ] = None
    length: Annotated[
        int | None,
        typer.Option(
            "--length", "-l", help="Context length in tokens (synthetic tasks, perplexity).", rich_help_panel=TASK_PANEL
        ),
    ] = None
    seed: Annotated[int, typer.Option("--seed", help="Seed of the sample generator.", rich_help_panel=TASK_PANEL)] = 0
    corpus: Annotated[
        str | None,
        typer.Option("--corpus", help="Haystack / perplexity text: a corpus name or file.", rich_help_panel=TASK_PANEL),
    ] = None
    depth: Annotated[
        list[float] | None,
        typer.Option(
            "--depth",
            metavar="D",
            help="Needle depth in [0, 1]; repeat for several.",
            show_default=False,
            rich_help_panel=TASK_PANEL,
        ),
    ] = None
    data_dir: Annotated[
        Path | None,
        typer.Option("--data-dir", help="Where downloaded data sets live.", rich_help_panel=TASK_PANEL),
    ] = None

    def options(self, defaults: dict[str, Any] | None = None) -> TaskOptions:
        """The task options, checked; ``defaults`` (a preset's) fill the samples and length left out."""
        defaults = defaults or {}
        samples = self.samples if self.samples is not None else defaults.get("samples")
        length = self.length if self.length is not None else defaults.get("length")
        return task_options(samples, length, self.seed, self.corpus, self.depth, self.data_dir)


@dataclass(frozen=True)
class ExecutorOptions(OptionGroup):
    """Where a command's runs execute: here, one after another, or as Ray tasks."""

    executor: Annotated[
        str,
        typer.Option(
            "--executor",
            metavar="local|ray",
            help="local: one run after another in this process; ray: every run a Ray task "
            "(needs pip install 'kvstream\\[cluster]').",
            rich_help_panel=EXECUTOR_PANEL,
        ),
    ] = "local"
    address: Annotated[
        str | None,
        typer.Option(
            "--address",
            metavar="HOST:PORT",
            help="Ray cluster to join (from `ray start --head`; auto finds a local one) "
            "\\[default: start a Ray instance on this machine].",
            rich_help_panel=EXECUTOR_PANEL,
            show_default=False,
        ),
    ] = None
    cpus_per_run: Annotated[
        float,
        typer.Option(
            "--cpus-per-run", metavar="N", help="CPUs each Ray task reserves.", rich_help_panel=EXECUTOR_PANEL
        ),
    ] = 1.0
    gpus_per_run: Annotated[
        float | None,
        typer.Option(
            "--gpus-per-run",
            metavar="N",
            help="GPUs each Ray task reserves (fractions share one) \\[default: 1 where the cluster has GPUs, else 0].",
            rich_help_panel=EXECUTOR_PANEL,
            show_default=False,
        ),
    ] = None

    def settings(self) -> ExecutorSettings:
        """The executor asked for, checked (Ray installed, sizes positive) before any work."""
        settings = ExecutorSettings(self.executor, self.address, Resources(self.cpus_per_run, self.gpus_per_run))
        settings.check()
        return settings
