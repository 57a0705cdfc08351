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

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from kvstream.cache.base import PackedCache, PackedLayer
from kvstream.cache.memory import MemoryLedger
from kvstream.cache.rope import BlockRope, Rotary
from kvstream.cache.store import SinkStore, SplitStore
from kvstream.config import CompressionConfig
from kvstream.quant.base import Quantizer, tensor_bytes
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


def paste_tokens(
    keys: torch.Tensor,
    values: torch.Tensor,
    start: int,
    index: torch.Tensor,
    src_k: torch.Tensor,
    src_v: torch.Tensor,
) -> None:
    """Write tokens ``index`` ([B, n], -1 = none) of ``src_k``, ``src_v`` ([B, H, n, D]) into a tile from ``start``."""
    inside = (index >= start) & (index < start + keys.shape[2])
    rows, order = inside.nonzero(as_tuple=True)
    if rows.numel():
        slots = index[rows, order] - start
        keys[rows, :, slots] = src_k[rows, :, order]
        values[rows, :, slots] = src_v[rows, :, order]


class StreamingLayer(PackedLayer):
    """One decoder layer's packed block groups; the full-precision tail is ``keys``/``values``."""

    def __init__(self, owner: StreamingQuantizedCache, layer_idx: int) -> None:
        super().__init__(owner, layer_idx)
        self.groups: list[BlockGroup] = []
        self.tail_frozen = False
        self._sink_read: tuple[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None] | None = None

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
        self._sink_read = None

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

    def restore_blocks(self, group: BlockGroup, first: int, last: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Blocks ``first:last`` of ``group`` dequantized in fp32, sinks pasted, keys as stored (pre-RoPE or not).

        ``[batch, heads, tokens, head_dim]`` each; only these blocks are materialised.
        """
        quantizer = self.owner.quantizer
        k = group.keys.blocks(first, last).restore(quantizer).float()  # [S, B, H, D, T, 1]
        v = group.values.blocks(first, last).restore(quantizer).float()  # [S, B, H, G, T, group size]
        s, b, h, d, t, _ = k.shape
        k = k.squeeze(-1).permute(1, 2, 0, 4, 3).reshape(b, h, s * t, d)
        v = v.permute(1, 2, 0, 4, 3, 5).reshape(b, h, s * t, d)
        for index, sinks in group.sinks:
            if first <= index < last:
                span = slice((index - first) * t, (index - first + 1) * t)
                sinks.paste(k[:, :, span], v[:, :, span], quantizer)
        return k, v

    def history_tiles(self, max_tokens: int, fused: bool = False) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        """``(first token, keys as attention sees them, values)`` in fp32, whole blocks of at most ``max_tokens``.

        ``fused``: restore with the CPU kernel (one pass, no intermediates) when it can read this layer.
        """
        fused = fused and self.keys.device.type == "cpu" and self.kernel_ready()
        if fused:
            from kvstream.kernels import cpu

            sinks = self.sink_tokens()
        for group in self.groups:
            per_tile = max(1, max_tokens // group.block_len)
            for first in range(0, group.n_blocks, per_tile):
                last = min(first + per_tile, group.n_blocks)
                start = group.start + first * group.block_len
                if fused:
                    k, v = cpu.restore_blocks(self, group, first, last)
                    if sinks is not None:
                        paste_tokens(k, v, start, *sinks)
                    yield start, k, v
                else:
                    k, v = self.restore_blocks(group, first, last)
                    yield start, self.owner.rotate_keys(k, start), v

    def kernel_ready(self) -> bool:
        """True when a fused kernel can read every packed block of this layer (plain uniform codes)."""
        from kvstream.kernels.cpu import store_supported

        return (
            bool(self.groups)
            and self.owner.kernel_compatible(self.packed_length)
            and all(g.block_len == self.owner.config.chunk_size for g in self.groups)
            and all(store_supported(g.keys) and store_supported(g.values) for g in self.groups)
        )

    def sink_tokens(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """Every sink copy of the layer: token index ([B, n], -1 where a row has fewer), keys as attention
        sees them and values ([B, H, n, D] fp32), or None when the layer holds none.

        Built once per set of sink copies and kept (a few tokens per row; counted as ``sinks``), so a
        decode step does not dequantize and rotate them again.
        """
        n_sink_sets = sum(len(g.sinks) for g in self.groups)
        if self._sink_read is None or self._sink_read[0] != n_sink_sets:
            self._sink_read = (n_sink_sets, self._read_sinks())
        return self._sink_read[1]

    def _read_sinks(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        quantizer = self.owner.quantizer
        index, keys, values = [], [], []
        for group in self.groups:
            for block, sinks in group.sinks:
                slots = sinks.slots.long()
                index.append(torch.where(slots >= 0, slots + group.start + block * group.block_len, -1))
                keys.append(quantizer.dequantize(sinks.keys).float())
                values.append(quantizer.dequantize(sinks.values).float())
        if not index:
            return None
        index_all = torch.cat(index, dim=1)
        keys_all = torch.cat(keys, dim=2)
        if self.owner.config.key_rope == "pre":
            positions = self.owner.positions.gather(1, index_all.clamp_min(0))
            cos, sin = self.owner.rotary.cos_sin(keys_all, positions)
            keys_all = Rotary.apply(keys_all, cos.float(), sin.float())
        return index_all, keys_all.contiguous(), torch.cat(values, dim=2).contiguous()

    def restore_history(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The whole history restored at once, in the model dtype (the ``attention: restore`` path)."""
        if not self.groups:
            return None
        tiles = list(self.history_tiles(self.packed_length))
        keys = torch.cat([k for _, k, _ in tiles], dim=-2) if len(tiles) > 1 else tiles[0][1]
        values = torch.cat([v for _, _, v in tiles], dim=-2) if len(tiles) > 1 else tiles[0][2]
        return keys.to(self.dtype), values.to(self.dtype)

    def packed_nbytes(self) -> int:
        return sum(g.nbytes() for g in self.groups) + tensor_bytes(*self._sink_copies())

    def _sink_copies(self) -> tuple[torch.Tensor, ...]:
        """The kept fp32 read of the sinks (see `sink_tokens`), if built."""
        if self._sink_read is None or self._sink_read[1] is None:
            return ()
        return self._sink_read[1]

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
        ledger.add("sinks", *self._sink_copies())


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
        self._block_rope: BlockRope | bool | None = None
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
        cache = cls(config, geometry.num_layers, Rotary(rotary) if rotary is not None else None, quantizer, stats)
        if config.attention == "packed":
            cache.attach(model)
        return cache

    def rotate_keys(self, keys: torch.Tensor, start: int) -> torch.Tensor:
        """Stored keys of tokens ``start:`` as attention sees them: RoPE re-applied in fp32 when stored pre-RoPE."""
        if self.config.key_rope != "pre":
            return keys
        positions = self.positions[:, start : start + keys.shape[-2]].to(keys.device)
        cos, sin = self.rotary.cos_sin(keys.float(), positions)
        return Rotary.apply(keys.float(), cos.float(), sin.float())

    def kernel_compatible(self, packed: int) -> bool:
        """True when the fused kernels can read this cache: a plain uniform quantizer and, for pre-RoPE
        keys, a rotary that the block-wise angle-addition rule reproduces (checked on a probe)."""
        from kvstream.quant.uniform import UniformQuantizer

        if type(self.quantizer) is not UniformQuantizer:
            return False
        if self.config.key_rope != "pre":
            return True
        rope = self.block_rope(packed)
        return rope is not None and rope.all_exact

    def block_rope(self, packed: int) -> BlockRope | None:
        """The blocks' RoPE for the kernels (`BlockRope`), covering the first ``packed`` tokens; None if
        the model's rotary is not position-only (dynamic NTK, say)."""
        if self._block_rope is None:
            device = self.positions.device
            rope = BlockRope(self.rotary, self.config.chunk_size, device)
            dynamic = "dynamic" in str(getattr(self.rotary.rotary_emb, "rope_type", "default"))
            self._block_rope = rope if not dynamic and rope.check() else False
        if self._block_rope is False:
            return None
        self._block_rope.extend(self.positions, self.valid, packed // self.config.chunk_size)
        return self._block_rope

    def shared_tensors(self) -> dict[str, tuple[torch.Tensor | None, ...]]:
        rope = self._block_rope.tensors() if self._block_rope else ()
        return {**super().shared_tensors(), "block_rope": rope}

    def reset(self) -> None:
        super().reset()
        self._block_rope = None
        self.stats.reset()

    def outlier_snapshot(self) -> dict[int, dict[str, float]]:
        return self.stats.snapshot()
