"""Retrieval benchmark of the evaluation suite: passkey and RULER-style needles, each cache against full precision.

What runs is declared in `PLAN` (sized to finish within three hours on two CPU cores) and `EXTENDED`
(``--extended``: the multi-needle tasks, about an hour more): rows of (model, task, context length,
samples) with the configurations run on them, the plain widths (normal bits N, sinks and outliers at
8: "N/8 bits") and the bit-budget presets of ``configs/`` (a missing preset file is named in one
line and its configurations are left out). The estimated time of what is selected is printed first.

Every run is stored as it finishes under ``--results`` (committed with the repository, so an
interrupted benchmark resumes in a later session on a fresh clone): a stored run is skipped only
when its full key (prompts, model files, dtype, device, library versions) still matches, and the
full-precision baseline of a row is measured once and reused by every configuration. The page is
rebuilt from every intact stored run, also with ``--report-only``.

    python benchmarks/retrieval.py --out docs/benchmarks-retrieval.md
    python benchmarks/retrieval.py --extended --tasks niah_multikey --lengths 4096
    python benchmarks/retrieval.py --report-only
"""

from __future__ import annotations

import argparse
import gc
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pandas as pd
import torch

import kvstream
from kvstream import CompressionConfig
from kvstream.config import ConfigError, resolve_config_path
from kvstream.data import MODEL_ALIASES
from kvstream.eval.runner import EvalSpec, plan_eval, run_plan
from kvstream.results import ResultsStore, StoredRun
from kvstream.results.provenance import short_revision
from kvstream.schema import FULL_PRECISION, QUANTIZED
from kvstream.tasks.base import Sample, TaskOptions

QWEN = "qwen2.5-coder-0.5b"
SMOLLM2 = "smollm2-135m"

WIDTHS: dict[str, int] = {"4/8 bits": 4, "3/8 bits": 3, "2/8 bits": 2}
"""Plain configurations by label: normal key and value bits, sinks and outliers at 8."""
PRESETS = ("bits-3.3", "bits-2.5")
"""Bit-budget presets of ``configs/``, labelled by name."""
ALL_CONFIGS = (*PRESETS, *WIDTHS)
LOSSY = "2/8 bits"
"""The known-lossy cache: a row where it scores like full precision cannot tell a good cache from a bad one."""

TOLERANCE: dict[str, int] = {"4/8 bits": 1, "3/8 bits": 1, "bits-3.3": 0, "bits-2.5": 1}
"""Target per configuration: the most samples by which its accuracy may differ from full precision (0: equal)."""
BUDGET: dict[str, float] = {"bits-3.3": 3.3, "bits-2.5": 2.5}
"""The most effective bits a preset may hold for its row to count: quality reached by spending more bits does not."""
ORDER = ("4/8 bits", "bits-3.3", "3/8 bits", "bits-2.5", "2/8 bits")
"""Configurations in the order the tables list them (most bits first)."""

SAMPLE_SECONDS: dict[tuple[str, int], float] = {
    (QWEN, 2048): 18.0,
    (QWEN, 4096): 34.0,
    (SMOLLM2, 8192): 43.0,
}
"""Seconds one sample takes through one cache on two CPU cores (prefill and answer): the durations of the
stored runs of revision f14537e divided by their samples, rounded up."""


@dataclass(frozen=True)
class PlanRow:
    """One task at one context length on one model, with the configurations run on its samples.

    Rows with the same model, task, length and samples share one full-precision baseline."""

    model: str
    task: str
    length: int
    samples: int
    configs: tuple[str, ...]

    @property
    def slot(self) -> tuple[str, str, int, int]:
        """What the baseline is shared by: model, task, length and samples."""
        return self.model, self.task, self.length, self.samples

    def options(self) -> TaskOptions:
        """The task options of the row (seed 0): what the run's and the baseline's keys are built from."""
        return TaskOptions(samples=self.samples, length=self.length, seed=0)

    def name(self) -> str:
        return f"{self.model} {self.task} {self.length}"


