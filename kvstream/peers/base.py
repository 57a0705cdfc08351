"""What every peer returns and answers to: :class:`PeerResult` and the :class:`Peer` protocol.

A peer is another KV-cache compressor run on the same prompt token ids as kvstream: it prefills
the prompt, scores the gold answer under teacher forcing right after the prompt, and generates
greedily, in its own runtime. This module imports only the standard library.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Protocol, runtime_checkable


@dataclass(frozen=True)
class PeerResult:
    """One prompt run by one peer."""

    text: str
    """The greedy continuation of the prompt, decoded (special tokens left out)."""
    answer_logprob: float
    """Sum of the log-probabilities of the gold answer's tokens, teacher-forced right after the prompt."""
    answer_tokens: int
    """How many answer tokens that sum covers."""
    bits_per_element: float | None
    """Bytes of KV held at the end of generation * 8 / (2 * layers * kv_heads * head_dim * tokens seen)."""
    prompt_seconds: float
    """Wall time of the prefill (the answer's scoring and the model's loading left out)."""
    decode_seconds: float
    """Wall time of the greedy generation."""
    bits_basis: str = ""
    """How ``bits_per_element`` was obtained: ``measured: ...`` (from what the peer held) or ``format: ...``."""
    environment: str = ""
    """Where and with what the peer ran (library versions; its own virtual environment where it has one)."""
    generated_ids: tuple[int, ...] = ()
    """The generated token ids, the stop token included when one was produced."""

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["generated_ids"] = list(self.generated_ids)
        return out


@runtime_checkable
class Peer(Protocol):
    """A KV-cache compressor outside kvstream, run through an adapter on kvstream's token ids."""

    name: str
    """Short identifier, for example ``llamacpp-q4_0``."""
    label: str
    """Row label for tables, for example ``llama.cpp KV q4_0``."""

    def unavailable(self) -> str | None:
        """``None`` when the peer can run here, else one line saying why not and how to fix it."""
        ...

    def run(self, prompt_ids: list[int], answer_ids: list[int], max_new_tokens: int) -> PeerResult:
        """Prefill ``prompt_ids``, score ``answer_ids`` after them, then generate up to ``max_new_tokens``."""
        ...


class PeerUnavailable(RuntimeError):
    """Raised by ``run`` on a peer that cannot run here; the message is ``unavailable()``'s line."""


class PeerError(RuntimeError):
    """A peer that can run here failed on one prompt; the message says where and why."""


def check_inputs(prompt_ids: Sequence[int], answer_ids: Sequence[int], max_new_tokens: int) -> None:
    """Refuse inputs that no peer can run, in one line."""
    if not prompt_ids:
        raise ValueError("a peer needs at least one prompt token")
    if not answer_ids:
        raise ValueError("a peer needs at least one answer token to score")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")


def kv_bits_per_element(held_bytes: float, *, layers: int, kv_heads: int, head_dim: int, tokens: int) -> float:
    """``held_bytes * 8`` over the key and value elements of ``tokens`` tokens in every layer and KV head."""
    elements = 2 * layers * kv_heads * head_dim * tokens
    if elements <= 0:
        raise ValueError("no KV elements to divide by")
    return held_bytes * 8 / elements


def log_softmax_at(logits: Sequence[float], token: int) -> float:
    """``log_softmax(logits)[token]`` in double precision, for a plain sequence of floats (one vocabulary row)."""
    top = max(logits)
    total = math.fsum(math.exp(x - top) for x in logits)
    return float(logits[token]) - top - math.log(total)
