"""A bit budget spent across layers from what the prefill's first chunk shows.

With ``bit_budget`` set, every layer's first packed block is also quantized at each candidate
normal width (`WIDTHS`, keys and values alike) to measure, on that block, the relative squared
reconstruction error of its keys (as stored: pre-RoPE, rotated where configured) and values and
the bits per element each width costs (codes, scales, outliers and sink copies, from the bytes of
the stores built). Once every layer has packed its first block, a greedy allocation starts every
layer at the narrowest width and repeatedly widens the layer whose error falls most per added bit,
while the mean over layers stays within the budget. The later blocks of a layer use its widths;
the first blocks keep the configured ones. Nothing is calibrated offline.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

WIDTHS = (2, 3, 4)


@dataclass
class LayerCosts:
    """Per candidate width: relative squared error (keys + values) and bits per element, for one layer."""

    error: dict[int, float] = field(default_factory=dict)
    bits: dict[int, float] = field(default_factory=dict)


def _relative_error(store: Any, quantizer: Any, original: torch.Tensor) -> float:
    restored = store.restore(quantizer).float().reshape(original.shape)
    return float(((restored - original) ** 2).sum() / (original**2).sum().clamp_min(1e-12))


class BitBudget:
    """Measures every layer's first block and then sets each layer's normal widths (see the module)."""

    def __init__(self, budget: float, num_layers: int) -> None:
        self.budget = budget
        self.costs: dict[int, LayerCosts] = {}
        self.num_layers = num_layers
        self.widths: dict[int, int] | None = None

    def measure(self, layer: Any, keys: torch.Tensor, values: torch.Tensor, counted: torch.Tensor) -> None:
        """Cost of each width on ``layer``'s first block; allocate once every layer is measured."""
        owner = layer.owner
        elements = 2 * values.numel()
        key_shape, value_shape = layer.store_layout(keys, values)
        costs = LayerCosts()
        for width in WIDTHS:
            key_store, value_store = layer.build_stores(keys, values, counted, (width, width))
            costs.error[width] = _relative_error(key_store, owner.quantizer, key_shape) + _relative_error(
                value_store, owner.value_quantizer, value_shape
            )
            costs.bits[width] = 8 * (key_store.nbytes() + value_store.nbytes()) / elements
        self.costs[layer.layer_idx] = costs
        if len(self.costs) == self.num_layers and self.widths is None:
            self.widths = self.allocate()
            for index, width in self.widths.items():
                owner.layers[index].normal_bits = (width, width)

    def allocate(self) -> dict[int, int]:
        """Greedy: widen the layer with the largest error drop per added bit while the mean bits fit the budget."""
        widths = {index: WIDTHS[0] for index in self.costs}

        def mean_bits() -> float:
            return sum(self.costs[i].bits[w] for i, w in widths.items()) / len(widths)

        while True:
            best, best_gain = None, 0.0
            for index, width in widths.items():
                if width == WIDTHS[-1]:
                    continue
                wider = WIDTHS[WIDTHS.index(width) + 1]
                costs = self.costs[index]
                added = costs.bits[wider] - costs.bits[width]
                gain = (costs.error[width] - costs.error[wider]) / max(added, 1e-9)
                trial = mean_bits() + added / len(widths)
                if trial <= self.budget and gain > best_gain:
                    best, best_gain = index, gain
            if best is None:
                return widths
            widths[best] = WIDTHS[WIDTHS.index(widths[best]) + 1]

    def summary(self) -> dict[str, Any]:
        """The chosen widths per layer and the measured bits they cost on the first blocks."""
        if self.widths is None:
            return {}
        return {
            "widths": dict(sorted(self.widths.items())),
            "block_bits": sum(self.costs[i].bits[w] for i, w in self.widths.items()) / len(self.widths),
        }
