"""Retrieval benchmark of the evaluation suite: RULER-style rows, each cache against full precision on the same samples.

What runs is declared in `PLAN` (the default, Qwen2.5-Coder-0.5B at 4k tokens) and `EXTENDED`
(``--extended``: 3/8 bits at 4k, and 8k and 16k tokens): rows of (model, task, context length,
samples) with the configurations run on them, the plain widths (normal bits N, sinks and outliers at
8: "N/8 bits") and the bit-budget presets of ``configs/`` (a missing preset file is named in one
line and its configurations are left out). The rows run as *cells* (one configuration of one row,
`cells`) in a fixed order: model by model, shorter contexts first, and at each context the screen
first (every row's 2/8 bits, which also measures the row's full-precision baseline) so that whether
a row separates caches is known before the other configurations spend their time. ``--plan``
prints the cells in that order with the expected seconds of each and the total, and exits; a run
prints the same before it starts. Expected seconds come from the stored runs (`Timing`).

Every run is stored as it finishes under ``--results`` (committed with the repository, so an
interrupted benchmark resumes in a later session on a fresh clone): a stored run is skipped only
when its full key (prompts, gold answers, model files, dtype, device, library versions) still
matches, and the full-precision baseline of a row is measured once and reused by every
configuration. The page is rebuilt from every intact stored run, also with ``--report-only``.

Each row reports accuracy and, paired with full precision per sample, the gold answer's
teacher-forced log-likelihood per token (``answer_logprob``, `kvstream.engine.scoring`) with its
bootstrap interval. A task/context cell *separates* caches when full precision answers at least
`SEPARATING_ACCURACY` of its samples and 2/8 bits (the known-lossy cache) measurably falls: its
accuracy delta's interval, or its answer log-likelihood delta's, lies below 0.

Rows need not be kvstream configurations: a record is labelled by ``label`` and names its
``source``, so rows of other tools (peers) run on the same samples can join the tables through
`collect`'s ``extra`` records. ``--peers`` (default `DEFAULT_PEERS`; ``none`` for none) adds a row per
peer (`kvstream.peers`) to every planned task/context cell, after its configurations: the cache peers
(quanto, KIVI) run as configurations through the same `plan_eval`/`run_plan` path, on the same samples
and the same stored full-precision baseline; external peers (llama.cpp, kvpress) run sample by sample on
the prompt and gold-answer ids kvstream's harness feeds the model, are scored by the task's own scorer,
and are paired with their family's own baseline (`PEER_BASELINES`). Each external peer's run of a cell is
one JSON file under ``--results``/``_peers``, rewritten after every sample and kept while its key (the
samples' prompts hash, the peer's name and version) matches. A peer that cannot run here is a skipped row
with its reason, printed once.

    python benchmarks/retrieval.py --plan
    python benchmarks/retrieval.py --out docs/benchmarks-retrieval.md
    python benchmarks/retrieval.py --extended --tasks vt --lengths 8192 --configs "2/8 bits"
    python benchmarks/retrieval.py --report-only
    python benchmarks/retrieval.py --plan --peers quanto-4,kivi-2,llamacpp-q4_0
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pandas as pd
import torch

import kvstream
from kvstream import CompressionConfig
from kvstream.config import ConfigError, resolve_config_path
from kvstream.data import MODEL_ALIASES
from kvstream.data.store import write_json_atomic
from kvstream.eval.runner import EvalSpec, plan_eval, run_plan
from kvstream.eval.stats import paired_bootstrap_delta
from kvstream.peers import CACHE_PEERS, PeerError, PeerUnavailable, adapter_names, make_peer
from kvstream.results import ResultsStore, StoredRun, keys
from kvstream.results.provenance import code_revision, library_versions, short_revision
from kvstream.schema import FULL_PRECISION, QUANTIZED
from kvstream.tasks.base import RunContext, Sample, ScoredAnswer, TaskOptions
from kvstream.tasks.synthetic import ANSWER_LOGPROB

QWEN = "qwen2.5-coder-0.5b"
SMOLLM2 = "smollm2-135m"

WIDTHS: dict[str, int] = {"4/8 bits": 4, "3/8 bits": 3, "2/8 bits": 2}
"""Plain configurations by label: normal key and value bits, sinks and outliers at 8."""
PRESETS = ("bits-3.3", "bits-2.5")
"""Bit-budget presets of ``configs/``, labelled by name."""
ORDER = ("4/8 bits", "bits-3.3", "3/8 bits", "bits-2.5", "2/8 bits")
"""Configurations in the order the tables list them (most bits first)."""
ALL_CONFIGS = ORDER
LOSSY = "2/8 bits"
"""The known-lossy cache: a cell where it does not measurably fall cannot tell a good cache from a bad one."""
SEPARATING_ACCURACY = 0.8
"""The least full-precision accuracy of a cell that can separate caches."""

TOLERANCE: dict[str, int] = {"4/8 bits": 1, "3/8 bits": 1, "bits-3.3": 0, "bits-2.5": 1}
"""Target per configuration: the most samples by which its accuracy may differ from full precision (0: equal)."""
BUDGET: dict[str, float] = {"bits-3.3": 3.3, "bits-2.5": 2.5}
"""The most effective bits a preset may hold for its row to count: quality reached by spending more bits does not."""
NOT_WORSE = ("4/8 bits", "bits-3.3")
"""Configurations that, on every separating cell, may not fall below full precision beyond the interval."""
METRICS = ("accuracy", "recall", ANSWER_LOGPROB)
"""The per-sample metrics the page reads from each run."""

TASKS = ("niah_single", "niah_multikey_3", "vt", "fwe")
"""The rows' tasks: RULER's single needle (separating at 4k at f14537e), and the harder RULER rows."""
CORE = ("4/8 bits", "bits-3.3", "bits-2.5", LOSSY)
"""The default plan's configurations: the known-lossy screen and every configuration the targets name."""

SAMPLE_SECONDS: dict[tuple[str, int], float] = {
    (QWEN, 2048): 18.0,
    (QWEN, 4096): 34.0,
    (SMOLLM2, 8192): 43.0,
}
"""Seconds one sample takes through one cache on two CPU cores (prefill and answer): the durations of the
stored runs of revision f14537e divided by their samples, rounded up. What `Timing` falls back on."""

ATTENTION_LENGTH: dict[str, int] = {QWEN: 16650, SMOLLM2: 6140}
"""Per model, the prompt length ``H`` at which a prefill's attention work equals the rest of it, for
`scaled_seconds`: a prefill of ``L`` tokens costs ``P L + A L^2 / 2`` (``P``: 2 FLOPs per non-embedding
weight per token; ``A = 4 x layers x query heads x head size``: the score and value products per earlier
token), that is ``P L (1 + L / H)`` with ``H = 2 P / A``. Qwen2.5-0.5B: 358M weights, 24 x 14 x 64;
SmolLM2-135M: 106M weights, 30 x 9 x 64."""


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


PLAN: tuple[PlanRow, ...] = tuple(PlanRow(QWEN, task, 4096, 20, CORE) for task in TASKS)
"""The benchmark `make bench` runs: every task at 4k tokens, 20 samples, the screen and the targets' configurations."""

EXTENDED: tuple[PlanRow, ...] = (
    *(PlanRow(QWEN, task, 4096, 20, ("3/8 bits",)) for task in TASKS),
    *(PlanRow(QWEN, task, 8192, 20, ALL_CONFIGS) for task in TASKS),
    *(PlanRow(QWEN, task, 16384, 10, ALL_CONFIGS) for task in TASKS),
)
"""``--extended``: 3/8 bits at 4k, every configuration at 8k (20 samples) and at 16k (10 samples: by the scaling
of `Timing` a sample takes about 3.6 min per cache there, 20 would take 29 hours)."""


# --------------------------------------------------------------------------- peers

