"""kvstream's attention over packed history: readers against the reference, the model path against
DynamicCache and the restored-history path, and the memory a step materialises."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import DynamicCache

from kvstream import CompressionConfig, chunked_prefill, make_cache
from kvstream.attention.packed import flash_history, packed_attention, reference_history
from kvstream.engine.prefill import greedy_generate
from kvstream.eval.allocator import AllocatorPeak
from kvstream.kernels import PackedDecode, decode_kernel_for
from kvstream.kernels import cpu as cpu_kernel
from kvstream.kernels.online import OnlineSoftmax
from kvstream.testing import decode_mask, prefilled_cache, quiet_head_llama, random_ids, tiny_llama

FULL = dict(key_bits_normal=16, key_bits_sink_outlier=16, value_bits_normal=16, value_bits_sink_outlier=16)


def _read(reader, layer, q, mask, n_rep):
    state = OnlineSoftmax()
    reader(layer, q, mask, n_rep, state)
    return state.result(), state.m


def test_cpu_kernel_builds():
    assert cpu_kernel.extension() is not None


def test_kernel_builds_are_kept_per_instruction_set(monkeypatch):
    here = cpu_kernel.build_name()
    monkeypatch.setattr(cpu_kernel, "instruction_set", lambda: "another CPU")
    assert cpu_kernel.build_name() != here


def test_a_built_kernel_loads_without_compiling(monkeypatch):
    import torch.utils.cpp_extension

    assert cpu_kernel.extension() is not None  # built by `make setup` (or the first test)
    monkeypatch.setattr(torch.utils.cpp_extension, "load", lambda **_: pytest.fail("compiled again"))
    assert cpu_kernel.build().__file__.endswith(f"{cpu_kernel.build_name()}.so")


def test_without_a_compiler_the_reference_runs_after_one_line(monkeypatch, tiny_model):
    def no_compiler():
        raise RuntimeError("Error building extension 'kvstream_packed_decode'\nc++: not found\n...")

    monkeypatch.setattr(cpu_kernel, "build", no_compiler)
    cpu_kernel.extension.cache_clear()
    try:
        with pytest.warns(UserWarning) as record:
            assert cpu_kernel.extension() is None
        (line,) = [str(w.message) for w in record]
        assert "\n" not in line and "Error building extension" in line and "reference attention path" in line
        cache, _ = prefilled_cache(tiny_model, CompressionConfig(chunk_size=16, value_quant_groups=8), 40)
        assert decode_kernel_for(cache.layers[0], torch.zeros(1, 4, 1, 16)) is None
    finally:
        cpu_kernel.extension.cache_clear()


@pytest.mark.parametrize("key_bits,value_bits", [(2, 2), (3, 3), (4, 4), (8, 8), (2, 4), (4, 3)])
@pytest.mark.parametrize("key_rope", ["pre", "post"])
def test_decode_kernel_matches_reference(tiny_model, key_bits, value_bits, key_rope):
    cfg = CompressionConfig(
        chunk_size=16,
        value_quant_groups=8,
        key_bits_normal=key_bits,
        value_bits_normal=value_bits,
        key_rope=key_rope,
        outlier_threshold_abs=0.0,
        outlier_threshold_relative=1.5,  # several outlier channels and groups per head
        max_outlier_fraction=0.25,
    )
    cache, _ = prefilled_cache(tiny_model, cfg, 75)
    layer = cache.layers[1]
    if key_bits < cfg.key_bits_sink_outlier:
        assert any(g.keys.high is not None for g in layer.groups), "the case must hold outlier channels"
    assert layer.sink_tokens() is not None
    q = torch.randn(1, 2, 2, 16, generator=torch.Generator().manual_seed(3))
    kernel = decode_kernel_for(layer, torch.zeros(1, 4, 1, 16))
    assert isinstance(kernel, PackedDecode)
    got, _ = _read(kernel, layer, q, None, 2)
    want, _ = _read(reference_history, layer, q, None, 2)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    bits=st.sampled_from([2, 3, 4, 8]),
    chunk=st.sampled_from([8, 16, 24]),
    length=st.integers(min_value=30, max_value=90),
    pads=st.tuples(st.integers(0, 20), st.integers(0, 20)),
    symmetric=st.booleans(),
    seed=st.integers(0, 1000),
)
def test_decode_kernel_matches_reference_on_padded_batches(tiny_model, bits, chunk, length, pads, symmetric, seed):
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
    kernel = decode_kernel_for(layer, torch.zeros(2, 4, 1, 16))
    assert kernel is not None
    got, m_got = _read(kernel, layer, q, step_visible, 2)
    want, m_want = _read(reference_history, layer, q, step_visible, 2)
    seen = torch.isfinite(m_want)  # rows whose every packed token is padding see nothing in the history
    assert torch.equal(seen, torch.isfinite(m_got))
    torch.testing.assert_close(got[seen], want[seen], atol=3e-5, rtol=1e-4)
    # the whole step, tail included, as the model calls it
    query = torch.randn(2, 4, 1, 16, generator=torch.Generator().manual_seed(seed + 1))
    step_mask = decode_mask(mask, layer.length)
    fused = packed_attention(layer, query, layer.keys, layer.values, step_mask, 0.25, kernel)
    reference = packed_attention(layer, query, layer.keys, layer.values, step_mask, 0.25, reference_history)
    torch.testing.assert_close(fused, reference, atol=3e-5, rtol=1e-4)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_decode_kernel_reads_fp32_metadata(bits):
    """A head too quiet for fp16 steps is stored with fp32 metadata; the kernel reads it like the reference."""
    cfg = CompressionConfig(chunk_size=16, value_quant_groups=8, key_bits_normal=bits, value_bits_normal=bits)
    cache, _ = prefilled_cache(quiet_head_llama(), cfg, 70)
    layer = cache.layers[0]
    assert any(g.keys.low.scale.dtype == torch.float32 for g in layer.groups)
    assert any(g.values.low.scale.dtype == torch.float32 for g in layer.groups)
    kernel = decode_kernel_for(layer, torch.zeros(1, 4, 1, 16))
    assert isinstance(kernel, PackedDecode)
    q = torch.randn(1, 2, 2, 16, generator=torch.Generator().manual_seed(bits))
    q[:, 0] *= 1e6  # scores of the quiet head's keys of order one
    got, _ = _read(kernel, layer, q, None, 2)
    want, _ = _read(reference_history, layer, q, None, 2)
    loud = torch.tensor([1e6, 1.0])[None, :, None, None]  # outputs of the quiet head's values of order one
    torch.testing.assert_close(got * loud, want * loud, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("bits", [2, 4, 16])
def test_flash_tiles_match_reference(tiny_model, bits):
    high = dict(key_bits_sink_outlier=16, value_bits_sink_outlier=16) if bits == 16 else {}
    cfg = CompressionConfig(chunk_size=16, value_quant_groups=16, key_bits_normal=bits, value_bits_normal=bits, **high)
    cache, mask = prefilled_cache(tiny_model, cfg, 70, batch=2, pads=(0, 19))
    layer = cache.layers[0]
    q = torch.randn(2, 2, 10, 16, generator=torch.Generator().manual_seed(5))  # 2 heads x 5 queries per KV head
    length = layer.length + 5
    full = decode_mask(mask, length)[:, :, :, :].expand(2, 1, 5, length)
    got, _ = _read(flash_history, layer, q, full, 2)
    want, _ = _read(reference_history, layer, q, full, 2)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("kernels", ["0", "1"])
@pytest.mark.parametrize("key_rope", ["pre", "post"])
def test_sixteen_bits_through_packed_attention_equal_dynamic_cache(tiny_model, monkeypatch, kernels, key_rope):
    """Prefill in chunks and decode: the packed path at 16 bits gives DynamicCache's logits."""
    monkeypatch.setenv("KVSTREAM_KERNELS", kernels)
    ids = random_ids(53, seed=4)
    logits = {}
    for name in ("dynamic", "packed"):
        cfg = CompressionConfig(chunk_size=16, value_quant_groups=16, key_rope=key_rope, **FULL)
        cache = DynamicCache(config=tiny_model.config) if name == "dynamic" else make_cache(tiny_model, cfg)
        with torch.inference_mode():
            steps = [tiny_model(input_ids=ids[:, s : s + 16], cache=cache).logits for s in range(0, 48, 16)]
            steps += [tiny_model(input_ids=ids[:, s : s + 1], cache=cache).logits for s in range(48, 53)]
        logits[name] = torch.cat(steps, dim=1)
    torch.testing.assert_close(logits["packed"], logits["dynamic"], atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("kernels", ["0", "1"])
def test_packed_attention_equals_restored_history(tiny_model, monkeypatch, kernels):
    """At 4 bits the tiled path and the restored-copy path read the same stored values."""
    monkeypatch.setenv("KVSTREAM_KERNELS", kernels)
    ids = random_ids(60, seed=8, batch=2)
    mask = torch.ones(2, 60, dtype=torch.long)
    mask[1, :9] = 0
    out = {}
    for attention in ("packed", "restore"):
        cfg = CompressionConfig(chunk_size=16, value_quant_groups=16, attention=attention)
        cache = make_cache(tiny_model, cfg)
        out[attention] = greedy_generate(tiny_model, ids, cache, 6, 16, attention_mask=mask)
    assert torch.equal(out["packed"], out["restore"])


def test_generate_equals_chunked_prefill_and_greedy_decoding(tiny_model):
    cfg = CompressionConfig(chunk_size=16, value_quant_groups=16)
    ids = random_ids(40, seed=9)
    with torch.inference_mode():
        cache = make_cache(tiny_model, cfg)
        chunked_prefill(tiny_model, ids[:, :-1], cache, 16)
        got = tiny_model.generate(ids, cache=cache, max_new_tokens=8, do_sample=False, pad_token_id=0)[:, 40:]
    want = greedy_generate(tiny_model, ids, make_cache(tiny_model, cfg), 8, 16)
    assert torch.equal(got, want)


def test_cache_refuses_a_model_switched_away_from_kvstream_attention(tiny_model):
    model = tiny_llama(seed=3)
    cache = make_cache(model, CompressionConfig(chunk_size=16, value_quant_groups=16))
    model.set_attn_implementation("sdpa")
    with pytest.raises(RuntimeError, match="attention implementation is now 'sdpa'"):
        chunked_prefill(model, random_ids(20), cache, 16)


@pytest.fixture(scope="module")
def wide_model():
    """2 layers, 4 KV heads of 64 channels: one layer's fp32 history of 8192 tokens is 16 MiB."""
    return tiny_llama(
        hidden_size=256, num_attention_heads=4, num_key_value_heads=4, head_dim=64, max_position_embeddings=16384
    )


@pytest.mark.parametrize("kernels", ["0", "1"])
def test_a_step_never_materialises_the_full_history(wide_model, monkeypatch, kernels):
    """The allocator's peak over a decode step and a prefill chunk stays far below one layer's fp32 history,
    while the restored-history path exceeds it."""
    monkeypatch.setenv("KVSTREAM_KERNELS", kernels)
    n = 8192
    one_layer_history = n * 4 * 64 * 4 * 2
    ids = random_ids(n + 1 + 64, seed=2)
    peaks = {}
    for attention in ("packed", "restore"):
        cfg = CompressionConfig(chunk_size=256, attention=attention)
        cache = make_cache(wide_model, cfg)
        chunked_prefill(wide_model, ids[:, :n], cache, 256)
        with torch.inference_mode(), AllocatorPeak() as decode:
            wide_model(input_ids=ids[:, n : n + 1], cache=cache)
        with torch.inference_mode(), AllocatorPeak() as chunk:
            wide_model(input_ids=ids[:, n + 1 :], cache=cache)
        peaks[attention] = (decode.peak_bytes, chunk.peak_bytes)
        if attention == "packed":
            assert cache.memory_report()["peak_stored_bytes"] > cache.memory_report()["stored_bytes"]
    assert max(peaks["packed"]) < one_layer_history / 2
    assert min(peaks["restore"]) > one_layer_history
