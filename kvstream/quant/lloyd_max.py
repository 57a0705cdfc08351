"""Non-uniform levels with no calibration: Lloyd-Max levels of the standard normal, per slice mean and spread.

After a random rotation (`kvstream.quant.rotation`) the coordinates of a key or value vector are
close to Gaussian, so the mean-squared-error optimal scalar quantizer of N(0, 1) (Lloyd 1957 /
Max 1960; the fixed scalar quantizer TurboQuant applies after its rotation, Zandieh et al. 2025)
fits them with nothing learned from data. Each scale slice stores its mean (fp16 ``zero``; none
when symmetric) and its standard deviation (fp16 ``scale``) over the counted entries; a code is the
index of the nearest level of ``mean + std * level``.

`FittedLevelsQuantizer` is the data-fitted comparison: Lloyd's algorithm run on every slice from
the Gaussian levels, the slice's own levels kept in fp16 (``extra["levels"]``, counted).

Widths above `MAX_LEVEL_BITS` (the 8-bit sinks and outliers) are uniform.
"""

from __future__ import annotations

import functools
import math

import torch

from kvstream.quant.base import QuantizedTensor, passthrough
from kvstream.quant.packing import pack, unpack
from kvstream.quant.scales import compact, decode_scale, log_scales
from kvstream.quant.uniform import UniformQuantizer

MAX_LEVEL_BITS = 4
_EPS = 2.0**-24
_FIT_ITERATIONS = 8


@functools.cache
def _levels_fp32(bits: int) -> torch.Tensor:
    """`gaussian_levels` in fp32, made once per width (every block and every decode step reads them)."""
    return gaussian_levels(bits).float()


def _normal_pdf(x: torch.Tensor) -> torch.Tensor:
    return torch.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)


def _normal_cdf(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1 + torch.erf(x / math.sqrt(2)))


@functools.cache
def gaussian_levels(bits: int) -> torch.Tensor:
    """The ``2**bits`` Lloyd-Max levels of N(0, 1), ascending (fp64), by Lloyd's iteration to convergence.

    Each level moves to the mean of the normal over its cell, ``(pdf(a) - pdf(b)) / (cdf(b) - cdf(a))``,
    and each boundary to the midpoint of its neighbours, until nothing moves.
    """
    n = 1 << bits
    levels = torch.linspace(-2.5, 2.5, n, dtype=torch.float64)
    for _ in range(10_000):
        edges = torch.cat([torch.tensor([-math.inf]), (levels[1:] + levels[:-1]) / 2, torch.tensor([math.inf])])
        a, b = edges[:-1].double(), edges[1:].double()
        mass = _normal_cdf(b) - _normal_cdf(a)
        updated = (_normal_pdf(a) - _normal_pdf(b)) / mass
        if torch.allclose(updated, levels, rtol=0, atol=1e-12):
            return updated
        levels = updated
    return levels


