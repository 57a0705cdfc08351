"""Running a task with the quantized cache and its full-precision baseline, on the same samples.

`run_eval` builds the task's samples once, runs every sample through the cache strategy the
config names (the *quantized* variant) and through `FullPrecisionCache` (the *full_precision*
variant, ``cache="full"``), and returns and saves:

* ``rows``: a tidy frame, one observation per row (see `TIDY_COLUMNS`): the task's per-sample
  metrics of both variants, then per variant the mean of each metric (``sample == ""``) and the
  resource metrics (`kvstream.schema.RESOURCE_METRICS`);
* ``summary``: one row per metric with both means, their difference and, for the task's metrics,
  a paired bootstrap interval of the difference;
* ``manifest``: configuration, options, library versions, git revision, timestamps.

Files go to ``results_dir/<run_id>/{rows.csv,summary.csv,manifest.json}``, written into a
temporary folder renamed into place, so an interrupted run leaves nothing that looks finished.
The full-precision rows are kept under ``results_dir/_baseline/<key>/`` keyed by task, model and
options, and reused by every later run with the same key (another bit width, chunk size, ...).
"""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from kvstream.config import CompressionConfig
from kvstream.eval.memory import MemoryMonitor
from kvstream.eval.stats import paired_bootstrap_delta
from kvstream.schema import FULL_PRECISION, QUANTIZED, VARIANTS
from kvstream.tasks.base import Row, RunContext, Sample, TaskOptions

DEFAULT_MODEL = "smollm2-135m"
BASELINE_DIR = "_baseline"
FORMAT_VERSION = 1

CONFIG_COLUMNS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(CompressionConfig) if f.name != "cache")
TIDY_COLUMNS: tuple[str, ...] = (
    "run_id",
    "task",
    "model",
    "variant",
    "cache",
    "sample",
    "metric",
    "value",
    *CONFIG_COLUMNS,
    "extra",
)
"""Columns of the tidy rows; ``cache`` is the config's cache strategy, the other config fields follow."""

SUMMARY_COLUMNS: tuple[str, ...] = (
    "run_id",
    "task",
    "model",
    "metric",
    "kind",
    QUANTIZED,
    FULL_PRECISION,
    "delta",
    "ci_low",
    "ci_high",
    "n",
)


_STRING_COLUMNS = ("run_id", "task", "model", "variant", "cache", "sample", "metric", "extra") + tuple(
    f.name for f in dataclasses.fields(CompressionConfig) if f.type in ("str", str) or "Literal" in str(f.type)
)

ProgressCallback = Callable[[str, int, int], None]
"""``progress(what, done, total)``."""


# --------------------------------------------------------------------------- identities


def slug(text: str, limit: int = 60) -> str:
    """A filesystem-safe form of ``text``; a short hash is appended when characters had to change."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.") or "x"
    if safe != text or len(safe) > limit:
        safe = f"{safe[:limit]}-{_digest(text, 6)}"
    return safe


def _digest(value: Any, length: int) -> str:
    blob = json.dumps(value, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:length]


def options_dict(options: TaskOptions) -> dict[str, Any]:
    return dataclasses.asdict(options)


def options_hash(options: TaskOptions) -> str:
    """Stable short hash of the task options."""
    return _digest(options_dict(options), 8)


def task_name(task: Any) -> str:
    return task if isinstance(task, str) else str(task.name)


def baseline_key(task: str, model: str, options: TaskOptions) -> str:
    """Folder name under ``_baseline/`` of the full-precision rows for (task, model, options)."""
    digest = _digest({"task": task, "model": model, "options": options_dict(options), "format": FORMAT_VERSION}, 16)
    return f"{slug(task)}__{slug(model)}__{digest}"


@dataclass
class EvalSpec:
    """One evaluation: which task (a registered name or a Task object), model, compression config and options."""

    task: str | Any
    model: str = DEFAULT_MODEL
    config: CompressionConfig = field(default_factory=CompressionConfig)
    options: TaskOptions = field(default_factory=TaskOptions)
    results_dir: Path = Path("results")

    @property
    def task_name(self) -> str:
        return task_name(self.task)

    def run_id(self) -> str:
        """``<task>__<model>__<config hash>__<options hash>``: deterministic and filesystem-safe."""
        return f"{slug(self.task_name)}__{slug(self.model)}__{self.config.config_hash()}__{options_hash(self.options)}"

    def baseline_key(self) -> str:
        return baseline_key(self.task_name, self.model, self.options)


@dataclass
class EvalResult:
    run_id: str
    rows: pd.DataFrame
    """Tidy rows of both variants (see `TIDY_COLUMNS`)."""
    summary: pd.DataFrame
    """One row per metric (see `SUMMARY_COLUMNS`)."""
    manifest: dict[str, Any]
    path: Path
    """The run's folder: ``results_dir/<run_id>``."""


