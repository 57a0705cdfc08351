"""The KIVI cache: residual window, key groups of G tokens, exact window, packed bytes, generate, batches."""

from __future__ import annotations

import pytest
import torch
from kvstream_kivi import KiviCache
from transformers import DynamicCache

from kvstream import CompressionConfig, chunked_prefill, make_cache, registry
from kvstream.engine.prefill import position_ids_for
from kvstream.testing import random_ids, tiny_llama


@pytest.fixture(scope="module")
def tiny_model() -> torch.nn.Module:
    return tiny_llama()


@pytest.fixture
def make_ids():
    """``make_ids(n, seed=1, batch=1)``: random token ids of the tiny vocabulary."""
    return random_ids


SIXTEEN_HIGH = {"key_bits_sink_outlier": 16, "value_bits_sink_outlier": 16}
"""kvstream's high widths, which may not be below the normal ones (KIVI itself ignores them)."""


def _cfg(bits: int = 2, **changes) -> CompressionConfig:
    return CompressionConfig(
        cache="kivi", key_bits_normal=bits, value_bits_normal=bits, value_quant_groups=8, **changes
    )


def _logits(model, cache, ids, chunk, attention_mask=None):
    out = []
    with torch.inference_mode():
        for s in range(0, ids.shape[1], chunk):
            kwargs = {}
            if attention_mask is not None:
                mask = attention_mask[:, : s + chunk]
                kwargs = dict(attention_mask=mask, position_ids=position_ids_for(mask)[:, s : s + chunk])
            out.append(model(input_ids=ids[:, s : s + chunk], cache=cache, use_cache=True, **kwargs).logits)
    return torch.cat(out, dim=1)


def test_registered_and_defaults(tiny_model, monkeypatch):
    monkeypatch.delenv("KVSTREAM_KIVI_GROUP_SIZE", raising=False)
    monkeypatch.delenv("KVSTREAM_KIVI_RESIDUAL", raising=False)
    assert registry.get("caches", "kivi") is KiviCache
    cache = make_cache(tiny_model, _cfg(chunk_size=256))
    assert isinstance(cache, KiviCache)
    assert (cache.group_size, cache.residual_length) == (32, 128)  # the paper's G and R, not chunk_size


def test_settings_overrides(tiny_model, monkeypatch):
    monkeypatch.setenv("KVSTREAM_KIVI_GROUP_SIZE", "16")
    monkeypatch.setenv("KVSTREAM_KIVI_RESIDUAL", "64")
    cache = make_cache(tiny_model, _cfg())
    assert (cache.group_size, cache.residual_length) == (16, 64)
    assert KiviCache.from_model(tiny_model, _cfg(), group_size=8).group_size == 8
    monkeypatch.delenv("KVSTREAM_KIVI_GROUP_SIZE")
    monkeypatch.setattr(KiviCache, "group_size", 4)
    assert make_cache(tiny_model, _cfg()).group_size == 4
    monkeypatch.setenv("KVSTREAM_KIVI_RESIDUAL", "many")
    with pytest.raises(ValueError, match="KVSTREAM_KIVI_RESIDUAL"):
        make_cache(tiny_model, _cfg())


@pytest.mark.parametrize("chunk", [1, 5, 8, 13, 40, 100])
def test_residual_window_and_whole_groups(tiny_model, make_ids, chunk):
    """After every append the window holds the last R tokens (fewer than R + G) and blocks are whole groups."""
    g, r = 8, 16
    cache = KiviCache.from_model(tiny_model, _cfg(), group_size=g, residual_length=r)
    ids = make_ids(100)
    for s in range(0, 100, chunk):
        chunked_prefill(tiny_model, ids[:, s : s + chunk], cache, chunk)
        n = min(s + chunk, 100)
        for layer in cache.layers:
            assert layer.get_seq_length() == n
            assert layer.packed_length + layer.residual_tokens == n
            assert layer.packed_length % g == 0
            if n >= r:
                assert r <= layer.residual_tokens < r + g
            else:
                assert layer.residual_tokens == n and not layer.blocks
            assert all(block.length % g == 0 for block in layer.blocks)