CONFIG, CACHE_PEER, EXTERNAL = "config", "cache peer", "external peer"
"""What a cell runs: a kvstream configuration, a peer registered as a kvstream cache (through the same
`plan_eval`/`run_plan` path, on the same samples, pairing with the same stored full-precision baseline), or an
external peer (`kvstream.peers.Peer`: its own runtime, run sample by sample on the same prompt and answer ids)."""

DEFAULT_PEERS: tuple[str, ...] = (*CACHE_PEERS, *adapter_names())
"""``--peers`` by default: the cache peers, then llama.cpp's and kvpress's rows; those that cannot run here are
skipped rows with their reason."""

PEER_BASELINES: dict[str, str] = {"llamacpp": "llamacpp-f16", "kvpress": "kvpress-none"}
"""Per external peer family, the peer its rows are paired with: its own full precision in its own runtime.
llama.cpp computes with the GGUF's quantized weights, so its rows are paired with ``llamacpp-f16``, which is added
to the plan whenever a llama.cpp row is asked for. kvpress reads kvstream's own weights and ``kvpress-none`` agrees
with kvstream's full precision to 1e-3 nats per token (docs/guide.md, Peers), so it is not added: kvpress rows are
paired with ``kvpress-none`` where it was run on the same samples, else with kvstream's full precision. A family's
baseline row itself is paired with kvstream's full precision."""
REQUIRED_BASELINES = ("llamacpp",)
"""Families whose baseline peer joins the plan whenever one of their rows does."""

PEER_SAMPLE_FACTOR: dict[str, float] = {"llamacpp-f16": 1.0, "llamacpp": 3.0, "kvpress": 1.0}
"""The stated estimate of an external peer's seconds per sample, as a multiple of a kvstream sample through one
cache at the same model and length (`Timing`); no peer run has been timed by this benchmark yet. llama.cpp's f16
cache: one kvstream sample. Its quantized caches: 3 (issue 20: llama.cpp's q4_0/q8_0 prefill ran 2.4-4x slower than
its own f16 on two threads). kvpress: one kvstream sample (the same fp32 model in transformers, one prefill with the
press). A name not listed takes its family's factor, else 1."""

PEER_STORE = "_peers"
"""Folder under ``--results`` of the external peers' runs (one JSON file per peer and cell) and of the skipped
peers' reasons; the results store's own scan passes over folders starting with ``_``."""
SKIPPED = "skipped"
"""The metric of a record that stands for a skipped peer row (its reason in ``note``)."""
KVSTREAM_SOURCES = ("kvstream", "kvstream harness (cache peer)")
"""The sources of the rows run by kvstream's own harness: its configurations and the cache peers."""


def peer_family(name: str) -> str:
    """``llamacpp-q4_0`` -> ``llamacpp``; a cache peer's family is its cache (``quanto``, ``kivi``)."""
    if name in CACHE_PEERS:
        return CACHE_PEERS[name].cache
    return name.split("-", 1)[0]


def peer_factor(name: str) -> float:
    """`PEER_SAMPLE_FACTOR` for ``name``: its own entry, else its family's, else 1."""
    return PEER_SAMPLE_FACTOR.get(name, PEER_SAMPLE_FACTOR.get(peer_family(name), 1.0))


def with_baselines(names: Iterable[str]) -> list[str]:
    """``names`` without repeats, each `REQUIRED_BASELINES` family's baseline peer put before its first row."""
    out: list[str] = []
    for name in dict.fromkeys(names):
        family = peer_family(name)
        base = PEER_BASELINES.get(family)
        if family in REQUIRED_BASELINES and base and base not in out:
            out.append(base)
        if name not in out:
            out.append(name)
    return out


def peer_version(peer: Any) -> str:
    """What the peer's stored runs are keyed by besides its name: its ``version`` (a string, or a method giving
    one), else its library versions (kvpress: its worker's ``versions()``), else llama-cpp-python's version."""
    version = getattr(peer, "version", None)
    version = version() if callable(version) else version
    if version:
        return str(version)
    versions = getattr(peer, "versions", None)
    if callable(versions):
        return json.dumps(versions(), sort_keys=True)
    if type(peer).__name__ == "LlamaCppPeer":
        from kvstream.peers.llamacpp import _version

        return f"llama-cpp-python {_version()}, threads {peer.threads}, n_batch {peer.n_batch}"
    return "unknown"


class PeerSet:
    """The peers asked for, built once per model (``make(name, model, threads=...)``), each one's reason for not
    running here checked once per model and printed once."""

    def __init__(self, names: Iterable[str], make: Callable[..., Any] = make_peer, threads: int = 2) -> None:
        self.names = tuple(names)
        self.make = make
        self.threads = threads
        self._peers: dict[tuple[str, str], Any] = {}
        self._reasons: dict[tuple[str, str], str | None] = {}
        self._printed: set[tuple[str, str]] = set()

    def get(self, name: str, model: str) -> Any:
        if (name, model) not in self._peers:
            self._peers[(name, model)] = self.make(name, model, threads=self.threads)
        return self._peers[(name, model)]

    def reason(self, name: str, model: str) -> str | None:
        """``None`` when ``name`` can run on ``model`` here, else its one-line reason (printed the first time)."""
        if (name, model) not in self._reasons:
            try:
                reason = self.get(name, model).unavailable()
            except Exception as error:  # a peer that cannot even be built or checked is skipped with why
                reason = f"{type(error).__name__}: {' '.join(str(error).split())}"
            self._reasons[(name, model)] = reason
            if reason and (name, reason) not in self._printed:
                self._printed.add((name, reason))
                print(f"peer {name} skipped (a row with this reason on the page): {reason}", flush=True)
        return self._reasons[(name, model)]

    def reasons(self, models: Iterable[str]) -> dict[tuple[str, str], str]:
        """``(name, model) -> reason`` for every peer that cannot run on one of ``models``."""
        found = {(name, model): self.reason(name, model) for model in dict.fromkeys(models) for name in self.names}
        return {key: reason for key, reason in found.items() if reason}

    def close(self) -> None:
        """Free what the peers hold (llama.cpp contexts, kvpress workers)."""
        for peer in self._peers.values():
            close = getattr(peer, "close", None)
            if callable(close):
                close()
        if "kvstream.peers.presses" in sys.modules:
            sys.modules["kvstream.peers.presses"].close_workers()
        self._peers.clear()


# --------------------------------------------------------------------------- planning


def scaled_seconds(seconds: float, measured_at: int, length: int, attention_length: int) -> float:
    """``seconds`` measured at ``measured_at`` tokens carried to ``length``: ``L (1 + L / H)`` (see
    `ATTENTION_LENGTH`)."""

    def work(tokens: int) -> float:
        return tokens * (1 + tokens / attention_length)

    return seconds * work(length) / work(measured_at)


