"""``kvstream tune``: optuna search for the best compression settings under a bit budget."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import pandas as pd
import typer
import yaml
from rich.text import Text

from kvstream.cli.checks import check_config_for_model, check_positions, check_results_dir, check_strategies, check_task
from kvstream.cli.config_fields import bits_changes, build_config, config_table, show_config, with_config_fields
from kvstream.cli.console import ProgressBars, err, note, out
from kvstream.cli.errors import CliError, handle_errors
from kvstream.cli.options import (
    BitsOpt,
    ConfigOpt,
    ExecutorOptions,
    ModelOptions,
    ResultsOpt,
    TaskInputs,
    complete_tasks,
    with_option_groups,
)
from kvstream.cli.render import OutputFormat, emit, frame_table, with_short_ids
from kvstream.config import CompressionConfig
from kvstream.report.tables import format_metric, higher_is_better, primary_metric, run_table
from kvstream.tune import Objective, TrialRecord, search_space, tune

DEFAULT_TASK = "passkey"

EPILOG = (
    "[bold]Examples[/bold]\n"
    "  [cyan]kvstream tune --task passkey --budget-bits 4.5 --trials 20[/cyan]\n"
    "  [cyan]kvstream tune --task perplexity --min-quality 12.5 --trials 30[/cyan]\n"
    "  [cyan]kvstream tune --budget-bits 3.5 --chunk-size 256 --save best.yaml[/cyan]\n"
    "\n"
    "Searched: key/value normal bits {2,3,4}, high bits {4,8}, chunk_size, ema_decay, "
    "attention_sink_size, outlier thresholds and key_rope. A field given on the command line "
    "(--chunk-size, --bits, ...) is fixed instead.\n"
    "\n"
    "Every trial is an eval run stored in --results (so `kvstream report` shows it); a config already"
    " stored with the same key (prompts, model files, dtype, device, versions) is not run again. Trials "
    "that break the constraint are penalised. --min-quality is a "
    "floor for higher-is-better metrics and a ceiling for perplexity."
)


SHORT_NAMES = {
    "key_bits_normal": "K bits",
    "value_bits_normal": "V bits",
    "high_bits": "high bits",
    "chunk_size": "chunk",
    "ema_decay": "ema",
    "attention_sink_size": "sinks",
    "outlier_threshold_abs": "out abs",
    "outlier_threshold_relative": "out rel",
    "key_rope": "rope",
}


def trials_table(table: pd.DataFrame, metric: str, styles: list[str], title: str) -> Any:
    """The trials for the terminal: short config ids, the parameters that varied (short headers), results."""
    shown = with_short_ids(table)
    varied = [c for c in SHORT_NAMES if c in shown.columns and shown[c].astype(str).nunique() > 1]
    fixed = [c for c in SHORT_NAMES if c in shown.columns and c not in varied]
    shown = shown.drop(columns=fixed)
    if "reused" in shown.columns and not shown["reused"].any():
        shown = shown.drop(columns="reused")
    shown["feasible"] = ["yes" if f else "no" for f in shown["feasible"]]
    shown = shown.rename(columns={**SHORT_NAMES, "quality": metric, "bits_per_element": "bits"})
    formatters = {
        metric: lambda v: format_metric(metric, v),
        "bits": lambda v: f"{v:.2f}",
        "score": lambda v: "penalised" if v <= -1e5 else f"{v:.4g}",
    }
    return frame_table(shown, title=title, formatters=formatters, row_styles=styles)


def _measure(rows: pd.DataFrame, run_id: str, task: str) -> tuple[float, float, str | None]:
    runs = run_table(rows[rows["run_id"] == run_id])
    if runs.empty:
        return float("nan"), float("nan"), primary_metric(task)
    rec = runs.iloc[0]
    return float(rec["quantized"]), float(rec["bits_per_element"]), rec["metric"]


@handle_errors
@with_option_groups
@with_config_fields
def tune_command(
    task: Annotated[
        str,
        typer.Option("--task", "-t", help="Task whose metric is optimised.", autocompletion=complete_tasks),
    ] = DEFAULT_TASK,
    budget_bits: Annotated[
        float | None, typer.Option("--budget-bits", help="Maximum effective bits per cached element.")
    ] = None,
    min_quality: Annotated[
        float | None,
        typer.Option("--min-quality", help="Instead: minimise bits with the metric at least this good."),
    ] = None,
    trials: Annotated[int, typer.Option("--trials", help="Number of optuna trials (eval runs).")] = 20,
    sampler_seed: Annotated[int, typer.Option("--sampler-seed", help="Seed of the TPE sampler.")] = 0,
    save: Annotated[
        Path | None, typer.Option("--save", help="Write the best config as YAML (usable with --config).")
    ] = None,
    storage: Annotated[
        str | None,
        typer.Option(
            "--storage",
            metavar="URL|FILE",
            help="Optuna storage shared by several tune processes: a SQLAlchemy URL (postgresql://...) or a "
            "SQLite file \\[default with --study: RESULTS/studies.sqlite3; without either: in memory].",
            show_default=False,
        ),
    ] = None,
    study: Annotated[
        str | None,
        typer.Option(
            "--study",
            metavar="NAME",
            help="Study name in --storage; every process given it works on the same trials "
            "\\[default: named after the task, model and goal].",
            show_default=False,
        ),
    ] = None,
    fmt: Annotated[OutputFormat, typer.Option("--format", "-F", help="How to print the trials.")] = OutputFormat.table,
    results: ResultsOpt = Path("results"),
    *,
    model: ModelOptions,
    inputs: TaskInputs,
    running: ExecutorOptions,
    config: ConfigOpt = None,
    bits: BitsOpt = None,
    field_values: dict[str, str] | None = None,
) -> None:
    """Search compression settings with optuna: best task quality within a bit budget (or fewest bits)."""
    base = build_config(config, bits, field_values)
    settings = running.settings()
    model.check(here=not settings.remote)
    fixed = set(field_values or {}) | set(bits_changes(config, bits, field_values))
    space = search_space(fixed)
    if trials < 1:
        raise CliError(f"--trials: must be at least 1, got {trials}")
    options = inputs.options()
    task_obj = check_task(task)
    metric = getattr(task_obj, "per_sample_metric", None) or primary_metric(task) or "accuracy"
    objective = Objective(
        metric=metric,
        higher_is_better=higher_is_better(metric),
        budget_bits=budget_bits,
        min_quality=min_quality,
    )
    if save is not None and save.parent and not save.parent.exists():
        raise CliError(f"--save: folder {save.parent} does not exist (create it or choose another path)")

    check_strategies(base)
    check_results_dir(results)
    check_positions(model.model, options.length)
    from kvstream.eval import runner
    from kvstream.eval.jobs import EvalRuns, EvalTrials
    from kvstream.results import ResultsStore
    from kvstream.results.keys import digest, options_hash
    from kvstream.studies import StudyTarget, storage_url

    store = ResultsStore(results)
    fingerprint = {
        "task": task,
        "model": model.model,
        "objective": objective.describe(),
        "base_config": base.config_hash(),
        "searched": sorted(space),
        "options": options_hash(options),
    }
    target = StudyTarget()
    if storage is not None or study is not None:
        name = study or f"tune-{task}-{digest(fingerprint, 8)}"
        target = StudyTarget(storage_url(storage, results), name)

    info = out() if fmt is OutputFormat.table else err()
    show_config(base, config, console=info)
    info.print(Text(f"tune {task} on {model.label}: {objective.describe()}", style="bold"), soft_wrap=True)
    searched = ", ".join(space) or "nothing (all fields fixed)"
    where = f" of study {target.name} ({target.url})" if target.shared else ""
    info.print(Text(f"searching {searched} over {trials} trial(s){where}", style="dim"), soft_wrap=True)

    def spec_for(candidate: CompressionConfig) -> Any:
        return runner.EvalSpec(task=task, model=model.model, config=candidate, options=options, results_dir=results)

    bars = ProgressBars()

    def on_failure(number: int, candidate: CompressionConfig, error: str) -> None:
        note(Text(f"trial {number} failed ({spec_for(candidate).run_id()}): {error}", style="red"), console=err())

    def on_trial(record: TrialRecord, done: int) -> None:
        bars.update("trials", done, trials)
        mark = "ok" if record.feasible else "infeasible"
        reused = ", reused" if record.reused else ""
        note(
            Text(
                f"trial {record.number}: {metric} {format_metric(metric, record.quality)} at "
                f"{record.bits:.2f} bits/element ({mark}{reused})",
                style="" if record.feasible else "dim",
            ),
            console=err(),
        )

    try:
        with settings.open(progress=lambda key: bars.callback("trial: ")) as executor:
            runs = EvalRuns(executor, model.source(), store, load=model.load)
            check = None
            if not runs.remote:
                bundle = runs.bundle()

                def check(candidate: CompressionConfig) -> None:
                    check_config_for_model(candidate, bundle[0])

                check(base)
            with bars:
                for line in runs.prepare(spec_for(base), progress=bars.callback("trial: ")):
                    note(Text(line, style="yellow"), console=err())
                bars.update("trials", 0, trials)
                evaluation = EvalTrials(
                    runs,
                    spec_for,
                    lambda rows, run_id: _measure(rows, run_id, task)[:2],
                    check=check,
                    note=lambda line: note(Text(line, style="yellow"), console=err()),
                )
                result = tune(
                    evaluation,
                    base,
                    objective,
                    trials=trials,
                    seed=sampler_seed,
                    space=space,
                    on_trial=on_trial,
                    on_failure=on_failure,
                    study=target,
                    fingerprint=fingerprint,
                    executor=executor,
                )
    except KeyboardInterrupt:
        note(Text(f"interrupted: finished trials are stored in {results}; rerun to reuse them", style="yellow"))
        raise typer.Exit(130) from None

    table = result.table()
    best = result.best
    console = out()
    if fmt is not OutputFormat.table:
        emit(
            console,
            table,
            fmt,
            extra={
                "task": task,
                "model": model.model,
                "objective": objective.describe(),
                "best_run_id": best.run_id if best else None,
                "best_config": best.config.to_dict() if best else None,
            },
            key="trials",
        )
    else:
        styles = [
            "bold green" if best and t.number == best.number else ("" if t.feasible else "dim") for t in result.trials
        ]
        console.print(trials_table(table, metric, styles, title=f"Trials: {objective.describe()}"))
    if best is None:
        closest = result.closest
        hint = (
            f" (closest: run {closest.run_id}, {format_metric(metric, closest.quality)} at {closest.bits:.2f} bits)"
            if closest
            else ""
        )
        note(
            Text(
                f"no trial met the constraint{hint}: raise --budget-bits, relax --min-quality or add --trials",
                style="yellow",
            )
        )
        return
    if fmt is OutputFormat.table:
        console.print(
            Text.assemble(
                ("best: ", "bold green"),
                (best.run_id, "cyan"),
                f"  {metric} {format_metric(metric, best.quality)} at {best.bits:.2f} bits/element",
            ),
            soft_wrap=True,
        )
        console.print(config_table(best.config, title="Best config"))
    show_config(best.config, "best", console=info)
    if save is not None:
        payload = {
            "description": f"tuned for {task} on {model.model}: {metric} {best.quality:.4g} at "
            f"{best.bits:.2f} bits/element ({objective.describe()})",
            **best.config.to_dict(),
        }
        save.write_text(yaml.safe_dump(payload, sort_keys=False))
        note(f"saved the best config to {save} (use it with --config {save})", console=info)
