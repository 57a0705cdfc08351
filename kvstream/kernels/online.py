"""Online softmax: attention over key tiles one at a time, merged with the log-sum-exp rule."""

from __future__ import annotations

import torch

from kvstream.quant.base import tensor_bytes


class OnlineSoftmax:
    """Running max ``m``, normaliser ``norm`` and unnormalised output ``acc`` of rows of queries.

    ``add`` folds in one tile of scores and values; ``merge`` folds in a partial result computed
    elsewhere (a kernel) as ``(acc, m, norm)``. Fully masked rows end as zeros.
    """

    def __init__(self) -> None:
        self.m: torch.Tensor | None = None
        self.norm: torch.Tensor | None = None
        self.acc: torch.Tensor | None = None
        self.peak_transient = 0

    def add(self, scores: torch.Tensor, values: torch.Tensor) -> None:
        """``scores`` [..., rows, n] (masked entries at -inf) against ``values`` [..., n, head_dim]."""
        tile_max = scores.amax(dim=-1)
        new_max = tile_max if self.m is None else torch.maximum(self.m, tile_max)
        p = torch.exp(scores - _finite(new_max).unsqueeze(-1))
        self.merge(p @ values, tile_max, p.sum(dim=-1), exp_applied=True)
        self.peak_transient = max(self.peak_transient, tensor_bytes(scores, p, values))

    def merge(self, acc: torch.Tensor, m: torch.Tensor, norm: torch.Tensor, exp_applied: bool = False) -> None:
        """Fold in a partial ``(acc, m, norm)``; with ``exp_applied`` it is already scaled to the new max."""
        if self.m is None:
            self.acc, self.m, self.norm = acc, m, norm
            return
        new_m = torch.maximum(self.m, m)
        safe = _finite(new_m)
        keep = torch.exp(self.m - safe)
        take = torch.ones_like(m) if exp_applied else torch.exp(m - safe)
        self.norm = self.norm * keep + norm * take
        self.acc = self.acc * keep.unsqueeze(-1) + acc * take.unsqueeze(-1)
        self.m = new_m

    def result(self) -> torch.Tensor:
        return self.acc / self.norm.clamp_min(torch.finfo(self.norm.dtype).tiny).unsqueeze(-1)


def _finite(m: torch.Tensor) -> torch.Tensor:
    """``m`` with -inf (rows that saw only masked keys so far) replaced by 0, so exp() stays defined."""
    return torch.where(torch.isinf(m), torch.zeros_like(m), m)
