"""The codebook quantizer: packing, k-means fitting, error against uniform, use by the streaming cache."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from kvstream_codebook import CodebookQuantizer, default_table, kmeans_1d, normalise, synthetic_sample
from transformers import DynamicCache

from kvstream import CompressionConfig, chunked_prefill, make_cache, registry
from kvstream.quant import UniformQuantizer, packed_nbytes, unpack
from kvstream.testing import random_ids, tiny_llama


@pytest.fixture(scope="module")
def tiny_model() -> torch.nn.Module:
    return tiny_llama()


@pytest.fixture
def make_ids():
    """``make_ids(n, seed=1, batch=1)``: random token ids of the tiny vocabulary."""
    return random_ids


def _student_t(shape, seed=0, df=3.0):
    g = torch.Generator().manual_seed(seed)
    chi2 = (torch.randn((*shape, int(df)), generator=g) ** 2).sum(-1)
    return torch.randn(shape, generator=g) / torch.sqrt(chi2 / df)


@settings(deadline=None, max_examples=40)
@given(
    bits=st.sampled_from([2, 3, 4, 8]),
    shape=st.tuples(st.integers(1, 3), st.integers(1, 33), st.integers(1, 9)),
    symmetric=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_codes_round_trip_through_packing(bits, shape, symmetric, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * 3 + 1
    quantizer = CodebookQuantizer()
    q = quantizer.quantize(x, bits, dim=1, symmetric=symmetric)
    codes = unpack(q.codes, bits, x.numel()).view(shape).long()
    # the stored codes are the nearest table entries of the normalised values
    table = quantizer.table(bits).float()
    normalised = normalise(x, 1, symmetric)[0].clamp(-1, 1)
    distance = (normalised.unsqueeze(-1) - table).abs()
    chosen = distance.gather(-1, codes.unsqueeze(-1)).squeeze(-1)
    assert torch.all(chosen <= distance.amin(-1) + 1e-6)
    # bytes: dense codes, fp16 scale (and zero), the fp16 table unless it is the implicit 8-bit one
    table_bytes = 0 if bits == 8 else 2 * (1 << bits)
    meta = q.scale.numel() * 2 * (1 if symmetric else 2)
    assert q.nbytes() == packed_nbytes(x.numel(), bits) + meta + table_bytes
    restored = quantizer.dequantize(q)
    assert restored.shape == x.shape and restored.dtype == x.dtype
    # every restored value is one of the table's levels, rescaled
    levels = restored.float() - (0 if q.zero is None else q.zero.float())
    levels = levels / q.scale.float()
    wide = (q.scale.float() > 1e-2).expand_as(levels)  # groups with a real range (not a single value)
    assert torch.allclose(levels[wide], table[codes][wide], atol=2e-3)


@pytest.mark.parametrize("dim", [1, -1])
def test_error_lower_than_uniform_at_three_bits_on_heavy_tails(dim):
    x = _student_t((8, 256, 64), seed=3)
    cb, un = CodebookQuantizer(), UniformQuantizer()
    err_cb = (cb.dequantize(cb.quantize(x, 3, dim=dim)) - x).pow(2).mean()
    err_un = (un.dequantize(un.quantize(x, 3, dim=dim)) - x).pow(2).mean()
    assert err_cb < 0.9 * err_un


def test_kmeans_distortion_is_monotone_and_converges():
    sample = _student_t((200_000,), seed=5)
    sample = sample / sample.abs().max()
    result = kmeans_1d(sample, 8, max_iter=200, tol=1e-10)
    d = result.distortions
    assert len(d) >= 3
    assert all(b <= a * (1 + 1e-12) for a, b in zip(d, d[1:], strict=False))
    assert d[-1] < d[0]
    assert result.iterations < 200  # stopped on the tolerance, not the cap
    # the fixed point: every level is the mean of the samples nearest to it
    x = sample.double()
    table = result.table
    index = torch.bucketize(x, (table[1:] + table[:-1]) / 2)
    for k in range(8):
        members = x[index == k]
        assert members.numel() > 0
        assert abs(members.mean().item() - table[k].item()) < 1e-4


def test_fit_returns_sorted_levels_and_beats_uniform_levels():
    sample = synthetic_sample()
    for bits in (2, 3, 4):
        table = CodebookQuantizer.fit(sample, bits)
        assert table.numel() == 1 << bits
        assert torch.all(table[1:] >= table[:-1])
        assert table.abs().max() <= 1.0

        def distortion(t):
            return (sample - t[torch.bucketize(sample, (t[1:] + t[:-1]) / 2)]).pow(2).mean()

        assert distortion(table) < distortion(torch.linspace(-1, 1, 1 << bits))


def test_default_tables_are_deterministic_and_symmetricish():
    for bits in (2, 3, 4):
        table = default_table(bits)
        assert table.dtype == torch.float16 and table.numel() == 1 << bits
        fresh = kmeans_1d(synthetic_sample(), 1 << bits).table.half()
        assert torch.equal(table, fresh)
        assert torch.allclose(table.float(), -table.flip(0).float(), atol=0.05)
    assert torch.equal(default_table(8).float(), torch.linspace(-1, 1, 256).half().float())


def test_mask_excludes_entries_from_the_range():
    x = torch.tensor([[0.0, 1.0, 2.0, 100.0]])
    mask = torch.tensor([[True, True, True, False]])
    q = CodebookQuantizer().quantize(x, 4, dim=1, mask=mask)
    assert q.zero.item() == pytest.approx(1.0) and q.scale.item() == pytest.approx(1.0)
    restored = CodebookQuantizer().dequantize(q)
    assert (restored[0, :3] - x[0, :3]).abs().max() < 0.1
    assert restored[0, 3] <= 2.0 + 1e-3  # clamped into the counted range


def test_sixteen_bits_pass_through_and_eight_bits_store_no_table():
    x = torch.randn(2, 5, 7)
    q16 = CodebookQuantizer().quantize(x, 16, dim=1)
    assert q16.bits == 16 and CodebookQuantizer().dequantize(q16) is q16.codes
    q8 = CodebookQuantizer().quantize(x, 8, dim=1)
    assert q8.extra == {}
    assert (CodebookQuantizer().dequantize(q8) - x).abs().max() < 0.02 * x.abs().max()


def test_unknown_bits_refused():
    with pytest.raises(ValueError, match="bits"):
        CodebookQuantizer().quantize(torch.randn(4, 4), 12, dim=1)


def _kv_activations(model, ids):
    cache = DynamicCache(config=model.config)
    with torch.inference_mode():
        model(input_ids=ids, cache=cache, use_cache=True)
    return [(layer.keys, layer.values) for layer in cache.layers]


def test_from_calibration_fits_real_activations(tiny_model, make_ids, tmp_path, monkeypatch):
    kv = _kv_activations(tiny_model, make_ids(192, seed=11))
    items = []
    for keys, values in kv:
        items.append((keys, 2))  # keys per channel over tokens
        items.append((values.reshape(*values.shape[:3], 2, 8), -1))  # values per token in groups of 8
    calibrated = CodebookQuantizer.from_calibration(items, bits=(2, 3, 4))
    assert set(calibrated.tables) == {2, 3, 4}
    sample = torch.cat([normalise(t, d)[0].reshape(-1) for t, d in items])
    for bits in (2, 3, 4):
        table = calibrated.table(bits).float()
        assert not torch.equal(table, default_table(bits).float())

        def distortion(t):
            return (sample - t[torch.bucketize(sample, (t[1:] + t[:-1]) / 2)]).pow(2).mean()

        # fitted on these activations, the table suits them at least as well as the synthetic default
        assert distortion(table) <= distortion(default_table(bits).float()) * 1.001

    path = tmp_path / "tables.pt"
    calibrated.save(path)
    loaded = CodebookQuantizer.load(path)
    assert all(torch.equal(loaded.table(b), calibrated.table(b)) for b in (2, 3, 4))
    monkeypatch.setenv("KVSTREAM_CODEBOOK", str(path))
    by_name = registry.get("quantizers", "codebook")()
    assert torch.equal(by_name.table(3), calibrated.table(3))


def test_registered_by_name():
    assert registry.get("quantizers", "codebook") is CodebookQuantizer
    info = next(i for i in registry.registry("quantizers").infos() if i.name == "codebook")
    assert info.package == "kvstream-codebook" and info.error is None


def _logits(model, cache, ids, chunk):
    out = []
    with torch.inference_mode():
        for s in range(0, ids.shape[1], chunk):
            out.append(model(input_ids=ids[:, s : s + chunk], cache=cache, use_cache=True).logits)
    return torch.cat(out, dim=1)


def test_streaming_cache_uses_codebook_by_name(tiny_model, make_ids):
    ids = make_ids(96)
    ref = _logits(tiny_model, DynamicCache(config=tiny_model.config), ids, 32)
    errors = {}
    for bits in (4, 2):
        cfg = CompressionConfig(
            quantizer="codebook", chunk_size=32, value_quant_groups=16, key_bits_normal=bits, value_bits_normal=bits
        )
        cache = make_cache(tiny_model, cfg)
        assert isinstance(cache.quantizer, CodebookQuantizer)
        got = _logits(tiny_model, cache, ids, 32)
        errors[bits] = (got - ref).abs().mean().item()
        if bits == 4:
            torch.testing.assert_close(got, ref, atol=0.05, rtol=0.05)
            report = cache.memory_report()
            assert report["breakdown"]["codebooks"] > 0
            assert report["stored_bytes"] == sum(report["breakdown"].values())
            assert report["stored_bytes"] < report["fp16_bytes"]
    assert errors[4] < errors[2]
    assert errors[4] < 0.02


def test_codebook_error_comparable_to_uniform_in_the_cache(tiny_model, make_ids):
    """At 3 bits the codebook cache stays within reach of the uniform one on the same prompt."""
    ids = make_ids(128, seed=4)
    ref = _logits(tiny_model, DynamicCache(config=tiny_model.config), ids, 32)
    errors = {}
    for name in ("uniform", "codebook"):
        cfg = CompressionConfig(
            quantizer=name, chunk_size=32, value_quant_groups=16, key_bits_normal=3, value_bits_normal=3
        )
        cache = make_cache(tiny_model, cfg)
        chunked_prefill(tiny_model, ids[:, :96], cache, 32)
        got = _logits(tiny_model, cache, ids[:, 96:], 32)
        errors[name] = (got - ref[:, 96:]).abs().mean().item()
    assert errors["codebook"] < 1.5 * errors["uniform"]


def test_eight_bit_scales_refused_by_name(tiny_model):
    """The codebook quantizer stores no 8-bit scales: asking for them names it and the field, in one line."""
    from kvstream.config import ConfigError

    cfg = CompressionConfig(quantizer="codebook", chunk_size=32, value_quant_groups=16, scale_bits=8)
    with pytest.raises(ConfigError, match="scale_bits: 8 .*quantizer CodebookQuantizer"):
        make_cache(tiny_model, cfg)
