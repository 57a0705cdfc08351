"""``kvstream plugins``: every discovered strategy, where it comes from, and whether it loads."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table
from rich.text import Text

from kvstream.cli.config_fields import build_config, show_config
from kvstream.cli.console import out
from kvstream.cli.errors import CliError, handle_errors
from kvstream.cli.options import BitsOpt, ConfigOpt

EPILOG = (
    "[bold]Examples[/bold]\n"
    "  [cyan]kvstream plugins[/cyan]\n"
    "  [cyan]kvstream plugins --group caches[/cyan]\n"
    "  [cyan]kvstream plugins -c kivi-like[/cyan]   (marks the strategies it selects)\n"
    "\n"
    "A broken plugin is shown in red with the reason; the others stay usable and the exit code is 0."
)


def plugins_command(
    group: Annotated[
        str | None,
        typer.Option("--group", "-g", help="Only this group: quantizers, stats, caches or tasks."),
    ] = None,
    config: ConfigOpt = None,
    bits: BitsOpt = None,
) -> None:
    """List every discovered strategy: group, name, source package, version and description."""
    _plugins(group, config, bits)


@handle_errors
def _plugins(group: str | None, config_file: str | None, bits: str | None) -> None:
    from kvstream.registry import GROUPS, registry

    if group is not None and group not in GROUPS:
        raise CliError(f"--group: unknown group {group!r}; use one of {', '.join(GROUPS)}")
    config = build_config(config_file, bits)
    selected = {("quantizers", config.quantizer), ("stats", config.stats), ("caches", config.cache)}

    table = Table(title="kvstream strategies", header_style="bold", show_lines=False)
    for name in ("group", "name", "package", "version", "description"):
        table.add_column(name, overflow="fold")
    broken = 0
    for g in [group] if group else list(GROUPS):
        for info in registry(g).infos():
            in_use = (info.group, info.name) in selected
            name = Text(info.name + (" *" if in_use else ""), style="bold green" if in_use else "")
            if info.error:
                broken += 1
                table.add_row(
                    info.group,
                    Text(info.name, style="bold red"),
                    info.package,
                    info.version,
                    Text(f"BROKEN: {info.error}", style="red"),
                )
            else:
                table.add_row(info.group, name, info.package, info.version, info.description)
    console = out()
    console.print(table)
    show_config(config, config_file, console=console)
    summary = "* selected by the config above"
    if broken:
        summary += f"; {broken} broken plugin(s) in red: fix or uninstall them, the others work"
    console.print(Text(summary, style="dim"), soft_wrap=True)
