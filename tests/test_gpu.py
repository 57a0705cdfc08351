"""The cache, its attention and the memory probes on a CUDA device (skipped on machines without one)."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from kvstream import CompressionConfig, chunked_prefill, make_cache
from kvstream.engine.prefill import greedy_generate
from kvstream.eval.allocator import AllocatorPeak
from kvstream.testing import random_ids, tiny_llama

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

FULL = dict(key_bits_normal=16, key_bits_sink_outlier=16, value_bits_normal=16, value_bits_sink_outlier=16)


@pytest.fixture(scope="module")
def cuda_model():
    return tiny_llama(max_position_embeddings=1024).to("cuda")


@pytest.mark.parametrize("key_rope", ["pre", "post"])
def test_sixteen_bits_on_cuda_equal_dynamic_cache(cuda_model, key_rope):
    ids = random_ids(70).cuda()
    logits = {}
    for name in ("dynamic", "packed"):
        cfg = CompressionConfig(chunk_size=16, value_quant_groups=16, key_rope=key_rope, **FULL)
        cache = DynamicCache(config=cuda_model.config) if name == "dynamic" else make_cache(cuda_model, cfg)
        with torch.inference_mode():
            logits[name] = torch.cat(
                [cuda_model(input_ids=ids[:, s : s + 16], cache=cache).logits for s in range(0, 70, 16)], 1
            )
    torch.testing.assert_close(logits["packed"], logits["dynamic"], atol=5e-5, rtol=1e-4)


def test_padded_batch_generates_on_cuda_like_restored_history(cuda_model):
    ids = random_ids(60, seed=8, batch=2).cuda()
    mask = torch.ones(2, 60, dtype=torch.long, device="cuda")
    mask[1, :9] = 0
    out = {}
    for attention in ("packed", "restore"):
        cache = make_cache(cuda_model, CompressionConfig(chunk_size=16, value_quant_groups=16, attention=attention))
        out[attention] = greedy_generate(cuda_model, ids, cache, 6, 16, attention_mask=mask, eos_token_ids={5})
        assert cache.positions.device.type == "cuda"
    assert torch.equal(out["packed"], out["restore"])


def test_allocator_peak_on_cuda():
    with AllocatorPeak("cuda") as peak:
        x = torch.empty(1 << 20, device="cuda")
        del x
    assert peak.peak_bytes >= 4 << 20


def test_prefill_on_cuda_runs_in_bf16(cuda_model):
    model = tiny_llama(max_position_embeddings=1024).to("cuda", torch.bfloat16)
    cache = make_cache(model, CompressionConfig(chunk_size=16, value_quant_groups=16))
    logits = chunked_prefill(model, random_ids(50).cuda(), cache, 16)
    assert logits.device.type == "cuda" and torch.isfinite(logits).all()
