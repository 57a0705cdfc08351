"""kvstream's attention function, registered with transformers as ``kvstream``.

For a packed cache that handed over its history (`kvstream.attention.pending`), it computes
attention over the packed blocks tile by tile (`packed_attention`), through a fused kernel where
one fits; for any other cache it is transformers' SDPA attention, so a model switched to it
still runs a full-precision cache unchanged.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from kvstream.attention.packed import history_reader, packed_attention
from kvstream.attention.pending import take_pending

ATTENTION_NAME = "kvstream"


def kvstream_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Attention over the packed history when the cache left a read for this call, else SDPA."""
    layer = take_pending()
    if layer is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    if key is not layer.keys or layer.layer_idx != getattr(module, "layer_idx", layer.layer_idx):
        raise RuntimeError(
            "kvstream attention was handed keys that are not the cache's tail; the model is not supported"
        )
    if kwargs.get("softcap"):
        raise NotImplementedError("kvstream attention does not apply logit soft-capping; use attention: restore")
    if kwargs.get("sliding_window") and kwargs["sliding_window"] != layer.window:
        raise RuntimeError(
            f"layer {layer.layer_idx} attends to a window of {kwargs['sliding_window']} tokens but its cache "
            f"layer was built for {layer.window}; build the cache with make_cache(model, config)"
        )
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    out = packed_attention(layer, query, key, value, attention_mask, scaling, history_reader(layer, query))
    layer.complete_update(layer.awaiting_read)
    return out, None


def enable(model: Any) -> None:
    """Register kvstream's attention with transformers and switch ``model`` to it."""
    AttentionInterface.register(ATTENTION_NAME, kvstream_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)
    if model.config._attn_implementation != ATTENTION_NAME:
        model.set_attn_implementation(ATTENTION_NAME)


__all__ = ["ATTENTION_NAME", "enable", "kvstream_attention", "packed_attention"]
