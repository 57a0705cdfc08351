"""Synthetic and perplexity tasks, bootstrap statistics, memory monitoring and the paired eval runner."""

from __future__ import annotations

import json
import math
import zlib

import numpy as np
import pandas as pd
import pytest
import torch

from kvstream.config import CompressionConfig
from kvstream.eval import EvalSpec, MemoryMonitor, bootstrap_ci, paired_bootstrap_delta, run_eval
from kvstream.eval.runner import plan_eval, run_plan
from kvstream.results import ResultsStore
from kvstream.results.fingerprint import model_fingerprint
from kvstream.results.provenance import code_revision
from kvstream.schema import FULL_PRECISION, QUANTIZED, SUMMARY_COLUMNS, TIDY_COLUMNS
from kvstream.tasks.base import Row, RunContext, TaskDataMissing, TaskOptions
from kvstream.tasks.perplexity import corpus_windows, perplexity
from kvstream.tasks.synthetic import (
    PASSKEY_FILLER,
    TASKS,
    niah_multiquery,
    niah_multivalue,
    niah_single,
    passkey,
    score_answers,
    split_sentences,
)
from kvstream.testing import tiny_llama

ESSAY = (
    "Startups are odd things. Most of them fail, and the ones that succeed often look doomed at first. "
    "A founder needs determination more than brilliance! Why do people keep starting them? "
    "Because building something people want is deeply satisfying. Investors look for growth above all. "
    "Writing clarifies thinking, which is why good founders write a lot. Cities shape ambition in subtle ways. "
    "Lisp taught a generation of programmers to think in abstractions. Hackers and painters have much in common. "
)


class WordTokenizer:
    """One token per whitespace-separated word; ids stay below ``vocab`` (stable crc32 hash)."""

    eos_token_id = 1
    bos_token_id = None
    chat_template = None

    def __init__(self, vocab: int = 128) -> None:
        self.vocab = vocab
        self.inverse: dict[int, str] = {}

    def _id(self, word: str) -> int:
        token = 2 + zlib.crc32(word.encode()) % (self.vocab - 2)
        self.inverse[token] = word
        return token

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [self._id(w) for w in text.split()]

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        ids = [int(i) for i in ids]
        if skip_special_tokens:
            ids = [i for i in ids if i != self.eos_token_id]
        return " ".join(self.inverse.get(i, f"<{i}>") for i in ids)


class ChatWordTokenizer(WordTokenizer):
    """The word tokenizer with a minimal chat template."""

    chat_template = "<user> {content} <end> <assistant>"

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=True):
        assert not tokenize and add_generation_prompt
        return f"<system> be helpful <end> <user> {messages[0]['content']} <end> <assistant> "


