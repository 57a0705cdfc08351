"""Teacher-forced log-likelihood of a gold answer right after a prefilled prompt, leaving the cache untouched.

The retrieval tasks score a cache twice per sample: exact match of the greedy answer (accuracy), and
the log-probability the model gives the gold answer's tokens when they are fed after the compressed
prompt (a continuous score, which can separate caches on fewer samples than accuracy). Both start from the cache
state right after the prompt, and the prompt is prefilled once. `answer_logprobs` therefore runs the
answer on a *fork* of the prefilled cache (`fork_cache`) and generation then continues on the cache
itself, exactly as if no answer had been scored.

The fork is a copy of the cache's Python objects (layers, block lists, statistics tables, counters,
byte trackers) that shares every tensor with the original. That is exact for every cache kvstream
runs (its packed caches, the full-precision baseline, the KIVI-style and quanto plugin caches):
their appends rebind new tensors (``torch.cat``, new blocks, ``torch.where``) and never write in
place into a tensor they already held, so nothing the fork does reaches the original. A cache whose
layers do write in place (transformers' static layers, ``is_compileable``) is deep-copied instead,
tensors included, which costs a second cache (no cache kvstream runs takes that path); a cache may
also provide its own ``fork()``. ``tests/test_answer_score.py`` checks
the generation and memory report after scoring against a run without it, for every cache.

Memory: the fork shares the history instead of copying it, the answer goes through in one forward,
and as soon as a decoder layer has run, the fork's layer gets the prompt's state back
(`released_as_they_finish`), so whatever a layer's append builds beside the shared tensors (a
full-precision layer's concatenated keys and values, a packed group re-joined with a new block, a
re-quantized history) exists for one layer at a time, as in a prefill chunk or a decode step of the
cache itself; the log-probabilities are taken one answer position at a time (one row of logits, as
a decode step). The original cache's byte figures (stored and peak bytes, effective bits) are never
touched by the fork.
"""

from __future__ import annotations

import copy
import enum
import types
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from kvstream.engine.placement import input_device
from kvstream.engine.prefill import forward_hidden

_SHARED: tuple[type, ...] = (
    torch.Tensor,
    torch.nn.Module,
    torch.device,
    torch.dtype,
    torch.Generator,
    type,
    types.ModuleType,
    types.FunctionType,
    types.BuiltinFunctionType,
    enum.Enum,
    str,
    bytes,
    int,
    float,
    complex,
    bool,
    type(None),
)
"""Objects a fork shares with its original: tensors (never written in place by the caches), modules, and
immutable or stateless objects."""


def _shared_config_types() -> tuple[type, ...]:
    from transformers import PretrainedConfig

    return (PretrainedConfig,)


def _writes_in_place(cache: Any) -> bool:
    """Whether any layer of ``cache`` writes its tensors in place (static, pre-allocated layers do)."""
    return any(bool(getattr(layer, "is_compileable", False)) for layer in getattr(cache, "layers", []))


def fork_cache(cache: Any) -> Any:
    """A cache that continues from ``cache``'s state without changing it (see the module docstring).

    ``cache.fork()`` when the cache provides one; a full deep copy when a layer writes in place;
    otherwise a copy of every Python object the cache holds, sharing every tensor.
    """
    own = getattr(cache, "fork", None)
    if callable(own):
        return own()
    if _writes_in_place(cache):
        return copy.deepcopy(cache)
    return _fork(cache, {}, _shared_types())


def _fork(obj: Any, memo: dict[int, Any], shared: tuple[type, ...]) -> Any:
    key = id(obj)
    if key in memo:
        return memo[key]
    if isinstance(obj, shared):
        return obj
    if isinstance(obj, types.MethodType):
        return types.MethodType(obj.__func__, _fork(obj.__self__, memo, shared))
    if type(obj) is list:
        out: Any = []
        memo[key] = out
        out.extend(_fork(item, memo, shared) for item in obj)
        return out
    if isinstance(obj, tuple):
        items = [_fork(item, memo, shared) for item in obj]
        if all(a is b for a, b in zip(items, obj, strict=True)):
            out = obj
        else:
            out = type(obj)._make(items) if hasattr(obj, "_fields") else type(obj)(items)
        memo[key] = out
        return out
    if isinstance(obj, dict):
        out = copy.copy(obj)
        memo[key] = out
        out.clear()
        out.update((name, _fork(value, memo, shared)) for name, value in obj.items())
        return out
    if isinstance(obj, (set, frozenset)):
        out = copy.copy(obj)  # elements are hashable: immutable, shared
        memo[key] = out
        return out
    state = getattr(obj, "__dict__", None)
    slots = [name for cls in type(obj).__mro__ for name in getattr(cls, "__slots__", ()) if hasattr(obj, name)]
    if state is None and not slots:
        return obj  # no attributes to copy: opaque or immutable, shared
    out = copy.copy(obj)
    memo[key] = out
    for name, value in (state or {}).items():
        object.__setattr__(out, name, _fork(value, memo, shared))
    for name in slots:
        if name != "__dict__" and name != "__weakref__":
            object.__setattr__(out, name, _fork(getattr(obj, name), memo, shared))
    return out


