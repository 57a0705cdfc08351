"""Running a task with the quantized cache and its full-precision baseline, on the same samples.

`plan_eval` builds the task's samples once and works out the run's key (the prompts' token ids,
the generation settings, the model's files, dtype, device, versions; `kvstream.results.keys`) and
how the stored run and baseline stand against it. `run_plan` then runs every sample through the
cache strategy the config names (the *quantized* variant) and, unless the stored baseline was
measured on the same key, through `FullPrecisionCache` (the *full_precision* variant, prefilled in
chunks of `EvalSpec.baseline_chunk_size` whatever the config's), summarises both
(`kvstream.eval.summary`) and stores the run (`kvstream.results`): tidy rows, summary and manifest.
One baseline serves every run of the same task, model and options (another bit width, chunk size, ...).

Tasks that score a gold answer (the synthetic retrieval tasks) get `RunContext.generate_scored`: one
prefill, the gold answer's teacher-forced log-likelihood on a fork of the prefilled cache
(`kvstream.engine.scoring`: the fork shares the cache's tensors, lets go of each layer once the answer's
one forward is done with it, and is dropped after it), then greedy decoding from the cache as the prompt
left it. The memory reports are read from the cache itself, before and after generation, so the fork
never enters them; the scoring holds at most one layer's worth of new tensors beside the cache, as a
decode step does, and the activations of a few dozen tokens, so the peak memory figures stay those that
prefill and decoding reach; its time is its own figure (``answer_score_seconds``), in neither the
prefill's nor the decode's.
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
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch

from kvstream.config import CompressionConfig
from kvstream.eval.memory import MemoryMonitor
from kvstream.eval.summary import summarize
from kvstream.results import keys
from kvstream.results.fingerprint import model_device, model_dtype, model_fingerprint
from kvstream.results.keys import ResultKey
from kvstream.results.provenance import code_revision, library_versions
from kvstream.results.store import Check, ResultsStore, StoredRun
from kvstream.schema import CONFIG_COLUMNS, FULL_PRECISION, QUANTIZED, TIDY_COLUMNS
from kvstream.tasks.base import Row, RunContext, Sample, ScoredAnswer, TaskOptions

if TYPE_CHECKING:
    from kvstream.engine.scoring import AnswerScore

DEFAULT_MODEL = "smollm2-135m"
BASELINE_CHUNK_SIZE = CompressionConfig().chunk_size
"""Prefill chunk of every full-precision baseline, so the runs of a chunk-size sweep share one."""

ProgressCallback = Callable[[str, int, int], None]
"""``progress(what, done, total)``: ``samples``, a variant's samples, `PREFILL` tokens inside a sample."""
PREFILL = "prefill"


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
    baseline_chunk_size: int = BASELINE_CHUNK_SIZE

    @property
    def task_name(self) -> str:
        return task_name(self.task)

    def run_id(self) -> str:
        """``<task>__<model>__<config hash>__<options hash>``: deterministic and filesystem-safe."""
        return keys.run_id(self.task_name, self.model, self.config.config_hash(), self.options)

    def baseline_slot(self) -> str:
        return keys.baseline_slot(self.task_name, self.model, self.options)

    def baseline_config(self) -> CompressionConfig:
        """The full-precision cache, prefilled in chunks of ``baseline_chunk_size``."""
        return CompressionConfig(cache="full", chunk_size=self.baseline_chunk_size)


# --------------------------------------------------------------------------- running one variant


@dataclass
class _Recorder:
    """Cache reports and timings collected while one variant runs: one report per cache (sample) at the end
    of its prefill and one when it is done (after generation), so neither figure stands for the other."""

    reports: list[dict[str, Any]] = field(default_factory=list)
    prefill_reports: list[dict[str, Any]] = field(default_factory=list)
    outliers: list[dict[int, dict[str, float]]] = field(default_factory=list)
    prefill_seconds: list[float] = field(default_factory=list)
    decode_seconds_per_token: list[float] = field(default_factory=list)
    score_seconds: list[float] = field(default_factory=list)
    """Time of each teacher-forced answer scoring, between prefill and decoding (in neither figure)."""

    def prefill_done(self, cache: Any) -> None:
        report = getattr(cache, "memory_report", None)
        if callable(report):
            self.prefill_reports.append(dict(report()))

    def cache_done(self, cache: Any) -> None:
        report = getattr(cache, "memory_report", None)
        if callable(report):
            self.reports.append(dict(report()))
        snapshot = getattr(cache, "outlier_snapshot", None)
        if callable(snapshot):
            self.outliers.append(dict(snapshot()))