@dataclass(frozen=True)
class Timing:
    """Seconds one sample takes through one cache on two CPU cores, by model and context length.

    Measured where runs of the model at that length are stored (each variant's seconds over its
    samples, the median over the runs, whatever the task); otherwise `scaled_seconds` from the
    nearest measured length of the same model (by ratio)."""

    measured: Mapping[tuple[str, int], float] = field(default_factory=lambda: dict(SAMPLE_SECONDS))
    source: str = "the stored runs of revision f14537e"

    @classmethod
    def from_store(cls, results: Path) -> Timing:
        """The stored runs' per-sample seconds (median per model and length) over `SAMPLE_SECONDS`."""
        store = ResultsStore(results)
        found: dict[tuple[str, int], list[float]] = {}
        intact, _ = store.scan() if store.root.is_dir() else ([], [])
        for run_id in intact:
            manifest = store.read_run(run_id).manifest
            n = int(manifest.get("n_samples") or 0)
            length = (manifest.get("options") or {}).get("length")
            if not n or not length:
                continue
            for info in (manifest.get("variants") or {}).values():
                if isinstance(info, dict) and info.get("seconds"):
                    found.setdefault((manifest["model"], int(length)), []).append(float(info["seconds"]) / n)
        measured = {**SAMPLE_SECONDS, **{key: statistics.median(values) for key, values in found.items()}}
        source = f"the {len(intact)} runs stored under {results}" if found else cls.source
        return cls(measured, source)

    def basis(self, model: str, length: int) -> int | None:
        """The measured length the figure of ``model`` at ``length`` comes from (itself when measured)."""
        lengths = [n for m, n in self.measured if m == model]
        if not lengths:
            return None
        return min(lengths, key=lambda n: (abs(math.log(n / length)), -n))

    def per_sample(self, model: str, length: int) -> float:
        basis = self.basis(model, length)
        if basis is None:
            raise KeyError(f"no stored run of {model} to time a sample by")
        seconds = self.measured[(model, basis)]
        return seconds if basis == length else scaled_seconds(seconds, basis, length, ATTENTION_LENGTH[model])

    def describe(self, pairs: Iterable[tuple[str, int]]) -> str:
        """``model L tokens N s`` for each pair, saying which are scaled and from where."""
        parts = []
        for model, length in dict.fromkeys(pairs):
            basis = self.basis(model, length)
            how = "" if basis == length else f" (scaled from {basis})"
            parts.append(f"{model} {length} tokens {self.per_sample(model, length):.0f} s{how}")
        return "; ".join(parts)


FALLBACK = Timing()
"""`SAMPLE_SECONDS` alone: the timing of the tests and of a results folder without runs."""


@dataclass(frozen=True)
class Cell:
    """One configuration of one plan row: what one stored run holds."""

    model: str
    task: str
    length: int
    samples: int
    label: str
    baseline: bool
    """Whether this cell measures its slot's full-precision baseline (the first cell of the slot to run)."""
    kind: str = CONFIG
    """`CONFIG`, `CACHE_PEER` or `EXTERNAL`: a kvstream configuration or a peer's row (labelled by its name)."""
    skipped: str = ""
    """Why a peer's cell does not run here (``unavailable()``'s line); empty when it runs."""

    @property
    def slot(self) -> tuple[str, str, int, int]:
        return self.model, self.task, self.length, self.samples

    def options(self) -> TaskOptions:
        return TaskOptions(samples=self.samples, length=self.length, seed=0)

    def name(self) -> str:
        return f"{self.model} {self.task} {self.length}"

    def seconds(self, timing: Timing = FALLBACK) -> float:
        """Expected seconds: every sample through the configuration's cache, and through full precision's if
        this cell measures the baseline; an external peer's samples at its `PEER_SAMPLE_FACTOR`; none if skipped."""
        if self.skipped:
            return 0.0
        per_sample = timing.per_sample(self.model, self.length)
        if self.kind == EXTERNAL:
            return self.samples * per_sample * peer_factor(self.label)
        return self.samples * per_sample * (2 if self.baseline else 1)

    def shown(self) -> str:
        """The cell's configuration as the plan lists it."""
        if self.kind == EXTERNAL:
            text = f"{self.label} (peer)"
        else:
            text = f"{self.label} + full precision" if self.baseline else self.label
        return f"{text}, skipped" if self.skipped else text


def cells(
    plan: Iterable[PlanRow], peers: Iterable[str] = (), unavailable: Mapping[tuple[str, str], str] | None = None
) -> list[Cell]:
    """The plan's cells in run order: model by model (each loaded once), contexts from the shortest, and at each
    context first every row's `LOSSY` cell (the screen), then the rows' other configurations, each in plan order,
    then every row's ``peers`` in the order given. A configuration or peer planned twice for one slot runs once; a
    slot's first kvstream-harness cell measures its baseline. A peer in ``unavailable`` (``(name, model) ->
    reason``) is a skipped cell."""
    rows = list(plan)
    names = list(dict.fromkeys(peers))
    unavailable = unavailable or {}
    out: list[Cell] = []
    planned: set[tuple[Any, ...]] = set()
    slots: set[tuple[str, str, int, int]] = set()
    for model in dict.fromkeys(row.model for row in rows):
        for length in sorted({row.length for row in rows if row.model == model}):
            for screen in (True, False):
                for row in (r for r in rows if r.model == model and r.length == length):
                    for label in (c for c in row.configs if (c == LOSSY) == screen):
                        if (*row.slot, label) in planned:
                            continue
                        planned.add((*row.slot, label))
                        out.append(Cell(*row.slot, label, baseline=row.slot not in slots))
                        slots.add(row.slot)
            for row in (r for r in rows if r.model == model and r.length == length):
                for name in names:
                    if (*row.slot, name) in planned:
                        continue
                    planned.add((*row.slot, name))
                    kind = CACHE_PEER if name in CACHE_PEERS else EXTERNAL
                    reason = unavailable.get((name, model), "")
                    measures = kind == CACHE_PEER and not reason and row.slot not in slots
                    out.append(Cell(*row.slot, name, baseline=measures, kind=kind, skipped=reason))
                    if measures:
                        slots.add(row.slot)
    return out


def estimate_seconds(
    plan: Iterable[PlanRow],
    timing: Timing = FALLBACK,
    peers: Iterable[str] = (),
    unavailable: Mapping[tuple[str, str], str] | None = None,
) -> float:
    """Time on two cores: each baseline once per shared slot, and every configuration and peer, over every sample."""
    return sum(cell.seconds(timing) for cell in cells(plan, peers, unavailable))


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


def cell_config(cell: Cell, configs: Mapping[str, CompressionConfig]) -> CompressionConfig:
    """The configuration a kvstream-harness cell runs: its label's, or its cache peer's ``config()``."""
    return configs[cell.label] if cell.label in configs else CACHE_PEERS[cell.label].config()


def run_id(cell: Cell, configs: Mapping[str, CompressionConfig]) -> str:
    return EvalSpec(cell.task, cell.model, cell_config(cell, configs), cell.options()).run_id()


def plan_lines(
    plan: Iterable[PlanRow],
    timing: Timing = FALLBACK,
    configs: Mapping[str, CompressionConfig] | None = None,
    results: Path | None = None,
    peers: Iterable[str] = (),
    unavailable: Mapping[tuple[str, str], str] | None = None,
) -> list[str]:
    """The cells in run order, each with its expected seconds (``stored`` where a run of it is in ``results``, kept
    if its key still matches; ``skipped`` and its reason for a peer that cannot run here), and the total; what
    ``--plan`` prints. External peers' seconds are `PEER_SAMPLE_FACTOR` times a kvstream sample's."""
    planned = cells(plan, peers, unavailable)
    store = ResultsStore(results) if results is not None and configs is not None else None
    width = max((len(c.task) for c in planned), default=4)
    shown = max([34, *(len(c.shown()) for c in planned)])
    lines = [
        f"{len(planned)} cells in run order, expected seconds on two CPU cores (a sample through one cache: "
        f"{timing.describe((c.model, c.length) for c in planned) or 'none'}; from {timing.source}):",
        f"{'#':>3}  {'model':<18} {'task':<{width}} {'context':>7} {'samples':>7}  {'configuration':<{shown}} "
        f"{'seconds':>8}",
    ]
    todo = 0.0
    for i, cell in enumerate(planned, start=1):
        if store is None or cell.skipped:
            stored = False
        elif cell.kind == EXTERNAL:
            stored = peer_complete(results, cell)  # type: ignore[arg-type]
        else:
            stored = store.has_run(run_id(cell, configs))  # type: ignore[arg-type]
        todo += 0 if stored else cell.seconds(timing)
        note = f"  skipped: {cell.skipped}" if cell.skipped else ("  stored" if stored else "")
        lines.append(
            f"{i:>3}  {cell.model:<18} {cell.task:<{width}} {cell.length:>7} {cell.samples:>7}  "
            f"{cell.shown():<{shown}} {cell.seconds(timing):>8.0f}" + note
        )
    total = sum(cell.seconds(timing) for cell in planned)
    line = f"total: {total:.0f} s ({minutes(total)} min)"
    if store is not None:
        line += f"; {todo:.0f} s ({minutes(todo)} min) for the cells not stored yet"
    factors = {f"{c.label} x{peer_factor(c.label):g}" for c in planned if c.kind == EXTERNAL and not c.skipped}
    if factors:
        line += (
            "; an external peer's sample is estimated at a kvstream sample's seconds times "
            f"{', '.join(sorted(factors))} (PEER_SAMPLE_FACTOR, not measured yet)"
        )
    return [*lines, line]


