"""The streaming quantized cache against transformers' DynamicCache, on a tiny random Llama."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from kvstream import CompressionConfig, chunked_prefill, make_cache, streaming_perplexity
from kvstream.cache.streaming import StreamingQuantizedCache
from kvstream.testing import chunk_logits

FULL = dict(key_bits_normal=16, key_bits_sink_outlier=16, value_bits_normal=16, value_bits_sink_outlier=16)


def _ids(n: int, seed: int = 1, batch: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 128, (batch, n), generator=g)


@pytest.mark.parametrize("key_rope", ["pre", "post"])
def test_sixteen_bits_reproduce_dynamic_cache(tiny_model, key_rope):
    ids = _ids(70)
    ref = chunk_logits(tiny_model, DynamicCache(config=tiny_model.config), ids, 16)
    cfg = CompressionConfig(chunk_size=16, value_quant_groups=16, key_rope=key_rope, **FULL)
    cache = make_cache(tiny_model, cfg)
    assert isinstance(cache, StreamingQuantizedCache)
    got = chunk_logits(tiny_model, cache, ids, 16)
    assert cache.layers[0].n_blocks == 4  # 64 tokens packed, 6 in the tail
    torch.testing.assert_close(got, ref, atol=2e-5, rtol=1e-4)


def test_quantized_logits_close_and_degrade_with_bits(tiny_model):
    ids = _ids(96)
    ref = chunk_logits(tiny_model, DynamicCache(config=tiny_model.config), ids, 32)
    errors = {}
    for bits in (8, 4, 2):
        cfg = CompressionConfig(chunk_size=32, value_quant_groups=16, key_bits_normal=bits, value_bits_normal=bits)
        got = chunk_logits(tiny_model, make_cache(tiny_model, cfg), ids, 32)
        errors[bits] = (got - ref).abs().mean().item()
    assert errors[8] < errors[4] < errors[2]
    assert errors[8] < 1e-3


def test_current_chunk_is_exact(tiny_model):
    """The first chunk sees no history: its logits equal full precision even at 2 bits."""
    ids = _ids(32)
    ref = chunk_logits(tiny_model, DynamicCache(config=tiny_model.config), ids, 32)
    cfg = CompressionConfig(chunk_size=32, value_quant_groups=16, key_bits_normal=2, value_bits_normal=2)
    got = chunk_logits(tiny_model, make_cache(tiny_model, cfg), ids, 32)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_earlier_blocks_byte_identical_after_appends(tiny_model):
    cfg = CompressionConfig(chunk_size=16, value_quant_groups=16, key_bits_normal=3, value_bits_normal=3)
    cache = make_cache(tiny_model, cfg)
    ids = _ids(80)
    chunked_prefill(tiny_model, ids[:, :32], cache, 16)
    layer = cache.layers[1]
    first = layer.groups[0]
    stored = [first.keys.low.codes, first.keys.low.scale, first.values.low.codes, first.values.low.scale]
    snapshot = [t.clone() for t in stored]
    restored_before = layer.restore_history()[0].clone()
    chunked_prefill(tiny_model, ids[:, 32:], cache, 16)
    for _ in range(20):  # decode appends flush another block
        chunked_prefill(tiny_model, ids[:, :1], cache, 16)
    assert layer.n_blocks == 6
    group = layer.groups[0]
    now = [group.keys.low.codes, group.keys.low.scale, group.values.low.codes, group.values.low.scale]
    for before, after in zip(snapshot, now, strict=True):
        # merged groups copy earlier bytes unchanged and append the new ones after them
        assert torch.equal(after[: before.shape[0]], before)
    assert torch.equal(layer.restore_history()[0][:, :, :32], restored_before)


def test_packed_storage_is_dense(tiny_model):
    """3-bit codes take 3/8 byte each; the report counts every tensor held."""
    cfg = CompressionConfig(
        chunk_size=32,
        value_quant_groups=16,
        key_bits_normal=3,
        value_bits_normal=3,
        attention_sink_size=0,
        outlier_threshold_abs=0,
        outlier_threshold_relative=0,
    )
    cache = make_cache(tiny_model, cfg)
    chunked_prefill(tiny_model, _ids(64), cache, 32)
    report = cache.memory_report()
    elements = 2 * 2 * 64 * 16 * 2  # layers * kv heads * tokens * head_dim * (k, v)
    assert report["elements"] == elements
    assert report["breakdown"]["codes"] == elements * 3 // 8
    # keys: one fp16 scale + zero per (head, channel, block); values (symmetric): one scale per (head, token, group)
    key_scales, value_scales = 2 * 16 * 2, 2 * 64 * 1
    assert report["breakdown"]["scales"] == 2 * (key_scales + value_scales) * 2
    assert report["breakdown"]["zero_points"] == 2 * key_scales * 2
    assert report["stored_bytes"] == sum(report["breakdown"].values())
    assert report["fp16_bytes"] == 2 * elements
    assert report["bits_per_element"] == pytest.approx(8 * report["stored_bytes"] / elements)


def test_sinks_stored_at_high_bits(tiny_model):
    ids = _ids(32)
    cfg = CompressionConfig(
        chunk_size=32, value_quant_groups=16, key_bits_normal=2, value_bits_normal=2, attention_sink_size=4
    )
    cache = make_cache(tiny_model, cfg)
    chunked_prefill(tiny_model, ids, cache, 32)
    chunked_prefill(tiny_model, ids[:, :1], cache, 32)
    index, sinks = cache.layers[0].groups[0].sinks[0]
    assert index == 0
    assert sinks.keys.bits == 8 and sinks.values.bits == 8
    assert sinks.slots.tolist() == [[0, 1, 2, 3]]
    # restored sink tokens are far closer to the truth than the 2-bit rest
    ref = DynamicCache(config=tiny_model.config)
    with torch.inference_mode():
        tiny_model(input_ids=ids, cache=ref, use_cache=True)
    keys, _ = cache.layers[0].restore_history()
    true_keys = ref.layers[0].keys
    sink_err = (keys[:, :, :4] - true_keys[:, :, :4]).abs().max()
    rest_err = (keys[:, :, 4:] - true_keys[:, :, 4:]).abs().max()
    assert sink_err < rest_err / 10


@pytest.mark.parametrize("short_len", [24, 29])
def test_batch_with_left_padding_matches_single_runs(tiny_model, short_len):
    cfg = CompressionConfig(
        chunk_size=16,
        value_quant_groups=16,
        key_bits_normal=4,
        value_bits_normal=4,
        outlier_threshold_relative=1.5,
    )
    long, short = _ids(40, seed=3)[0], _ids(short_len, seed=4)[0]
    pad = long.shape[0] - short.shape[0]
    batch = torch.stack([long, torch.cat([torch.zeros(pad, dtype=torch.long), short])])
    mask = torch.ones_like(batch)
    mask[1, :pad] = 0
    cache = make_cache(tiny_model, cfg)
    batched = chunked_prefill(tiny_model, batch, cache, 16, attention_mask=mask)
    assert any(g.keys.high is not None for g in cache.layers[0].groups)  # outliers exercised
    single_long = chunked_prefill(tiny_model, long[None], make_cache(tiny_model, cfg), 16)
    single_short = chunked_prefill(tiny_model, short[None], make_cache(tiny_model, cfg), 16)
    torch.testing.assert_close(batched[0], single_long[0], atol=1e-5, rtol=1e-5)
    if pad % 16 == 0:  # same block boundaries: the padded row is stored exactly as alone
        torch.testing.assert_close(batched[1], single_short[0], atol=1e-5, rtol=1e-5)
    else:  # blocks cut at other tokens: equal up to quantization noise
        torch.testing.assert_close(batched[1], single_short[0], atol=0.05, rtol=0.05)
        assert batched[1].argmax() == single_short[0].argmax()


@pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated")
def test_generate_with_left_padding_and_16_bits_matches_dynamic(tiny_model):
    cfg = CompressionConfig(chunk_size=8, value_quant_groups=16, **FULL)
    batch = _ids(20, seed=5, batch=2)
    mask = torch.ones_like(batch)
    mask[1, :6] = 0
    kwargs = dict(input_ids=batch, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0)
    with torch.inference_mode():
        ref = tiny_model.generate(**kwargs, past_key_values=DynamicCache(config=tiny_model.config))
        cache = make_cache(tiny_model, cfg)
        got = tiny_model.generate(**kwargs, past_key_values=cache)
    assert torch.equal(got, ref)
    assert cache.get_seq_length() == 31
    assert cache.layers[0].n_blocks == 3
    assert cache.valid[1, :6].tolist() == [False] * 6 and bool(cache.valid[1, 6:].all())


def test_peak_memory_stays_near_packed_history(tiny_model, monkeypatch):
    """The reported peak adds attention's working memory, bounded by a tile: it does not grow with the history."""
    monkeypatch.setattr("kvstream.attention.packed.TILE_BYTES", 16 << 10)  # tiles of a few blocks here
    over = {}
    for n in (256, 512):
        cache = make_cache(tiny_model, CompressionConfig(chunk_size=16, value_quant_groups=16))
        chunked_prefill(tiny_model, _ids(n), cache, 16)
        report = cache.memory_report()
        over[n] = report["peak_stored_bytes"] - report["stored_bytes"]
        # 4-bit codes plus metadata; on this tiny model the kernels' block RoPE and the fp32 sink reads add ~0.05
        assert report["ratio_to_fp16"] < 0.5
        assert report["bits_per_element"] < 8
    assert 0 < over[512] <= over[256] * 1.1


