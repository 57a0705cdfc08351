"""Entry-point discovery: built-in strategies, a throw-away plugin on sys.path, broken and clashing plugins."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest
import torch

from kvstream import CompressionConfig, chunked_prefill, make_cache, registry
from kvstream.cache.full import FullPrecisionCache
from kvstream.cache.streaming import StreamingQuantizedCache
from kvstream.quant.uniform import UniformQuantizer
from kvstream.registry import PluginError
from kvstream.stats.ema import StreamingStatisticsManager


def _ids(n: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 128, (1, n), generator=g)


def write_distribution(root: Path, name: str, entry_points: dict[str, dict[str, str]], version: str = "0.1") -> None:
    """An installed distribution as importlib.metadata sees it: ``NAME-VERSION.dist-info`` with two files."""
    info = root / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    lines = []
    for group, entries in entry_points.items():
        lines.append(f"[{group}]")
        lines.extend(f"{key} = {value}" for key, value in entries.items())
        lines.append("")
    (info / "entry_points.txt").write_text("\n".join(lines))


def write_module(root: Path, name: str, source: str) -> None:
    (root / f"{name}.py").write_text(textwrap.dedent(source))


@pytest.fixture
def site(tmp_path, monkeypatch):
    """A throw-away site directory on sys.path; registries are rediscovered before and after."""
    monkeypatch.syspath_prepend(str(tmp_path))
    registry.refresh()
    before = set(sys.modules)
    yield tmp_path
    for module in set(sys.modules) - before:
        if module.startswith("throwaway"):
            del sys.modules[module]
    registry.refresh()


THROWAWAY_QUANTIZER = '''
    """A test quantizer: kvstream's uniform one, counting its calls."""

    from kvstream.quant.uniform import UniformQuantizer


    class ThrowawayQuantizer(UniformQuantizer):
        """Uniform quantization that counts its calls."""

        calls = 0

        def quantize(self, x, bits, dim, symmetric=False, mask=None):
            type(self).calls += 1
            return super().quantize(x, bits, dim, symmetric, mask)
'''

THROWAWAY_CACHE = '''
    from kvstream.cache.full import FullPrecisionCache


    class ThrowawayCache(FullPrecisionCache):
        """A full-precision cache under another name."""
