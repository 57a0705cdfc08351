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
from dataclasses import dataclass, field
from typing import Any

import torch

from kvstream.cache.base import PackedCache, PackedLayer
from kvstream.cache.budget import BitBudget
from kvstream.cache.memory import MemoryLedger
from kvstream.cache.rope import BlockRope, Rotary, model_rotaries
from kvstream.cache.store import SinkStore, SplitStore
from kvstream.cache.value_tail import PackedTailValues, restore_values, store_bits, store_tokens
from kvstream.config import CompressionConfig, ConfigError
from kvstream.quant.base import Quantizer, tensor_bytes
from kvstream.quant.rotation import HeadRotation
from kvstream.quant.sparse import SparseOutliers
from kvstream.stats.base import StatsManager

VALUE_PACK_TOKENS = 8
"""Read values wait exact until this many can be packed at once (``tail_values: packed``): packing and joining a
few tokens costs a handful of small operations per layer, which a decode step would otherwise pay every time."""


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
    _nbytes: int | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def length(self) -> int:
        return self.block_len * self.n_blocks

    def nbytes(self) -> int:
        """Bytes the group holds, counted once: a group is replaced, never edited (the budget and the peak ask
        for every layer's bytes at each step)."""
        if self._nbytes is None:
            self._nbytes = self.keys.nbytes() + self.values.nbytes() + sum(s.nbytes() for _, s in self.sinks)
        return self._nbytes

    def absorb(self, other: BlockGroup) -> BlockGroup | None:
        """This group followed by ``other`` as one group when their layouts agree, else None."""
        if other.block_len != self.block_len:
            return None
        keys, values = self.keys.concat(other.keys), self.values.concat(other.values)
        if keys is None or values is None:
            return None
        sinks = self.sinks + [(self.n_blocks + i, store) for i, store in other.sinks]
        return BlockGroup(self.start, self.block_len, self.n_blocks + other.n_blocks, keys, values, sinks)

    def select_rows(self, index: torch.Tensor) -> BlockGroup:
        """Batch rows ``index`` of every block and sink copy, as stored."""
        keys, values = self.keys.select_rows(index), self.values.select_rows(index)
        sinks = [(i, store.select_rows(index)) for i, store in self.sinks]
        return BlockGroup(self.start, self.block_len, self.n_blocks, keys, values, sinks)

    def first_blocks(self, n: int) -> BlockGroup:
        """The group's first ``n`` blocks, as views of its bytes (freed with the next block packed after them)."""
        sinks = [(i, store) for i, store in self.sinks if i < n]
        return BlockGroup(self.start, self.block_len, n, self.keys.blocks(0, n), self.values.blocks(0, n), sinks)

    def without_first(self, n: int) -> BlockGroup | None:
        """The group less its first ``n`` blocks, in storage of its own so theirs is freed; None when
        its blocks cannot be sliced (a format with extras), and the group is then kept whole."""
        try:
            keys = self.keys.blocks(n, self.n_blocks).copy()
            values = self.values.blocks(n, self.n_blocks).copy()
        except ValueError:
            return None
        sinks = [(i - n, store) for i, store in self.sinks if i >= n]
        return BlockGroup(self.start + n * self.block_len, self.block_len, self.n_blocks - n, keys, values, sinks)


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
        keys[rows, :, slots] = src_k[rows, :, order].to(keys.dtype)
        values[rows, :, slots] = src_v[rows, :, order].to(values.dtype)


