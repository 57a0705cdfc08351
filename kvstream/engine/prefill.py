"""Driving a prompt through a model chunk by chunk, and greedy decoding from the same cache."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch

from kvstream.engine.placement import input_device

ProgressFn = Callable[[int, int], None]
"""``progress(tokens_done, tokens_total)``."""


def position_ids_for(attention_mask: torch.Tensor) -> torch.Tensor:
    """Real positions under left padding, as ``generate`` computes them (pads get position 0)."""
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.masked_fill(attention_mask == 0, 0)


def model_device(model: Any) -> torch.device:
    """The device of the model's input embeddings, where token ids must go (with a device map too)."""
    return input_device(model)


def _chunks(total: int, chunk_size: int) -> Iterator[tuple[int, int]]:
    for start in range(0, total, chunk_size):
        yield start, min(start + chunk_size, total)


def forward_hidden(
    model: Any,
    input_ids: torch.Tensor,
    cache: Any,
    start: int,
    attention_mask: torch.Tensor | None,
) -> torch.Tensor:
    """Last hidden states of ``input_ids`` appended at token index ``start`` of ``cache``."""
    end = start + input_ids.shape[1]
    if attention_mask is None:
        mask = None
        positions = torch.arange(start, end, device=input_ids.device).unsqueeze(0)
    else:
        mask = attention_mask[:, :end]
        positions = position_ids_for(mask)[:, start:end]
    decoder = model.get_decoder()
    out = decoder(input_ids=input_ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True)
    return out.last_hidden_state


@torch.inference_mode()
def chunked_prefill(
    model: Any,
    input_ids: torch.Tensor,
    cache: Any,
    chunk_size: int,
    attention_mask: torch.Tensor | None = None,
    progress: ProgressFn | None = None,
) -> torch.Tensor:
    """Feed ``input_ids`` ([batch, tokens]) into ``cache`` in chunks; return the last position's logits.

    Only the final position goes through the LM head, so no full-vocabulary logits are built for the
    prompt. ``attention_mask`` (left padding) covers the prompt plus anything already in the cache.
    """
    if input_ids.shape[1] == 0:
        raise ValueError("empty prompt: nothing to prefill")
    input_ids = input_ids.to(model_device(model))
    if attention_mask is not None:
        attention_mask = attention_mask.to(input_ids.device)
    offset = cache.get_seq_length()
    if attention_mask is not None and offset == 0 and hasattr(cache, "register_padding"):
        cache.register_padding(attention_mask)
    hidden = None
    for start, end in _chunks(input_ids.shape[1], chunk_size):
        hidden = forward_hidden(model, input_ids[:, start:end], cache, offset + start, attention_mask)
        if progress:
            progress(end, input_ids.shape[1])
    return model.get_output_embeddings()(hidden[:, -1]).float().to(input_ids.device)


@torch.inference_mode()
def greedy_generate(
    model: Any,
    input_ids: torch.Tensor,
    cache: Any,
    max_new_tokens: int,
    chunk_size: int,
    attention_mask: torch.Tensor | None = None,
    eos_token_ids: set[int] | None = None,
    progress: ProgressFn | None = None,
    on_prefill_done: Callable[[], None] | None = None,
    min_new_tokens: int = 0,
    after_prefill: Callable[[torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """Chunked prefill, then greedy decoding one token at a time; returns ``[batch, new_tokens]``.

    Decoding stops once every row has produced one of ``eos_token_ids`` (kept in the output). For the
    first ``min_new_tokens`` steps those ids are forbidden, as ``generate(min_length=prompt + n)`` does.
    ``on_prefill_done()`` is called when the prompt is in the cache, then ``after_prefill(logits)`` with
    the prompt's last-position logits ([batch, vocab], fp32): work between prefill and decoding that must
    leave the cache as it found it (answer scoring on a fork, `kvstream.engine.scoring`).
    """
    logits = chunked_prefill(model, input_ids, cache, chunk_size, attention_mask, progress)
    if on_prefill_done:
        on_prefill_done()
    if after_prefill:
        after_prefill(logits)
    device = model_device(model)
    if attention_mask is not None:
        attention_mask = attention_mask.to(device)
    eos = torch.tensor(sorted(eos_token_ids or []), dtype=torch.long, device=device)
    batch = input_ids.shape[0]
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    generated: list[torch.Tensor] = []
    mask = attention_mask
    for step in range(max_new_tokens):
        if step < min_new_tokens and eos.numel():
            logits = logits.index_fill(-1, eos, float("-inf"))
        token = logits.argmax(dim=-1)
        if generated and eos.numel():
            token = torch.where(finished, generated[-1], token)
        generated.append(token)
        if eos.numel():
            finished |= torch.isin(token, eos)
            if bool(finished.all()):
                break
        if len(generated) == max_new_tokens:
            break
        start = cache.get_seq_length()
        if mask is not None:
            mask = torch.cat([mask, mask.new_ones(batch, 1)], dim=1)
        hidden = forward_hidden(model, token.unsqueeze(1), cache, start, mask)
        logits = model.get_output_embeddings()(hidden[:, -1]).float().to(device)
    return torch.stack(generated, dim=1) if generated else input_ids.new_zeros(batch, 0)
