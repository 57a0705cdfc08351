"""The ``kvstream`` Typer app: global options and the subcommands, each defined in its own module."""

from __future__ import annotations

from typing import Annotated

import typer

from kvstream.cli import ablate, download, evaluate, plugins, quantize_run, report, tune
from kvstream.cli.errors import KvstreamGroup

APP_EPILOG = (
    "[bold]First steps[/bold]\n"
    "  [cyan]kvstream quantize-run --compare-fp[/cyan]\n"
    "  [cyan]kvstream eval --task passkey --bits 4/8 --length 2048[/cyan]\n"
    "  [cyan]kvstream ablate chunk_size=128,256,512 --task passkey[/cyan]\n"
    "  [cyan]kvstream tune --task passkey --budget-bits 4.5 --trials 20[/cyan]\n"
    "  [cyan]kvstream report --results results --out reports[/cyan]\n"
    "\n"
    "Every command takes [bold]--config FILE|PRESET[/bold]; eval, quantize-run, ablate and tune also "
    "take [bold]--bits N/M[/bold] and one [bold]--<field>[/bold] option per config field. `kvstream "
    "COMMAND --help` shows examples; docs/guide.md explains everything, docs/scale.md clusters and "
    "models over several GPUs."
)

app = typer.Typer(
    name="kvstream",
    cls=KvstreamGroup,
    help="Quantize the KV cache of transformer LMs [bold]while[/bold] the prompt is prefilled, and measure it.",
    epilog=APP_EPILOG,
    rich_markup_mode="rich",
    no_args_is_help=True,
    context_settings={"help_option_names": ["-h", "--help"]},
    pretty_exceptions_show_locals=False,
)


def _version(value: bool) -> None:
    if not value:
        return
    import torch
    import transformers

    from kvstream import __version__

    typer.echo(f"kvstream {__version__} (torch {torch.__version__}, transformers {transformers.__version__})")
    raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option("--version", "-V", callback=_version, is_eager=True, help="Show the version and exit."),
    ] = False,
) -> None:
    """Quantize the KV cache of transformer LMs while the prompt is prefilled, and measure it."""


app.command("download", epilog=download.EPILOG, rich_help_panel="Data")(download.download_command)
app.command("quantize-run", epilog=quantize_run.EPILOG, rich_help_panel="Run")(quantize_run.quantize_run_command)
app.command("eval", epilog=evaluate.EPILOG, rich_help_panel="Run")(evaluate.eval_command)
app.command("ablate", epilog=ablate.EPILOG, rich_help_panel="Run")(ablate.ablate_command)
app.command("tune", epilog=tune.EPILOG, rich_help_panel="Run")(tune.tune_command)
app.command("report", epilog=report.EPILOG, rich_help_panel="Results")(report.report_command)
app.command("plugins", epilog=plugins.EPILOG, rich_help_panel="Results")(plugins.plugins_command)


def main() -> None:
    """Console-script entry point (``kvstream``)."""
    app(prog_name="kvstream")


if __name__ == "__main__":
    main()