PLAN: tuple[PlanRow, ...] = (
    *(PlanRow(QWEN, task, length, 10, ALL_CONFIGS) for length in (2048, 4096) for task in ("passkey", "niah_single")),
    PlanRow(SMOLLM2, "passkey", 8192, 10, tuple(WIDTHS)),
    PlanRow(SMOLLM2, "niah_single", 8192, 10, tuple(WIDTHS)),
)
"""The benchmark `make bench` runs: presets and plain widths on the second model at 2k and 4k, SmolLM2 at 8k."""

EXTENDED: tuple[PlanRow, ...] = tuple(
    PlanRow(QWEN, task, length, 5, tuple(WIDTHS))
    for length in (2048, 4096)
    for task in ("niah_multikey", "niah_multivalue", "niah_multiquery")
)
"""``--extended``: the multi-needle tasks on the second model at 2k and 4k."""


# --------------------------------------------------------------------------- planning


def estimate_seconds(plan: Iterable[PlanRow]) -> float:
    """Time on two cores: each baseline once per shared slot, and every configuration, over every sample."""
    configs: dict[tuple[str, str, int, int], set[str]] = {}
    for row in plan:
        configs.setdefault(row.slot, set()).update(row.configs)
    return sum(
        SAMPLE_SECONDS[(model, length)] * samples * (len(labels) + 1)
        for (model, _, length, samples), labels in configs.items()
    )


def minutes(seconds: float) -> int:
    """Whole minutes, as the plan and the page state times."""
    return round(seconds / 60)


def configurations() -> dict[str, CompressionConfig]:
    """Label -> configuration: the plain widths, and each preset whose file exists (one line names a missing one)."""
    out = {label: CompressionConfig(key_bits_normal=b, value_bits_normal=b) for label, b in WIDTHS.items()}
    for name in PRESETS:
        try:
            path = resolve_config_path(name)
        except ConfigError as error:
            print(f"preset {name} skipped, its rows are not run: {error}", flush=True)
            continue
        out[name] = CompressionConfig.from_yaml(path)
    return out


def select(plan: Iterable[PlanRow], labels: Iterable[str], keep: Callable[[PlanRow], bool]) -> list[PlanRow]:
    """The rows ``keep`` accepts, each with only the configurations in ``labels``; rows left with none are dropped."""
    allowed = set(labels)
    rows = [replace(row, configs=tuple(c for c in row.configs if c in allowed)) for row in plan if keep(row)]
    return [row for row in rows if row.configs]


# --------------------------------------------------------------------------- running

Loader = Callable[[str], tuple[Any, Any]]
"""A model name -> (model, tokenizer)."""


def run_row(row: PlanRow, configs: dict[str, CompressionConfig], bundle: tuple[Any, Any], results: Path) -> None:
    """Each configuration of ``row`` on the same samples, skipping the runs stored on the same key."""
    samples: list[Sample] | None = None
    for label in row.configs:
        spec = EvalSpec(row.task, row.model, configs[label], row.options(), results_dir=results)
        planned = plan_eval(spec, bundle, samples=samples)
        samples = planned.samples
        if planned.stored.reusable:  # skipped only when its full key (prompts, model, versions, ...) matches
            continue
        for line in planned.notes():
            print(line, flush=True)
        start = time.perf_counter()
        run_plan(planned)
        print(f"{row.name()} {label}: {time.perf_counter() - start:.0f}s", flush=True)


def run(plan: list[PlanRow], configs: dict[str, CompressionConfig], results: Path, load: Loader) -> None:
    """Every row of ``plan`` in order, each model loaded once (its rows together)."""
    for model in dict.fromkeys(row.model for row in plan):
        bundle = load(model)
        for row in (r for r in plan if r.model == model):
            run_row(row, configs, bundle, results)
        del bundle
        gc.collect()


# --------------------------------------------------------------------------- reading the stored runs


def flips(rows: pd.DataFrame, metric: str) -> tuple[int, int]:
    """Samples right in full precision and wrong quantized (lost), and the reverse (gained)."""
    per_sample = rows[(rows["metric"] == metric) & (rows["sample"] != "")]  # aggregate rows have no sample
    table = per_sample.pivot_table(index="sample", columns="variant", values="value")
    if QUANTIZED not in table or FULL_PRECISION not in table:
        return 0, 0
    fp, quantized = table[FULL_PRECISION] > 0.5, table[QUANTIZED] > 0.5
    return int((fp & ~quantized).sum()), int((quantized & ~fp).sum())