class CountingTask:
    """Wraps a task and counts ``run`` calls per cache strategy."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.name = inner.name
        self.description = inner.description
        self.per_sample_metric = inner.per_sample_metric
        self.calls: dict[str, int] = {}

    def samples(self, options, tokenizer):
        return self.inner.samples(options, tokenizer)

    def run(self, ctx, sample):
        cache = type(ctx.make_cache()).__name__
        self.calls[cache] = self.calls.get(cache, 0) + 1
        return self.inner.run(ctx, sample)


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "essays.txt"
    path.write_text("\n\n".join([ESSAY] * 40))
    return str(path)


def tiny_config(**changes) -> CompressionConfig:
    return CompressionConfig(chunk_size=32, value_quant_groups=16, **changes)


def fake_context(tokenizer, answer: str, calls: list | None = None) -> RunContext:
    def generate(ids, max_new_tokens):
        if calls is not None:
            calls.append((list(ids), max_new_tokens))
        return answer

    return RunContext(
        model=None,
        tokenizer=tokenizer,
        make_cache=lambda: None,
        chunk_size=32,
        generate=generate,
        perplexity=lambda ids: None,
    )


# --------------------------------------------------------------------------- synthetic tasks


def test_all_tasks_follow_the_protocol():
    from kvstream.tasks.base import Task

    for name, task in {**TASKS, "perplexity": perplexity}.items():
        assert isinstance(task, Task)
        assert task.name == name
        assert task.description and task.per_sample_metric


@pytest.mark.parametrize("task", list(TASKS.values()), ids=list(TASKS))
def test_samples_are_deterministic_for_a_seed(task, corpus):
    tok = WordTokenizer()
    options = TaskOptions(samples=3, length=300, seed=7, corpus=corpus)
    first = task.samples(options, tok)
    again = task.samples(options, tok)
    assert [(s.id, s.prompt, s.answers) for s in first] == [(s.id, s.prompt, s.answers) for s in again]
    other = task.samples(TaskOptions(samples=3, length=300, seed=8, corpus=corpus), tok)
    assert [s.id for s in other] == [s.id for s in first]
    assert [s.answers for s in other] != [s.answers for s in first]
    for sample in first:
        assert sample.answers
        for value in sample.answers:
            assert value in sample.prompt
            assert value.isdigit() or task.name in ("niah_multikey_3", "vt", "fwe")  # UUIDs, names, words
        assert sample.meta["prompt_ids"] == tok.encode(sample.prompt)


@pytest.mark.parametrize("length", [150, 400, 1000, 2500])
@pytest.mark.parametrize("name", list(TASKS))
def test_prompt_length_is_within_two_percent(name, length, corpus):
    for tok in (WordTokenizer(), ChatWordTokenizer()):
        samples = TASKS[name].samples(TaskOptions(samples=2, length=length, corpus=corpus), tok)
        for sample in samples:
            n = len(sample.meta["prompt_ids"])
            assert abs(n - length) <= max(1, 0.02 * length), (name, length, n)
            assert n == sample.meta["prompt_tokens"]


def test_chat_template_wraps_needles_but_passkey_stays_plain(corpus):
    tok = ChatWordTokenizer()
    (sample,) = niah_single.samples(TaskOptions(samples=1, length=200, corpus=corpus), tok)
    assert sample.prompt.startswith("<system> be helpful <end> <user> Some special magic numbers")
    assert "<end> <assistant>" in sample.prompt
    (classic,) = passkey.samples(TaskOptions(samples=1, length=200), tok)
    assert "<user>" not in classic.prompt and classic.prompt.startswith("There is an important info")
    assert classic.prompt.endswith("What is the pass key?\nThe pass key is")


def _needle_word_share(sample, needle: str, instruction_words: int) -> float:
    words = sample.prompt.split()
    first = needle.split()
    start = next(i for i in range(len(words)) if words[i : i + len(first)] == first)
    haystack = sample.meta["haystack_words"]
    return (start - instruction_words) / haystack


def test_needles_sit_at_the_requested_depth(corpus):
    tok = WordTokenizer()
    depths = [0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0]
    samples = niah_single.samples(TaskOptions(length=800, depths=depths, corpus=corpus), tok)
    assert len(samples) == len(depths)
    intro = len(niah_single.instruction.split())
    for depth, sample in zip(depths, samples, strict=True):
        assert sample.meta["depth"] == depth
        (realised,) = sample.meta["needle_depths"]
        assert abs(realised - depth) < 0.05
        (needle,) = sample.meta["needles"]
        assert sample.prompt.count(needle) == 1
        assert abs(_needle_word_share(sample, needle, intro) - depth) < 0.05
    first, last = samples[0], samples[-1]
    assert first.prompt.split("\n\n")[1].startswith(first.meta["needles"][0])
    assert last.prompt.split("\n\n")[1].endswith(last.meta["needles"][0])


def test_passkey_uses_the_classic_filler_and_spreads_depths():
    samples = passkey.samples(TaskOptions(samples=5, length=400), WordTokenizer())
    assert [s.meta["depth"] for s in samples] == [0.0, 0.25, 0.5, 0.75, 1.0]
    for sample in samples:
        (key,) = sample.answers
        assert len(key) == 5
        assert f"The pass key is {key}. Remember it. {key} is the pass key." in sample.prompt
        assert PASSKEY_FILLER in sample.prompt
        assert sample.meta["max_new_tokens"] <= 48
    assert len({s.answers[0] for s in samples}) == 5
    assert passkey.samples(TaskOptions(samples=1, length=400), WordTokenizer())[0].meta["depth"] == 0.5
    assert len(passkey.samples(TaskOptions(length=300), WordTokenizer())) == 10


def test_length_too_short_is_refused():
    with pytest.raises(ValueError, match="no room"):
        passkey.samples(TaskOptions(samples=1, length=20), WordTokenizer())


def test_bad_depths_are_refused():
    with pytest.raises(ValueError, match="depths"):
        passkey.samples(TaskOptions(samples=1, length=200, depths=[1.5]), WordTokenizer())


def test_missing_haystack_raises_task_data_missing(tmp_path):
    with pytest.raises(TaskDataMissing):
        niah_single.samples(TaskOptions(samples=1, length=200, corpus=str(tmp_path / "nope.txt")), WordTokenizer())


def test_multi_needle_tasks_hide_every_value(corpus):
    tok = WordTokenizer()
    (mv,) = niah_multivalue.samples(TaskOptions(samples=1, length=600, corpus=corpus), tok)
    assert len(mv.answers) == 4 and len(set(mv.answers)) == 4
    (key,) = mv.meta["keys"]
    assert mv.prompt.count(f"special magic numbers for {key} is:") == 4
    (mq,) = niah_multiquery.samples(TaskOptions(samples=1, length=600, corpus=corpus), tok)
    assert len(mq.meta["keys"]) == 4
    for k in mq.meta["keys"]:
        assert k in mq.prompt.rsplit("\n\n", 1)[-1]
    (mk,) = TASKS["niah_multikey"].samples(TaskOptions(samples=1, length=600, corpus=corpus), tok)
    assert len(mk.meta["needles"]) == 4 and len(mk.answers) == 1
    asked = mk.meta["asked"][0]
    assert asked in mk.prompt.rsplit("\n\n", 1)[-1]
    assert all(other not in mk.prompt.rsplit("\n\n", 1)[-1] for other in mk.meta["keys"][1:])


def test_score_answers():
    assert score_answers("The pass key is 12345.", ["12345"]) == (1.0, 1.0)
    assert score_answers("The pass key is 1234.", ["12345"]) == (0.0, 0.0)
    assert score_answers("1111111, 2222222 and 4444444", ["1111111", "2222222", "3333333", "4444444"]) == (0.0, 0.75)
    assert score_answers("anything", []) == (0.0, 0.0)


def test_run_scores_the_generated_text(corpus):
    tok = WordTokenizer()
    (sample,) = niah_multivalue.samples(TaskOptions(samples=1, length=300, corpus=corpus), tok)
    calls: list = []
    rows = niah_multivalue.run(fake_context(tok, " ".join(sample.answers[:2]), calls), sample)
    assert {r.metric: r.value for r in rows} == {"accuracy": 0.0, "recall": 0.5}
    assert calls == [(sample.meta["prompt_ids"], niah_multivalue.max_new_tokens)]
    assert json.loads(rows[0].extra["answers"]) == sample.answers
    (single,) = passkey.samples(TaskOptions(samples=1, length=200), tok)
    rows = passkey.run(fake_context(tok, f" {single.answers[0]}."), single)
    assert [(r.metric, r.value, r.sample) for r in rows] == [("accuracy", 1.0, single.id)]


def test_split_sentences():
    assert split_sentences("One.  Two!\nThree? four") == ["One.", "Two!", "Three?", "four"]


# --------------------------------------------------------------------------- perplexity task


def test_perplexity_windows_do_not_overlap(corpus):
    tok = WordTokenizer()
    samples = perplexity.samples(TaskOptions(samples=3, length=50, corpus=corpus), tok)
    assert len(samples) == 3
    with open(corpus) as handle:
        all_ids = tok.encode(handle.read())
    for i, sample in enumerate(samples):
        assert sample.meta["input_ids"] == all_ids[i * 50 : (i + 1) * 50]
    assert perplexity.samples(TaskOptions(samples=3, length=50, corpus=corpus), tok)[2].id == samples[2].id


def test_perplexity_windows_stop_at_the_end_of_the_text():
    tok = WordTokenizer()
    text = " ".join(f"w{i}" for i in range(120))
    assert [len(w) for w in corpus_windows(text, tok, 5, 50)] == [50, 50]


# --------------------------------------------------------------------------- statistics


def test_bootstrap_ci_contains_the_mean_and_shrinks_with_n():
    rng = np.random.default_rng(1)
    small = rng.normal(3.0, 1.0, size=10)
    large = rng.normal(3.0, 1.0, size=1000)
    ci_small = bootstrap_ci(small)
    ci_large = bootstrap_ci(large)
    for values, ci in ((small, ci_small), (large, ci_large)):
        assert ci.estimate == pytest.approx(values.mean())
        assert ci.low <= ci.estimate <= ci.high
        assert ci.n == len(values)
    assert (ci_large.high - ci_large.low) < (ci_small.high - ci_small.low) / 3
    assert bootstrap_ci(small, seed=3) == bootstrap_ci(small, seed=3)
    assert bootstrap_ci(small, alpha=0.5).high - bootstrap_ci(small, alpha=0.5).low < ci_small.high - ci_small.low


def test_bootstrap_edge_cases():
    assert bootstrap_ci([2.0]) == (2.0, 2.0, 2.0, 1)
    assert bootstrap_ci([1.0, 1.0, 1.0]) == (1.0, 1.0, 1.0, 3)
    empty = bootstrap_ci([])
    assert empty.n == 0 and math.isnan(empty.estimate)
    with pytest.raises(ValueError):
        bootstrap_ci([1.0, 2.0], alpha=1.5)


def test_paired_bootstrap_delta():
    base = np.array([1.0, 0.0, 1.0, 1.0, 0.0, 1.0, 1.0, 1.0])
    quant = base - np.array([0, 0, 1, 0, 0, 0, 1, 0])
    ci = paired_bootstrap_delta(quant, base)
    assert ci.estimate == pytest.approx(-0.25)
    assert ci.low <= -0.25 <= ci.high <= 0.0
    same = paired_bootstrap_delta(base, base)
    assert same == (0.0, 0.0, 0.0, len(base))
    with pytest.raises(ValueError, match="paired"):
        paired_bootstrap_delta([1.0, 2.0], [1.0])


# --------------------------------------------------------------------------- memory


def test_memory_monitor_sees_an_allocation():
    import mmap
    import time

    size = 64 * 1024 * 1024
    with MemoryMonitor(interval=0.005) as monitor:
        # A fresh anonymous mapping, so the pages are new to the process whatever the allocator
        # has kept from earlier tests; writing one byte per page makes each resident.
        block = mmap.mmap(-1, size)
        for offset in range(0, size, mmap.PAGESIZE):
            block[offset] = 1
        time.sleep(0.05)
    block.close()  # alive until the monitor's last reading, however busy the machine is
    assert monitor.start_rss_bytes > 0
    assert monitor.peak_rss_bytes >= monitor.start_rss_bytes + 48 * 1024 * 1024
    assert monitor.readings >= 2
    import torch

    if not torch.cuda.is_available():
        assert monitor.peak_accelerator_bytes is None
    assert set(monitor.as_dict()) >= {"peak_rss_bytes", "peak_accelerator_bytes"}


# --------------------------------------------------------------------------- runner


def test_run_id_is_deterministic_and_filesystem_safe(tmp_path):
    spec = EvalSpec(task="passkey", model="/some/where/My Model", config=tiny_config(), results_dir=tmp_path)
    again = EvalSpec(task="passkey", model="/some/where/My Model", config=tiny_config(), results_dir=tmp_path)
    assert spec.run_id() == again.run_id()
    assert "/" not in spec.run_id() and " " not in spec.run_id()
    assert spec.config.config_hash() in spec.run_id()
    other_bits = EvalSpec(task="passkey", model="/some/where/My Model", config=tiny_config(key_bits_normal=2))
    other_options = EvalSpec(task="passkey", model="/some/where/My Model", options=TaskOptions(seed=1))
    assert len({spec.run_id(), other_bits.run_id(), other_options.run_id()}) == 3
    assert EvalSpec(task=passkey).run_id().startswith("passkey__smollm2-135m__")


def test_run_eval_end_to_end_and_baseline_reuse(tiny_model, tmp_path):
    tok = WordTokenizer()
    task = CountingTask(passkey)
    options = TaskOptions(samples=3, length=120)
    spec = EvalSpec(task=task, model="tiny", config=tiny_config(), options=options, results_dir=tmp_path)
    seen: list[tuple[str, int, int]] = []
    result = run_eval(spec, bundle=(tiny_model, tok), progress=lambda *a: seen.append(a))

    assert task.calls == {"StreamingQuantizedCache": 3, "FullPrecisionCache": 3}
    assert (QUANTIZED, 3, 3) in seen and (FULL_PRECISION, 3, 3) in seen
    rows = result.rows
    assert list(rows.columns) == list(TIDY_COLUMNS)
    assert set(rows["variant"]) == {QUANTIZED, FULL_PRECISION}
    assert set(rows.loc[rows["variant"] == FULL_PRECISION, "cache"]) == {"full"}
    assert set(rows.loc[rows["variant"] == QUANTIZED, "cache"]) == {"streaming"}
    per_sample = rows[(rows["sample"] != "") & (rows["metric"] == "accuracy")]
    assert len(per_sample) == 6 and set(per_sample["value"]) <= {0.0, 1.0}
    q_samples = per_sample[per_sample["variant"] == QUANTIZED]["sample"].tolist()
    assert q_samples == per_sample[per_sample["variant"] == FULL_PRECISION]["sample"].tolist()
    for extra in per_sample["extra"]:
        assert "prediction" in json.loads(extra)
    agg = rows[rows["sample"] == ""].set_index(["variant", "metric"])["value"]
    for variant in (QUANTIZED, FULL_PRECISION):
        for metric in ("accuracy", "bits_per_element", "cache_bytes", "peak_cache_bytes", "fp16_bytes"):
            assert (variant, metric) in agg.index
        for metric in ("peak_rss_bytes", "prefill_seconds", "decode_seconds_per_token"):
            if (variant, metric) in agg.index:
                assert agg[(variant, metric)] > 0
    assert agg[(FULL_PRECISION, "bits_per_element")] > agg[(QUANTIZED, "bits_per_element")]
    assert agg[(QUANTIZED, "cache_bytes")] < agg[(FULL_PRECISION, "cache_bytes")]
    assert (QUANTIZED, "key_outlier_ratio") in agg.index
    assert (FULL_PRECISION, "key_outlier_ratio") not in agg.index
    assert (QUANTIZED, "prefill_seconds") in agg.index
    assert rows.loc[rows["variant"] == QUANTIZED, "key_bits_normal"].eq(4).all()

    summary = result.summary
    assert list(summary.columns) == list(SUMMARY_COLUMNS)
    acc = summary.set_index("metric").loc["accuracy"]
    assert acc["kind"] == "task" and acc["n"] == 3
    assert acc["delta"] == pytest.approx(acc[QUANTIZED] - acc[FULL_PRECISION])
    assert acc["ci_low"] <= acc["delta"] <= acc["ci_high"]
    assert "bits_per_element" in set(summary["metric"])

    folder = tmp_path / spec.run_id()
    assert result.path == folder
    for name in ("rows.csv", "summary.csv", "manifest.json"):
        assert (folder / name).is_file()
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["config"] == spec.config.to_dict()
    assert manifest["variants"][QUANTIZED]["readers"] == {"decode": "cpu kernel", "prefill": "flash tiles"}
    assert manifest["baseline"]["reused"] is False
    assert set(manifest["versions"]) >= {"torch", "transformers", "kvstream"}
    assert set(manifest["revision"]) == {"commit", "dirty"}
    assert manifest["revision"]["dirty"] in (True, False, "unknown")
    assert manifest["revision"] == code_revision()
    key = manifest["key"]
    assert (key["dtype"], key["device"], key["baseline_chunk_size"]) == ("float32", "cpu", 256)
    assert key["config"] == spec.config.config_hash() and key["model"] == model_fingerprint(tiny_model)
    assert set(rows["baseline"]) == {manifest["baseline"]["digest"]}
    assert set(manifest["files"]) == {"rows.csv", "summary.csv"}
    assert manifest["started_at"] <= manifest["finished_at"]
    store = ResultsStore(tmp_path)
    assert store.has_run(spec.run_id())
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]

    loaded = store.rows()
    assert list(loaded.columns) == list(TIDY_COLUMNS)
    assert len(loaded) == len(rows)
    pd.testing.assert_series_equal(loaded["sample"], rows["sample"], check_names=False)
    pd.testing.assert_series_equal(loaded["value"], rows["value"], check_names=False)
    assert store.read_run(spec.run_id()).summary.shape == summary.shape

    # a second run with other bits reuses the full-precision rows
    spec2 = EvalSpec(
        task=task, model="tiny", config=tiny_config(key_bits_normal=2, value_bits_normal=2), options=options
    )
    spec2.results_dir = tmp_path
    result2 = run_eval(spec2, bundle=(tiny_model, tok))
    assert task.calls == {"StreamingQuantizedCache": 6, "FullPrecisionCache": 3}
    assert result2.manifest["baseline"]["reused"] is True
    fp1 = rows[rows["variant"] == FULL_PRECISION].reset_index(drop=True)
    fp2 = result2.rows[result2.rows["variant"] == FULL_PRECISION].reset_index(drop=True)
    assert (fp2["run_id"] == spec2.run_id()).all()
    pd.testing.assert_series_equal(fp1["value"], fp2["value"])
    pd.testing.assert_series_equal(fp1["metric"], fp2["metric"])
    both = store.rows()
    assert set(both["run_id"]) == {spec.run_id(), spec2.run_id()}

    # other options: the baseline is computed again
    spec3 = EvalSpec(task=task, model="tiny", config=tiny_config(), options=TaskOptions(samples=2, length=120, seed=5))
    spec3.results_dir = tmp_path
    run_eval(spec3, bundle=(tiny_model, tok))
    assert task.calls == {"StreamingQuantizedCache": 8, "FullPrecisionCache": 5}


class RewordedTask(CountingTask):
    """A task whose prompt text can be changed between runs (same name, options and sample ids)."""

    def __init__(self, inner, word: str = "") -> None:
        super().__init__(inner)
        self.word = word

    def samples(self, options, tokenizer):
        samples = self.inner.samples(options, tokenizer)
        for sample in samples:
            sample.prompt = f"{self.word} {sample.prompt}".strip()
            sample.meta["prompt_ids"] = tokenizer.encode(sample.prompt)
        return samples


def test_changed_prompts_recompute_the_baseline_and_the_run(tiny_model, tmp_path):
    tok = WordTokenizer()
    task = RewordedTask(passkey)
    spec = EvalSpec(task=task, model="tiny", config=tiny_config(), options=TaskOptions(samples=2, length=100))
    spec.results_dir = tmp_path
    first = run_eval(spec, bundle=(tiny_model, tok))
    plan = plan_eval(spec, (tiny_model, tok))
    assert (plan.stored.state, plan.baseline.state) == ("same", "same") and plan.notes() == []

    task.word = "Please:"
    plan = plan_eval(spec, (tiny_model, tok))
    assert (plan.stored.state, plan.stored.reason) == ("changed", "prompts changed")
    assert (plan.baseline.state, plan.baseline.reason) == ("changed", "prompts changed")
    assert plan.notes() == [
        f"re-run {spec.run_id()}: prompts changed since it was stored",
        f"recompute baseline {spec.baseline_slot()}: prompts changed since it was stored",
    ]
    second = run_plan(plan)
    assert task.calls == {"StreamingQuantizedCache": 4, "FullPrecisionCache": 4}
    assert second.manifest["baseline"]["reused"] is False
    assert second.manifest["key"]["prompts"] != first.manifest["key"]["prompts"]
    assert plan_eval(spec, (tiny_model, tok)).stored.reusable

    other = spec.config.replace(key_bits_normal=2)
    spec_bf16 = EvalSpec(task=task, model="tiny", config=other, options=spec.options, results_dir=tmp_path)
    plan = plan_eval(spec_bf16, (tiny_llama(max_position_embeddings=512).to(torch.bfloat16), tok))
    assert plan.stored.state == "missing"
    assert plan.baseline.state == "changed" and "dtype changed (float32 -> bfloat16)" in plan.baseline.reason


def test_effective_bits_are_a_mean_over_samples_with_their_range(tiny_model, tmp_path):
    options = TaskOptions(samples=3, length=120, depths=[0.0, 0.5, 1.0])
    lengths = {"passkey-120-000": 70, "passkey-120-001": 100, "passkey-120-002": 120}

    class Uneven(CountingTask):
        """Prompts of different lengths, so each sample's cache holds a different share of full-precision tail."""

        def samples(self, options, tokenizer):
            samples = self.inner.samples(options, tokenizer)
            for sample in samples:
                sample.meta["prompt_ids"] = sample.meta["prompt_ids"][: lengths[sample.id]]
            return samples

    spec = EvalSpec(task=Uneven(passkey), model="tiny", config=tiny_config(), options=options, results_dir=tmp_path)
    rows = run_eval(spec, bundle=(tiny_model, WordTokenizer())).rows
    agg = rows[(rows["sample"] == "") & (rows["variant"] == QUANTIZED)].set_index("metric")["value"]
    low, mean, high = agg["bits_per_element_min"], agg["bits_per_element"], agg["bits_per_element_max"]
    assert low < mean < high
    assert agg["prefill_bits_per_element_min"] <= agg["prefill_bits_per_element"] <= agg["prefill_bits_per_element_max"]
    assert agg["prefill_bits_per_element"] != agg["bits_per_element"]  # the decoded tokens change the figure
    extra = json.loads(rows[(rows["metric"] == "bits_per_element") & (rows["variant"] == QUANTIZED)]["extra"].iloc[0])
    assert extra == {"n": 3}


