"""Strategies for quality per bit: Lloyd-Max levels, rotation, key token groups, a recent window, a bit budget."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import DynamicCache

from kvstream import CompressionConfig, chunked_prefill, make_cache
from kvstream.engine.prefill import forward_hidden
from kvstream.quant.lloyd_max import FittedLevelsQuantizer, LloydMaxQuantizer, gaussian_levels
from kvstream.quant.rotation import HeadRotation, base_matrix
from kvstream.quant.uniform import UniformQuantizer
from kvstream.testing import chunk_logits, random_ids, tiny_llama

FULL = dict(key_bits_normal=16, value_bits_normal=16, key_bits_sink_outlier=16, value_bits_sink_outlier=16)

# Max (1960), Table I: the optimum levels of the unit normal for 2, 4 and 8 levels (output levels y_i > 0)
MAX_1960 = {1: [0.7979], 2: [0.4528, 1.510], 3: [0.2451, 0.7560, 1.344, 2.152]}


@pytest.mark.parametrize("bits", sorted(MAX_1960))
def test_gaussian_levels_are_max_1960s(bits):
    levels = gaussian_levels(bits)
    assert torch.allclose(levels, -levels.flip(0))
    assert levels[len(levels) // 2 :].tolist() == pytest.approx(MAX_1960[bits], abs=6e-4)


def test_gaussian_levels_minimise_the_mean_squared_error_of_normal_samples():
    """Each level is the mean of its cell: the distortion of 4-bit levels on N(0, 1) is Max's 0.009497 (to noise)."""
    x = torch.randn(1_000_000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    levels = gaussian_levels(4)
    nearest = levels[(x.unsqueeze(-1) - levels).abs().argmin(-1)]
    assert float(((x - nearest) ** 2).mean()) == pytest.approx(0.009497, rel=0.03)


@settings(deadline=None, max_examples=40)
@given(
    bits=st.sampled_from([2, 3, 4]),
    symmetric=st.booleans(),
    fitted=st.booleans(),
    shape=st.tuples(st.integers(1, 3), st.integers(2, 40), st.integers(2, 33)),
    seed=st.integers(0, 2**16),
)
def test_levels_round_trip_to_the_nearest_level_of_each_slice(bits, symmetric, fitted, shape, seed):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 3 + 1
    quantizer = FittedLevelsQuantizer() if fitted else LloydMaxQuantizer()
    q = quantizer.quantize(x, bits, -1, symmetric)
    out = quantizer.dequantize(q)
    assert out.shape == x.shape and out.dtype == x.dtype
    if fitted:
        levels = q.extra["levels"].float()
        assert q.scale is None and levels.shape == (*shape[:-1], 1, 1 << bits)
    else:
        mean = torch.zeros(1) if symmetric else q.zero.float()
        levels = mean.unsqueeze(-1) + q.scale.float().unsqueeze(-1) * gaussian_levels(bits).float()
    # every entry is restored to the level of its slice nearest to it
    best = (x.unsqueeze(-1) - levels).abs().amin(-1)
    assert torch.allclose((out - x).abs(), best, atol=1e-5)


@pytest.mark.parametrize("bits", [2, 3])
def test_gaussian_levels_beat_uniform_ranges_on_gaussian_vectors(bits):
    x = torch.randn(64, 64, 64, generator=torch.Generator().manual_seed(1))

    def mse(quantizer, symmetric):
        return float(((quantizer.dequantize(quantizer.quantize(x, bits, -1, symmetric)) - x) ** 2).mean())

    lloyd = LloydMaxQuantizer()
    assert mse(lloyd, True) < 0.6 * mse(UniformQuantizer(), True)
    assert mse(lloyd, False) < mse(UniformQuantizer(), False)
    assert mse(FittedLevelsQuantizer(), True) < mse(lloyd, True)


def test_levels_quantizers_keep_masked_entries_out_of_the_statistics():
    x = torch.randn(4, 32, generator=torch.Generator().manual_seed(2))
    x[:, 0] = 1000.0
    mask = torch.ones_like(x, dtype=torch.bool)
    mask[:, 0] = False
    q = LloydMaxQuantizer().quantize(x, 2, -1, False, mask)
    assert float(q.scale.float().max()) < 5


@pytest.mark.parametrize("dim", [16, 64, 48])
def test_rotation_is_orthogonal_and_undone(dim):
    m = base_matrix(dim, 0)
    torch.testing.assert_close(m @ m.T, torch.eye(dim), atol=1e-5, rtol=0)
    rotation = HeadRotation(3, dim, seed=1, layer=2, device=torch.device("cpu"))
    x = torch.randn(2, 3, 5, dim)
    y = rotation.rotate(x)
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1))
    torch.testing.assert_close(rotation.unrotate(y), x, atol=1e-5, rtol=1e-5)
    other = HeadRotation(3, dim, seed=1, layer=3, device=torch.device("cpu"))
    assert not torch.equal(other.signs, rotation.signs)