COLUMNS = (
    *("model", "task", "length", "n", "label", "metric", "fp", "quantized", "delta", "ci_low", "ci_high"),
    *("lost", "gained", "bits", "bits_min", "bits_max", "revision", "torch", "started", "finished", "seconds"),
)
"""The fields of one record of `run_rows`."""


def run_rows(stored: StoredRun, labels: dict[str, str]) -> list[dict[str, Any]]:
    """One record per retrieval metric (accuracy, recall) of a stored run; ``labels`` maps config hashes to labels."""
    run, summary = stored.manifest, stored.summary.set_index("metric")
    config_hash = run["config_hash"]

    def quantized(name: str) -> float:
        return float(summary[QUANTIZED].get(name, float("nan")))

    records = []
    for metric in ("accuracy", "recall"):
        if metric not in summary.index:
            continue
        line = summary.loc[metric]
        n = int(line["n"]) if pd.notna(line["n"]) else 1
        lost, gained = flips(stored.rows, metric)
        records.append(
            dict(
                model=run["model"],
                task=run["task"],
                length=int(run["options"]["length"]),
                n=n,
                label=labels.get(config_hash, f"config {config_hash}"),
                metric=metric,
                fp=float(line[FULL_PRECISION]),
                quantized=float(line[QUANTIZED]),
                delta=float(line["delta"]),
                ci_low=float(line["ci_low"]) if n > 1 else float("nan"),
                ci_high=float(line["ci_high"]) if n > 1 else float("nan"),
                lost=lost,
                gained=gained,
                bits=quantized("bits_per_element"),
                bits_min=quantized("bits_per_element_min"),
                bits_max=quantized("bits_per_element_max"),
                revision=short_revision(run["revision"]),
                torch=run["versions"].get("torch") or "?",
                started=run["started_at"],
                finished=run["finished_at"],
                seconds=float(run.get("duration_seconds") or 0.0),
            )
        )
    return records


def collect(results: Path, labels: dict[str, str]) -> pd.DataFrame:
    """Every intact stored run's retrieval records, sorted for the tables; damaged runs are named and left out."""
    store = ResultsStore(results)
    intact, damaged = store.scan()
    for broken in damaged:
        print(f"damaged run {broken.run_id}: {broken.problem} (left out; the next run of the benchmark redoes it)")
    records = [record for run_id in intact for record in run_rows(store.read_run(run_id), labels)]
    frame = pd.DataFrame(records, columns=list(COLUMNS))
    frame["rank"] = frame["label"].map({label: i for i, label in enumerate(ORDER)}).fillna(len(ORDER))
    return frame.sort_values(["model", "task", "length", "n", "rank", "label", "metric"], ignore_index=True)


# --------------------------------------------------------------------------- the page


def net_samples(row: Any) -> int:
    """The accuracy difference from full precision in samples (positive: more answered)."""
    return round(row.delta * row.n)


def accuracy_missed(row: Any) -> bool:
    """Whether a row's accuracy differs from full precision by more samples than its configuration allows."""
    return abs(net_samples(row)) > TOLERANCE[row.label]


def over_budget(row: Any) -> bool:
    """Whether a preset's row held more effective bits (mean over its samples) than the preset's budget."""
    budget = BUDGET.get(row.label)
    return budget is not None and row.bits > budget


def verdict(row: Any) -> str:
    """``met`` / ``**missed**`` against the configuration's target (accuracy, and a preset's bit budget), ``-``
    where it has none (or for recall)."""
    tolerance = TOLERANCE.get(row.label)
    if tolerance is None or row.metric != "accuracy":
        return "-"
    if accuracy_missed(row):
        return "**missed**"
    return f"**missed** ({row.bits:.2f} > {BUDGET[row.label]} bits)" if over_budget(row) else "met"


