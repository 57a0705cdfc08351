"""llama.cpp's own KV-cache quantization (``type_k`` / ``type_v``) through ``llama-cpp-python``.

The model is the GGUF file kvstream's model is converted from (:func:`kvstream.peers.gguf.gguf_file`),
run by llama.cpp with its own weights kernels. One context per prompt length (``n_ctx`` is the
prompt, the longer of the answer and the generation, rounded up to 256), flash attention on
(llama.cpp needs it for a quantized V cache), the prompt fed in batches of ``n_batch`` tokens,
``threads`` threads for prefill and decode alike.

One run:

1. the prompt is evaluated; the logits of its last token score the answer's first token;
2. the answer's tokens are evaluated one at a time after it (teacher forcing), each giving the
   logits that score the next; the sum of the answer's log-probabilities is the score;
3. the answer's cells are removed from the KV cache and ``n_past`` goes back to the prompt's end,
   so that greedy decoding starts from the cache the prompt left, with the prompt's last logits;
   it stops at an end-of-generation token or after ``max_new_tokens``.

Bits per element are measured: llama.cpp serializes the sequence's KV cells
(``llama_state_seq_get_size``: every layer's K and V rows in their stored type, plus a few bytes of
cell positions and row headers) and that size is divided by the key and value elements of the
tokens held. The block formats themselves are f16 = 16 bits, q8_0 = 8.5 bits (32 int8 codes and an
fp16 scale per 34 bytes) and q4_0 = 4.5 bits (32 4-bit codes and an fp16 scale per 18 bytes);
:data:`FORMAT_BITS` keeps them, and the result's ``bits_basis`` quotes both.
"""

from __future__ import annotations

import atexit
import importlib.util
import math
import time
import weakref
from pathlib import Path
from typing import Any

from kvstream.peers.base import PeerError, PeerResult, PeerUnavailable, check_inputs, kv_bits_per_element

PIN = "llama-cpp-python==0.3.36"
"""The version tested here (``pip install -e .[peers-native]``, which ``make peers`` runs)."""

FORMAT_BITS = {"f16": 16.0, "q8_0": 8.5, "q5_1": 6.0, "q5_0": 5.5, "q4_1": 5.0, "q4_0": 4.5, "iq4_nl": 4.5}
"""Bits per element of each KV type llama.cpp offers, from its block layout (scale bytes included)."""

GGML_TYPES = {"f16": 1, "q4_0": 2, "q4_1": 3, "q5_0": 6, "q5_1": 7, "q8_0": 8, "iq4_nl": 20}
"""ggml type ids (``GGML_TYPE_*``) of the KV types above."""

CTX_STEP = 256

_OPEN: weakref.WeakSet[LlamaCppPeer] = weakref.WeakSet()


@atexit.register
def _close_all() -> None:
    """Free llama.cpp's contexts before the interpreter tears down the modules their destructors need."""
    for peer in list(_OPEN):
        peer.close()


def _version() -> str | None:
    try:
        from importlib.metadata import PackageNotFoundError, version
    except ImportError:  # pragma: no cover
        return None
    try:
        return version("llama-cpp-python")
    except PackageNotFoundError:
        return None


