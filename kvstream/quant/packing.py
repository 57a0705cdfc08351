"""Dense bit packing of integer codes into ``uint8`` storage.

Codes of ``bits`` width are packed eight at a time into ``bits`` bytes, so 3-bit codes take
exactly 3/8 of a byte each (no 4-bit slots). The whole tensor is packed flat.
"""

from __future__ import annotations

import torch

PACKABLE_BITS = (1, 2, 3, 4, 5, 6, 7, 8)


def packed_nbytes(numel: int, bits: int) -> int:
    """Bytes that ``numel`` codes of ``bits`` width occupy once packed (padded to 8 codes below 8 bits)."""
    if bits == 8:
        return numel
    return -(-numel // 8) * bits


def _shifts(bits: int, count: int, device: torch.device) -> torch.Tensor:
    return torch.arange(count, device=device, dtype=torch.int64) * bits


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned integer ``codes`` (each < 2**bits) into a flat ``uint8`` tensor."""
    if bits not in PACKABLE_BITS:
        raise ValueError(f"cannot pack {bits}-bit codes")
    flat = codes.reshape(-1)
    if bits == 8:
        return flat.to(torch.uint8).clone()
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    groups = flat.to(torch.int64).view(-1, 8)
    words = (groups << _shifts(bits, 8, flat.device)).sum(-1)  # disjoint bit fields: sum == or
    out = (words.unsqueeze(-1) >> _shifts(8, bits, flat.device)) & 0xFF
    return out.to(torch.uint8).reshape(-1)


def unpack(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """Inverse of `pack`: the first ``numel`` codes, as a flat ``uint8`` tensor."""
    if bits not in PACKABLE_BITS:
        raise ValueError(f"cannot unpack {bits}-bit codes")
    if bits == 8:
        return packed[:numel]
    words = (packed.view(-1, bits).to(torch.int64) << _shifts(8, bits, packed.device)).sum(-1)
    codes = (words.unsqueeze(-1) >> _shifts(bits, 8, packed.device)) & ((1 << bits) - 1)
    return codes.reshape(-1)[:numel].to(torch.uint8)
