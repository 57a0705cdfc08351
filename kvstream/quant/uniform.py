"""Uniform round-to-nearest quantization, symmetric or asymmetric (zero-point), 2 to 8 bits."""

from __future__ import annotations

import torch

from kvstream.quant.base import QuantizedTensor, passthrough
from kvstream.quant.packing import pack, unpack
from kvstream.quant.scales import LOG_SCALE_MAX_BITS, decode_scale, step_and_zero


def masked_range(
    x: torch.Tensor, dim: int | tuple[int, ...], mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Min and max of ``x`` over ``dim`` (kept), ignoring entries where ``mask`` is False.

    A slice with no counted entry gets the range [0, 0].
    """
    if mask is None:
        return x.amin(dim=dim, keepdim=True), x.amax(dim=dim, keepdim=True)
    mask = mask.expand_as(x)
    lo = torch.where(mask, x, torch.full_like(x, float("inf"))).amin(dim=dim, keepdim=True)
    hi = torch.where(mask, x, torch.full_like(x, float("-inf"))).amax(dim=dim, keepdim=True)
    empty = torch.isinf(lo)
    return lo.masked_fill(empty, 0.0), hi.masked_fill(empty, 0.0)


class UniformQuantizer:
    """Uniform round-to-nearest with a scale (and zero-point) per slice, fp16 where it holds them; dense packing."""

    scale_bits = 16
    """16: scales as `kvstream.quant.scales.step_and_zero` stores them; 8: 2- to 4-bit slices' steps as 8-bit
    logarithmic codes (the cache sets it from ``scale_bits``)."""

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
        xf = x.float()
        lo, hi = masked_range(xf, dim, mask)
        scale_bits = self.scale_bits if bits <= LOG_SCALE_MAX_BITS else 16
        if symmetric:
            levels = (1 << (bits - 1)) - 1 if bits > 1 else 1
            scale, _ = step_and_zero(lo, hi, levels, True, scale_bits)
            q = torch.round(xf / decode_scale(scale)).clamp(-levels, levels) + levels
            zero = None
        else:
            levels = (1 << bits) - 1
            scale, zero = step_and_zero(lo, hi, levels, False, scale_bits)
            q = torch.round((xf - zero.float()) / decode_scale(scale)).clamp(0, levels)
        return QuantizedTensor(
            codes=pack(q.to(torch.uint8), bits),
            bits=bits,
            shape=tuple(x.shape),
            dtype=x.dtype,
            scale=scale,
            zero=zero,
        )

    def level_table(self, bits: int) -> None:
        """The packed format the fused readers take (`kvstream.quant.base.Quantizer`): plain uniform codes."""
        return None

    def dequantize(self, q: QuantizedTensor) -> torch.Tensor:
        if q.bits == 16:
            return q.codes
        codes = unpack(q.codes, q.bits, q.numel()).view(q.shape).float()
        scale = decode_scale(q.scale)
        if q.zero is None:
            levels = (1 << (q.bits - 1)) - 1 if q.bits > 1 else 1
            return torch.addcmul(-levels * scale, codes, scale).to(q.dtype)
        return torch.addcmul(q.zero.float(), codes, scale).to(q.dtype)
