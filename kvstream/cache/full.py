"""The full-precision baseline: transformers' `DynamicCache` with the same memory report."""

from __future__ import annotations

from typing import Any

import torch
from transformers import DynamicCache

from kvstream.cache.memory import MemoryLedger, MemoryReport
from kvstream.config import CompressionConfig


class FullPrecisionCache(DynamicCache):
    """Unquantized keys and values in the model's dtype: the paired baseline of every run."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.peak_stored_bytes = 0

    @classmethod
    def from_model(cls, model: Any, config: CompressionConfig | None = None) -> FullPrecisionCache:
        return cls(config=model.config)

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        out = super().update(key_states, value_states, layer_idx, *args, **kwargs)
        if layer_idx == len(self.layers) - 1:
            self.peak_stored_bytes = max(self.peak_stored_bytes, self._ledger()[0])
        return out

    def _ledger(self) -> tuple[int, int, MemoryLedger]:
        ledger = MemoryLedger()
        elements = 0
        for layer in self.layers:
            if layer.is_initialized and layer.keys is not None:
                ledger.add("full_precision_tail", layer.keys, layer.values)
                elements += layer.keys.numel() + layer.values.numel()
        return sum(ledger.by_kind.values()), elements, ledger

    def memory_report(self) -> MemoryReport:
        _, elements, ledger = self._ledger()
        return ledger.report(elements, self.peak_stored_bytes)