def _model_device(model: Any) -> torch.device:
    """Where token ids go: the input embeddings' device (their execution device under a device map)."""
    from kvstream.engine.placement import input_device

    try:
        return input_device(model)
    except AttributeError:
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
    model: Any,
    tokenizer: Any,
    config: CompressionConfig,
    recorder: _Recorder | None = None,
    progress: ProgressCallback | None = None,
) -> RunContext:
    """A `RunContext` whose caches are the strategy ``config`` names; measurements go to ``recorder``, and
    the tokens prefilled inside a sample to ``progress(PREFILL, done, total)``."""
    from kvstream.engine import greedy_generate, streaming_compare
    from kvstream.engine import make_cache as build_cache
    from kvstream.engine.scoring import score_answer

    recorder = recorder if recorder is not None else _Recorder()
    device = _model_device(model)
    eos = eos_ids(tokenizer)
    prefill_progress = (lambda done, total: progress(PREFILL, done, total)) if progress else None

    def new_cache() -> Any:
        return build_cache(model, config)

    def run_generation(
        prompt_ids: Any,
        max_new_tokens: int,
        eos_token_ids: set[int] | None,
        min_new_tokens: int,
        answer_ids: Any = None,
    ) -> tuple[str, AnswerScore | None]:
        ids = torch.as_tensor(prompt_ids, dtype=torch.long, device=device)
        if ids.dim() == 1:
            ids = ids.unsqueeze(0)
        cache = new_cache()
        marks: dict[str, float] = {}
        scored: list[AnswerScore] = []

        def prefill_done() -> None:
            _sync(device)
            marks["prefill"] = time.perf_counter()
            recorder.prefill_done(cache)
            marks["decode"] = time.perf_counter()

        def score(logits: torch.Tensor) -> None:
            # on a fork of the prefilled cache: the cache itself stays as the prompt left it (see scoring)
            begin = time.perf_counter()
            scored.append(score_answer(model, cache, logits, answer_ids))
            _sync(device)
            marks["decode"] = time.perf_counter()
            recorder.score_seconds.append(marks["decode"] - begin)

        _sync(device)
        start = time.perf_counter()
        out = greedy_generate(
            model,
            ids,
            cache,
            max_new_tokens,
            config.chunk_size,
            eos_token_ids=(eos if eos_token_ids is None else eos_token_ids) or None,
            progress=prefill_progress,
            on_prefill_done=prefill_done,
            min_new_tokens=min_new_tokens,
            after_prefill=score if answer_ids is not None else None,
        )
        _sync(device)
        end = time.perf_counter()
        recorder.prefill_seconds.append(marks.get("prefill", end) - start)
        steps = out.shape[1] - 1
        if steps > 0:
            recorder.decode_seconds_per_token.append((end - marks.get("decode", end)) / steps)
        recorder.cache_done(cache)
        return tokenizer.decode(out[0].tolist(), skip_special_tokens=True), (scored[0] if scored else None)

    def generate(
        prompt_ids: Any, max_new_tokens: int, eos_token_ids: set[int] | None = None, min_new_tokens: int = 0
    ) -> str:
        return run_generation(prompt_ids, max_new_tokens, eos_token_ids, min_new_tokens)[0]

    def generate_scored(
        prompt_ids: Any,
        answer_ids: Any,
        max_new_tokens: int,
        eos_token_ids: set[int] | None = None,
        min_new_tokens: int = 0,
    ) -> ScoredAnswer:
        """`generate`, and the gold ``answer_ids``' log-likelihood teacher-forced after the same prefill."""
        text, score = run_generation(prompt_ids, max_new_tokens, eos_token_ids, min_new_tokens, list(answer_ids))
        logprob, tokens = (score.logprob, score.tokens) if score is not None else (0.0, 0)
        return ScoredAnswer(text=text, logprob=logprob, tokens=tokens)

    def perplexity(input_ids: Any) -> Any:
        """Streaming loss through a fresh cache; a quantized one is scored in lockstep with a full-precision
        cache on the same chunks, so its result also holds KL and top-1 agreement (its own time only)."""
        ids = torch.as_tensor(input_ids, dtype=torch.long, device=device)
        if ids.dim() == 1:
            ids = ids.unsqueeze(0)
        caches = {"run": new_cache()}
        reference = "run"  # the full-precision variant is its own reference
        if config.cache != "full":
            caches[reference := "reference"] = build_cache(
                model, CompressionConfig(cache="full", chunk_size=config.chunk_size)
            )
        results = streaming_compare(model, ids, caches, config.chunk_size, reference, progress=prefill_progress)
        result = results["run"]
        recorder.prefill_seconds.append(result.seconds)
        recorder.prefill_done(caches["run"])
        recorder.cache_done(caches["run"])
        return result

    return RunContext(
        model=model,
        tokenizer=tokenizer,
        make_cache=new_cache,
        chunk_size=config.chunk_size,
        generate=generate,
        perplexity=perplexity,
        on_cache=recorder.cache_done,
        generate_scored=generate_scored,
    )