# --------------------------------------------------------------------------- running one variant


@dataclass
class _Recorder:
    """Cache reports and timings collected while one variant runs."""

    reports: list[dict[str, Any]] = field(default_factory=list)
    outliers: list[dict[int, dict[str, float]]] = field(default_factory=list)
    prefill_seconds: list[float] = field(default_factory=list)
    decode_seconds_per_token: list[float] = field(default_factory=list)

    def cache_done(self, cache: Any) -> None:
        report = getattr(cache, "memory_report", None)
        if callable(report):
            self.reports.append(dict(report()))
        snapshot = getattr(cache, "outlier_snapshot", None)
        if callable(snapshot):
            self.outliers.append(dict(snapshot()))


def _model_device(model: Any) -> torch.device:
    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError):
        return torch.device("cpu")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def eos_ids(tokenizer: Any) -> set[int]:
    """The tokenizer's ``eos_token_id`` (an id or a list of ids) as a set."""
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        return set()
    if isinstance(eos, int):
        return {eos}
    return {int(e) for e in eos}


def make_context(
    model: Any, tokenizer: Any, config: CompressionConfig, recorder: _Recorder | None = None
) -> RunContext:
    """A `RunContext` whose caches are the strategy ``config`` names; measurements go to ``recorder``."""
    from kvstream.engine import greedy_generate, streaming_perplexity
    from kvstream.engine import make_cache as build_cache

    recorder = recorder if recorder is not None else _Recorder()
    device = _model_device(model)
    eos = eos_ids(tokenizer)

    def new_cache() -> Any:
        return build_cache(model, config)

    def generate(prompt_ids: Any, max_new_tokens: int) -> str:
        ids = torch.as_tensor(prompt_ids, dtype=torch.long, device=device)
        if ids.dim() == 1:
            ids = ids.unsqueeze(0)
        cache = new_cache()
        marks: dict[str, float] = {}

        def prefill_done() -> None:
            _sync(device)
            marks["prefill"] = time.perf_counter()

        _sync(device)
        start = time.perf_counter()
        out = greedy_generate(
            model,
            ids,
            cache,
            max_new_tokens,
            config.chunk_size,
            eos_token_ids=eos or None,
            on_prefill_done=prefill_done,
        )
        _sync(device)
        end = time.perf_counter()
        prefilled = marks.get("prefill", end)
        recorder.prefill_seconds.append(prefilled - start)
        steps = out.shape[1] - 1
        if steps > 0:
            recorder.decode_seconds_per_token.append((end - prefilled) / steps)
        recorder.cache_done(cache)
        return tokenizer.decode(out[0].tolist(), skip_special_tokens=True)

    def perplexity(input_ids: Any) -> Any:
        ids = torch.as_tensor(input_ids, dtype=torch.long, device=device)
        if ids.dim() == 1:
            ids = ids.unsqueeze(0)
        cache = new_cache()
        _sync(device)
        start = time.perf_counter()
        result = streaming_perplexity(model, ids, cache, config.chunk_size)
        _sync(device)
        recorder.prefill_seconds.append(time.perf_counter() - start)
        recorder.cache_done(cache)
        return result

    return RunContext(
        model=model,
        tokenizer=tokenizer,
        make_cache=new_cache,
        chunk_size=config.chunk_size,
        generate=generate,
        perplexity=perplexity,
        on_cache=recorder.cache_done,
    )


