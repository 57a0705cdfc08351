"""Packed storage of blocks of keys or values, with outlier units at high precision.

Blocks are ``[blocks, batch, heads, units, tokens, unit_size]`` (unit-major, so the units of a
block are contiguous rows and restoring an outlier split is a row selection): for per-channel keys a unit is
one channel (size 1) and the scale is shared over a block's tokens; for per-token values a unit is
a group of channels and the scale is shared over the group. The outlier units flagged per
(batch, head) are stored at the high bit width, the rest at the normal one. Consecutive blocks
with the same layout are concatenated byte for byte (`SplitStore.concat`), so reading a long
history costs a few large operations rather than many small ones; nothing is re-quantized.
Sink tokens live in their own high-precision `SinkStore`; readers paste their kept copies over a block.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvstream.quant.base import QuantizedTensor, Quantizer, concat_blocks, join_along, tensor_bytes, token_slice


def _unit_index(mask: torch.Tensor, first: bool, width: int) -> torch.Tensor:
    """Per (batch, head): the units where ``mask == first``, ascending, padded to ``width`` with the dummy N."""
    n = mask.shape[-1]
    chosen = mask if first else ~mask
    order = (~chosen).to(torch.int8).argsort(dim=-1, stable=True)[..., :width]
    rank = torch.arange(width, device=mask.device)
    return order.masked_fill(rank >= chosen.sum(-1, keepdim=True), n)


def _with_dummy(x: torch.Tensor) -> torch.Tensor:
    """``x`` ([S, B, H, N, T, U]) with one zero unit appended at index N, the target of padded indices."""
    return torch.cat([x, x.new_zeros(*x.shape[:3], 1, *x.shape[4:])], dim=3)


def _select_units(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x[s, b, h, index[s, b, h, k]]`` for ``x`` [S, B, H, N, T, U]: whole unit rows, one index_select."""
    s, b, h, n = x.shape[:4]
    base = torch.arange(s * b * h, device=x.device).view(s, b, h, 1) * n
    rows = (base + index.long()).reshape(-1)
    return x.reshape(s * b * h * n, -1).index_select(0, rows).view(*index.shape, *x.shape[4:])


def slot_dtype(units: int) -> torch.dtype:
    """The narrowest integer type of a slot table: slots run below ``2 * units`` (either part may pad with the
    dummy unit), so one byte per unit up to 128 units, else two."""
    return torch.uint8 if 2 * units <= 256 else torch.int16