def target_text(label: str) -> str:
    tolerance = TOLERANCE[label]
    text = (
        "equal to full precision"
        if tolerance == 0
        else f"within {'one sample' if tolerance == 1 else f'{tolerance} samples'} of full precision"
    )
    return f"{text}, holding at most {BUDGET[label]} effective bits" if label in BUDGET else text


def miss_reason(row: Any) -> str:
    """Why a row misses its target: its difference in samples, or the bits it held over the budget."""
    reasons = [f"{net_samples(row):+d}"] if accuracy_missed(row) else []
    return ", ".join(reasons + ([f"{row.bits:.2f} bits"] if over_budget(row) else []))


def target_lines(accuracy: pd.DataFrame) -> list[str]:
    """One line per target: how many rows meet it, and the rows that miss it with their difference in samples
    (and, for a preset, the bits it held where they exceed its budget)."""
    lines = []
    for label in (c for c in ORDER if c in TOLERANCE):
        rows = list(accuracy[accuracy["label"] == label].itertuples())
        head = f"- {label}, accuracy {target_text(label)}:"
        if not rows:
            lines.append(f"{head} no run recorded yet.")
            continue
        missed = [f"{r.model} {r.task} {r.length} ({miss_reason(r)})" for r in rows if verdict(r) != "met"]
        lines.append(
            f"{head} met on {len(rows) - len(missed)} of {len(rows)} rows; missed: {', '.join(missed) or 'none'}."
        )
    return lines


def interval(low: float, high: float) -> str:
    """A paired-bootstrap interval as ``[low, high]``, or ``-`` where there is none (one sample)."""
    return "-" if pd.isna(low) or pd.isna(high) else f"[{low:+.2f}, {high:+.2f}]"


def model_title(model: str) -> str:
    alias = MODEL_ALIASES.get(model)
    return f"{alias.description} (`{model}`)" if alias else f"`{model}`"


