"""The quantizer interface and the packed tensor every quantizer returns."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch

from kvstream.quant.packing import pack, packed_nbytes, unpack


def tensor_bytes(*tensors: torch.Tensor | None) -> int:
    """Bytes held by the given tensors (``None`` counts as nothing)."""
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


@dataclass
class QuantizedTensor:
    """A tensor as stored: packed codes plus the per-block metadata needed to restore it.

    ``bits == 16`` means kept as is: ``codes`` is then the original tensor. ``extra`` holds any
    further tensors a quantizer needs (a codebook, for instance); they are counted in `nbytes`.
    """

    codes: torch.Tensor
    bits: int
    shape: tuple[int, ...]
    dtype: torch.dtype
    scale: torch.Tensor | None = None
    zero: torch.Tensor | None = None
    extra: dict[str, torch.Tensor] = field(default_factory=dict)

    def copy(self) -> QuantizedTensor:
        """The same tensor in storage of its own (a slice of a larger one then lets the rest be freed)."""
        return QuantizedTensor(
            codes=self.codes.clone(),
            bits=self.bits,
            shape=self.shape,
            dtype=self.dtype,
            scale=None if self.scale is None else self.scale.clone(),
            zero=None if self.zero is None else self.zero.clone(),
            extra={name: t.clone() for name, t in self.extra.items()},
        )

    def nbytes(self) -> int:
        """Bytes of every tensor held: codes, scales, zero-points and extras."""
        return tensor_bytes(self.codes, self.scale, self.zero, *self.extra.values())

    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    def blocks(self, first: int, last: int) -> QuantizedTensor:
        """Blocks ``first:last`` of the leading dimension, as views of the stored bytes (no copy).

        Every block must start on a byte boundary (true of any tensor built by `concat_blocks`);
        tensors with extras are only ever whole.
        """
        if (first, last) == (0, self.shape[0]):
            return self
        if self.extra:
            raise ValueError("a quantized tensor with extras cannot be sliced into blocks")
        per_block = self.numel() // self.shape[0]
        if self.bits == 16:
            codes = self.codes[first:last]
        else:
            if (per_block * self.bits) % 8:
                raise ValueError(f"{self.bits}-bit blocks of {per_block} codes do not end on a byte boundary")
            step = per_block * self.bits // 8
            codes = self.codes[first * step : last * step]
        return QuantizedTensor(
            codes=codes,
            bits=self.bits,
            shape=(last - first, *self.shape[1:]),
            dtype=self.dtype,
            scale=None if self.scale is None else self.scale[first:last],
            zero=None if self.zero is None else self.zero[first:last],
        )

    def select_rows(self, dim: int, index: torch.Tensor) -> QuantizedTensor:
        """Rows ``index`` (any order, repeats allowed) of batch dimension ``dim``, codes copied as stored.

        Nothing is re-quantized: a row whose packed codes start on a byte boundary is a byte range,
        copied as it is; otherwise the integer codes are unpacked, selected and packed again (the
        same codes). Scales and zero-points keep the tensor's rank (one entry per reduced slice), so
        they are selected on the same dimension, as are extras laid out per slice; extras shared by every row
        (a codebook) are kept.
        """
        index = index.to(self.codes.device)
        shape = (*self.shape[:dim], index.numel(), *self.shape[dim + 1 :])
        if self.bits == 16:
            codes = self.codes.index_select(dim, index)
        else:
            outer = math.prod(self.shape[:dim])
            row_bits = math.prod(self.shape[dim + 1 :]) * self.bits
            if row_bits % 8 == 0:
                codes = self.codes.view(outer, self.shape[dim], row_bits // 8).index_select(1, index).reshape(-1)
            else:
                codes = unpack(self.codes, self.bits, self.numel()).view(self.shape).index_select(dim, index)
                codes = pack(codes, self.bits)
        return QuantizedTensor(
            codes=codes,
            bits=self.bits,
            shape=shape,
            dtype=self.dtype,
            scale=None if self.scale is None else self.scale.index_select(dim, index.to(self.scale.device)),
            zero=None if self.zero is None else self.zero.index_select(dim, index.to(self.zero.device)),
            extra={name: self._select_extra(name, t, dim, index) for name, t in self.extra.items()},
        )

    def _select_extra(self, name: str, tensor: torch.Tensor, dim: int, index: torch.Tensor) -> torch.Tensor:
        """An extra laid out per slice (levels fitted per slice) follows the rows; a shared one (a codebook) stays."""
        if name.startswith("sparse_"):
            raise NotImplementedError(
                "sparse outlier entries are indexed over the whole block: rows cannot be selected"
            )
        if tensor.dim() > dim and tensor.shape[dim] == self.shape[dim] and tensor.dim() >= len(self.shape):
            return tensor.index_select(dim, index.to(tensor.device))
        return tensor


@runtime_checkable
class Quantizer(Protocol):
    """Turns a tensor into a `QuantizedTensor` and back.

    ``dim`` names the dimension(s) over which one scale (and zero-point) is shared: the token
    dimension for per-channel keys, the group's channel dimension for per-token values.
    ``mask`` (broadcastable to ``x``, True = counted) keeps padding and sink tokens out of the
    range; masked entries are still encoded (clamped into the range).
    """

    def quantize(
        self,
        x: torch.Tensor,
        bits: int,
        dim: int | tuple[int, ...],
        symmetric: bool = False,
        mask: torch.Tensor | None = None,
    ) -> QuantizedTensor: ...

    def dequantize(self, q: QuantizedTensor) -> torch.Tensor: ...


# A quantizer may also declare its packed format, which gives it the fused readers (`kvstream.kernels`):
#     def level_table(self, bits: int) -> torch.Tensor | None
# None: plain uniform codes (value = code * scale + zero, or (code - levels) * scale when symmetric);
# a table of 2**bits levels: value = table[code] * scale + zero (no zero-point: table[code] * scale).
# A tensor whose codes need extras to restore is never described by a table. Without the method the
# quantizer's caches are read by the reference tiles.


def passthrough(x: torch.Tensor) -> QuantizedTensor:
    """The 16-bit case: the tensor kept as is (shared by every quantizer)."""
    return QuantizedTensor(codes=x.contiguous(), bits=16, shape=tuple(x.shape), dtype=x.dtype)


def token_slice(q: QuantizedTensor, dim: int, start: int, stop: int) -> QuantizedTensor:
    """Entries ``start:stop`` of dimension ``dim`` (metadata laid out per slice, reduced along another dimension),
    the same codes packed again."""
    if q.extra:
        raise ValueError("a quantized tensor with extras cannot be cut along its entries")
    codes = unpack(q.codes, q.bits, q.numel()).view(q.shape).narrow(dim, start, stop - start)
    return QuantizedTensor(
        codes=pack(codes.contiguous(), q.bits),
        bits=q.bits,
        shape=tuple(codes.shape),
        dtype=q.dtype,
        scale=None if q.scale is None else q.scale.narrow(dim, start, stop - start).clone(),
        zero=None if q.zero is None else q.zero.narrow(dim, start, stop - start).clone(),
    )


def join_along(parts: list[QuantizedTensor], dim: int) -> QuantizedTensor:
    """Tensors of one width joined along dimension ``dim``, the same codes packed together; metadata of different
    dtypes is joined as the fp32 values it stands for (`kvstream.quant.scales.decode_scale`)."""
    from kvstream.quant.scales import decode_scale

    first = parts[0]
    if any(p.extra or p.bits != first.bits for p in parts):
        raise ValueError("only tensors of one width and no extras can be joined")
    codes = torch.cat([unpack(p.codes, p.bits, p.numel()).view(p.shape) for p in parts], dim=dim)

    def joined(tensors: list[torch.Tensor | None], decode: Any) -> torch.Tensor | None:
        if tensors[0] is None:
            return None
        if len({t.dtype for t in tensors}) > 1:
            tensors = [decode(t) for t in tensors]
        return torch.cat(tensors, dim=dim)

    return QuantizedTensor(
        codes=pack(codes, first.bits),
        bits=first.bits,
        shape=tuple(codes.shape),
        dtype=first.dtype,
        scale=joined([p.scale for p in parts], decode_scale),
        zero=joined([p.zero for p in parts], lambda t: t.float()),
    )


def concat_blocks(first: QuantizedTensor, second: QuantizedTensor) -> QuantizedTensor | None:
    """Two tensors stacked along their leading (block) dimension, bytes copied unchanged.

    Possible when widths, dtypes (of codes and metadata) and trailing shapes agree, no extras are held and the first
    tensor's packed codes end on a byte boundary; otherwise None (keep them apart).
    """
    if (
        first.bits != second.bits
        or first.dtype != second.dtype
        or first.shape[1:] != second.shape[1:]
        or first.extra
        or second.extra
        or (first.scale is None) != (second.scale is None)
        or (first.zero is None) != (second.zero is None)
        or (first.scale is not None and first.scale.dtype != second.scale.dtype)
        or (first.zero is not None and first.zero.dtype != second.zero.dtype)
    ):
        return None
    if first.bits != 16 and packed_nbytes(first.numel(), first.bits) * 8 != first.numel() * first.bits:
        return None
    return QuantizedTensor(
        codes=torch.cat([first.codes, second.codes]),
        bits=first.bits,
        shape=(first.shape[0] + second.shape[0], *first.shape[1:]),
        dtype=first.dtype,
        scale=None if first.scale is None else torch.cat([first.scale, second.scale]),
        zero=None if first.zero is None else torch.cat([first.zero, second.zero]),
    )