def test_keys_per_channel_in_token_groups_values_per_token(tiny_model, make_ids):
    g, r = 8, 16
    cache = KiviCache.from_model(tiny_model, _cfg(), group_size=g, residual_length=r)
    chunked_prefill(tiny_model, make_ids(48), cache, 48)
    (block,) = cache.layers[0].blocks
    assert block.length == 32
    # keys: one scale and zero-point per (batch, head, group of 8 tokens, channel)
    assert block.keys.shape == (1, 2, 4, 8, 16)
    assert block.keys.scale.shape == (1, 2, 4, 1, 16)
    assert block.keys.zero.shape == (1, 2, 4, 1, 16)
    # values: one per (batch, head, token, group of value_quant_groups channels)
    assert block.values.shape == (1, 2, 32, 2, 8)
    assert block.values.scale.shape == (1, 2, 32, 2, 1)
    assert block.keys.bits == block.values.bits == 2
    assert block.keys.scale.dtype == torch.float16


def test_residual_part_is_exact_without_sixteen_bits():
    """At 2 bits the window's keys and values come back bit for bit; only older tokens are approximated."""
    cfg = CompressionConfig(key_bits_normal=2, value_bits_normal=2, value_quant_groups=8)
    cache = KiviCache(cfg, num_layers=1, group_size=8, residual_length=16)
    g = torch.Generator().manual_seed(0)
    keys, values = torch.randn(2, 2, 45, 16, generator=g), torch.randn(2, 2, 45, 16, generator=g)
    for s in range(0, 45, 9):
        out_k, out_v = cache.update(keys[:, :, s : s + 9], values[:, :, s : s + 9], 0)
    layer = cache.layers[0]
    packed = layer.packed_length
    assert packed == 24 and layer.residual_tokens == 21
    assert torch.equal(out_k[:, :, packed:], keys[:, :, packed:])
    assert torch.equal(out_v[:, :, packed:], values[:, :, packed:])
    # the window reported back on the next append is exact too, and the packed part is not
    out_k, out_v = cache.update(keys[:, :, :1], values[:, :, :1], 0)
    packed = layer.packed_length
    assert torch.equal(out_k[:, :, packed:45], keys[:, :, packed:])
    assert not torch.equal(out_k[:, :, :packed], keys[:, :, :packed])
    err = (out_k[:, :, :packed] - keys[:, :, :packed]).abs()
    step = (keys.amax() - keys.amin()) / 3
    assert err.max() <= step  # within a 2-bit step of the range


def test_prompt_within_window_matches_full_precision_at_two_bits(tiny_model, make_ids):
    ids = make_ids(128)
    ref = _logits(tiny_model, DynamicCache(config=tiny_model.config), ids, 32)
    got = _logits(tiny_model, make_cache(tiny_model, _cfg(2)), ids, 32)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_sixteen_bits_reproduce_dynamic_cache(tiny_model, make_ids):
    ids = make_ids(200)
    ref = _logits(tiny_model, DynamicCache(config=tiny_model.config), ids, 24)
    cache = KiviCache.from_model(tiny_model, _cfg(16, **SIXTEEN_HIGH), group_size=8, residual_length=16)
    got = _logits(tiny_model, cache, ids, 24)
    assert cache.layers[0].packed_length == 184  # 200 - 16 = 184 = 23 groups of 8
    torch.testing.assert_close(got, ref, atol=2e-5, rtol=1e-4)


def test_error_grows_as_bits_fall(tiny_model, make_ids):
    ids = make_ids(320)
    ref = _logits(tiny_model, DynamicCache(config=tiny_model.config), ids, 64)
    errors = {}
    for bits in (8, 4, 2):
        got = _logits(tiny_model, make_cache(tiny_model, _cfg(bits)), ids, 64)
        errors[bits] = (got - ref).abs().mean().item()
    assert errors[8] < errors[4] < errors[2]
    assert errors[4] < 0.01


