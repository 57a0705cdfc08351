"""`StreamingStatisticsManager`: EMA of per-channel key and per-group value absolute maxima."""

from __future__ import annotations

import torch

from kvstream.config import CompressionConfig


def outlier_mask(
    score: torch.Tensor, threshold_abs: float, threshold_relative: float, max_fraction: float
) -> torch.Tensor:
    """Units (last dim) whose score passes the absolute or the relative threshold, capped per head.

    The relative threshold compares against the median over all of a batch row's units in the
    layer (every head). At most ``floor(max_fraction * units)`` per head are kept, the largest
    scores first: each head stores as many high units as the head with most, so a cap across heads
    would pad every other head with a high-precision dummy (with one value group per head, values
    would cost the high width plus the normal one). Value groups therefore need at least
    ``1 / max_fraction`` groups per head to fire (8 at the default 0.125: ``value_quant_groups``
    of at most head_dim / 8).
    """
    flagged = torch.zeros_like(score, dtype=torch.bool)
    cap = int(max_fraction * score.shape[-1])
    if cap == 0:
        return flagged
    if threshold_abs > 0:
        flagged |= score > threshold_abs
    if threshold_relative > 0:
        median = score.flatten(1).median(dim=1).values.view(-1, *([1] * (score.dim() - 1)))
        flagged |= score > threshold_relative * median
    if cap < score.shape[-1]:
        top = score.topk(cap, dim=-1).indices
        flagged &= torch.zeros_like(score, dtype=torch.bool).scatter_(-1, top, True)
    return flagged


class StreamingStatisticsManager:
    """EMA (decay ``ema_decay``) of the absolute maximum of every key channel and value group.

    Statistics are kept per layer, batch row and KV head, updated chunk by chunk; tokens outside
    ``token_mask`` (padding, attention sinks) never enter them. A row's first counted chunk
    initialises its statistic; rows with no counted token in a chunk keep theirs.
    """

    def __init__(self, config: CompressionConfig) -> None:
        self.config = config
        self.key_ema: dict[int, torch.Tensor] = {}
        self.value_ema: dict[int, torch.Tensor] = {}
        self._seen: dict[int, torch.Tensor] = {}

    @staticmethod
    def _masked_absmax(x: torch.Tensor, token_mask: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
        m = token_mask[:, None, :, None].to(x.dtype)
        return (x.abs() * m).amax(dim=dims)

    def update(self, layer: int, keys: torch.Tensor, values: torch.Tensor, token_mask: torch.Tensor) -> None:
        group = self.config.value_quant_groups
        b, h, _, d = values.shape
        key_max = self._masked_absmax(keys.float(), token_mask, (2,))  # [B, H, D]
        value_max = self._masked_absmax(values.float(), token_mask, (2,)).view(b, h, d // group, group).amax(-1)
        counted = token_mask.any(dim=1)  # [B]
        if layer not in self.key_ema:
            self.key_ema[layer], self.value_ema[layer] = key_max, value_max
            self._seen[layer] = counted.clone()
            return
        seen = self._seen[layer]
        decay = self.config.ema_decay
        for ema, new in ((self.key_ema, key_max), (self.value_ema, value_max)):
            blended = decay * ema[layer] + (1 - decay) * new
            # first counted chunk of a row initialises it; rows with no counted token keep theirs
            blended = torch.where(seen[:, None, None], blended, new)
            ema[layer] = torch.where(counted[:, None, None], blended, ema[layer])
        self._seen[layer] = seen | counted

    def _mask(self, ema: torch.Tensor) -> torch.Tensor:
        c = self.config
        return outlier_mask(ema, c.outlier_threshold_abs, c.outlier_threshold_relative, c.max_outlier_fraction)

    def key_outliers(self, layer: int) -> torch.Tensor:
        return self._mask(self.key_ema[layer])

    def value_outliers(self, layer: int) -> torch.Tensor:
        return self._mask(self.value_ema[layer])

    def reset(self) -> None:
        self.key_ema.clear()
        self.value_ema.clear()
        self._seen.clear()

    def select_rows(self, index: torch.Tensor) -> None:
        for table in (self.key_ema, self.value_ema, self._seen):
            for layer, rows in table.items():
                table[layer] = rows.index_select(0, index.to(rows.device))

    def layer_state(self, layer: int) -> tuple[torch.Tensor, ...] | None:
        if layer not in self.key_ema:
            return None
        return tuple(table[layer].clone() for table in (self.key_ema, self.value_ema, self._seen))

    def restore_layer_state(self, layer: int, state: tuple[torch.Tensor, ...] | None) -> None:
        for i, table in enumerate((self.key_ema, self.value_ema, self._seen)):
            if state is None:
                table.pop(layer, None)
            else:
                table[layer] = state[i]

    def snapshot(self) -> dict[int, dict[str, float]]:
        return {
            layer: {
                "key_outlier_ratio": self.key_outliers(layer).float().mean().item(),
                "value_outlier_ratio": self.value_outliers(layer).float().mean().item(),
            }
            for layer in sorted(self.key_ema)
        }
