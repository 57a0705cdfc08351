"""`QuantoCache`: transformers' `QuantizedCache` with the quanto backend, as a kvstream cache strategy.

A thin subclass: the quantization is transformers' own (optimum-quanto ``qint2`` / ``qint4``,
``MaxOptimizer`` scales and shifts per group of ``q_group_size`` elements along the last axis). It adds
`from_model`, so kvstream can build it by name, and a `memory_report` that counts the bytes the
quanto tensors really hold.

How transformers' cache behaves, which this wrapper does not change: the first append (the whole
prompt under ``generate``, the first chunk under chunked prefill) is quantized at once; later appends
wait in a full-precision residual until it would reach ``residual_length`` tokens, and then the
whole history is dequantized and re-quantized together with the residual. Keys are quantized after
RoPE, and one width serves keys and values.

quanto's KV-cache path supports only 2 and 4 bits, so `from_model` refuses any other
``key_bits_normal`` (and a ``value_bits_normal`` that differs from it). ``q_group_size`` is
``value_quant_groups`` (it must divide the head size); ``residual_length`` defaults to
transformers' 128, overridable with the ``KVSTREAM_QUANTO_RESIDUAL`` environment variable or the
``QuantoCache.residual_length`` class attribute. Sink and outlier settings do not apply.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from transformers.cache_utils import QuantizedCache

from kvstream.cache.memory import MemoryLedger, MemoryReport
from kvstream.config import CompressionConfig

QUANTO_BITS = (2, 4)
ENV_RESIDUAL = "KVSTREAM_QUANTO_RESIDUAL"


def _plain_tensors(t: Any, role: str) -> list[tuple[str, torch.Tensor]]:
    """The plain tensors inside a (possibly nested) quanto tensor subclass, each with its role.

    A quanto ``WeightQBitsTensor`` flattens into ``_data`` (a ``PackedTensor``, itself holding the
    ``uint8`` packed codes), ``_scale`` and ``_shift``; plain tensors are returned as they are.
    """
    if t is None:
        return []
    flatten = getattr(t, "__tensor_flatten__", None)
    if type(t) is torch.Tensor or flatten is None:
        return [(role, t)]
    names, _ = flatten()
    out = []
    for name in names:
        inner_role = {"_scale": "scales", "_shift": "zero_points"}.get(name, role)
        out.extend(_plain_tensors(getattr(t, name), inner_role))
    return out


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class QuantoCache(QuantizedCache):
    """transformers' quanto `QuantizedCache` (2 or 4 bits, re-quantized when the residual fills), by name."""

    residual_length: int = 128
    """Full-precision residual of transformers' cache, in tokens (its default)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.peak_stored_bytes = 0

    @classmethod
    def from_model(cls, model: Any, config: CompressionConfig | None = None) -> QuantoCache:
        """The quanto cache for ``model`` at ``key_bits_normal`` bits (2 or 4), groups of ``value_quant_groups``."""
        from kvstream.engine.model import model_geometry

        config = config or CompressionConfig()
        bits = config.key_bits_normal
        if bits not in QUANTO_BITS:
            raise ValueError(
                f"key_bits_normal: the quanto cache supports only 2 or 4 bits (quanto qint2 / qint4), got {bits}"
            )
        if config.value_bits_normal != bits:
            raise ValueError(
                f"value_bits_normal: the quanto cache uses one width for keys and values; got "
                f"value_bits_normal={config.value_bits_normal} with key_bits_normal={bits}"
            )
        config.validate(head_dim=model_geometry(model).head_dim)
        residual = os.environ.get(ENV_RESIDUAL) or cls.residual_length
        try:
            residual = int(residual)
        except ValueError:
            raise ValueError(f"{ENV_RESIDUAL}: expected an integer, got {residual!r}") from None
        if residual < 1:
            raise ValueError(f"{ENV_RESIDUAL}: must be at least 1, got {residual}")
        cache = cls(
            backend="quanto",
            config=model.config,
            nbits=bits,
            q_group_size=config.value_quant_groups,
            residual_length=residual,
        )
        cache.compression_config = config
        return cache

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        out = super().update(key_states, value_states, layer_idx, *args, **kwargs)
        self.peak_stored_bytes = max(self.peak_stored_bytes, self._ledger()[0])
        return out

    def _ledger(self) -> tuple[int, int, MemoryLedger]:
        """``(stored bytes, cached elements, ledger)`` over every layer's quanto tensors and residual."""
        ledger = MemoryLedger()
        elements = 0
        for layer in self.layers:
            if not layer.is_initialized:
                continue
            for q in (layer._quantized_keys, layer._quantized_values):
                for role, t in _plain_tensors(q, "codes"):
                    ledger.by_kind[role] += _nbytes(t)
                    ledger.by_device[str(t.device)] += _nbytes(t)
            ledger.add("full_precision_tail", layer.keys, layer.values)
            if layer._quantized_keys is not None and layer.cumulative_length:
                b, h, _, d = layer._quantized_keys.shape
                elements += 2 * b * h * d * layer.cumulative_length
        return sum(ledger.by_kind.values()), elements, ledger

    def memory_report(self) -> MemoryReport:
        """Bytes held (packed codes, scales, shifts, the full-precision residual), kvstream's report keys."""
        _, elements, ledger = self._ledger()
        return ledger.report(elements, self.peak_stored_bytes)
