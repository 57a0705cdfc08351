"""The Triton decode kernel against the reference reader, run by Triton's interpreter on the CPU."""

from __future__ import annotations

import gc
import os
import weakref

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

pytest.importorskip("triton")  # conftest switches Triton to its interpreter on machines without a GPU

from kvstream import CompressionConfig  # noqa: E402
from kvstream.attention.packed import packed_attention, reference_history  # noqa: E402
from kvstream.kernels import (  # noqa: E402
    TritonDecode,
    triton_decode,  # noqa: E402
    visibility,
)
from kvstream.kernels.online import OnlineSoftmax  # noqa: E402
from kvstream.testing import decode_mask, prefilled_cache, quiet_head_llama  # noqa: E402

interpreted = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1", reason="these checks run the kernel in Triton's interpreter"
)


def _history(reader, layer, q, mask):
    state = OnlineSoftmax()
    reader(layer, q, mask, 2, state)
    return state.result(), state.m


@interpreted
@pytest.mark.parametrize("key_bits,value_bits", [(2, 2), (3, 3), (4, 4), (8, 8), (4, 2)])
@pytest.mark.parametrize("key_rope", ["pre", "post"])
def test_triton_kernel_matches_reference(tiny_model, key_bits, value_bits, key_rope):
    cfg = CompressionConfig(
        chunk_size=16,
        value_quant_groups=8,
        key_bits_normal=key_bits,
        value_bits_normal=value_bits,
        key_rope=key_rope,
        outlier_threshold_abs=0.0,
        outlier_threshold_relative=1.5,
        max_outlier_fraction=0.25,
    )
    cache, _ = prefilled_cache(tiny_model, cfg, 75)
    layer = cache.layers[1]
    q = torch.randn(1, 2, 2, 16, generator=torch.Generator().manual_seed(3))
    got, _ = _history(TritonDecode(), layer, q, None)
    want, _ = _history(reference_history, layer, q, None)
    torch.testing.assert_close(got, want, atol=3e-5, rtol=1e-4)


@interpreted
@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    bits=st.sampled_from([2, 3, 4, 8]),
    chunk=st.sampled_from([8, 16, 24]),
    length=st.integers(min_value=30, max_value=80),
    pads=st.tuples(st.integers(0, 20), st.integers(0, 20)),
    symmetric=st.booleans(),
    seed=st.integers(0, 1000),
)
def test_triton_kernel_on_padded_batches(tiny_model, bits, chunk, length, pads, symmetric, seed):
    cfg = CompressionConfig(
        chunk_size=chunk,
        value_quant_groups=16,
        key_bits_normal=bits,
        value_bits_normal=bits,
        key_symmetric=symmetric,
        outlier_threshold_relative=2.0,
    )
    cache, mask = prefilled_cache(tiny_model, cfg, length, batch=2, pads=pads, seed=seed)
    layer = cache.layers[0]
    if not layer.groups:
        return
    q = torch.randn(2, 2, 2, 16, generator=torch.Generator().manual_seed(seed))
    step_visible = decode_mask(mask, layer.length + 1)
    got, m_got = _history(TritonDecode(), layer, q, step_visible)
    want, m_want = _history(reference_history, layer, q, step_visible)
    seen = torch.isfinite(m_want)
    assert torch.equal(seen, torch.isfinite(m_got))
    torch.testing.assert_close(got[seen], want[seen], atol=3e-5, rtol=1e-4)


@interpreted
def test_triton_kernel_reads_fp32_metadata():
    """Blocks of a head too quiet for fp16 steps hold fp32 metadata; the kernel reads it like the reference."""
    cfg = CompressionConfig(chunk_size=16, value_quant_groups=8, key_bits_normal=4, value_bits_normal=4)
    cache, _ = prefilled_cache(quiet_head_llama(), cfg, 70)
    layer = cache.layers[0]
    assert any(g.keys.low.scale.dtype == torch.float32 for g in layer.groups)
    assert any(g.values.low.scale.dtype == torch.float32 for g in layer.groups)
    q = torch.randn(1, 2, 2, 16, generator=torch.Generator().manual_seed(5))
    q[:, 0] *= 1e6  # scores of the quiet head's keys of order one
    got, _ = _history(TritonDecode(), layer, q, None)
    want, _ = _history(reference_history, layer, q, None)
    loud = torch.tensor([1e6, 1.0])[None, :, None, None]  # outputs of the quiet head's values of order one
    torch.testing.assert_close(got * loud, want * loud, atol=3e-5, rtol=1e-4)


