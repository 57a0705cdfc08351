"""A fixed random orthogonal transform per head, applied before quantization and undone in the read path.

Rotating a head's vectors by an orthogonal matrix spreads the energy of outlier channels over all
coordinates and makes the coordinates close to Gaussian, which uniform and Lloyd-Max levels both
quantize better (QuaRot, Ashkboos et al. 2024; TurboQuant, Zandieh et al. 2025). The transform of
head ``h`` of layer ``l`` is ``diag(signs[l, h]) @ M``: ``M`` is the normalised Sylvester Hadamard
matrix when the head size is a power of two (a seeded random orthogonal matrix otherwise), the
signs are drawn from a generator seeded by ``(seed, l)``. Nothing is calibrated.
"""

from __future__ import annotations

import functools

import torch


@functools.cache
def base_matrix(dim: int, seed: int) -> torch.Tensor:
    """``M`` ([dim, dim], fp32, orthogonal): normalised Hadamard for powers of two, else seeded Q of a QR."""
    if dim & (dim - 1) == 0:
        m = torch.ones(1, 1)
        while m.shape[0] < dim:
            m = torch.cat([torch.cat([m, m], 1), torch.cat([m, -m], 1)], 0)
        return m / dim**0.5
    generator = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(dim, dim, generator=generator, dtype=torch.float64))
    return (q * torch.sign(torch.diagonal(r))).float()


class HeadRotation:
    """The per-head transforms of one layer: `rotate` before quantization, `unrotate` on read."""

    def __init__(self, heads: int, dim: int, seed: int, layer: int, device: torch.device) -> None:
        generator = torch.Generator().manual_seed(seed * 100_003 + layer)
        signs = torch.randint(0, 2, (heads, dim), generator=generator).float() * 2 - 1
        self.signs = signs.to(device)[None, :, None, :]  # [1, H, 1, D]
        self.matrix = base_matrix(dim, seed).to(device)

    def rotate(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` ([B, H, T, D]) in the rotated basis, fp32."""
        return (x.float() * self.signs) @ self.matrix

    def unrotate(self, x: torch.Tensor) -> torch.Tensor:
        """The inverse of `rotate` (``M`` is orthogonal, the signs their own inverse), fp32."""
        return (x.float() @ self.matrix.T) * self.signs

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return self.signs, self.matrix
