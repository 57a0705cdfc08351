"""Non-uniform (lookup-table) quantization of normalised values, after KVQuant (Hooper et al., 2024).

Each scale group (the slice of ``x`` over ``dim``) is mapped onto [-1, 1]: asymmetric groups map
their [min, max] onto it (fp16 ``zero`` = mid-range, fp16 ``scale`` = half-range), symmetric ones
divide by the absolute maximum. Every normalised value is then replaced by the index of the
nearest of the ``2**bits`` entries of a lookup table, and the indices are bit-packed densely.

The table is fitted by one-dimensional k-means (Lloyd's algorithm) on normalised samples. With no
calibration data the default tables are fitted, once per process and bit width, on a fixed-seed
synthetic sample: groups of 64 values drawn half from a standard normal and half from a Student-t
with 3 degrees of freedom, each group normalised as above. `CodebookQuantizer.from_calibration`
fits the tables on real activations instead; `save` / `load` (or the ``KVSTREAM_CODEBOOK``
environment variable naming a saved file) make such tables the ones a by-name construction uses.
KVQuant weights its k-means by Fisher information and keeps one table per layer; this quantizer is
unweighted and keeps one table per bit width, shared by keys and values.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from kvstream.quant.base import QuantizedTensor, passthrough
from kvstream.quant.packing import pack, unpack
from kvstream.quant.uniform import masked_range

ENV_TABLES = "KVSTREAM_CODEBOOK"
"""Environment variable: path of a file written by `CodebookQuantizer.save`, used as the default tables."""

FITTED_BITS = (1, 2, 3, 4, 5, 6, 7)
"""Bit widths whose tables are fitted by k-means; 8 bits use a uniform table, 16 bits pass through."""

_EPS = 2.0**-24
"""Smallest scale kept: the smallest positive fp16 (a smaller one would round to 0)."""
_MAX_FIT_SAMPLES = 262_144
_SYNTHETIC_SEED = 20240131
_SYNTHETIC_GROUPS = 4096
_SYNTHETIC_GROUP_SIZE = 64


@dataclass
class KMeansResult:
    """A fitted table (ascending) and the mean squared distortion before each update and at the end."""

    table: torch.Tensor
    distortions: list[float] = field(default_factory=list)
    iterations: int = 0


def _assign(samples: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Index of the nearest entry of the ascending ``table`` for every sample (ties go to the lower entry).

    The index is the number of midpoints between neighbouring entries that lie below the sample;
    for small tables counting them one midpoint at a time is faster than a binary search.
    """
    midpoints = (table[1:] + table[:-1]) / 2
    if midpoints.numel() > 15:
        return torch.bucketize(samples, midpoints, right=False)
    index = torch.zeros_like(samples, dtype=torch.uint8)
    for m in midpoints.tolist():
        index += samples > m
    return index