def test_run_eval_looks_tasks_up_in_the_registry(tiny_model, tmp_path, monkeypatch):
    from kvstream import registry

    real_get = registry.get

    def fake_get(group, name):
        if group == "tasks" and name == "passkey":
            return passkey
        return real_get(group, name)

    monkeypatch.setattr(registry, "get", fake_get)
    spec = EvalSpec(task="passkey", model="tiny", config=tiny_config(), options=TaskOptions(samples=1, length=100))
    spec.results_dir = tmp_path
    result = run_eval(spec, bundle=(tiny_model, WordTokenizer()))
    assert set(result.rows["task"]) == {"passkey"}


def test_run_eval_perplexity(tiny_model, tmp_path, corpus):
    options = TaskOptions(samples=2, length=96, corpus=corpus)
    spec = EvalSpec(task=perplexity, model="tiny", config=tiny_config(), options=options, results_dir=tmp_path)
    result = run_eval(spec, bundle=(tiny_model, WordTokenizer()))
    per = result.rows[result.rows["sample"] != ""]
    by_variant = per.groupby("variant")["metric"].agg(set)
    assert by_variant[FULL_PRECISION] == by_variant[QUANTIZED]
    assert by_variant[QUANTIZED] == {"nll", "perplexity", "tokens", "kl_divergence", "top1_agreement"}
    values = per.set_index(["variant", "sample", "metric"])["value"]
    for sample in per["sample"].unique():
        assert values[(QUANTIZED, sample, "kl_divergence")] > 0
        assert 0 < values[(QUANTIZED, sample, "top1_agreement")] <= 1
        assert values[(FULL_PRECISION, sample, "kl_divergence")] == 0  # the baseline is its own reference
        assert values[(FULL_PRECISION, sample, "top1_agreement")] == 1
    for variant in (QUANTIZED, FULL_PRECISION):
        for sample in per["sample"].unique():
            nll = values[(variant, sample, "nll")]
            assert values[(variant, sample, "perplexity")] == pytest.approx(math.exp(nll))
            assert values[(variant, sample, "tokens")] == 95
    summary = result.summary.set_index("metric")
    assert summary.loc["perplexity", "n"] == 2
    ratios = [
        values[(QUANTIZED, s, "perplexity")] / values[(FULL_PRECISION, s, "perplexity")] for s in per["sample"].unique()
    ]
    assert summary.loc["perplexity_ratio", QUANTIZED] == pytest.approx(sum(ratios) / 2)
    assert summary.loc["kl_divergence", "delta"] == pytest.approx(summary.loc["kl_divergence", QUANTIZED])
    assert summary.loc["kl_divergence", "ci_low"] <= summary.loc["kl_divergence", "delta"]
    assert summary.loc["tokens", "delta"] == 0


