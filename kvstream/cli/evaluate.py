"""``kvstream eval``: one task, quantized against the full-precision cache on the same samples."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.text import Text

from kvstream.cli.checks import check_config_for_model, check_positions, check_results_dir, check_strategies, check_task
from kvstream.cli.config_fields import build_config, show_config, with_config_fields
from kvstream.cli.console import ProgressBars, err, note, out
from kvstream.cli.errors import handle_errors
from kvstream.cli.options import (
    BitsOpt,
    ConfigOpt,
    FormatOpt,
    ModelOptions,
    ResultsOpt,
    TaskInputs,
    complete_tasks,
    with_option_groups,
)
from kvstream.cli.render import OutputFormat, emit, summary_table

EPILOG = (
    "[bold]Examples[/bold]\n"
    "  [cyan]kvstream eval --task passkey --bits 4/8 --length 2048 --samples 5[/cyan]\n"
    "  [cyan]kvstream eval --task perplexity --length 4096 -c kvquant-like[/cyan]\n"
    "  [cyan]kvstream eval --task niah_multikey --bits 2/8 -F json > run.json[/cyan]\n"
    "  [cyan]kvstream download longbench && kvstream eval --task narrativeqa[/cyan]\n"
    "\n"
    "The summary gives each metric quantized and in full precision, the paired delta and its 95% "
    "bootstrap CI. Every run is stored in --results (tidy rows and a manifest) for `kvstream report`."
)

TaskOpt = Annotated[
    str,
    typer.Option(
        "--task",
        "-t",
        help="Task name: passkey, niah_single, niah_multikey, niah_multivalue, niah_multiquery, perplexity, "
        "or a LongBench task (narrativeqa, ...); `kvstream plugins -g tasks` lists them.",
        autocompletion=complete_tasks,
        show_default=False,
    ),
]


@handle_errors
@with_option_groups
@with_config_fields
def eval_command(
    task: TaskOpt,
    fmt: FormatOpt = OutputFormat.table,
    results: ResultsOpt = Path("results"),
    *,
    model: ModelOptions,
    inputs: TaskInputs,
    config: ConfigOpt = None,
    bits: BitsOpt = None,
    field_values: dict[str, str] | None = None,
) -> None:
    """Evaluate a task with the quantized cache and with full precision, and store the tidy results."""
    effective = build_config(config, bits, field_values)
    model.check()
    options = inputs.options()
    check_task(task)
    check_strategies(effective)
    check_results_dir(results)
    check_positions(model.model, options.length)
    from kvstream.eval.runner import EvalSpec, plan_eval, run_plan

    spec = EvalSpec(task=task, model=model.model, config=effective, options=options, results_dir=results)
    info = out() if fmt is OutputFormat.table else err()
    show_config(effective, config, console=info)
    bundle = model.load()
    check_config_for_model(effective, bundle[0])
    with ProgressBars() as bars:
        plan = plan_eval(spec, bundle, progress=bars.callback(f"{task}: "))
    if plan.stored.reusable:
        note(Text(f"run {plan.run_id} is stored with the same key: this run replaces it", style="dim"), console=info)
    for line in plan.notes():
        note(Text(line, style="yellow"), console=info)
    with ProgressBars() as bars:
        result = run_plan(plan, progress=bars.callback(f"{task}: "))

    console = out()
    if fmt is OutputFormat.table:
        console.print(summary_table(result.summary, title=f"{task} on {model.label}"))
        console.print(
            Text.assemble(("run ", "bold"), (result.run_id, "cyan"), " stored in ", (str(result.path), "underline")),
            soft_wrap=True,
        )
    else:
        summary = result.summary.copy()
        if "run_id" not in summary.columns:
            summary.insert(0, "run_id", result.run_id)
        emit(
            console,
            summary,
            fmt,
            extra={
                "run_id": result.run_id,
                "task": task,
                "model": model.model,
                "path": str(result.path),
                "config_hash": effective.config_hash(),
                "config": effective.to_dict(),
            },
            key="summary",
        )
