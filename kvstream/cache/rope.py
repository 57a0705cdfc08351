"""Inverting and re-applying a model's own rotary embedding at given positions, in fp32.

`model_rotaries` reads, for every decoder layer, the rotary module the model uses, the layer
type it is evaluated for (Gemma-3 keeps one table per layer type), how many leading channels it
rotates (partial rotary) and how channels pair up (halves, as Llama does, or adjacent pairs, as
Cohere does), and checks the whole round trip against the model's own ``apply_rotary_pos_emb`` on
a probe. A rotary that cannot be reproduced exactly is refused with one line.
"""

from __future__ import annotations

import inspect
import sys
from typing import Any

import torch

from kvstream.config import ConfigError
from kvstream.engine.placement import input_device

LAYOUTS = ("half", "interleaved")
"""How RoPE pairs channels: ``half`` rotates channel i with i + r/2, ``interleaved`` 2i with 2i + 1."""

SEQUENCE_DEPENDENT = ("dynamic", "longrope")
"""Rope types whose angles depend on the longest sequence seen so far: a key rotated by the model
at one step and re-rotated at a later one would not match, so pre-RoPE keys are refused."""


def _pairs(x: torch.Tensor, layout: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The two members of every rotated pair of channels, as views."""
    if layout == "half":
        h = x.shape[-1] // 2
        return x[..., :h], x[..., h:]
    return x[..., 0::2], x[..., 1::2]


class Rotary:
    """A model's rotary module at explicit ``position_ids`` ([batch, tokens]), applied as the model applies it.

    ``x * cos + rotate(x) * sin`` over the first ``rotary_dim`` channels (the rest pass through),
    ``rotate`` pairing channels by ``layout``. The inverse divides by ``cos**2 + sin**2``, so scaled
    variants (YaRN's attention factor) invert exactly. All arithmetic is fp32.
    """

    def __init__(self, rotary_emb: torch.nn.Module, layer_type: str | None = None, layout: str = "half") -> None:
        if layout not in LAYOUTS:
            raise ValueError(f"layout: {layout!r} is not one of {', '.join(LAYOUTS)}")
        self.rotary_emb = rotary_emb
        self.layer_type = layer_type
        self.layout = layout

    @property
    def key(self) -> tuple[int, str | None, str]:
        """Identifies the table: layers whose rotaries share a key share angles."""
        return id(self.rotary_emb), self.layer_type, self.layout

    @property
    def rope_type(self) -> str:
        kind = getattr(self.rotary_emb, "rope_type", "default")
        return str(kind.get(self.layer_type, "default") if isinstance(kind, dict) else kind)

    def table(self, device: torch.device, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``cos, sin`` ([batch, tokens, rotary_dim], fp32) at ``position_ids``, from the model's module."""
        like = torch.zeros(1, dtype=torch.float32, device=device)
        extra = (self.layer_type,) if self.layer_type is not None else ()
        cos, sin = self.rotary_emb(like, position_ids.to(device), *extra)
        return cos.float().to(device), sin.float().to(device)  # under a device map, the rotary runs elsewhere

    def cos_sin(self, like: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`table` with a heads axis, broadcasting over ``[batch, heads, tokens, head_dim]``."""
        cos, sin = self.table(like.device, position_ids)
        return cos.unsqueeze(1), sin.unsqueeze(1)

    def _rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, sign: float) -> torch.Tensor:
        r = cos.shape[-1]
        x = x.float()
        part = x[..., :r]
        rotated = part * cos
        first, second = _pairs(rotated, self.layout)
        x_first, x_second = _pairs(part, self.layout)
        s_first, s_second = _pairs(sin, self.layout)
        first.addcmul_(x_second, s_first, value=-sign)
        second.addcmul_(x_first, s_second, value=sign)
        if sign < 0:
            rotated /= cos * cos + sin * sin
        return rotated if r == x.shape[-1] else torch.cat([rotated, x[..., r:]], dim=-1)

    def apply(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """RoPE of ``x`` at the angles of ``cos``/``sin`` (from `cos_sin`), in fp32."""
        return self._rotate(x, cos, sin, 1.0)

    def invert(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """The inverse of `apply`: rotate back by the same angles and undo any scaling of cos/sin."""
        return self._rotate(x, cos, sin, -1.0)

    def matches(self, apply_fn: Any, head_dim: int, device: torch.device) -> bool:
        """True when `apply` reproduces the model's ``apply_fn`` and `invert` undoes it, on a random probe."""
        generator = torch.Generator().manual_seed(0)
        positions = torch.tensor([[0, 1, 5, 63, 1000, 4097]], device=device)
        cos, sin = self.table(device, positions)
        x = torch.randn(1, 2, positions.shape[1], head_dim, generator=generator).to(device)
        r = cos.shape[-1]
        try:
            _, want = apply_fn(x[..., :r], x[..., :r], cos, sin)
        except (RuntimeError, TypeError, ValueError):
            return False
        got = self.apply(x, cos.unsqueeze(1), sin.unsqueeze(1))
        back = self.invert(got, cos.unsqueeze(1), sin.unsqueeze(1))
        return (
            want.shape == got[..., :r].shape
            and torch.allclose(got[..., :r], want.float(), rtol=1e-5, atol=1e-5)
            and torch.allclose(back, x, rtol=1e-4, atol=1e-5)
        )

    @property
    def kernel_layout(self) -> bool:
        """True for the layout the fused kernels implement: halves over the whole head."""
        return self.layout == "half"


def rotary_modules(model: Any) -> list[tuple[str, torch.nn.Module]]:
    """Every rotary embedding module of ``model`` (by name), the model-level one first."""
    found = [(name, module) for name, module in model.named_modules() if name.endswith("rotary_emb")]
    return sorted(found, key=lambda item: item[0].count("."))


def model_rotaries(model: Any) -> list[Rotary]:
    """One `Rotary` per decoder layer, checked against the model's own code; `ConfigError` when that fails.

    The message names the model type and the ``key_rope: post`` fallback, which needs no rotary.
    """
    config = model.config.get_text_config(decoder=True)
    model_type = getattr(config, "model_type", type(model).__name__)
    fallback = "use key_rope: post (keys quantized after RoPE), which works with any model"

    def refuse(reason: str) -> ConfigError:
        return ConfigError(f"key_rope: pre: {model_type} {reason}; {fallback}")

    modules = rotary_modules(model)
    if not modules:
        raise refuse("has no rotary embedding module (is it a RoPE model?)")
    distinct = {id(module) for _, module in modules}
    if len(distinct) > 1:
        raise refuse(f"has {len(distinct)} rotary modules ({', '.join(n for n, _ in modules)}), not one per model")
    rotary_emb = modules[0][1]
    modeling = sys.modules.get(type(model).__module__)
    apply_fn = getattr(modeling, "apply_rotary_pos_emb", None)
    if apply_fn is None:
        raise refuse("defines no apply_rotary_pos_emb kvstream can check its rotary against")
    per_type = "layer_type" in inspect.signature(rotary_emb.forward).parameters
    layer_types = getattr(config, "layer_types", None) if per_type else None
    if per_type and not layer_types:
        raise refuse("evaluates its rotary per layer type but its config lists no layer_types")
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    device = input_device(model)  # not a parameter's: under a device map those may wait on disk
    built: dict[str | None, Rotary] = {}
    for layer_type in dict.fromkeys(layer_types or [None]):
        rope_type = Rotary(rotary_emb, layer_type).rope_type
        if rope_type in SEQUENCE_DEPENDENT:
            raise refuse(
                f"uses {rope_type!r} RoPE, whose angles change with the longest sequence seen, "
                "so keys rotated at one step cannot be re-rotated exactly at a later one"
            )
        for layout in LAYOUTS:
            rotary = Rotary(rotary_emb, layer_type, layout)
            if rotary.matches(apply_fn, head_dim, device):
                built[layer_type] = rotary
                break
        else:
            where = f" for layer type {layer_type!r}" if layer_type else ""
            raise refuse(f"rotates keys in a way kvstream cannot reproduce exactly{where}")
    num_layers = config.num_hidden_layers
    return [built[layer_types[i] if layer_types else None] for i in range(num_layers)]


class BlockRope:
    """RoPE of packed blocks as the fused kernels apply it, with no table as long as the history.

    Per block and batch row: cos and sin at the block's first position ``p0``; once per cache:
    cos and sin of the offsets ``0 .. block_len - 1`` divided by the rotary's attention scaling,
    for the first half of the channels only (channel ``c + D / 2`` turns with ``c``: a rotary whose
    halves turn at different rates fails `check`). The angle-addition rule then gives
    ``cos((p0 + t) θ)`` and ``sin((p0 + t) θ)`` inside the tile.
    A block whose real tokens do not sit at consecutive positions is marked inexact (the kernels
    leave such a layer to the reference path). `check` verifies the rule on the model's own rotary.
    """

    def __init__(self, rotary: Rotary, block_len: int, device: torch.device) -> None:
        self.rotary = rotary
        self.block_len = block_len
        cos, sin = rotary.table(device, torch.arange(block_len, device=device).unsqueeze(0))
        scale = cos[0, :1].float()  # cos(0) times the attention scaling
        cos, sin = (cos[0].float() / scale).t(), (sin[0].float() / scale).t()  # [D, T]
        self.dim = cos.shape[0]
        """Channels the rotary turns (the tables hold the first half of them)."""
        half = self.dim // 2
        self.halves_match = torch.equal(cos[:half], cos[half:]) and torch.equal(sin[:half], sin[half:])
        self.offsets = (cos[:half].contiguous(), sin[:half].contiguous())
        self.base_cos = self.base_sin = torch.zeros(0, device=device)
        self.exact = torch.zeros(0, dtype=torch.bool, device=device)
        self._groups: dict[tuple[int, int, int], tuple[list[torch.Tensor], bool]] = {}
        """Tables of block groups off the chunk grid (tail blocks), by (start, block length, blocks): the tables
        and whether the blocks' positions are consecutive. Layers may group the same blocks differently;
        entries no layer's groups use any more are dropped by `live_tensors`."""
        self._short_offsets: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        """The offset tables of blocks shorter than a chunk, one per length, shared by every group that long."""

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
        cos, sin = self.rotary.table(pos.device, p0)  # [B, N, D]
        self.base_cos = torch.cat([self.base_cos.reshape(-1, *cos.shape[::2]), cos.float().transpose(0, 1)])
        self.base_sin = torch.cat([self.base_sin.reshape(-1, *sin.shape[::2]), sin.float().transpose(0, 1)])
        self.exact = torch.cat([self.exact.reshape(-1, exact.shape[0]), exact.t()])

    def group_tables(
        self, start: int, block_len: int, n_blocks: int, positions: torch.Tensor, valid: torch.Tensor
    ) -> list[torch.Tensor]:
        """The kernels' RoPE tables of a group of ``n_blocks`` blocks of ``block_len`` tokens from ``start``:
        ``[offset cos, offset sin, base cos, base sin]``.

        Blocks on the chunk grid are slices of the tables `extend` keeps; others (blocks packed from the tail,
        shorter than a chunk) get their own, built once per group.
        """
        if self._on_grid(start, block_len):
            blocks = slice(start // block_len, start // block_len + n_blocks)
            return [*self.offsets, self.base_cos[blocks].contiguous(), self.base_sin[blocks].contiguous()]
        return self._off_grid(start, block_len, n_blocks, positions, valid)[0]

    def group_exact(
        self, start: int, block_len: int, n_blocks: int, positions: torch.Tensor, valid: torch.Tensor
    ) -> bool:
        """Whether the real tokens of every block of the group sit at consecutive positions (the rule's premise)."""
        if self._on_grid(start, block_len):
            return bool(self.exact[start // block_len : start // block_len + n_blocks].all())
        return self._off_grid(start, block_len, n_blocks, positions, valid)[1]

    def _on_grid(self, start: int, block_len: int) -> bool:
        return block_len == self.block_len and start % block_len == 0

    def _off_grid(
        self, start: int, t: int, n_blocks: int, positions: torch.Tensor, valid: torch.Tensor
    ) -> tuple[list[torch.Tensor], bool]:
        key = (start, t, n_blocks)
        if key not in self._groups:
            pos = positions[:, start : start + n_blocks * t].long().reshape(positions.shape[0], n_blocks, t)
            p0 = pos[..., -1] - (t - 1)
            seen = valid[:, start : start + n_blocks * t].reshape(pos.shape)
            exact = bool(((pos == p0.unsqueeze(-1) + torch.arange(t, device=pos.device)) | ~seen).all())
            cos, sin = self.rotary.table(pos.device, p0)  # [B, N, D]
            base = [cos.float().transpose(0, 1).contiguous(), sin.float().transpose(0, 1).contiguous()]
            self._groups[key] = ([*self.short_offsets(t), *base], exact)
        return self._groups[key]

    def check(self, position: int = 1000, rtol: float = 1e-4) -> bool:
        """True when both halves of the channels turn alike (at the offsets and at ``position``) and cos/sin at
        ``position + block_len - 1`` by angle addition match the rotary's own output."""
        t = self.block_len - 1
        device = self.offsets[0].device
        cos0, sin0 = self.rotary.table(device, torch.tensor([[position, position + t]], device=device))
        c0, s0, want_c, want_s = cos0[0, 0].float(), sin0[0, 0].float(), cos0[0, 1].float(), sin0[0, 1].float()
        half = self.dim // 2
        if not (self.halves_match and torch.equal(c0[:half], c0[half:]) and torch.equal(s0[:half], s0[half:])):
            return False
        ct, st = self.offsets[0][:, t].repeat(2), self.offsets[1][:, t].repeat(2)
        got_c, got_s = c0 * ct - s0 * st, s0 * ct + c0 * st
        tolerance = 10 * rtol * float(cos0[0, 0].abs().max())
        return max(float((got_c - want_c).abs().max()), float((got_s - want_s).abs().max())) <= tolerance

    def short_offsets(self, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The offset tables of blocks of ``t`` tokens (``t`` below a chunk), made on first use and kept."""
        if t not in self._short_offsets:
            self._short_offsets[t] = tuple(o[:, :t].contiguous() for o in self.offsets)
        return self._short_offsets[t]

    def live_tensors(self, live: set[tuple[int, int, int]]) -> tuple[torch.Tensor, ...]:
        """Every table held for the groups ``live`` ((start, block length, blocks) of the layers' groups now),
        after dropping the tables of groups no layer holds any more (absorbed into a longer one, or freed)."""
        self._groups = {key: entry for key, entry in self._groups.items() if key in live}
        kept = [t for tables, _ in self._groups.values() for t in tables[2:]]
        short = [t for pair in self._short_offsets.values() for t in pair]
        return (*self.offsets, self.base_cos, self.base_sin, self.exact, *short, *kept)
