"""The compression config on the command line: one option per `CompressionConfig` field, ``--config`` and
``--bits`` combined into the effective config, and that config shown back as one line or a table."""

from __future__ import annotations

import functools
import inspect
import re
from collections.abc import Callable
from dataclasses import fields
from typing import Any, Literal, TypeVar, get_args, get_origin, get_type_hints

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from kvstream.cli.console import out
from kvstream.cli.options import complete_group, rewrite_signature
from kvstream.config import STRATEGY_FIELDS, CompressionConfig, ConfigError, parse_bits, parse_value

F = TypeVar("F", bound=Callable[..., Any])

FIELD_PANEL = "Config fields (override --config and --bits)"


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
        return complete_group(groups[name])
    return None


def option_name(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


def with_config_fields(func: F) -> F:
    """Add one ``--<field-name>`` option per `CompressionConfig` field to a command.

    The command receives the given ones (as text, parsed later by `parse_value`) in its
    ``field_values`` keyword; fields left out are absent from that dict.
    """
    hints = get_type_hints(func, include_extras=True)
    params = [
        p.replace(annotation=hints.get(name, p.annotation))
        for name, p in inspect.signature(func).parameters.items()
        if name != "field_values"
    ]
    taken = {p.name for p in params}
    defaults = CompressionConfig()
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
        params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=str | None))
    names = [f.name for f in fields(CompressionConfig)]

    def call(kwargs: dict[str, Any]) -> dict[str, Any]:
        values = {name: kwargs.pop(name) for name in names if name in kwargs}
        kwargs["field_values"] = {k: v for k, v in values.items() if v is not None}
        return kwargs

    return rewrite_signature(func, params, call)  # type: ignore[return-value]


def bits_changes(
    config_file: str | None, bits: str | None, field_values: dict[str, str] | None = None
) -> dict[str, Any]:
    """The fields ``--bits`` sets: the widths and, on the defaults with no option of `STRATEGY_FIELDS` given,
    the best strategy known at that width (`kvstream.config.BEST_AT_WIDTH`)."""
    if bits is None:
        return {}
    own = STRATEGY_FIELDS & set(field_values or {})
    return parse_bits(bits, strategy=config_file is None and not own)


def build_config(
    config_file: str | None,
    bits: str | None = None,
    field_values: dict[str, str] | None = None,
) -> CompressionConfig:
    """The effective config: the file (or defaults), then ``--bits`` (`bits_changes`), then each ``--<field>``."""
    base = CompressionConfig.from_yaml(config_file) if config_file else CompressionConfig()
    changes = bits_changes(config_file, bits, field_values)
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
    from kvstream.config import field_names
    from kvstream.suggest import closest

    close = closest(name, field_names())
    return f"did you mean {close}?" if close else "`kvstream eval --help` lists the fields"


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