WARM_UP_NEW_TOKENS = 2
"""Tokens the warm-up generates: the first comes from the prefill, the second from one decode step."""


def warm_up(model: Any, tokenizer: Any, config: CompressionConfig) -> None:
    """Run a short prompt through ``config``'s cache, untimed, the way a task does (`make_context`'s generate
    and perplexity), so that the timed runs after it exclude one-time costs: a kernel built or loaded on first
    use, first calls, allocator growth. The prompt fills one chunk, which is packed, and two tokens more, so
    a prefill chunk and a decode step read packed history; timings and reports go to a recorder left unread.
    Costs that hang on a sample's own lengths or data (cuDNN attention plans per length, a Triton kernel
    specialised for a storage layout that only outliers bring) still fall on the first sample that meets them."""
    from kvstream.engine import model_geometry

    context = model_geometry(model).max_positions
    length = config.chunk_size + 2
    if context:
        length = max(2, min(length, context - WARM_UP_NEW_TOKENS))
    vocab = model.get_input_embeddings().num_embeddings
    ids = [i % vocab for i in range(length)]
    ctx = make_context(model, tokenizer, config)
    ctx.generate(ids, WARM_UP_NEW_TOKENS, set())
    ctx.perplexity(ids)


def _row_dict(identity: dict[str, str], config: CompressionConfig, row: Row, sample: str) -> dict[str, Any]:
    """One tidy row: ``identity`` (run id, task, model, baseline, variant), the config, the observation."""
    values = config.to_dict()
    out: dict[str, Any] = {
        **identity,
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


def _mean_by_key(dicts: list[dict[str, float]], absent: float | None = None) -> dict[str, float]:
    """Per key, the mean over ``dicts``: a dict lacking the key counts as ``absent``, or is left out when None."""
    names = sorted({name for d in dicts for name in d})
    means = {name: _mean([d.get(name, absent) for d in dicts]) for name in names}
    return {name: value for name, value in means.items() if value is not None}


def _readers(reports: list[dict[str, Any]]) -> dict[str, str]:
    """Which readers served the packed history over a variant's caches, by phase (from `memory_report`)."""
    seen: dict[str, set[str]] = {}
    for report in reports:
        for phase, names in report.get("readers", {}).items():
            seen.setdefault(phase, set()).update(names.split(", "))
    return {phase: ", ".join(sorted(names)) for phase, names in sorted(seen.items())}


def _resource_rows(recorder: _Recorder, monitor: MemoryMonitor) -> list[Row]:
    """A variant's aggregate rows: effective bits as the mean over its samples with their range, at the end of
    prefill and at the end of generation apart; mean bytes, the peaks, mean timings and outlier shares."""
    rows: list[Row] = []

    def add(metric: str, value: float | None, extra: dict[str, Any] | None = None) -> None:
        if value is not None:
            rows.append(Row(metric=metric, value=float(value), extra=extra or {}))

    def spread(metric: str, reports: list[dict[str, Any]]) -> None:
        """The mean of ``bits_per_element`` over the samples' caches, and its range as ``<metric>_min/_max``."""
        values = [float(r["bits_per_element"]) for r in reports if "bits_per_element" in r]
        if values:
            add(metric, _mean(values), {"n": len(values)})
            add(f"{metric}_min", min(values))
            add(f"{metric}_max", max(values))

    reports = recorder.reports
    if reports:
        spread("bits_per_element", reports)
        spread("prefill_bits_per_element", recorder.prefill_reports)
        add("ratio_to_fp16", _mean([r.get("ratio_to_fp16") for r in reports]))
        extra = {
            "breakdown": _mean_by_key([r.get("breakdown", {}) for r in reports], absent=0.0),
            "by_device": _mean_by_key([r.get("by_device", {}) for r in reports], absent=0.0),
        }
        add("cache_bytes", _mean([r.get("stored_bytes") for r in reports]), extra)
        add("peak_cache_bytes", max(r.get("peak_stored_bytes", r.get("stored_bytes", 0)) for r in reports))
        add("fp16_bytes", _mean([r.get("fp16_bytes") for r in reports]))
    add("peak_rss_bytes", monitor.peak_rss_bytes or None)
    add("peak_accelerator_bytes", monitor.peak_accelerator_bytes)
    add("prefill_seconds", _mean(recorder.prefill_seconds))
    add("decode_seconds_per_token", _mean(recorder.decode_seconds_per_token))
    add("answer_score_seconds", _mean(recorder.score_seconds))
    per_cache = [_mean_by_key(list(layers.values())) for layers in recorder.outliers if layers]
    for name, value in _mean_by_key(per_cache).items():
        add(name, value)
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
    baseline: str,
    variant: str,
    progress: ProgressCallback | None = None,
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Tidy rows of every sample with ``config``'s cache, plus the variant's aggregate rows.

    A `warm_up` runs first, so that no timing includes the cache's one-time costs (the first sample's
    would). ``baseline`` is the digest of the baseline's key, the same on the rows of both variants.
    """
    identity = {
        "run_id": run_id,
        "task": task_name(task),
        "model": model_name,
        "baseline": baseline,
        "variant": variant,
    }
    recorder = _Recorder()
    records: list[dict[str, Any]] = []
    per_sample: dict[str, list[float]] = {}
    if progress:
        progress(variant, 0, len(samples))
    warm_up(model, tokenizer, config)
    gc.collect()
    started = time.perf_counter()
    with MemoryMonitor(device=_model_device(model)) as monitor:
        for done, sample in enumerate(samples, start=1):
            ctx = make_context(model, tokenizer, config, recorder, progress)
            for row in task.run(ctx, sample):
                sample_id = row.sample if row.sample is not None else sample.id
                records.append(_row_dict(identity, config, row, str(sample_id)))
                per_sample.setdefault(row.metric, []).append(float(row.value))
            if progress:
                progress(variant, done, len(samples))
    for metric, values in per_sample.items():
        value = _mean(values)
        aggregate = Row(metric=metric, value=math.nan if value is None else value, extra={"n": len(values)})
        records.append(_row_dict(identity, config, aggregate, ""))
    for row in _resource_rows(recorder, monitor):
        records.append(_row_dict(identity, config, row, ""))
    info = {
        "seconds": time.perf_counter() - started,
        "memory": monitor.as_dict(),
        "caches": len(recorder.reports),
        "readers": _readers(recorder.reports),
    }
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


def build_samples(
    task: Any, options: TaskOptions, tokenizer: Any, progress: ProgressCallback | None = None
) -> list[Sample]:
    """The task's samples for ``options``; duplicate sample ids are refused (runs pair samples by id)."""
    if progress:
        progress("samples", 0, 1)
    samples = task.samples(options, tokenizer)
    if progress:
        progress("samples", 1, 1)
    sample_ids = [str(s.id) for s in samples]
    if len(set(sample_ids)) != len(sample_ids):
        raise ValueError(f"task {task_name(task)!r} produced duplicate sample ids")
    return samples