def test_rotation_spreads_an_outlier_channel():
    x = torch.randn(1, 1, 256, 64, generator=torch.Generator().manual_seed(3))
    x[..., 7] *= 40
    y = HeadRotation(1, 64, seed=0, layer=0, device=torch.device("cpu")).rotate(x)
    assert x.abs().amax(-2).max() / x.abs().amax(-2).median() > 20
    assert y.abs().amax(-2).max() / y.abs().amax(-2).median() < 3


@pytest.mark.parametrize(
    "switches,fused",
    [
        (dict(rotation="both"), False),  # rotated keys sit between the codes and RoPE: the reference reads them
        (dict(rotation="values", value_quantizer="lloyd-max"), True),
        (dict(key_token_group=4), True),
        (dict(value_quantizer="lloyd-max-fitted"), False),  # levels per block: no table describes them
        (dict(recent_window=24), True),
    ],
)
def test_every_switch_is_exact_at_sixteen_bits_and_names_its_reader(tiny_model, switches, fused):
    ids = random_ids(70)
    ref = chunk_logits(tiny_model, DynamicCache(config=tiny_model.config), ids, 16)
    cache = make_cache(tiny_model, CompressionConfig(chunk_size=16, value_quant_groups=16, **FULL, **switches))
    torch.testing.assert_close(chunk_logits(tiny_model, cache, ids, 16), ref, atol=2e-5, rtol=1e-4)
    quantized = make_cache(tiny_model, CompressionConfig(chunk_size=16, value_quant_groups=16, **switches))
    chunk_logits(tiny_model, quantized, ids, 16)
    assert quantized.layers[0].n_blocks >= 1
    assert quantized.layers[0].kernel_ready() == fused
    assert (quantized.layers[0].kernel_refusal() is None) == fused


def test_rotation_and_levels_lower_two_bit_error(tiny_model):
    ids = random_ids(160)
    ref = chunk_logits(tiny_model, DynamicCache(config=tiny_model.config), ids, 16)

    def error(**switches) -> float:
        cfg = CompressionConfig(
            chunk_size=16, value_quant_groups=16, key_bits_normal=2, value_bits_normal=2, **switches
        )
        return float((chunk_logits(tiny_model, make_cache(tiny_model, cfg), ids, 16) - ref).abs().mean())

    assert error(rotation="values", value_quantizer="lloyd-max") < error()


def test_key_token_groups_add_their_metadata(tiny_model):
    ids = random_ids(64)
    reports = {}
    for group in (0, 8):
        cache = make_cache(tiny_model, CompressionConfig(chunk_size=32, value_quant_groups=16, key_token_group=group))
        chunked_prefill(tiny_model, ids, cache, 32)
        reports[group] = cache.memory_report()["breakdown"]
    # per key channel one fp16 scale and zero-point per group of 8 tokens instead of per block of 32:
    # 2 layers x 2 blocks x 2 KV heads x 16 channels x 2 bytes, three more times
    added = 3 * (2 * 2 * 2 * 16 * 2)
    assert reports[8]["scales"] - reports[0]["scales"] == added
    assert reports[8]["zero_points"] - reports[0]["zero_points"] == added
    assert reports[8]["codes"] == reports[0]["codes"]


def test_recent_window_keeps_the_last_tokens_exact(tiny_model):
    cache = make_cache(tiny_model, CompressionConfig(chunk_size=16, value_quant_groups=16, recent_window=20))
    chunked_prefill(tiny_model, random_ids(100), cache, 16)
    layer = cache.layers[0]
    assert layer.keys.shape[-2] >= 20 and layer.keys.shape[-2] < 20 + 16
    assert layer.packed_length + layer.keys.shape[-2] == 100


WIDE = dict(hidden_size=256, num_attention_heads=4, num_key_value_heads=4, head_dim=64)
"""A tiny model whose cache is large enough for the fixed tables not to outweigh a budget of 4 bits."""


@pytest.fixture(scope="module")
def wide_model():
    return tiny_llama(max_position_embeddings=1024, **WIDE)


def _generate(model, cache, ids, tokens: int) -> None:
    token = ids[:, -1:]
    with torch.inference_mode():
        for _ in range(tokens):
            hidden = forward_hidden(model, token, cache, cache.get_seq_length(), None)
            token = model.get_output_embeddings()(hidden[:, -1]).argmax(-1, keepdim=True)


