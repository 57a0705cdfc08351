"""The harder RULER rows (UUID multi-key, variable tracking, frequent words) and every task's gold answer."""

from __future__ import annotations

import re
from collections import Counter

import pytest
from test_eval import ESSAY, ChatWordTokenizer, WordTokenizer, fake_context

from kvstream import registry
from kvstream.tasks.base import RunContext, ScoredAnswer, TaskOptions
from kvstream.tasks.synthetic import (
    ANSWER_LOGPROB,
    PASSKEY_FILLER,
    TASKS,
    CodedText,
    fwe,
    niah_multikey_3,
    niah_multivalue,
    passkey,
    vt,
)

UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}")
NEW = ("niah_multikey_3", "vt", "fwe")


@pytest.fixture
def corpus(tmp_path):
    """An essay haystack for the tasks that read one (the new rows bring their own)."""
    path = tmp_path / "essays.txt"
    path.write_text("\n\n".join([ESSAY] * 40))
    return str(path)


@pytest.mark.parametrize("name", NEW)
def test_registered_as_entry_points(name):
    assert registry.get("tasks", name) is TASKS[name]


def question_part(sample) -> str:
    return sample.prompt.rsplit("\n\n", 1)[-1]


@pytest.mark.parametrize("length", [300, 2000])
def test_multikey_3_hides_one_asked_uuid_among_distractor_uuid_needles(length):
    samples = niah_multikey_3.samples(TaskOptions(samples=3, length=length, depths=[0.0, 0.5, 1.0]), WordTokenizer())
    for sample in samples:
        (key,) = sample.meta["asked"]
        (value,) = sample.answers
        assert UUID.fullmatch(key) and UUID.fullmatch(value)
        assert key in question_part(sample)
        pairs = re.findall(rf"special magic uuids for ({UUID.pattern}) is: ({UUID.pattern})\.", sample.prompt)
        assert dict(pairs)[key] == value  # the answer is recoverable from the prompt alone
        assert [k for k, _ in pairs].count(key) == 1
        assert len({k for k, _ in pairs}) == len(pairs) > length // 15  # many distractors, every key distinct
        assert abs(sample.meta["needle_depths"][0] - sample.meta["depth"]) < 0.05
    assert len({s.answers[0] for s in samples}) == 3


def resolve_chains(prompt: str) -> dict[str, str]:
    """Every variable's value, following the assignments in the order the prompt states them."""
    values: dict[str, str] = {}
    for name, source in re.findall(r"VAR ([A-Z]{5}) = (VAR [A-Z]{5}|\d+)\.", prompt):
        values[name] = values[source[4:]] if source.startswith("VAR ") else source
    return values


@pytest.mark.parametrize("tokenizer", [WordTokenizer(), ChatWordTokenizer()])
def test_variable_tracking_answers_every_variable_of_the_asked_chain(tokenizer):
    samples = vt.samples(TaskOptions(samples=4, length=600), tokenizer)
    for sample in samples:
        value = sample.meta["value"]
        assert f"assigned the value {value}" in question_part(sample)
        values = resolve_chains(sample.prompt)
        holders = [name for name, v in values.items() if v == value]
        assert holders == sample.answers and len(holders) == vt.hops + 1  # in assignment order
        assert PASSKEY_FILLER.split(". ")[0] in sample.prompt
        statements = [sample.prompt.index(n) for n in sample.meta["needles"]]
        assert statements == sorted(statements)


def test_variable_tracking_with_distractor_chains(monkeypatch):
    monkeypatch.setattr(vt, "chains", 3)
    (sample,) = vt.samples(TaskOptions(samples=1, length=800), WordTokenizer())
    values = resolve_chains(sample.prompt)
    assert len(values) == 3 * (vt.hops + 1) and len(set(values.values())) == 3
    assert [n for n, v in values.items() if v == sample.meta["value"]] == sample.answers


def coded_words(sample) -> list[str]:
    return sample.prompt.split("\n\n")[1].split()


@pytest.mark.parametrize("length", [300, 3000])
def test_frequent_words_are_the_top_three_of_the_coded_text(length):
    for sample in fwe.samples(TaskOptions(samples=3, length=length), WordTokenizer()):
        counts = Counter(coded_words(sample)).most_common()
        assert [w for w, _ in counts[:3]] == sample.answers
        assert counts[2][1] > counts[3][1] and counts[1][1] > counts[2][1]  # no tie decides the answer
        assert all(re.fullmatch(r"[a-z]{6}", w) for w, _ in counts)


