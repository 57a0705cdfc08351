"""kvstream: quantize the KV cache of transformer models while the prompt is prefilled."""

from kvstream.config import CompressionConfig, ConfigError
from kvstream.engine import (
    PerplexityResult,
    chunked_prefill,
    greedy_generate,
    load_model,
    make_cache,
    streaming_perplexity,
)

__version__ = "0.1.0"

__all__ = [
    "CompressionConfig",
    "ConfigError",
    "PerplexityResult",
    "__version__",
    "chunked_prefill",
    "greedy_generate",
    "load_model",
    "make_cache",
    "streaming_perplexity",
]