def test_memory_report_counts_packed_bytes(tiny_model, make_ids):
    cache = KiviCache.from_model(tiny_model, _cfg(2), group_size=8, residual_length=16)
    chunked_prefill(tiny_model, make_ids(100), cache, 25)
    report = cache.memory_report()
    packed, window = 80, 20  # 100 - 16 = 84 tokens left the window: 10 whole groups of 8
    assert cache.layers[0].packed_length == packed
    per_token = 2 * 16  # kv heads * head_dim, per layer, keys or values
    assert report["elements"] == 2 * 2 * 100 * per_token
    b = report["breakdown"]
    assert b["codes"] == 2 * 2 * packed * per_token * 2 // 8
    key_meta = 2 * 2 * (packed // 8) * 16 * 2  # layers * heads * groups * channels * fp16
    value_meta = 2 * 2 * packed * 2 * 2  # layers * heads * tokens * channel groups * fp16
    assert b["scales"] == b["zero_points"] == key_meta + value_meta
    assert b["full_precision_tail"] == 2 * 2 * window * per_token * 4  # fp32 model
    assert b["positions"] == 100 * (4 + 1)  # per token: its int32 position and its padding flag
    assert report["stored_bytes"] == sum(b.values())
    assert report["peak_stored_bytes"] >= report["stored_bytes"]
    # at 2 bits with a short window, long contexts end well under fp16
    long = KiviCache.from_model(tiny_model, _cfg(2), group_size=32, residual_length=32)
    chunked_prefill(tiny_model, make_ids(512), long, 128)
    assert long.memory_report()["ratio_to_fp16"] < 0.45


def test_generate_and_reset(tiny_model, make_ids):
    ids = make_ids(150)
    with torch.inference_mode():
        ref = tiny_model.generate(ids, max_new_tokens=12, do_sample=False)
        cache = make_cache(tiny_model, _cfg(4))
        got = tiny_model.generate(ids, max_new_tokens=12, do_sample=False, cache=cache)
    assert got.shape == ref.shape
    assert got[0, 150] == ref[0, 150]  # the prompt's last tokens are in the window
    assert (got == ref).float().mean() > 0.8
    assert cache.get_seq_length() == 150 + 11
    cache.reset()
    assert cache.get_seq_length() == 0 and not cache.layers[0].blocks
    with torch.inference_mode():
        again = tiny_model.generate(ids, max_new_tokens=12, do_sample=False, cache=cache)
    assert torch.equal(again, got)


def test_batch_of_two_matches_single_runs(tiny_model, make_ids):
    ids = torch.cat([make_ids(180, seed=1), make_ids(180, seed=2)])
    batched = _logits(tiny_model, make_cache(tiny_model, _cfg(2)), ids, 48)
    for row in range(2):
        single = _logits(tiny_model, make_cache(tiny_model, _cfg(2)), ids[row : row + 1], 48)
        torch.testing.assert_close(batched[row : row + 1], single, atol=1e-4, rtol=1e-4)


def test_left_padding_kept_out_of_key_ranges():
    """Huge pad keys do not widen the range of the real tokens sharing their group."""
    cfg = CompressionConfig(key_bits_normal=4, value_bits_normal=4, value_quant_groups=8)
    cache = KiviCache(cfg, num_layers=1, group_size=8, residual_length=8)
    mask = torch.ones(2, 24, dtype=torch.long)
    mask[1, :3] = 0
    cache.register_padding(mask)
    g = torch.Generator().manual_seed(0)
    keys, values = torch.randn(2, 2, 24, 16, generator=g), torch.randn(2, 2, 24, 16, generator=g)
    keys[1, :, :3] = 1000.0
    cache.update(keys, values, 0)
    out_k, _ = cache.update(keys[:, :, :1], values[:, :, :1], 0)
    assert cache.valid[1, :3].tolist() == [False] * 3 and bool(cache.valid[:, 3:].all())
    err = (out_k[:, :, :16] - keys[:, :, :16]).abs()
    assert err[0].max() < 0.5
    assert err[1, :, 3:].max() < 0.5  # without the mask the step would be about 1000 / 15


def test_padded_batch_with_generate(tiny_model, make_ids):
    long, short = make_ids(170, seed=3), make_ids(150, seed=4)
    ids = torch.cat([long, torch.cat([torch.zeros(1, 20, dtype=torch.long), short], dim=1)])
    mask = torch.ones_like(ids)
    mask[1, :20] = 0
    with torch.inference_mode():
        cache = make_cache(tiny_model, _cfg(4))
        batched = tiny_model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, cache=cache)
        single = tiny_model.generate(long, max_new_tokens=6, do_sample=False, cache=make_cache(tiny_model, _cfg(4)))
    assert cache.valid[1, :20].sum() == 0 and bool(cache.valid[0].all())
    # the unpadded row is stored exactly as in a batch of one
    assert torch.equal(batched[0], single[0])


@pytest.mark.parametrize("mode", [dict(num_beams=3, num_return_sequences=2), dict(prompt_lookup_num_tokens=3)])
def test_beam_search_and_assisted_decoding_at_sixteen_bits_match_dynamic_cache(tiny_model, make_ids, mode):
    """Beam rows are selected block by block; rejected candidates are cropped from the residual window."""
    ids = make_ids(60, seed=5).clamp_min(1)
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=0, **mode)
    with torch.inference_mode():
        want = tiny_model.generate(ids, cache=DynamicCache(config=tiny_model.config), **kwargs)
        full = _cfg(16, **SIXTEEN_HIGH)
        cache = KiviCache.from_model(tiny_model, full, group_size=8, residual_length=8)
        got = tiny_model.generate(ids, cache=cache, **kwargs)
    assert torch.equal(got, want)
    assert cache.layers[0].blocks
