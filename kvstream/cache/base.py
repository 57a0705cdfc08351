"""Shared machinery of caches that pack history into blocks behind a full-precision tail.

`PackedLayer` implements the transformers layer API once: an append lands in the tail, the
return value is the restored history followed by the exact tail, then the subclass decides what
to pack. `PackedCache` keeps what all layers share: the real position and padding of every token,
and the byte ledger with its peak. The streaming cache and plugin caches (KIVI-style) build on it.
"""

from __future__ import annotations

import warnings
from abc import abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import Cache
from transformers.cache_utils import CacheLayerMixin

from kvstream.attention.pending import pending_read
from kvstream.cache.memory import MemoryLedger, MemoryReport
from kvstream.config import CompressionConfig
from kvstream.quant.base import tensor_bytes


def row_index(indices: torch.Tensor | Sequence[int]) -> torch.Tensor:
    """Batch rows to keep as a long index: ``indices`` given as row numbers or as a bool mask over the rows."""
    indices = torch.as_tensor(indices)
    return indices.nonzero().flatten() if indices.dtype == torch.bool else indices.long()


@dataclass
class PackCheckpoint:
    """What `PackedLayer.crop` needs to take back the block packed last: its first token, its exact keys and
    values (``[batch, heads, tokens, head_dim]``), and the subclass's `packing_state` from before it was packed."""

    start: int
    keys: torch.Tensor
    values: torch.Tensor
    state: Any


