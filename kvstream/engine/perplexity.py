"""Perplexity of a long text scored in the same streaming way the cache is filled."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from kvstream.engine.prefill import ProgressFn, _chunks, forward_hidden, model_device


@dataclass
class PerplexityResult:
    nll_sum: float
    tokens: int

    @property
    def nll(self) -> float:
        return self.nll_sum / self.tokens

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll)


@torch.inference_mode()
def streaming_perplexity(
    model: Any,
    input_ids: torch.Tensor,
    cache: Any,
    chunk_size: int,
    progress: ProgressFn | None = None,
) -> PerplexityResult:
    """Mean next-token loss of ``input_ids`` ([1, tokens]), computed chunk by chunk.

    Each chunk attends to the cache built from the earlier chunks (quantized or not), so the
    score measures exactly what the compression costs; only one chunk's logits exist at a time.
    """
    input_ids = input_ids.to(model_device(model))
    total = input_ids.shape[1]
    if total < 2:
        raise ValueError("perplexity needs at least two tokens")
    head = model.get_output_embeddings()
    nll_sum, count = 0.0, 0
    for start, end in _chunks(total, chunk_size):
        hidden = forward_hidden(model, input_ids[:, start:end], cache, start, None)
        targets = input_ids[:, start + 1 : end + 1]
        n = targets.shape[1]
        if n:
            logits = head(hidden[:, :n]).float()
            nll_sum += F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum").item()
            count += targets.numel()
        if progress:
            progress(end, total)
    return PerplexityResult(nll_sum=nll_sum, tokens=count)
