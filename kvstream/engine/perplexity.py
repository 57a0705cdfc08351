"""Perplexity of a long text scored in the same streaming way the cache is filled, and the agreement of
quantized caches' next-token distributions with a reference cache's over the same tokens."""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from kvstream.engine.prefill import ProgressFn, _chunks, forward_hidden, model_device

HEAD_TOKENS = 64
"""Positions put through the LM head at once: full-vocabulary fp32 logits exist for these only."""


@dataclass
class PerplexityResult:
    """Next-token loss of one cache over a text, per prefill chunk; with a reference, the KL divergence of
    the reference's next-token distribution from this one's and how often their top-1 tokens agree."""

    nll_sum: float = 0.0
    tokens: int = 0
    chunk_nll: list[float] = field(default_factory=list)
    chunk_kl: list[float] = field(default_factory=list)
    chunk_top1: list[int] = field(default_factory=list)
    chunk_tokens: list[int] = field(default_factory=list)
    seconds: float = 0.0
    """Time spent in this cache's forward passes and LM head (device synchronised), the reference's excluded."""

    @property
    def nll(self) -> float:
        return self.nll_sum / self.tokens

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll)

    @property
    def compared(self) -> bool:
        """True when the result was measured against a reference (KL and top-1 exist)."""
        return bool(self.chunk_kl)

    @property
    def mean_kl(self) -> float:
        """Mean over positions of KL(reference || this), in nats."""
        return sum(self.chunk_kl) / self.tokens

    @property
    def top1_agreement(self) -> float:
        """Share of positions whose most likely next token is the reference's."""
        return sum(self.chunk_top1) / self.tokens

    def add_chunk(self, nll: float, n: int, kl: float | None = None, top1: int | None = None) -> None:
        self.nll_sum += nll
        self.tokens += n
        self.chunk_nll.append(nll)
        self.chunk_tokens.append(n)
        if kl is not None:
            self.chunk_kl.append(kl)
            self.chunk_top1.append(int(top1 or 0))


@torch.inference_mode()
def streaming_compare(
    model: Any,
    input_ids: torch.Tensor,
    caches: Mapping[str, Any],
    chunk_size: int,
    reference: str | None = None,
    progress: ProgressFn | None = None,
    decode_steps: int = 0,
) -> dict[str, PerplexityResult]:
    """Score ``input_ids`` ([1, tokens]) through every cache of ``caches`` chunk by chunk, in lockstep; the
    last ``decode_steps`` tokens go in one at a time, as a generation feeds its answer to the cache.

    Each chunk attends to what its cache built from the earlier chunks, so a score measures exactly
    what that cache costs. With ``reference`` (a key of ``caches``), every other cache's result also
    holds the KL divergence of the reference's next-token distribution from its own and the top-1
    agreement, on the same positions; the reference is computed once for all of them (its own result
    holds KL 0 and agreement 1: compared with itself). Logits exist
    for `HEAD_TOKENS` positions at a time.
    """
    input_ids = input_ids.to(model_device(model))
    total = input_ids.shape[1]
    if total < 2:
        raise ValueError("perplexity needs at least two tokens")
    if not 0 <= decode_steps < total:
        raise ValueError(f"decode_steps: {decode_steps} is not in [0, {total}) for {total} tokens")
    if reference is not None and reference not in caches:
        raise ValueError(f"reference {reference!r} is not one of the caches: {', '.join(caches)}")
    head = model.get_output_embeddings()
    results = {name: PerplexityResult() for name in caches}
    device = input_ids.device
    prompt = total - decode_steps
    steps = [(t, t + 1) for t in range(prompt, total)]
    for start, end in [*_chunks(prompt, chunk_size), *steps]:
        hidden = {}
        for name, cache in caches.items():
            with _timed(results[name], device):
                hidden[name] = forward_hidden(model, input_ids[:, start:end], cache, start, None)
        targets = input_ids[:, start + 1 : end + 1]
        n = targets.shape[1]
        if n:
            sums = {name: [0.0, 0.0, 0] for name in caches}  # nll, kl, top-1 agreements
            for first in range(0, n, HEAD_TOKENS):
                last = min(first + HEAD_TOKENS, n)
                goal = targets[:, first:last].flatten()
                logps = {}
                for name in caches:
                    with _timed(results[name], device):
                        logps[name] = F.log_softmax(head(hidden[name][:, first:last]).float().flatten(0, 1), dim=-1)
                ref_logp = None if reference is None else logps[reference].to(goal.device)
                for name, logp in logps.items():
                    logp = logp.to(goal.device)
                    sums[name][0] += float(F.nll_loss(logp, goal, reduction="sum"))
                    if ref_logp is not None and name != reference:
                        sums[name][1] += float((ref_logp.exp() * (ref_logp - logp)).sum())
                        sums[name][2] += int((ref_logp.argmax(-1) == logp.argmax(-1)).sum())
            for name, (nll, kl, top1) in sums.items():
                if name == reference:  # compared with itself: no divergence, every top-1 agrees
                    kl, top1 = 0.0, n
                compared = reference is not None
                results[name].add_chunk(nll, n, kl if compared else None, top1 if compared else None)
        if progress:
            progress(end, total)
    return results


@contextmanager
def _timed(result: PerplexityResult, device: torch.device) -> Iterator[None]:
    """Add the wall time of the block, with the device's queued work finished, to ``result.seconds``."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    yield
    sync()
    result.seconds += time.perf_counter() - start


def streaming_perplexity(
    model: Any,
    input_ids: torch.Tensor,
    cache: Any,
    chunk_size: int,
    progress: ProgressFn | None = None,
) -> PerplexityResult:
    """Mean next-token loss of ``input_ids`` ([1, tokens]) through ``cache``, computed chunk by chunk."""
    return streaming_compare(model, input_ids, {"cache": cache}, chunk_size, progress=progress)["cache"]
