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
from transformers import Cache
from transformers.cache_utils import CacheLayerMixin

from kvstream.cache.memory import MemoryLedger, MemoryReport
from kvstream.cache.rope import Rotary
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


class StreamingLayer(CacheLayerMixin):
    """One decoder layer's packed blocks and full-precision tail."""

    is_compileable = False
    is_croppable = False
    is_sliding = False

    def __init__(self, owner: StreamingQuantizedCache, layer_idx: int) -> None:
        super().__init__()
        self.owner = owner
        self.layer_idx = layer_idx
        self.groups: list[BlockGroup] = []
        self.length = 0
        self.tail_frozen = False

    # -- transformers layer API ------------------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self.dtype = key_states.dtype
        shape = (*key_states.shape[:2], 0, key_states.shape[-1])
        self.keys = key_states.new_zeros(shape)
        self.values = value_states.new_zeros((*value_states.shape[:2], 0, value_states.shape[-1]))
        self.is_initialized = True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        call_kwargs = kwargs.get("kwargs") or kwargs
        n_new = key_states.shape[-2]
        self.owner._track_positions(self.layer_idx, self.length, n_new, call_kwargs.get("position_ids"))
        if n_new == 1 and self.owner.config.decode_storage == "full_precision":
            self.tail_frozen = True

        hist_keys, hist_values = self._restore_blocks()
        # self.keys / self.values: the full-precision tail, keys as received (post-RoPE)
        self.keys = torch.cat([self.keys, key_states], dim=-2)
        self.values = torch.cat([self.values, value_states], dim=-2)
        out_keys = torch.cat([hist_keys, self.keys], dim=-2) if hist_keys is not None else self.keys
        out_values = torch.cat([hist_values, self.values], dim=-2) if hist_values is not None else self.values
        self.length += n_new

        chunk = self.owner.config.chunk_size
        while not self.tail_frozen and self.keys.shape[-2] >= chunk:
            self._pack(self.keys[..., :chunk, :], self.values[..., :chunk, :])
            self.keys = self.keys[..., chunk:, :].clone()
            self.values = self.values[..., chunk:, :].clone()
        self.owner._layer_updated(self.layer_idx)
        return out_keys, out_values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.groups = []
        self.length = 0
        self.tail_frozen = False
        self.keys = self.values = None
        self.is_initialized = False

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise NotImplementedError("StreamingQuantizedCache does not support beam search (num_beams > 1)")

    # -- packing and reading ---------------------------------------------------------------------
    @property
    def packed_length(self) -> int:
        return self.groups[-1].start + self.groups[-1].length if self.groups else 0

    @property
    def n_blocks(self) -> int:
        return sum(g.n_blocks for g in self.groups)

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
            keys[None, ..., None],
            owner.stats.key_outliers(self.layer_idx),
            cfg.key_bits_sink_outlier,
            cfg.key_bits_normal,
            reduce_dim=3,
            symmetric=cfg.key_symmetric,
            quantizer=owner.quantizer,
            mask=counted[None, :, None, :, None, None],
        )
        value_store = SplitStore.build(
            values.reshape(1, b, h, t, d // group, group),
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

    def _restore_blocks(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Dequantized (and, for pre-RoPE keys, re-rotated) history of every packed block."""
        if not self.groups:
            return None, None
        quantizer = self.owner.quantizer
        keys, values = [], []
        for group in self.groups:
            k = group.keys.restore(quantizer).squeeze(-1)  # [S, B, H, T, D]
            v = group.values.restore(quantizer).flatten(4)
            for index, sinks in group.sinks:
                sinks.paste(k[index], v[index], quantizer)
            s, b, h, t, d = k.shape
            keys.append(k[0] if s == 1 else k.permute(1, 2, 0, 3, 4).reshape(b, h, s * t, d))
            values.append(v[0] if s == 1 else v.permute(1, 2, 0, 3, 4).reshape(b, h, s * t, d))
        k_all = (torch.cat(keys, dim=-2) if len(keys) > 1 else keys[0]).to(self.dtype)
        v_all = (torch.cat(values, dim=-2) if len(values) > 1 else values[0]).to(self.dtype)
        if self.owner.config.key_rope == "pre":
            cos, sin = self.owner._history_rope(k_all)
            k_all = Rotary.apply(k_all, cos, sin)
        return k_all, v_all

    # -- accounting ------------------------------------------------------------------------------
    def nbytes(self) -> int:
        return sum(g.nbytes() for g in self.groups) + tensor_bytes(self.keys, self.values)

    def ledger(self, ledger: MemoryLedger) -> None:
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
        ledger.add("full_precision_tail", self.keys, self.values)


class StreamingQuantizedCache(Cache):
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
        self.config = config
        self.rotary = rotary
        self.quantizer = quantizer
        self.stats = stats
        self.num_layers = num_layers
        super().__init__(layers=[StreamingLayer(self, i) for i in range(num_layers)])
        self._reset_tracking()

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

    # -- shared per-token bookkeeping ------------------------------------------------------------
    def _reset_tracking(self) -> None:
        self.positions = torch.zeros(0, 0, dtype=torch.int32)
        self.valid = torch.zeros(0, 0, dtype=torch.bool)
        self._padding: torch.Tensor | None = None
        self._rope_table: tuple[int, torch.Tensor, torch.Tensor] | None = None
        self._current_bytes = [0] * self.num_layers
        self.peak_stored_bytes = 0

    def _track_positions(self, layer_idx: int, start: int, n_new: int, position_ids: torch.Tensor | None) -> None:
        """Record the real positions (and padding) of new tokens, once per forward (on the first layer)."""
        if self.positions.shape[1] >= start + n_new:
            return
        batch = self.layers[layer_idx].keys.shape[0]
        if position_ids is None:
            position_ids = torch.arange(start, start + n_new).unsqueeze(0)
        position_ids = position_ids.to("cpu" if self.positions.numel() == 0 else self.positions.device)
        position_ids = position_ids.expand(batch, n_new).to(torch.int32)
        if start == 0:
            self.positions = position_ids[:, :0]
            self.valid = torch.zeros(batch, 0, dtype=torch.bool)
        if self._padding is not None and start < self._padding.shape[1]:
            valid = self._padding[:, start : start + n_new]
            valid = torch.cat([valid, valid.new_ones(batch, n_new - valid.shape[1])], dim=1)
        elif start == 0:
            # generate gives left pads position 0 like the first real token: a 0 followed by a 0 is a pad
            zero = position_ids == 0
            valid = ~(zero & torch.cat([zero[:, 1:], zero.new_zeros(batch, 1)], dim=1))
        else:
            valid = torch.ones(batch, n_new, dtype=torch.bool)
        self.positions = torch.cat([self.positions, position_ids], dim=1)
        self.valid = torch.cat([self.valid, valid], dim=1)

    def register_padding(self, attention_mask: torch.Tensor) -> None:
        """Tell the cache which of the coming tokens are padding (``attention_mask == 0``).

        `chunked_prefill` calls this, since a chunk may hold only pads; ``generate`` needs no call,
        as it prefills the whole prompt at once and its pads are recognised from the positions.
        """
        self._padding = attention_mask.bool().cpu()

    def _history_rope(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin of the packed history, computed once per forward and shared by all layers."""
        n = like.shape[-2]
        if self._rope_table is None or self._rope_table[0] != n:
            positions = self.positions[:, :n].to(like.device)
            cos, sin = self.rotary.cos_sin(like, positions)
            self._rope_table = (n, cos, sin)
        return self._rope_table[1], self._rope_table[2]

    def _layer_updated(self, layer_idx: int) -> None:
        self._current_bytes[layer_idx] = self.layers[layer_idx].nbytes()
        if layer_idx == self.num_layers - 1:
            self._rope_table = None  # a per-forward work table, not part of the cache
        self.peak_stored_bytes = max(self.peak_stored_bytes, self.stored_bytes())

    def stored_bytes(self) -> int:
        return sum(self._current_bytes) + tensor_bytes(self.positions, self.valid)

    # -- public ------------------------------------------------------------------------------------
    def reset(self) -> None:
        super().reset()
        self.stats.reset()
        self._reset_tracking()

    def memory_report(self) -> MemoryReport:
        """Bytes of every tensor held, effective bits per cached element, and the ratio to fp16."""
        ledger = MemoryLedger()
        for layer in self.layers:
            layer.ledger(ledger)
        ledger.add("positions", self.positions, self.valid)
        return ledger.report(self._element_count(), self.peak_stored_bytes)

    def _element_count(self) -> int:
        total = 0
        for layer in self.layers:
            if layer.is_initialized:
                b, h, _, d = layer.keys.shape
                total += 2 * b * h * d * layer.length
        return total

    def outlier_snapshot(self) -> dict[int, dict[str, float]]:
        return self.stats.snapshot()