@interpreted
def test_triton_partials_of_blocks_only(tiny_model):
    """Without sinks in the way, the kernel's blocks alone equal the reference over the same visible tokens."""
    cfg = CompressionConfig(chunk_size=16, value_quant_groups=16, attention_sink_size=0)
    cache, _ = prefilled_cache(tiny_model, cfg, 64)
    layer = cache.layers[0]
    q = torch.randn(1, 2, 2, 16, generator=torch.Generator().manual_seed(1))
    visible, _ = visibility(layer, None, None)
    state = OnlineSoftmax()
    triton_decode.decode_history(layer, q, visible, state)
    want, _ = _history(reference_history, layer, q, None)
    torch.testing.assert_close(state.result(), want, atol=3e-5, rtol=1e-4)


@interpreted
@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    bits=st.sampled_from([2, 3, 4]),
    quantizer=st.sampled_from(["uniform", "lloyd-max"]),
    value_quantizer=st.sampled_from(["same", "lloyd-max"]),
    rotation=st.sampled_from(["none", "values"]),
    key_token_group=st.sampled_from([0, 4, 8]),
    tail_block=st.sampled_from([0, 4]),
    symmetric=st.booleans(),
    scale_bits=st.sampled_from([16, 8]),
    tail_values=st.sampled_from(["exact", "packed"]),
    seed=st.integers(0, 1000),
)
@example(
    bits=2, quantizer="uniform", value_quantizer="lloyd-max", rotation="values", key_token_group=8, tail_block=4,
    symmetric=True, scale_bits=8, tail_values="packed", seed=0,
)  # fmt: skip
def test_triton_kernel_reads_every_declared_format(
    tiny_model, bits, quantizer, value_quantizer, rotation, key_token_group, tail_block, symmetric, scale_bits,
    tail_values, seed,
):  # fmt: skip
    """Level tables, 8-bit scales, values packed per token in the tail, key ranges per token group, rotated values
    and blocks packed from the tail, through the whole decode step (sinks, exact tail) against the reference
    reader."""
    cfg = CompressionConfig(
        chunk_size=16,
        value_quant_groups=8,
        key_bits_normal=bits,
        value_bits_normal=bits,
        quantizer=quantizer,
        value_quantizer=value_quantizer,
        rotation=rotation,
        key_token_group=key_token_group,
        tail_block=tail_block,
        value_symmetric=symmetric,
        scale_bits=scale_bits,
        tail_values=tail_values,
        outlier_threshold_abs=0.0,
        outlier_threshold_relative=1.5,
    )
    cache, mask = prefilled_cache(tiny_model, cfg, 75, batch=2, pads=(0, 9), seed=seed)
    layer = cache.layers[1]
    query = torch.randn(2, 4, 1, 16, generator=torch.Generator().manual_seed(seed))
    step_mask = decode_mask(mask, layer.length)
    tail = layer.tail_values()
    got = packed_attention(layer, query, layer.keys, tail, step_mask, 0.25, TritonDecode())
    want = packed_attention(layer, query, layer.keys, tail, step_mask, 0.25, reference_history)
    torch.testing.assert_close(got, want, atol=3e-5, rtol=1e-4)


@interpreted
@pytest.mark.parametrize(
    "chunk,tail_block,bits,tile,programs",
    [
        (24, 0, 4, 256, 1),  # sub-tiles of 16 tokens: a block of 24 is 16 + 8; one program runs over every block
        (24, 0, 3, 256, 10_000),  # one sub-tile per program
        (16, 4, 3, 4096, 2),  # blocks of 4 from the tail, shorter than a sub-tile; 3-bit rows off byte boundaries
    ],
)
def test_triton_sub_tiles_split_among_programs(tiny_model, monkeypatch, chunk, tail_block, bits, tile, programs):
    """Sub-tiles that do not divide a block, blocks shorter than a sub-tile, and programs taking one sub-tile or
    the sub-tiles of several blocks, through the whole decode step of a left-padded batch."""
    monkeypatch.setattr(triton_decode, "TILE_ELEMENTS", tile)
    monkeypatch.setattr(triton_decode, "INTERPRETED_PROGRAMS", programs)
    cfg = CompressionConfig(
        chunk_size=chunk,
        value_quant_groups=8,
        key_bits_normal=bits,
        value_bits_normal=bits,
        tail_block=tail_block,
        outlier_threshold_abs=0.0,
        outlier_threshold_relative=1.5,
    )
    cache, mask = prefilled_cache(tiny_model, cfg, 75, batch=2, pads=(0, 7), seed=2)
    layer = cache.layers[0]
    assert len({g.block_len for g in layer.groups}) == (2 if tail_block else 1)
    query = torch.randn(2, 4, 1, 16, generator=torch.Generator().manual_seed(2))
    step_mask = decode_mask(mask, layer.length)
    got = packed_attention(layer, query, layer.keys, layer.values, step_mask, 0.25, TritonDecode())
    want = packed_attention(layer, query, layer.keys, layer.values, step_mask, 0.25, reference_history)
    torch.testing.assert_close(got, want, atol=3e-5, rtol=1e-4)


