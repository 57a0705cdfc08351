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
from transformers import Cache
from transformers.cache_utils import CacheLayerMixin

from kvstream.cache.memory import MemoryLedger, MemoryReport
from kvstream.config import CompressionConfig
from kvstream.quant import QuantizedTensor, UniformQuantizer, tensor_bytes

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


class KiviLayer(CacheLayerMixin):
    """One decoder layer: packed blocks of quantized history and the full-precision residual window.

    ``self.keys`` / ``self.values`` are the residual window (the exact, most recent tokens).
    """

    is_compileable = False
    is_croppable = False
    is_sliding = False

    def __init__(self, owner: KiviCache, layer_idx: int) -> None:
        super().__init__()
        self.owner = owner
        self.layer_idx = layer_idx
        self.blocks: list[KiviBlock] = []
        self.length = 0

    # -- transformers layer API ------------------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self.dtype = key_states.dtype
        self.keys = key_states.new_zeros((*key_states.shape[:2], 0, key_states.shape[-1]))
        self.values = value_states.new_zeros((*value_states.shape[:2], 0, value_states.shape[-1]))
        self.is_initialized = True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        call_kwargs = kwargs.get("kwargs") or kwargs
        n_new = key_states.shape[-2]
        self.owner._track_tokens(key_states.shape[0], self.length, n_new, call_kwargs.get("position_ids"))

        hist_keys, hist_values = self._restore()
        self.keys = torch.cat([self.keys, key_states], dim=-2)
        self.values = torch.cat([self.values, value_states], dim=-2)
        out_keys = self.keys if hist_keys is None else torch.cat([hist_keys, self.keys], dim=-2)
        out_values = self.values if hist_values is None else torch.cat([hist_values, self.values], dim=-2)
        self.length += n_new

        group, window = self.owner.group_size, self.owner.residual_length
        overflow = self.keys.shape[-2] - window
        flush = (overflow // group) * group if overflow > 0 else 0
        if flush:
            self._pack(self.keys[..., :flush, :], self.values[..., :flush, :])
            self.keys = self.keys[..., flush:, :].clone()
            self.values = self.values[..., flush:, :].clone()
        self.owner._layer_updated(self.layer_idx)
        return out_keys, out_values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.blocks = []
        self.length = 0
        self.keys = self.values = None
        self.is_initialized = False

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise NotImplementedError("KiviCache does not support beam search (num_beams > 1)")

    # -- packing and reading ---------------------------------------------------------------------
    @property
    def packed_length(self) -> int:
        return self.blocks[-1].start + self.blocks[-1].length if self.blocks else 0

    @property
    def residual_tokens(self) -> int:
        return self.keys.shape[-2] if self.is_initialized else 0

    def _pack(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        owner = self.owner
        cfg = owner.config
        start = self.packed_length
        b, h, t, d = keys.shape
        g, vg = owner.group_size, cfg.value_quant_groups
        valid = owner.valid[:, start : start + t].to(keys.device)
        key_mask = valid.view(b, 1, t // g, g, 1)
        quantizer = owner.quantizer
        qkeys = quantizer.quantize(keys.reshape(b, h, t // g, g, d), cfg.key_bits_normal, dim=3, mask=key_mask)
        qvalues = quantizer.quantize(values.reshape(b, h, t, d // vg, vg), cfg.value_bits_normal, dim=4)
        self.blocks.append(KiviBlock(start, t, qkeys, qvalues))

    def _restore(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The dequantized history of every packed block, [batch, heads, packed tokens, head_dim]."""
        if not self.blocks:
            return None, None
        quantizer = self.owner.quantizer
        keys, values = [], []
        for block in self.blocks:
            k = quantizer.dequantize(block.keys)
            v = quantizer.dequantize(block.values)
            keys.append(k.reshape(k.shape[0], k.shape[1], block.length, k.shape[-1]))
            values.append(v.flatten(3))
        return torch.cat(keys, dim=-2).to(self.dtype), torch.cat(values, dim=-2).to(self.dtype)

    # -- accounting ------------------------------------------------------------------------------
    def nbytes(self) -> int:
        residual = tensor_bytes(self.keys, self.values) if self.is_initialized else 0
        return sum(block.nbytes() for block in self.blocks) + residual

    def ledger(self, ledger: MemoryLedger) -> None:
        for block in self.blocks:
            ledger.add_quantized(block.keys)
            ledger.add_quantized(block.values)
        if self.is_initialized:
            ledger.add("full_precision_tail", self.keys, self.values)


class KiviCache(Cache):
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
        self.config = config
        self.num_layers = num_layers
        self.group_size = _setting("group_size", group_size, ENV_GROUP_SIZE, type(self).group_size, minimum=1)
        self.residual_length = _setting(
            "residual_length", residual_length, ENV_RESIDUAL, type(self).residual_length, minimum=0
        )
        for name in ("key_bits_normal", "value_bits_normal"):
            bits = getattr(config, name)
            if bits not in (1, 2, 3, 4, 5, 6, 7, 8, 16):
                raise ValueError(f"{name}: KiviCache cannot store {bits}-bit codes")
        self.quantizer = UniformQuantizer()
        super().__init__(layers=[KiviLayer(self, i) for i in range(num_layers)])
        self._reset_tracking()

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

    # -- per-token bookkeeping ---------------------------------------------------------------------
    def _reset_tracking(self) -> None:
        self.valid = torch.zeros(0, 0, dtype=torch.bool)
        self._padding: torch.Tensor | None = None
        self._current_bytes = [0] * self.num_layers
        self.peak_stored_bytes = 0

    def register_padding(self, attention_mask: torch.Tensor) -> None:
        """Which of the coming tokens are padding (``attention_mask == 0``): kept out of the key ranges."""
        self._padding = attention_mask.bool().cpu()

    def _track_tokens(self, batch: int, start: int, n_new: int, position_ids: torch.Tensor | None) -> None:
        """Record which new tokens are real (not padding), once per forward."""
        if self.valid.shape[1] >= start + n_new:
            return
        if start == 0:
            self.valid = torch.zeros(batch, 0, dtype=torch.bool)
        if self._padding is not None and start < self._padding.shape[1]:
            valid = self._padding[:, start : start + n_new]
            valid = torch.cat([valid, valid.new_ones(batch, n_new - valid.shape[1])], dim=1)
        elif start == 0 and position_ids is not None:
            # generate gives left pads position 0, like the first real token: a 0 followed by a 0 is a pad
            zero = position_ids.cpu().expand(batch, n_new) == 0
            valid = ~(zero & torch.cat([zero[:, 1:], zero.new_zeros(batch, 1)], dim=1))
        else:
            valid = torch.ones(batch, n_new, dtype=torch.bool)
        self.valid = torch.cat([self.valid, valid.expand(batch, n_new)], dim=1)

    def _layer_updated(self, layer_idx: int) -> None:
        self._current_bytes[layer_idx] = self.layers[layer_idx].nbytes()
        self.peak_stored_bytes = max(self.peak_stored_bytes, self.stored_bytes())

    def stored_bytes(self) -> int:
        """Bytes held right now: packed blocks, residual windows and the padding mask."""
        return sum(self._current_bytes) + tensor_bytes(self.valid)

    # -- public ------------------------------------------------------------------------------------
    def reset(self) -> None:
        super().reset()
        self._reset_tracking()

    def memory_report(self) -> MemoryReport:
        """Bytes of every tensor held (codes, fp16 scales and zero-points, the window), in kvstream's report."""
        ledger = MemoryLedger()
        for layer in self.layers:
            layer.ledger(ledger)
        ledger.add("positions", self.valid)
        return ledger.report(self._element_count(), self.peak_stored_bytes)

    def _element_count(self) -> int:
        total = 0
        for layer in self.layers:
            if layer.is_initialized:
                b, h, _, d = layer.keys.shape
                total += 2 * b * h * d * layer.length
        return total


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
