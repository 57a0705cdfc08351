"""Shared fixtures: a tiny random Llama for fast tests, the real SmolLM2 for `slow` ones."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM


def tiny_llama(seed: int = 0, **overrides) -> LlamaForCausalLM:
    """A 2-layer GQA Llama (4 query / 2 KV heads, head_dim 16) with random weights."""
    torch.manual_seed(seed)
    params = dict(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rope_theta=10000.0,
        tie_word_embeddings=False,
    )
    params.update(overrides)
    model = LlamaForCausalLM(LlamaConfig(**params))
    model.eval()
    return model


@pytest.fixture(scope="session")
def tiny_model() -> LlamaForCausalLM:
    return tiny_llama()


@pytest.fixture(scope="session")
def smollm2():
    """The bundled SmolLM2-135M-Instruct (converted once into the kvstream store)."""
    from kvstream import load_model

    return load_model("smollm2-135m")
