"""The exact tail packed as tokens arrive (``tail_block``) and held at 16 bits (``exact_storage``)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import DynamicCache

from kvstream import CompressionConfig, make_cache
from kvstream.cache.streaming import VALUE_PACK_TOKENS
from kvstream.cache.value_tail import store_bits
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


@pytest.mark.parametrize("tail_values", ["exact", "packed"])
def test_sixteen_bit_configurations_stay_equal_to_dynamic_cache(tiny_model, tail_values):
    ids = random_ids(37, seed=2)
    ref = _generate(tiny_model, DynamicCache(config=tiny_model.config), ids, 9)
    cfg = CompressionConfig(
        chunk_size=16, value_quant_groups=8, tail_block=4, exact_storage="16bit", tail_values=tail_values, **FULL
    )
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


PACKED_VALUES = dict(chunk_size=16, value_quant_groups=8, tail_values="packed", outlier_threshold_abs=0.0)


def _exact_updates(cache, states, chunk):
    """Feed the random ``states`` ([B, H, n, D] keys and values) to every layer, a chunk then token by token."""
    keys, values = states
    n, sizes = keys.shape[2], []
    start = 0
    while start < n:
        size = chunk if start + chunk <= n // 2 else 1
        sizes.append((start, size))
        start += size
    with torch.inference_mode():
        for start, size in sizes:
            for layer in cache.layers:
                layer.update(keys[:, :, start : start + size], values[:, :, start : start + size])


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    prompt=st.integers(20, 90),
    answer=st.integers(1, 40),
    block=st.sampled_from([0, 4, 8]),
    keep=st.sampled_from([0, 2]),
    bits=st.sampled_from([2, 3, 4]),
    rotation=st.sampled_from(["none", "values"]),
    seed=st.integers(0, 1000),
)
def test_values_packed_per_token_equal_one_block(tiny_model, prompt, answer, block, keep, bits, rotation, seed):
    """With ``tail_values: packed`` only keys (the recent window, and fewer values than are packed at once) wait
    exact; every block, the ones joined from
    values packed token by token included, holds the codes and scales of its tokens' values quantized in one block
    with its outlier units; the tail reads back the same values."""
    cfg = CompressionConfig(
        **PACKED_VALUES, tail_block=block, recent_window=keep, value_bits_normal=bits, rotation=rotation,
        attention="restore", outlier_threshold_relative=1.5,
    )  # fmt: skip
    cache = make_cache(tiny_model, cfg)
    g = torch.Generator().manual_seed(seed)
    n = prompt + answer
    states = (torch.randn(1, 2, n, 16, generator=g), torch.randn(1, 2, n, 16, generator=g) * 3)
    states[1][..., 5] *= 20  # a loud channel: outlier units
    _exact_updates(cache, states, 16)
    for layer in cache.layers:
        held = layer.tail_packed.length
        assert layer.values.shape[-2] == layer.keys.shape[-2] - held < keep + VALUE_PACK_TOKENS
        assert layer.keys.shape[-2] < (block or 16) + keep
        rotate = cache.rotation(layer.layer_idx).rotate if rotation == "values" else (lambda x: x)
        for group in layer.groups:
            for i in range(group.n_blocks):
                first = group.start + i * group.block_len
                exact = rotate(states[1][:, :, first : first + group.block_len])
                store = group.values.blocks(i, i + 1)
                units = store.high_units()[0] if store.position is not None else torch.zeros(1, 2, 2, dtype=bool)
                want = layer.build_value_store(exact, units, (store.low or store.high).bits)
                for got_part, want_part in ((store.high, want.high), (store.low, want.low)):
                    assert (got_part is None) == (want_part is None)
                    if got_part is not None:
                        assert torch.equal(got_part.codes, want_part.codes)
                        assert torch.equal(got_part.scale, want_part.scale)
        tail = layer.tail_values()
        assert tail.shape == layer.keys.shape
        if held:
            exact = rotate(states[1][:, :, layer.length - layer.keys.shape[-2] :][:, :, :held])
            want = layer.build_value_store(exact, layer.tail_packed.outliers, store_bits(layer.tail_packed.store))
            restored = want.restore(cache.value_quantizer).float()[0].permute(0, 1, 3, 2, 4).reshape(exact.shape)
            undo = cache.rotation(layer.layer_idx).unrotate if rotation == "values" else (lambda x: x)
            torch.testing.assert_close(tail[:, :, :held].float(), undo(restored).to(tail.dtype).float())


def test_values_packed_per_token_shrink_the_tail_and_generate(tiny_model):
    """A generation with values packed per token holds fewer bytes than with them exact, answers close to it, and
    counts the packed values as codes and scales, not as the exact tail."""
    ids = random_ids(45, seed=5)
    exact_cfg = CompressionConfig(chunk_size=16, value_quant_groups=8, exact_storage="16bit")
    packed_cfg = exact_cfg.replace(tail_values="packed")
    exact, packed = make_cache(tiny_model, exact_cfg), make_cache(tiny_model, packed_cfg)
    a, b = _generate(tiny_model, exact, ids, 12), _generate(tiny_model, packed, ids, 12)
    assert (a == b).float().mean() > 0.8
    tail = sum(layer.keys.numel() for layer in packed.layers) * 2  # keys alone, 2 bytes each
    report = packed.memory_report()
    assert report["breakdown"]["full_precision_tail"] == tail
    assert report["stored_bytes"] < exact.memory_report()["stored_bytes"]


def test_values_packed_per_token_crop_and_select_rows(tiny_model):
    """A crop into the packed values keeps the first tokens' codes; batch rows are selected as stored."""
    cfg = CompressionConfig(**PACKED_VALUES, attention="restore")
    cache = make_cache(tiny_model, cfg)
    g = torch.Generator().manual_seed(0)
    states = (torch.randn(2, 2, 40, 16, generator=g), torch.randn(2, 2, 40, 16, generator=g))
    _exact_updates(cache, states, 16)
    layer = cache.layers[0]
    before = layer.tail_values().clone()
    held = layer.tail_packed.length
    assert held == layer.keys.shape[-2] - layer.values.shape[-2] > 3
    cache.select_rows(torch.tensor([1, 0]))
    torch.testing.assert_close(layer.tail_values(), before[[1, 0]], atol=0, rtol=0)
    cache.crop(-3)
    assert layer.tail_packed.length == held - 3 and layer.keys.shape[-2] == held - 3
    torch.testing.assert_close(layer.tail_values(), before[[1, 0], :, : held - 3], atol=0, rtol=0)


def test_values_packed_per_token_refuse_past_recording(tiny_model):
    cache = make_cache(tiny_model, CompressionConfig(**PACKED_VALUES))
    with pytest.raises(NotImplementedError, match="tail_values: packed"):
        cache.activate_past_recording()
