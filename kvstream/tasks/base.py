"""The task interface: a task yields samples and turns one model run per sample into tidy rows."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from transformers import Cache


@dataclass
class Sample:
    """One unit of evaluation: a prompt (or text to score) and its gold answers."""

    id: str
    prompt: str
    answers: list[str] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class TaskOptions:
    """What the user asked for on the command line; tasks ignore what does not concern them."""

    samples: int | None = None
    """At most this many samples (None: the task's default)."""
    length: int | None = None
    """Context length in tokens for synthetic tasks; input budget for LongBench."""
    seed: int = 0
    corpus: str | None = None
    """Perplexity corpus name or text file."""
    depths: list[float] | None = None
    """Needle depths in [0, 1] for needle tasks."""
    data_dir: str | None = None
    """Where downloaded data sets live (default: the kvstream store)."""


@dataclass
class Row:
    """One observation: a metric of one sample (or the aggregate when ``sample`` is None)."""

    metric: str
    value: float
    sample: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ScoredAnswer:
    """A greedy answer and the teacher-forced log-likelihood of the gold answer after the same prompt.

    ``logprob`` is the sum over the gold answer's ``tokens`` of each token's natural log-probability given
    the prompt and the gold tokens before it; the retrieval tasks report its mean per token."""

    text: str
    logprob: float
    tokens: int

    @property
    def mean_logprob(self) -> float:
        """Log-probability per gold answer token (nats); NaN for an empty answer."""
        return self.logprob / self.tokens if self.tokens else float("nan")


@dataclass
class RunContext:
    """Everything a task needs to run a model with one cache strategy, and nothing about the CLI."""

    model: Any
    tokenizer: Any
    make_cache: Callable[[], Cache]
    chunk_size: int
    generate: Callable[..., str]
    """``generate(prompt_ids, max_new_tokens, eos_token_ids=None, min_new_tokens=0) -> str``: chunked
    prefill + greedy decode. ``eos_token_ids`` replaces the tokenizer's EOS as the stop set; the stop
    ids are forbidden for the first ``min_new_tokens`` tokens (``generate``'s ``min_length`` rule)."""
    perplexity: Callable[..., Any]
    """``perplexity(input_ids) -> PerplexityResult``: streaming loss over a token sequence."""
    on_cache: Callable[[Cache], None] | None = None
    """Called with each cache after use (memory accounting)."""
    generate_scored: Callable[..., ScoredAnswer] | None = None
    """``generate_scored(prompt_ids, answer_ids, max_new_tokens, eos_token_ids=None, min_new_tokens=0)
    -> ScoredAnswer``: `generate`, plus the log-likelihood of the gold ``answer_ids`` teacher-forced right
    after the prompt, from the same prefill (`kvstream.engine.scoring`); None where the runner cannot score."""


@runtime_checkable
class Task(Protocol):
    """A registered task (entry-point group ``kvstream.tasks``)."""

    name: str
    description: str
    per_sample_metric: str
    """The metric whose per-sample values get a bootstrap interval."""

    def samples(self, options: TaskOptions, tokenizer: Any) -> list[Sample]: ...

    def run(self, ctx: RunContext, sample: Sample) -> list[Row]: ...


class TaskDataMissing(FileNotFoundError):
    """A task's data is not in the store; the message names the `kvstream download` to run."""
