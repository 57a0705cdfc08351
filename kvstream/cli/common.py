"""What every subcommand shares: consoles, error reporting, config options, progress bars, model loading.

Errors a user can fix (a bad ``--bits``, an unknown task, missing data, an empty prompt, ...) end as
one line on stderr, ``kvstream: error: <problem and fix>``, with exit code 2 and no traceback.
Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import functools
import inspect
import os
import re
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import fields
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar, get_args, get_origin, get_type_hints

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text
from typer._click.exceptions import ClickException, UsageError
from typer.core import TyperGroup

from kvstream.config import CONFIG_DIR, CompressionConfig, ConfigError, parse_bits, parse_value
from kvstream.registry import PluginError

EXIT_USAGE = 2
CONFIG_PANEL = "Compression config"
FIELD_PANEL = "Config fields (override --config and --bits)"
F = TypeVar("F", bound=Callable[..., Any])


class CliError(ValueError):
    """A problem with what the user asked for; the message names it and says how to fix it."""


# --------------------------------------------------------------------------- consoles


def _console(stderr: bool) -> Console:
    console = Console(stderr=stderr, highlight=False)
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console = Console(stderr=stderr, highlight=False, width=160)
    return console


def out() -> Console:
    """Console on stdout (results); built per call so redirected streams are honoured."""
    return _console(stderr=False)


def err() -> Console:
    """Console on stderr (progress, notes, errors)."""
    return _console(stderr=True)


def note(message: str | Text, *, console: Console | None = None) -> None:
    """A one-line status message on stderr (or ``console``)."""
    (console or err()).print(message, soft_wrap=True)


# --------------------------------------------------------------------------- errors


def one_line(text: object) -> str:
    return " ".join(str(text).split())


def error_line(message: str) -> None:
    """Print ``kvstream: error: message`` as exactly one line on stderr."""
    line = Text.assemble(("kvstream: error: ", "bold red"), one_line(message))
    err().print(line, soft_wrap=True, markup=False)


def fail(message: str) -> typer.Exit:
    """Report ``message`` and return the exit to raise: ``raise fail("...")``."""
    error_line(message)
    return typer.Exit(EXIT_USAGE)


def _raised_in_kvstream(exc: BaseException) -> bool:
    """Whether the innermost frame of ``exc`` belongs to kvstream (our own validation), not a library."""
    tb = exc.__traceback__
    if tb is None:
        return True
    while tb.tb_next is not None:
        tb = tb.tb_next
    return str(tb.tb_frame.f_globals.get("__name__", "")).startswith("kvstream")


def _user_error_types() -> tuple[type[BaseException], ...]:
    from kvstream.data.store import DataError
    from kvstream.tasks.base import TaskDataMissing

    return (CliError, ConfigError, PluginError, DataError, TaskDataMissing)


def describe_error(exc: BaseException) -> str | None:
    """The one-line message for an error the user can fix, or None for a bug (keep its traceback)."""
    if isinstance(exc, _user_error_types()):
        return str(exc) or exc.__class__.__name__
    if isinstance(exc, FileNotFoundError):
        name = exc.filename or str(exc)
        return f"file not found: {name} (check the path)"
    if isinstance(exc, ValueError) and _raised_in_kvstream(exc):
        return str(exc)
    return None


def handle_errors(func: F) -> F:
    """Turn the errors a user can fix into one stderr line and exit code 2; let bugs through."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except typer.Exit:
            raise
        except KeyboardInterrupt:
            note(Text("interrupted: finished work is stored, nothing half-written is left behind", style="yellow"))
            raise typer.Exit(130) from None
        except Exception as exc:
            message = describe_error(exc)
            if message is None:
                raise
            raise fail(message) from None

    return wrapper  # type: ignore[return-value]


