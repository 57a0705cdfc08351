"""A bit budget held by the whole cache, at every block and at the end of a generation.

With ``bit_budget`` set, every layer's first packed block is also quantized at each candidate
normal width (`WIDTHS`, keys and values alike) to measure, on that block, the relative squared
reconstruction error of its keys (as stored: pre-RoPE, rotated where configured) and values and
the bits per element each width costs (codes, scales, zero-points, outlier parts), at the block's
length and at the tail's block length (`tail_block`), whose key ranges cost more per token.

Once every layer is measured, each later block position is planned for all layers at once, from
what the cache holds at that moment (`plan`): every byte already held (blocks, sinks and their
copies, position and RoPE tables, rotations) plus the new blocks at the chosen widths, plus a
reserve for the most tokens that can still stand exact at 16 bits (or the model's width) when a
generation stops (one tail block less a token; with ``tail_values: packed`` their keys, their values priced
as a block at the widest width), must stay within ``bit_budget`` times the elements
held. A greedy choice starts every layer at the narrowest width and widens the layer whose error
falls most per added bit while that holds. Blocks are never re-quantized: a plan only sets the
widths of the blocks it is made for, so bytes spent early are paid back by later blocks.
Nothing is calibrated offline.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from kvstream.quant.base import tensor_bytes

WIDTHS = (2, 3, 4)
START_MARGIN = 1.05
"""Headroom on the first-block estimates: blocks' outlier parts (and so their bytes) vary from block to block,
and the last layer to pack a block position has no later layer to make good an estimate that erred low."""


@dataclass
class LayerCosts:
    """One layer's first-block measurements: relative squared error (keys + values) per width, and bits per
    element per width at each measured block length."""

    error: dict[int, float] = field(default_factory=dict)
    bits: dict[int, dict[int, float]] = field(default_factory=dict)
    """Block length -> width -> bits per element of a block that long."""

    def bits_at(self, length: int, width: int) -> float:
        """Bits per element of a block of ``length`` tokens: the measured length nearest below it (shorter blocks
        cost more per token, so the nearest shorter one errs on the side of the budget), else the shortest."""
        lengths = sorted(self.bits)
        below = [n for n in lengths if n <= length]
        return self.bits[below[-1] if below else lengths[0]][width]


@dataclass
class Plan:
    """The widths chosen for the blocks starting at one token index, and the figures they were chosen from."""

    widths: dict[int, int]
    allowance_bits: float
    spent_bits: float


def _relative_error(store: Any, quantizer: Any, original: torch.Tensor) -> float:
    restored = store.restore(quantizer).float().reshape(original.shape)
    return float(((restored - original) ** 2).sum() / (original**2).sum().clamp_min(1e-12))


class BitBudget:
    """Measures every layer's first block, then plans each later block's widths (see the module)."""

    def __init__(self, budget: float, num_layers: int) -> None:
        self.budget = budget
        self.costs: dict[int, LayerCosts] = {}
        self.num_layers = num_layers
        self.plans: dict[tuple[int, int], Plan] = {}
        """The latest plan per block position (first token, block length), made for the last layer to pack it."""
        self.chosen: dict[int, int] = {}
        """Each layer's width for its latest planned block."""
        self.history: dict[int, list[int]] = {}
        """Each layer's widths of its planned blocks, in order."""
        self.margin = START_MARGIN
        """What plans price a block at, relative to its first-block estimate: `START_MARGIN`, raised to the
        largest ratio yet of a planned block's real bytes to its estimate, so an estimate that erred low is not
        repeated."""

    @property
    def ready(self) -> bool:
        return len(self.costs) == self.num_layers

    def measure(self, layer: Any, keys: torch.Tensor, values: torch.Tensor, counted: torch.Tensor) -> None:
        """Cost of each width on ``layer``'s first block, at its length and at the tail block's."""
        costs = LayerCosts()
        lengths = {keys.shape[-2]}
        tail = layer.owner.config.tail_block
        if tail and tail < keys.shape[-2]:
            lengths.add(tail)
        for length in sorted(lengths, reverse=True):
            part = (t[..., :length, :] for t in (keys, values))
            # the error of the whole block decides the order of the widths; shorter lengths are only priced
            error, costs.bits[length] = self._costs_at(layer, *part, counted[:, :length], errors=not costs.error)
            costs.error = costs.error or error
        self.costs[layer.layer_idx] = costs

    @staticmethod
    def _costs_at(
        layer: Any, keys: torch.Tensor, values: torch.Tensor, counted: torch.Tensor, errors: bool
    ) -> tuple[dict[int, float], dict[int, float]]:
        """Per width: the relative squared error (when ``errors``; else none) and the bits per element."""
        owner = layer.owner
        elements = 2 * values.numel()
        key_shape, value_shape = layer.key_layout(keys), layer.value_layout(values)
        error, bits = {}, {}
        for width in WIDTHS:
            key_store, value_store = layer.build_stores(keys, values, counted, (width, width))
            if errors:
                error[width] = _relative_error(key_store, owner.quantizer, key_shape) + _relative_error(
                    value_store, owner.value_quantizer, value_shape
                )
            bits[width] = 8 * (key_store.nbytes() + value_store.nbytes()) / elements
        return error, bits

    def width_for(self, owner: Any, layer_idx: int, start: int, length: int) -> int:
        """Layer ``layer_idx``'s normal width for its block of ``length`` tokens from ``start``: planned afresh
        for it and the layers that have not packed that block yet, from the bytes held now (the layers that
        have packed it count with what their block really cost), so an estimate that erred is made good by
        the next layer."""
        pending = [i for i, layer in enumerate(owner.layers) if i in self.costs and layer.packed_length <= start]
        plan = self.plan(owner, length, pending)
        self.plans[(start, length)] = plan
        width = plan.widths[layer_idx]
        self.chosen[layer_idx] = width
        self.history.setdefault(layer_idx, []).append(width)
        return width

    def plan(self, owner: Any, length: int, pending: list[int]) -> Plan:
        """Widths for the next block of ``length`` tokens of the layers ``pending``, so that what the cache then
        holds, with the exact remainder's reserve, stays within the budget (see the module)."""
        held_bits = 8 * (
            sum(layer.packed_nbytes() for layer in owner.layers)
            + sum(tensor_bytes(*tensors) for tensors in owner.shared_tensors().values())
        )
        per_token = {i: 2 * _heads_times_dim(layer) for i, layer in enumerate(owner.layers) if layer.is_initialized}
        held_elements = sum(per_token[i] * (layer.packed_length - layer.offset) for i, layer in enumerate(owner.layers))
        new_elements = {i: per_token[i] * length for i in pending}
        cfg = owner.config
        exact_bits = 16 if cfg.exact_storage == "16bit" else 8 * owner.layers[0].dtype.itemsize
        remainder = cfg.recent_window + (cfg.tail_block or cfg.chunk_size) - 1
        reserve = remainder * sum(per_token.values()) * (exact_bits - self.budget)
        if cfg.tail_values == "packed":  # values of the remainder are packed: priced as a block at the widest width
            reserve = remainder * sum(
                per_token[i]
                / 2
                * (exact_bits + max(self.budget, self.costs[i].bits_at(1, WIDTHS[-1])) - 2 * self.budget)
                for i in per_token
                if i in self.costs
            )
        b, _, _, d = owner.layers[pending[0]].keys.shape if pending else (0, 0, 0, 0)
        rope_rows = 8 * 2 * 4 * b * d if cfg.key_rope == "pre" else 0  # the block's base cos and sin, fp32
        allowance = self.budget * (held_elements + sum(new_elements.values())) - held_bits - reserve - rope_rows

        widths = {i: WIDTHS[0] for i in new_elements}
        cost = {  # layer -> width -> bits its new block costs
            i: {w: self.margin * self.costs[i].bits_at(length, w) * n for w in WIDTHS} for i, n in new_elements.items()
        }
        spent = sum(cost[i][w] for i, w in widths.items())
        while True:
            best, best_gain, best_added = None, 0.0, 0.0
            for i, width in widths.items():
                if width == WIDTHS[-1]:
                    continue
                wider = WIDTHS[WIDTHS.index(width) + 1]
                added = cost[i][wider] - cost[i][width]
                gain = (self.costs[i].error[width] - self.costs[i].error[wider]) / max(added, 1e-9)
                if spent + added <= allowance and gain > best_gain:
                    best, best_gain, best_added = i, gain, added
            if best is None:
                return Plan(widths, allowance, spent)
            widths[best] = WIDTHS[WIDTHS.index(widths[best]) + 1]
            spent += best_added

    def record(self, layer_idx: int, length: int, width: int, stores_bytes: int, elements: int) -> None:
        """A planned block of ``length`` tokens (``elements``) was packed at ``width`` into ``stores_bytes``:
        widen the margin if its estimate was low."""
        estimate = self.costs[layer_idx].bits_at(length, width) * elements / 8
        self.margin = max(self.margin, stores_bytes / estimate)

    def forget_from(self, start: int) -> None:
        """Drop the plans of blocks from ``start`` on (their tokens were taken back and will be packed again)."""
        self.plans = {key: plan for key, plan in self.plans.items() if key[0] < start}
        self.history = {}  # which recorded widths belonged to the blocks taken back is not kept: start again

    def summary(self) -> dict[str, Any]:
        """Each layer's width for its latest planned block and mean width over its planned blocks, the number of
        block positions planned, and of those whose last plan could not fit even at the narrowest widths (the
        budget is then missed there: the fixed costs outweigh it at that length); empty before the first plan."""
        if not self.plans:
            return {}
        plans = list(self.plans.values())
        return {
            "widths": dict(sorted(self.chosen.items())),
            "mean_widths": {i: sum(w) / len(w) for i, w in sorted(self.history.items())},
            "plans": len(plans),
            "plans_over_budget": sum(p.spent_bits > p.allowance_bits for p in plans),
        }


def _heads_times_dim(layer: Any) -> int:
    """Batch rows x KV heads x head size of ``layer``: its elements per token, keys or values alone."""
    b, h, _, d = layer.keys.shape
    return b * h * d