# --------------------------------------------------------------------------- running

Loader = Callable[[str], tuple[Any, Any]]
"""A model name -> (model, tokenizer)."""


def run_cell(
    cell: Cell,
    configs: Mapping[str, CompressionConfig],
    bundle: tuple[Any, Any],
    results: Path,
    samples: dict[tuple[str, str, int, int], list[Sample]],
) -> None:
    """One cell, unless its run is stored on the same key; the slot's samples are built once (kept in ``samples``)
    and its baseline is the stored one whenever that was measured on the same key."""
    spec = EvalSpec(cell.task, cell.model, cell_config(cell, configs), cell.options(), results_dir=results)
    planned = plan_eval(spec, bundle, samples=samples.get(cell.slot))
    samples[cell.slot] = planned.samples
    if planned.stored.reusable:  # skipped only when its full key (prompts, model, versions, ...) matches
        return
    for line in planned.notes():
        print(line, flush=True)
    start = time.perf_counter()
    run_plan(planned)
    print(f"{cell.name()} {cell.label}: {time.perf_counter() - start:.0f}s", flush=True)


def peer_path(results: Path, cell: Cell) -> Path:
    """The JSON file of one peer's run (or skip) on one cell: ``_peers/<task>__<model>__<options>__<peer>.json``."""
    name = f"{keys.slug(cell.task)}__{keys.slug(cell.model)}__{keys.options_hash(cell.options())}"
    return Path(results) / PEER_STORE / f"{name}__{keys.slug(cell.label)}.json"


def read_peer_file(path: Path) -> dict[str, Any] | None:
    """A stored peer file, or None when it is missing or unreadable (then the cell runs again)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def peer_complete(results: Path, cell: Cell) -> bool:
    """Whether the peer's run of ``cell`` is stored whole (its key is checked when it would run)."""
    stored = read_peer_file(peer_path(results, cell))
    return bool(stored and stored.get("status") == "complete")


def record_skip(results: Path, cell: Cell, reason: str) -> None:
    """Store that ``cell``'s peer was skipped and why, unless a run of it is stored (kept: it was measured)."""
    path = peer_path(results, cell)
    stored = read_peer_file(path)
    if stored and stored.get("status") in ("complete", "partial"):
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, {**_peer_cell(cell), "status": "unavailable", "reason": reason})


def _peer_cell(cell: Cell) -> dict[str, Any]:
    return dict(model=cell.model, task=cell.task, length=cell.length, n=cell.samples, peer=cell.label, kind=cell.kind)


def peer_context(peer: Any, bundle: tuple[Any, Any], results: list[Any]) -> RunContext:
    """A `RunContext` whose ``generate_scored`` is ``peer.run`` on the task's own prompt and gold answer ids, so
    that the task scores the peer's text with its own scorer; each `PeerResult` goes to ``results``. The peer
    stops at its model's own end-of-generation token (the retrieval tasks pass no other stop set)."""

    def generate_scored(
        prompt_ids: Any, answer_ids: Any, max_new_tokens: int, eos_token_ids: Any = None, min_new_tokens: int = 0
    ) -> ScoredAnswer:
        result = peer.run([int(i) for i in prompt_ids], [int(i) for i in answer_ids], int(max_new_tokens))
        results.append(result)
        return ScoredAnswer(text=result.text, logprob=result.answer_logprob, tokens=result.answer_tokens)

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise PeerError(f"{peer.name} runs only tasks that score a gold answer (generate_scored)")

    model, tokenizer = bundle
    return RunContext(
        model=model, tokenizer=tokenizer, make_cache=refuse, chunk_size=0, generate=refuse, perplexity=refuse,
        generate_scored=generate_scored,
    )  # fmt: skip


def run_peer_cell(
    cell: Cell,
    peer: Any,
    bundle: tuple[Any, Any],
    results: Path,
    samples: dict[tuple[str, str, int, int], list[Sample]],
) -> None:
    """One external peer on one cell's samples (the slot's, as kvstream's cells built them: the same prompt and
    gold answer ids), sample by sample, the file rewritten after each so that an interrupted run resumes where it
    stopped. Kept when its key (the samples' prompts hash as the results key computes it, the peer's name and its
    version) matches; a peer that fails is stored with its reason and tried again by the next run."""
    spec = EvalSpec(cell.task, cell.model, CompressionConfig(cache="full"), cell.options(), results_dir=results)
    planned = plan_eval(spec, bundle, samples=samples.get(cell.slot))
    samples[cell.slot] = planned.samples
    key = {"prompts": planned.key.prompts, "peer": peer.name, "version": peer_version(peer)}
    path = peer_path(results, cell)
    stored = read_peer_file(path) or {}
    same = stored.get("key") == key
    if same and stored.get("status") == "complete":
        return
    done = {str(s["sample"]): s for s in stored.get("samples", [])} if same else {}
    if stored.get("key") and not same:
        print(f"re-run {path.name}: its key changed ({stored.get('key')} -> {key})", flush=True)
    data = {
        **_peer_cell(cell), "key": key, "label": getattr(peer, "label", peer.name), "status": "partial",
        "revision": code_revision(), "torch": library_versions()["torch"],
        "started": stored.get("started") if same and stored.get("started") else _now(), "finished": "",
        "seconds": float(stored.get("seconds") or 0.0) if same else 0.0,
        "samples": [done[str(s.id)] for s in planned.samples if str(s.id) in done],
    }  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    for sample in planned.samples:
        if str(sample.id) in done:
            continue
        out: list[Any] = []
        began = time.perf_counter()
        try:
            rows = planned.task.run(peer_context(peer, bundle, out), sample)
        except (PeerError, PeerUnavailable) as error:
            reason = " ".join(str(error).split())
            print(f"{cell.name()} {peer.name}: failed on {sample.id}: {reason}", flush=True)
            write_json_atomic(path, {**data, "reason": f"failed on {sample.id}: {reason}"})
            return
        result = out[-1].to_dict() if out else {}
        result.pop("generated_ids", None)
        metrics = {row.metric: float(row.value) for row in rows}
        data["samples"].append({"sample": str(sample.id), "metrics": metrics, "seconds": time.perf_counter() - began,
                                **result})  # fmt: skip
        data["seconds"] += time.perf_counter() - began
        write_json_atomic(path, data)
    data.update(status="complete", finished=_now())
    write_json_atomic(path, data)
    print(f"{cell.name()} {peer.name}: {time.perf_counter() - start:.0f}s", flush=True)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def run(
    plan: list[PlanRow],
    configs: Mapping[str, CompressionConfig],
    results: Path,
    load: Loader,
    peers: PeerSet | None = None,
) -> None:
    """Every cell of ``plan`` in run order (`cells`), each model loaded once; with ``peers``, each row's peers
    after its configurations (a peer that cannot run here stored as skipped, with its reason)."""
    names = peers.names if peers is not None else ()
    unavailable = peers.reasons(row.model for row in plan) if peers is not None else {}
    planned = cells(plan, names, unavailable)
    for model in dict.fromkeys(cell.model for cell in planned):
        bundle = load(model)
        samples: dict[tuple[str, str, int, int], list[Sample]] = {}
        for cell in (c for c in planned if c.model == model):
            if cell.skipped:
                record_skip(results, cell, cell.skipped)
            elif cell.kind == EXTERNAL:
                assert peers is not None
                run_peer_cell(cell, peers.get(cell.label, model), bundle, results, samples)
            else:
                run_cell(cell, configs, bundle, results, samples)
                if cell.kind == CACHE_PEER:
                    peer_path(results, cell).unlink(missing_ok=True)  # an earlier skip no longer stands
        if peers is not None:
            peers.close()
        del bundle, samples
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
    *("model", "task", "length", "n", "label", "source", "metric", "fp", "quantized", "delta", "ci_low", "ci_high"),
    *("lost", "gained", "bits", "bits_min", "bits_max", "revision", "torch", "started", "finished", "seconds"),
    *("basis", "paired", "note", "environment"),
)
"""The fields of one record of `run_rows`: one metric of one labelled row. ``source`` is ``kvstream`` for the runs
of kvstream configurations; records of other tools (peers) carry their own source and label, how their bits were
obtained (``basis``: ``measured`` or ``format``), what their deltas are paired with (``paired``), where they ran
(``environment``), and for a skipped row (metric `SKIPPED`) the reason (``note``)."""


