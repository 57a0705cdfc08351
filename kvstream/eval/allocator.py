"""Peak bytes the tensor allocator hands out inside a block: every transient counted, not sampled.

On CUDA this is the caching allocator's own peak (``torch.cuda.max_memory_allocated``); on the
CPU it replays the allocation and free events that ``torch.profiler`` records with
``profile_memory=True``, in time order, and takes the highest running total. Both are relative to
what was allocated on entry, so they measure the block alone.
"""

from __future__ import annotations

from types import TracebackType
from typing import Any

import torch


class AllocatorPeak:
    """Context manager: ``peak_bytes`` is the most memory allocated at once inside it, above the level at entry."""

    def __init__(self, device: Any = "cpu") -> None:
        self.device = torch.device(device)
        self.peak_bytes = 0
        self._profiler: Any = None
        self._start = 0

    def __enter__(self) -> AllocatorPeak:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
        else:
            from torch.profiler import ProfilerActivity, profile

            self._profiler = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
            self._profiler.__enter__()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = int(torch.cuda.max_memory_allocated(self.device)) - self._start
            return
        self._profiler.__exit__(exc_type, exc, tb)
        events = sorted(
            (e.start_ns(), e.nbytes())
            for e in self._profiler.profiler.kineto_results.events()
            if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU
        )
        level = peak = 0
        for _, nbytes in events:
            level += nbytes
            peak = max(peak, level)
        self.peak_bytes = peak
