"""Small fixtures for tests of kvstream and of its plugins: tiny random decoders and token ids."""

from __future__ import annotations

from typing import Any

import torch
from transformers import LlamaConfig, LlamaForCausalLM

TINY: dict[str, Any] = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    tie_word_embeddings=False,
)
"""The size of every tiny test decoder: 2 layers, 4 query / 2 KV heads of 16, vocabulary 128."""


def tiny_llama(seed: int = 0, **overrides: Any) -> LlamaForCausalLM:
    """A 2-layer GQA Llama (4 query / 2 KV heads, head_dim 16, vocabulary 128) with random weights."""
    torch.manual_seed(seed)
    params: dict[str, Any] = {**TINY, "max_position_embeddings": 1024, "rope_theta": 10000.0, **overrides}
    return LlamaForCausalLM(LlamaConfig(**params)).eval()


def quiet_head_llama(scale: float = 1e-6) -> LlamaForCausalLM:
    """`tiny_llama` whose first KV head of layer 0 is scaled by ``scale``: steps fp16 cannot hold, so its
    blocks keep fp32 metadata (`kvstream.quant.scales`)."""
    model = tiny_llama()
    attention = model.model.layers[0].self_attn
    head_dim = TINY["hidden_size"] // TINY["num_attention_heads"]
    with torch.no_grad():
        attention.k_proj.weight[:head_dim] *= scale
        attention.v_proj.weight[:head_dim] *= scale
    return model


ROPE_FAMILIES: dict[str, dict[str, Any]] = {
    "llama": {},
    "llama-yarn": {
        "rope_parameters": {
            "rope_type": "yarn",
            "rope_theta": 10000.0,
            "factor": 4.0,
            "original_max_position_embeddings": 128,
        }
    },
    "mistral": {"sliding_window": 40},
    "qwen2": {},
    "qwen3": {},
    "gemma3_text": {
        "sliding_window": 24,
        "layer_types": ["sliding_attention", "sliding_attention", "full_attention"],
        "num_hidden_layers": 3,
        "query_pre_attn_scalar": 16,
    },
    "phi3": {"partial_rotary_factor": 0.5, "pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 2},
    "gpt_neox": {"partial_rotary_factor": 0.25},
    "stablelm": {"partial_rotary_factor": 0.25},
    "cohere": {"pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 2},
}
"""Tiny configurations of the RoPE decoders transformers ships, by family (``model_type``, then a variant):
per-layer-type tables and sliding windows (Gemma-3, Mistral), partial rotary (Phi-3, GPT-NeoX,
StableLM), interleaved pairs (Cohere), a scaled variant (YaRN) and the plain Llama / Qwen kind."""


def tiny_decoder(family: str, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides: Any) -> Any:
    """A 2-3 layer random decoder of ``family`` (a key of `ROPE_FAMILIES`): 4 query / 2 KV heads of 16."""
    from transformers import AutoConfig, AutoModelForCausalLM

    params = {**TINY, "head_dim": 16, "max_position_embeddings": 512, **ROPE_FAMILIES[family], **overrides}
    torch.manual_seed(seed)
    config = AutoConfig.for_model(family.split("-")[0], **params)
    return AutoModelForCausalLM.from_config(config).to(dtype).eval()


def chunk_logits(model: Any, cache: Any, ids: torch.Tensor, chunk: int) -> torch.Tensor:
    """Logits of every position of ``ids``, fed into ``cache`` ``chunk`` tokens per forward."""
    with torch.inference_mode():
        parts = [
            model(input_ids=ids[:, s : s + chunk], cache=cache, use_cache=True).logits
            for s in range(0, ids.shape[1], chunk)
        ]
    return torch.cat(parts, dim=1)


def random_ids(n: int, seed: int = 1, batch: int = 1, vocab: int = 128) -> torch.Tensor:
    """``[batch, n]`` token ids drawn with their own generator (reproducible, global seed untouched)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, n), generator=g)


def prefilled_cache(model: Any, config: Any, n: int, batch: int = 1, pads: tuple[int, ...] = (), seed: int = 1):
    """``(cache, attention_mask)``: ``n`` random prompt tokens per row prefilled in chunks, row i left-padded
    with ``pads[i]`` pads (mask None without pads)."""
    from kvstream import chunked_prefill, make_cache

    ids = random_ids(n, seed=seed, batch=batch)
    mask = None
    if pads:
        mask = torch.ones(batch, n, dtype=torch.long)
        for row, pad in enumerate(pads):
            mask[row, :pad] = 0
    cache = make_cache(model, config)
    chunked_prefill(model, ids, cache, config.chunk_size, attention_mask=mask)
    return cache, mask


def decode_mask(mask: torch.Tensor | None, length: int) -> torch.Tensor | None:
    """The model's bool mask of one query over ``length`` cached tokens, from a prompt's padding mask."""
    if mask is None:
        return None
    ones = mask.new_ones(mask.shape[0], length - mask.shape[1])
    return torch.cat([mask, ones], dim=1).bool()[:, None, None, :]