def run_label(manifest: Mapping[str, Any], labels: Mapping[str, str]) -> str:
    """A stored run's label: by its config hash, else by the hash its config has today (fields added since it
    was stored take their defaults), else ``config <hash>``."""
    config_hash = manifest["config_hash"]
    if config_hash in labels:
        return labels[config_hash]
    try:
        today = CompressionConfig.from_dict(dict(manifest.get("config") or {})).config_hash()
    except (ConfigError, TypeError):
        today = None
    return labels.get(today, f"config {config_hash}") if today else f"config {config_hash}"


def run_rows(stored: StoredRun, labels: dict[str, str]) -> list[dict[str, Any]]:
    """One record per retrieval metric (accuracy, recall, answer log-likelihood) of a stored run; ``labels`` maps
    config hashes to labels."""
    run, summary = stored.manifest, stored.summary.set_index("metric")
    label = run_label(run, labels)

    def quantized(name: str) -> float:
        return float(summary[QUANTIZED].get(name, float("nan")))

    records = []
    for metric in METRICS:
        if metric not in summary.index:
            continue
        line = summary.loc[metric]
        n = int(line["n"]) if pd.notna(line["n"]) else 1
        lost, gained = flips(stored.rows, metric) if metric != ANSWER_LOGPROB else (0, 0)
        records.append(
            dict(
                model=run["model"],
                task=run["task"],
                length=int(run["options"]["length"]),
                n=n,
                label=label,
                source=KVSTREAM_SOURCES[1] if label in CACHE_PEERS else KVSTREAM_SOURCES[0],
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
                basis="measured" if label in CACHE_PEERS else "",
                paired=FULL_PRECISION,
                note="",
                environment="",
            )
        )
    return records


def _per_sample(samples: Iterable[Mapping[str, Any]], metric: str) -> dict[str, float]:
    """Sample id -> the metric's finite value."""
    out = {}
    for sample in samples:
        value = (sample.get("metrics") or {}).get(metric)
        if value is not None and math.isfinite(float(value)):
            out[str(sample["sample"])] = float(value)
    return out


def kvstream_full_precision(results: Path, task: str, model: str, length: int, n: int, prompts: str) -> list[dict]:
    """kvstream's full-precision samples of one slot as peer samples (``{"sample", "metrics"}``), when its stored
    baseline was measured on the same prompts (hash ``prompts``); else none."""
    slot = EvalSpec(task, model, options=TaskOptions(samples=n, length=length, seed=0)).baseline_slot()
    try:
        rows, meta = ResultsStore(results).read_baseline(slot)
    except (OSError, ValueError):
        return []
    if (meta.get("key") or {}).get("prompts") != prompts:
        return []
    rows = rows[(rows["variant"] == FULL_PRECISION) & (rows["sample"] != "")]
    found: dict[str, dict[str, float]] = {}
    for row in rows.itertuples():
        found.setdefault(str(row.sample), {})[str(row.metric)] = float(row.value)
    return [{"sample": sample, "metrics": metrics} for sample, metrics in found.items()]


def peer_baseline(name: str, stored: Mapping[str, Mapping[str, Any]]) -> tuple[str, str]:
    """What peer ``name``'s rows are paired with, and why: its family's baseline peer (`PEER_BASELINES`) when it
    is stored whole on the same prompts, else kvstream's full precision."""
    family = peer_family(name)
    base = PEER_BASELINES.get(family)
    if base is None or base == name:
        return FULL_PRECISION, "kvstream's full precision (the family's own baseline row)"
    other = stored.get(base)
    own = stored[name]
    if other and other.get("status") == "complete" and (other.get("key") or {}).get("prompts") == own["key"]["prompts"]:
        return base, f"`{base}`"
    return FULL_PRECISION, f"kvstream's full precision (`{base}` not run on these samples)"


def peer_rows(cell: Mapping[str, Any], base: list[Mapping[str, Any]], paired: str) -> list[dict[str, Any]]:
    """The records of one stored external peer run, each metric paired sample by sample with ``base`` (the
    samples of what it is paired with): mean delta, 95% paired bootstrap interval, lost / gained."""
    samples = cell["samples"]
    bits = [float(s["bits_per_element"]) for s in samples if s.get("bits_per_element") is not None]
    bases = sorted({str(s.get("bits_basis") or "").split(":", 1)[0] for s in samples} - {""})
    environments = sorted({str(s.get("environment") or "") for s in samples} - {""})
    records = []
    for metric in METRICS:
        mine, theirs = _per_sample(samples, metric), _per_sample(base, metric)
        common = [sample for sample in mine if sample in theirs]
        if not mine:
            continue
        q = [mine[s] for s in common]
        b = [theirs[s] for s in common]
        if common:
            ci = paired_bootstrap_delta(q, b, seed=0)
            delta, low, high = ci.estimate, ci.low, ci.high
            if len(common) < 2:
                low = high = float("nan")
        else:
            delta = low = high = float("nan")
        binary = metric != ANSWER_LOGPROB
        lost = sum(1 for x, y in zip(q, b, strict=True) if binary and y > 0.5 and not x > 0.5)
        gained = sum(1 for x, y in zip(q, b, strict=True) if binary and x > 0.5 and not y > 0.5)
        records.append(
            dict(
                model=cell["model"], task=cell["task"], length=int(cell["length"]), n=int(cell["n"]),
                label=cell["peer"], source=peer_family(cell["peer"]), metric=metric,
                fp=statistics.fmean(b) if b else float("nan"), quantized=statistics.fmean(mine.values()),
                delta=delta, ci_low=low, ci_high=high, lost=lost, gained=gained,
                bits=statistics.fmean(bits) if bits else float("nan"), bits_min=min(bits, default=float("nan")),
                bits_max=max(bits, default=float("nan")), revision=short_revision(cell.get("revision") or {}),
                torch=cell.get("torch") or "?", started=cell.get("started") or "", finished=cell.get("finished") or "",
                seconds=float(cell.get("seconds") or 0.0), basis=", ".join(bases), paired=paired, note="",
                environment="; ".join(environments),
            )
        )  # fmt: skip
    return records


def skipped_row(cell: Mapping[str, Any], reason: str) -> dict[str, Any]:
    """The record of a peer row that did not run, with its reason."""
    blank = {name: float("nan") for name in COLUMNS}
    return {
        **blank, "model": cell["model"], "task": cell["task"], "length": int(cell["length"]), "n": int(cell["n"]),
        "label": cell["peer"], "source": peer_family(cell["peer"]), "metric": SKIPPED, "note": reason,
        "basis": "", "paired": "", "environment": "", "revision": "", "torch": "", "started": "", "finished": "",
    }  # fmt: skip


