"""Streaming statistics managers."""

from kvstream.stats.base import StatsManager
from kvstream.stats.ema import StreamingStatisticsManager, outlier_mask

__all__ = ["StatsManager", "StreamingStatisticsManager", "outlier_mask"]