def prompt_ids(sample: Sample, tokenizer: Any) -> list[int]:
    """The token ids a sample feeds the model: its own ``prompt_ids``/``input_ids``, else its prompt encoded."""
    ids = sample.meta.get("prompt_ids", sample.meta.get("input_ids"))
    return [int(i) for i in (ids if ids is not None else tokenizer.encode(sample.prompt))]


ANSWER_IDS = "answer_ids"
"""The sample meta field holding the gold answer's token ids, which the tasks score teacher-forced."""
ANSWER_SCORE = "teacher-forced log-likelihood of the gold answer after the prompt, on a fork of the cache"
"""What the key's generation settings record for tasks that score their gold answer (a change re-runs)."""


def _prompt_entry(sample: Sample, tokenizer: Any) -> list[Any]:
    """What a sample contributes to the key's prompts: id, prompt ids, gold answers, and the gold answer's
    token ids where the task scores them."""
    entry: list[Any] = [str(sample.id), prompt_ids(sample, tokenizer), list(sample.answers)]
    if ANSWER_IDS in sample.meta:
        entry.append([int(i) for i in sample.meta[ANSWER_IDS]])
    return entry


def result_key(spec: EvalSpec, task: Any, samples: list[Sample], model: Any, tokenizer: Any) -> ResultKey:
    """What a run of ``spec`` on these samples is measured on (see `kvstream.results.keys.ResultKey`)."""
    versions = library_versions()
    default_budget = getattr(task, "max_new_tokens", None)
    generation = {
        "decoding": "greedy",
        "eos_token_ids": sorted(eos_ids(tokenizer)),
        "skip_special_tokens": True,
        "max_new_tokens": [s.meta.get("max_new_tokens", default_budget) for s in samples],
    }
    if any(ANSWER_IDS in s.meta for s in samples):
        generation["answer_score"] = ANSWER_SCORE
    return ResultKey(
        task=task_name(task),
        prompts=keys.digest([_prompt_entry(s, tokenizer) for s in samples]),
        generation=keys.digest(generation),
        model=model_fingerprint(model),
        dtype=model_dtype(model),
        device=model_device(model),
        baseline_chunk_size=spec.baseline_chunk_size,
        torch=versions["torch"],
        transformers=versions["transformers"],
        kvstream=versions["kvstream"],
        config=spec.config.config_hash(),
    )


