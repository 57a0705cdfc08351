"""`KiviCache`: KIVI-style 2-bit-capable KV cache (Liu et al., ICML 2024) as a transformers `Cache`.

KIVI's recipe, kept here:

- asymmetric min/max round-to-nearest, no calibration (kvstream's `UniformQuantizer`, codes
  densely bit-packed, fp16 scales and zero-points);
- keys per channel, one scale per channel and per group of ``G`` tokens, taken after RoPE (keys
  are stored exactly as the model hands them to the cache);
- values per token, one scale per token and per group of ``value_quant_groups`` channels;
- the most recent ``R`` tokens stay in full precision (the residual window).

A token is quantized once it has left the window, and only in whole groups of ``G`` tokens: after
every append, the oldest ``floor((residual - R) / G) * G`` residual tokens are packed into an
immutable block. The window therefore always holds the last ``R`` tokens (and fewer than ``R + G``),
appends of any length work (prefill chunks as well as single decoded tokens), and the packed
history is never re-quantized. Attention of an append reads the dequantized blocks plus the exact
window (which already includes the new tokens).

``G`` defaults to 32 and ``R`` to 128, the paper's settings; they are not kvstream's
``chunk_size``. Override them per cache (``KiviCache.from_model(model, config, group_size=...)``),
with the environment variables ``KVSTREAM_KIVI_GROUP_SIZE`` / ``KVSTREAM_KIVI_RESIDUAL``, or by
setting the class attributes ``KiviCache.group_size`` / ``KiviCache.residual_length``, in that order
of precedence.

Left padding (batch > 1) is recognised from ``register_padding`` (which kvstream's
``chunked_prefill`` calls) or, under ``generate``, from the position ids: pad tokens are left out of
the key ranges, so a padded row's scales do not depend on its pads.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch

from kvstream.cache.base import PackedCache, PackedLayer
from kvstream.cache.memory import MemoryLedger
from kvstream.config import CompressionConfig
from kvstream.quant import QuantizedTensor, UniformQuantizer

ENV_GROUP_SIZE = "KVSTREAM_KIVI_GROUP_SIZE"
ENV_RESIDUAL = "KVSTREAM_KIVI_RESIDUAL"


@dataclass
class KiviBlock:
    """``length`` packed tokens starting at token index ``start``: ``length / G`` key groups, per-token values."""

    start: int
    length: int
    keys: QuantizedTensor
    """Codes of [batch, heads, groups, G, head_dim], one scale per (group, channel)."""
    values: QuantizedTensor
    """Codes of [batch, heads, tokens, head_dim / group, group], one scale per (token, channel group)."""

    def nbytes(self) -> int:
        return self.keys.nbytes() + self.values.nbytes()


class KiviLayer(PackedLayer):
    """One decoder layer: packed blocks of quantized history; the residual window is ``keys``/``values``."""

    def __init__(self, owner: KiviCache, layer_idx: int) -> None:
        super().__init__(owner, layer_idx)
        self.blocks: list[KiviBlock] = []

    @property
    def packed_length(self) -> int:
        return self.blocks[-1].start + self.blocks[-1].length if self.blocks else 0

    @property
    def residual_tokens(self) -> int:
        return self.keys.shape[-2] if self.is_initialized else 0

    def pack_tail(self, n_new: int) -> None:
        """Pack the oldest whole groups of ``G`` tokens that have left the window of ``R``."""
        group, window = self.owner.group_size, self.owner.residual_length
        overflow = self.keys.shape[-2] - window
        flush = (overflow // group) * group if overflow > 0 else 0
        if flush:
            self._pack(*self.take_tail(flush))

    def clear_packed(self) -> None:
        self.blocks = []

    def select_packed_rows(self, index: torch.Tensor) -> None:
        self.blocks = [
            KiviBlock(block.start, block.length, block.keys.select_rows(0, index), block.values.select_rows(0, index))
            for block in self.blocks
        ]

    def _pack(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        owner = self.owner
        cfg = owner.config
        start = self.packed_length
        b, h, t, d = keys.shape
        g, vg = owner.group_size, cfg.value_quant_groups
        valid = owner.tables_on(keys.device)[1][:, start : start + t]
        key_mask = valid.view(b, 1, t // g, g, 1)
        quantizer = owner.quantizer
        qkeys = quantizer.quantize(keys.reshape(b, h, t // g, g, d), cfg.key_bits_normal, dim=3, mask=key_mask)
        qvalues = quantizer.quantize(values.reshape(b, h, t, d // vg, vg), cfg.value_bits_normal, dim=4)
        self.blocks.append(KiviBlock(start, t, qkeys, qvalues))

    def restore_history(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The dequantized history of every packed block, [batch, heads, packed tokens, head_dim]."""
        if not self.blocks:
            return None
        quantizer = self.owner.quantizer
        keys, values = [], []
        for block in self.blocks:
            k = quantizer.dequantize(block.keys)
            v = quantizer.dequantize(block.values)
            keys.append(k.reshape(k.shape[0], k.shape[1], block.length, k.shape[-1]))
            values.append(v.flatten(3))
        return torch.cat(keys, dim=-2).to(self.dtype), torch.cat(values, dim=-2).to(self.dtype)

    def packed_nbytes(self) -> int:
        return sum(block.nbytes() for block in self.blocks)

    def ledger_packed(self, ledger: MemoryLedger) -> None:
        for block in self.blocks:
            ledger.add_quantized(block.keys)
            ledger.add_quantized(block.values)


