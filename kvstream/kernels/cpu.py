"""The CPU decode kernel (`csrc/packed_decode.cpp`), built with torch's own C++ extension tooling.

It is compiled on first use (about a minute, once per machine: torch keeps the build under
``TORCH_EXTENSIONS_DIR``, by default ``~/.cache/torch_extensions``) and reads the packed blocks of
a streaming layer in one pass: decode, dequantize, rotate, score, softmax partial and weighted
values per block, blocks in parallel. A build that fails is reported once and the reference
path runs instead.
"""

from __future__ import annotations

import functools
import logging
import warnings
from pathlib import Path
from typing import Any

import torch

from kvstream.quant.base import QuantizedTensor

SOURCE = Path(__file__).parent / "csrc" / "packed_decode.cpp"
KERNEL_BITS = (2, 3, 4, 8)
log = logging.getLogger(__name__)


@functools.cache
def extension() -> Any:
    """The compiled extension module, or None when it cannot be built here (warned once)."""
    from torch.utils.cpp_extension import load

    try:
        return load(
            name="kvstream_packed_decode",
            sources=[str(SOURCE)],
            extra_cflags=["-O3", "-march=native", "-fopenmp"],
            extra_ldflags=["-fopenmp"],
            verbose=False,
        )
    except Exception as error:  # a missing compiler or headers: the reference path still runs
        warnings.warn(f"kvstream CPU kernel unavailable, using the reference attention path: {error}", stacklevel=2)
        return None


def _part_tensors(q: QuantizedTensor | None) -> list[torch.Tensor]:
    empty = torch.empty(0)
    if q is None:
        return [empty, empty, empty]
    return [q.codes, q.scale, q.zero if q.zero is not None else empty]


def _store_args(store: Any) -> tuple[list[torch.Tensor], list[int]]:
    """Tensors and (bits, units) of a `SplitStore` as the kernel takes them."""
    tensors = _part_tensors(store.high) + _part_tensors(store.low)
    tensors.append(store.position if store.position is not None else torch.empty(0, dtype=torch.int16))
    meta = []
    for part in (store.high, store.low):
        meta += [0, 0] if part is None else [part.bits, part.shape[3]]
    return tensors, meta


def store_supported(store: Any) -> bool:
    """True when every part of a `SplitStore` is plain packed codes of a width the kernel decodes."""
    parts = [p for p in (store.high, store.low) if p is not None]
    return all(p.bits in KERNEL_BITS and not p.extra and p.scale is not None for p in parts)


def group_args(layer: Any, groups_: list[Any] | None = None) -> tuple[list[list[torch.Tensor]], list[list[int]]]:
    """Block groups of a streaming layer (all by default) as the kernel takes them (tensors, then integers)."""
    owner = layer.owner
    rope = owner.block_rope(layer) if owner.config.key_rope == "pre" else None
    chunk = owner.config.chunk_size
    groups, meta = [], []
    for group in layer.groups if groups_ is None else groups_:
        key_tensors, key_meta = _store_args(group.keys)
        value_tensors, value_meta = _store_args(group.values)
        values = group.values.low if group.values.low is not None else group.values.high
        tensors = key_tensors + value_tensors
        if rope is not None:
            blocks = slice(group.start // chunk, group.start // chunk + group.n_blocks)
            tensors += [*rope.offsets, rope.base_cos[blocks].contiguous(), rope.base_sin[blocks].contiguous()]
        groups.append(tensors)
        meta.append([group.n_blocks, group.block_len, group.start, *key_meta, *value_meta, values.shape[-1]])
    return groups, meta


def decode_attention(
    layer: Any, q: torch.Tensor, visible: torch.Tensor, exact: list[list[torch.Tensor]]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(acc, m, l)`` of grouped queries ``q`` over every packed block of ``layer`` (tokens of ``visible``)
    and the ``exact`` fp32 segments ``[keys, values, visible]``, merged in the kernel."""
    groups, meta = group_args(layer)
    return extension().packed_decode(q, groups, meta, visible, exact)


def restore_blocks(layer: Any, group: Any, first: int, last: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Blocks ``first:last`` of ``group`` in fp32, keys as attention sees them (sink slots not yet pasted)."""
    tensors, meta = group_args(layer, [group])
    b, h, _, d = layer.keys.shape
    return extension().restore_blocks(tensors[0], meta[0], b, h, d, first, last)
