"""Cache strategies: the streaming quantized cache and the full-precision baseline."""

from kvstream.cache.full import FullPrecisionCache
from kvstream.cache.memory import MemoryLedger, MemoryReport
from kvstream.cache.streaming import StreamingQuantizedCache

__all__ = ["FullPrecisionCache", "MemoryLedger", "MemoryReport", "StreamingQuantizedCache"]
