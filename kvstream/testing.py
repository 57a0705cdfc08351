"""Small fixtures for tests of kvstream and of its plugins: a tiny random Llama and token ids."""

from __future__ import annotations

from typing import Any

import torch
from transformers import LlamaConfig, LlamaForCausalLM


def tiny_llama(seed: int = 0, **overrides: Any) -> LlamaForCausalLM:
    """A 2-layer GQA Llama (4 query / 2 KV heads, head_dim 16, vocabulary 128) with random weights."""
    torch.manual_seed(seed)
    params: dict[str, Any] = dict(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        rope_theta=10000.0,
        tie_word_embeddings=False,
    )
    params.update(overrides)
    return LlamaForCausalLM(LlamaConfig(**params)).eval()


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
