"""Model loading, chunked prefill, greedy generation and streaming perplexity."""

from kvstream.engine.model import ModelGeometry, load_model, make_cache, model_geometry, rotary_module
from kvstream.engine.perplexity import PerplexityResult, streaming_perplexity
from kvstream.engine.prefill import chunked_prefill, greedy_generate, position_ids_for

__all__ = [
    "ModelGeometry",
    "PerplexityResult",
    "chunked_prefill",
    "greedy_generate",
    "load_model",
    "make_cache",
    "model_geometry",
    "position_ids_for",
    "rotary_module",
    "streaming_perplexity",
]
