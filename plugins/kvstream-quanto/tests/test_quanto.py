"""The quanto cache strategy: built by name, close to full precision at 4 bits, bytes counted from quanto's tensors."""

from __future__ import annotations

import pytest
import torch
from kvstream_quanto import QuantoCache
from transformers import DynamicCache

from kvstream import CompressionConfig, chunked_prefill, make_cache, registry
from kvstream.testing import random_ids, tiny_llama


@pytest.fixture(scope="module")
def tiny_model() -> torch.nn.Module:
    return tiny_llama()


@pytest.fixture
def make_ids():
    """``make_ids(n, seed=1, batch=1)``: random token ids of the tiny vocabulary."""
    return random_ids


def _cfg(bits: int = 4, **changes) -> CompressionConfig:
    return CompressionConfig(
        cache="quanto", key_bits_normal=bits, value_bits_normal=bits, value_quant_groups=16, **changes
    )


def _logits(model, cache, ids, chunk):
    out = []
    with torch.inference_mode():
        for s in range(0, ids.shape[1], chunk):
            out.append(model(input_ids=ids[:, s : s + chunk], cache=cache, use_cache=True).logits)
    return torch.cat(out, dim=1)


def test_registered_and_built_by_name(tiny_model):
    assert registry.get("caches", "quanto") is QuantoCache
    info = next(i for i in registry.registry("caches").infos() if i.name == "quanto")
    assert info.package == "kvstream-quanto" and info.error is None
    cache = make_cache(tiny_model, _cfg())
    assert isinstance(cache, QuantoCache)
    assert len(cache.layers) == 2
    assert all(layer.nbits == 4 and layer.q_group_size == 16 and layer.residual_length == 128 for layer in cache.layers)


@pytest.mark.parametrize("bits", [3, 8, 16])
def test_refuses_widths_quanto_lacks(tiny_model, bits):
    config = _cfg(bits, key_bits_sink_outlier=max(bits, 8), value_bits_sink_outlier=max(bits, 8))
    with pytest.raises(ValueError, match="key_bits_normal"):
        make_cache(tiny_model, config)


def test_refuses_different_value_width(tiny_model):
    cfg = CompressionConfig(cache="quanto", key_bits_normal=4, value_bits_normal=2, value_quant_groups=16)
    with pytest.raises(ValueError, match="value_bits_normal"):
        make_cache(tiny_model, cfg)


def test_logits_close_to_full_precision_at_four_bits(tiny_model, make_ids):
    ids = make_ids(320)
    ref = _logits(tiny_model, DynamicCache(config=tiny_model.config), ids, 32)
    errors = {}
    for bits in (4, 2):
        got = _logits(tiny_model, make_cache(tiny_model, _cfg(bits)), ids, 32)
        errors[bits] = (got - ref).abs().mean().item()
    # the first chunk is attended in full precision; later ones read the quantized history
    assert errors[4] < 0.01
    assert errors[4] < errors[2]
    torch.testing.assert_close(_logits(tiny_model, make_cache(tiny_model, _cfg(4)), ids, 32), ref, atol=0.05, rtol=0.05)


@pytest.mark.parametrize("bits", [4, 2])
def test_memory_report_counts_the_packed_bytes(tiny_model, make_ids, bits):
    """One append of 256 tokens is quantized whole: codes at bits/8 bytes each, a scale and a shift per 16."""
    cache = make_cache(tiny_model, _cfg(bits))
    chunked_prefill(tiny_model, make_ids(256), cache, 256)
    report = cache.memory_report()
    elements = 2 * 2 * 256 * 16 * 2  # layers * kv heads * tokens * head_dim * (k, v)
    assert report["elements"] == elements
    breakdown = report["breakdown"]
    assert breakdown["codes"] == elements * bits // 8
    groups = elements // 16
    scale_size = cache.layers[0]._quantized_keys._scale.element_size()  # the model's dtype (fp32 here)
    assert breakdown["scales"] == groups * scale_size
    assert breakdown["zero_points"] == groups * scale_size
    assert "full_precision_tail" not in breakdown  # the residual is empty
    assert report["stored_bytes"] == sum(breakdown.values())
    assert report["stored_bytes"] < 4 * elements  # fp32 keys and values
    assert report["fp16_bytes"] == 2 * elements
    assert report["bits_per_element"] == pytest.approx(8 * report["stored_bytes"] / elements)
    assert set(report) == {
        "stored_bytes",
        "fp16_bytes",
        "bits_per_element",
        "ratio_to_fp16",
        "peak_stored_bytes",
        "elements",
        "breakdown",
        "by_device",
    }
    assert report["by_device"] == {"cpu": report["stored_bytes"]}


def test_residual_counted_and_peak_tracked(tiny_model, make_ids, monkeypatch):
    monkeypatch.setenv("KVSTREAM_QUANTO_RESIDUAL", "8")
    cache = make_cache(tiny_model, _cfg(4))
    assert cache.layers[0].residual_length == 8
    ids = make_ids(40)
    chunked_prefill(tiny_model, ids[:, :32], cache, 32)
    seen = [cache.memory_report()["stored_bytes"]]
    for i in range(7):  # seven tokens wait in the fp32 residual
        chunked_prefill(tiny_model, ids[:, 32 + i : 33 + i], cache, 1)
        seen.append(cache.memory_report()["stored_bytes"])
    report = cache.memory_report()
    assert report["breakdown"]["full_precision_tail"] == 2 * 2 * 7 * 16 * 2 * 4
    chunked_prefill(tiny_model, ids[:, 39:40], cache, 1)  # the eighth fills it: all of history re-quantized
    final = cache.memory_report()
    assert "full_precision_tail" not in final["breakdown"]
    assert final["elements"] == 2 * 2 * 40 * 16 * 2
    assert final["stored_bytes"] < max(seen)
    assert final["peak_stored_bytes"] == max(seen)


def test_generate_with_the_cache(tiny_model, make_ids):
    ids = make_ids(60)
    with torch.inference_mode():
        ref = tiny_model.generate(ids, max_new_tokens=8, do_sample=False)
        got = tiny_model.generate(ids, max_new_tokens=8, do_sample=False, cache=make_cache(tiny_model, _cfg(4)))
    assert got.shape == ref.shape
    # the prompt is attended in full precision, so the first new token matches exactly
    assert got[0, 60] == ref[0, 60]
