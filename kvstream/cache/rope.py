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


class BlockRope:
    """RoPE of packed blocks as the fused kernels apply it, with no table as long as the history.

    Per block and batch row: cos and sin at the block's first position ``p0``; once per cache:
    cos and sin of the offsets ``0 .. block_len - 1`` divided by the rotary's attention scaling.
    The angle-addition rule then gives ``cos((p0 + t) θ)`` and ``sin((p0 + t) θ)`` inside the tile.
    A block whose real tokens do not sit at consecutive positions is marked inexact (the kernels
    leave such a layer to the reference path). `check` verifies the rule on the model's own rotary.
    """

    def __init__(self, rotary: Rotary, block_len: int, device: torch.device) -> None:
        self.rotary = rotary
        self.block_len = block_len
        like = torch.zeros(1, dtype=torch.float32, device=device)
        cos, sin = rotary.rotary_emb(like, torch.arange(block_len, device=device).unsqueeze(0))
        scale = cos[0, :1].float()  # cos(0) times the attention scaling
        self.offsets = ((cos[0].float() / scale).t().contiguous(), (sin[0].float() / scale).t().contiguous())
        self.base_cos = self.base_sin = torch.zeros(0, device=device)
        self.exact = torch.zeros(0, dtype=torch.bool, device=device)
        self.all_exact = True

    @property
    def n_blocks(self) -> int:
        return self.exact.shape[0]

    def extend(self, positions: torch.Tensor, valid: torch.Tensor, n_blocks: int) -> None:
        """Cover blocks up to ``n_blocks`` (tokens ``0 .. n_blocks * block_len``) of ``positions``, ``valid`` [B, L]."""
        if n_blocks <= self.n_blocks:
            return
        t = self.block_len
        first, last = self.n_blocks * t, n_blocks * t
        pos = positions[:, first:last].long().reshape(positions.shape[0], -1, t)  # [B, N, T]
        p0 = pos[..., -1] - (t - 1)
        offsets = torch.arange(t, device=pos.device)
        exact = ((pos == p0.unsqueeze(-1) + offsets) | ~valid[:, first:last].reshape(pos.shape)).all(-1)
        like = torch.zeros(1, dtype=torch.float32, device=pos.device)
        cos, sin = self.rotary.rotary_emb(like, p0)  # [B, N, D]
        self.base_cos = torch.cat([self.base_cos.reshape(-1, *cos.shape[::2]), cos.float().transpose(0, 1)])
        self.base_sin = torch.cat([self.base_sin.reshape(-1, *sin.shape[::2]), sin.float().transpose(0, 1)])
        self.exact = torch.cat([self.exact.reshape(-1, exact.shape[0]), exact.t()])
        self.all_exact = self.all_exact and bool(exact.all())

    def check(self, position: int = 1000, rtol: float = 1e-4) -> bool:
        """True when cos/sin at ``position + block_len - 1`` by angle addition match the rotary's own output."""
        t = self.block_len - 1
        device = self.offsets[0].device
        like = torch.zeros(1, dtype=torch.float32, device=device)
        cos0, sin0 = self.rotary.rotary_emb(like, torch.tensor([[position, position + t]], device=device))
        c0, s0, want_c, want_s = cos0[0, 0].float(), sin0[0, 0].float(), cos0[0, 1].float(), sin0[0, 1].float()
        ct, st = self.offsets[0][:, t], self.offsets[1][:, t]
        got_c, got_s = c0 * ct - s0 * st, s0 * ct + c0 * st
        tolerance = 10 * rtol * float(cos0[0, 0].abs().max())
        return max(float((got_c - want_c).abs().max()), float((got_s - want_s).abs().max())) <= tolerance

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return (*self.offsets, self.base_cos, self.base_sin, self.exact)
