"""Shared fixtures: a tiny random Llama for fast tests, the real SmolLM2 for `slow` ones."""

from __future__ import annotations

import pytest
from transformers import LlamaForCausalLM

from kvstream.testing import tiny_llama


@pytest.fixture(scope="session")
def tiny_model() -> LlamaForCausalLM:
    return tiny_llama(max_position_embeddings=512)


@pytest.fixture(scope="session")
def smollm2():
    """The bundled SmolLM2-135M-Instruct (converted once into the kvstream store)."""
    from kvstream import load_model

    return load_model("smollm2-135m")
