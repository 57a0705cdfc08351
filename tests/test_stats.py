"""EMA arithmetic, outlier detection, sink exclusion and the cache storing outliers at high bits."""

from __future__ import annotations

import pytest
import torch

from kvstream import CompressionConfig, chunked_prefill, make_cache
from kvstream.stats import StreamingStatisticsManager, outlier_mask


def _chunk(key_max: float, value_max: float, t: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    keys = torch.zeros(1, 1, t, 4)
    keys[..., 0, :] = key_max
    values = torch.zeros(1, 1, t, 4)
    values[..., 1, :] = -value_max
    return keys, values


def test_ema_arithmetic():
    cfg = CompressionConfig(ema_decay=0.75, value_quant_groups=2)
    stats = StreamingStatisticsManager(cfg)
    mask = torch.ones(1, 4, dtype=torch.bool)
    for k, v in ((2.0, 4.0), (6.0, 0.0), (1.0, 8.0)):
        stats.update(0, *_chunk(k, v), mask)
    expected_k = (0.75 * 2.0 + 0.25 * 6.0) * 0.75 + 0.25 * 1.0
    expected_v = (0.75 * 4.0 + 0.25 * 0.0) * 0.75 + 0.25 * 8.0
    assert stats.key_ema[0][0, 0].tolist() == pytest.approx([expected_k] * 4)
    assert stats.value_ema[0][0, 0].tolist() == pytest.approx([expected_v] * 2)


def test_masked_tokens_never_enter_statistics():
    stats = StreamingStatisticsManager(CompressionConfig(value_quant_groups=2))
    keys, values = _chunk(1.0, 1.0)
    keys[..., 0, :] = 1000.0  # a sink-like spike on token 0
    mask = torch.tensor([[False, True, True, True]])
    keys[..., 1, :] = 3.0
    stats.update(0, keys, values, mask)
    assert stats.key_ema[0].max().item() == 3.0


def test_rows_without_counted_tokens_keep_their_statistic():
    stats = StreamingStatisticsManager(CompressionConfig(ema_decay=0.5, value_quant_groups=2))
    k1, v1 = _chunk(2.0, 2.0)
    stats.update(0, k1.expand(2, -1, -1, -1), v1.expand(2, -1, -1, -1), torch.tensor([[True] * 4, [False] * 4]))
    k2, v2 = _chunk(4.0, 4.0)
    stats.update(0, k2.expand(2, -1, -1, -1), v2.expand(2, -1, -1, -1), torch.ones(2, 4, dtype=torch.bool))
    assert stats.key_ema[0][0, 0, 0].item() == pytest.approx(3.0)  # blended
    assert stats.key_ema[0][1, 0, 0].item() == pytest.approx(4.0)  # first counted chunk initialises


def test_outlier_thresholds_and_cap():
    score = torch.tensor([[[1.0, 1.0, 1.0, 1.0, 9.0, 5.0, 1.0, 1.0]]])
    assert outlier_mask(score, 8.0, 0.0, 1.0)[0, 0].tolist() == [False] * 4 + [True] + [False] * 3
    assert outlier_mask(score, 0.0, 4.0, 1.0)[0, 0].tolist() == [False] * 4 + [True, True] + [False] * 2
    assert outlier_mask(score, 0.0, 4.0, 0.125)[0, 0].tolist() == [False] * 4 + [True] + [False] * 3
    assert not outlier_mask(score, 0.0, 0.0, 1.0).any()


def test_value_outlier_groups_fire_per_head_with_enough_groups_and_never_pad_other_heads():
    """With 8 value groups per head the default cap (0.125) keeps one per head; with one group per head none
    fires: a cap across heads would make every head store a high-precision copy (see `outlier_mask`)."""
    values = torch.ones(2, 3, 4, 16)
    values[0, 1, :, 4:6] = 20.0  # row 0, head 1: group 2 of 8 far above the rest
    keys = torch.ones(2, 3, 4, 16)
    fine = StreamingStatisticsManager(CompressionConfig(value_quant_groups=2))
    fine.update(0, keys, values, torch.ones(2, 4, dtype=torch.bool))
    flagged = fine.value_outliers(0)
    assert flagged.shape == (2, 3, 8)
    assert flagged.nonzero().tolist() == [[0, 1, 2]]
    coarse = StreamingStatisticsManager(CompressionConfig(value_quant_groups=16))
    coarse.update(0, keys, values, torch.ones(2, 4, dtype=torch.bool))
    assert not coarse.value_outliers(0).any()


def test_reset_and_snapshot():
    cfg = CompressionConfig(value_quant_groups=2, outlier_threshold_abs=1.5, max_outlier_fraction=0.5)
    stats = StreamingStatisticsManager(cfg)
    keys, values = torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 4, 4)
    keys[..., 2] = 2.0  # one channel of four over the absolute threshold
    stats.update(3, keys, values, torch.ones(1, 4, dtype=torch.bool))
    assert stats.snapshot() == {3: {"key_outlier_ratio": 0.25, "value_outlier_ratio": 0.0}}
    stats.reset()
    assert stats.snapshot() == {}


def test_planted_outlier_channel_detected_and_stored_high(tiny_model):
    """A key channel scaled up 50x is flagged by the statistics and packed at 8 bits."""
    cfg = CompressionConfig(
        chunk_size=16,
        value_quant_groups=16,
        key_rope="post",
        key_bits_normal=2,
        value_bits_normal=2,
        outlier_threshold_abs=0.0,
        outlier_threshold_relative=6.0,
        attention="restore",  # the layer is driven directly, without a model's attention
    )
    cache = make_cache(tiny_model, cfg)
    layer = cache.layers[0]
    g = torch.Generator().manual_seed(0)
    keys = torch.randn(1, 2, 32, 16, generator=g)
    keys[:, 1, :, 5] *= 50.0
    values = torch.randn(1, 2, 32, 16, generator=g)
    layer.update(keys, values, kwargs={"position_ids": torch.arange(32)[None]})
    outliers = cache.stats.key_outliers(0)
    assert outliers[0, 1].nonzero().flatten().tolist() == [5]
    assert not outliers[0, 0].any()
    block = layer.groups[-1]
    assert block.keys.high.bits == 8 and block.keys.low.bits == 2
    high = block.keys.high_units()[-1]
    assert high[0, 1].nonzero().flatten().tolist() == [5]
    assert not high[0, 0].any()  # head 0 has none: its high slot holds the dummy unit
    restored, _ = layer.restore_history()
    err = (restored - keys).abs()
    step8 = keys[0, 1, 4:, 5].abs().max() * 2 / 255  # the 8-bit step of the outlier channel
    assert err[0, 1, 4:, 5].max() <= step8
    assert cache.stats.snapshot()[0]["key_outlier_ratio"] == pytest.approx(1 / 32)


def test_prefill_reports_outlier_ratios(tiny_model):
    cache = make_cache(tiny_model, CompressionConfig(chunk_size=16, value_quant_groups=16))
    chunked_prefill(tiny_model, torch.randint(0, 128, (1, 48)), cache, 16)
    snap = cache.outlier_snapshot()
    assert sorted(snap) == [0, 1]
    assert all(0.0 <= v <= 0.125 for row in snap.values() for v in row.values())