class KvstreamGroup(TyperGroup):
    """The app's command group: usage errors as one ``kvstream: error:`` line instead of a panel."""

    def main(  # type: ignore[override]
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> Any:
        try:
            rv = super().main(args=args, prog_name=prog_name, complete_var=complete_var, standalone_mode=False, **extra)
        except ClickException as exc:
            if not standalone_mode:
                raise
            if exc.__class__.__name__ == "NoArgsIsHelpError":
                exc.show()
                sys.exit(exc.exit_code)
            message = exc.format_message()
            if isinstance(exc, UsageError) and exc.ctx is not None:
                message = f"{message.rstrip('.')} (see `{exc.ctx.command_path} --help`)"
            error_line(message)
            sys.exit(exc.exit_code)
        except typer.Abort:
            if not standalone_mode:
                raise
            error_line("aborted")
            sys.exit(1)
        if not standalone_mode:
            return rv
        sys.exit(rv if isinstance(rv, int) else 0)


# --------------------------------------------------------------------------- completion


def complete_presets(incomplete: str) -> list[str]:
    names = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
    return [n for n in names if n.startswith(incomplete)]


def _complete_group(group: str) -> Callable[[str], list[str]]:
    def complete(incomplete: str) -> list[str]:
        from kvstream.registry import registry

        try:
            names = registry(group).names()
        except Exception:  # completion must never fail loudly
            return []
        return [n for n in names if n.startswith(incomplete)]

    return complete


complete_tasks = _complete_group("tasks")


# --------------------------------------------------------------------------- config options

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
        help="N bits for normal keys and values, M for sink tokens and outliers (`--bits 4` keeps M).",
        rich_help_panel=CONFIG_PANEL,
    ),
]
ModelOpt = Annotated[
    str,
    typer.Option(
        "--model",
        "-m",
        help="Model alias (smollm2-135m), local folder, .gguf file or Hub id.",
    ),
]

DeviceOpt = Annotated[
    str | None,
    typer.Option("--device", help="Where the model runs: cpu, cuda, cuda:N [default: cuda when present, else cpu]."),
]
DtypeOpt = Annotated[
    str | None,
    typer.Option(
        "--dtype", help="Model dtype: float32, bfloat16 or float16 [default: float32 on cpu, bfloat16 on cuda]."
    ),
]

_FALLBACK_DOCS = {
    "key_bits_normal": "Bits of ordinary key entries.",
    "key_bits_sink_outlier": "Bits of sink-token keys and outlier key channels.",
    "value_bits_normal": "Bits of ordinary value entries.",
    "value_bits_sink_outlier": "Bits of sink-token values and outlier value groups.",
    "value_symmetric": "Symmetric (scale only) instead of asymmetric (scale and zero-point) ranges for values.",
}


@functools.cache
def field_docs() -> dict[str, str]:
    """One-line help of every `CompressionConfig` field, from the docstrings under the fields."""
    import ast
    import textwrap

    docs = dict(_FALLBACK_DOCS)
    try:
        source = textwrap.dedent(inspect.getsource(CompressionConfig))
    except (OSError, TypeError):
        return docs
    body = ast.parse(source).body[0].body  # type: ignore[attr-defined]
    for node, following in zip(body, body[1:], strict=False):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(following, ast.Expr)
            and isinstance(following.value, ast.Constant)
            and isinstance(following.value.value, str)
        ):
            docs[node.target.id] = plain_text(following.value.value)
    return docs


_RST_ROLES = re.compile(r":[a-z]+:`([^`]+)`|``([^`]+)``")


def plain_text(doc: str) -> str:
    """A docstring as one line of help: reStructuredText literals and roles (````x````, ``:class:`x```) as plain x."""
    return " ".join(_RST_ROLES.sub(lambda m: m.group(1) or m.group(2), doc).split())


HELP_METAVAR_WIDTH = 8
"""Widest metavar shown in --help: wider ones squeeze the option names of an 80-column panel."""


def help_metavar(name: str) -> tuple[str, str]:
    """The metavar of field ``name`` in --help, and what the help then adds (the choices it no longer lists)."""
    metavar = field_metavar(name)
    if len(metavar) <= HELP_METAVAR_WIDTH:
        return metavar, ""
    return "MODE", f" One of {', '.join(metavar.split('|'))}."


def field_metavar(name: str) -> str:
    hint = get_type_hints(CompressionConfig)[name]
    if get_origin(hint) is Literal:
        return "|".join(str(a) for a in get_args(hint))
    return {int: "INT", float: "FLOAT", bool: "BOOL", str: "NAME"}.get(hint, "VALUE")


def _field_completion(name: str) -> Callable[[str], list[str]] | None:
    hint = get_type_hints(CompressionConfig)[name]
    if get_origin(hint) is Literal:
        choices = [str(a) for a in get_args(hint)]
        return lambda incomplete: [c for c in choices if c.startswith(incomplete)]
    if hint is bool:
        return lambda incomplete: [c for c in ("true", "false") if c.startswith(incomplete)]
    groups = {"quantizer": "quantizers", "stats": "stats", "cache": "caches"}
    if name in groups:
        return _complete_group(groups[name])
    return None


