"""Byte ledger of a cache: every tensor it holds, by kind, and the figures derived from it."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch

from kvstream.quant.base import QuantizedTensor, tensor_bytes

MemoryReport = dict[str, Any]
"""``stored_bytes``, ``fp16_bytes`` (of every token seen), ``bits_per_element`` (per element held),
``ratio_to_fp16``, ``peak_stored_bytes``, ``elements`` (held), ``breakdown`` (bytes per kind of tensor),
``by_device`` (bytes per device holding them) and, from `PackedCache.memory_report`, ``layer_types``
(the same per kind of attention layer)."""


class MemoryLedger:
    """Adds up the bytes of held tensors under a kind (codes, scales, zero_points, ...)."""

    def __init__(self) -> None:
        self.by_kind: dict[str, int] = defaultdict(int)
        self.by_device: dict[str, int] = defaultdict(int)
        """The same bytes by the device holding them: a model spread over devices spreads its cache too."""

    def add(self, kind: str, *tensors: torch.Tensor | None) -> None:
        self.by_kind[kind] += tensor_bytes(*tensors)
        for tensor in tensors:
            if tensor is not None:
                self.by_device[str(tensor.device)] += tensor_bytes(tensor)

    def add_quantized(self, q: QuantizedTensor, kind: str | None = None) -> None:
        if kind is not None:
            self.add(kind, q.codes, q.scale, q.zero, *q.extra.values())
            return
        self.add("full_precision_blocks" if q.bits == 16 else "codes", q.codes)
        self.add("scales", q.scale)
        self.add("zero_points", q.zero)
        self.add("codebooks", *q.extra.values())

    def report(self, elements: int, peak_stored_bytes: int, seen_elements: int | None = None) -> MemoryReport:
        """Figures for ``elements`` held; the fp16 comparison counts ``seen_elements`` (every token a layer has
        seen, which differs from those held where a sliding window freed some), by default the same."""
        stored = sum(self.by_kind.values())
        fp16 = 2 * (elements if seen_elements is None else seen_elements)
        return {
            "stored_bytes": stored,
            "fp16_bytes": fp16,
            "bits_per_element": 8 * stored / elements if elements else 0.0,
            "ratio_to_fp16": stored / fp16 if fp16 else 0.0,
            "peak_stored_bytes": max(peak_stored_bytes, stored),
            "elements": elements,
            "breakdown": {k: v for k, v in sorted(self.by_kind.items()) if v},
            "by_device": {k: v for k, v in sorted(self.by_device.items()) if v},
        }