BUDGET = CompressionConfig(
    chunk_size=64,
    value_quant_groups=64,
    key_bits_normal=2,
    value_bits_normal=2,
    bit_budget=4.0,
    tail_block=32,
    exact_storage="16bit",
)


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    prompt=st.integers(480, 900),
    answer=st.integers(0, 24),
    batch=st.sampled_from([1, 2]),
    tail_values=st.sampled_from(["exact", "packed"]),
)
def test_bit_budget_holds_at_the_end_of_a_generation(wide_model, prompt, answer, batch, tail_values):
    cache = make_cache(wide_model, BUDGET.replace(tail_values=tail_values))
    ids = random_ids(prompt, batch=batch)
    chunked_prefill(wide_model, ids, cache, 64)
    _generate(wide_model, cache, ids, answer)
    report = cache.memory_report()
    assert report["bits_per_element"] <= BUDGET.bit_budget
    chosen = report["bit_budget"]
    assert {layer.normal_bits for layer in cache.layers} == {(w, w) for w in chosen["widths"].values()}


def test_bit_budget_spends_what_it_has_on_the_layers_that_gain_most(wide_model):
    cache = make_cache(wide_model, BUDGET)
    chunked_prefill(wide_model, random_ids(700), cache, 64)
    chosen = cache.memory_report()["bit_budget"]
    assert max(chosen["mean_widths"].values()) > 2  # the budget is spent once the fixed costs are amortised
    budget = cache.budget
    for index, width in chosen["widths"].items():  # every narrower choice errs more
        assert all(budget.costs[index].error[w] > budget.costs[index].error[width] for w in (2, 3, 4) if w < width)
    assert [layer.groups[-1].keys.low.bits for layer in cache.layers] == list(chosen["widths"].values())


def test_bit_budget_reports_a_budget_its_fixed_costs_outweigh(tiny_model):
    cfg = CompressionConfig(
        chunk_size=32, value_quant_groups=16, key_bits_normal=2, value_bits_normal=2, bit_budget=3.0
    )
    cache = make_cache(tiny_model, cfg)
    chunked_prefill(tiny_model, random_ids(128), cache, 32)
    report = cache.memory_report()
    assert report["bits_per_element"] > 3.0
    assert report["bit_budget"]["plans_over_budget"] == report["bit_budget"]["plans"] > 0
    assert set(report["bit_budget"]["widths"].values()) == {2}


def test_sparse_outliers_are_kept_exactly_and_tighten_the_dense_range():
    from kvstream.quant.sparse import SPARSE_INDEX, SPARSE_VALUE, SparseOutliers

    x = torch.randn(2, 8, 64, generator=torch.Generator().manual_seed(4))
    x[0, 3, 5], x[1, 0, 60] = 40.0, -35.0
    dense, sparse = UniformQuantizer(), SparseOutliers(UniformQuantizer(), 0.01)
    q = sparse.quantize(x, 2, -1, False)
    assert q.extra[SPARSE_INDEX].dtype == torch.int16 and q.extra[SPARSE_INDEX].numel() == int(0.01 * x.numel())
    out = sparse.dequantize(q)
    assert out[0, 3, 5] == 40.0 and out[1, 0, 60] == -35.0
    assert float(((out - x) ** 2).mean()) < 0.7 * float(
        ((dense.dequantize(dense.quantize(x, 2, -1, False)) - x) ** 2).mean()
    )
    assert q.nbytes() == dense.quantize(x, 2, -1, False).nbytes() + 4 * q.extra[SPARSE_VALUE].numel()
    with pytest.raises(NotImplementedError, match="rows cannot be selected"):
        q.select_rows(0, torch.tensor([1]))


def test_sparse_outliers_through_the_cache(tiny_model):
    ids = random_ids(96)
    ref = chunk_logits(tiny_model, DynamicCache(config=tiny_model.config), ids, 16)
    errors = {}
    for fraction in (0.0, 0.02):
        cfg = CompressionConfig(
            chunk_size=16,
            value_quant_groups=16,
            key_bits_normal=2,
            value_bits_normal=2,
            sparse_outlier_fraction=fraction,
        )
        cache = make_cache(tiny_model, cfg)
        errors[fraction] = float((chunk_logits(tiny_model, cache, ids, 16) - ref).abs().mean())
    assert errors[0.02] < errors[0.0]


def test_ablation_presets_switch_each_strategy():
    from kvstream.cli.ablate import load_preset

    expected = {"rotation": 8, "levels": 6, "key-groups": 8, "sparse-window": 6}
    for name, count in expected.items():
        preset = load_preset(name)
        assert preset.description and preset.task == "perplexity"
        assert len(preset.configs(CompressionConfig())) == count, name
