"""Shared machinery of caches that pack history into blocks behind a full-precision tail.

`PackedLayer` implements the transformers layer API once: an append lands in the tail, the
return value is the restored history followed by the exact tail, then the subclass decides what
to pack. `PackedCache` keeps what all layers share: the real position and padding of every token,
and the byte ledger with its peak. The streaming cache and plugin caches (KIVI-style) build on it.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Iterator
from typing import Any

import torch
from transformers import Cache
from transformers.cache_utils import CacheLayerMixin

from kvstream.attention.pending import pending_read
from kvstream.cache.memory import MemoryLedger, MemoryReport
from kvstream.config import CompressionConfig
from kvstream.quant.base import tensor_bytes


class PackedLayer(CacheLayerMixin):
    """One decoder layer: packed history (the subclass's) and the full-precision tail ``keys``/``values``."""

    is_compileable = False
    is_croppable = False
    is_sliding = False

    def __init__(self, owner: PackedCache, layer_idx: int) -> None:
        super().__init__()
        self.owner = owner
        self.layer_idx = layer_idx
        self.length = 0
        self.awaiting_read = 0
        """Tokens of the last update that attention has not read yet (packed once it has)."""

    # -- what a subclass provides ----------------------------------------------------------------
    @abstractmethod
    def restore_history(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Dequantized packed history, ``[batch, heads, packed tokens, head_dim]`` each, or None."""

    def history_tiles(self, max_tokens: int, fused: bool = False) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        """``(first token, keys, values)`` of the packed history as attention sees it, tile by tile.

        The default restores everything as one tile; caches that can read part of their history
        (the streaming cache) yield tiles of at most ``max_tokens`` tokens, through a fused kernel
        when ``fused`` and one serves.
        """
        history = self.restore_history()
        if history is not None:
            yield 0, history[0], history[1]

    @abstractmethod
    def pack_tail(self, n_new: int) -> None:
        """Move whatever the policy says from the tail into packed storage (after an append of ``n_new``)."""

    @abstractmethod
    def clear_packed(self) -> None: ...

    @abstractmethod
    def packed_nbytes(self) -> int: ...

    @abstractmethod
    def ledger_packed(self, ledger: MemoryLedger) -> None: ...

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
        self.owner.track_tokens(key_states, self.length, n_new, call_kwargs.get("position_ids"))
        if self.awaiting_read:
            raise RuntimeError(
                f"layer {self.layer_idx}: attention never read the packed history of the previous step; "
                "the model must run kvstream's attention function for this cache (cache.attach(model))"
            )
        if self.owner.reads_packed:
            # attention reads the packed history itself (kvstream.attention); packing waits until it has
            self.keys = torch.cat([self.keys, key_states], dim=-2)
            self.values = torch.cat([self.values, value_states], dim=-2)
            self.length += n_new
            self.awaiting_read = n_new
            pending_read(self)
            return self.keys, self.values
        history = self.restore_history()
        self.keys = torch.cat([self.keys, key_states], dim=-2)
        self.values = torch.cat([self.values, value_states], dim=-2)
        if history is None:
            out_keys, out_values = self.keys, self.values
        else:
            out_keys = torch.cat([history[0], self.keys], dim=-2)
            out_values = torch.cat([history[1], self.values], dim=-2)
        self.length += n_new
        self.complete_update(n_new)
        if history is not None:  # the restored copy and its concatenation with the tail exist at once
            self.owner.note_transient(tensor_bytes(*history, out_keys, out_values))
        return out_keys, out_values

    def complete_update(self, n_new: int) -> None:
        """After attention of an append of ``n_new`` tokens: pack what the policy says, update the ledger."""
        self.awaiting_read = 0
        self.pack_tail(n_new)
        self.owner.layer_updated(self.layer_idx)

    def take_tail(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Remove and return the oldest ``n`` tail tokens (keys, values)."""
        keys, values = self.keys[..., :n, :], self.values[..., :n, :]
        self.keys = self.keys[..., n:, :].clone()
        self.values = self.values[..., n:, :].clone()
        return keys, values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.clear_packed()
        self.awaiting_read = 0
        self.length = 0
        self.keys = self.values = None
        self.is_initialized = False

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise NotImplementedError(f"{type(self.owner).__name__} does not support beam search (num_beams > 1)")

    # -- accounting ------------------------------------------------------------------------------
    def nbytes(self) -> int:
        return self.packed_nbytes() + tensor_bytes(self.keys, self.values)

    def ledger(self, ledger: MemoryLedger) -> None:
        self.ledger_packed(ledger)
        ledger.add("full_precision_tail", self.keys, self.values)


class PackedCache(Cache):
    """A cache of `PackedLayer`s: token positions and padding, and a byte ledger with its peak."""

    def __init__(self, config: CompressionConfig, layers: list[PackedLayer]) -> None:
        self.config = config
        self.num_layers = len(layers)
        self.model_config: Any = None
        super().__init__(layers=layers)
        self._reset_tracking()

    def attach(self, model: Any) -> None:
        """Let ``model``'s attention read the packed history directly (kvstream's attention function).

        Sets the model's attention implementation to ``kvstream``, which behaves as SDPA for any
        other cache, so one model can serve this cache and a full-precision one.
        """
        from kvstream.attention import enable

        enable(model)
        self.model_config = model.config

    @property
    def reads_packed(self) -> bool:
        """True when attention reads the packed history tile by tile instead of a restored copy."""
        if self.model_config is None:
            return False
        from kvstream.attention import ATTENTION_NAME

        implementation = self.model_config.get_text_config(decoder=True)._attn_implementation
        if implementation != ATTENTION_NAME:
            raise RuntimeError(
                f"this cache reads its packed history in kvstream's attention, but the model's attention "
                f"implementation is now {implementation!r}; call cache.attach(model) again"
            )
        return True

    def note_transient(self, nbytes: int) -> None:
        """Fold working memory that attention holds on top of the stored bytes into the peak."""
        self.peak_stored_bytes = max(self.peak_stored_bytes, self.stored_bytes() + nbytes)

    def _reset_tracking(self) -> None:
        self.positions = torch.zeros(0, 0, dtype=torch.int32)
        self.valid = torch.zeros(0, 0, dtype=torch.bool)
        self._padding: torch.Tensor | None = None
        self._current_bytes = [0] * self.num_layers
        self.peak_stored_bytes = 0

    def register_padding(self, attention_mask: torch.Tensor) -> None:
        """Tell the cache which of the coming tokens are padding (``attention_mask == 0``).

        `chunked_prefill` calls this, since a chunk may hold only pads; ``generate`` needs no call,
        as it prefills the whole prompt at once and its pads are recognised from the positions.
        """
        self._padding = attention_mask.bool()

    def track_tokens(self, like: torch.Tensor, start: int, n_new: int, position_ids: torch.Tensor | None) -> None:
        """Record the real positions and padding of new tokens, once per forward (on the first layer).

        They live on the device of ``like`` (the layer's keys), where the cache uses them.
        """
        if self.positions.shape[1] >= start + n_new:
            return
        batch, device = like.shape[0], like.device
        if position_ids is None:
            position_ids = torch.arange(start, start + n_new, device=device).unsqueeze(0)
        position_ids = position_ids.to(device).expand(batch, n_new).to(torch.int32)
        if start == 0:
            self.positions = position_ids[:, :0]
            self.valid = torch.zeros(batch, 0, dtype=torch.bool, device=device)
        if self._padding is not None and start < self._padding.shape[1]:
            valid = self._padding[:, start : start + n_new].to(device)
            valid = torch.cat([valid, valid.new_ones(batch, n_new - valid.shape[1])], dim=1)
        elif start == 0:
            # generate gives left pads position 0 like the first real token: a 0 followed by a 0 is a pad
            zero = position_ids == 0
            valid = ~(zero & torch.cat([zero[:, 1:], zero.new_zeros(batch, 1)], dim=1))
        else:
            valid = torch.ones(batch, n_new, dtype=torch.bool, device=device)
        self.positions = torch.cat([self.positions, position_ids], dim=1)
        self.valid = torch.cat([self.valid, valid], dim=1)

    def layer_updated(self, layer_idx: int) -> None:
        self._current_bytes[layer_idx] = self.layers[layer_idx].nbytes()
        self.peak_stored_bytes = max(self.peak_stored_bytes, self.stored_bytes())

    def shared_tensors(self) -> dict[str, tuple[torch.Tensor | None, ...]]:
        """Tensors the cache holds for all layers together, by kind (the position table here)."""
        return {"positions": (self.positions, self.valid)}

    def stored_bytes(self) -> int:
        """Bytes held right now: every layer's packed history and tail, and the shared tables."""
        return sum(self._current_bytes) + sum(tensor_bytes(*t) for t in self.shared_tensors().values())

    def reset(self) -> None:
        super().reset()
        self._reset_tracking()

    def memory_report(self) -> MemoryReport:
        """Bytes of every tensor held, effective bits per cached element, and the ratio to fp16."""
        ledger = MemoryLedger()
        for layer in self.layers:
            layer.ledger(ledger)
        for kind, tensors in self.shared_tensors().items():
            ledger.add(kind, *tensors)
        return ledger.report(self._element_count(), self.peak_stored_bytes)

    def _element_count(self) -> int:
        total = 0
        for layer in self.layers:
            if layer.is_initialized:
                b, h, _, d = layer.keys.shape
                total += 2 * b * h * d * layer.length
        return total
