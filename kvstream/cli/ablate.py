"""``kvstream ablate KEY=V1,V2 ...``: a resumable sweep of eval runs over a grid of config values."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import pandas as pd
import typer
import yaml
from rich.console import Console
from rich.text import Text

from kvstream.cli.checks import check_config_for_model, check_positions, check_results_dir, check_strategies, check_task
from kvstream.cli.config_fields import build_config, show_config, unknown_field_hint, value_hint, with_config_fields
from kvstream.cli.console import ProgressBars, err, note, out
from kvstream.cli.errors import CliError, handle_errors
from kvstream.cli.options import (
    BitsOpt,
    ConfigOpt,
    ExecutorOptions,
    FormatOpt,
    ModelOptions,
    ResultsOpt,
    TaskInputs,
    complete_tasks,
    with_option_groups,
)
from kvstream.cli.render import OutputFormat, emit, frame_table, plain, with_short_ids
from kvstream.config import (
    CONFIG_DIR,
    CompressionConfig,
    ConfigError,
    expand_grid,
    field_names,
    parse_bits,
    parse_grid,
    parse_value,
)
from kvstream.executors import ExecutorSettings
from kvstream.report.tables import format_metric
from kvstream.schema import FULL_PRECISION, QUANTIZED
from kvstream.suggest import did_you_mean

ABLATION_DIR = CONFIG_DIR / "ablations"
DEFAULT_TASK = "passkey"
BITS_KEY = "bits"

EPILOG = (
    "[bold]Examples[/bold]\n"
    "  [cyan]kvstream ablate chunk_size=256,512[/cyan]\n"
    "  [cyan]kvstream ablate --preset bits --task niah_single --length 2048[/cyan]\n"
    "  [cyan]kvstream ablate ema_decay=0.5,0.9 attention_sink_size=0,4[/cyan]\n"
    "  [cyan]kvstream ablate bits=2/8,4/8 key_rope=pre,post --samples 5[/cyan]\n"
    "\n"
    "Presets (configs/ablations/): chunk-size, ema-decay, bits, sink-size, outliers, rope. The "
    "pseudo-field bits=N/M,... sweeps --bits.\n"
    "\n"
    "Each run is stored as it finishes: running the same command again skips finished runs whose key "
    "(prompts, model files, dtype, device, versions) still matches, so an interrupted sweep resumes where "
    "it stopped. The summary marks the best quality per effective bit (★) and the runs no other run beats "
    "on both quality and bits (◆)."
)


@dataclass
class Sweep:
    """A grid of config values: ``bits`` (``--bits`` specs, outermost) times the field grid."""

    grid: dict[str, list[Any]] = field(default_factory=dict)
    bits: list[str] = field(default_factory=list)
    description: str = ""
    task: str | None = None
    options: dict[str, Any] = field(default_factory=dict)

    def configs(self, base: CompressionConfig) -> list[CompressionConfig]:
        """Every combination applied to ``base``, duplicates (same config hash) removed, order kept."""
        bases = [base.replace(**parse_bits(spec)) for spec in self.bits] or [base]
        seen: set[str] = set()
        out: list[CompressionConfig] = []
        for b in bases:
            for config in expand_grid(b, self.grid):
                if config.config_hash() not in seen:
                    seen.add(config.config_hash())
                    out.append(config)
        return out

    def axes(self) -> str:
        names = ([BITS_KEY] if self.bits else []) + list(self.grid)
        sizes = ([len(self.bits)] if self.bits else []) + [len(v) for v in self.grid.values()]
        return " x ".join(f"{n} ({s})" for n, s in zip(names, sizes, strict=True))


def preset_names() -> list[str]:
    return sorted(p.stem for p in ABLATION_DIR.glob("*.yaml"))


def load_preset(name: str) -> Sweep:
    """A grid stored in ``configs/ablations/<name>.yaml`` (or any YAML file with the same layout)."""
    path = Path(name)
    if not path.is_file():
        path = ABLATION_DIR / f"{name}.yaml"
    if not path.is_file():
        hint = did_you_mean(name, preset_names())
        raise CliError(f"--preset: unknown ablation preset {name!r}; {hint}use one of {', '.join(preset_names())}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise CliError(f"--preset: {path} is not valid YAML ({exc.__class__.__name__})") from None
    if not isinstance(data, dict):
        raise CliError(f"--preset: {path} must be a mapping with 'grid' and/or 'bits'")
    unknown = set(data) - {"description", "task", "grid", "bits", "options"}
    if unknown:
        raise CliError(f"--preset: {path} has unknown key(s) {', '.join(sorted(unknown))}")
    grid_data = data.get("grid") or {}
    if not isinstance(grid_data, dict):
        raise CliError(f"--preset: 'grid' in {path} must map config fields to lists of values")
    grid = {}
    for key, values in grid_data.items():
        items = values if isinstance(values, list) else [values]
        if not items:
            raise ConfigError(f"{key}: preset {path.name} gives no values")
        grid[str(key)] = [parse_value(str(key), _yaml_text(v)) for v in items]
    bits = [_yaml_text(v) for v in (data.get("bits") or [])]
    for spec in bits:
        parse_bits(spec)
    return Sweep(
        grid=grid,
        bits=bits,
        description=str(data.get("description", "")),
        task=data.get("task"),
        options=dict(data.get("options") or {}),
    )


def _yaml_text(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def parse_sweep(specs: list[str]) -> Sweep:
    """``KEY=V1,V2`` arguments; the pseudo-field ``bits=N/M,...`` sweeps `--bits`."""
    bits: list[str] = []
    rest: list[str] = []
    for spec in specs:
        key, sep, values = spec.partition("=")
        if sep and key.strip() == BITS_KEY:
            if bits:
                raise ConfigError("grid key 'bits' given twice")
            bits = [v.strip() for v in values.split(",")]
            if any(not v for v in bits):
                raise ConfigError(f"bits: grid {spec!r} has an empty value (write bits=2/8,4/8)")
            for v in bits:
                parse_bits(v)
        else:
            rest.append(spec)
    grid: dict[str, list[Any]] = {}
    for spec in rest:
        key = spec.partition("=")[0].strip()
        try:
            parsed = parse_grid([spec])
        except ConfigError as exc:
            if key and key not in field_names():
                raise ConfigError(f"{exc}; {unknown_field_hint(key)}") from None
            if key and "for example" not in str(exc) and "write " not in str(exc):
                raise ConfigError(f"{exc}; {value_hint(key)}") from None
            raise
        if key in grid:
            raise ConfigError(f"grid key {key!r} given twice (list all its values in one {key}=V1,V2)")
        grid.update(parsed)
    return Sweep(grid=grid, bits=bits)


def merge(preset: Sweep | None, cli: Sweep) -> Sweep:
    """The preset's grid with the command line's keys replacing or adding to it."""
    if preset is None:
        return cli
    grid = {**preset.grid, **cli.grid}
    return Sweep(
        grid=grid,
        bits=cli.bits or preset.bits,
        description=preset.description,
        task=preset.task,
        options=preset.options,
    )


def render_sweep(table: pd.DataFrame, title: str) -> Any:
    """The sweep summary as a rich table: best row in bold green with ★, Pareto runs with ◆."""
    if table.empty:
        return Text("no finished runs to summarise", style="dim")
    metric = str(table["metric"].iloc[0])
    shown = with_short_ids(table.drop(columns=["best", "pareto"]))
    marks = [("★ " if b else "") + ("◆" if p else "") for b, p in zip(table["best"], table["pareto"], strict=True)]
    shown.insert(0, "", marks)
    styles = [
        "bold green" if b else ("green" if p else "") for b, p in zip(table["best"], table["pareto"], strict=True)
    ]
    formatters = {
        QUANTIZED: lambda v: format_metric(metric, v),
        FULL_PRECISION: lambda v: format_metric(metric, v),
        "delta": lambda v: format_metric(metric, v, signed=True),
        "bits_per_element": lambda v: f"{v:.2f}",
        "quality_per_bit": lambda v: f"{v:.4g}",
    }
    return frame_table(shown, title=title, formatters=formatters, row_styles=styles)


@handle_errors
@with_option_groups
@with_config_fields
def ablate_command(
    grid: Annotated[
        list[str] | None,
        typer.Argument(
            metavar="KEY=V1,V2 ...",
            help="Config fields and the values to try (Cartesian product); bits=N/M,... sweeps --bits.",
            show_default=False,
        ),
    ] = None,
    preset: Annotated[
        str | None,
        typer.Option(
            "--preset",
            "-p",
            help="A ready-made grid: chunk-size, ema-decay, bits, sink-size, outliers, rope (configs/ablations/).",
            autocompletion=lambda incomplete: [n for n in preset_names() if n.startswith(incomplete)],
        ),
    ] = None,
    task: Annotated[
        str | None,
        typer.Option(
            "--task",
            "-t",
            help=f"Task of every run (default: the preset's, else {DEFAULT_TASK}).",
            autocompletion=complete_tasks,
        ),
    ] = None,
    fmt: FormatOpt = OutputFormat.table,
    results: ResultsOpt = Path("results"),
    *,
    model: ModelOptions,
    inputs: TaskInputs,
    running: ExecutorOptions,
    config: ConfigOpt = None,
    bits: BitsOpt = None,
    field_values: dict[str, str] | None = None,
) -> None:
    """Run one eval per combination of config values (one model load); finished runs are skipped."""
    base = build_config(config, bits, field_values)
    settings = running.settings()
    model.check(here=not settings.remote)
    sweep = merge(load_preset(preset) if preset else None, parse_sweep(list(grid or [])))
    if not sweep.grid and not sweep.bits:
        raise CliError(
            "nothing to sweep: give KEY=V1,V2 arguments (for example chunk_size=256,512) "
            f"or --preset NAME ({', '.join(preset_names())})"
        )
    task = task or sweep.task or DEFAULT_TASK
    options = inputs.options(sweep.options)
    configs = sweep.configs(base)
    check_task(task)
    check_results_dir(results)
    check_positions(model.model, options.length)
    from kvstream.eval import runner
    from kvstream.results import ResultsStore

    specs = [
        runner.EvalSpec(task=task, model=model.model, config=c, options=options, results_dir=results) for c in configs
    ]
    run_ids = [s.run_id() for s in specs]
    store = ResultsStore(results)

    info = out() if fmt is OutputFormat.table else err()
    show_config(base, config, console=info)
    heading = f"sweep {sweep.axes()} = {len(specs)} run(s) of {task} on {model.label}"
    if sweep.description:
        heading += f": {sweep.description}"
    info.print(Text(heading, style="bold"), soft_wrap=True)
    for spec in specs:
        check_strategies(spec.config)
    labels = {s.run_id(): _label(s.config, sweep) for s in specs}
    failed = run_sweep(specs, labels, settings, model, store, info)

    table = sweep_summary(store, run_ids)
    console = out()
    if fmt is OutputFormat.table:
        console.print(render_sweep(table, f"Ablation of {task} on {model.label}"))
        best = table[table["best"]] if not table.empty else table
        if not best.empty:
            rec = best.iloc[0]
            console.print(
                Text.assemble(
                    ("best quality per bit: ", "bold"),
                    (str(rec["run_id"]), "cyan"),
                    f" ({rec['metric']} {plain(rec[QUANTIZED])} at {rec['bits_per_element']:.2f} bits/element)",
                ),
                soft_wrap=True,
            )
        elif not table.empty:
            console.print(Text("no run scored above 0, so none is marked best; ◆ marks the Pareto front", style="dim"))
    else:
        emit(console, table, fmt, extra={"task": task, "model": model.model, "results": str(results)}, key="runs")
    if failed:
        note(
            Text(
                f"{len(failed)} of {len(specs)} run(s) failed (see above); the others are stored in {results}: "
                "run the same command again to retry the failed ones",
                style="yellow",
            )
        )
        raise typer.Exit(1)


def run_sweep(
    specs: list[Any],
    labels: dict[str, str],
    settings: ExecutorSettings,
    model: ModelOptions,
    store: Any,
    info: Console,
) -> list[str]:
    """Run the sweep's runs that are not stored with the same key on the executor ``settings`` names.

    Returns the run ids that failed (only remote runs fail without stopping the sweep); Ctrl-C keeps
    what finished and exits with 130.
    """
    from kvstream.eval.jobs import EvalRuns

    bars = ProgressBars()
    with settings.open(progress=lambda key: bars.callback(f"{labels[key]}: ")) as executor:
        runs = EvalRuns(executor, model.source(), store, load=model.load)
        if not runs.remote:
            bundle = runs.bundle()
            for spec in specs:
                check_config_for_model(spec.config, bundle[0])
        with bars:
            planned, notes = runs.plan(specs, progress=bars.callback("sweep: "))
            bars.remove_prefix("sweep: ")
            for run in planned:
                if run.stored.reusable:
                    where = f"in {store.root} with the same key"
                    note(
                        Text(f"skip {run.spec.run_id()} ({labels[run.spec.run_id()]}): {where}", style="dim"),
                        console=info,
                    )
            for line in dict.fromkeys([*notes, *(line for run in planned for line in run.notes)]):
                note(Text(line, style="yellow"), console=info)
            todo = [run.spec for run in planned if not run.stored.reusable]
            finished, failed = len(specs) - len(todo), []
            if todo:
                bars.update("runs", finished, len(specs))
            for spec in todo:
                runs.submit(spec)
            try:
                while runs.pending:
                    outcome = runs.next_done()
                    label = labels[outcome.key]
                    bars.remove_prefix(f"{label}: ")
                    if not outcome.ok:
                        failed.append(outcome.key)
                        note(Text(f"failed {outcome.key} ({label}): {outcome.error}", style="red"), console=err())
                        continue
                    finished += 1
                    bars.update("runs", finished, len(specs))
                    seconds = outcome.value.manifest.get("duration_seconds", 0.0)
                    note(f"done {outcome.key} ({label}) in {seconds:.1f} s", console=info)
            except KeyboardInterrupt:
                note(
                    Text(
                        f"interrupted: {finished} of {len(specs)} runs are stored in {store.root}; "
                        "run the same command again to resume",
                        style="yellow",
                    ),
                )
                raise typer.Exit(130) from None
    return failed


def sweep_summary(store: Any, run_ids: list[str]) -> pd.DataFrame:
    """The sweep table of ``run_ids`` from a `kvstream.results.ResultsStore`."""
    from kvstream.report.tables import sweep_table

    return sweep_table(store.rows(run_ids), run_ids)


def _label(config: CompressionConfig, sweep: Sweep) -> str:
    names = list(sweep.grid)
    if sweep.bits:
        names = ["key_bits_normal", "value_bits_normal", "key_bits_sink_outlier", "value_bits_sink_outlier", *names]
    values = config.to_dict()
    shown = [n for n in dict.fromkeys(names) if n in values]
    if sweep.bits:
        head = f"bits={config.key_bits_normal}/{config.key_bits_sink_outlier}"
        rest = [f"{n}={plain(values[n])}" for n in shown if "bits" not in n]
        return " ".join([head, *rest])
    return " ".join(f"{n}={plain(values[n])}" for n in shown)
