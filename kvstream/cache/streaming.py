"""`StreamingQuantizedCache`: a transformers `Cache` that packs keys and values chunk by chunk.

Every append (a prefill chunk or a decoded token) first lands in a full-precision tail; as soon
as the tail holds ``chunk_size`` tokens they are packed into an immutable block. Attention of the
current append sees the dequantized blocks plus the exact tail, so during prefill the cache holds
the packed history and less than one chunk in full precision.

Keys are quantized per channel over the block's tokens, by default before RoPE (un-rotated with
the model's own rotary module at the tokens' real positions, re-rotated on read). Values are
quantized per token in groups of ``value_quant_groups`` channels. Attention-sink tokens and the
outlier channels / groups named by the statistics manager are stored at the high bit widths.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from kvstream.cache.base import PackedCache, PackedLayer
from kvstream.cache.memory import MemoryLedger
from kvstream.cache.rope import Rotary
from kvstream.cache.store import SinkStore, SplitStore
from kvstream.config import CompressionConfig
from kvstream.quant.base import Quantizer
from kvstream.stats.base import StatsManager


@dataclass
class BlockGroup:
    """Consecutive packed blocks of ``block_len`` tokens with one storage layout, from token ``start``."""

    start: int
    block_len: int
    n_blocks: int
    keys: SplitStore
    values: SplitStore
    sinks: list[tuple[int, SinkStore]]
    """(block index inside the group, its sink copies)."""

    @property
    def length(self) -> int:
        return self.block_len * self.n_blocks

    def nbytes(self) -> int:
        return self.keys.nbytes() + self.values.nbytes() + sum(s.nbytes() for _, s in self.sinks)

    def absorb(self, other: BlockGroup) -> BlockGroup | None:
        """This group followed by ``other`` as one group when their layouts agree, else None."""
        if other.block_len != self.block_len:
            return None
        keys, values = self.keys.concat(other.keys), self.values.concat(other.values)
        if keys is None or values is None:
            return None
        sinks = self.sinks + [(self.n_blocks + i, store) for i, store in other.sinks]
        return BlockGroup(self.start, self.block_len, self.n_blocks + other.n_blocks, keys, values, sinks)


class StreamingLayer(PackedLayer):
    """One decoder layer's packed block groups; the full-precision tail is ``keys``/``values``."""

    def __init__(self, owner: StreamingQuantizedCache, layer_idx: int) -> None:
        super().__init__(owner, layer_idx)
        self.groups: list[BlockGroup] = []
        self.tail_frozen = False

    @property
    def packed_length(self) -> int:
        return self.groups[-1].start + self.groups[-1].length if self.groups else 0

    @property
    def n_blocks(self) -> int:
        return sum(g.n_blocks for g in self.groups)

    def pack_tail(self, n_new: int) -> None:
        """Pack every full chunk of the tail (decoded tokens stay if ``decode_storage`` says so)."""
        if n_new == 1 and self.owner.config.decode_storage == "full_precision":
            self.tail_frozen = True
        chunk = self.owner.config.chunk_size
        while not self.tail_frozen and self.keys.shape[-2] >= chunk:
            self._pack(*self.take_tail(chunk))

    def clear_packed(self) -> None:
        self.groups = []
        self.tail_frozen = False

    def _pack(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        owner, cfg = self.owner, self.owner.config
        start = self.packed_length
        end = start + keys.shape[-2]
        positions = owner.positions[:, start:end]
        valid = owner.valid[:, start:end]
        sinks = valid & (positions < cfg.attention_sink_size)
        counted = valid & ~sinks
        if cfg.key_rope == "pre":
            cos, sin = owner.rotary.cos_sin(keys, positions)
            keys = Rotary.invert(keys, cos, sin)
        owner.stats.update(self.layer_idx, keys, values, counted)

        b, h, t, d = values.shape
        group = cfg.value_quant_groups
        key_store = SplitStore.build(
            keys.transpose(-1, -2)[None, ..., None],
            owner.stats.key_outliers(self.layer_idx),
            cfg.key_bits_sink_outlier,
            cfg.key_bits_normal,
            reduce_dim=4,
            symmetric=cfg.key_symmetric,
            quantizer=owner.quantizer,
            mask=counted[None, :, None, None, :, None],
        )
        value_store = SplitStore.build(
            values.reshape(b, h, t, d // group, group).transpose(2, 3)[None],
            owner.stats.value_outliers(self.layer_idx),
            cfg.value_bits_sink_outlier,
            cfg.value_bits_normal,
            reduce_dim=5,
            symmetric=cfg.value_symmetric,
            quantizer=owner.quantizer,
            mask=None,
        )
        sink_store = None
        # sinks are kept out of the block's key ranges, so they need their own copy unless nothing is quantized
        if not all(bits == 16 for bits in (cfg.key_bits_normal, cfg.key_bits_sink_outlier, cfg.value_bits_normal)):
            sink_store = SinkStore.build(
                keys,
                values,
                sinks,
                cfg.key_bits_sink_outlier,
                cfg.value_bits_sink_outlier,
                cfg.key_symmetric,
                cfg.value_symmetric,
                owner.quantizer,
            )
        block = BlockGroup(start, t, 1, key_store, value_store, [(0, sink_store)] if sink_store else [])
        merged = self.groups[-1].absorb(block) if self.groups else None
        if merged is not None:
            self.groups[-1] = merged
        else:
            self.groups.append(block)

    def restore_history(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Dequantized (and, for pre-RoPE keys, re-rotated) history of every packed block."""
        if not self.groups:
            return None
        quantizer = self.owner.quantizer
        keys, values = [], []
        for group in self.groups:
            k = group.keys.restore(quantizer)  # [S, B, H, D, T, 1]
            v = group.values.restore(quantizer)  # [S, B, H, G, T, group size]
            s, b, h, d, t, _ = k.shape
            k = k.squeeze(-1).permute(1, 2, 0, 4, 3).reshape(b, h, s * t, d)
            v = v.permute(1, 2, 0, 4, 3, 5).reshape(b, h, s * t, d)
            for index, sinks in group.sinks:
                span = slice(index * t, (index + 1) * t)
                sinks.paste(k[:, :, span], v[:, :, span], quantizer)
            keys.append(k)
            values.append(v)
        k_all = (torch.cat(keys, dim=-2) if len(keys) > 1 else keys[0]).to(self.dtype)
        v_all = (torch.cat(values, dim=-2) if len(values) > 1 else values[0]).to(self.dtype)
        if self.owner.config.key_rope == "pre":
            cos, sin = self.owner._history_rope(k_all)
            k_all = Rotary.apply(k_all, cos, sin)
        return k_all, v_all

    def packed_nbytes(self) -> int:
        return sum(g.nbytes() for g in self.groups)

    def ledger_packed(self, ledger: MemoryLedger) -> None:
        for group in self.groups:
            for store in (group.keys, group.values):
                for q in (store.high, store.low):
                    if q is not None:
                        ledger.add_quantized(q)
                ledger.add("indices", store.position)
            for _, sinks in group.sinks:
                ledger.add_quantized(sinks.keys, "sinks")
                ledger.add_quantized(sinks.values, "sinks")
                ledger.add("sinks", sinks.slots)


class StreamingQuantizedCache(PackedCache):
    """Chunk-by-chunk quantized KV cache (see the module docstring); use `from_model` to build one."""

    def __init__(
        self,
        config: CompressionConfig,
        num_layers: int,
        rotary: Rotary | None,
        quantizer: Quantizer,
        stats: StatsManager,
    ) -> None:
        if config.key_rope == "pre" and rotary is None:
            raise ValueError("key_rope='pre' needs the model's rotary embedding; use key_rope='post'")
        self.rotary = rotary
        self.quantizer = quantizer
        self.stats = stats
        self._rope_table: tuple[int, torch.Tensor, torch.Tensor] | None = None
        super().__init__(config, [StreamingLayer(self, i) for i in range(num_layers)])

    @classmethod
    def from_model(cls, model: Any, config: CompressionConfig) -> StreamingQuantizedCache:
        """Build the cache for ``model`` with the quantizer and stats manager ``config`` names."""
        from kvstream import registry
        from kvstream.engine.model import model_geometry, rotary_module

        geometry = model_geometry(model)
        config.validate(head_dim=geometry.head_dim)
        rotary = rotary_module(model)
        quantizer = registry.get("quantizers", config.quantizer)()
        stats = registry.get("stats", config.stats)(config)
        return cls(config, geometry.num_layers, Rotary(rotary) if rotary is not None else None, quantizer, stats)

    def _history_rope(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin of the packed history, computed once per forward and shared by all layers."""
        n = like.shape[-2]
        if self._rope_table is None or self._rope_table[0] != n:
            positions = self.positions[:, :n].to(like.device)
            cos, sin = self.rotary.cos_sin(like, positions)
            self._rope_table = (n, cos, sin)
        return self._rope_table[1], self._rope_table[2]

    def layer_updated(self, layer_idx: int) -> None:
        if layer_idx == self.num_layers - 1:
            self._rope_table = None  # a per-forward work table, not part of the cache
        super().layer_updated(layer_idx)

    def reset(self) -> None:
        super().reset()
        self.stats.reset()

    def outlier_snapshot(self) -> dict[int, dict[str, float]]:
        return self.stats.snapshot()
