"""The CPU decode kernel (`csrc/packed_decode.cpp`), built with torch's own C++ extension tooling.

`make setup` builds it (``python -m kvstream.kernels.build``, about a minute); a process that
finds no build for this machine builds it on first use instead. Builds are kept per CPU
instruction set and kernel source (`build_name`) under ``TORCH_EXTENSIONS_DIR`` (by default
``~/.cache/torch_extensions``), so machines sharing a home directory, Ray workers among them,
never load a binary compiled for another CPU, and loading a finished build is one import. The
kernel reads the packed blocks of a streaming layer in one pass: decode, dequantize, rotate,
score, softmax partial and weighted values per block, blocks in parallel. A build that fails
is reported in one line and the reference path runs instead.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import logging
import platform
import sys
import warnings
from pathlib import Path
from typing import Any

import torch

from kvstream.quant.base import QuantizedTensor

SOURCE = Path(__file__).parent / "csrc" / "packed_decode.cpp"
KERNEL_BITS = (2, 3, 4, 8)
META_DTYPES = (torch.float16, torch.float32)
SCALE_DTYPES = (*META_DTYPES, torch.uint8)
"""Scales may also be 8-bit logarithmic codes (`kvstream.quant.scales.log_scale_table`); zero-points may not."""
CFLAGS = ["-O3", "-march=native", "-fopenmp"]
log = logging.getLogger(__name__)


def instruction_set() -> str:
    """What ``-march=native`` compiles for on this machine: architecture, CPU model and feature flags."""
    features = ""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        keys = ("model name", "flags", "Features", "CPU part")
        lines = {line.split(":", 1)[0].strip(): line for line in cpuinfo.read_text().splitlines() if ":" in line}
        features = "\n".join(lines.get(k, "") for k in keys)
    return f"{platform.machine()}\n{platform.processor()}\n{features}"


def build_name() -> str:
    """The extension's name: one per instruction set, kernel source, flags, Python and torch version."""
    digest = hashlib.sha256()
    for part in (instruction_set(), SOURCE.read_text(), " ".join(CFLAGS), sys.version, torch.__version__):
        digest.update(part.encode())
    return f"kvstream_packed_decode_{digest.hexdigest()[:12]}"


def load_built(name: str) -> Any:
    """The finished build of ``name`` imported directly (no compiler or ninja run), or None."""
    from torch.utils.cpp_extension import _get_build_directory

    library = Path(_get_build_directory(name, verbose=False)) / f"{name}.so"
    if not library.exists():
        return None
    spec = importlib.util.spec_from_file_location(name, library)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build() -> Any:
    """Compile the kernel for this machine (or import the finished build); raises when it cannot be built."""
    from torch.utils.cpp_extension import load

    name = build_name()
    return load_built(name) or load(
        name=name, sources=[str(SOURCE)], extra_cflags=CFLAGS, extra_ldflags=["-fopenmp"], verbose=False
    )


@functools.cache
def extension() -> Any:
    """The compiled extension module, or None when it cannot be built here (warned once, in one line)."""
    try:
        return build()
    except Exception as error:  # a missing compiler or headers: the reference path still runs
        warnings.warn(
            f"kvstream CPU kernel unavailable ({failure_reason(error)}); using the reference attention path",
            stacklevel=2,
        )
        return None


def failure_reason(error: Exception) -> str:
    """The first line of a build error (compiler logs run to pages)."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _part_tensors(q: QuantizedTensor | None) -> list[torch.Tensor]:
    empty = torch.empty(0)
    if q is None:
        return [empty, empty, empty]
    return [q.codes, q.scale, q.zero if q.zero is not None else empty]


def level_table(quantizer: Any, part: QuantizedTensor | None) -> torch.Tensor | None:
    """The level table of ``part`` as the kernels take it (fp32; empty for plain uniform codes), or None when
    ``quantizer`` does not declare its packed format or the part needs extras to restore."""
    declare = getattr(quantizer, "level_table", None)
    if part is None:
        return torch.empty(0)
    if declare is None or part.extra:
        return None
    table = declare(part.bits)
    return torch.empty(0) if table is None else table.float().contiguous()


def _store_args(store: Any, quantizer: Any) -> tuple[list[torch.Tensor], list[torch.Tensor], list[int]]:
    """Tensors, level tables and (bits, units) of a `SplitStore` as the kernel takes them."""
    tensors = _part_tensors(store.high) + _part_tensors(store.low)
    tensors.append(store.position if store.position is not None else torch.empty(0, dtype=torch.int16))
    tables = [level_table(quantizer, part) for part in (store.high, store.low)]
    meta = []
    for part in (store.high, store.low):
        meta += [0, 0] if part is None else [part.bits, part.shape[3]]
    return tensors, tables, meta


def store_supported(store: Any, quantizer: Any) -> bool:
    """True when every part of a `SplitStore` is packed codes of a width the kernel decodes, in a format
    ``quantizer`` declares (uniform or a level table), with fp16 or fp32 metadata (scales also 8-bit codes)."""
    parts = [p for p in (store.high, store.low) if p is not None]
    return all(
        p.bits in KERNEL_BITS
        and level_table(quantizer, p) is not None
        and p.scale is not None
        and p.scale.dtype in SCALE_DTYPES
        and (p.zero is None or p.zero.dtype in META_DTYPES)
        for p in parts
    )


def group_args(layer: Any, groups_: list[Any] | None = None) -> tuple[list[list[torch.Tensor]], list[list[int]]]:
    """Block groups of a streaming layer (all by default) as the kernel takes them (tensors, then integers)."""
    owner = layer.owner
    rope = owner.block_rope(layer) if owner.config.key_rope == "pre" else None
    tables = owner.tables_on(layer.keys.device) if rope is not None else None
    groups, meta = [], []
    for group in layer.groups if groups_ is None else groups_:
        key_tensors, key_tables, key_meta = _store_args(group.keys, owner.quantizer)
        value_tensors, value_tables, value_meta = _store_args(group.values, owner.value_quantizer)
        values = group.values.low if group.values.low is not None else group.values.high
        keys = group.keys.low if group.keys.low is not None else group.keys.high
        tensors = key_tensors + value_tensors + key_tables + value_tables
        if rope is not None:
            tensors += rope.group_tables(group.start, group.block_len, group.n_blocks, *tables)
        groups.append(tensors)
        meta.append(
            [group.n_blocks, group.block_len, group.start, *key_meta, *value_meta, values.shape[-1], keys.shape[4]]
        )
    return groups, meta


def decode_attention(
    layer: Any, q: torch.Tensor, visible: torch.Tensor, exact: list[list[torch.Tensor]]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(acc, m, l)`` of grouped queries ``q`` over every packed block of ``layer`` (tokens of ``visible``) and
    the ``exact`` fp32 segments ``[keys, values, visible]``, merged in the kernel. The blocks' arguments are
    gathered once per set of block groups (groups are replaced, never edited)."""
    from kvstream.kernels import per_groups

    groups, meta = per_groups(layer, "cpu arguments", lambda: group_args(layer))
    return extension().packed_decode(q, groups, meta, visible, exact)


def restore_blocks(layer: Any, group: Any, first: int, last: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Blocks ``first:last`` of ``group`` in fp32, keys as attention sees them (sink slots not yet pasted)."""
    tensors, meta = group_args(layer, [group])
    b, h, _, d = layer.keys.shape
    return extension().restore_blocks(tensors[0], meta[0], b, h, d, first, last)