def kmeans_1d(samples: torch.Tensor, levels: int, max_iter: int = 100, tol: float = 1e-7) -> KMeansResult:
    """Lloyd's algorithm in one dimension: ``levels`` centroids minimising the mean squared error.

    Initialised at evenly spaced quantiles of the samples; each iteration assigns every sample to
    its nearest centroid and moves each centroid to the mean of its samples (a centroid left with no
    sample stays where it is). Neither step can increase the distortion, so the recorded
    distortions are non-increasing (up to float64 rounding). Stops when the relative improvement
    falls below ``tol`` or after ``max_iter`` iterations.

    The samples are sorted once, so a cluster is a contiguous run: its count, sum and sum of
    squares come from prefix sums, and an iteration costs ``O(levels * log(n))``.
    """
    if levels < 1:
        raise ValueError(f"levels must be at least 1, got {levels}")
    x = samples.detach().reshape(-1).to(torch.float64)
    x = x[torch.isfinite(x)]
    n = x.numel()
    if n == 0:
        raise ValueError("cannot fit a codebook on an empty (or non-finite) sample")
    x, _ = x.sort()
    zero = x.new_zeros(1)
    csum = torch.cat([zero, x.cumsum(0)])
    csq = torch.cat([zero, (x * x).cumsum(0)])
    probs = (torch.arange(levels, dtype=torch.float64) + 0.5) / levels
    table = x[(probs * (n - 1)).round().long()].clone()

    def clusters(table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
        # samples in (mid[k-1], mid[k]] belong to level k, as `_assign` decides
        mids = (table[1:] + table[:-1]) / 2
        edges = torch.cat([torch.tensor([0]), torch.searchsorted(x, mids, right=True), torch.tensor([n])])
        counts = (edges[1:] - edges[:-1]).to(torch.float64)
        sums = csum[edges[1:]] - csum[edges[:-1]]
        squares = csq[edges[1:]] - csq[edges[:-1]]
        error = (squares - 2 * table * sums + counts * table * table).sum().clamp_min(0)
        return counts, sums, float(error) / n

    result = KMeansResult(table=table)
    previous = None
    for it in range(max_iter):
        counts, sums, distortion = clusters(table)
        result.distortions.append(distortion)
        if previous is not None and previous - distortion <= tol * max(previous, 1e-30):
            result.iterations = it
            break
        previous = distortion
        table = torch.where(counts > 0, sums / counts.clamp_min(1), table).sort().values
    else:
        result.distortions.append(clusters(table)[2])
        result.iterations = max_iter
    result.table = table
    return result


def normalise(
    x: torch.Tensor, dim: int | tuple[int, ...], symmetric: bool = False, mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(normalised, scale, zero)``: ``x`` mapped onto [-1, 1] per slice over ``dim`` (fp16 scale / zero).

    ``mask`` (True = counted) keeps entries out of the range exactly as `UniformQuantizer` does; the
    entries it leaves out may fall outside [-1, 1] and are clamped when encoded.
    """
    xf = x.float()
    lo, hi = masked_range(xf, dim, mask)
    if symmetric:
        scale = torch.maximum(lo.abs(), hi.abs()).clamp_min(_EPS).half()
        return xf / scale.float(), scale, None
    scale = ((hi - lo) / 2).clamp_min(_EPS).half()
    zero = ((hi + lo) / 2).half()
    return (xf - zero.float()) / scale.float(), scale, zero


def uniform_table(bits: int) -> torch.Tensor:
    """``2**bits`` evenly spaced levels spanning [-1, 1]."""
    return torch.linspace(-1.0, 1.0, 1 << bits, dtype=torch.float64)


@functools.lru_cache(maxsize=2)
def synthetic_sample(seed: int = _SYNTHETIC_SEED) -> torch.Tensor:
    """The fixed calibration stand-in: normalised groups of a normal / Student-t(3) mixture."""
    g = torch.Generator().manual_seed(seed)
    shape = (_SYNTHETIC_GROUPS, _SYNTHETIC_GROUP_SIZE)
    normal = torch.randn(shape, generator=g, dtype=torch.float64)
    # Student-t(3) = N(0, 1) / sqrt(chi2(3) / 3), with chi2(3) a sum of three squared normals
    chi2 = (torch.randn((*shape, 3), generator=g, dtype=torch.float64) ** 2).sum(-1)
    student = torch.randn(shape, generator=g, dtype=torch.float64) / torch.sqrt(chi2 / 3)
    pick = torch.rand(shape, generator=g) < 0.5
    mixture = torch.where(pick, normal, student)
    return normalise(mixture, dim=-1)[0].reshape(-1)


_DEFAULT_TABLES: dict[int, torch.Tensor] = {}


def default_table(bits: int) -> torch.Tensor:
    """The default fp16 table for ``bits`` (fitted on first use, then kept for the process)."""
    if bits not in _DEFAULT_TABLES:
        if bits in FITTED_BITS:
            table = kmeans_1d(synthetic_sample(), 1 << bits).table
        elif bits == 8:
            table = uniform_table(8)
        else:
            raise ValueError(f"codebook quantizer: no table for {bits} bits (1-8, or 16 to keep as is)")
        _DEFAULT_TABLES[bits] = table.to(torch.float16)
    return _DEFAULT_TABLES[bits]


class CodebookQuantizer:
    """Non-uniform lookup-table quantizer (KVQuant-style k-means levels on normalised values), packed codes."""

    def __init__(self, tables: dict[int, torch.Tensor] | None = None) -> None:
        """``tables``: bit width -> ascending table of ``2**bits`` levels in [-1, 1]; missing widths use the defaults.

        With no ``tables``, a file named by the ``KVSTREAM_CODEBOOK`` environment variable is loaded
        if set, so that calibrated tables reach caches that build their quantizer by name.
        """
        if tables is None and os.environ.get(ENV_TABLES):
            tables = _read_tables(os.environ[ENV_TABLES])
        self.tables: dict[int, torch.Tensor] = {}
        for bits, table in (tables or {}).items():
            self.tables[int(bits)] = _check_table(int(bits), table)

    # -- the tables ----------------------------------------------------------------------------------
    def table(self, bits: int) -> torch.Tensor:
        """The fp16 table used for ``bits``."""
        return self.tables[bits] if bits in self.tables else default_table(bits)

    @staticmethod
    def fit(samples: torch.Tensor, bits: int, max_iter: int = 100) -> torch.Tensor:
        """A ``2**bits``-level table fitted by 1-D k-means on already normalised ``samples`` (float32, ascending)."""
        if not 1 <= bits <= 8:
            raise ValueError(f"codebook quantizer: cannot fit a {bits}-bit table (1-8 bits)")
        x = samples.detach().reshape(-1)
        if x.numel() > _MAX_FIT_SAMPLES:
            g = torch.Generator().manual_seed(0)
            x = x[torch.randperm(x.numel(), generator=g)[:_MAX_FIT_SAMPLES]]
        return kmeans_1d(x, 1 << bits, max_iter=max_iter).table.to(torch.float32)

    @classmethod
    def from_calibration(
        cls,
        tensors: torch.Tensor | Iterable[torch.Tensor | tuple[torch.Tensor, int | tuple[int, ...]]],
        bits: Sequence[int] = (2, 3, 4),
        dim: int | tuple[int, ...] = -1,
        symmetric: bool = False,
    ) -> CodebookQuantizer:
        """A quantizer whose tables for ``bits`` are fitted on real activations.

        Each item is a tensor normalised over ``dim`` or a ``(tensor, dim)`` pair, so keys can be
        normalised per channel over tokens and values per token over a channel group, as the cache
        will quantize them.
        """
        items = [tensors] if isinstance(tensors, torch.Tensor) else list(tensors)
        if not items:
            raise ValueError("from_calibration needs at least one tensor")
        parts = []
        for item in items:
            tensor, item_dim = item if isinstance(item, tuple) else (item, dim)
            parts.append(normalise(tensor.detach(), item_dim, symmetric)[0].reshape(-1))
        sample = torch.cat(parts)
        return cls({b: cls.fit(sample, b) for b in bits if b != 16})

    def save(self, path: str | Path) -> None:
        """Write the explicitly set tables (a ``torch.save`` of ``{bits: table}``)."""
        torch.save({b: t.clone() for b, t in self.tables.items()}, Path(path))

    @classmethod
    def load(cls, path: str | Path) -> CodebookQuantizer:
        return cls(_read_tables(path))

    # -- the Quantizer interface ---------------------------------------------------------------------
    def quantize(
        self,
        x: torch.Tensor,
        bits: int,
        dim: int | tuple[int, ...],
        symmetric: bool = False,
        mask: torch.Tensor | None = None,
    ) -> QuantizedTensor:
        if bits == 16:
            return passthrough(x)
        table = self.table(bits)
        normalised, scale, zero = normalise(x, dim, symmetric, mask)
        codes = _assign(normalised.clamp(-1.0, 1.0), table.float())
        # the default 8-bit table is uniform and rebuilt on read: nothing to store for it
        implicit = bits == 8 and bits not in self.tables
        return QuantizedTensor(
            codes=pack(codes.to(torch.uint8), bits),
            bits=bits,
            shape=tuple(x.shape),
            dtype=x.dtype,
            scale=scale,
            zero=zero,
            extra={} if implicit else {"codebook": table.to(x.device, copy=True)},
        )

    def dequantize(self, q: QuantizedTensor) -> torch.Tensor:
        if q.bits == 16:
            return q.codes
        codes = unpack(q.codes, q.bits, q.numel()).long()
        table = q.extra.get("codebook")
        table = default_table(q.bits) if table is None else table
        levels = table.float().to(codes.device).index_select(0, codes).view(q.shape)
        out = levels * q.scale.float()
        if q.zero is not None:
            out = out + q.zero.float()
        return out.to(q.dtype)


def _check_table(bits: int, table: torch.Tensor) -> torch.Tensor:
    table = torch.as_tensor(table).detach().reshape(-1)
    if table.numel() != 1 << bits:
        raise ValueError(f"codebook for {bits} bits needs {1 << bits} levels, got {table.numel()}")
    return table.float().sort().values.to(torch.float16)


def _read_tables(path: str | Path) -> dict[int, torch.Tensor]:
    data = torch.load(Path(path), map_location="cpu", weights_only=True)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of bit width to table (written by CodebookQuantizer.save)")
    return {int(b): t for b, t in data.items()}