def test_missing_data_propagates_and_leaves_no_results(tiny_model, tmp_path):
    options = TaskOptions(samples=1, length=100, corpus=str(tmp_path / "missing.txt"))
    spec = EvalSpec(task=niah_single, model="tiny", config=tiny_config(), options=options, results_dir=tmp_path / "r")
    with pytest.raises(TaskDataMissing):
        run_eval(spec, bundle=(tiny_model, WordTokenizer()))
    assert not (tmp_path / "r").exists() or not any((tmp_path / "r").iterdir())


def test_interrupted_run_leaves_nothing_that_looks_finished(tiny_model, tmp_path):
    class Failing(CountingTask):
        def run(self, ctx, sample):
            rows = super().run(ctx, sample)
            if sum(self.calls.values()) == 2:
                raise KeyboardInterrupt
            return rows

    task = Failing(passkey)
    spec = EvalSpec(task=task, model="tiny", config=tiny_config(), options=TaskOptions(samples=2, length=100))
    spec.results_dir = tmp_path
    with pytest.raises(KeyboardInterrupt):
        run_eval(spec, bundle=(tiny_model, WordTokenizer()))
    store = ResultsStore(tmp_path)
    assert not store.has_run(spec.run_id())
    assert store.rows().empty
    assert list(store.rows().columns) == list(TIDY_COLUMNS)


def test_task_rows_without_sample_get_the_sample_id(tiny_model, tmp_path):
    class Bare:
        name = "bare"
        description = "rows without sample ids"
        per_sample_metric = "score"

        def samples(self, options, tokenizer):
            return passkey.samples(TaskOptions(samples=2, length=100), tokenizer)

        def run(self, ctx, sample):
            return [Row(metric="score", value=float(sample.meta["index"]))]

    spec = EvalSpec(task=Bare(), model="tiny", config=tiny_config(), results_dir=tmp_path)
    result = run_eval(spec, bundle=(tiny_model, WordTokenizer()))
    per = result.rows[(result.rows["sample"] != "") & (result.rows["metric"] == "score")]
    assert sorted(per["sample"].unique()) == ["passkey-100-000", "passkey-100-001"]
    assert result.summary.set_index("metric").loc["score", "delta"] == 0
