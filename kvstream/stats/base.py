"""The statistics-manager interface the streaming cache drives."""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch


@runtime_checkable
class StatsManager(Protocol):
    """Running per-layer statistics of keys and values, and the outliers they imply.

    ``keys`` and ``values`` are ``[batch, kv_heads, tokens, head_dim]`` (keys as quantized:
    pre- or post-RoPE); ``token_mask`` is ``[batch, tokens]``, True for tokens that count
    (not padding, not attention sinks).
    """

    def update(self, layer: int, keys: torch.Tensor, values: torch.Tensor, token_mask: torch.Tensor) -> None: ...

    def key_outliers(self, layer: int) -> torch.Tensor:
        """``[batch, kv_heads, head_dim]`` bool: key channels to keep at high precision."""
        ...

    def value_outliers(self, layer: int) -> torch.Tensor:
        """``[batch, kv_heads, groups]`` bool: value groups to keep at high precision."""
        ...

    def reset(self) -> None: ...

    def select_rows(self, index: torch.Tensor) -> None:
        """Keep batch rows ``index`` (any order, repeats allowed) of every layer's per-row statistics, so
        later blocks of a selected row quantize as they would have for that row (beam search)."""
        ...

    def layer_state(self, layer: int) -> Any:
        """A copy of ``layer``'s running statistics, to put back with `restore_layer_state`."""
        ...

    def restore_layer_state(self, layer: int, state: Any) -> None:
        """Put back what `layer_state` returned: the statistics before a block that is being dropped (crop)."""
        ...

    def snapshot(self) -> dict[int, dict[str, float]]:
        """Per layer: ``key_outlier_ratio`` and ``value_outlier_ratio`` (share of channels / groups)."""
        ...