def peer_records(results: Path) -> list[dict[str, Any]]:
    """Every stored external peer run's records (`peer_rows`, paired as `peer_baseline` says), and a skipped row
    for every peer stored as skipped or stopped before its last sample (its reason)."""
    folder = Path(results) / PEER_STORE
    files = [read_peer_file(path) for path in sorted(folder.glob("*.json"))] if folder.is_dir() else []
    by_cell: dict[tuple[Any, ...], dict[str, dict[str, Any]]] = {}
    for data in files:
        if data and {"model", "task", "length", "n", "peer"} <= set(data):
            by_cell.setdefault((data["model"], data["task"], int(data["length"]), int(data["n"])), {})[data["peer"]] = (
                data
            )
    records: list[dict[str, Any]] = []
    for (model, task, length, n), stored in by_cell.items():
        for name, data in stored.items():
            status = data.get("status")
            if status != "complete":
                reason = data.get("reason") or "interrupted"
                if status == "partial":
                    reason = f"stopped after {len(data.get('samples') or [])} of {n} samples: {reason}"
                records.append(skipped_row(data, reason))
                continue
            paired, _ = peer_baseline(name, stored)
            if paired == FULL_PRECISION:
                base = kvstream_full_precision(results, task, model, length, n, data["key"]["prompts"])
            else:
                base = stored[paired]["samples"]
            records += peer_rows(data, base, paired)
    return records