def test_coded_text_keeps_its_top_words_whatever_the_length():
    text = CodedText("seed", 2.0, 6, 100)
    assert text.words(3) == CodedText("seed", 2.0, 6, 100).words(50)[:3]
    for n in (50, 400, 5000):
        words = text.build(n, [])[0].split()
        assert len(words) == n == sum(text.counts(n))
        assert [w for w, _ in Counter(words).most_common(3)] == text.words(3)
    assert text.build(400, [])[0] == CodedText("seed", 2.0, 6, 100).build(400, [])[0]
    assert text.build(400, [])[0] != CodedText("other", 2.0, 6, 100).build(400, [])[0]


@pytest.mark.parametrize("name", NEW)
@pytest.mark.parametrize("length", [1024, 4096])
def test_new_rows_fit_their_length_and_are_deterministic(name, length):
    tok = ChatWordTokenizer()
    first = TASKS[name].samples(TaskOptions(samples=2, length=length, seed=3), tok)
    again = TASKS[name].samples(TaskOptions(samples=2, length=length, seed=3), tok)
    assert [s.prompt for s in first] == [s.prompt for s in again]
    for sample in first:
        assert abs(len(sample.meta["prompt_ids"]) - length) <= max(1, 0.02 * length)
    other = TASKS[name].samples(TaskOptions(samples=2, length=length, seed=4), tok)
    assert [s.answers for s in other] != [s.answers for s in first]


@pytest.mark.parametrize("name", list(TASKS))
def test_every_task_states_its_gold_answer_after_the_answer_prefix(name, corpus):
    tok = WordTokenizer()
    samples = TASKS[name].samples(TaskOptions(samples=2, length=400, corpus=corpus), tok)
    for sample in samples:
        text = sample.meta["answer_text"]
        assert text.startswith(" ") and not text.endswith(".")
        assert sorted(text[1:].split(", ")) == sorted(sample.answers)
        assert sample.meta["answer_ids"] == tok.encode(text, add_special_tokens=False)


def test_multivalue_gold_answer_lists_the_values_in_the_order_the_text_holds_them(corpus):
    samples = niah_multivalue.samples(TaskOptions(samples=3, length=600, corpus=corpus), WordTokenizer())
    for sample in samples:
        values = sample.meta["answer_text"][1:].split(", ")
        assert [sample.prompt.index(v) for v in values] == sorted(sample.prompt.index(v) for v in values)


def scoring_context(tok, answer: str, logprob: float, tokens: int, calls: list) -> RunContext:
    ctx = fake_context(tok, answer)

    def generate_scored(ids, answer_ids, max_new_tokens):
        calls.append((list(ids), list(answer_ids), max_new_tokens))
        return ScoredAnswer(text=answer, logprob=logprob, tokens=tokens)

    ctx.generate_scored = generate_scored
    return ctx


@pytest.mark.parametrize("name", ["passkey", *NEW])
def test_run_reports_accuracy_recall_and_the_answer_log_likelihood(name):
    tok = WordTokenizer()
    task = TASKS[name]
    (sample,) = task.samples(TaskOptions(samples=1, length=400), tok)
    calls: list = []
    half = sample.answers[: max(1, len(sample.answers) // 2)]
    rows = task.run(scoring_context(tok, " ".join(half), -6.0, 4, calls), sample)
    by_metric = {r.metric: r for r in rows}
    assert calls == [(sample.meta["prompt_ids"], sample.meta["answer_ids"], task.max_new_tokens)]
    assert by_metric[ANSWER_LOGPROB].value == -1.5  # per token: -6 nats over 4 tokens
    assert by_metric[ANSWER_LOGPROB].extra["answer_logprob_sum"] == -6.0
    assert by_metric[ANSWER_LOGPROB].extra["answer_tokens"] == 4
    assert by_metric["accuracy"].value == float(half == sample.answers)
    if task.multi:
        assert by_metric["recall"].value == len(half) / len(sample.answers)
    assert {r.sample for r in rows} == {sample.id}


def test_run_without_a_scorer_reports_no_log_likelihood():
    tok = WordTokenizer()
    (sample,) = passkey.samples(TaskOptions(samples=1, length=200), tok)
    rows = passkey.run(fake_context(tok, f" {sample.answers[0]}."), sample)
    assert [r.metric for r in rows] == ["accuracy"]