class KiviCache(PackedCache):
    """KIVI: per-channel keys in groups of G tokens, per-token values, a full-precision window of R tokens."""

    group_size: int = 32
    """Tokens per key quantization group (G); see the module docstring for the overrides."""
    residual_length: int = 128
    """Most recent tokens kept in full precision (R)."""

    def __init__(
        self,
        config: CompressionConfig,
        num_layers: int,
        group_size: int | None = None,
        residual_length: int | None = None,
    ) -> None:
        self.group_size = _setting("group_size", group_size, ENV_GROUP_SIZE, type(self).group_size, minimum=1)
        self.residual_length = _setting(
            "residual_length", residual_length, ENV_RESIDUAL, type(self).residual_length, minimum=0
        )
        for name in ("key_bits_normal", "value_bits_normal"):
            bits = getattr(config, name)
            if bits not in (1, 2, 3, 4, 5, 6, 7, 8, 16):
                raise ValueError(f"{name}: KiviCache cannot store {bits}-bit codes")
        self.quantizer = UniformQuantizer()
        super().__init__(config, [KiviLayer(self, i) for i in range(num_layers)])

    @classmethod
    def from_model(
        cls,
        model: Any,
        config: CompressionConfig | None = None,
        group_size: int | None = None,
        residual_length: int | None = None,
    ) -> KiviCache:
        """Build the cache for ``model``: bits from ``key_bits_normal`` / ``value_bits_normal``, value groups
        of ``value_quant_groups`` channels (other fields, such as sinks, outliers and ``key_rope``, do not apply)."""
        from kvstream.engine.model import model_geometry

        config = config or CompressionConfig()
        geometry = model_geometry(model)
        config.validate(head_dim=geometry.head_dim)
        return cls(config, geometry.num_layers, group_size=group_size, residual_length=residual_length)


def _setting(name: str, given: int | None, env: str, default: int, minimum: int) -> int:
    """An explicit value, else the environment variable, else the class attribute; checked against ``minimum``."""
    value: Any = given
    source = name
    if value is None and os.environ.get(env):
        value, source = os.environ[env], env
    if value is None:
        value = default
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{source}: expected an integer, got {value!r}") from None
    if number < minimum:
        raise ValueError(f"{source}: must be at least {minimum}, got {number}")
    return number