def test_restored_history_counts_its_copy_in_the_peak(tiny_model):
    over = {}
    for n in (256, 512):
        cache = make_cache(tiny_model, CompressionConfig(chunk_size=16, value_quant_groups=16, attention="restore"))
        chunked_prefill(tiny_model, _ids(n), cache, 16)
        report = cache.memory_report()
        over[n] = report["peak_stored_bytes"] - report["stored_bytes"]
    assert over[512] > 1.8 * over[256]  # a full-precision copy of the whole history, growing with it


def test_kl_and_top1_against_a_direct_computation(tiny_model):
    """`streaming_compare` in lockstep: the reference's own figures, and KL(ref || 2-bit) and top-1 agreement
    equal to those computed from two full-sequence forwards through each cache."""
    from kvstream import streaming_compare

    ids = _ids(100)
    cfg = CompressionConfig(chunk_size=32, value_quant_groups=16, key_bits_normal=2, value_bits_normal=2)
    caches = {"fp": DynamicCache(config=tiny_model.config), "q2": make_cache(tiny_model, cfg)}
    results = streaming_compare(tiny_model, ids, caches, 32, reference="fp")
    ref = chunk_logits(tiny_model, DynamicCache(config=tiny_model.config), ids, 32)[0, :-1].log_softmax(-1)
    q2 = chunk_logits(tiny_model, make_cache(tiny_model, cfg), ids, 32)[0, :-1].log_softmax(-1)
    kl = (ref.exp() * (ref - q2)).sum(-1)
    top1 = (ref.argmax(-1) == q2.argmax(-1)).float()
    nll = -q2.gather(-1, ids[0, 1:, None]).squeeze(-1)
    got = results["q2"]
    assert got.tokens == 99 and got.compared
    assert results["fp"].mean_kl == 0 and results["fp"].top1_agreement == 1  # compared with itself
    assert got.mean_kl == pytest.approx(kl.mean().item(), rel=1e-4)
    assert got.top1_agreement == pytest.approx(top1.mean().item())
    assert 0 < got.top1_agreement < 1 and got.mean_kl > 0
    assert got.nll == pytest.approx(nll.mean().item(), rel=1e-5)
    assert sum(got.chunk_tokens) == 99 and len(got.chunk_kl) == 4
    assert results["fp"].nll == pytest.approx((-ref.gather(-1, ids[0, 1:, None])).mean().item(), rel=1e-5)
    # the last tokens one at a time, as a generation feeds them: every position still scored, full precision
    # unchanged, one entry per step (the last step has no next token to score)
    fresh = {"fp": DynamicCache(config=tiny_model.config), "q2": make_cache(tiny_model, cfg)}
    stepped = streaming_compare(tiny_model, ids, fresh, 32, reference="fp", decode_steps=6)
    assert stepped["q2"].chunk_tokens == [32, 32, 30, 1, 1, 1, 1, 1]
    assert stepped["fp"].nll == pytest.approx(results["fp"].nll, rel=1e-5)
    assert stepped["q2"].compared and stepped["q2"].mean_kl > 0
    assert fresh["q2"].get_seq_length() == 100
    with pytest.raises(ValueError, match="decode_steps"):
        streaming_compare(tiny_model, ids, {"fp": DynamicCache(config=tiny_model.config)}, 32, decode_steps=100)