class StreamingLayer(PackedLayer):
    """One decoder layer's packed block groups; the full-precision tail is ``keys``/``values``."""

    def __init__(self, owner: StreamingQuantizedCache, layer_idx: int, window: int | None = None) -> None:
        super().__init__(owner, layer_idx, window)
        self.groups: list[BlockGroup] = []
        self.packed_length = 0
        """Index of the first token not packed (the tail's first); blocks before `offset` may be freed."""
        self.tail_frozen = False
        self._sink_read: tuple[tuple[int, int], tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None] | None = None
        self.normal_bits = (owner.config.key_bits_normal, owner.config.value_bits_normal)
        """Normal key and value widths of this layer's next blocks (a bit budget may change them)."""
        self.tail_packed = PackedTailValues()
        """Values of the tail's oldest tokens packed per token (``tail_values: packed``); ``values`` holds the rest."""
        self._prepacked: tuple[SplitStore, torch.Tensor] | None = None
        """The packed values (and their outlier units) `take_tail` handed to the block `_pack` is making."""

    @property
    def n_blocks(self) -> int:
        return sum(g.n_blocks for g in self.groups)

    def pack_tail(self, n_new: int) -> None:
        """Pack every full chunk of the tail (decoded tokens stay if ``decode_storage`` says so)."""
        if n_new == 1 and self.owner.config.decode_storage == "full_precision":
            self.tail_frozen = True
        chunk = self.owner.config.chunk_size
        keep = self.owner.config.recent_window
        while not self.tail_frozen and self.keys.shape[-2] >= chunk + keep:
            self._pack(*self.take_tail(chunk))
        step = self.owner.config.tail_block
        while step and not self.tail_frozen and self.keys.shape[-2] >= step + keep:
            self._pack(*self.take_tail(step))
        if not self.tail_frozen:
            self._pack_tail_values()
        if self.window is not None:
            self.free_unreachable()

    def _pack_tail_values(self) -> None:
        """With ``tail_values: packed``: quantize per token the values of the tail tokens attention has read (all but
        ``recent_window``), `VALUE_PACK_TOKENS` or more at a time, with the outlier units of the values held (the
        statistics' when none are), once the layer has a block's statistics; sink tokens wait exact for their
        block's high-precision copy."""
        owner, cfg = self.owner, self.owner.config
        if cfg.tail_values != "packed" or owner.nothing_quantized() or self.packed_length == 0:
            return
        held = self.tail_packed.length
        stop = self.keys.shape[-2] - cfg.recent_window
        bits = self.normal_bits[1] if self.tail_packed.store is None else store_bits(self.tail_packed.store)
        if stop - held < VALUE_PACK_TOKENS or bits == 16:
            return
        first = self.length - self.keys.shape[-2] + held
        positions, valid = (table[:, first : first + stop - held] for table in owner.tables_on(self.keys.device))
        if bool((valid & (positions < cfg.attention_sink_size)).any()):
            return
        values = self.values[..., : stop - held, :].to(self.dtype)
        rotation = self.value_rotation()
        if rotation is not None:
            values = rotation.rotate(values)
        outliers = (
            owner.stats.value_outliers(self.layer_idx) if self.tail_packed.store is None else self.tail_packed.outliers
        )
        self.tail_packed.append(self.build_value_store(values, outliers, bits), outliers)
        self.values = self.values[..., stop - held :, :].clone()

    def tail_values(self) -> torch.Tensor:
        """`PackedLayer.tail_values`: the per-token packed values restored (and rotated back), then the exact ones,
        in the tail's dtype; made for each step's attention (a few tokens) and counted as its working memory."""
        if self.tail_packed.store is None:
            return self.values
        packed = self._restored_values(self.tail_packed.store)
        out = torch.cat([packed.to(self.values.dtype), self.values], dim=-2)
        self.owner.note_transient(tensor_bytes(packed, out))
        return out

    def _restored_values(self, store: SplitStore) -> torch.Tensor:
        """Values packed per token dequantized in fp32 as attention sees them (rotated back where values are
        rotated)."""
        packed = restore_values(store, self.owner.value_quantizer)
        rotation = self.value_rotation()
        return packed if rotation is None else rotation.unrotate(packed)

    def take_tail(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """`PackedLayer.take_tail`; values packed per token come back restored (they serve the statistics and the
        sink copies), their store kept for `_pack`, which joins their codes into the block as they are."""
        held = min(n, self.tail_packed.length)
        if held == 0:
            return super().take_tail(n)
        outliers = self.tail_packed.outliers
        store = self.tail_packed.take(held)
        restored = self._restored_values(store).to(self.dtype)
        self._prepacked = (store, outliers)
        keys = self.keys[..., :n, :]
        values = torch.cat([restored, self.values[..., : n - held, :].to(self.dtype)], dim=-2)
        self.keys = self.keys[..., n:, :].clone()
        self.values = self.values[..., n - held :, :].clone()
        return keys, values

    def check_recording(self) -> None:
        if self.owner.config.tail_values == "packed":
            raise NotImplementedError(
                "tail_values: packed keeps no exact values to take a block back with, which assisted decoding "
                "needs (past recording); use tail_values: exact"
            )

    def free_unreachable(self) -> None:
        """Free the whole blocks a sliding window no longer reaches: every later query sits at index
        ``length`` or beyond and sees tokens after ``query - window`` only (the model's own mask)."""
        horizon = self.length - self.window + 1
        while self.groups:
            group = self.groups[0]
            n = min(group.n_blocks, max(0, (horizon - group.start) // group.block_len))
            if n == 0:
                break
            rest = None if n == group.n_blocks else group.without_first(n)
            if rest is None and n < group.n_blocks:
                break
            self.groups[:1] = [] if rest is None else [rest]
        self.offset = self.groups[0].start if self.groups else self.packed_length

    def tail_dtype(self, *new: torch.Tensor) -> torch.dtype:
        """The dtype exact tokens are held in (the tail, the sinks' read copies): the model's, or with
        ``exact_storage: 16bit`` (when anything is quantized) fp16, and bf16 from the first token fp16 cannot
        hold on (`PackedLayer.update` moves the tail over)."""
        if self.owner.config.exact_storage != "16bit" or self.owner.nothing_quantized():
            return new[0].dtype
        if self.is_initialized and self.keys.dtype == torch.bfloat16:
            return torch.bfloat16
        fits = all(bool(t.abs().amax() <= torch.finfo(torch.float16).max) for t in new if t.numel())
        return torch.float16 if fits else torch.bfloat16

    def clear_packed(self) -> None:
        self.tail_packed.clear()
        self._prepacked = None
        self.groups = []
        self.packed_length = 0
        self.tail_frozen = False
        self._sink_read = None

    def select_packed_rows(self, index: torch.Tensor) -> None:
        self.groups = [group.select_rows(index) for group in self.groups]
        self.tail_packed.select_rows(index)
        if self._sink_read is not None and self._sink_read[1] is not None:
            self._sink_read = (self._sink_read[0], tuple(t.index_select(0, index) for t in self._sink_read[1]))

    def packing_state(self) -> tuple[Any] | None:
        """The layer's statistics before the next block, as a 1-tuple (the statistics may be None before the
        first block); None when the stats manager cannot hand its state out, so no block can be taken back."""
        if not callable(getattr(self.owner.stats, "layer_state", None)):
            return None
        return (self.owner.stats.layer_state(self.layer_idx),)

    def rewind_packing(self, start: int, state: tuple[Any]) -> None:
        kept = [group for group in self.groups if group.start < start]
        if kept and kept[-1].start + kept[-1].length > start:
            kept[-1] = kept[-1].first_blocks((start - kept[-1].start) // kept[-1].block_len)
        if sum(len(g.sinks) for g in kept) != sum(len(g.sinks) for g in self.groups):
            self._sink_read = None  # sinks were taken back with the blocks: their kept read goes too
        self.groups = kept
        self.packed_length = start
        self.owner.stats.restore_layer_state(self.layer_idx, state[0])
        self.owner.budget.forget_from(start)

    def crop(self, tokens_to_remove: int) -> None:
        """`PackedLayer.crop`; a crop also means decoding has begun (assisted decoding crops after every
        verification, whose appends hold several tokens), so ``decode_storage: full_precision`` packs no more."""
        if self.tail_packed.store is not None:
            self._crop_tail(self.crop_length(tokens_to_remove))
        else:
            super().crop(tokens_to_remove)
        if self.owner.config.decode_storage == "full_precision":
            self.tail_frozen = True

    def _crop_tail(self, keep: int) -> None:
        """Cut a tail whose front values are packed per token to end at token ``keep`` (at or after its start: no
        block can be taken back, past recording being refused)."""
        if keep == self.length:
            return
        kept = keep - (self.length - self.keys.shape[-2])
        held = self.tail_packed.length
        self.keys = self.keys[..., :kept, :].clone()
        if kept <= held:
            self.tail_packed.keep_first(kept)
            self.values = self.values[..., :0, :].clone()
        else:
            self.values = self.values[..., : kept - held, :].clone()
        self.length = keep
        self.pack_tail(0)
        self.owner.layer_updated(self.layer_idx)

    def _pack(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        owner, cfg = self.owner, self.owner.config
        start = self.packed_length
        end = start + keys.shape[-2]
        positions, valid = (table[:, start:end] for table in owner.tables_on(keys.device))
        sinks = valid & (positions < cfg.attention_sink_size)
        counted = valid & ~sinks
        keys, values = keys.to(self.dtype), values.to(self.dtype)  # from a 16-bit tail: quantized as the model's
        if cfg.key_rope == "pre":
            rotary = owner.rotaries[self.layer_idx]
            keys = rotary.invert(keys, *rotary.cos_sin(keys, positions))
        sink_keys, sink_values = keys, values
        rotation = owner.rotation(self.layer_idx)
        if rotation is not None:
            keys = rotation.rotate(keys) if cfg.rotation in ("keys", "both") else keys
            values = rotation.rotate(values) if cfg.rotation in ("values", "both") else values
        owner.stats.update(self.layer_idx, keys, values, counted)

        t = values.shape[2]
        if cfg.bit_budget and owner.budget.ready:
            rope = owner.block_rope(self) if cfg.key_rope == "pre" and t != cfg.chunk_size else None
            if rope is not None:  # made now, so the plan counts the tables this block will be read with
                rope.short_offsets(t)
            width = owner.budget.width_for(owner, self.layer_idx, start, t)
            self.normal_bits = (width, width)
        prepacked, self._prepacked = self._prepacked, None
        if prepacked is None:
            key_store, value_store = self.build_stores(keys, values, counted, self.normal_bits)
        else:  # the packed codes as they are, the rest of the block's values quantized alike (units and width)
            value_store, outliers = prepacked
            held = store_tokens(value_store)
            key_store = self.build_key_store(keys, counted, self.normal_bits[0])
            if held < t:
                rest = self.build_value_store(values[..., held:, :], outliers, store_bits(value_store))
                value_store = SplitStore.join_tokens([value_store, rest])
        if cfg.bit_budget and owner.budget.ready:
            stored = key_store.nbytes() + value_store.nbytes()
            owner.budget.record(self.layer_idx, t, self.normal_bits[0], stored, 2 * values.numel())
        if cfg.bit_budget and not self.groups and self.packed_length == 0:
            owner.budget.measure(self, keys, values, counted)
        sink_store = None
        # sinks are kept out of the block's key ranges, so they need their own copy unless nothing is quantized
        if not owner.nothing_quantized():
            sink_store = SinkStore.build(
                sink_keys,
                sink_values,
                sinks,
                cfg.key_bits_sink_outlier,
                cfg.value_bits_sink_outlier,
                cfg.key_symmetric,
                cfg.value_symmetric,
                owner.quantizer,
            )
        block = BlockGroup(start, t, 1, key_store, value_store, [(0, sink_store)] if sink_store else [])
        self.packed_length = end
        merged = self.groups[-1].absorb(block) if self.groups else None
        if merged is not None:
            self.groups[-1] = merged
        else:
            self.groups.append(block)

    def key_layout(self, keys: torch.Tensor) -> torch.Tensor:
        """A block's keys as the store holds them: ``[1, B, H, D, T / span, span]`` (one range per channel and
        key token group)."""
        group = self.owner.config.key_token_group
        b, h, t, d = keys.shape
        span = group if group and t % group == 0 else t
        return keys.transpose(-1, -2).reshape(1, b, h, d, t // span, span)

    def value_layout(self, values: torch.Tensor) -> torch.Tensor:
        """Values as the store holds them: ``[1, B, H, D / group, T, group]`` (one range per token and channel
        group)."""
        group = self.owner.config.value_quant_groups
        b, h, t, d = values.shape
        return values.reshape(b, h, t, d // group, group).transpose(2, 3)[None]

    def build_stores(
        self, keys: torch.Tensor, values: torch.Tensor, counted: torch.Tensor, bits: tuple[int, int]
    ) -> tuple[SplitStore, SplitStore]:
        """One block's key and value stores (keys as stored: pre-RoPE and rotated where configured) at the
        normal widths ``bits`` (keys, values); the statistics name the outlier units."""
        key_store = self.build_key_store(keys, counted, bits[0])
        return key_store, self.build_value_store(values, self.owner.stats.value_outliers(self.layer_idx), bits[1])

    def build_key_store(self, keys: torch.Tensor, counted: torch.Tensor, bits: int) -> SplitStore:
        """A block's keys (as stored) at normal width ``bits``, one range per channel and key token group."""
        owner, cfg = self.owner, self.owner.config
        key_units = self.key_layout(keys)
        *_, groups, span = key_units.shape
        return SplitStore.build(
            key_units,
            owner.stats.key_outliers(self.layer_idx),
            cfg.key_bits_sink_outlier,
            bits,
            reduce_dim=5,
            symmetric=cfg.key_symmetric,
            quantizer=owner.quantizer,
            mask=counted.reshape(1, counted.shape[0], 1, 1, groups, span),
        )

    def build_value_store(self, values: torch.Tensor, outliers: torch.Tensor, bits: int) -> SplitStore:
        """Values (as stored: rotated where configured) of any number of tokens at normal width ``bits``, one range
        per token and channel group, the ``outliers`` units ([B, H, N]) at the high width."""
        owner, cfg = self.owner, self.owner.config
        value_units = self.value_layout(values)
        return SplitStore.build(
            value_units,
            outliers,
            cfg.value_bits_sink_outlier,
            bits,
            reduce_dim=5,
            symmetric=cfg.value_symmetric,
            quantizer=owner.value_quantizer,
            mask=None,
        )

    def restore_blocks(self, group: BlockGroup, first: int, last: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Blocks ``first:last`` of ``group`` dequantized in fp32, keys as stored (pre-RoPE or not); sink slots hold
        the blocks' clamped codes (`history_tiles` pastes the sinks' copies over them).

        ``[batch, heads, tokens, head_dim]`` each; only these blocks are materialised.
        """
        owner, quantizer = self.owner, self.owner.quantizer
        k = group.keys.blocks(first, last).restore(quantizer).float()  # [S, B, H, D, T / span, span]
        v = group.values.blocks(first, last).restore(owner.value_quantizer).float()  # [S, B, H, G, T, group size]
        s, b, h, d = k.shape[:4]
        t = group.block_len
        k = k.reshape(s, b, h, d, t).permute(1, 2, 0, 4, 3).reshape(b, h, s * t, d)
        v = v.permute(1, 2, 0, 4, 3, 5).reshape(b, h, s * t, d)
        rotation = owner.rotation(self.layer_idx)
        if rotation is not None:  # undone tile by tile, so the history is never un-rotated in full
            k = rotation.unrotate(k) if owner.config.rotation in ("keys", "both") else k
            v = rotation.unrotate(v) if owner.config.rotation in ("values", "both") else v
        return k, v

    def history_tiles(self, max_tokens: int, fused: bool = False) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        """``(first token, keys as attention sees them, values)`` in fp32, whole blocks of at most ``max_tokens``.

        ``fused``: restore with the CPU kernel (one pass, no intermediates) when it can read this layer. Either way
        the sinks' kept copies (`sink_tokens`) are pasted over their slots.
        """
        from kvstream.kernels import cpu

        fused = fused and self.keys.device.type == "cpu" and self.kernel_ready() and cpu.extension() is not None
        sinks = self.sink_tokens()
        for group in self.groups:
            per_tile = max(1, max_tokens // group.block_len)
            for first in range(0, group.n_blocks, per_tile):
                last = min(first + per_tile, group.n_blocks)
                start = group.start + first * group.block_len
                if fused:
                    k, v = cpu.restore_blocks(self, group, first, last)
                    rotation = self.value_rotation()
                    if rotation is not None:  # the tile's values back from the rotated basis, sinks pasted after
                        v = rotation.unrotate(v)
                else:
                    k, v = self.restore_blocks(group, first, last)
                    positions = self.owner.tables_on(k.device)[0][:, start : start + k.shape[-2]]
                    k = self.rotate_keys(k, positions)
                if sinks is not None:
                    paste_tokens(k, v, start, *sinks)
                yield start, k, v

    def rotate_keys(self, keys: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Stored keys at ``positions`` ([B, n]) as attention sees them: RoPE re-applied in fp32 if stored pre-RoPE."""
        if self.owner.config.key_rope != "pre":
            return keys
        rotary = self.owner.rotaries[self.layer_idx]
        return rotary.apply(keys, *rotary.cos_sin(keys, positions))

    def kernel_ready(self) -> bool:
        """True when the fused CPU kernel can read every packed block of this layer (see `kernel_refusal`)."""
        return bool(self.groups) and self.kernel_refusal() is None

    def kernel_refusal(self) -> str | None:
        """Why the fused kernels cannot read this layer's blocks, in a few words; None when they can."""
        from kvstream.kernels.cpu import store_supported

        owner = self.owner
        reason = owner.kernel_refusal(self)
        if reason is not None:
            return reason
        rope = owner.block_rope(self) if owner.config.key_rope == "pre" else None
        tables = owner.tables_on(self.keys.device)
        for g in self.groups:
            if rope is not None and not rope.group_exact(g.start, g.block_len, g.n_blocks, *tables):
                return "tokens of a block at positions that are not consecutive"
            if not store_supported(g.keys, owner.quantizer) or not store_supported(g.values, owner.value_quantizer):
                return "blocks whose codes need more than a level table to restore (fitted levels, sparse outliers)"
        return None

    def value_rotation(self) -> HeadRotation | None:
        """The rotation this layer's stored values are in, or None: readers rotate their output back once."""
        if self.owner.config.rotation not in ("values", "both"):
            return None
        return self.owner.rotation(self.layer_idx)

    def sink_tokens(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """Every sink copy of the layer: token index ([B, n], -1 where a row has fewer), keys as attention
        sees them and values ([B, H, n, D]), or None when the layer holds none.

        Built once per set of sink copies and kept (a few tokens per row; counted as ``sinks``), so a
        decode step does not dequantize and rotate them again; kept in the exact tail's dtype (`tail_dtype`:
        16 bits under ``exact_storage: 16bit``), and every reader reads this copy.
        """
        state = (sum(len(g.sinks) for g in self.groups), self.offset)
        if self._sink_read is None or self._sink_read[0] != state:
            self._sink_read = (state, self._read_sinks())
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
        positions = self.owner.tables_on(keys_all.device)[0].gather(1, index_all.clamp_min(0))
        keys_all = self.rotate_keys(keys_all, positions)
        values_all = torch.cat(values, dim=2)
        held = self.tail_dtype(keys_all, values_all)
        return index_all, keys_all.to(held).contiguous(), values_all.to(held).contiguous()

    def restore_history(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The whole history restored at once, in the model dtype (the ``attention: restore`` path)."""
        if not self.groups:
            return None
        tiles = list(self.history_tiles(self.packed_length))
        keys = torch.cat([k for _, k, _ in tiles], dim=-2) if len(tiles) > 1 else tiles[0][1]
        values = torch.cat([v for _, _, v in tiles], dim=-2) if len(tiles) > 1 else tiles[0][2]
        return keys.to(self.dtype), values.to(self.dtype)

    def packed_nbytes(self) -> int:
        return sum(g.nbytes() for g in self.groups) + self.tail_packed.nbytes() + tensor_bytes(*self._sink_copies())

    def _sink_copies(self) -> tuple[torch.Tensor, ...]:
        """The kept read of the sinks (see `sink_tokens`), if built."""
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
        self.tail_packed.ledger(ledger)


class StreamingQuantizedCache(PackedCache):
    """Chunk-by-chunk quantized KV cache (see the module docstring); use `from_model` to build one."""

    def __init__(
        self,
        config: CompressionConfig,
        num_layers: int,
        rotaries: list[Rotary] | None,
        quantizer: Quantizer,
        stats: StatsManager,
        windows: list[int | None] | None = None,
        value_quantizer: Quantizer | None = None,
    ) -> None:
        if config.key_rope == "pre" and rotaries is None:
            raise ConfigError("key_rope: pre needs the model's rotary embedding; use key_rope: post")
        self.config = config  # the layers read it as they are built
        self.rotaries = rotaries
        self.quantizer = quantizer
        self.value_quantizer = quantizer if value_quantizer is None else value_quantizer
        self.stats = stats
        self._rotations: dict[int, HeadRotation] = {}
        self.budget = BitBudget(config.bit_budget, num_layers)
        self._block_ropes: dict[tuple[Any, ...], BlockRope | None] = {}
        windows = windows or [None] * num_layers
        super().__init__(config, [StreamingLayer(self, i, windows[i]) for i in range(num_layers)])

    @classmethod
    def from_model(cls, model: Any, config: CompressionConfig) -> StreamingQuantizedCache:
        """Build the cache for ``model`` with the quantizer and stats manager ``config`` names; a model whose
        rotary or attention kvstream cannot reproduce exactly is refused (`ConfigError`, one line)."""
        from kvstream import registry
        from kvstream.engine.model import attention_windows, check_attention, model_geometry

        geometry = model_geometry(model)
        config.validate(head_dim=geometry.head_dim)
        check_attention(model, config)
        rotaries = model_rotaries(model) if config.key_rope == "pre" else None
        quantizer = registry.get("quantizers", config.quantizer)()
        value_quantizer = (
            None if config.value_quantizer == "same" else registry.get("quantizers", config.value_quantizer)()
        )
        for setting, built in (("quantizer", quantizer), ("value_quantizer", value_quantizer)):
            if built is not None and config.scale_bits != 16:
                if not hasattr(built, "scale_bits"):
                    raise ConfigError(
                        f"scale_bits: {config.scale_bits} needs a quantizer that stores 8-bit scales; "
                        f"{setting} {type(built).__name__} does not (use scale_bits: 16)"
                    )
                built.scale_bits = config.scale_bits
        if config.sparse_outlier_fraction:
            quantizer = SparseOutliers(quantizer, config.sparse_outlier_fraction)
            value_quantizer = (
                None if value_quantizer is None else SparseOutliers(value_quantizer, config.sparse_outlier_fraction)
            )
        stats = registry.get("stats", config.stats)(config)
        windows = attention_windows(model)
        cache = cls(config, geometry.num_layers, rotaries, quantizer, stats, windows, value_quantizer)
        if config.attention == "packed":
            cache.attach(model)
        return cache

    def nothing_quantized(self) -> bool:
        """True when every width is 16 bits: blocks hold the tokens as they came."""
        cfg = self.config
        return all(bits == 16 for bits in (cfg.key_bits_normal, cfg.key_bits_sink_outlier, cfg.value_bits_normal))

    def kernel_refusal(self, layer: StreamingLayer) -> str | None:
        """Why the fused kernels cannot read ``layer`` whatever its blocks hold, or None: each quantizer must
        declare its packed format (`kvstream.quant.base.Quantizer`), keys must not be rotated (the rotation
        sits between the stored keys and RoPE), and pre-RoPE keys need a rotary in the kernels' layout that
        the block-wise angle-addition rule reproduces (checked on a probe)."""
        cfg = self.config
        for setting, quantizer in (("quantizer", self.quantizer), ("value_quantizer", self.value_quantizer)):
            if not callable(getattr(quantizer, "level_table", None)):
                return f"{setting} {type(quantizer).__name__} declares no packed format the kernels read"
        if cfg.rotation in ("keys", "both"):
            return f"rotation: {cfg.rotation} (rotated keys are stored before RoPE)"
        if cfg.key_rope != "pre":
            return None
        if self.block_rope(layer) is None:
            return "a rotary the kernels do not reproduce (partial or interleaved RoPE, or halves turning apart)"
        return None

    def block_rope(self, layer: StreamingLayer) -> BlockRope | None:
        """The blocks' RoPE for the kernels (`BlockRope`) of ``layer``'s rotary, covering its packed tokens;
        None when the rotary is not the kernels' layout (partial or interleaved) or fails the probe (halves of the
        channels turning at different rates among them)."""
        rotary, device = self.rotaries[layer.layer_idx], layer.keys.device
        key = (*rotary.key, device)  # one table per device of a model spread over several
        if key not in self._block_ropes:
            rope = BlockRope(rotary, self.config.chunk_size, device)
            full = rope.dim == layer.keys.shape[-1]
            self._block_ropes[key] = rope if rotary.kernel_layout and full and rope.check() else None
        rope = self._block_ropes[key]
        if rope is not None:
            rope.extend(*self.tables_on(device), layer.packed_length // self.config.chunk_size)
        return rope

    def rotation(self, layer_idx: int) -> HeadRotation | None:
        """Layer ``layer_idx``'s per-head rotation (built on first use), or None when ``rotation: none``."""
        if self.config.rotation == "none":
            return None
        if layer_idx not in self._rotations:
            keys = self.layers[layer_idx].keys
            _, h, _, d = keys.shape
            self._rotations[layer_idx] = HeadRotation(h, d, self.config.rotation_seed, layer_idx, keys.device)
        return self._rotations[layer_idx]

    def shared_tensors(self) -> dict[str, tuple[torch.Tensor | None, ...]]:
        live = {(g.start, g.block_len, g.n_blocks) for layer in self.layers for g in layer.groups}
        rope = tuple(t for r in self._block_ropes.values() if r is not None for t in r.live_tensors(live))
        rotations = [r.signs for r in self._rotations.values()]
        matrices = {r.matrix.data_ptr(): r.matrix for r in self._rotations.values()}  # one per head size
        return {**super().shared_tensors(), "block_rope": rope, "rotation": (*rotations, *matrices.values())}

    def reset(self) -> None:
        super().reset()
        self._block_ropes = {}
        self._rotations = {}
        self.budget = BitBudget(self.config.bit_budget, self.num_layers)
        for layer in self.layers:
            layer.normal_bits = (self.config.key_bits_normal, self.config.value_bits_normal)
        self.stats.reset()

    def select_rows(self, index: torch.Tensor) -> None:
        """`PackedCache.select_rows`, and the statistics' rows too, so a selected row's later blocks quantize
        as they would have for that row alone."""
        if not callable(getattr(self.stats, "select_rows", None)):
            raise NotImplementedError(
                f"stats manager {type(self.stats).__name__} cannot select batch rows (select_rows), which beam "
                "search and batch expansion need"
            )
        super().select_rows(index)
        self.stats.select_rows(index)

    def forget_tables(self) -> None:
        super().forget_tables()
        self._block_ropes = {}

    def memory_report(self) -> dict[str, Any]:
        report = super().memory_report()
        if self.config.bit_budget:
            report["bit_budget"] = self.budget.summary()
        return report

    def outlier_snapshot(self) -> dict[int, dict[str, float]]:
        return self.stats.snapshot()
