"""Loading a model and reading the geometry the caches need from it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from kvstream.config import CompressionConfig, ConfigError
from kvstream.engine.placement import DeviceMap, main_device, offload_folder


@dataclass(frozen=True)
class ModelGeometry:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    max_positions: int


def model_geometry(model: Any) -> ModelGeometry:
    """Layers, KV heads and head size of a decoder, from its (text) config."""
    config = model.config.get_text_config(decoder=True)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return ModelGeometry(
        num_layers=config.num_hidden_layers,
        num_kv_heads=getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
        head_dim=head_dim,
        max_positions=getattr(config, "max_position_embeddings", 0) or 0,
    )


WINDOWED_TYPES = {"full_attention": False, "sliding_attention": True}
"""Layer types (transformers' ``config.layer_types``) a packed cache serves: full and sliding-window."""


def attention_windows(model: Any) -> list[int | None]:
    """Per decoder layer, the sliding window its attention uses, or None for full attention.

    Read with transformers' own rule for its dynamic cache; a layer type kvstream does not serve
    (chunked attention, linear attention, layers sharing another's cache) is refused, named.
    """
    from transformers.cache_utils import get_layer_types_and_kwargs

    config = model.config.get_text_config(decoder=True)
    layer_types, kwargs = get_layer_types_and_kwargs(config)
    unknown = sorted({t for t in layer_types if t not in WINDOWED_TYPES})
    if unknown:
        raise ConfigError(
            f"{getattr(config, 'model_type', 'this model')} has layers of type {', '.join(unknown)}; "
            "kvstream's caches serve full and sliding-window attention layers only"
        )
    return [kw.get("sliding_window") if WINDOWED_TYPES[t] else None for t, kw in zip(layer_types, kwargs, strict=True)]


def check_attention(model: Any, config: CompressionConfig) -> None:
    """Refuse, in one line, a model whose attention kvstream's packed reader does not compute exactly."""
    text = model.config.get_text_config(decoder=True)
    softcap = getattr(text, "attn_logit_softcapping", None)
    if config.attention == "packed" and softcap:
        raise ConfigError(
            f"attention: packed: {text.model_type} caps attention logits (attn_logit_softcapping={softcap}), "
            "which kvstream's attention does not apply; use attention: restore"
        )


DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """``device``, or CUDA when present else the CPU; a CUDA device that does not exist is refused."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"device: {device!r} is not a torch device (cpu, cuda, cuda:1, ...)") from error
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device: {device!r} asked for, but this machine has no CUDA device")
    return resolved


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """``dtype`` by name or value, or the default for ``device``: fp32 on the CPU, bf16 on CUDA."""
    if dtype is None or dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype: {dtype!r} is not one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def load_model(
    name_or_path: str = "smollm2-135m",
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
    device_map: DeviceMap | None = None,
) -> tuple[Any, Any]:
    """``(model, tokenizer)`` for an alias (``smollm2-135m``), a local folder, a GGUF file or a Hub id.

    ``device`` defaults to CUDA when present, else the CPU; ``dtype`` to fp32 on the CPU and bf16 on CUDA.
    ``device_map`` (accelerate's, see `kvstream.engine.placement`) spreads the layers over several
    devices instead, offloading to the CPU or disk where the map says so.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kvstream.data.models import resolve_model

    if device is not None and device_map is not None:
        raise ValueError("give --device or --device-map, not both (a device map names every module's device)")
    target = resolve_device(device) if device_map is None else main_device(device_map)
    torch_dtype = resolve_dtype(dtype, target)
    path = resolve_model(name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if device_map is None:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype)
        model.to(target)
    else:
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=torch_dtype, device_map=device_map, offload_folder=offload_folder()
        )
    model.eval()
    return model, tokenizer


def make_cache(model: Any, config: CompressionConfig | None = None) -> Any:
    """The cache strategy ``config.cache`` names (entry-point group ``kvstream.caches``), built for ``model``."""
    from kvstream import registry

    config = config or CompressionConfig()
    return registry.get("caches", config.cache).from_model(model, config)
