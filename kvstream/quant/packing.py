"""Dense bit packing of integer codes into ``uint8`` storage.

Widths that divide 8 (1, 2, 4) share each byte among ``8 // bits`` codes; other widths (3, 5, 6,
7) pack eight codes into ``bits`` bytes, so 3-bit codes take exactly 3/8 of a byte (no 4-bit
slots). 8-bit codes are stored as they are. The whole tensor is packed flat.
"""

from __future__ import annotations

import torch

PACKABLE_BITS = (1, 2, 3, 4, 5, 6, 7, 8)


def _codes_per_unit(bits: int) -> tuple[int, int]:
    """(codes, bytes) of one packing unit: one byte for widths dividing 8, else eight codes."""
    return (8 // bits, 1) if 8 % bits == 0 else (8, bits)


def packed_nbytes(numel: int, bits: int) -> int:
    """Bytes that ``numel`` codes of ``bits`` width occupy once packed (the last unit zero-padded)."""
    codes, nbytes = _codes_per_unit(bits)
    return -(-numel // codes) * nbytes


def _check(bits: int) -> None:
    if bits not in PACKABLE_BITS:
        raise ValueError(f"cannot pack {bits}-bit codes")


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned integer ``codes`` (each < 2**bits) into a flat ``uint8`` tensor."""
    _check(bits)
    flat = codes.reshape(-1).to(torch.uint8)
    if bits == 8:
        return flat.clone()
    per, nbytes = _codes_per_unit(bits)
    pad = (-flat.numel()) % per
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    if nbytes == 1:
        groups = flat.view(-1, per)
        out = groups[:, 0].clone()
        for i in range(1, per):
            out |= groups[:, i] << (bits * i)
        return out
    groups = flat.to(torch.int64).view(-1, 8)
    shifts = torch.arange(8, device=flat.device, dtype=torch.int64) * bits
    words = (groups << shifts).sum(-1)  # disjoint bit fields: sum == or
    byte_shifts = torch.arange(nbytes, device=flat.device, dtype=torch.int64) * 8
    return ((words.unsqueeze(-1) >> byte_shifts) & 0xFF).to(torch.uint8).reshape(-1)


def unpack(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """Inverse of `pack`: the first ``numel`` codes, as a flat ``uint8`` tensor."""
    _check(bits)
    if bits == 8:
        return packed[:numel]
    per, nbytes = _codes_per_unit(bits)
    mask = (1 << bits) - 1
    if nbytes == 1:  # scalar shifts: several times faster than one broadcast shift on CPU
        parts = [packed & mask] + [(packed >> (bits * i)) & mask for i in range(1, per)]
        return torch.stack(parts, dim=-1).reshape(-1)[:numel]
    byte_shifts = torch.arange(nbytes, device=packed.device, dtype=torch.int64) * 8
    words = (packed.view(-1, nbytes).to(torch.int64) << byte_shifts).sum(-1)
    shifts = torch.arange(8, device=packed.device, dtype=torch.int64) * bits
    return ((words.unsqueeze(-1) >> shifts) & mask).reshape(-1)[:numel].to(torch.uint8)