@dataclass
class SplitStore:
    """One block's keys or values: high-precision units and normal units, both packed.

    Each (batch row, head) keeps its own outlier set; rows with fewer outliers pad with a dummy
    unit, so a row is stored exactly as it would be in a batch of one. ``position`` maps every
    unit to its slot in ``high ++ low``, so restoring is one concatenation and one gather.
    """

    high: QuantizedTensor | None
    low: QuantizedTensor | None
    position: torch.Tensor | None
    """[S, B, H, N] (`slot_dtype`): slot of each unit in the concatenation of the high and low parts."""

    @classmethod
    def build(
        cls,
        x: torch.Tensor,
        outliers: torch.Tensor,
        bits_high: int,
        bits_low: int,
        reduce_dim: int,
        symmetric: bool,
        quantizer: Quantizer,
        mask: torch.Tensor | None,
    ) -> SplitStore:
        """Quantize one block ``x`` ([1, B, H, N, T, U]); units flagged in ``outliers`` ([B, H, N]) go high."""
        units = x.shape[3]
        counts = outliers.sum(-1)
        n_high, n_low = int(counts.max()), units - int(counts.min())
        if n_high == 0 or bits_high == bits_low:
            return cls(high=None, low=quantizer.quantize(x, bits_low, reduce_dim, symmetric, mask), position=None)
        padded = _with_dummy(x)
        high_index = _unit_index(outliers, True, n_high).unsqueeze(0)
        low_index = _unit_index(outliers, False, n_low).unsqueeze(0)
        high = quantizer.quantize(_select_units(padded, high_index), bits_high, reduce_dim, symmetric, mask)
        low = None
        if n_low:
            low = quantizer.quantize(_select_units(padded, low_index), bits_low, reduce_dim, symmetric, mask)
        slots = torch.cat([high_index, low_index], dim=-1)
        position = torch.zeros(*slots.shape[:-1], units + 1, dtype=torch.long, device=x.device)
        position.scatter_(-1, slots, torch.arange(slots.shape[-1], device=x.device).expand_as(slots))
        return cls(high=high, low=low, position=position[..., :units].to(slot_dtype(units)))

    @property
    def n_high(self) -> int:
        return 0 if self.high is None else self.high.shape[3]

    def concat(self, other: SplitStore) -> SplitStore | None:
        """This store followed by ``other`` (same layout) as one store, bytes copied as they are; else None."""
        if (self.high is None) != (other.high is None) or (self.low is None) != (other.low is None):
            return None
        parts = []
        for mine, theirs in ((self.high, other.high), (self.low, other.low)):
            joined = None if mine is None else concat_blocks(mine, theirs)
            if mine is not None and joined is None:
                return None
            parts.append(joined)
        position = None if self.position is None else torch.cat([self.position, other.position])
        return SplitStore(high=parts[0], low=parts[1], position=position)

    def blocks(self, first: int, last: int) -> SplitStore:
        """Blocks ``first:last`` of this store, as views (see `QuantizedTensor.blocks`)."""
        return SplitStore(
            high=None if self.high is None else self.high.blocks(first, last),
            low=None if self.low is None else self.low.blocks(first, last),
            position=None if self.position is None else self.position[first:last],
        )

    def tokens(self, start: int, stop: int) -> SplitStore:
        """Tokens ``start:stop`` of a one-block store ([1, B, H, N, T, U]), the same codes packed again."""
        return SplitStore(
            high=None if self.high is None else token_slice(self.high, 4, start, stop),
            low=None if self.low is None else token_slice(self.low, 4, start, stop),
            position=self.position,
        )

    @staticmethod
    def join_tokens(stores: list[SplitStore]) -> SplitStore:
        """One-block stores of the same units and widths joined along their tokens into one block, the same codes
        packed together (see `kvstream.quant.base.join_along`)."""
        first = stores[0]
        if any(
            (s.position is None) != (first.position is None)
            or (s.position is not None and not torch.equal(s.position, first.position))
            for s in stores
        ):
            raise ValueError("stores with different outlier units cannot be joined into one block")
        return SplitStore(
            high=None if first.high is None else join_along([s.high for s in stores], 4),
            low=None if first.low is None else join_along([s.low for s in stores], 4),
            position=first.position,
        )

    def copy(self) -> SplitStore:
        """The same store in storage of its own (see `QuantizedTensor.copy`)."""
        return SplitStore(
            high=None if self.high is None else self.high.copy(),
            low=None if self.low is None else self.low.copy(),
            position=None if self.position is None else self.position.clone(),
        )

    def select_rows(self, index: torch.Tensor) -> SplitStore:
        """Batch rows ``index`` of every block, each row's codes, scales and unit layout as stored."""
        return SplitStore(
            high=None if self.high is None else self.high.select_rows(1, index),
            low=None if self.low is None else self.low.select_rows(1, index),
            position=None if self.position is None else self.position.index_select(1, index.to(self.position.device)),
        )

    def high_units(self) -> torch.Tensor:
        """[S, B, H, N] bool: the units stored at the high bit width."""
        if self.position is None:
            return torch.zeros(0, dtype=torch.bool)
        return self.position < self.n_high

    def restore(self, quantizer: Quantizer) -> torch.Tensor:
        """The dequantized blocks, [S, B, H, N, T, U], in a fresh tensor (sinks are pasted into it)."""
        if self.high is None:
            out = quantizer.dequantize(self.low)
            return out.clone() if out.data_ptr() == self.low.codes.data_ptr() else out
        parts = [quantizer.dequantize(self.high)]
        if self.low is not None:
            parts.append(quantizer.dequantize(self.low))
        return _select_units(torch.cat(parts, dim=3), self.position)

    def nbytes(self) -> int:
        packed = sum(q.nbytes() for q in (self.high, self.low) if q is not None)
        return packed + tensor_bytes(self.position)


@dataclass
class SinkStore:
    """Attention-sink tokens of one block at high precision, per token, with their slot indices."""

    keys: QuantizedTensor
    values: QuantizedTensor
    slots: torch.Tensor
    """[B, S] int16: the token's index inside the block, -1 where a row has fewer sinks."""

    @classmethod
    def build(
        cls,
        keys: torch.Tensor,
        values: torch.Tensor,
        sink_mask: torch.Tensor,
        key_bits: int,
        value_bits: int,
        key_symmetric: bool,
        value_symmetric: bool,
        quantizer: Quantizer,
    ) -> SinkStore | None:
        """Gather the tokens of ``sink_mask`` ([B, T]) out of ``keys``/``values`` ([B, H, T, D])."""
        count = int(sink_mask.sum(dim=1).max())
        if count == 0:
            return None
        order = sink_mask.to(torch.int8).argsort(dim=1, descending=True, stable=True)[:, :count]
        slots = order.sort(dim=1).values
        idx = slots[:, None, :, None].expand(-1, keys.shape[1], -1, keys.shape[-1])
        # rows with fewer sinks pad with -1: nothing is pasted there
        present = sink_mask.gather(1, slots)
        return cls(
            keys=quantizer.quantize(keys.gather(2, idx), key_bits, -1, key_symmetric),
            values=quantizer.quantize(values.gather(2, idx), value_bits, -1, value_symmetric),
            slots=slots.masked_fill(~present, -1).to(torch.int16),
        )

    def select_rows(self, index: torch.Tensor) -> SinkStore:
        """Batch rows ``index`` of the sink copies and their slots, as stored."""
        return SinkStore(
            keys=self.keys.select_rows(0, index),
            values=self.values.select_rows(0, index),
            slots=self.slots.index_select(0, index.to(self.slots.device)),
        )

    def nbytes(self) -> int:
        return self.keys.nbytes() + self.values.nbytes() + tensor_bytes(self.slots)
