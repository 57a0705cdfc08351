"""`CompressionConfig`: every knob of the streaming compressor, validated, with YAML I/O.

Also home of the two small grammars the CLI speaks: ``--bits N/M`` and ``KEY=V1,V2`` grids.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints

import yaml

ALLOWED_BITS = (2, 3, 4, 8, 16)
CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


class ConfigError(ValueError):
    """A configuration value or grammar that kvstream refuses; the message names the field."""


@dataclass(frozen=True)
class CompressionConfig:
    """Parameters of one compression run (seed parameters plus strategy names and ablation switches)."""

    chunk_size: int = 256
    """Tokens per prefill chunk; also the size of the full-precision tail flushed into a packed block."""
    ema_decay: float = 0.9
    """Weight of the running statistic against each new chunk's absolute maximum, in (0, 1)."""
    outlier_threshold_abs: float = 8.0
    """A key channel / value group whose EMA absmax exceeds this is an outlier (0 disables)."""
    outlier_threshold_relative: float = 4.0
    """...or whose EMA absmax exceeds this many times the head's median (0 disables)."""
    max_outlier_fraction: float = 0.125
    """Cap on the share of channels / groups per head kept at high precision."""
    attention_sink_size: int = 4
    """The first tokens of every sequence, stored at the high bit widths."""
    key_bits_normal: int = 4
    key_bits_sink_outlier: int = 8
    value_bits_normal: int = 4
    value_bits_sink_outlier: int = 8
    value_quant_groups: int = 64
    """Channels per value quantization group (one scale per token and group); must divide head_dim."""
    key_rope: Literal["pre", "post"] = "pre"
    """Quantize keys before RoPE (un-rotated, re-rotated on read) or after it."""
    key_symmetric: bool = False
    """Symmetric (scale only) instead of asymmetric (scale and zero-point) ranges for keys."""
    value_symmetric: bool = True
    """Values are centred near zero: a scale alone (no zero-point) halves their metadata."""
    scale_bits: int = 16
    """Bits of each scale of a 2- to 4-bit slice: 16 (fp16, fp32 where fp16 cannot hold it) or 8 (a logarithmic
    code, 12 per octave from 2**-14; see `kvstream.quant.scales`). Zero-points and wider slices stay 16-bit."""
    decode_storage: Literal["buffered", "full_precision"] = "buffered"
    """'buffered': decoded tokens wait in a full-precision tail until ``chunk_size`` of them are packed;
    'full_precision': decoded tokens are never quantized."""
    attention: Literal["packed", "restore"] = "packed"
    """'packed': kvstream's attention reads the packed history tile by tile (fused kernels where they fit);
    'restore': the cache hands the model a restored full-precision copy of the whole history."""
    quantizer: str = "uniform"
    """Entry-point name in ``kvstream.quantizers``."""
    stats: str = "ema"
    """Entry-point name in ``kvstream.stats``."""
    cache: str = "streaming"
    """Entry-point name in ``kvstream.caches``."""
    value_quantizer: str = "same"
    """Entry-point name in ``kvstream.quantizers`` for values; ``same``: the ``quantizer``."""
    rotation: Literal["none", "values", "keys", "both"] = "none"
    """A fixed random orthogonal transform per head (Hadamard with seeded signs) applied before quantization
    to values, keys (after RoPE is inverted) or both, and undone tile by tile on read."""
    rotation_seed: int = 0
    """Seed of the rotation's signs (and of its matrix when the head size is not a power of two)."""
    key_token_group: int = 0
    """Tokens sharing one key range per channel; 0: the whole block (``chunk_size``). Must divide it."""
    tail_block: int = 0
    """Tokens per block packed from the exact tail once attention has read them; 0: whole chunks only. With N,
    the prompt's last partial chunk and the generated tokens are packed N at a time, so fewer than N tokens
    (plus ``recent_window``) stay exact. Must divide ``chunk_size``; a ``key_token_group`` below N must divide N
    (above it, a tail block keeps one key range per channel)."""
    exact_storage: Literal["model", "16bit"] = "model"
    """How the exact tail is held: in the model's dtype, or at 16 bits (fp16, or bf16 for a layer whose values
    fp16 cannot hold); attention still computes in fp32. ``16bit`` applies when anything is quantized."""
    tail_values: Literal["exact", "packed"] = "exact"
    """'packed': values are quantized per token group once attention has read them exactly, 8 tokens or more at a
    time (at the layer's normal value width and outlier units), so only keys wait exact for their block; the block
    later takes those codes as they are. 'exact': values wait with the keys. Applies when anything is
    quantized; sink tokens and the ``recent_window`` stay exact."""
    recent_window: int = 0
    """The last tokens kept exact in the full-precision tail (besides the chunk being filled), counted in the bits."""
    sparse_outlier_fraction: float = 0.0
    """Share of each 2-4 bit block's entries, those furthest from their slice's mean in standard deviations,
    kept apart in fp16 with their positions (dense-and-sparse); 0 disables."""
    bit_budget: float = 0.0
    """Target effective bits per element; > 0 lets layers take 2, 3 or 4 normal bits, chosen from the first
    prefill chunk's statistics so the cache spends the budget where quantization errs most."""

    def __post_init__(self) -> None:
        self.validate()

    # -- validation ---------------------------------------------------------------------------------
    def validate(self, head_dim: int | None = None) -> None:
        """Refuse out-of-range values with a message naming the field; ``head_dim`` adds the group check."""
        hints = get_type_hints(type(self))
        for f in fields(self):
            value = getattr(self, f.name)
            hint = hints[f.name]
            if get_origin(hint) is Literal:
                if value not in get_args(hint):
                    raise ConfigError(f"{f.name}: {value!r} is not one of {', '.join(get_args(hint))}")
            elif hint is bool and not isinstance(value, bool):
                raise ConfigError(f"{f.name}: expected true or false, got {value!r}")
            elif hint is int and (isinstance(value, bool) or not isinstance(value, int)):
                raise ConfigError(f"{f.name}: expected an integer, got {value!r}")
            elif hint is float and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise ConfigError(f"{f.name}: expected a number, got {value!r}")
            elif hint is str and (not isinstance(value, str) or not value):
                raise ConfigError(f"{f.name}: expected a non-empty name, got {value!r}")
        for name in (
            "key_bits_normal",
            "key_bits_sink_outlier",
            "value_bits_normal",
            "value_bits_sink_outlier",
        ):
            if getattr(self, name) not in ALLOWED_BITS:
                raise ConfigError(f"{name}: {getattr(self, name)} bits is not one of {ALLOWED_BITS}")
        for kind in ("key", "value"):
            normal, high = getattr(self, f"{kind}_bits_normal"), getattr(self, f"{kind}_bits_sink_outlier")
            if high < normal:
                raise ConfigError(
                    f"{kind}_bits_sink_outlier: {high} bits is below {kind}_bits_normal ({normal}); sinks and "
                    f"outliers are kept at the high width, which must be >= the normal one "
                    f"(--bits NORMAL/HIGH, for example {bits_example(normal)})"
                )
        if self.scale_bits not in (8, 16):
            raise ConfigError(f"scale_bits: {self.scale_bits} is not one of (8, 16)")
        if self.chunk_size < 1:
            raise ConfigError(f"chunk_size: must be at least 1, got {self.chunk_size}")
        if not 0.0 < self.ema_decay < 1.0:
            raise ConfigError(f"ema_decay: must lie in (0, 1), got {self.ema_decay}")
        if self.outlier_threshold_abs < 0 or self.outlier_threshold_relative < 0:
            raise ConfigError("outlier_threshold_abs / outlier_threshold_relative: must be >= 0 (0 disables)")
        if not 0.0 <= self.max_outlier_fraction <= 1.0:
            raise ConfigError(f"max_outlier_fraction: must lie in [0, 1], got {self.max_outlier_fraction}")
        if self.attention_sink_size < 0:
            raise ConfigError(f"attention_sink_size: must be >= 0, got {self.attention_sink_size}")
        if self.value_quant_groups < 1:
            raise ConfigError(f"value_quant_groups: must be >= 1, got {self.value_quant_groups}")
        if self.key_token_group < 0 or (self.key_token_group and self.chunk_size % self.key_token_group):
            raise ConfigError(
                f"key_token_group: {self.key_token_group} must be 0 (whole block) "
                f"or divide chunk_size {self.chunk_size}"
            )
        if not 0.0 <= self.sparse_outlier_fraction <= 0.1:
            raise ConfigError(f"sparse_outlier_fraction: must lie in [0, 0.1], got {self.sparse_outlier_fraction}")
        if self.tail_block < 0 or (self.tail_block and self.chunk_size % self.tail_block):
            raise ConfigError(f"tail_block: {self.tail_block} must be 0 (off) or divide chunk_size {self.chunk_size}")
        if self.tail_block and 0 < self.key_token_group < self.tail_block and self.tail_block % self.key_token_group:
            raise ConfigError(
                f"tail_block: {self.tail_block} must be a multiple of key_token_group {self.key_token_group}"
            )
        if self.recent_window < 0:
            raise ConfigError(f"recent_window: must be >= 0, got {self.recent_window}")
        if self.bit_budget < 0 or 0 < self.bit_budget < 2:
            raise ConfigError(f"bit_budget: must be 0 (off) or at least 2 bits per element, got {self.bit_budget}")
        if head_dim is not None and head_dim % self.value_quant_groups:
            raise ConfigError(
                f"value_quant_groups: {self.value_quant_groups} does not divide the model's head_dim {head_dim}"
            )

    # -- derived ------------------------------------------------------------------------------------
    @property
    def nominal_bits(self) -> float:
        """Mean of the normal key and value bit widths: what ``--bits N`` names."""
        return (self.key_bits_normal + self.value_bits_normal) / 2

    def replace(self, **changes: Any) -> CompressionConfig:
        """A copy with ``changes`` applied (validated); unknown fields are refused by name."""
        unknown = set(changes) - field_names()
        if unknown:
            raise ConfigError(f"unknown config field(s): {', '.join(sorted(unknown))}")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def config_hash(self) -> str:
        """Stable short hash of every field: the identity of a run's compression settings."""
        blob = json.dumps(self.to_dict(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:12]

    # -- YAML -----------------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CompressionConfig:
        unknown = set(data) - field_names()
        if unknown:
            raise ConfigError(f"unknown config field(s): {', '.join(sorted(unknown))}")
        return cls(**data)

    @classmethod
    def from_yaml(cls, path: str | Path) -> CompressionConfig:
        """Load a YAML file; a bare name (``kivi-like``) is looked up in the bundled ``configs/``."""
        resolved = resolve_config_path(path)
        try:
            data = yaml.safe_load(resolved.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{resolved}: not valid YAML ({exc.__class__.__name__})") from exc
        if not isinstance(data, dict):
            raise ConfigError(f"{resolved}: expected a mapping of config fields")
        data.pop("description", None)
        return cls.from_dict(data)

    def to_yaml(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))


def field_names() -> set[str]:
    return {f.name for f in fields(CompressionConfig)}


def resolve_config_path(path: str | Path) -> Path:
    """A file path as given, or the bundled preset of that name."""
    candidate = Path(path)
    if candidate.is_file():
        return candidate
    preset = CONFIG_DIR / f"{path}.yaml"
    if preset.is_file():
        return preset
    from kvstream.suggest import did_you_mean

    hint = did_you_mean(str(path), (p.stem for p in CONFIG_DIR.glob("*.yaml")))
    raise ConfigError(f"config file not found: {path} ({hint}give a YAML path or a preset in {CONFIG_DIR})")


def parse_value(name: str, text: str) -> Any:
    """Convert the text of one field value to the field's type, or raise naming the field."""
    hints = get_type_hints(CompressionConfig)
    if name not in hints:
        raise ConfigError(f"unknown config field: {name!r} (see `kvstream eval --help` for the fields)")
    hint = hints[name]
    text = text.strip()
    if text == "":
        raise ConfigError(f"{name}: empty value")
    try:
        if hint is bool:
            lowered = text.lower()
            if lowered not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError
            return lowered in ("true", "1", "yes")
        if hint is int:
            return int(text)
        if hint is float:
            return float(text)
    except ValueError:
        raise ConfigError(f"{name}: {text!r} is not a valid {hint.__name__}") from None
    return text


def bits_example(normal: int) -> str:
    """A valid ``--bits NORMAL/HIGH`` for a normal width: sinks and outliers at 8 bits, or at the normal width above."""
    return f"{normal}/{max(normal, 8)}"


BEST_AT_WIDTH: dict[int, dict[str, Any]] = {
    2: dict(rotation="values", value_quantizer="lloyd-max"),
    3: dict(rotation="values", value_quantizer="lloyd-max"),
}
"""What ``--bits N/M`` adds to the default configuration at N = 2 or 3: the strategy that measured best per
bit at that width on the quality benchmark (a fixed rotation per head and Gaussian Lloyd-Max levels for
values: lower KL than plain uniform codes at the same effective bits, `docs/guide.md` gives the figures). A
config file keeps its own strategy (``--config base --bits 2/8`` is plain uniform 2-bit), and so does a
command line that chooses any of `STRATEGY_FIELDS` itself."""

STRATEGY_FIELDS = frozenset({"cache", "quantizer", "value_quantizer", "rotation"})
"""Fields that choose how codes are made: given on the command line, they replace the whole strategy."""


def parse_bits(spec: str, strategy: bool = False) -> dict[str, Any]:
    """``"N/M"`` or ``"N"`` -> field overrides: N for normal keys and values, M for sinks and outliers; with
    ``strategy`` (``--bits`` on the default configuration), also the best strategy known at width N
    (`BEST_AT_WIDTH`)."""
    parts = spec.split("/")
    if len(parts) > 2 or any(p.strip() == "" for p in parts):
        raise ConfigError(f"--bits: {spec!r} is not N or N/M (for example 4 or 4/8)")
    try:
        numbers = [int(p) for p in parts]
    except ValueError:
        raise ConfigError(f"--bits: {spec!r} is not N or N/M with integers (for example 4/8)") from None
    for n in numbers:
        if n not in ALLOWED_BITS:
            raise ConfigError(f"--bits: {n} is not one of {ALLOWED_BITS}")
    if len(numbers) == 2 and numbers[1] < numbers[0]:
        raise ConfigError(
            f"--bits: {spec} reads as NORMAL/HIGH (normal entries / sinks and outliers) and HIGH must be "
            f">= NORMAL, but {numbers[1]} < {numbers[0]}; for example {bits_example(numbers[0])}"
        )
    out: dict[str, Any] = {"key_bits_normal": numbers[0], "value_bits_normal": numbers[0]}
    if len(numbers) == 2:
        out.update(key_bits_sink_outlier=numbers[1], value_bits_sink_outlier=numbers[1])
    if strategy:
        out.update(BEST_AT_WIDTH.get(numbers[0], {}))
    return out


def parse_grid(specs: list[str]) -> dict[str, list[Any]]:
    """``["chunk_size=256,512", "ema_decay=0.9"]`` -> ``{"chunk_size": [256, 512], "ema_decay": [0.9]}``."""
    grid: dict[str, list[Any]] = {}
    for spec in specs:
        key, sep, values = spec.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"grid entry {spec!r} is not KEY=V1,V2 (for example chunk_size=256,512)")
        if key in grid:
            raise ConfigError(f"grid key {key!r} given twice")
        items = values.split(",")
        if any(item.strip() == "" for item in items):
            raise ConfigError(f"{key}: grid {spec!r} has an empty value (write {key}=V1,V2)")
        grid[key] = [parse_value(key, item) for item in items]
    return grid


def expand_grid(base: CompressionConfig, grid: dict[str, list[Any]]) -> list[CompressionConfig]:
    """The Cartesian product of ``grid`` applied to ``base``, in a stable order, each validated."""
    keys = list(grid)
    return [
        base.replace(**dict(zip(keys, combo, strict=True))) for combo in itertools.product(*(grid[k] for k in keys))
    ]
