"""Dense-and-sparse quantization: the entries that stand furthest out of their slice are kept exactly.

A block's entries whose distance from their scale slice's mean, in units of the slice's standard
deviation, is among the largest ``fraction`` are taken out of the dense part: the inner quantizer
sets its ranges without them (a tighter range for everything else), and they are stored apart as
a sparse part, their flat positions (int16 when the block has at most 32,768 entries, else
int32) and their values (fp16 where it holds them) (KVQuant's dense-and-sparse split, Hooper et al. 2024, with the
selection made per block from the block itself instead of from calibrated thresholds).
"""

from __future__ import annotations

import torch

from kvstream.quant.base import QuantizedTensor, Quantizer
from kvstream.quant.lloyd_max import slice_moments
from kvstream.quant.scales import compact

SPARSE_INDEX = "sparse_index"
SPARSE_VALUE = "sparse_value"


class SparseOutliers:
    """Wraps a quantizer: entries below ``max_bits`` widths lose their most outlying ``fraction`` to a sparse part."""

    def __init__(self, inner: Quantizer, fraction: float, max_bits: int = 4) -> None:
        self.inner = inner
        self.fraction = fraction
        self.max_bits = max_bits

    def quantize(
        self,
        x: torch.Tensor,
        bits: int,
        dim: int | tuple[int, ...],
        symmetric: bool = False,
        mask: torch.Tensor | None = None,
    ) -> QuantizedTensor:
        count = int(self.fraction * x.numel())
        if bits > self.max_bits or count == 0:
            return self.inner.quantize(x, bits, dim, symmetric, mask)
        xf = x.float()
        counted = torch.ones_like(xf, dtype=torch.bool) if mask is None else mask.expand_as(xf)
        mean, std = slice_moments(xf, dim, False, counted)
        outlying = ((xf - mean).abs() / std).masked_fill(~counted, -1.0).flatten()
        index = outlying.topk(count).indices
        kept = torch.zeros(x.numel(), dtype=torch.bool, device=x.device)
        kept[index] = True
        q = self.inner.quantize(x, bits, dim, symmetric, counted & ~kept.view_as(x))
        q.extra[SPARSE_INDEX] = index.to(torch.int16 if x.numel() <= 1 << 15 else torch.int32)
        q.extra[SPARSE_VALUE] = compact(xf.flatten()[index])
        return q

    def dequantize(self, q: QuantizedTensor) -> torch.Tensor:
        out = self.inner.dequantize(q)
        if SPARSE_INDEX in q.extra:
            flat = out.reshape(-1)
            flat[q.extra[SPARSE_INDEX].long()] = q.extra[SPARSE_VALUE].to(out.dtype)
            out = flat.view(q.shape)
        return out
