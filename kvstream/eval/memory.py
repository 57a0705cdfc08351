"""Peak memory of a block of code: process RSS sampled by a background thread, and accelerator memory."""

from __future__ import annotations

import threading
from types import TracebackType
from typing import Any

import psutil
import torch


def accelerator_available(device: Any = None) -> bool:
    """True when ``device`` (default: the current CUDA device, if any) is a CUDA device that exists."""
    if device is not None and torch.device(device).type != "cuda":
        return False
    return bool(torch.cuda.is_available())


class MemoryMonitor:
    """Context manager recording the peak resident set size and the peak CUDA allocation inside it.

    RSS is read with psutil on entry, every ``interval`` seconds from a daemon thread, and on exit;
    the peak is the largest reading (``ru_maxrss`` is not used: it never goes down, so it cannot
    measure one block of a longer process). With CUDA available, the allocator's peak statistics
    are reset on entry and ``torch.cuda.max_memory_allocated`` read on exit; otherwise
    ``peak_accelerator_bytes`` stays None.
    """

    def __init__(self, interval: float = 0.02, device: Any = None) -> None:
        if interval <= 0:
            raise ValueError(f"interval must be positive, got {interval}")
        self.interval = interval
        self.device = device
        self.start_rss_bytes = 0
        self.peak_rss_bytes = 0
        self.end_rss_bytes = 0
        self.peak_accelerator_bytes: int | None = None
        self.readings = 0
        self._process = psutil.Process()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def _read(self) -> int:
        try:
            rss = int(self._process.memory_info().rss)
        except psutil.Error:
            return 0
        with self._lock:
            self.readings += 1
            self.peak_rss_bytes = max(self.peak_rss_bytes, rss)
        return rss

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self._read()

    def __enter__(self) -> MemoryMonitor:
        self.peak_rss_bytes = 0
        self.readings = 0
        self.peak_accelerator_bytes = None
        if accelerator_available(self.device):
            torch.cuda.reset_peak_memory_stats(self.device)
        self.start_rss_bytes = self._read()
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="kvstream-memory-monitor", daemon=True)
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self.end_rss_bytes = self._read()  # folded into the peak like every reading
        if accelerator_available(self.device):
            self.peak_accelerator_bytes = int(torch.cuda.max_memory_allocated(self.device))

    def as_dict(self) -> dict[str, int | None]:
        return {
            "start_rss_bytes": self.start_rss_bytes,
            "peak_rss_bytes": self.peak_rss_bytes,
            "end_rss_bytes": self.end_rss_bytes,
            "peak_accelerator_bytes": self.peak_accelerator_bytes,
        }