class LlamaCppPeer:
    """llama.cpp with its KV cache stored as ``kv_type`` (keys and values alike), flash attention on."""

    def __init__(
        self,
        kv_type: str,
        model: str | Path = "smollm2-135m",
        *,
        threads: int = 2,
        n_batch: int = 256,
        name: str | None = None,
        label: str | None = None,
    ) -> None:
        if kv_type not in GGML_TYPES:
            raise ValueError(f"unknown llama.cpp KV type {kv_type!r} (known: {', '.join(GGML_TYPES)})")
        self.kv_type = kv_type
        self.model = model
        self.threads = threads
        self.n_batch = n_batch
        self.name = name or f"llamacpp-{kv_type}"
        bits = FORMAT_BITS[kv_type]
        self.label = label or f"llama.cpp KV {kv_type} ({bits:g} bits)"
        self._llm: Any = None
        self._n_ctx = 0
        self._gguf: Path | None = None

    def unavailable(self) -> str | None:
        if importlib.util.find_spec("llama_cpp") is None:
            return f"llama-cpp-python is not installed (make peers, or pip install '{PIN}')"
        try:
            import llama_cpp  # noqa: F401
        except Exception as error:  # a missing dependency or a library that does not load
            return f"llama-cpp-python does not import ({type(error).__name__}: {' '.join(str(error).split())})"
        try:
            self._gguf = self._gguf or _gguf(self.model)
        except Exception as error:  # a missing or damaged model file: say which, in one line
            return f"no GGUF file for {self.model}: {' '.join(str(error).split())}"
        return None

    # ------------------------------------------------------------------ llama.cpp

    def _context(self, n_ctx: int) -> Any:
        """A Llama whose context holds ``n_ctx`` tokens, rebuilt when the size changes."""
        n_ctx = math.ceil(n_ctx / CTX_STEP) * CTX_STEP
        if self._llm is not None and self._n_ctx == n_ctx:
            self._llm.reset()
            return self._llm
        self.close()
        from llama_cpp import Llama

        assert self._gguf is not None
        self._llm = Llama(
            model_path=str(self._gguf), n_ctx=n_ctx, n_batch=self.n_batch, n_ubatch=self.n_batch,
            n_threads=self.threads, n_threads_batch=self.threads, flash_attn=True,
            type_k=GGML_TYPES[self.kv_type], type_v=GGML_TYPES[self.kv_type], logits_all=False,
            n_gpu_layers=0, seed=0, verbose=False,
        )  # fmt: skip
        self._n_ctx = n_ctx
        _OPEN.add(self)
        return self._llm

    def close(self) -> None:
        llm, self._llm = self._llm, None
        self._n_ctx = 0
        if llm is not None:
            llm.close()

    def shape(self) -> tuple[int, int, int]:
        """Layers, KV heads and head size from the GGUF metadata of the loaded model."""
        meta = self._llm.metadata
        arch = meta["general.architecture"]
        layers = int(meta[f"{arch}.block_count"])
        kv_heads = int(meta.get(f"{arch}.attention.head_count_kv") or meta[f"{arch}.attention.head_count"])
        head_dim = meta.get(f"{arch}.attention.key_length")
        if head_dim is None:
            head_dim = int(meta[f"{arch}.embedding_length"]) // int(meta[f"{arch}.attention.head_count"])
        return layers, kv_heads, int(head_dim)

    # ------------------------------------------------------------------ the run

    def run(self, prompt_ids: list[int], answer_ids: list[int], max_new_tokens: int) -> PeerResult:
        check_inputs(prompt_ids, answer_ids, max_new_tokens)
        reason = self.unavailable()
        if reason:
            raise PeerUnavailable(reason)
        import llama_cpp
        import numpy as np

        n = len(prompt_ids)
        llm = self._context(n + max(len(answer_ids), max_new_tokens) + 1)
        vocab = llama_cpp.llama_model_get_vocab(llm.model)
        n_vocab = llama_cpp.llama_vocab_n_tokens(vocab)

        def last_logits() -> Any:
            row = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
            return np.ctypeslib.as_array(row, shape=(n_vocab,)).astype(np.float64)

        def logprob(logits: Any, token: int) -> float:
            top = logits.max()
            return float(logits[token] - top - math.log(np.exp(logits - top).sum()))

        try:
            start = time.perf_counter()
            llm.eval(list(prompt_ids))
            prompt_seconds = time.perf_counter() - start
            first = last_logits()

            score = logprob(first, answer_ids[0])
            for previous, token in zip(answer_ids[:-1], answer_ids[1:], strict=True):
                llm.eval([previous])
                score += logprob(last_logits(), token)
            if not llama_cpp.llama_memory_seq_rm(llama_cpp.llama_get_memory(llm.ctx), 0, n, -1):
                raise PeerError(f"{self.name}: llama.cpp could not remove the answer's cells from the KV cache")
            llm.n_tokens = n

            start = time.perf_counter()
            generated = [int(first.argmax())]
            while len(generated) < max_new_tokens and not llama_cpp.llama_vocab_is_eog(vocab, generated[-1]):
                llm.eval([generated[-1]])
                generated.append(int(last_logits().argmax()))
            decode_seconds = time.perf_counter() - start

            tokens = llm.n_tokens
            held = llama_cpp.llama_state_seq_get_size(llm.ctx, 0)
            text = llm.detokenize(generated).decode("utf-8", errors="replace")
            if generated and llama_cpp.llama_vocab_is_eog(vocab, generated[-1]):
                text = llm.detokenize(generated[:-1]).decode("utf-8", errors="replace")
            layers, kv_heads, head_dim = self.shape()
        except PeerError:
            raise
        except Exception as error:
            raise PeerError(f"{self.name}: {type(error).__name__}: {' '.join(str(error).split())}") from None

        bits = kv_bits_per_element(held, layers=layers, kv_heads=kv_heads, head_dim=head_dim, tokens=tokens)
        basis = (
            f"measured: the sequence's serialized KV cells (llama_state_seq_get_size, {held} bytes) over "
            f"{tokens} tokens x {layers} layers x {kv_heads} KV heads x {head_dim} x 2; the {self.kv_type} "
            f"format alone is {FORMAT_BITS[self.kv_type]:g} bits"
        )
        environment = (
            f"llama-cpp-python {_version()}, {self.threads} threads, n_ctx {self._n_ctx}, n_batch {self.n_batch}, "
            f"flash attention, GGUF {self._gguf.name if self._gguf else '?'}"
        )
        return PeerResult(
            text=text, answer_logprob=score, answer_tokens=len(answer_ids), bits_per_element=bits,
            prompt_seconds=prompt_seconds, decode_seconds=decode_seconds, bits_basis=basis,
            environment=environment, generated_ids=tuple(generated),
        )  # fmt: skip


def _gguf(model: str | Path) -> Path:
    from kvstream.peers.gguf import gguf_file

    return gguf_file(model)