def model_table(rows: pd.DataFrame) -> list[str]:
    """The table of one model: a row per task, length, configuration and metric, full precision beside it."""
    lines = [
        "| task | context | configuration | effective bits (range) | samples | metric | full precision | quantized "
        "| delta | 95% CI | lost / gained | target | revision |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows.itertuples():
        changed = f"{r.lost} / {r.gained}" if r.metric == "accuracy" else "-"
        lines.append(
            f"| {r.task} | {r.length} | {r.label} | {r.bits:.2f} ({r.bits_min:.2f}-{r.bits_max:.2f}) | {r.n} "
            f"| {r.metric} | {r.fp:.3g} | {r.quantized:.3g} | {r.delta:+.3g} | {interval(r.ci_low, r.ci_high)} "
            f"| {changed} | {verdict(r)} | `{r.revision}` |"
        )
    return lines


def blind_rows(accuracy: pd.DataFrame) -> list[str]:
    """Task/length rows that cannot separate caches: full precision fails most samples, or 2/8 bits scores alike."""
    lines = []
    for (model, task, length, n), rows in accuracy.groupby(["model", "task", "length", "n"], sort=False):
        reasons = []
        fp = rows["fp"].iloc[0]
        if fp <= 0.5:
            reasons.append(f"full precision answers {round(fp * n)} of {n}")
        lossy = rows[rows["label"] == LOSSY]
        if not lossy.empty and lossy["quantized"].iloc[0] == lossy["fp"].iloc[0]:
            reasons.append(f"{LOSSY} scores the same as full precision ({round(fp * n)} of {n})")
        if reasons:
            samples = f"{n} sample{'s' if n != 1 else ''}"
            lines.append(f"- {model} {task} {length} ({samples}): {'; '.join(reasons)}.")
    return lines or ["- none among the recorded rows."]


def provenance_line(frame: pd.DataFrame) -> str:
    """Whether every row comes from one revision, the period, the versions and the time the runs took."""
    revisions = sorted(set(frame["revision"]))
    if len(revisions) == 1:
        where = f"All rows come from one revision, `{revisions[0]}`"
    else:
        where = (
            f"Rows come from {len(revisions)} revisions ({', '.join(f'`{r}`' for r in revisions)}), named on each row"
        )
    period = f"{frame['started'].min()[:16].replace('T', ' ')} to {frame['finished'].max()[:16].replace('T', ' ')} UTC"
    torch_versions = ", ".join(sorted(set(frame["torch"])))
    runs = frame.drop_duplicates(["model", "task", "length", "n", "label"])
    return (
        f"**{where}.** Runs recorded {period}, torch {torch_versions}; the {len(runs)} runs took "
        f"{minutes(runs['seconds'].sum())} min in all."
    )


def plan_table(
    plan: tuple[PlanRow, ...], recorded: set[tuple[str, str, int, int, str]], before: tuple[PlanRow, ...] = ()
) -> list[str]:
    """The plan's rows with their estimated minutes and how many of their configurations are recorded.

    A row's minutes are what it adds to ``before`` and the rows above it (a baseline already planned is not
    counted again)."""
    lines = [
        "| model | task | context | samples | configurations | estimated min | recorded |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in plan:
        done = sum((*row.slot, label) in recorded for label in row.configs)
        added = estimate_seconds((*before, row)) - estimate_seconds(before)
        before = (*before, row)
        lines.append(
            f"| {row.model} | {row.task} | {row.length} | {row.samples} | {', '.join(row.configs)} "
            f"| {minutes(added)} | {done} of {len(row.configs)} |"
        )
    return lines


def models_by_length(plan: Iterable[PlanRow]) -> str:
    lengths: dict[str, set[int]] = {}
    for row in plan:
        lengths.setdefault(row.model, set()).add(row.length)
    return "; ".join(f"`{model}` at {' and '.join(map(str, sorted(n)))} tokens" for model, n in lengths.items())


def render(frame: pd.DataFrame, plan: tuple[PlanRow, ...], extended: tuple[PlanRow, ...]) -> str:
    """The Markdown page: status, targets, one table per model, the rows that cannot separate caches, the plan."""
    core = minutes(estimate_seconds(plan))
    more = minutes(estimate_seconds(plan + extended)) - core
    lines = [
        "# Retrieval (evaluation suite)",
        "",
        "Written by `python benchmarks/retrieval.py` from every intact run stored under its `--results` folder "
        "(`benchmarks/results/retrieval`, committed with the repository, so an interrupted benchmark resumes in a "
        "later session). Passkey (the classic test) and RULER-style needles in Paul Graham essays, offline data, "
        f"fp32, chunk size 256; models by length: {models_by_length(plan + extended)}. Each cache runs on the same "
        "samples as the full-precision cache, which is measured once per model, task, length and sample count and "
        "reused by every configuration while its key (prompts, model files, dtype, device, library versions) "
        "matches. Configurations: normal bits N with sinks and outliers at 8 (`N/8 bits`) and the bit-budget "
        "presets `configs/bits-3.3.yaml` and `configs/bits-2.5.yaml`, each with the effective bits it held: every "
        "byte at the end of generation, full-precision tail included, mean over the samples (range). The tail (the "
        "tokens since the last full chunk, the prompt's last partial chunk and the answer's tokens) is held exact "
        "in fp32 for every configuration: 255 such tokens alone add about 4 bits per element at 2048 tokens and 2 "
        "at 4096, which is why the bits of one row range so widely across its samples.",
        "",
        "Accuracy is the share of samples whose answer holds every expected value, recall (multi-value and "
        "multi-query needles) the share of expected values found; the interval is the 95% paired bootstrap "
        "interval of the delta over samples; lost / gained count the samples full precision answers and the cache "
        "does not, and the reverse. A preset's row meets its target only while it held at most the preset's "
        "effective bits (mean over the samples): quality reached by spending more bits does not count. Each row "
        "names the revision it was measured at. Perplexity per strategy is "
        "measured by `benchmarks/quality.py` ([benchmarks-quality.md](benchmarks-quality.md)).",
        "",
    ]
    if frame.empty:
        status = f"**No runs are recorded yet for this plan** (estimated {core} min on two CPU cores; see the plan)."
    else:
        status = provenance_line(frame)
    accuracy = frame[frame["metric"] == "accuracy"]
    lines += [status, "", "## Targets", "", *target_lines(accuracy), ""]
    for model, rows in frame.groupby("model", sort=False):
        lines += [f"## {model_title(str(model))}", "", *model_table(rows), ""]
    lines += [
        "## Rows that cannot separate a good cache from a bad one",
        "",
        f"A task/length row where full precision itself fails most samples (accuracy <= 0.5), or where {LOSSY} "
        "(a known-lossy cache) scores the same as full precision, cannot tell caches apart: a target met there "
        f"says little. Rows without a {LOSSY} run are judged on full precision alone.",
        "",
        *(blind_rows(accuracy) if not accuracy.empty else ["- no run recorded yet."]),
        "",
    ]
    recorded = set(zip(frame.model, frame.task, frame.length, frame.n, frame.label, strict=True))
    lines += [
        "## Plan",
        "",
        f"`make bench` runs these rows, estimated {core} min on two CPU cores (a sample through one cache: "
        + ", ".join(f"{model} {length} tokens {s:.0f} s" for (model, length), s in SAMPLE_SECONDS.items())
        + "; each baseline once):",
        "",
        *plan_table(plan, recorded),
        "",
        f"`--extended` adds these rows, another {more} min (the results store resumes them across sessions):",
        "",
        *plan_table(extended, recorded, plan),
    ]
    return "\n".join(lines) + "\n"


def write_report(results: Path, out: Path, configs: dict[str, CompressionConfig]) -> None:
    """Rebuild the page at ``out`` from every intact run under ``results``."""
    labels = {config.config_hash(): label for label, config in configs.items()}
    page = render(collect(results, labels), PLAN, EXTENDED)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page)
    print(f"wrote {out}")


# --------------------------------------------------------------------------- command line


def comma_list(text: str) -> list[str]:
    """``a,b`` -> ``["a", "b"]``."""
    return [part.strip() for part in text.split(",") if part.strip()]


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--extended", action="store_true", help="also run the extended rows (about an hour more)")
    parser.add_argument("--models", type=comma_list, default=None, help="only these models of the plan")
    parser.add_argument("--tasks", type=comma_list, default=None, help="only these tasks of the plan")
    parser.add_argument("--lengths", type=lambda s: [int(x) for x in comma_list(s)], default=None)
    parser.add_argument("--configs", type=comma_list, default=None, help=f"only these of {', '.join(ORDER)}")
    parser.add_argument("--results", type=Path, default=Path("benchmarks/results/retrieval"))
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks-retrieval.md"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--report-only", action="store_true", help="rebuild the page from the stored runs")
    args = parser.parse_args()
    everything = PLAN + EXTENDED
    known = {
        "models": {row.model for row in everything},
        "tasks": {row.task for row in everything},
        "lengths": {row.length for row in everything},
        "configs": set(ORDER),
    }
    for name, values in known.items():
        unknown = [str(v) for v in getattr(args, name) or [] if v not in values]
        if unknown:
            parser.error(
                f"--{name}: {', '.join(unknown)} not in the plan (one of {', '.join(map(str, sorted(values)))})"
            )
    return args


def wanted(row: PlanRow, args: argparse.Namespace) -> bool:
    """Whether ``row`` passes the ``--models``, ``--tasks`` and ``--lengths`` filters (each absent: any)."""
    filters = ((row.model, args.models), (row.task, args.tasks), (row.length, args.lengths))
    return all(allowed is None or value in allowed for value, allowed in filters)


def main() -> None:
    args = arguments()
    torch.set_num_threads(args.threads)
    configs = configurations()
    if not args.report_only:
        labels = [label for label in configs if args.configs is None or label in args.configs]
        plan = select(PLAN + EXTENDED if args.extended else PLAN, labels, lambda row: wanted(row, args))
        print(f"{len(plan)} rows, estimated {minutes(estimate_seconds(plan))} min on two CPU cores", flush=True)
        run(plan, configs, args.results, kvstream.load_model)
    write_report(args.results, args.out, configs)


if __name__ == "__main__":
    main()
