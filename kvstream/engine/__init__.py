"""Model loading, chunked prefill, greedy generation and streaming perplexity."""

from kvstream.engine.model import ModelGeometry, attention_windows, load_model, make_cache, model_geometry
from kvstream.engine.perplexity import PerplexityResult, streaming_compare, streaming_perplexity
from kvstream.engine.prefill import chunked_prefill, greedy_generate, position_ids_for

__all__ = [
    "ModelGeometry",
    "PerplexityResult",
    "attention_windows",
    "chunked_prefill",
    "greedy_generate",
    "load_model",
    "make_cache",
    "model_geometry",
    "position_ids_for",
    "streaming_compare",
    "streaming_perplexity",
]
