"""Inverting and re-applying a model's own rotary embedding at given positions."""

from __future__ import annotations

import torch


class Rotary:
    """The model's rotary module evaluated at explicit ``position_ids`` (``[batch, tokens]``).

    Works for any RoPE whose module maps positions to ``(cos, sin)`` and is applied as
    ``x * cos + rotate_half(x) * sin``: the inverse divides by ``cos**2 + sin**2`` so scaled
    variants (YaRN's attention factor) invert exactly too.
    """

    def __init__(self, rotary_emb: torch.nn.Module) -> None:
        self.rotary_emb = rotary_emb

    def cos_sin(self, like: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cos, sin = self.rotary_emb(like, position_ids)
        return cos.unsqueeze(1), sin.unsqueeze(1)

    @staticmethod
    def apply(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """``x * cos + rotate_half(x) * sin``, written as in-place half updates (no concatenation)."""
        h = x.shape[-1] // 2
        out = x * cos
        out[..., :h].addcmul_(x[..., h:], sin[..., :h], value=-1)
        out[..., h:].addcmul_(x[..., :h], sin[..., h:])
        return out

    @staticmethod
    def invert(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """The inverse of `apply`: rotate back by the same angle and undo any scaling of cos/sin."""
        h = x.shape[-1] // 2
        out = x * cos
        out[..., :h].addcmul_(x[..., h:], sin[..., :h])
        out[..., h:].addcmul_(x[..., :h], sin[..., h:], value=-1)
        return out / (cos * cos + sin * sin)
