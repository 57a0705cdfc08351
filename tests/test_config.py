"""CompressionConfig validation, YAML I/O and the --bits / grid grammars."""

from __future__ import annotations

import pytest

from kvstream.config import CONFIG_DIR, CompressionConfig, ConfigError, expand_grid, parse_bits, parse_grid


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"key_bits_normal": 5}, "key_bits_normal"),
        ({"value_bits_sink_outlier": 1}, "value_bits_sink_outlier"),
        ({"ema_decay": 1.0}, "ema_decay"),
        ({"ema_decay": 0.0}, "ema_decay"),
        ({"chunk_size": 0}, "chunk_size"),
        ({"key_rope": "middle"}, "key_rope"),
        ({"attention_sink_size": -1}, "attention_sink_size"),
        ({"key_symmetric": "yes"}, "key_symmetric"),
        ({"chunk_size": 2.5}, "chunk_size"),
        ({"scale_bits": 4}, "scale_bits"),
    ],
)
def test_invalid_values_name_the_field(changes, field):
    with pytest.raises(ConfigError, match=field):
        CompressionConfig(**changes)


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"key_bits_normal": 8, "key_bits_sink_outlier": 4}, "key_bits_sink_outlier"),
        ({"value_bits_normal": 16}, "value_bits_sink_outlier"),
        ({"key_bits_normal": 4, "key_bits_sink_outlier": 3}, "key_bits_sink_outlier"),
    ],
)
def test_high_bits_must_not_be_below_normal_bits(changes, field):
    with pytest.raises(ConfigError, match=f"{field}.*>= the normal one.*NORMAL/HIGH"):
        CompressionConfig(**changes)
    CompressionConfig(key_bits_normal=8, key_bits_sink_outlier=8, value_bits_normal=2, value_bits_sink_outlier=16)


def test_group_must_divide_head_dim():
    with pytest.raises(ConfigError, match="value_quant_groups"):
        CompressionConfig(value_quant_groups=48).validate(head_dim=64)
    CompressionConfig(value_quant_groups=32).validate(head_dim=64)


def test_yaml_round_trip(tmp_path):
    cfg = CompressionConfig(chunk_size=128, key_rope="post", ema_decay=0.5)
    cfg.to_yaml(tmp_path / "c.yaml")
    assert CompressionConfig.from_yaml(tmp_path / "c.yaml") == cfg
    (tmp_path / "bad.yaml").write_text("chunk_sise: 3\n")
    with pytest.raises(ConfigError, match="chunk_sise"):
        CompressionConfig.from_yaml(tmp_path / "bad.yaml")


def test_base_yaml_holds_the_defaults_and_presets_load():
    assert CompressionConfig.from_yaml(CONFIG_DIR / "base.yaml") == CompressionConfig()
    presets = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
    assert len(presets) >= 4
    for name in presets:
        CompressionConfig.from_yaml(name)


def test_bits_grammar():
    assert parse_bits("4/8") == {
        "key_bits_normal": 4,
        "value_bits_normal": 4,
        "key_bits_sink_outlier": 8,
        "value_bits_sink_outlier": 8,
    }
    assert parse_bits("3") == {"key_bits_normal": 3, "value_bits_normal": 3}
    for bad in ("4/", "x", "5", "4/8/16", "/8", ""):
        with pytest.raises(ConfigError, match="--bits"):
            parse_bits(bad)
    assert parse_bits("8/8")["key_bits_sink_outlier"] == 8
    for bad, example in (("4/3", "4/8"), ("16/8", "16/16"), ("8/2", "8/8")):
        with pytest.raises(
            ConfigError, match=f"--bits: {bad} reads as NORMAL/HIGH .* HIGH must be >= NORMAL.*{example}"
        ):
            parse_bits(bad)


def test_bits_on_the_defaults_bring_the_best_strategy_at_that_width():
    from kvstream.cli.config_fields import build_config
    from kvstream.config import BEST_AT_WIDTH

    assert parse_bits("2/8", strategy=True) == {**parse_bits("2/8"), **BEST_AT_WIDTH[2]}
    assert parse_bits("4/8", strategy=True) == parse_bits("4/8")  # 4 bits: plain uniform measured best
    best = build_config(None, "2/8")
    assert (best.rotation, best.value_quantizer, best.key_bits_normal) == ("values", "lloyd-max", 2)
    plain = build_config("base", "2/8")  # a config file keeps its own strategy: plain uniform by name
    assert (plain.rotation, plain.value_quantizer, plain.key_bits_normal) == ("none", "same", 2)
    for field, value in (("rotation", "none"), ("quantizer", "uniform"), ("value_quantizer", "same")):
        chosen = build_config(None, "3/8", {field: value})  # a strategy chosen on the command line replaces it
        assert (chosen.rotation, chosen.value_quantizer) == ("none", "same"), field
    kept = build_config(None, "3/8", {"chunk_size": "128"})  # other fields leave it
    assert (kept.rotation, kept.value_quantizer, kept.chunk_size) == ("values", "lloyd-max", 128)


def test_grid_grammar_and_product():
    grid = parse_grid(["chunk_size=128,256", "key_rope=pre,post"])
    assert grid == {"chunk_size": [128, 256], "key_rope": ["pre", "post"]}
    configs = expand_grid(CompressionConfig(), grid)
    assert [(c.chunk_size, c.key_rope) for c in configs] == [
        (128, "pre"),
        (128, "post"),
        (256, "pre"),
        (256, "post"),
    ]
    assert len({c.config_hash() for c in configs}) == 4
    for bad, msg in (
        ("chunk_size=", "empty"),
        ("chunk_size=abc", "chunk_size"),
        ("nope=1", "unknown"),
        ("chunk_size", "KEY=V1,V2"),
    ):
        with pytest.raises(ConfigError, match=msg):
            parse_grid([bad])
    with pytest.raises(ConfigError, match="ema_decay"):
        expand_grid(CompressionConfig(), parse_grid(["ema_decay=1.5"]))