class PackedLayer(CacheLayerMixin):
    """One decoder layer: packed history (the subclass's) and the full-precision tail ``keys``/``values``."""

    is_compileable = False
    is_croppable = True
    """`crop` cuts the exact tail, and while past recording is on also the block packed last (see `crop`)."""

    def __init__(self, owner: PackedCache, layer_idx: int, window: int | None = None) -> None:
        super().__init__()
        self.owner = owner
        self.layer_idx = layer_idx
        self.window = window
        """Sliding-window size of the layer's attention (queries see the last ``window`` tokens), or None."""
        self.is_sliding = window is not None
        self.length = 0
        self.offset = 0
        """Tokens before this index are no longer held (a sliding-window layer frees what no query can reach)."""
        self.awaiting_read = 0
        """Tokens of the last update that attention has not read yet (packed once it has)."""
        self._record_past = False
        self._checkpoint: PackCheckpoint | None = None

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

    def select_packed_rows(self, index: torch.Tensor) -> None:
        """Keep batch rows ``index`` of the packed history, bytes as stored (never re-quantized)."""
        raise NotImplementedError(
            f"{type(self.owner).__name__} cannot select batch rows of its packed history, which beam search "
            "and batch expansion need"
        )

    def packing_state(self) -> Any:
        """What packing a block changes besides the tail (statistics, say), taken just before a block is
        packed so that `crop` can take the block back (`rewind_packing`); None when the subclass cannot."""
        return None

    def rewind_packing(self, start: int, state: Any) -> None:
        """Drop the packed blocks from token ``start`` on and put back ``state`` (from `packing_state`)."""
        raise NotImplementedError(f"{type(self.owner).__name__} cannot take packed blocks back")

    @abstractmethod
    def packed_nbytes(self) -> int: ...

    @abstractmethod
    def ledger_packed(self, ledger: MemoryLedger) -> None: ...

    # -- transformers layer API ------------------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self.dtype = key_states.dtype
        tail = self.tail_dtype(key_states, value_states)
        self.keys = key_states.new_zeros((*key_states.shape[:2], 0, key_states.shape[-1]), dtype=tail)
        self.values = value_states.new_zeros((*value_states.shape[:2], 0, value_states.shape[-1]), dtype=tail)
        self.is_initialized = True

    def tail_dtype(self, *new: torch.Tensor) -> torch.dtype:
        """The dtype the exact tail holds the ``new`` tokens' keys and values in: the model's, unless a subclass
        stores them narrower."""
        return new[0].dtype

    def tail_values(self) -> torch.Tensor:
        """The tail's values as attention reads them (``[batch, heads, tail tokens, head_dim]``): the exact ones
        here; a subclass that packs some of them early restores those in front."""
        return self.values

    def _append_tail(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Append to the exact tail in its dtype (moving the tail to a wider one first if the new tokens need it)."""
        dtype = self.tail_dtype(key_states, value_states)
        if dtype != self.keys.dtype:
            self.keys, self.values = self.keys.to(dtype), self.values.to(dtype)
        self.keys = torch.cat([self.keys, key_states.to(dtype)], dim=-2)
        self.values = torch.cat([self.values, value_states.to(dtype)], dim=-2)

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
            self._append_tail(key_states, value_states)
            self.length += n_new
            self.awaiting_read = n_new
            pending_read(self)
            return self.keys, self.tail_values()
        history = self.restore_history()
        self._append_tail(key_states, value_states)
        tail_keys, tail_values = self.keys.to(self.dtype), self.tail_values().to(self.dtype)
        if history is None:
            out_keys, out_values = tail_keys, tail_values
        else:
            out_keys = torch.cat([history[0], tail_keys], dim=-2)
            out_values = torch.cat([history[1], tail_values], dim=-2)
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
        """Remove and return the oldest ``n`` tail tokens (keys, values), about to be packed.

        While past recording is on, an exact copy of them and the subclass's `packing_state` are kept
        (replacing the previous ones), so that `crop` can take this block back exactly.
        """
        keys, values = self.keys[..., :n, :], self.values[..., :n, :]
        state = self.packing_state() if self._record_past else None
        if state is not None:
            self._checkpoint = PackCheckpoint(self.length - self.keys.shape[-2], keys.clone(), values.clone(), state)
        self.keys = self.keys[..., n:, :].clone()
        self.values = self.values[..., n:, :].clone()
        return keys, values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length - self.offset + query_length, self.offset

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.clear_packed()
        self._checkpoint = None
        self.awaiting_read = 0
        self.length = 0
        self.offset = 0
        self.keys = self.values = None
        self.is_initialized = False

    # -- batch rows (beam search, batch expansion) -------------------------------------------------
    # The layer's own rows; the cache's shared tables (positions, statistics) move with the methods of
    # the same name on `PackedCache`, which are the ones transformers calls.
    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.select_rows(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.select_rows(row_index(indices))

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            self.select_rows(torch.arange(self.keys.shape[0]).repeat_interleave(repeats))

    def select_rows(self, index: torch.Tensor) -> None:
        """Keep batch rows ``index`` (any order, repeats allowed) of the packed history and the exact tail.

        Packed blocks are copied row by row as stored, never re-quantized. A crop checkpoint is dropped
        (after a row selection only the exact tail can be cropped).
        """
        if not self.is_initialized:
            return
        index = index.to(self.keys.device)
        self.select_packed_rows(index)
        self.keys = self.keys.index_select(0, index)
        self.values = self.values.index_select(0, index)
        self._checkpoint = None

    # -- cropping (assisted decoding) ----------------------------------------------------------------
    @property
    def record_past(self) -> bool:
        """Whether the block packed last is kept exactly as well, so that `crop` can take it back.

        transformers turns this on for assisted decoding (`activate_past_recording`); it costs one
        chunk of full-precision keys and values per layer (counted as ``crop_checkpoint``).
        """
        return self._record_past

    @record_past.setter
    def record_past(self, on: bool) -> None:
        if on:
            self.check_recording()
        self._record_past = on
        if not on:
            self._checkpoint = None

    def check_recording(self) -> None:
        """Raise (one line) when this layer cannot keep what `crop` needs to take a block back."""

    def activate_past_recording(self) -> None:
        self.record_past = True

    def crop_length(self, tokens_to_remove: int) -> int:
        """The length `crop` leaves (``tokens_to_remove`` < 0 drops that many from the end), or one line why not."""
        if tokens_to_remove > 0:
            raise ValueError(
                f"Calling `crop` with a positive value (`{tokens_to_remove}`) is not supported. "
                "Please use a negative integer to remove that number of tokens from the cache instead."
            )
        keep = max(self.length + tokens_to_remove, 0)
        if not self.is_initialized:
            return keep
        floor = self.length - self.keys.shape[-2]
        if self._checkpoint is not None:
            floor = min(floor, self._checkpoint.start)
        if keep < floor:
            raise ValueError(
                f"{type(self.owner).__name__} cannot crop layer {self.layer_idx} to {keep} tokens: tokens before "
                f"{floor} are packed and cutting into a packed block would re-quantize it; only the full-precision "
                "tail can be cut, and while past recording is on (assisted decoding) the block packed last"
            )
        return keep

    def crop(self, tokens_to_remove: int) -> None:
        """Drop the last ``-tokens_to_remove`` tokens exactly, leaving the layer as if they had never come.

        Tokens in the exact tail are cut. A block packed by the same append as the dropped tokens
        (assisted decoding verifies its candidates in one append, which may fill a chunk) is taken
        back while past recording is on: the block is dropped, the statistics from before it are put
        back and its kept tokens return to the tail with their exact values, so the next append packs
        them bit for bit as a cache that never saw the dropped tokens would. Returning dequantized
        values instead would keep attention's view but not the stored bytes of later blocks (their
        ranges and statistics would differ); anything older than that block is refused (`crop_length`).
        """
        keep = self.crop_length(tokens_to_remove)
        if not self.is_initialized or keep == self.length:
            return
        first = self.length - self.keys.shape[-2]
        keys, values = self.keys, self.values
        if keep < first:
            checkpoint, self._checkpoint = self._checkpoint, None
            self.rewind_packing(checkpoint.start, checkpoint.state)
            keys = torch.cat([checkpoint.keys, keys], dim=-2)
            values = torch.cat([checkpoint.values, values], dim=-2)
            first = checkpoint.start
        self.keys = keys[..., : keep - first, :].clone()
        self.values = values[..., : keep - first, :].clone()
        self.length = keep
        self.pack_tail(0)
        self.owner.layer_updated(self.layer_idx)

    # -- accounting ------------------------------------------------------------------------------
    def _checkpoint_tensors(self) -> tuple[torch.Tensor, ...]:
        return () if self._checkpoint is None else (self._checkpoint.keys, self._checkpoint.values)

    def nbytes(self) -> int:
        return self.packed_nbytes() + tensor_bytes(self.keys, self.values, *self._checkpoint_tensors())

    def ledger(self, ledger: MemoryLedger) -> None:
        self.ledger_packed(ledger)
        ledger.add("full_precision_tail", self.keys, self.values)
        ledger.add("crop_checkpoint", *self._checkpoint_tensors())


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

    def note_reader(self, phase: str, name: str, reason: str | None = None) -> None:
        """Record which reader served a ``phase`` (prefill, decode) call; a fallback's ``reason`` is warned once."""
        self.readers.setdefault(phase, set()).add(name)
        if reason is not None and reason not in self._fallbacks:
            self._fallbacks.add(reason)
            warnings.warn(f"kvstream: {phase} steps read the packed history with the {name}: {reason}", stacklevel=2)

    def note_transient(self, nbytes: int) -> None:
        """Fold working memory that attention holds on top of the stored bytes into the peak."""
        self.peak_stored_bytes = max(self.peak_stored_bytes, self.stored_bytes() + nbytes)

    def _reset_tracking(self) -> None:
        self.positions = torch.zeros(0, 0, dtype=torch.int32)
        self.valid = torch.zeros(0, 0, dtype=torch.bool)
        self._copies: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
        self._padding: torch.Tensor | None = None
        self._current_bytes = [0] * self.num_layers
        self.peak_stored_bytes = 0
        self.readers: dict[str, set[str]] = {}
        """Readers that served the packed history so far, by phase (see `note_reader`)."""
        self._fallbacks: set[str] = set()

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
            self._copies = {}
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

    def tables_on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """``(positions, valid)`` on ``device``: the tables themselves on the device the first layer runs on, and
        for a model spread over devices one copy per further device, extended as tokens arrive, so no layer
        reads another device's memory."""
        if device == self.positions.device:
            return self.positions, self.valid
        copy = self._copies.get(device)
        have = 0 if copy is None else copy[0].shape[1]
        if copy is None or have > self.positions.shape[1]:
            copy = (self.positions.to(device), self.valid.to(device))
        elif have < self.positions.shape[1]:
            new = (self.positions[:, have:].to(device), self.valid[:, have:].to(device))
            copy = (torch.cat([copy[0], new[0]], dim=1), torch.cat([copy[1], new[1]], dim=1))
        self._copies[device] = copy
        return copy

    def layer_updated(self, layer_idx: int) -> None:
        self._current_bytes[layer_idx] = self.layers[layer_idx].nbytes()
        self.peak_stored_bytes = max(self.peak_stored_bytes, self.stored_bytes())

    def shared_tensors(self) -> dict[str, tuple[torch.Tensor | None, ...]]:
        """Tensors the cache holds for all layers together, by kind (the position table and its copies here)."""
        return {"positions": (self.positions, self.valid, *(t for copy in self._copies.values() for t in copy))}

    def stored_bytes(self) -> int:
        """Bytes held right now: every layer's packed history and tail, and the shared tables."""
        return sum(self._current_bytes) + sum(tensor_bytes(*t) for t in self.shared_tensors().values())

    def reset(self) -> None:
        super().reset()
        self._reset_tracking()

    # -- batch rows and cropping, for every generation mode of transformers ------------------------------
    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.select_rows(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.select_rows(row_index(indices))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self.select_rows(torch.arange(self.positions.shape[0]).repeat_interleave(repeats))

    def select_rows(self, index: torch.Tensor) -> None:
        """Keep batch rows ``index`` (any order, repeats allowed) of everything the cache holds per row.

        Every layer's packed blocks (copied row by row as stored) and exact tail, the positions and
        padding; tables built for the old batch are dropped and rebuilt on their next use.
        """
        if self.positions.shape[0] == 0:
            return
        index = index.to(self.positions.device)
        self.positions = self.positions.index_select(0, index)
        self.valid = self.valid.index_select(0, index)
        if self._padding is not None:
            self._padding = self._padding.index_select(0, index.to(self._padding.device))
        for i, layer in enumerate(self.layers):
            layer.select_rows(index)
            self.layer_updated(i)
        self.forget_tables()

    def crop(self, tokens_to_remove: int) -> None:
        """Drop the last ``-tokens_to_remove`` tokens of every layer (see `PackedLayer.crop`); when one layer
        cannot, the cache is left as it was."""
        for layer in self.layers:
            layer.crop_length(tokens_to_remove)
        super().crop(tokens_to_remove)
        length = self.get_seq_length()
        self.positions, self.valid = self.positions[:, :length], self.valid[:, :length]
        self.forget_tables()

    def forget_tables(self) -> None:
        """Drop tables built for the current batch and length (the decode visibility, the position tables'
        copies on other devices); rebuilt on next use."""
        self._last_visibility = None
        self._copies = {}

    def memory_report(self) -> MemoryReport:
        """Bytes of every tensor held, effective bits per cached element, and the ratio to fp16."""
        ledger = MemoryLedger()
        for layer in self.layers:
            layer.ledger(ledger)
        for kind, tensors in self.shared_tensors().items():
            ledger.add(kind, *tensors)
        held, seen = self._element_counts()
        report = ledger.report(held, self.peak_stored_bytes, seen)
        report["layer_types"] = self._layer_type_report()
        report["readers"] = {phase: ", ".join(sorted(names)) for phase, names in sorted(self.readers.items())}
        return report

    def _layer_elements(self, layer: PackedLayer) -> tuple[int, int]:
        """Key and value elements of the tokens ``layer`` holds, and of every token it has seen."""
        if not layer.is_initialized:
            return 0, 0
        b, h, _, d = layer.keys.shape
        return 2 * b * h * d * (layer.length - layer.offset), 2 * b * h * d * layer.length

    def _element_counts(self) -> tuple[int, int]:
        counts = [self._layer_elements(layer) for layer in self.layers]
        return sum(c[0] for c in counts), sum(c[1] for c in counts)

    def _layer_type_report(self) -> dict[str, dict[str, int | float]]:
        """Per kind of layer (full attention, sliding window of W): layers, bytes held, and fp16 bytes of every
        token seen, so the saving of freeing what a window no longer reaches shows beside quantization's."""
        out: dict[str, dict[str, int | float]] = {}
        for i, layer in enumerate(self.layers):
            kind = "full_attention" if layer.window is None else f"sliding_window_{layer.window}"
            entry = out.setdefault(kind, {"layers": 0, "stored_bytes": 0, "fp16_bytes_all_tokens": 0})
            entry["layers"] += 1
            entry["stored_bytes"] += self._current_bytes[i]
            entry["fp16_bytes_all_tokens"] += 2 * self._layer_elements(layer)[1]
        for entry in out.values():
            fp16 = entry["fp16_bytes_all_tokens"]
            entry["ratio_to_fp16"] = entry["stored_bytes"] / fp16 if fp16 else 0.0
        return out
