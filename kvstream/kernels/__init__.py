"""Fused kernels that read the packed history, chosen per call by device, storage format and shape.

``KVSTREAM_KERNELS=0`` in the environment turns them off (the reference tiles run everywhere).
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Callable
from typing import Any

import torch

from kvstream.kernels.online import OnlineSoftmax


def kernels_enabled() -> bool:
    return os.environ.get("KVSTREAM_KERNELS", "1") != "0"


class PackedDecode:
    """History reader for decode steps: one kernel call over the blocks, the sink copies and (when given) the tail."""

    reads_tail = True
    name = "cpu kernel"

    def __init__(self, attention: Any) -> None:
        self.attention = attention

    def __call__(
        self,
        layer: Any,
        q: torch.Tensor,
        mask: torch.Tensor | None,
        n_rep: int,
        state: OnlineSoftmax,
        tail: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> None:
        packed = layer.packed_length
        sinks = layer.sink_tokens()
        visible, sink_visible = visibility(layer, mask, None if sinks is None else sinks[0])
        exact = []
        if sinks is not None:
            exact.append([sinks[1].float(), sinks[2].float(), sink_visible])
        if tail is not None and tail[0].shape[2]:
            keys, values = tail[0].float().contiguous(), tail[1].float().contiguous()
            if mask is None:
                tail_visible = torch.ones(keys.shape[0], keys.shape[2], dtype=torch.bool, device=keys.device)
            else:
                column = packed - layer.offset
                tail_visible = mask[:, 0, -1, column : column + keys.shape[2]].bool().contiguous()
            exact.append([keys, values, tail_visible])
        rotation = layer.value_rotation()
        if rotation is not None:  # values stored rotated: the exact ones join them in that basis, one call reads all
            exact = [[keys, rotation.rotate(values).contiguous(), seen] for keys, values, seen in exact]
        acc, m, norm = self.attention(layer, q, visible, exact)
        state.merge(acc if rotation is None else rotation.unrotate(acc), m, norm)  # rotated back once per head


class TritonDecode:
    """History reader for decode steps on a GPU: the Triton kernels over the blocks, the sink copies and the tail.

    `attend` serves a whole decode step (blocks, sink copies and tail merged and normalised by the kernels, the
    output written in the query's dtype); called as a reader, it folds the blocks and the sink copies into the
    state and leaves the tail to `packed_attention`."""

    name = "triton kernel"

    def __call__(
        self, layer: Any, q: torch.Tensor, mask: torch.Tensor | None, n_rep: int, state: OnlineSoftmax
    ) -> None:
        from kvstream.kernels import triton_decode

        sinks = layer.sink_tokens()
        visible, sink_visible = visibility(layer, mask, None if sinks is None else sinks[0])
        segment = None if sinks is None else triton_decode.Segment(sinks[1], sinks[2], sink_visible)
        triton_decode.read_history(layer, q, visible, segment, state)

    def attend(
        self,
        layer: Any,
        query: torch.Tensor,
        tail_keys: torch.Tensor,
        tail_values: torch.Tensor,
        mask: torch.Tensor | None,
        scaling: float,
    ) -> tuple[torch.Tensor, int] | None:
        """Attention output ``[B, 1, Hq, D]`` of one query token per row over the packed history, the sink
        copies and the exact tail, with the bytes it held; None unless the step is one query token under a
        bool mask or none (the reader's call serves the rest)."""
        if query.shape[2] != 1 or (mask is not None and mask.dtype != torch.bool):
            return None
        from kvstream.kernels import triton_decode

        sinks = layer.sink_tokens()
        visible, sink_visible = visibility(layer, mask, None if sinks is None else sinks[0])
        segment = None if sinks is None else triton_decode.Segment(sinks[1], sinks[2], sink_visible)
        tail = None
        if tail_keys.shape[2]:
            seen = None
            if mask is not None:
                column = layer.length - tail_keys.shape[2] - layer.offset
                seen = mask[:, 0, -1, column : column + tail_keys.shape[2]]
            tail = triton_decode.Segment(tail_keys, tail_values, seen)
        return triton_decode.attention(layer, query, scaling, visible, segment, tail)


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def visibility(
    layer: Any, mask: torch.Tensor | None, sink_index: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Which packed tokens of ``layer`` a decode query sees in the blocks ([B, packed] bool, sink slots off,
    since their exact copies are read apart; tokens a sliding window freed off) and which sink copies it
    sees ([B, n]); the same for every layer of a step alike, so the last answer is kept on the cache."""
    owner, packed, offset, device = layer.owner, layer.packed_length, layer.offset, layer.keys.device
    key = (owner.positions.shape[1], packed, offset, device, mask, sink_index)
    last = getattr(owner, "_last_visibility", None)
    if last is not None and last[0][:4] == key[:4] and last[0][4] is mask and last[0][5] is sink_index:
        return last[1]
    visible = owner.tables_on(device)[1][:, :packed]
    if mask is not None:
        columns = mask[:, 0, -1, : packed - offset].bool()
        visible = visible & torch.cat([columns.new_zeros(columns.shape[0], offset), columns], dim=1)
    sink_visible = None
    if sink_index is not None:
        present = sink_index >= 0
        sink_visible = (present & visible.gather(1, sink_index.clamp_min(0))).contiguous()
        rows = torch.arange(visible.shape[0], device=visible.device).unsqueeze(1).expand_as(sink_index)
        visible = visible.clone()
        visible[rows[present], sink_index[present]] = False
    answer = (visible.contiguous(), sink_visible)
    owner._last_visibility = (key, answer)
    return answer


_ANSWERS: weakref.WeakKeyDictionary[Any, dict[str, tuple[tuple[weakref.ref, ...], Any]]] = weakref.WeakKeyDictionary()


def per_groups(layer: Any, name: str, compute: Callable[[], Any]) -> Any:
    """``compute()`` for ``layer``, asked again only once its block groups changed: a layer's groups are replaced,
    never edited, when blocks are packed, freed or rows selected, and the answers kept here (whether a kernel
    reads the layer) read the position tables on the device, which would cost a sync per layer and step."""
    groups = getattr(layer, "groups", None)
    if groups is None:
        return compute()
    kept = _ANSWERS.setdefault(layer, {})
    seen = kept.get(name)
    same = seen is not None and len(seen[0]) == len(groups)
    if same and all(ref() is group for ref, group in zip(seen[0], groups, strict=True)):
        return seen[1]
    answer = compute()
    kept[name] = (tuple(weakref.ref(g) for g in groups), answer)
    return answer


def fallback_reason(layer: Any, query: torch.Tensor) -> str | None:
    """Why a decode step of ``layer`` on ``query``'s device is read by the reference tiles, or None when no
    fused kernel was to be expected (nothing packed yet, a device or cache without one)."""
    if not kernels_enabled():
        return "kernels turned off (KVSTREAM_KERNELS=0)"
    refusal = getattr(layer, "kernel_refusal", None)
    if refusal is None or not getattr(layer, "groups", None):
        return None
    return refusal()


def decode_kernel_for(layer: Any, query: torch.Tensor) -> PackedDecode | TritonDecode | None:
    """The fused decode reader for this call (one new token per row), or None."""
    if query.shape[2] != 1 or not per_groups(layer, "ready", getattr(layer, "kernel_ready", lambda: False)):
        return None
    if query.device.type == "cpu":
        from kvstream.kernels import cpu

        if cpu.extension() is None:
            return None
        return PackedDecode(cpu.decode_attention)
    if query.device.type == "cuda" and triton_available():
        return TritonDecode()
    return None