def test_streaming_perplexity_matches_full_forward(tiny_model):
    ids = _ids(100)
    with torch.inference_mode():
        loss = tiny_model(input_ids=ids, labels=ids).loss.item()
    result = streaming_perplexity(tiny_model, ids, DynamicCache(config=tiny_model.config), 32)
    assert result.tokens == 99
    assert result.nll == pytest.approx(loss, rel=1e-5)


def test_full_precision_decode_storage_keeps_decoded_tokens(tiny_model):
    cfg = CompressionConfig(chunk_size=8, value_quant_groups=16, decode_storage="full_precision")
    cache = make_cache(tiny_model, cfg)
    chunked_prefill(tiny_model, _ids(16), cache, 8)
    for _ in range(10):
        chunked_prefill(tiny_model, _ids(1), cache, 8)
    assert cache.layers[0].n_blocks == 2
    assert cache.layers[0].keys.shape[-2] == 10


def test_sinks_kept_when_normal_and_high_bits_are_equal(tiny_model):
    """Sinks are excluded from the block ranges, so even at 8/8 bits they need their own copy."""
    ids = _ids(64)
    ref = chunk_logits(tiny_model, DynamicCache(config=tiny_model.config), ids, 32)
    cfg = CompressionConfig(chunk_size=32, value_quant_groups=16, key_bits_normal=8, value_bits_normal=8)
    cache = make_cache(tiny_model, cfg)
    got = chunk_logits(tiny_model, cache, ids, 32)
    assert cache.layers[0].groups[0].sinks
    torch.testing.assert_close(got, ref, atol=2e-3, rtol=1e-2)