'''


# -- built-in strategies ------------------------------------------------------------------------------
def test_builtin_strategies_are_discovered_through_entry_points():
    registry.refresh()
    expected = {
        ("caches", "streaming"): StreamingQuantizedCache,
        ("caches", "full"): FullPrecisionCache,
        ("quantizers", "uniform"): UniformQuantizer,
        ("stats", "ema"): StreamingStatisticsManager,
    }
    for (group, name), obj in expected.items():
        assert name in registry.registry(group).names()
        info = next(i for i in registry.registry(group).infos() if i.name == name)
        assert info.package == "kvstream"
        assert info.error is None
        assert info.obj is obj
        assert info.description  # the first line of the docstring
        assert registry.get(group, name) is obj
    listed = {(i.group, i.name) for i in registry.all_plugins()}
    assert set(expected) <= listed


def test_unknown_name_and_group_are_refused_with_the_known_names():
    with pytest.raises(PluginError, match=r"unknown quantizer 'nope'.*uniform"):
        registry.get("quantizers", "nope")
    with pytest.raises(PluginError, match="unknown plugin group"):
        registry.registry("widgets")


def test_make_cache_names_the_missing_strategy(tiny_model):
    with pytest.raises(PluginError, match="nope"):
        make_cache(tiny_model, CompressionConfig(cache="nope"))


# -- a throw-away plugin ------------------------------------------------------------------------------
def test_throwaway_quantizer_is_discovered_and_drives_the_streaming_cache(site, tiny_model):
    write_module(site, "throwaway_quant", THROWAWAY_QUANTIZER)
    write_distribution(
        site, "throwaway-kv", {"kvstream.quantizers": {"throwaway": "throwaway_quant:ThrowawayQuantizer"}}
    )
    registry.refresh()

    info = next(i for i in registry.registry("quantizers").infos() if i.name == "throwaway")
    assert (info.package, info.version, info.error) == ("throwaway-kv", "0.1", None)
    assert info.description == "Uniform quantization that counts its calls."
    quantizer_cls = registry.get("quantizers", "throwaway")
    assert quantizer_cls.__module__ == "throwaway_quant"

    cfg = CompressionConfig(quantizer="throwaway", chunk_size=16, value_quant_groups=16)
    cache = make_cache(tiny_model, cfg)
    assert isinstance(cache.quantizer, quantizer_cls)
    logits = chunked_prefill(tiny_model, _ids(40), cache, 16)
    assert torch.isfinite(logits).all()
    assert quantizer_cls.calls > 0
    assert cache.layers[0].n_blocks == 2
    assert "uniform" in registry.registry("quantizers").names()  # the built-ins are still there


def test_throwaway_cache_is_built_by_name(site, tiny_model):
    write_module(site, "throwaway_cache", THROWAWAY_CACHE)
    write_distribution(site, "throwaway-cache", {"kvstream.caches": {"throwaway": "throwaway_cache:ThrowawayCache"}})
    registry.refresh()
    cache = make_cache(tiny_model, CompressionConfig(cache="throwaway"))
    assert type(cache).__name__ == "ThrowawayCache"
    chunked_prefill(tiny_model, _ids(20), cache, 8)
    assert cache.get_seq_length() == 20
    assert cache.memory_report()["elements"] == 2 * 2 * 20 * 16 * 2


def test_a_plugin_installed_later_needs_refresh(site):
    assert "late" not in registry.registry("quantizers").names()  # discovered (and cached) before it exists
    write_module(site, "throwaway_late", THROWAWAY_QUANTIZER)
    write_distribution(site, "throwaway-late", {"kvstream.quantizers": {"late": "throwaway_late:ThrowawayQuantizer"}})
    assert "late" not in registry.registry("quantizers").names()
    registry.refresh()
    assert "late" in registry.registry("quantizers").names()


# -- broken plugins -------------------------------------------------------------------------------------
def test_broken_plugins_are_reported_and_the_rest_stays_usable(site, tiny_model):
    write_module(site, "throwaway_broken", "raise ImportError('needs the frobnicator package')\n")
    write_module(
        site,
        "throwaway_partial",
        '''
        class HalfQuantizer:
            """Quantizes but cannot restore."""

            def quantize(self, x, bits, dim, symmetric=False, mask=None):
                return x

            dequantize = None
        ''',
    )
    write_module(site, "throwaway_quant", THROWAWAY_QUANTIZER)
    write_distribution(
        site,
        "throwaway-mixed",
        {
            "kvstream.quantizers": {
                "broken": "throwaway_broken:Quantizer",
                "half": "throwaway_partial:HalfQuantizer",
                "missing": "throwaway_partial:NoSuchQuantizer",
                "good": "throwaway_quant:ThrowawayQuantizer",
            },
            "kvstream.caches": {"badcache": "throwaway_partial:HalfQuantizer"},
        },
    )
    registry.refresh()

    infos = {i.name: i for i in registry.registry("quantizers").infos()}
    assert infos["broken"].error.startswith("failed to import throwaway_broken:Quantizer: ImportError")
    assert "needs the frobnicator package" in infos["broken"].error
    assert infos["broken"].description.startswith("BROKEN: ")
    assert "does not implement the quantizers interface (missing dequantize)" in infos["half"].error
    assert "AttributeError" in infos["missing"].error
    assert infos["good"].error is None and infos["uniform"].error is None
    for name, reason in (("broken", "frobnicator"), ("half", "missing dequantize"), ("missing", "AttributeError")):
        with pytest.raises(PluginError, match=rf"quantizers '{name}' is unusable: .*{reason}"):
            registry.get("quantizers", name)
    badcache = next(i for i in registry.registry("caches").infos() if i.name == "badcache")
    assert "missing from_model" in badcache.error
    with pytest.raises(PluginError, match="missing from_model"):
        make_cache(tiny_model, CompressionConfig(cache="badcache"))

    # every other strategy still loads and runs
    for name in ("uniform", "good"):
        cache = make_cache(tiny_model, CompressionConfig(quantizer=name, chunk_size=16, value_quant_groups=16))
        assert torch.isfinite(chunked_prefill(tiny_model, _ids(20), cache, 16)).all()
    assert any(i.name == "broken" and i.error for i in registry.all_plugins())


# -- name clashes ---------------------------------------------------------------------------------------
def test_two_distributions_registering_one_name_is_an_error_naming_both(site):
    write_module(site, "throwaway_quant", THROWAWAY_QUANTIZER)
    write_distribution(site, "throwaway-alpha", {"kvstream.quantizers": {"dupe": "throwaway_quant:ThrowawayQuantizer"}})
    write_distribution(site, "throwaway-beta", {"kvstream.quantizers": {"dupe": "throwaway_quant:ThrowawayQuantizer"}})
    registry.refresh()

    with pytest.raises(PluginError, match="registered by both") as excinfo:
        registry.get("quantizers", "dupe")
    assert "throwaway-alpha" in str(excinfo.value) and "throwaway-beta" in str(excinfo.value)

    dupes = [i for i in registry.registry("quantizers").infos() if i.name == "dupe"]
    assert sorted(i.package for i in dupes) == ["throwaway-alpha", "throwaway-beta"]  # each listed once
    for info in dupes:
        assert "throwaway-alpha" in info.error and "throwaway-beta" in info.error
    assert registry.get("quantizers", "uniform") is UniformQuantizer


def test_one_name_in_two_groups_is_no_clash(site):
    write_module(site, "throwaway_quant", THROWAWAY_QUANTIZER)
    write_module(site, "throwaway_cache", THROWAWAY_CACHE)
    write_distribution(site, "throwaway-one", {"kvstream.quantizers": {"same": "throwaway_quant:ThrowawayQuantizer"}})
    write_distribution(site, "throwaway-two", {"kvstream.caches": {"same": "throwaway_cache:ThrowawayCache"}})
    registry.refresh()
    assert registry.get("quantizers", "same").__name__ == "ThrowawayQuantizer"
    assert registry.get("caches", "same").__name__ == "ThrowawayCache"