@dataclass(frozen=True)
class AnswerScore:
    """The teacher-forced log-likelihood of a gold answer: its summed log-probability over its tokens."""

    logprob: float
    """Sum over the answer's tokens of the natural log-probability of each given the prompt and those before it."""
    tokens: int

    @property
    def mean(self) -> float:
        """Log-probability per answer token (nats): comparable across answers of different lengths."""
        return self.logprob / self.tokens if self.tokens else float("nan")


def _shared_types() -> tuple[type, ...]:
    return _SHARED + _shared_config_types()


def _structural(cache: Any) -> bool:
    """Whether `fork_cache` forks ``cache`` structurally (no ``fork()`` of its own, no layer writing in place)."""
    return not callable(getattr(cache, "fork", None)) and not _writes_in_place(cache)


@contextmanager
def released_as_they_finish(model: Any, cache: Any, fork: Any) -> Iterator[None]:
    """While the block runs, give each layer of ``fork`` back its state from ``cache`` (a fresh structural fork of
    the original layer, owned by ``fork``) once its decoder layer's forward has returned, so that what the
    layer's append built is freed then. A forward hook per decoder layer, removed on exit.

    For a structural fork serving one forward: a layer is read only while its decoder layer runs, and what it
    holds afterwards (the prompt alone, as in ``cache``) is consistent for any bookkeeping over every layer. A
    decoder without a ``layers`` list, or a fork made otherwise, keeps its layers to the end of the block."""
    modules = getattr(model.get_decoder(), "layers", None)
    forked, original = getattr(fork, "layers", None), getattr(cache, "layers", None)
    handles = []
    if modules is not None and isinstance(forked, list) and isinstance(original, list) and _structural(cache):
        shared = _shared_types()
        for i, module in enumerate(modules):
            index = getattr(getattr(module, "self_attn", None), "layer_idx", i)

            def release(_module: Any, _args: Any, _output: Any, index: int = index) -> None:
                if 0 <= index < min(len(forked), len(original)):
                    forked[index] = _fork(original[index], {id(cache): fork}, shared)

            handles.append(module.register_forward_hook(release))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@torch.inference_mode()
def answer_logprobs(
    model: Any,
    cache: Any,
    last_logits: torch.Tensor,
    answer_ids: Sequence[int] | torch.Tensor,
) -> torch.Tensor:
    """Log-probability of each token of ``answer_ids`` after the prompt prefilled into ``cache`` (one row).

    ``last_logits`` ([1, vocab]) are the prompt's last-position logits (`chunked_prefill`'s return),
    which give the first answer token's; the others come from one forward of the answer's tokens but
    the last through a fork of ``cache`` (`fork_cache`, released layer by layer), so ``cache`` is left
    as it was. Each position's log-softmax is taken over the full vocabulary in fp32, one position at
    a time. Returns a float tensor of ``len(answer_ids)`` entries.
    """
    device = input_device(model)
    ids = torch.as_tensor(answer_ids, dtype=torch.long, device=device).reshape(-1)
    if last_logits.dim() != 2 or last_logits.shape[0] != 1:
        raise ValueError(f"answer scoring takes one prompt, got logits of shape {tuple(last_logits.shape)}")
    n = ids.numel()
    out = torch.empty(n, dtype=torch.float32)
    if n == 0:
        return out
    out[0] = torch.log_softmax(last_logits[0].float(), dim=-1)[ids[0].to(last_logits.device)].cpu()
    if n == 1:
        return out
    fork = fork_cache(cache)
    with released_as_they_finish(model, cache, fork):
        hidden = forward_hidden(model, ids[:-1].unsqueeze(0), fork, fork.get_seq_length(), None)
    del fork
    head = model.get_output_embeddings()
    for position in range(1, n):
        logits = head(hidden[:, position - 1]).float()[0]
        out[position] = torch.log_softmax(logits, dim=-1)[ids[position].to(logits.device)].cpu()
    return out


def score_answer(
    model: Any, cache: Any, last_logits: torch.Tensor, answer_ids: Sequence[int] | torch.Tensor
) -> AnswerScore:
    """`answer_logprobs` summed: the answer's log-likelihood and its token count."""
    logprobs = answer_logprobs(model, cache, last_logits, answer_ids)
    return AnswerScore(logprob=float(logprobs.double().sum()), tokens=int(logprobs.numel()))