def _row_dict(
    run_id: str, task: str, model: str, variant: str, config: CompressionConfig, row: Row, sample: str
) -> dict[str, Any]:
    values = config.to_dict()
    out: dict[str, Any] = {
        "run_id": run_id,
        "task": task,
        "model": model,
        "variant": variant,
        "cache": config.cache,
        "sample": sample,
        "metric": row.metric,
        "value": float(row.value),
    }
    out.update({name: values[name] for name in CONFIG_COLUMNS})
    out["extra"] = json.dumps(row.extra, sort_keys=True, default=str, ensure_ascii=False)
    return out


def _mean(values: list[float]) -> float | None:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return float(np.mean(finite)) if finite else None


def _resource_rows(recorder: _Recorder, monitor: MemoryMonitor) -> list[Row]:
    rows: list[Row] = []

    def add(metric: str, value: float | None, extra: dict[str, Any] | None = None) -> None:
        if value is not None:
            rows.append(Row(metric=metric, value=float(value), extra=extra or {}))

    if recorder.reports:
        last = recorder.reports[-1]
        add("bits_per_element", last.get("bits_per_element"))
        add("ratio_to_fp16", last.get("ratio_to_fp16"))
        add("cache_bytes", last.get("stored_bytes"), {"breakdown": last.get("breakdown", {})})
        add("peak_cache_bytes", max(r.get("peak_stored_bytes", r.get("stored_bytes", 0)) for r in recorder.reports))
        add("fp16_bytes", last.get("fp16_bytes"))
    add("peak_rss_bytes", monitor.peak_rss_bytes or None)
    add("peak_accelerator_bytes", monitor.peak_accelerator_bytes)
    add("prefill_seconds", _mean(recorder.prefill_seconds))
    add("decode_seconds_per_token", _mean(recorder.decode_seconds_per_token))
    if recorder.outliers and recorder.outliers[-1]:
        layers = recorder.outliers[-1]
        names = sorted({name for values in layers.values() for name in values})
        for name in names:
            add(name, _mean([float(values[name]) for values in layers.values() if name in values]))
    return rows