@dataclass
class EvalPlan:
    """A run worked out before it runs: its task, model, samples and key, and how the stored copies stand."""

    spec: EvalSpec
    task: Any
    model: Any
    tokenizer: Any
    samples: list[Sample]
    key: ResultKey
    stored: Check
    """The run stored under the spec's run id against ``key``: reusable only when ``same``."""
    baseline: Check
    """The baseline stored in the spec's slot against ``key.baseline()``."""

    @property
    def run_id(self) -> str:
        return self.spec.run_id()

    def notes(self) -> list[str]:
        """One line for the stored run and one for the stored baseline when they will be replaced, saying why."""
        lines = []
        if self.stored.state in ("changed", "damaged"):
            lines.append(f"re-run {self.run_id}: {self.stored.why()}")
        if self.baseline.state in ("changed", "damaged"):
            lines.append(f"recompute baseline {self.spec.baseline_slot()}: {self.baseline.why()}")
        return lines


def plan_eval(
    spec: EvalSpec,
    bundle: tuple[Any, Any] | None = None,
    *,
    samples: list[Sample] | None = None,
    progress: ProgressCallback | None = None,
) -> EvalPlan:
    """Resolve the task, load the model (unless ``bundle`` is given), build the samples (unless given),
    compute the run's key and check the stored run and baseline against it. Nothing runs yet."""
    from kvstream.engine import load_model

    task = _resolve_task(spec.task)
    model, tokenizer = bundle if bundle is not None else load_model(spec.model)
    samples = samples if samples is not None else build_samples(task, spec.options, tokenizer, progress)
    key = result_key(spec, task, samples, model, tokenizer)
    store = ResultsStore(spec.results_dir)
    return EvalPlan(
        spec=spec,
        task=task,
        model=model,
        tokenizer=tokenizer,
        samples=samples,
        key=key,
        stored=store.check_run(spec.run_id(), key),
        baseline=store.check_baseline(spec.baseline_slot(), key.baseline()),
    )


def run_eval(
    spec: EvalSpec,
    *,
    bundle: tuple[Any, Any] | None = None,
    progress: ProgressCallback | None = None,
) -> StoredRun:
    """Plan ``spec`` (`plan_eval`) and run it (`run_plan`); ``bundle=(model, tokenizer)`` skips loading the model."""
    return run_plan(plan_eval(spec, bundle, progress=progress), progress)


@dataclass
class Baseline:
    """The full-precision rows of one baseline slot and the meta stored beside them (key, samples, timings)."""

    slot: str
    rows: pd.DataFrame
    meta: dict[str, Any]


