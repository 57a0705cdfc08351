"""Attention of new queries over a packed history plus the exact tail, tile by tile.

The history is read by one of three readers, all folding partial results into one
`OnlineSoftmax` with the log-sum-exp rule:

- `reference_history` (pure PyTorch, every device, the oracle): the layer's history in tiles
  (dequantized, keys re-rotated in fp32), explicit scores, masking and softmax;
- `flash_history` (CPU, several queries: chunked prefill): the same tiles through torch's CPU
  flash-attention kernel, which returns each tile's log-sum-exp and never builds the score matrix;
- a fused kernel (`kvstream.kernels`) for decode steps: codes are read in one pass.

GQA is native: the query heads of one KV head are stacked as rows under it, KV heads are never
repeated for the history. The tail (at most a chunk plus the new tokens) is read exactly.
"""

from __future__ import annotations

from typing import Any

import torch

from kvstream.kernels.online import OnlineSoftmax
from kvstream.quant.base import tensor_bytes

TILE_BYTES = 3 << 20
"""Working memory one history tile may take (its fp32 keys and values, and for the reference
reader its scores and probabilities); a tile holds at least one packed block."""

_flash_cpu = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def tile_tokens(batch: int, kv_heads: int, rows: int, head_dim: int, scores: bool) -> int:
    """History tokens per tile so that a tile's working set fits `TILE_BYTES`."""
    per_token = 4 * batch * kv_heads * (2 * head_dim + (2 * rows if scores else 0))
    return max(1, TILE_BYTES // per_token)


def grouped_queries(query: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """``query`` [B, Hq, Q, D] as fp32 rows under their KV head: [B, Hkv, Hq / Hkv * Q, D]."""
    b, hq, q, d = query.shape
    return query.float().reshape(b, kv_heads, (hq // kv_heads) * q, d)


def apply_mask(scores: torch.Tensor, mask: torch.Tensor | None, start: int, n_rep: int) -> None:
    """Add columns ``start:`` of the model's mask ([B, 1|Hq, Q, K], bool or additive) to grouped ``scores`` in place."""
    if mask is None:
        return
    b, hkv, rows, n = scores.shape
    part = mask[..., start : start + n]
    heads, q = part.shape[1], part.shape[2]
    part = part.unsqueeze(2) if heads == 1 else part.reshape(b, hkv, n_rep, q, n)
    view = scores.view(b, hkv, n_rep, q, n)
    if part.dtype == torch.bool:
        view.masked_fill_(~part, float("-inf"))
    else:
        view.add_(part.float())


def causal_visible(q_len: int, tail_len: int, device: torch.device) -> torch.Tensor:
    """Lower-right-aligned causality: which of ``tail_len`` tail tokens each of the last ``q_len`` queries sees."""
    rows = torch.arange(q_len, device=device).unsqueeze(1) + (tail_len - q_len)
    return torch.arange(tail_len, device=device).unsqueeze(0) <= rows


def additive(visible: torch.Tensor) -> torch.Tensor:
    """A bool visibility mask as the additive fp32 mask attention kernels take (0 or -inf)."""
    return torch.zeros(visible.shape, device=visible.device).masked_fill_(~visible, float("-inf"))


def visible_columns(mask: torch.Tensor, columns: slice) -> torch.Tensor:
    """``columns`` of the model's mask (bool or additive) as bool visibility."""
    part = mask[..., columns]
    return part if part.dtype == torch.bool else part > float("-inf")


def causal_tail_mask(q_len: int, tail_len: int, n_rep: int, device: torch.device) -> torch.Tensor:
    """Additive lower-right-aligned causal mask of ``q_len`` new queries over a tail of ``tail_len``, grouped rows."""
    return additive(causal_visible(q_len, tail_len, device)).repeat(n_rep, 1)


def reference_history(layer: Any, q: torch.Tensor, mask: torch.Tensor | None, n_rep: int, state: OnlineSoftmax) -> None:
    """Fold the history into ``state`` with explicit scores: the readable oracle of every other reader."""
    b, hkv, rows, d = q.shape
    for start, keys, values in layer.history_tiles(tile_tokens(b, hkv, rows, d, scores=True)):
        scores = q @ keys.transpose(-1, -2)
        apply_mask(scores, mask, start - layer.offset, n_rep)
        state.add(scores, values)
        state.peak_transient += tensor_bytes(keys)


def flash_history(layer: Any, q: torch.Tensor, mask: torch.Tensor | None, n_rep: int, state: OnlineSoftmax) -> None:
    """Fold the history into ``state`` through torch's CPU flash kernel, tile by tile.

    Under causal and padding masks every query of a chunk sees the same history columns, so a
    tile's mask is one row per batch row (``[B, 1, 1, n]``); under a sliding window each query
    has its own row, repeated for the query heads stacked under a KV head.
    """
    b, hkv, rows, d = q.shape
    for start, keys, values in layer.history_tiles(tile_tokens(b, hkv, rows, d, scores=False), fused=True):
        n = keys.shape[-2]
        tile_mask = None
        if mask is not None:
            columns = slice(start - layer.offset, start - layer.offset + n)
            visible = visible_columns(mask[:, :1] if layer.is_sliding else mask[:, :1, -1:], columns)
            if visible.shape[2] > 1:
                visible = visible.repeat(1, 1, n_rep, 1)
            tile_mask = additive(visible)
        # the CPU flash kernel misreads keys whose last two dimensions are transposed: give it dense tiles
        keys, values = keys.contiguous(), values.contiguous()
        out, lse = _flash_cpu(q, keys, values, 0.0, False, attn_mask=tile_mask, scale=1.0)
        if tile_mask is not None:  # the kernel gives rows with no visible key lse 0: make them weigh nothing
            lse = lse.masked_fill(~visible.any(-1), float("-inf"))
        state.merge(out, lse, torch.ones_like(lse))
        state.peak_transient = max(state.peak_transient, tensor_bytes(keys, values, out, lse, tile_mask))


def read_tail(
    q: torch.Tensor,
    tail_keys: torch.Tensor,
    tail_values: torch.Tensor,
    mask: torch.Tensor | None,
    start: int,
    n_rep: int,
    q_len: int,
    state: OnlineSoftmax,
) -> None:
    """Fold the exact tail (mask columns ``start:``) into ``state``: causal for the new queries."""
    if tail_keys.shape[-2] == 0:
        return
    tail_k, tail_v = tail_keys.float(), tail_values.float()
    scores = q @ tail_k.transpose(-1, -2)
    if mask is not None:
        apply_mask(scores, mask, start, n_rep)
    elif q_len > 1:
        scores += causal_tail_mask(q_len, tail_k.shape[-2], n_rep, q.device)
    state.add(scores, tail_v)
    state.peak_transient = max(state.peak_transient, tensor_bytes(tail_k, tail_v))


def flash_tail(
    q: torch.Tensor,
    tail_keys: torch.Tensor,
    tail_values: torch.Tensor,
    mask: torch.Tensor | None,
    start: int,
    n_rep: int,
    q_len: int,
    state: OnlineSoftmax,
) -> None:
    """`read_tail` through the CPU flash kernel: query heads in their own rows, the short tail repeated per head."""
    b, hkv, rows, d = q.shape
    tail_len = tail_keys.shape[-2]
    heads_q = q.reshape(b, hkv * n_rep, q_len, d)
    keys = tail_keys.float().repeat_interleave(n_rep, dim=1)
    values = tail_values.float().repeat_interleave(n_rep, dim=1)
    visible = tail_mask = None
    if mask is not None:
        visible = visible_columns(mask, slice(start, start + tail_len))
    elif q_len > 1:
        visible = causal_visible(q_len, tail_len, q.device)[None, None]
    if visible is not None:
        tail_mask = additive(visible)
    out, lse = _flash_cpu(heads_q, keys, values, 0.0, False, attn_mask=tail_mask, scale=1.0)
    if visible is not None:
        lse = lse.masked_fill(~visible.any(-1), float("-inf"))
    lse = lse.expand(b, hkv * n_rep, q_len)
    state.merge(out.reshape(b, hkv, rows, d), lse.reshape(b, hkv, rows), torch.ones(b, hkv, rows))
    state.peak_transient = max(state.peak_transient, tensor_bytes(keys, values, out, tail_mask))


def packed_attention(
    layer: Any,
    query: torch.Tensor,
    tail_keys: torch.Tensor,
    tail_values: torch.Tensor,
    mask: torch.Tensor | None,
    scaling: float,
    reader: Any = None,
) -> torch.Tensor:
    """Attention output ``[B, Q, Hq, D]`` (the layout transformers' attention functions return).

    ``layer`` is a `PackedLayer` whose packed history precedes ``tail_keys``; ``mask`` is the
    model's mask over history and tail, or None when everything is visible (decode) or only
    causality applies (no history). ``reader(layer, q, mask, n_rep, state)`` folds the history in;
    by default the reference reader. A reader with ``attend(layer, query, tail_keys, tail_values, mask,
    scaling)`` may serve the whole call instead, returning the output and the bytes it held (or None).
    """
    reader = reader or reference_history
    attend = getattr(reader, "attend", None)  # a kernel that serves the whole step and writes the output
    answer = None if attend is None else attend(layer, query, tail_keys, tail_values, mask, scaling)
    if answer is not None:
        out, held = answer
        layer.owner.note_transient(held)
        return out
    b, hq, q_len, d = query.shape
    kv_heads = tail_keys.shape[1]
    n_rep = hq // kv_heads
    q = grouped_queries(query, kv_heads) * scaling
    state = OnlineSoftmax()
    if getattr(reader, "reads_tail", False):  # a fused kernel reads history and tail in one call
        reader(layer, q, mask, n_rep, state, tail=(tail_keys, tail_values))
    else:
        reader(layer, q, mask, n_rep, state)
        tail = flash_tail if reader is flash_history else read_tail
        tail_column = layer.length - tail_keys.shape[-2] - layer.offset
        tail(q, tail_keys, tail_values, mask, tail_column, n_rep, q_len, state)
    out = state.result()
    layer.owner.note_transient(state.peak_transient + tensor_bytes(q, state.acc, state.m, state.norm, out))
    return out.view(b, hq, q_len, d).transpose(1, 2).to(query.dtype)


READER_NAMES = {"reference_history": "reference tiles", "flash_history": "flash tiles"}


def history_reader(layer: Any, query: torch.Tensor) -> Any:
    """The fastest reader that serves this call exactly: a fused decode kernel, CPU flash tiles, or the reference.

    The choice is recorded on the cache (`PackedCache.note_reader`), with the reason when a decode step on a
    device with a kernel falls back to the reference tiles.
    """
    from kvstream.kernels import decode_kernel_for, fallback_reason, kernels_enabled

    phase = "decode" if query.shape[2] == 1 else "prefill"
    kernel = decode_kernel_for(layer, query) if kernels_enabled() else None
    if kernel is not None:
        reader = kernel
    elif kernels_enabled() and query.device.type == "cpu" and phase == "prefill" and _flash_cpu is not None:
        reader = flash_history
    else:
        reader = reference_history
    reason = fallback_reason(layer, query) if reader is reference_history and phase == "decode" else None
    name = getattr(reader, "name", None) or READER_NAMES[reader.__name__]
    layer.owner.note_reader(phase, name, reason)
    return reader
