"""The exact tail packed as tokens arrive (``tail_block``) and held at 16 bits (``exact_storage``)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import DynamicCache

from kvstream import CompressionConfig, make_cache
from kvstream.config import ConfigError
from kvstream.testing import prefilled_cache, random_ids

FULL = dict(key_bits_normal=16, key_bits_sink_outlier=16, value_bits_normal=16, value_bits_sink_outlier=16)


def _generate(model, cache, ids, new, mask=None):
    with torch.inference_mode():
        return model.generate(
            input_ids=ids,
            attention_mask=mask,
            past_key_values=cache,
            max_new_tokens=new,
            do_sample=False,
            pad_token_id=0,
        )


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    prompt=st.integers(5, 120),
    answer=st.integers(1, 20),
    block=st.sampled_from([4, 8, 16]),
    keep=st.sampled_from([0, 3]),
)
def test_the_exact_remainder_stays_under_one_tail_block(tiny_model, prompt, answer, block, keep):
    cfg = CompressionConfig(chunk_size=16, value_quant_groups=8, tail_block=block, recent_window=keep)
    cache = make_cache(tiny_model, cfg)
    out = _generate(tiny_model, cache, random_ids(prompt, seed=prompt), answer)
    for layer in cache.layers:
        # the last token generated is never appended (generate stops on it): the cache holds the rest
        assert layer.length == out.shape[1] - 1
        assert layer.keys.shape[-2] < block + keep
        assert layer.packed_length == layer.length - layer.keys.shape[-2]


def test_tail_blocks_hold_the_values_a_chunk_block_would(tiny_model):
    """Values are quantized per token: the same tokens packed from the tail, eight at a time, carry the very
    codes and scales a whole chunk would give them; keys (ranges per block) stay within their error."""
    plain = dict(chunk_size=16, value_quant_groups=8, outlier_threshold_abs=0.0, outlier_threshold_relative=0.0)
    whole, _ = prefilled_cache(tiny_model, CompressionConfig(**plain), 48)
    tail, _ = prefilled_cache(tiny_model, CompressionConfig(**plain, tail_block=8), 40)
    for a, b in zip(whole.layers, tail.layers, strict=True):
        assert [(g.block_len, g.n_blocks) for g in b.groups] == [(16, 2), (8, 1)]
        want = a.restore_blocks(a.groups[0], 2, 3)
        got = b.restore_blocks(b.groups[1], 0, 1)
        torch.testing.assert_close(got[1], want[1][:, :, :8], atol=0, rtol=0)
        torch.testing.assert_close(got[0], want[0][:, :, :8], atol=0.1, rtol=0)


def test_sixteen_bit_configurations_stay_equal_to_dynamic_cache(tiny_model):
    ids = random_ids(37, seed=2)
    ref = _generate(tiny_model, DynamicCache(config=tiny_model.config), ids, 9)
    cfg = CompressionConfig(chunk_size=16, value_quant_groups=8, tail_block=4, exact_storage="16bit", **FULL)
    cache = make_cache(tiny_model, cfg)
    assert torch.equal(_generate(tiny_model, cache, ids, 9), ref)
    assert cache.layers[0].keys.dtype == torch.float32  # nothing quantized: the tail keeps the model's dtype


def test_the_exact_tail_is_held_at_sixteen_bits(tiny_model):
    cfg = CompressionConfig(chunk_size=16, value_quant_groups=8, tail_block=8, exact_storage="16bit")
    cache, _ = prefilled_cache(tiny_model, cfg, 45)
    layer = cache.layers[0]
    assert layer.keys.dtype == layer.values.dtype == torch.float16
    held = sum(2 * 2 * layer.keys.numel() for layer in cache.layers)  # keys and values, 2 bytes each
    assert cache.memory_report()["breakdown"]["full_precision_tail"] == held
    huge = torch.full((1, 2, 1, 16), 1e6)
    assert layer.tail_dtype(huge, huge) == torch.bfloat16  # fp16 would overflow
    with torch.inference_mode():
        layer.update(huge, huge)
    assert layer.keys.dtype == torch.bfloat16 and bool(torch.isfinite(layer.keys).all())


def test_left_padded_batches_with_tail_blocks_decode_like_single_rows(tiny_model):
    cfg = CompressionConfig(chunk_size=16, value_quant_groups=8, tail_block=8, exact_storage="16bit")
    long, short = random_ids(40, seed=3)[0], random_ids(32, seed=4)[0]
    batch = torch.stack([long, torch.cat([torch.zeros(8, dtype=torch.long), short])])
    mask = torch.ones_like(batch)
    mask[1, :8] = 0
    got = _generate(tiny_model, make_cache(tiny_model, cfg), batch, 10, mask)
    alone = _generate(tiny_model, make_cache(tiny_model, cfg), long[None], 10)
    assert torch.equal(got[0], alone[0])  # the unpadded row is stored exactly as alone


@pytest.mark.parametrize(
    "fields,message",
    [
        (dict(tail_block=24), "divide chunk_size"),
        (dict(tail_block=16, key_token_group=12, chunk_size=48), "multiple of key_token_group"),
    ],
)
def test_tail_block_validation(fields, message):
    with pytest.raises(ConfigError, match=message):
        CompressionConfig(**{"chunk_size": 32, **fields}).validate()
