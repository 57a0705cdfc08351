"""How per-slice metadata (scales, zero-points, kept values) is stored: fp16 where fp16 holds it, else fp32.

fp16 keeps 11 significant bits only between its smallest normal number (6.1e-5) and 65504: a
quiet head's step below that range would be stored subnormal, with a few significant bits, and a
large zero-point would overflow. A tensor with any slice that fp16 cannot hold is stored in fp32
(its bytes counted as such), every other slice keeping the value fp16 gives it, so a slice's
stored value, and the codes computed against it, never depend on the other slices of its tensor
(the other rows of a batch among them).
"""

from __future__ import annotations

import torch

FP16 = torch.finfo(torch.float16)

STEP_SLACK = 2.0**-8
"""How much wider than the ideal step (range / levels) a step rounded into fp16 may be."""


def normal_fp16(t: torch.Tensor) -> torch.Tensor:
    """Where ``t`` (fp32) is zero or of a magnitude in fp16's normal range, which holds it to 11 bits."""
    magnitude = t.abs()
    return (magnitude == 0) | ((magnitude >= FP16.tiny) & (magnitude <= FP16.max))


def settle(half: torch.Tensor, full: torch.Tensor, holds: torch.Tensor) -> torch.Tensor:
    """fp16 ``half`` where every slice ``holds``; otherwise fp32 taking ``half``'s value where it holds."""
    if bool(holds.all()):
        return half
    return torch.where(holds, half.float(), full.float())


def compact(t: torch.Tensor) -> torch.Tensor:
    """``t`` rounded to nearest in fp16 where fp16 holds it at full precision, else exactly in fp32."""
    tf = t.float()
    return settle(tf.half(), tf, normal_fp16(tf))


def round_toward(x: torch.Tensor, dtype: torch.dtype, up: bool) -> torch.Tensor:
    """The value of ``dtype`` nearest ``x`` (fp32 in) on the side ``up`` names: at or above it, else at or below."""
    stored = x.to(dtype)
    overshot = stored.float() < x if up else stored.float() > x
    limit = torch.full_like(stored, float("inf") if up else float("-inf"))
    return torch.where(overshot, torch.nextafter(stored, limit), stored)


def step_and_zero(
    lo: torch.Tensor, hi: torch.Tensor, levels: int, symmetric: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Stored step and zero-point of slices spanning ``[lo, hi]`` with ``levels`` steps (fp32 in).

    The zero-point is rounded down and the step up, so every value of the range is restored
    within half a stored step (no code is clipped by the rounding). A slice keeps fp16 values
    when they leave its step within `STEP_SLACK` of the ideal one (a constant slice: when its
    zero-point is exact); the tensor is fp16 when every slice does (`settle`). Symmetric slices
    have no zero-point: the step covers ``max(|lo|, |hi|)``.
    """
    ideal = (torch.maximum(lo.abs(), hi.abs()) if symmetric else hi - lo) / levels
    step16, zero16 = _rounded(lo, hi, levels, symmetric, torch.float16)
    constant = ideal == 0
    holds = normal_fp16(step16.float()) & (constant | (step16.float() <= ideal * (1 + STEP_SLACK)))
    if zero16 is not None:
        holds &= torch.isfinite(zero16) & (~constant | (zero16.float() == lo))
    if bool(holds.all()):
        return step16, zero16
    # a slice that fp16 does not hold takes the fp32 step and zero-point, computed together
    step32, zero32 = _rounded(lo, hi, levels, symmetric, torch.float32)
    return settle(step16, step32, holds), None if zero16 is None else settle(zero16, zero32, holds)


def _rounded(
    lo: torch.Tensor, hi: torch.Tensor, levels: int, symmetric: bool, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Zero-point rounded down and step rounded up into ``dtype``; a constant slice takes step 1 (any step is exact)."""
    if symmetric:
        zero, span = None, torch.maximum(lo.abs(), hi.abs())
    else:
        zero = round_toward(lo, dtype, up=False)
        span = hi - zero.float()
    return round_toward(torch.where(span > 0, span / levels, torch.ones_like(span)), dtype, up=True), zero