def test_rotary_apply_matches_transformers_and_inverts(tiny_model):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    from kvstream.cache.rope import Rotary

    rotary = Rotary(tiny_model.model.rotary_emb)
    x = torch.randn(2, 2, 10, 16)
    positions = torch.arange(10).expand(2, 10) + torch.tensor([[0], [7]])
    cos, sin = rotary.cos_sin(x, positions)
    ref, _ = apply_rotary_pos_emb(x, x, cos.squeeze(1), sin.squeeze(1))
    torch.testing.assert_close(rotary.apply(x, cos, sin), ref)
    torch.testing.assert_close(rotary.invert(rotary.apply(x, cos, sin), cos, sin), x, atol=1e-5, rtol=1e-5)


def test_uneven_left_padding_keeps_every_sink_copy(tiny_model):
    """Rows of one block with different numbers of sinks (pads 14 and 15, chunk 16): every real sink is
    restored from its high-precision copy, never overwritten through a padded slot."""
    from kvstream.testing import prefilled_cache

    cfg = CompressionConfig(chunk_size=16, value_quant_groups=16, key_bits_normal=2, value_bits_normal=2)
    cache, _ = prefilled_cache(tiny_model, cfg, 48, batch=2, pads=(14, 15), seed=5)
    layer = cache.layers[0]
    index, sink_keys, _ = layer.sink_tokens()
    keys, _ = layer.restore_history()
    for row in range(2):
        for slot in range(index.shape[1]):
            token = int(index[row, slot])
            if token >= 0:
                torch.testing.assert_close(keys[row, :, token], sink_keys[row, :, slot], atol=1e-5, rtol=1e-5)
