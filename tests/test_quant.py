"""Bit packing round trips and quantization error bounds (property tests)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvstream.quant import UniformQuantizer, pack, packed_nbytes, unpack

BITS = [2, 3, 4, 8]


@given(bits=st.sampled_from(BITS), n=st.integers(1, 300), seed=st.integers(0, 2**16))
def test_pack_round_trip_and_density(bits, n, seed):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 1 << bits, (n,), generator=g, dtype=torch.int64).to(torch.uint8)
    packed = pack(codes, bits)
    assert packed.dtype == torch.uint8
    per = {2: 4, 3: 8, 4: 2, 8: 1}[bits]
    assert packed.numel() == packed_nbytes(n, bits) == -(-n // per) * (3 if bits == 3 else 1)
    assert torch.equal(unpack(packed, bits, n), codes)


def test_three_bit_codes_are_dense():
    codes = torch.tensor([7, 0, 5, 2, 1, 6, 3, 4], dtype=torch.uint8)
    packed = pack(codes, 3)
    assert packed.numel() == 3  # 8 codes x 3 bits = 24 bits, not 4 bytes of nibbles
    word = sum(int(c) << (3 * i) for i, c in enumerate(codes))
    assert packed.tolist() == [word & 0xFF, (word >> 8) & 0xFF, (word >> 16) & 0xFF]


shapes = st.tuples(st.integers(1, 3), st.integers(1, 40), st.integers(1, 9))


@settings(deadline=None, max_examples=60)
@given(
    bits=st.sampled_from(BITS),
    shape=shapes,
    symmetric=st.booleans(),
    seed=st.integers(0, 2**16),
    scale=st.floats(1e-3, 1e3),
)
def test_error_within_half_step(bits, shape, symmetric, seed, scale):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g) * scale + (0 if symmetric else scale / 3)).float()
    q = UniformQuantizer().quantize(x, bits, dim=1, symmetric=symmetric)
    restored = UniformQuantizer().dequantize(q)
    step = q.scale.float()
    # half a step from rounding, plus the fp16 rounding of the scale and zero-point
    slack = 1e-3 * x.abs().amax(dim=1, keepdim=True) + 1e-6
    assert torch.all((restored - x).abs() <= step / 2 + slack)
    assert q.nbytes() == packed_nbytes(x.numel(), bits) + q.scale.numel() * 2 * (1 if symmetric else 2)


@pytest.mark.parametrize("bits", BITS)
def test_mask_excludes_entries_from_range(bits):
    x = torch.tensor([[0.0, 1.0, 2.0, 100.0]])
    mask = torch.tensor([[True, True, True, False]])
    q = UniformQuantizer().quantize(x, bits, dim=1, mask=mask)
    assert q.zero.item() == 0.0
    assert q.scale.float().item() == pytest.approx(2.0 / ((1 << bits) - 1), rel=1e-3)
    restored = UniformQuantizer().dequantize(q)
    assert restored[0, 3].item() == pytest.approx(2.0, rel=1e-3)  # clamped into the counted range


def test_sixteen_bits_are_kept_as_is():
    x = torch.randn(4, 5)
    q = UniformQuantizer().quantize(x, 16, dim=0)
    assert q.codes is not None and torch.equal(UniformQuantizer().dequantize(q), x)
    assert q.nbytes() == x.numel() * 4


def test_more_bits_less_error():
    x = torch.randn(8, 256, generator=torch.Generator().manual_seed(0))
    errors = [(UniformQuantizer().dequantize(UniformQuantizer().quantize(x, b, dim=1)) - x).abs().mean() for b in BITS]
    assert errors == sorted(errors, reverse=True)