def option_name(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


def with_config_fields(func: F) -> F:
    """Add one ``--<field-name>`` option per `CompressionConfig` field to a command.

    The command receives the given ones (as text, parsed later by `parse_value`) in its
    ``field_values`` keyword; fields left out are absent from that dict.
    """
    signature = inspect.signature(func)
    hints = get_type_hints(func, include_extras=True)
    params = [
        p.replace(annotation=hints.get(name, p.annotation))
        for name, p in signature.parameters.items()
        if name != "field_values"
    ]
    taken = {p.name for p in params}
    defaults = CompressionConfig()
    added = []
    for f in fields(CompressionConfig):
        if f.name in taken:
            raise RuntimeError(f"command parameter {f.name!r} clashes with a config field")
        default = getattr(defaults, f.name)
        shown = str(default).lower() if isinstance(default, bool) else default
        metavar, choices = help_metavar(f.name)
        option = typer.Option(
            None,
            option_name(f.name),
            metavar=metavar,
            help=f"{field_docs().get(f.name, '')}{choices} [dim]\\[default: {shown}][/dim]".strip(),
            rich_help_panel=FIELD_PANEL,
            autocompletion=_field_completion(f.name),
            show_default=False,
        )
        added.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=str | None))
    names = [f.name for f in fields(CompressionConfig)]

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        values = {name: kwargs.pop(name) for name in names if name in kwargs}
        kwargs["field_values"] = {k: v for k, v in values.items() if v is not None}
        return func(*args, **kwargs)

    positional = [p for p in params if p.kind is not inspect.Parameter.KEYWORD_ONLY]
    keyword = [
        p.replace(kind=inspect.Parameter.KEYWORD_ONLY) if p.kind is inspect.Parameter.VAR_KEYWORD else p
        for p in params
        if p.kind is inspect.Parameter.KEYWORD_ONLY
    ]
    wrapper.__signature__ = signature.replace(parameters=[*positional, *keyword, *added])  # type: ignore[attr-defined]
    annotations = {p.name: p.annotation for p in [*params, *added]}
    wrapper.__annotations__ = annotations
    return wrapper  # type: ignore[return-value]


def build_config(
    config_file: str | None,
    bits: str | None = None,
    field_values: dict[str, str] | None = None,
) -> CompressionConfig:
    """The effective config: the file (or defaults), then ``--bits``, then each ``--<field>`` option."""
    base = CompressionConfig.from_yaml(config_file) if config_file else CompressionConfig()
    changes: dict[str, Any] = {}
    if bits is not None:
        changes.update(parse_bits(bits))
    for name, text in (field_values or {}).items():
        try:
            changes[name] = parse_value(name, text)
        except ConfigError as exc:
            raise ConfigError(f"{exc} ({value_hint(name, option=True)})") from None
    return base.replace(**changes) if changes else base


def value_hint(name: str, *, option: bool = False) -> str:
    """``expected INT, for example --chunk-size 256`` (or ``chunk_size=256`` for grids)."""
    default = format_value(getattr(CompressionConfig(), name))
    metavar = field_metavar(name)
    example = f"{option_name(name)} {default}" if option else f"{name}={default}"
    return f"expected {metavar}, for example {example}"


def unknown_field_hint(name: str) -> str:
    """``did you mean chunk_size?`` for a misspelt field, else where the fields are listed."""
    import difflib

    from kvstream.config import field_names

    close = difflib.get_close_matches(name, sorted(field_names()), n=1)
    return f"did you mean {close[0]}?" if close else "`kvstream eval --help` lists the fields"


def config_differences(config: CompressionConfig) -> dict[str, Any]:
    defaults = CompressionConfig().to_dict()
    return {k: v for k, v in config.to_dict().items() if defaults[k] != v}