@interpreted
@pytest.mark.parametrize("rows", [1, 3, 8, 16])
def test_triton_query_rows_per_kv_head(tiny_model, rows):
    """One to sixteen grouped queries per KV head (padded to the tensor cores' 16 rows, or exactly 16)."""
    cfg = CompressionConfig(
        chunk_size=16, value_quant_groups=8, outlier_threshold_abs=0.0, outlier_threshold_relative=1.5
    )
    cache, _ = prefilled_cache(tiny_model, cfg, 60)
    layer = cache.layers[1]
    q = torch.randn(1, 2, rows, 16, generator=torch.Generator().manual_seed(rows))
    got, _ = _history(TritonDecode(), layer, q, None)
    want, _ = _history(reference_history, layer, q, None)
    torch.testing.assert_close(got, want, atol=3e-5, rtol=1e-4)


@interpreted
def test_triton_value_outliers_and_rows_off_byte_boundaries(tiny_model):
    """High-precision value groups beside normal ones, and 3-bit groups of 4 values whose rows do not start on a
    byte (codes read through shifted windows), against the reference."""
    cfg = CompressionConfig(
        chunk_size=16,
        value_quant_groups=4,
        key_bits_normal=3,
        value_bits_normal=3,
        outlier_threshold_abs=0.0,
        outlier_threshold_relative=1.2,
        max_outlier_fraction=0.5,
    )
    cache, _ = prefilled_cache(tiny_model, cfg, 60)
    layer = cache.layers[0]
    flags = [triton_decode._plan(layer, group).flags for group in layer.groups]
    assert any(f["V_HI"] for f in flags) and not any(f["VA_LO"] for f in flags)
    query = torch.randn(1, 4, 1, 16, generator=torch.Generator().manual_seed(7))
    got = packed_attention(layer, query, layer.keys, layer.values, None, 0.25, TritonDecode())
    want = packed_attention(layer, query, layer.keys, layer.values, None, 0.25, reference_history)
    torch.testing.assert_close(got, want, atol=3e-5, rtol=1e-4)


@interpreted
def test_triton_group_arguments_live_with_their_group(tiny_model):
    """A block group's kernel arguments are built once and dropped with the group: they never keep its bytes."""
    cfg = CompressionConfig(chunk_size=16, value_quant_groups=8)
    cache, _ = prefilled_cache(tiny_model, cfg, 40)
    layer = cache.layers[0]
    q = torch.randn(1, 2, 2, 16, generator=torch.Generator().manual_seed(4))
    visible, _ = visibility(layer, None, None)
    first = OnlineSoftmax()
    triton_decode.decode_history(layer, q, visible, first)
    group = layer.groups[0]
    assert triton_decode._plan(layer, group) is triton_decode._plan(layer, group)
    assert any(plan.flags["KW_LO"] for plan in (triton_decode._plan(layer, g) for g in layer.groups))
    layer.groups[0] = group.select_rows(torch.arange(1))  # the same blocks in storage of their own
    gone = weakref.ref(group)
    key = id(group)
    del group
    gc.collect()
    assert gone() is None and key not in triton_decode._PLANS
    again = OnlineSoftmax()
    triton_decode.decode_history(layer, q, visible, again)
    torch.testing.assert_close(again.result(), first.result(), atol=0, rtol=0)


def test_kernels_decline_rope_halves_that_differ(tiny_model, monkeypatch):
    """Both kernels turn channel c + D/2 with c (the CPU kernel one angle per pair, Triton the queries by a
    block's first position): a rotary whose halves turn at different rates is left to the reference tiles."""
    cache, _ = prefilled_cache(tiny_model, CompressionConfig(chunk_size=16, value_quant_groups=8), 40)
    layer = cache.layers[0]
    assert layer.kernel_refusal() is None
    rotary = cache.rotaries[0]
    table = rotary.table

    def apart(device, position_ids):
        cos, sin = table(device, position_ids)
        return cos, torch.cat([sin[..., :1] * 1.5, sin[..., 1:]], dim=-1)

    monkeypatch.setattr(rotary, "table", apart)
    cache.forget_tables()
    assert "halves turning apart" in layer.kernel_refusal()


def test_kernel_answers_are_kept_until_the_block_groups_change(tiny_model):
    """Whether a kernel reads a layer is asked once per set of block groups, not at every decode step."""
    from kvstream.kernels import per_groups

    cache, _ = prefilled_cache(tiny_model, CompressionConfig(chunk_size=16, value_quant_groups=8), 40)
    layer = cache.layers[0]
    calls = []

    def ask() -> bool:
        calls.append(1)
        return True

    assert per_groups(layer, "probe", ask) and per_groups(layer, "probe", ask)
    assert len(calls) == 1
    layer.groups[-1] = layer.groups[-1].select_rows(torch.arange(1))
    assert per_groups(layer, "probe", ask)
    assert len(calls) == 2
