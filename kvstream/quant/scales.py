"""How per-slice metadata (scales, zero-points, kept values) is stored: fp16 where fp16 holds it, else fp32;
scales of 2- to 4-bit slices optionally as 8-bit logarithmic codes.

fp16 keeps 11 significant bits only between its smallest normal number (6.1e-5) and 65504: a
quiet head's step below that range would be stored subnormal, with a few significant bits, and a
large zero-point would overflow. A tensor with any slice that fp16 cannot hold is stored in fp32
(its bytes counted as such), every other slice keeping the value fp16 gives it, so a slice's
stored value, and the codes computed against it, never depend on the other slices of its tensor
(the other rows of a batch among them).

With ``scale_bits: 8`` a 2- to 4-bit slice's step (or spread) is stored as one byte ``c`` standing for
``2 ** (c / LOG_SCALE_STEPS + LOG_SCALE_FLOOR)`` (`log_scale_table`): the ideal value rounded to the nearest
code in the log domain (within 2.9 %), codes then computed against the stored step. Rounding down may clip
the slice's extreme entry by at most ``levels * 2.9 %`` of a step, below half a step up to 4 bits (which is
why wider slices keep 16-bit scales). A slice whose scale lies below the table's first entry takes it (a step
of at most 2**-14, coarser than ideal but never clipping). A slice above the last entry, or with a zero-point
beyond fp16's range, keeps the values it has without ``scale_bits``, and its tensor is then stored in fp32,
so here too a slice's values never depend on the other slices of its tensor.
"""

from __future__ import annotations

import functools

import torch

FP16 = torch.finfo(torch.float16)

STEP_SLACK = 2.0**-8
"""How much wider than the ideal step (range / levels) a step rounded into fp16 may be."""


LOG_SCALE_STEPS = 12
"""Codes per octave of an 8-bit scale."""
LOG_SCALE_FLOOR = -14
"""log2 of the scale of code 0 (fp16's smallest normal number); code 255 stands for about 2**7.25."""
LOG_SCALE_MAX_BITS = 4
"""The widest slices that may take 8-bit scales (see the module)."""


@functools.cache
def _log_scale_table(device: torch.device) -> torch.Tensor:
    exponents = torch.arange(256, dtype=torch.float64) / LOG_SCALE_STEPS + LOG_SCALE_FLOOR
    return torch.exp2(exponents).float().to(device)


def log_scale_table(device: torch.device | str = "cpu") -> torch.Tensor:
    """The 256 values an 8-bit scale code stands for (fp32, on ``device``), as every reader decodes them."""
    return _log_scale_table(torch.device(device))


def _log_codes(ideal: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes (as fp32, from 0) of the scales nearest ``ideal`` (fp32, >= 0) in the log domain, and where they fit the
    table; a zero (a constant slice) takes the code of 1, a scale below the table its first entry."""
    safe = torch.where(ideal > 0, ideal, torch.ones_like(ideal))
    code = torch.round((torch.log2(safe) - LOG_SCALE_FLOOR) * LOG_SCALE_STEPS).clamp_min(0)
    return code, code <= 255


def _narrowed(code: torch.Tensor, fits: torch.Tensor, wide: torch.Tensor) -> torch.Tensor:
    """8-bit ``code`` when every slice ``fits``; else fp32: the code's value where it fits, ``wide``'s elsewhere."""
    if bool(fits.all()):
        return code.to(torch.uint8)
    return torch.where(fits, log_scale_table(code.device)[code.clamp_max(255).long()], wide.float())


def log_scales(ideal: torch.Tensor, wide: torch.Tensor) -> torch.Tensor:
    """Scales nearest ``ideal`` (fp32, >= 0) as 8-bit codes; when a slice lies above the table, fp32 holding the
    8-bit value where a slice fits and ``wide``'s (its 16-bit value) where it does not (see the module)."""
    return _narrowed(*_log_codes(ideal), wide)


def decode_scale(scale: torch.Tensor) -> torch.Tensor:
    """Stored scales as fp32 values: 8-bit codes through `log_scale_table`, fp16 or fp32 as they are."""
    if scale.dtype == torch.uint8:
        return log_scale_table(scale.device)[scale.long()]
    return scale.float()


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
    lo: torch.Tensor, hi: torch.Tensor, levels: int, symmetric: bool, scale_bits: int = 16
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Stored step and zero-point of slices spanning ``[lo, hi]`` with ``levels`` steps (fp32 in).

    The zero-point is rounded down and the step up, so every value of the range is restored
    within half a stored step (no code is clipped by the rounding). A slice keeps fp16 values
    when they leave its step within `STEP_SLACK` of the ideal one (a constant slice: when its
    zero-point is exact); the tensor is fp16 when every slice does (`settle`). Symmetric slices
    have no zero-point: the step covers ``max(|lo|, |hi|)``. With ``scale_bits`` 8 the step is an 8-bit code
    where the module's rule allows it.
    """
    if scale_bits == 8:
        return _log_step_and_zero(lo, hi, levels, symmetric)
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


def _log_step_and_zero(
    lo: torch.Tensor, hi: torch.Tensor, levels: int, symmetric: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """8-bit step codes and fp16 zero-points (rounded down); a slice that does not fit (a step above the table, a
    zero-point beyond fp16) takes the 16-bit values, and the tensor is then fp32."""
    if symmetric:
        zero, span = None, torch.maximum(lo.abs(), hi.abs())
    else:
        zero = round_toward(lo, torch.float16, up=False)
        span = hi - zero.float()
    code, fits = _log_codes(span / levels)
    if zero is not None:
        fits &= torch.isfinite(zero)
    if bool(fits.all()):
        return code.to(torch.uint8), zero
    step16, zero16 = step_and_zero(lo, hi, levels, symmetric)
    step = _narrowed(code, fits, step16)
    return step, None if zero is None else torch.where(fits, zero.float(), zero16.float())


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
