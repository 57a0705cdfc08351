"""kvstream-quanto: transformers' quanto `QuantizedCache` as a kvstream cache strategy, with an honest byte count."""

from kvstream_quanto.cache import ENV_RESIDUAL, QUANTO_BITS, QuantoCache

__version__ = "0.1.0"

__all__ = ["ENV_RESIDUAL", "QUANTO_BITS", "QuantoCache"]
