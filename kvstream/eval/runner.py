"""Running a task with the quantized cache and its full-precision baseline, on the same samples.

`run_eval` builds the task's samples once, runs every sample through the cache strategy the
config names (the *quantized* variant) and through `FullPrecisionCache` (the *full_precision*
variant, ``cache="full"``), summarises both (`kvstream.eval.summary`) and stores the run in the
results store (`kvstream.results`): tidy rows, summary and manifest. The full-precision rows are
kept in a baseline slot of the store and reused by every later run of the same task, model and
options (another bit width, chunk size, ...).
"""

from __future__ import annotations

import gc
import json
import math
import platform
import sys
import time
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
from kvstream.eval.summary import summarize
from kvstream.results import keys
from kvstream.results.provenance import git_revision, library_versions
from kvstream.results.store import ResultsStore, StoredRun
from kvstream.schema import CONFIG_COLUMNS, FULL_PRECISION, QUANTIZED, TIDY_COLUMNS
from kvstream.tasks.base import Row, RunContext, Sample, TaskOptions

DEFAULT_MODEL = "smollm2-135m"

ProgressCallback = Callable[[str, int, int], None]
"""``progress(what, done, total)``."""


# --------------------------------------------------------------------------- identities


def task_name(task: Any) -> str:
    return task if isinstance(task, str) else str(task.name)


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
        return keys.run_id(self.task_name, self.model, self.config.config_hash(), self.options)

    def baseline_slot(self) -> str:
        return keys.baseline_slot(self.task_name, self.model, self.options)


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

    def generate(
        prompt_ids: Any, max_new_tokens: int, eos_token_ids: set[int] | None = None, min_new_tokens: int = 0
    ) -> str:
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
            eos_token_ids=(eos if eos_token_ids is None else eos_token_ids) or None,
            on_prefill_done=prefill_done,
            min_new_tokens=min_new_tokens,
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


# --------------------------------------------------------------------------- the run


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _resolve_task(task: Any) -> Any:
    if isinstance(task, str):
        from kvstream import registry

        return registry.get("tasks", task)
    missing = [attr for attr in ("samples", "run") if not callable(getattr(task, attr, None))]
    if missing or not getattr(task, "name", None):
        raise TypeError(f"{task!r} is not a task (needs a name, samples() and run())")
    return task


def run_eval(
    spec: EvalSpec,
    *,
    bundle: tuple[Any, Any] | None = None,
    progress: ProgressCallback | None = None,
) -> StoredRun:
    """Run ``spec`` with the quantized cache and the full-precision baseline; save and return the result.

    ``bundle=(model, tokenizer)`` skips loading ``spec.model``. The baseline rows are reused from
    the store's baseline slot when a run with the same task, model and options (and the same
    sample ids) made them. A task whose data is missing raises `TaskDataMissing` before any model runs.
    """
    from kvstream.engine import load_model

    started_at = _now()
    clock = time.perf_counter()
    store = ResultsStore(spec.results_dir)
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

    slot = spec.baseline_slot()
    baseline = store.read_baseline(slot, sample_ids)
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
            "format": keys.FORMAT_VERSION,
            "key": slot,
            "task": name,
            "model": spec.model,
            "options": keys.options_dict(spec.options),
            "config": baseline_config.to_dict(),
            "samples": sample_ids,
            "computed_by": run_id,
            "created_at": _now(),
            "info": b_info,
        }
        store.write_baseline(slot, baseline, meta)
    else:
        baseline = baseline.copy()
        baseline["run_id"] = run_id
        if progress:
            progress(f"{FULL_PRECISION} (cached)", len(samples), len(samples))

    rows = pd.concat([quantized, baseline], ignore_index=True)[list(TIDY_COLUMNS)]
    summary = summarize(rows, seed=spec.options.seed)
    device = _model_device(model)
    manifest = {
        "format": keys.FORMAT_VERSION,
        "run_id": run_id,
        "task": name,
        "model": spec.model,
        "options": keys.options_dict(spec.options),
        "config": config.to_dict(),
        "config_hash": config.config_hash(),
        "baseline_config": baseline_config.to_dict(),
        "baseline": {"key": slot, "reused": reused, "path": str(store.layout.baseline_dir(slot))},
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
    folder = store.write_run(run_id, rows, summary, manifest)
    return StoredRun(run_id=run_id, rows=rows, summary=summary, manifest=manifest, path=folder)
