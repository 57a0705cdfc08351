"""Inverting and re-applying a model's own rotary embedding at given positions."""

from __future__ import annotations

import torch


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


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
        return x * cos + rotate_half(x) * sin

    @staticmethod
    def invert(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        return (x * cos - rotate_half(x) * sin) / (cos * cos + sin * sin)
