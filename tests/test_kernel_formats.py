"""Every packed format the fused CPU kernel declares it reads, against the reference reader.

Formats combine widths (mixed by layer under a bit budget), uniform codes and Lloyd-Max level
tables, 16-bit or 8-bit scales, values packed per token in the tail, value rotation, key ranges per
token group, blocks packed from the tail (shorter than a chunk, off the chunk grid), a 16-bit exact
tail, outlier units, sinks, GQA and left-padded batches of lengths that are multiples of nothing;
decode steps (history and tail) and the fused restore of prefill tiles are both checked.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from kvstream import CompressionConfig
from kvstream.attention.packed import packed_attention, reference_history
from kvstream.kernels import PackedDecode, decode_kernel_for
from kvstream.testing import decode_mask, prefilled_cache

formats = st.fixed_dictionaries(
    {
        "chunk_size": st.sampled_from([16, 32]),
        "key_bits_normal": st.sampled_from([2, 3, 4, 8]),
        "value_bits_normal": st.sampled_from([2, 3, 4, 8]),
        "bit_budget": st.sampled_from([0.0, 2.5, 3.3]),
        "quantizer": st.sampled_from(["uniform", "lloyd-max"]),
        "value_quantizer": st.sampled_from(["same", "lloyd-max", "uniform"]),
        "rotation": st.sampled_from(["none", "values"]),
        "key_token_group_share": st.sampled_from([0, 2, 4]),
        "tail_block_share": st.sampled_from([0, 4]),
        "exact_storage": st.sampled_from(["model", "16bit"]),
        "key_symmetric": st.booleans(),
        "value_symmetric": st.booleans(),
        "scale_bits": st.sampled_from([16, 8]),
        "tail_values": st.sampled_from(["exact", "packed"]),
        "value_quant_groups": st.sampled_from([8, 16]),  # 16: whole 32-bit words of 2-bit codes per token
    }
)


def _config(fmt: dict) -> CompressionConfig:
    fmt = dict(fmt)
    share, tail = fmt.pop("key_token_group_share"), fmt.pop("tail_block_share")
    return CompressionConfig(
        **fmt,
        key_token_group=fmt["chunk_size"] // share if share else 0,
        tail_block=fmt["chunk_size"] // tail if tail else 0,
        outlier_threshold_abs=0.0,
        outlier_threshold_relative=1.5,  # outlier units in most blocks
        max_outlier_fraction=0.25,
    )


PRESET_LIKE = dict(
    chunk_size=32,
    key_bits_normal=2,
    value_bits_normal=2,
    bit_budget=3.3,
    quantizer="uniform",
    value_quantizer="lloyd-max",
    rotation="values",
    key_token_group_share=2,
    tail_block_share=4,
    exact_storage="16bit",
    key_symmetric=False,
    value_symmetric=True,
    scale_bits=8,
    tail_values="packed",
    value_quant_groups=16,
)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    fmt=formats,
    length=st.integers(40, 110),
    pads=st.tuples(st.integers(0, 20), st.integers(0, 20)),
    seed=st.integers(0, 1000),
)
@example(fmt=PRESET_LIKE, length=97, pads=(0, 13), seed=1)
def test_cpu_kernel_reads_every_declared_format(tiny_model, fmt, length, pads, seed):
    cfg = _config(fmt)
    cache, mask = prefilled_cache(tiny_model, cfg, length, batch=2, pads=pads, seed=seed)
    for layer in cache.layers:
        assert layer.keys.shape[-2] < (cfg.tail_block or cfg.chunk_size)
        if not layer.groups:
            continue
        assert layer.kernel_refusal() is None
        kernel = decode_kernel_for(layer, torch.zeros(2, 4, 1, 16))
        assert isinstance(kernel, PackedDecode)
        query = torch.randn(2, 4, 1, 16, generator=torch.Generator().manual_seed(seed))
        step_mask = decode_mask(mask, layer.length)
        tail = layer.tail_values()
        fused = packed_attention(layer, query, layer.keys, tail, step_mask, 0.25, kernel)
        reference = packed_attention(layer, query, layer.keys, tail, step_mask, 0.25, reference_history)
        torch.testing.assert_close(fused, reference, atol=3e-5, rtol=1e-4)
        # prefill tiles: the kernel's restore (values rotated back, sinks pasted) against PyTorch's, on the
        # real tokens (pads are never seen, and the kernel's block RoPE does not place them)
        valid = cache.tables_on(layer.keys.device)[1]
        for (start_f, k_f, v_f), (start_r, k_r, v_r) in zip(
            layer.history_tiles(64, fused=True), layer.history_tiles(64, fused=False), strict=True
        ):
            assert start_f == start_r
            real = valid[:, start_f : start_f + k_f.shape[2]]
            torch.testing.assert_close(k_f.transpose(1, 2)[real], k_r.transpose(1, 2)[real], atol=2e-5, rtol=1e-5)
            torch.testing.assert_close(v_f.transpose(1, 2)[real], v_r.transpose(1, 2)[real], atol=2e-5, rtol=1e-5)


def test_mixed_widths_by_layer_are_read_by_the_kernel(tiny_model):
    """A bit budget gives blocks different widths (the first blocks keep the configured ones); all go through
    the kernel. The tiny model's fixed tables hold about 10 bits per element at 100 tokens, so the budget that
    leaves room to widen is 12."""
    cache, _ = prefilled_cache(tiny_model, _config({**PRESET_LIKE, "bit_budget": 12.0}), 100)
    widths = {(g.keys.low.bits, g.values.low.bits) for layer in cache.layers for g in layer.groups}
    assert len(widths) > 1
    assert all(layer.kernel_ready() for layer in cache.layers)


@pytest.mark.parametrize(
    "switches,reason",
    [
        (dict(rotation="keys"), "rotation: keys"),
        (dict(value_quantizer="lloyd-max-fitted"), "level table"),
        (dict(sparse_outlier_fraction=0.02), "SparseOutliers"),
    ],
)
def test_a_format_no_kernel_reads_is_named_and_recorded(tiny_model, switches, reason):
    cfg = CompressionConfig(chunk_size=16, value_quant_groups=8, **switches)
    cache, _ = prefilled_cache(tiny_model, cfg, 50)
    layer = cache.layers[0]
    assert reason in layer.kernel_refusal()
    ids = torch.randint(0, 128, (1, 2), generator=torch.Generator().manual_seed(0))
    warned = f"decode steps read the packed history with the reference tiles: .*{reason}"
    with pytest.warns(UserWarning, match=warned), torch.inference_mode():
        tiny_model(input_ids=ids[:, :1], cache=cache, use_cache=True)
    with torch.inference_mode():
        tiny_model(input_ids=ids[:, 1:], cache=cache, use_cache=True)  # warned once per cache
    assert cache.memory_report()["readers"] == {"decode": "reference tiles", "prefill": "flash tiles"}


def test_the_reader_a_run_used_is_recorded(tiny_model):
    cfg = CompressionConfig.from_yaml("bits-2.5")
    cfg = CompressionConfig(
        **{**cfg.__dict__, "chunk_size": 16, "key_token_group": 8, "value_quant_groups": 8, "tail_block": 8}
    )
    cache, _ = prefilled_cache(tiny_model, cfg, 50)
    with torch.inference_mode():
        tiny_model(input_ids=torch.tensor([[5]]), cache=cache, use_cache=True)
    assert cache.memory_report()["readers"] == {"decode": "cpu kernel", "prefill": "flash tiles"}
