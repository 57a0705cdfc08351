"""kvstream: quantize the KV cache of transformer models while the prompt is prefilled.

The engine functions load lazily, so ``import kvstream`` (and the CLI's help and completion)
does not pay for importing torch and transformers.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

from kvstream.config import CompressionConfig, ConfigError

__version__ = "0.1.0"

_ENGINE = {
    "PerplexityResult",
    "chunked_prefill",
    "greedy_generate",
    "load_model",
    "make_cache",
    "streaming_compare",
    "streaming_perplexity",
}

__all__ = ["CompressionConfig", "ConfigError", "__version__", *sorted(_ENGINE)]


def __getattr__(name: str) -> Any:
    if name in _ENGINE:
        return getattr(import_module("kvstream.engine"), name)
    raise AttributeError(f"module 'kvstream' has no attribute {name!r}")