def collect(results: Path, labels: dict[str, str], extra: Iterable[Mapping[str, Any]] = ()) -> pd.DataFrame:
    """Every intact stored run's retrieval records, and the ``extra`` records (rows of other tools, with every
    field of `COLUMNS`), sorted for the tables; damaged runs are named and left out."""
    store = ResultsStore(results)
    intact, damaged = store.scan()
    for broken in damaged:
        print(f"damaged run {broken.run_id}: {broken.problem} (left out; the next run of the benchmark redoes it)")
    records = [record for run_id in intact for record in run_rows(store.read_run(run_id), labels)]
    frame = pd.DataFrame([*records, *(dict(r) for r in extra)], columns=list(COLUMNS))
    ranks = {label: i for i, label in enumerate(dict.fromkeys((*ORDER, *with_baselines(DEFAULT_PEERS))))}
    frame["rank"] = frame["label"].map(ranks).fillna(len(ranks))
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
    where it has none (another metric, a peer's row)."""
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


def interval(low: float, high: float, digits: int = 2) -> str:
    """A paired-bootstrap interval as ``[low, high]``, or ``-`` where there is none (one sample)."""
    return "-" if pd.isna(low) or pd.isna(high) else f"[{low:+.{digits}f}, {high:+.{digits}f}]"


def falls(record: Any) -> bool:
    """Whether a delta's whole interval lies below 0: the cache measurably worse than full precision."""
    return record is not None and pd.notna(record.ci_high) and record.ci_high < 0


def _record(rows: pd.DataFrame, label: str, metric: str) -> Any:
    found = rows[(rows["label"] == label) & (rows["metric"] == metric)]
    return next(found.itertuples(), None)


def _delta_text(record: Any, digits: int = 2) -> str:
    return f"{record.delta:+.{digits}f} {interval(record.ci_low, record.ci_high, digits)}"


def separation(rows: pd.DataFrame) -> tuple[bool, str]:
    """Whether one task/context cell (all its rows) separates caches, and why (not). Full precision is kvstream's
    (not a peer family's own baseline)."""
    paired = rows["paired"] if "paired" in rows else pd.Series(float("nan"), index=rows.index)
    kvstream_fp = paired.isna() | (paired == FULL_PRECISION)
    accuracy = rows[(rows["metric"] == "accuracy") & kvstream_fp]
    if accuracy.empty:
        return False, "no accuracy recorded"
    fp, n = float(accuracy["fp"].iloc[0]), int(accuracy["n"].iloc[0])
    if fp < SEPARATING_ACCURACY:
        return False, f"full precision answers {round(fp * n)} of {n}, below {SEPARATING_ACCURACY}"
    lossy_accuracy, lossy_score = _record(rows, LOSSY, "accuracy"), _record(rows, LOSSY, ANSWER_LOGPROB)
    if lossy_accuracy is None:
        return False, f"full precision answers {round(fp * n)} of {n}; no {LOSSY} run yet"
    found = [f"accuracy {_delta_text(lossy_accuracy)}"]
    if lossy_score is not None:
        found.append(f"answer log-likelihood {_delta_text(lossy_score, 3)} nats/token")
    if falls(lossy_accuracy) or falls(lossy_score):
        return True, f"full precision answers {round(fp * n)} of {n}; {LOSSY} falls: {'; '.join(found)}"
    return False, f"full precision answers {round(fp * n)} of {n}; {LOSSY} does not fall measurably: {'; '.join(found)}"


def cell_groups(frame: pd.DataFrame) -> Iterable[tuple[tuple[Any, ...], pd.DataFrame]]:
    return frame.groupby(["model", "task", "length", "n"], sort=False)


def separation_lines(frame: pd.DataFrame) -> list[str]:
    """One line per task/context cell: separating or not, and why."""
    lines = []
    for (model, task, length, n), rows in cell_groups(frame):
        separates, why = separation(rows)
        samples = f"{n} sample{'s' if n != 1 else ''}"
        lines.append(
            f"- {model} {task} {length} ({samples}): {'**separating**' if separates else 'not separating'}; {why}."
        )
    return lines or ["- no run recorded yet."]


def separating_lines(frame: pd.DataFrame) -> list[str]:
    """The targets on separating cells: at least three of them, and on each, `NOT_WORSE`'s configurations not below
    full precision beyond the interval (accuracy or answer log-likelihood)."""
    cells_ = [(key, rows) for key, rows in cell_groups(frame) if separation(rows)[0]]
    names = [f"{m} {t} {n}" for (m, t, n, _), _ in cells_]
    lines = [
        f"- Separating cells (full precision at {SEPARATING_ACCURACY} or more, {LOSSY} falling beyond its interval in "
        f"accuracy or answer log-likelihood), at least 3: {len(cells_)} ({', '.join(names) or 'none yet'})."
    ]
    for label in NOT_WORSE:
        checked, worse = 0, []
        for (model, task, length, _), rows in cells_:
            records = [_record(rows, label, m) for m in ("accuracy", ANSWER_LOGPROB)]
            if records[0] is None:
                continue
            checked += 1
            if any(falls(r) for r in records):
                worse.append(f"{model} {task} {length}")
        head = f"- {label} on separating cells, not worse than full precision beyond the interval:"
        lines.append(
            f"{head} no run recorded yet."
            if not checked
            else f"{head} met on {checked - len(worse)} of {checked}; missed: {', '.join(worse) or 'none'}."
        )
    return lines


def peer_target_lines(frame: pd.DataFrame) -> list[str]:
    """The target against the peers: for each measured peer row, a kvstream configuration on the same cell holding
    at most the peer's effective bits with an answer log-likelihood delta at least the peer's."""
    scores = frame[frame["metric"] == ANSWER_LOGPROB]
    checked, missed = 0, []
    for (model, task, length, _), rows in cell_groups(scores):
        ours = rows[rows["source"] == KVSTREAM_SOURCES[0]]
        for peer in rows[rows["source"] != KVSTREAM_SOURCES[0]].itertuples():
            checked += 1
            fits = ours[(ours["bits"] <= peer.bits) & (ours["delta"] >= peer.delta)]
            if fits.empty:
                missed.append(f"{peer.label} on {model} {task} {length}")
    head = "- kvstream at equal or fewer bits at or above every peer on the answer log-likelihood:"
    if not checked:
        return [f"{head} no peer row recorded yet."]
    return [f"{head} met on {checked - len(missed)} of {checked} peer rows; missed: {', '.join(missed) or 'none'}."]


def model_title(model: str) -> str:
    alias = MODEL_ALIASES.get(model)
    return f"{alias.description} (`{model}`)" if alias else f"`{model}`"


def model_table(rows: pd.DataFrame) -> list[str]:
    """The table of one model: a row per task, length and configuration, full precision beside it."""
    lines = [
        "| task | context | configuration | effective bits (range) | samples | accuracy, full precision | accuracy "
        "| delta (95% CI) | lost / gained | answer log-likelihood delta, nats/token (95% CI) "
        "| recall, full precision / cache | target | revision |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (task, length, n, label), group in rows.groupby(["task", "length", "n", "label"], sort=False):
        acc, score, recall = (_record(group, label, m) for m in ("accuracy", ANSWER_LOGPROB, "recall"))
        base = acc or score or recall
        if base is None:
            skipped = _record(group, label, SKIPPED)
            if skipped is not None:
                lines.append(
                    f"| {task} | {length} | {label} | - | {n} | - | skipped: {_cell_text(skipped.note)} "
                    "| - | - | - | - | - | - |"
                )
            continue
        lines.append(
            f"| {task} | {length} | {label} | {bits_text(base)} | {n} "
            f"| {f'{acc.fp:.2f}' if acc else '-'} | {f'{acc.quantized:.2f}' if acc else '-'} "
            f"| {_delta_text(acc) if acc else '-'} | {f'{int(acc.lost)} / {int(acc.gained)}' if acc else '-'} "
            f"| {_delta_text(score, 3) if score else '-'} "
            f"| {f'{recall.fp:.2f} / {recall.quantized:.2f}' if recall else '-'} "
            f"| {verdict(acc) if acc else '-'} | `{base.revision}` |"
        )
    return lines


def _text(value: Any) -> str:
    return value if isinstance(value, str) else ""


def _cell_text(value: Any) -> str:
    """Text fit for a Markdown table cell."""
    return _text(value).replace("|", "/").replace("\n", " ")


def bits_text(record: Any) -> str:
    """Effective bits, their range over the samples, and (peers) how they were obtained: ``measured``/``format``."""
    if pd.isna(record.bits):
        return "-"
    text = f"{record.bits:.2f} ({record.bits_min:.2f}-{record.bits_max:.2f})"
    basis = _text(getattr(record, "basis", ""))
    return f"{text}, {basis}" if basis else text


def peer_lines(frame: pd.DataFrame) -> list[str]:
    """What each peer family's rows are paired with, where they ran, and every skipped peer with its reason."""
    peers = frame[frame["label"].isin(with_baselines(DEFAULT_PEERS)) | ~frame["source"].isin(KVSTREAM_SOURCES)]
    if peers.empty:
        return []
    lines = ["Peers (rows of other tools on the same samples, named by their `kvstream.peers` name):", ""]
    if peers["source"].eq(KVSTREAM_SOURCES[1]).any():
        lines.append(
            "- quanto and KIVI (cache peers) run through kvstream's own harness as configurations: the same "
            "samples, paired with the same stored full-precision baseline as kvstream's rows; bits measured by "
            "their `memory_report()`."
        )
    measured = peers[peers["metric"] != SKIPPED]
    for family in dict.fromkeys(s for s in measured["source"] if s not in KVSTREAM_SOURCES):
        rows = measured[measured["source"] == family]
        pairs = []
        for label, group in rows.groupby("label", sort=False):
            paired = str(group["paired"].iloc[0])
            pairs.append(f"`{label}` with {'kvstream full precision' if paired == FULL_PRECISION else f'`{paired}`'}")
        base = PEER_BASELINES.get(str(family))
        why = ""
        if family == "kvpress" and any(p.endswith("with kvstream full precision") for p in pairs):
            why = (
                f" (`{base}` was not run on these samples; kvpress reads kvstream's own weights and `{base}` agrees "
                "with kvstream's full precision to 1e-3 nats per token, docs/guide.md, Peers)"
            )
        elif family == "llamacpp":
            why = (
                f" (llama.cpp computes with the GGUF's quantized weights, so its rows pair with its own `{base}`, "
                f"and `{base}` with kvstream's full precision)"
            )
        environments = sorted({e for e in rows["environment"] if _text(e)})
        where = f"; ran in {'; '.join(environments)}" if environments else ""
        if family == "kvpress" and environments:
            where = (
                f"; kvpress ran in its own environment, with its own transformers version: {'; '.join(environments)}"
            )
        lines.append(f"- {family}: paired sample by sample, {', '.join(pairs)}{why}{where}.")
    skipped = peers[peers["metric"] == SKIPPED]
    for (label, note), group in skipped.groupby(["label", "note"], sort=False):
        cells_ = ", ".join(f"{m} {t} {n}" for m, t, n in zip(group.model, group.task, group.length, strict=True))
        lines.append(f"- `{label}` skipped ({cells_}): {note}")
    return [*lines, ""]


def provenance_line(frame: pd.DataFrame) -> str:
    """Whether every row comes from one revision, the period, the versions and the time the runs took."""
    frame = frame[frame["metric"] != SKIPPED]
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
    plan: tuple[PlanRow, ...],
    recorded: set[tuple[str, str, int, int, str]],
    before: tuple[PlanRow, ...] = (),
    timing: Timing = FALLBACK,
    peers: Iterable[str] = (),
    unavailable: Mapping[tuple[str, str], str] | None = None,
) -> list[str]:
    """The plan's cells in run order with their estimated minutes and whether they are recorded.

    A cell's minutes are what it adds to ``before`` (a baseline already planned there is not counted again)."""
    lines = [
        "| # | model | task | context | samples | configuration | estimated min | recorded |",
        "|---|---|---|---|---|---|---|---|",
    ]
    peers = list(peers)
    planned_before = cells(before, peers, unavailable)
    earlier = {cell.slot for cell in planned_before}
    listed = {(*cell.slot, cell.label) for cell in planned_before}  # a peer of a slot ``before`` has runs there
    fresh = [cell for cell in cells(plan, peers, unavailable) if (*cell.slot, cell.label) not in listed]
    for i, cell in enumerate(fresh, start=1):
        if cell.slot in earlier:
            cell = replace(cell, baseline=False)
        label = cell.shown()
        done = "yes" if (*cell.slot, cell.label) in recorded else "no"
        lines.append(
            f"| {i} | {cell.model} | {cell.task} | {cell.length} | {cell.samples} | {label} "
            f"| {minutes(cell.seconds(timing))} | {done} |"
        )
    return lines


def models_by_length(plan: Iterable[PlanRow]) -> str:
    lengths: dict[str, set[int]] = {}
    for row in plan:
        lengths.setdefault(row.model, set()).add(row.length)
    return "; ".join(f"`{model}` at {', '.join(map(str, sorted(n)))} tokens" for model, n in lengths.items())


def render(
    frame: pd.DataFrame,
    plan: tuple[PlanRow, ...],
    extended: tuple[PlanRow, ...],
    timing: Timing = FALLBACK,
    peers: Iterable[str] = (),
    unavailable: Mapping[tuple[str, str], str] | None = None,
) -> str:
    """The Markdown page: status, targets, one table per model (peers' rows in it), which baseline each peer family
    is paired with and the skipped peers, which cells separate caches, the plan (with ``peers``' cells)."""
    peers = list(peers)
    core = minutes(estimate_seconds(plan, timing, peers, unavailable))
    more = minutes(estimate_seconds(plan + extended, timing, peers, unavailable)) - core
    lines = [
        "# Retrieval (evaluation suite)",
        "",
        "Written by `python benchmarks/retrieval.py` from every intact run stored under its `--results` folder "
        "(`benchmarks/results/retrieval`, committed with the repository, so an interrupted benchmark resumes in a "
        "later session). RULER-style tasks on offline data: the single needle in Paul Graham essays "
        "(`niah_single`), the multi-key needle whose haystack is all distractor needles with UUID keys and values "
        "(`niah_multikey_3`), variable tracking (`vt`: name the 5 variables of a chain of assignments hidden in "
        "filler) and frequent-word extraction (`fwe`: the 3 most frequent words of a Zipf-distributed coded list); "
        f"fp32, chunk size 256; the plan's models by length: {models_by_length(plan + extended)}. Each cache runs "
        "on the same samples as the full-precision cache, which is measured once per model, task, length and "
        "sample count and reused by every configuration while its key (prompts, gold answers, model files, dtype, "
        "device, library versions) matches. Configurations: normal bits N with sinks and outliers at 8 "
        "(`N/8 bits`) and the bit-budget presets `configs/bits-3.3.yaml` and `configs/bits-2.5.yaml`, each with "
        "the effective bits it held: every byte at the end of generation, exact tail included, mean over the "
        "samples (range). Rows may come from other tools run on the same samples; the configuration column names "
        "them.",
        "",
        "Accuracy is the share of samples whose answer holds every expected value, recall (multi-value tasks) the "
        "share of expected values found. The answer log-likelihood is the gold answer's teacher-forced "
        "log-probability per token right after the prompt, from the same prefill as the generated answer (one "
        "forward of the answer's tokens on a fork of the prefilled cache; generation continues from the cache "
        "as the prompt left it); its delta is the cache's minus full precision's, sample by sample. Intervals are "
        "95% paired bootstrap intervals of the delta over samples; lost / gained count the samples full precision "
        "answers and the cache does not, and the reverse. A preset's row meets its target only while it held at "
        "most the preset's effective bits (mean over the samples). A task/context cell **separates** caches when "
        f"full precision answers at least {SEPARATING_ACCURACY} of its samples and {LOSSY} (a known-lossy cache) "
        "falls beyond its interval, in accuracy or in answer log-likelihood; only there does a target met say "
        "much. Each row names the revision it was measured at. Perplexity per strategy is measured by "
        "`benchmarks/quality.py` ([benchmarks-quality.md](benchmarks-quality.md)).",
        "",
    ]
    if frame[frame["metric"] != SKIPPED].empty:
        status = f"**No runs are recorded yet for this plan** (estimated {core} min on two CPU cores; see the plan)."
    else:
        status = provenance_line(frame)
    accuracy = frame[frame["metric"] == "accuracy"]
    lines += [status, "", "## Targets", "", *separating_lines(frame), *target_lines(accuracy)]
    lines += [*peer_target_lines(frame), ""]
    for model, rows in frame.groupby("model", sort=False):
        lines += [f"## {model_title(str(model))}", "", *model_table(rows), ""]
    lines += peer_lines(frame)
    absent = {name: reason for (name, _), reason in (unavailable or {}).items()}
    if absent:
        lines += ["Peers that cannot run here (their cells are skipped rows of the plan):", ""]
        root = f"{Path(__file__).resolve().parent.parent}/"  # the page names paths inside the checkout relatively
        lines += [f"- `{name}`: {reason.replace(root, '')}" for name, reason in absent.items()]
        lines.append("")
    lines += [
        "## Which cells separate caches",
        "",
        f"A task/context cell where full precision answers fewer than {SEPARATING_ACCURACY} of the samples, or where "
        f"{LOSSY} stays within its interval of full precision in accuracy and in answer log-likelihood, cannot tell "
        "a good cache from a bad one.",
        "",
        *separation_lines(frame),
        "",
    ]
    measured = frame[frame["metric"] != SKIPPED]
    recorded = set(zip(measured.model, measured.task, measured.length, measured.n, measured.label, strict=True))
    pairs = [(c.model, c.length) for c in cells(plan + extended)]
    lines += [
        "## Plan",
        "",
        f"The cells run in this order (`python benchmarks/retrieval.py --plan` prints it with seconds): at each "
        f"context, first every task's {LOSSY} with its full-precision baseline (the screen), then the other "
        f"configurations. A sample through one cache on two CPU cores: {timing.describe(pairs)}; measured from "
        f"{timing.source}, and carried to other lengths as L (1 + L / H), H the length at which a prefill's "
        "attention work equals the rest ("
        + ", ".join(f"{n} tokens for `{m}`" for m, n in ATTENTION_LENGTH.items())
        + ").",
        "",
        f"`make bench` runs these cells, estimated {core} min on two CPU cores:",
        "",
        *plan_table(plan, recorded, timing=timing, peers=peers, unavailable=unavailable),
        "",
        f"`--extended` adds these, another {more} min (the results store resumes them across sessions):",
        "",
        *plan_table(extended, recorded, plan, timing, peers, unavailable),
    ]
    if any(peer not in CACHE_PEERS for peer in peers):
        factors = ", ".join(f"`{k}` x{v:g}" for k, v in PEER_SAMPLE_FACTOR.items())
        lines += [
            "",
            "An external peer's minutes are a stated estimate, not a measurement: a kvstream sample's seconds at the "
            f"same model and length times {factors} (llama.cpp's quantized prefill ran 2.4-4x slower than its own "
            "f16 on two threads, issue 20). A peer that cannot run here counts no minutes.",
        ]
    return "\n".join(lines) + "\n"


def write_report(
    results: Path,
    out: Path,
    configs: Mapping[str, CompressionConfig],
    timing: Timing = FALLBACK,
    peers: Iterable[str] = (),
    unavailable: Mapping[tuple[str, str], str] | None = None,
) -> None:
    """Rebuild the page at ``out`` from every intact run under ``results`` and every stored peer run or skip (the
    plan's tables list ``peers``' cells, those in ``unavailable`` as skipped)."""
    labels = {peer.config().config_hash(): name for name, peer in CACHE_PEERS.items()}
    labels.update({config.config_hash(): label for label, config in configs.items()})
    frame = collect(results, labels, extra=peer_records(results))
    page = render(frame, PLAN, EXTENDED, timing, peers, unavailable)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page)
    print(f"wrote {out}")