def format_value(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def config_line(config: CompressionConfig, source: str | None = None) -> Text:
    """``config 1a2b3c4d5e6f (kivi-like): key_bits_normal=2 ...``: hash and the fields off default."""
    diff = config_differences(config)
    text = Text.assemble(("config ", "bold"), (config.config_hash(), "cyan"))
    if source:
        text.append(f" ({source})", style="dim")
    text.append(": ")
    if diff:
        text.append(" ".join(f"{k}={format_value(v)}" for k, v in diff.items()))
    else:
        text.append("defaults", style="dim")
    text.append(f"  [{config.key_bits_normal}/{config.key_bits_sink_outlier} key bits, ", style="dim")
    text.append(f"{config.value_bits_normal}/{config.value_bits_sink_outlier} value bits]", style="dim")
    return text


def show_config(config: CompressionConfig, source: str | None = None, *, console: Console | None = None) -> None:
    (console or out()).print(config_line(config, source), soft_wrap=True)


def config_table(config: CompressionConfig, title: str | None = None) -> Table:
    """Every field with its value, those off default in bold."""
    table = Table(title=title, show_header=True, header_style="bold", box=None, pad_edge=False)
    table.add_column("field")
    table.add_column("value")
    table.add_column("default", style="dim")
    defaults = CompressionConfig().to_dict()
    for name, value in config.to_dict().items():
        changed = defaults[name] != value
        table.add_row(
            Text(name, style="bold" if changed else ""),
            Text(format_value(value), style="bold yellow" if changed else ""),
            format_value(defaults[name]) if changed else "",
        )
    return table


# --------------------------------------------------------------------------- progress


STEP_LABELS = {
    "samples": "building samples",
    "quantized": "quantized cache",
    "full_precision": "full-precision baseline",
    "full_precision (cached)": "full-precision baseline (reused)",
    "prefill": "tokens prefilled",
}
"""Friendlier names for the steps `run_eval` reports."""
PERIODIC_STEPS = {"prefill"}
"""Steps that finish once per sample: in a log their lines come every `ProgressBars.LOG_SECONDS` only."""


class ProgressBars:
    """rich progress bars on stderr, one per label; plain log lines instead when stderr is not a terminal.

    A log gets a line per bar when it completes and, while it runs, at most one every `LOG_SECONDS`
    (the tokens prefilled inside a sample only the latter), so a long sample shows it is moving.
    """

    LOG_SECONDS = 10.0

    def __init__(self, console: Console | None = None) -> None:
        self.console = console or err()
        self.plain = not self.console.is_terminal
        self._logged: dict[str, float] = {}
        self._periodic: set[str] = set()
        self._start = time.monotonic()
        self.progress = Progress(
            SpinnerColumn(),
            TextColumn("[progress.description]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=self.console,
            transient=True,
            disable=not self.console.is_terminal,
        )
        self._tasks: dict[str, TaskID] = {}

    def __enter__(self) -> ProgressBars:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.progress.__exit__(*exc)

    def update(self, label: str, done: float, total: float | None, *, periodic: bool = False) -> None:
        """Set bar ``label`` to ``done`` of ``total`` (created on first use); ``periodic``: log no completions."""
        if label not in self._tasks:
            self._tasks[label] = self.progress.add_task(label, total=total or None)
            self._logged[label] = time.monotonic()
            if periodic:
                self._periodic.add(label)
        self.progress.update(self._tasks[label], completed=done, total=total or None)
        if self.plain:
            self._log(label, done, total)

    def _log(self, label: str, done: float, total: float | None) -> None:
        now = time.monotonic()
        finished = bool(total) and done >= (total or 0) and label not in self._periodic
        if not finished and now - self._logged[label] < self.LOG_SECONDS:
            return
        self._logged[label] = now
        of = f"/{total:.0f}" if total else ""
        self.console.print(f"[{now - self._start:6.0f}s] {label}: {done:.0f}{of}", markup=False, highlight=False)

    def remove(self, label: str) -> None:
        task = self._tasks.pop(label, None)
        if task is not None:
            self.progress.remove_task(task)

    def remove_prefix(self, prefix: str) -> None:
        """Drop every bar whose label starts with ``prefix`` (a finished run's bars)."""
        for label in [name for name in self._tasks if name.startswith(prefix)]:
            self.remove(label)

    def callback(self, prefix: str = "") -> Callable[[str, float, float], None]:
        """A ``(what, done, total)`` callback (run_eval, download) drawing one bar per ``what``."""

        def report(what: str, done: float, total: float) -> None:
            self.update(f"{prefix}{STEP_LABELS.get(what, what)}", done, total, periodic=what in PERIODIC_STEPS)

        return report

    def counter(self, label: str) -> Callable[[int, int], None]:
        """A ``(done, total)`` callback (chunked prefill) drawing bar ``label``."""

        def report(done: int, total: int) -> None:
            self.update(label, done, total, periodic=True)

        return report


@contextmanager
def spinner(message: str) -> Iterator[None]:
    console = err()
    if console.is_terminal:
        with console.status(message):
            yield
    else:
        yield


# --------------------------------------------------------------------------- models and checks


def check_device(device: str | None, dtype: str | None) -> None:
    """Refuse an unknown or absent device and an unknown dtype before any work (one line, exit 2)."""
    from kvstream.engine.model import resolve_device, resolve_dtype

    try:
        resolve_dtype(dtype, resolve_device(device))
    except ValueError as error:
        raise UsageError(str(error)) from error


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
    import difflib

    from kvstream.registry import registry

    tasks = registry("tasks")
    if task not in tasks.names():
        close = difflib.get_close_matches(task, tasks.names(), n=1)
        if close:
            raise PluginError(
                f"unknown task {task!r}: did you mean {close[0]}? (`kvstream plugins -g tasks` lists them)"
            )
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


def human_bytes(n: float | None) -> str:
    if n is None or n != n:
        return "-"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.2f} {unit}"
        value /= 1024
    return f"{value:.2f} GiB"