def run_variant(
    task: Any,
    samples: list[Sample],
    model: Any,
    tokenizer: Any,
    config: CompressionConfig,
    *,
    run_id: str,
    model_name: str,
    variant: str,
    progress: ProgressCallback | None = None,
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Tidy rows of every sample with ``config``'s cache, plus the variant's aggregate rows."""
    name = task_name(task)
    recorder = _Recorder()
    records: list[dict[str, Any]] = []
    per_sample: dict[str, list[float]] = {}
    gc.collect()
    started = time.perf_counter()
    if progress:
        progress(variant, 0, len(samples))
    with MemoryMonitor(device=_model_device(model)) as monitor:
        for done, sample in enumerate(samples, start=1):
            ctx = make_context(model, tokenizer, config, recorder)
            for row in task.run(ctx, sample):
                sample_id = row.sample if row.sample is not None else sample.id
                records.append(_row_dict(run_id, name, model_name, variant, config, row, str(sample_id)))
                per_sample.setdefault(row.metric, []).append(float(row.value))
            if progress:
                progress(variant, done, len(samples))
    for metric, values in per_sample.items():
        value = _mean(values)
        aggregate = Row(metric=metric, value=math.nan if value is None else value, extra={"n": len(values)})
        records.append(_row_dict(run_id, name, model_name, variant, config, aggregate, ""))
    for row in _resource_rows(recorder, monitor):
        records.append(_row_dict(run_id, name, model_name, variant, config, row, ""))
    info = {"seconds": time.perf_counter() - started, "memory": monitor.as_dict(), "caches": len(recorder.reports)}
    return _frame(records), info


def _frame(records: list[dict[str, Any]]) -> pd.DataFrame:
    frame = pd.DataFrame.from_records(records, columns=list(TIDY_COLUMNS))
    frame["value"] = frame["value"].astype(float)
    return frame


# --------------------------------------------------------------------------- summary


def summarize(rows: pd.DataFrame, n_boot: int = 2000, alpha: float = 0.05, seed: int = 0) -> pd.DataFrame:
    """One row per metric: both variants' means, the difference and its paired bootstrap interval.

    Task metrics (those with per-sample rows) are paired by sample id; resource metrics (aggregate
    rows only) get the difference of the two aggregates and no interval.
    """
    out: list[dict[str, Any]] = []
    if rows.empty:
        return pd.DataFrame(columns=list(SUMMARY_COLUMNS))
    run_id, task, model = (str(rows[c].iloc[0]) for c in ("run_id", "task", "model"))
    per = rows[rows["sample"] != ""]
    agg = rows[rows["sample"] == ""]
    task_metrics = list(dict.fromkeys(per["metric"]))
    for metric in task_metrics:
        series = {
            variant: per[(per["variant"] == variant) & (per["metric"] == metric)]
            .drop_duplicates("sample")
            .set_index("sample")["value"]
            for variant in VARIANTS
        }
        q, b = series[QUANTIZED], series[FULL_PRECISION]
        common = [s for s in q.index if s in b.index]
        q_mean = float(q.mean()) if len(q) else math.nan
        b_mean = float(b.mean()) if len(b) else math.nan
        if common:
            ci = paired_bootstrap_delta(
                q.loc[common].to_numpy(), b.loc[common].to_numpy(), n_boot=n_boot, alpha=alpha, seed=seed
            )
            delta, low, high = ci.estimate, ci.low, ci.high
        else:
            delta, low, high = q_mean - b_mean, math.nan, math.nan
        out.append(
            {
                "metric": metric,
                "kind": "task",
                QUANTIZED: q_mean,
                FULL_PRECISION: b_mean,
                "delta": delta,
                "ci_low": low,
                "ci_high": high,
                "n": len(common),
            }
        )
    for metric in dict.fromkeys(agg["metric"]):
        if metric in task_metrics:
            continue
        values = {v: agg[(agg["variant"] == v) & (agg["metric"] == metric)]["value"] for v in VARIANTS}
        q_val = float(values[QUANTIZED].iloc[0]) if len(values[QUANTIZED]) else math.nan
        b_val = float(values[FULL_PRECISION].iloc[0]) if len(values[FULL_PRECISION]) else math.nan
        out.append(
            {
                "metric": metric,
                "kind": "resource",
                QUANTIZED: q_val,
                FULL_PRECISION: b_val,
                "delta": q_val - b_val,
                "ci_low": math.nan,
                "ci_high": math.nan,
                "n": 1,
            }
        )
    frame = pd.DataFrame.from_records(out, columns=[c for c in SUMMARY_COLUMNS if c not in ("run_id", "task", "model")])
    frame.insert(0, "model", model)
    frame.insert(0, "task", task)
    frame.insert(0, "run_id", run_id)
    return frame[list(SUMMARY_COLUMNS)]


# --------------------------------------------------------------------------- files


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def write_dir_atomic(target: Path, files: dict[str, Callable[[Path], None]]) -> None:
    """Create ``target`` holding ``files`` (name -> writer of that path) in one rename.

    The files are written into a temporary sibling folder first; an existing ``target`` is moved
    aside and deleted only once the new folder is in place.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        for name, writer in files.items():
            writer(tmp / name)
        old = None
        if target.exists():
            old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(target, old)
        os.replace(tmp, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _json_writer(data: Any) -> Callable[[Path], None]:
    def write(path: Path) -> None:
        path.write_text(json.dumps(data, indent=2, sort_keys=False, default=str) + "\n", encoding="utf-8")

    return write


def _csv_writer(frame: pd.DataFrame) -> Callable[[Path], None]:
    def write(path: Path) -> None:
        frame.to_csv(path, index=False)

    return write


def read_rows(path: Path) -> pd.DataFrame:
    """A ``rows.csv`` back as the tidy frame (empty strings kept, ids kept as text)."""
    dtypes = {c: str for c in _STRING_COLUMNS}
    frame = pd.read_csv(path, dtype=dtypes)
    for column in _STRING_COLUMNS:
        if column in frame.columns:
            frame[column] = frame[column].fillna("").astype(str)
    if "value" in frame.columns:
        frame["value"] = frame["value"].astype(float)
    return frame


def run_exists(results_dir: Path, run_id: str) -> bool:
    """Whether a finished run (rows, summary and manifest) is saved under ``results_dir/run_id``."""
    folder = Path(results_dir) / run_id
    return all((folder / name).is_file() for name in ("rows.csv", "summary.csv", "manifest.json"))


def _run_dirs(results_dir: Path) -> list[Path]:
    root = Path(results_dir)
    if not root.is_dir():
        return []
    return [
        d
        for d in sorted(root.iterdir())
        if d.is_dir() and not d.name.startswith((".", "_")) and run_exists(root, d.name)
    ]


def load_results(results_dir: Path) -> pd.DataFrame:
    """Every finished run's tidy rows under ``results_dir``, concatenated (an empty frame when none)."""
    frames = [read_rows(d / "rows.csv") for d in _run_dirs(results_dir)]
    frames = [f for f in frames if not f.empty]
    if not frames:
        return pd.DataFrame(columns=list(TIDY_COLUMNS))
    return pd.concat(frames, ignore_index=True)


def load_summaries(results_dir: Path) -> pd.DataFrame:
    """Every finished run's summary under ``results_dir``, concatenated."""
    frames = [
        pd.read_csv(d / "summary.csv", dtype={"run_id": str, "task": str, "model": str, "metric": str})
        for d in _run_dirs(results_dir)
    ]
    frames = [f for f in frames if not f.empty]
    if not frames:
        return pd.DataFrame(columns=list(SUMMARY_COLUMNS))
    return pd.concat(frames, ignore_index=True)


def load_run(results_dir: Path, run_id: str) -> EvalResult:
    """A saved run as an `EvalResult`."""
    folder = Path(results_dir) / run_id
    if not run_exists(results_dir, run_id):
        raise FileNotFoundError(f"no finished run {run_id!r} in {results_dir}")
    summary = pd.read_csv(folder / "summary.csv", dtype={"run_id": str, "task": str, "model": str, "metric": str})
    manifest = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
    return EvalResult(
        run_id=run_id, rows=read_rows(folder / "rows.csv"), summary=summary, manifest=manifest, path=folder
    )


# --------------------------------------------------------------------------- provenance


def _version(distribution: str) -> str | None:
    import importlib.metadata as md

    try:
        return md.version(distribution)
    except md.PackageNotFoundError:
        return None


def library_versions() -> dict[str, str | None]:
    import transformers

    import kvstream

    return {
        "kvstream": getattr(kvstream, "__version__", None) or _version("kvstream"),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "pandas": pd.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
    }


def _read_git_dir(root: Path) -> str | None:
    git = root / ".git"
    if git.is_file():
        text = git.read_text().strip()
        if not text.startswith("gitdir:"):
            return None
        git = (root / text.split(":", 1)[1].strip()).resolve()
    if not (git / "HEAD").is_file():
        return None
    head = (git / "HEAD").read_text().strip()
    if not head.startswith("ref:"):
        return head or None
    ref = head.split(":", 1)[1].strip()
    common = git
    if (git / "commondir").is_file():
        common = (git / (git / "commondir").read_text().strip()).resolve()
    for base in (git, common):
        path = base / ref
        if path.is_file():
            return path.read_text().strip() or None
    packed = common / "packed-refs"
    if packed.is_file():
        for line in packed.read_text().splitlines():
            parts = line.split()
            if len(parts) == 2 and parts[1] == ref:
                return parts[0]
    return None


def git_revision() -> str | None:
    """The commit of the kvstream source tree, when it is a git checkout (else None)."""
    root = Path(__file__).resolve().parent.parent.parent
    try:
        found = _read_git_dir(root)
    except OSError:
        found = None
    if found:
        return found
    if not (root / ".git").exists():
        return None
    try:
        done = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if done.returncode != 0:
        return None
    return done.stdout.strip() or None


# --------------------------------------------------------------------------- the run


def _resolve_task(task: Any) -> Any:
    if isinstance(task, str):
        from kvstream import registry

        return registry.get("tasks", task)
    missing = [attr for attr in ("samples", "run") if not callable(getattr(task, attr, None))]
    if missing or not getattr(task, "name", None):
        raise TypeError(f"{task!r} is not a task (needs a name, samples() and run())")
    return task


def _load_baseline(folder: Path, sample_ids: list[str]) -> pd.DataFrame | None:
    rows_path, meta_path = folder / "rows.csv", folder / "meta.json"
    if not (rows_path.is_file() and meta_path.is_file()):
        return None
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    if meta.get("format") != FORMAT_VERSION or meta.get("samples") != sample_ids:
        return None
    return read_rows(rows_path)


def run_eval(
    spec: EvalSpec,
    *,
    bundle: tuple[Any, Any] | None = None,
    progress: ProgressCallback | None = None,
) -> EvalResult:
    """Run ``spec`` with the quantized cache and the full-precision baseline; save and return the result.

    ``bundle=(model, tokenizer)`` skips loading ``spec.model``. The baseline rows are reused from
    ``results_dir/_baseline/<key>`` when a run with the same task, model and options (and the same
    sample ids) made them. A task whose data is missing raises `TaskDataMissing` before any model runs.
    """
    from kvstream.engine import load_model

    started_at = _now()
    clock = time.perf_counter()
    results_dir = Path(spec.results_dir)
    run_id = spec.run_id()
    task = _resolve_task(spec.task)
    name = task_name(task)
    config = spec.config
    baseline_config = config.replace(cache="full")

    model, tokenizer = bundle if bundle is not None else load_model(spec.model)
    if progress:
        progress("samples", 0, 1)
    samples = task.samples(spec.options, tokenizer)
    if progress:
        progress("samples", 1, 1)
    sample_ids = [str(s.id) for s in samples]
    if len(set(sample_ids)) != len(sample_ids):
        raise ValueError(f"task {name!r} produced duplicate sample ids")

    quantized, q_info = run_variant(
        task,
        samples,
        model,
        tokenizer,
        config,
        run_id=run_id,
        model_name=spec.model,
        variant=QUANTIZED,
        progress=progress,
    )

    key = spec.baseline_key()
    baseline_folder = results_dir / BASELINE_DIR / key
    baseline = _load_baseline(baseline_folder, sample_ids)
    reused = baseline is not None
    b_info: dict[str, Any] = {}
    if baseline is None:
        baseline, b_info = run_variant(
            task,
            samples,
            model,
            tokenizer,
            baseline_config,
            run_id=run_id,
            model_name=spec.model,
            variant=FULL_PRECISION,
            progress=progress,
        )
        meta = {
            "format": FORMAT_VERSION,
            "key": key,
            "task": name,
            "model": spec.model,
            "options": options_dict(spec.options),
            "config": baseline_config.to_dict(),
            "samples": sample_ids,
            "computed_by": run_id,
            "created_at": _now(),
            "info": b_info,
        }
        write_dir_atomic(baseline_folder, {"rows.csv": _csv_writer(baseline), "meta.json": _json_writer(meta)})
    else:
        baseline = baseline.copy()
        baseline["run_id"] = run_id
        if progress:
            progress(f"{FULL_PRECISION} (cached)", len(samples), len(samples))

    rows = pd.concat([quantized, baseline], ignore_index=True)[list(TIDY_COLUMNS)]
    summary = summarize(rows, seed=spec.options.seed)
    device = _model_device(model)
    manifest = {
        "format": FORMAT_VERSION,
        "run_id": run_id,
        "task": name,
        "model": spec.model,
        "options": options_dict(spec.options),
        "config": config.to_dict(),
        "config_hash": config.config_hash(),
        "baseline_config": baseline_config.to_dict(),
        "baseline": {"key": key, "reused": reused, "path": str(baseline_folder)},
        "samples": sample_ids,
        "n_samples": len(samples),
        "per_sample_metric": getattr(task, "per_sample_metric", None),
        "versions": library_versions(),
        "git_revision": git_revision(),
        "device": str(device),
        "platform": platform.platform(),
        "argv": list(sys.argv),
        "variants": {QUANTIZED: q_info, FULL_PRECISION: b_info or {"reused": True}},
        "started_at": started_at,
        "finished_at": _now(),
        "duration_seconds": round(time.perf_counter() - clock, 3),
    }
    folder = results_dir / run_id
    write_dir_atomic(
        folder,
        {
            "rows.csv": _csv_writer(rows),
            "summary.csv": _csv_writer(summary),
            "manifest.json": _json_writer(manifest),
        },
    )
    return EvalResult(run_id=run_id, rows=rows, summary=summary, manifest=manifest, path=folder)