def compute_baseline(plan: EvalPlan, progress: ProgressCallback | None = None) -> Baseline:
    """The full-precision variant of ``plan``'s samples, not stored: what `run_plan` pairs its run with."""
    spec, baseline_key = plan.spec, plan.key.baseline()
    config = spec.baseline_config()
    rows, info = run_variant(
        plan.task,
        plan.samples,
        plan.model,
        plan.tokenizer,
        config,
        variant=FULL_PRECISION,
        run_id=plan.run_id,
        model_name=spec.model,
        baseline=baseline_key.digest(),
        progress=progress,
    )
    meta = {
        "format": keys.FORMAT_VERSION,
        "slot": spec.baseline_slot(),
        "key": baseline_key.as_dict(),
        "digest": baseline_key.digest(),
        "task": task_name(plan.task),
        "model": spec.model,
        "options": keys.options_dict(spec.options),
        "config": config.to_dict(),
        "samples": [str(s.id) for s in plan.samples],
        "computed_by": plan.run_id,
        "created_at": _now(),
        "info": info,
    }
    return Baseline(spec.baseline_slot(), rows, meta)


def run_plan(
    plan: EvalPlan,
    progress: ProgressCallback | None = None,
    *,
    baseline: Baseline | None = None,
    write: bool = True,
) -> StoredRun:
    """Run ``plan`` with the quantized cache and the full-precision baseline; store and return the run.

    The baseline rows are ``baseline``'s when given (computed once for a whole sweep, `compute_baseline`),
    else reused from the store's slot when they are intact and were measured on the run's key
    (prompts, model, dtype, device, versions, ...), else computed and stored. With ``write=False``
    nothing is stored: a run made in another process goes back to the one that asked for it, which
    stores it. A task whose data is missing has raised `TaskDataMissing` in `plan_eval`, before any model ran.
    """
    started_at = _now()
    clock = time.perf_counter()
    spec, task, samples, model, tokenizer = plan.spec, plan.task, plan.samples, plan.model, plan.tokenizer
    store = ResultsStore(spec.results_dir)
    run_id = spec.run_id()
    name = task_name(task)
    sample_ids = [str(s.id) for s in samples]
    baseline_key = plan.key.baseline()
    shared = dict(run_id=run_id, model_name=spec.model, baseline=baseline_key.digest(), progress=progress)

    quantized, q_info = run_variant(task, samples, model, tokenizer, spec.config, variant=QUANTIZED, **shared)

    slot = spec.baseline_slot()
    if baseline is not None and baseline.meta.get("key") != baseline_key.as_dict():
        baseline = None  # measured on another key (prompts, model, dtype, device, ...): never paired
    if baseline is None and store.check_baseline(slot, baseline_key).reusable:
        baseline = Baseline(slot, *store.read_baseline(slot))
    reused = baseline is not None
    b_info: dict[str, Any] = {}
    if baseline is None:
        baseline = compute_baseline(plan, progress)
        b_info = baseline.meta["info"]
        if write:
            store.write_baseline(slot, baseline.rows, baseline.meta)
    elif progress:
        progress(f"{FULL_PRECISION} (cached)", len(samples), len(samples))

    rows = pd.concat([quantized, baseline.rows.assign(run_id=run_id)], ignore_index=True)[list(TIDY_COLUMNS)]
    summary = summarize(rows, seed=spec.options.seed)
    manifest = {
        "format": keys.FORMAT_VERSION,
        "run_id": run_id,
        "task": name,
        "model": spec.model,
        "options": keys.options_dict(spec.options),
        "config": spec.config.to_dict(),
        "config_hash": spec.config.config_hash(),
        "key": plan.key.as_dict(),
        "digest": plan.key.digest(),
        "baseline": {
            "slot": slot,
            "digest": baseline_key.digest(),
            "reused": reused,
            "config": spec.baseline_config().to_dict(),
        },
        "samples": sample_ids,
        "n_samples": len(samples),
        "per_sample_metric": getattr(task, "per_sample_metric", None),
        "versions": library_versions(),
        "revision": code_revision(),
        "platform": platform.platform(),
        "argv": list(sys.argv),
        "variants": {QUANTIZED: q_info, FULL_PRECISION: b_info or {"reused": True}},
        "started_at": started_at,
        "finished_at": _now(),
        "duration_seconds": round(time.perf_counter() - clock, 3),
    }
    folder = store.write_run(run_id, rows, summary, manifest) if write else store.layout.run_dir(run_id)
    return StoredRun(run_id=run_id, rows=rows, summary=summary, manifest=manifest, path=folder)