# --------------------------------------------------------------------------- command line


def comma_list(text: str) -> list[str]:
    """``a,b`` -> ``["a", "b"]``."""
    return [part.strip() for part in text.split(",") if part.strip()]


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--plan", action="store_true", help="print the cells in run order with their seconds, and exit")
    parser.add_argument("--extended", action="store_true", help="also run the extended rows (8k and 16k tokens)")
    parser.add_argument("--models", type=comma_list, default=None, help="only these models of the plan")
    parser.add_argument("--tasks", type=comma_list, default=None, help="only these tasks of the plan")
    parser.add_argument("--lengths", type=lambda s: [int(x) for x in comma_list(s)], default=None)
    parser.add_argument("--configs", type=comma_list, default=None, help=f"only these of {', '.join(ORDER)}")
    parser.add_argument("--results", type=Path, default=Path("benchmarks/results/retrieval"))
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks-retrieval.md"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--report-only", action="store_true", help="rebuild the page from the stored runs")
    parser.add_argument(
        "--peers",
        type=lambda s: [] if s.strip() == "none" else comma_list(s),
        default=None,
        help="peer rows added to every planned cell, comma-separated kvstream.peers names, or 'none' (default: "
        f"{', '.join(DEFAULT_PEERS)}; those that cannot run here are skipped rows with their reason; a llama.cpp "
        "row brings llamacpp-f16, its baseline)",
    )
    args = parser.parse_args()
    if args.peers is None:
        args.peers = list(DEFAULT_PEERS)
    for name in args.peers:
        try:
            make_peer(name)
        except ValueError as error:
            parser.error(f"--peers: {error}")
    args.peers = with_baselines(args.peers)
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
    configs = configurations()
    timing = Timing.from_store(args.results)
    peers = PeerSet(args.peers, threads=args.threads)
    unavailable = peers.reasons(row.model for row in PLAN + EXTENDED if wanted(row, args))
    if args.plan or not args.report_only:
        labels = [label for label in configs if args.configs is None or label in args.configs]
        plan = select(PLAN + EXTENDED if args.extended else PLAN, labels, lambda row: wanted(row, args))
        print("\n".join(plan_lines(plan, timing, configs, args.results, peers.names, unavailable)), flush=True)
        if args.plan:
            return
        torch.set_num_threads(args.threads)
        run(plan, configs, args.results, kvstream.load_model, peers)
    write_report(args.results, args.out, configs, timing, peers.names, unavailable)


if __name__ == "__main__":
    main()
