"""kvstream-kivi: a KIVI-style KV cache strategy (Liu et al., ICML 2024) for kvstream."""

from kvstream_kivi.cache import ENV_GROUP_SIZE, ENV_RESIDUAL, KiviBlock, KiviCache, KiviLayer

__version__ = "0.1.0"

__all__ = ["ENV_GROUP_SIZE", "ENV_RESIDUAL", "KiviBlock", "KiviCache", "KiviLayer"]