def _cells(x: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Index of the nearest of the ascending ``levels`` ([..., K], broadcasting against ``x``) for every entry."""
    thresholds = (levels[..., 1:] + levels[..., :-1]) / 2
    return (x.unsqueeze(-1) > thresholds).sum(-1)


def slice_moments(
    x: torch.Tensor, dim: int | tuple[int, ...], symmetric: bool, mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean (zero when ``symmetric``) and standard deviation (root mean square when symmetric) of ``x`` over
    ``dim`` (kept), counting only entries where ``mask`` holds; a slice with nothing counted gets 0 and 1."""
    weight = torch.ones_like(x) if mask is None else mask.expand_as(x).to(x.dtype)
    count = weight.sum(dim=dim, keepdim=True)
    safe = count.clamp_min(1)
    mean = torch.zeros_like(count) if symmetric else (x * weight).sum(dim=dim, keepdim=True) / safe
    spread = (((x - mean) ** 2) * weight).sum(dim=dim, keepdim=True) / safe
    std = torch.where(count > 0, spread.sqrt(), torch.ones_like(spread)).clamp_min(_EPS)
    return mean, std


class LloydMaxQuantizer:
    """Gaussian Lloyd-Max levels scaled by each slice's mean and standard deviation (2-4 bits)."""

    fitted = False

    def __init__(self) -> None:
        self.uniform = UniformQuantizer()

    @property
    def scale_bits(self) -> int:
        """16: fp16 spreads; 8: spreads as 8-bit logarithmic codes (`kvstream.quant.scales`); wider slices
        (uniform) follow the same setting."""
        return self.uniform.scale_bits

    @scale_bits.setter
    def scale_bits(self, bits: int) -> None:
        self.uniform.scale_bits = bits

    def quantize(
        self,
        x: torch.Tensor,
        bits: int,
        dim: int | tuple[int, ...],
        symmetric: bool = False,
        mask: torch.Tensor | None = None,
    ) -> QuantizedTensor:
        if bits == 16:
            return passthrough(x)
        if bits > MAX_LEVEL_BITS:
            return self.uniform.quantize(x, bits, dim, symmetric, mask)
        xf = x.float()
        mean, std = slice_moments(xf, dim, symmetric, mask)
        scale = log_scales(std, compact(std)) if self.scale_bits == 8 and not self.fitted else compact(std)
        zero = None if symmetric else compact(mean)
        s, z = decode_scale(scale), torch.zeros_like(mean) if zero is None else zero.float()
        base = self.level_table(bits).to(x.device)
        extra: dict[str, torch.Tensor] = {}
        if self.fitted:
            levels = self._fit(xf, z.unsqueeze(-1) + s.unsqueeze(-1) * base, dim, mask)
            stored = compact(levels)
            extra["levels"] = stored
            codes = _cells(xf, stored.float())
            scale = zero = None
        else:
            codes = _cells((xf - z) / s, base)
        return QuantizedTensor(
            codes=pack(codes.to(torch.uint8), bits),
            bits=bits,
            shape=tuple(x.shape),
            dtype=x.dtype,
            scale=scale,
            zero=zero,
            extra=extra,
        )

    def level_table(self, bits: int) -> torch.Tensor | None:
        """The packed format the fused readers take: code ``c`` stands for ``levels[c] * std + mean``; widths
        above `MAX_LEVEL_BITS` are uniform. Fitted levels live in each block (extras), which no table describes."""
        if bits > MAX_LEVEL_BITS:
            return None
        return _levels_fp32(bits)

    def _fit(
        self, x: torch.Tensor, levels: torch.Tensor, dim: int | tuple[int, ...], mask: torch.Tensor | None
    ) -> torch.Tensor:
        """Lloyd's algorithm on every slice of ``x`` over ``dim``: levels ``[*slice shape, K]`` (fp32)."""
        k = levels.shape[-1]
        weight = (torch.ones_like(x) if mask is None else mask.expand_as(x).to(x.dtype)).unsqueeze(-1)
        xs = x.unsqueeze(-1)
        dims = (dim,) if isinstance(dim, int) else dim
        dims = tuple(d % x.dim() for d in dims)
        for _ in range(_FIT_ITERATIONS):
            cell = _cells(x, levels)
            member = torch.nn.functional.one_hot(cell, k).to(x.dtype) * weight
            count = member.sum(dim=dims, keepdim=True)
            total = (member * xs).sum(dim=dims, keepdim=True)
            updated = torch.where(count > 0, total / count.clamp_min(1), levels)
            levels = updated.sort(dim=-1).values
        return levels

    def dequantize(self, q: QuantizedTensor) -> torch.Tensor:
        if q.bits == 16:
            return q.codes
        if q.bits > MAX_LEVEL_BITS:
            return self.uniform.dequantize(q)
        codes = unpack(q.codes, q.bits, q.numel()).view(q.shape).long()
        if "levels" in q.extra:
            levels = q.extra["levels"].float()
            return levels.expand(*q.shape, levels.shape[-1]).gather(-1, codes.unsqueeze(-1)).squeeze(-1).to(q.dtype)
        values = self.level_table(q.bits).to(codes.device)[codes]
        out = values * decode_scale(q.scale)
        if q.zero is not None:
            out += q.zero.float()
        return out.to(q.dtype)


class FittedLevelsQuantizer(LloydMaxQuantizer):
    """Levels fitted to each slice by Lloyd's algorithm (from the Gaussian ones), stored with the slice."""

    fitted = True
