"""LongBench tasks on small LongBench-format files, with a character-level fake tokenizer and model."""

from __future__ import annotations

import importlib
import json
import sys
import types
from pathlib import Path

import pytest

from kvstream.tasks import longbench as lb
from kvstream.tasks.base import RunContext, Sample, Task, TaskDataMissing, TaskOptions

BOS = 1
OFFSET = 10


class CharTokenizer:
    """One token per character (id = code point + 10) and an optional BOS (id 1)."""

    def __init__(self, chat: bool = True, model_max_length: int = 10_000) -> None:
        self.chat_template = "{{ user }}" if chat else None
        self.model_max_length = model_max_length

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = [ord(ch) + OFFSET for ch in text]
        return [BOS, *ids] if add_special_tokens else ids

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return "".join(
            "" if i < OFFSET and skip_special_tokens else "<s>" if i < OFFSET else chr(i - OFFSET) for i in ids
        )

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=False):
        assert tokenize is False
        assert add_generation_prompt is True
        assert [m["role"] for m in messages] == ["user"]
        return f"<s><user>{messages[0]['content']}</user><assistant>"


CHAT_OVERHEAD = len("<s><user></user><assistant>")


def record(i: int, *, context: str = "", input: str = "", answers=None, length: int = 100, **more) -> dict:
    return {
        "input": input or f"question {i}?",
        "context": context or f"context number {i}.",
        "answers": answers if answers is not None else [f"answer {i}"],
        "length": length,
        "dataset": more.pop("dataset", "hotpotqa"),
        "language": "en",
        "all_classes": more.pop("all_classes", None),
        "_id": more.pop("_id", f"id{i}"),
        **more,
    }


def write_jsonl(folder: Path, name: str, records: list[dict]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


class FakeGenerate:
    def __init__(self, text: str) -> None:
        self.text = text
        self.calls: list[tuple[list[int], int]] = []
        self.rules: list[dict] = []
        """The keyword arguments (stop ids, minimum length) of each call."""

    def __call__(self, prompt_ids, max_new_tokens, **rules):
        self.calls.append((list(prompt_ids), max_new_tokens))
        self.rules.append(rules)
        return self.text


def fake_context(tokenizer, text: str) -> RunContext:
    return RunContext(
        model=None,
        tokenizer=tokenizer,
        make_cache=lambda: None,
        chunk_size=16,
        generate=FakeGenerate(text),
        perplexity=lambda ids: None,
    )


# the official facts


def test_prompts_and_lengths_cover_the_english_tasks():
    assert set(lb.DATASET2PROMPT) == set(lb.LONGBENCH_TASKS) == set(lb.DATASET2MAXLEN)
    assert len(lb.LONGBENCH_TASKS) == 16
    assert lb.DATASET2MAXLEN["narrativeqa"] == 128
    assert lb.DATASET2MAXLEN["qasper"] == 128
    assert lb.DATASET2MAXLEN["multifieldqa_en"] == 64
    assert lb.DATASET2MAXLEN["hotpotqa"] == lb.DATASET2MAXLEN["triviaqa"] == 32
    assert lb.DATASET2MAXLEN["passage_count"] == lb.DATASET2MAXLEN["passage_retrieval_en"] == 32
    assert lb.DATASET2MAXLEN["gov_report"] == lb.DATASET2MAXLEN["qmsum"] == lb.DATASET2MAXLEN["multi_news"] == 512
    assert lb.DATASET2MAXLEN["trec"] == 64
    assert lb.DATASET2MAXLEN["samsum"] == 128
    assert lb.DATASET2MAXLEN["lcc"] == lb.DATASET2MAXLEN["repobench-p"] == 64
    for task, template in lb.DATASET2PROMPT.items():
        assert "{context}" in template, task
        if task not in ("gov_report", "multi_news", "passage_count", "lcc"):
            assert "{input}" in template, task
    assert lb.DATASET2PROMPT["narrativeqa"].startswith("You are given a story, which can be either a novel")
    assert lb.DATASET2PROMPT["hotpotqa"].endswith("Question: {input}\nAnswer:")
    assert lb.DATASET2PROMPT["trec"] == (
        "Please determine the type of the question below. Here are some examples of questions.\n\n{context}\n{input}"
    )
    assert (
        lb.DATASET2PROMPT["repobench-p"]
        == "Please complete the code given below. \n{context}{input}Next line of code:\n"
    )


def test_format_prompt_fills_context_and_input():
    text = lb.format_prompt("lcc", {"context": "def f():\n    return {1}\n", "input": ""})
    assert text == "Please complete the code given below. \ndef f():\n    return {1}\nNext line of code:\n"
    text = lb.format_prompt("hotpotqa_e", record(0, context="Passage 1: X", input="Who?"))
    assert "The following are given passages.\nPassage 1: X\n\n" in text
    assert text.endswith("Question: Who?\nAnswer:")


def test_longbench_e_task_list():
    assert len(lb.LONGBENCH_E_TASKS) == 13
    assert "narrativeqa" not in lb.LONGBENCH_E_TASKS
    assert "musique" not in lb.LONGBENCH_E_TASKS
    assert "qmsum" not in lb.LONGBENCH_E_TASKS
    with pytest.raises(KeyError):
        lb.LongBenchTask("musique_e")


# loading samples


def test_samples_load_first_n_in_file_order(tmp_path):
    write_jsonl(tmp_path, "hotpotqa", [record(i) for i in range(5)])
    tok = CharTokenizer(chat=False)
    samples = lb.hotpotqa.samples(TaskOptions(samples=3, data_dir=str(tmp_path)), tok)
    assert [s.id for s in samples] == ["id0", "id1", "id2"]
    first = samples[0]
    assert first.answers == ["answer 0"]
    assert first.prompt == lb.DATASET2PROMPT["hotpotqa"].format(context="context number 0.", input="question 0?")
    assert first.meta["prompt_ids"] == tok.encode(first.prompt)
    assert first.meta["max_new_tokens"] == 32
    assert first.meta["truncated"] is False
    assert first.meta["chat_template"] is False
    assert first.meta["length"] == 100
    assert first.meta["bucket"] == "0-4k"
    all_samples = lb.hotpotqa.samples(TaskOptions(samples=None, data_dir=str(tmp_path)), tok)
    assert len(all_samples) == 5


def test_seeded_selection_is_deterministic_and_in_file_order(tmp_path):
    write_jsonl(tmp_path, "hotpotqa", [record(i) for i in range(20)])
    tok = CharTokenizer(chat=False)
    options = TaskOptions(samples=4, seed=7, data_dir=str(tmp_path))
    ids = [s.id for s in lb.hotpotqa.samples(options, tok)]
    assert ids == [s.id for s in lb.hotpotqa.samples(options, tok)]
    assert len(set(ids)) == 4
    assert ids == sorted(ids, key=lambda x: int(x[2:]))
    assert ids != ["id0", "id1", "id2", "id3"]  # a seed other than 0 draws, it does not take the head


def test_select_records():
    records = [{"n": i} for i in range(6)]
    assert [i for i, _ in lb.select_records(records, 2, 0)] == [0, 1]
    assert [i for i, _ in lb.select_records(records, None, 3)] == list(range(6))
    assert [i for i, _ in lb.select_records(records, 10, 3)] == list(range(6))
    picked = [i for i, _ in lb.select_records(records, 3, 5)]
    assert picked == sorted(picked) and len(set(picked)) == 3
    assert picked == [i for i, _ in lb.select_records(records, 3, 5)]


def test_data_dir_may_be_a_store_root(tmp_path):
    write_jsonl(tmp_path / "longbench", "trec", [record(0, all_classes=["A"], answers=["A"])])
    samples = lb.trec.samples(TaskOptions(samples=1, data_dir=str(tmp_path)), CharTokenizer())
    assert samples[0].id == "id0"
    assert samples[0].meta["all_classes"] == ["A"]


def test_missing_data_names_the_download(tmp_path):
    with pytest.raises(TaskDataMissing) as info:
        lb.qasper.samples(TaskOptions(data_dir=str(tmp_path)), CharTokenizer())
    message = str(info.value)
    assert "kvstream download longbench" in message
    assert "qasper.jsonl" in message
    assert isinstance(info.value, FileNotFoundError)


def test_default_data_dir_without_store_module(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "kvstream.data.store", None)  # import fails
    monkeypatch.setenv("KVSTREAM_HOME", str(tmp_path))
    assert lb.default_data_dir() == tmp_path / "data" / "longbench"
    write_jsonl(tmp_path / "data" / "longbench", "lcc", [record(0, answers=["x = 1"])])
    assert [s.id for s in lb.lcc.samples(TaskOptions(), CharTokenizer())] == ["id0"]


def test_default_data_dir_from_store_module(tmp_path, monkeypatch):
    store = types.ModuleType("kvstream.data.store")
    store.data_dir = lambda: tmp_path / "store"
    monkeypatch.setitem(sys.modules, "kvstream.data.store", store)
    assert lb.default_data_dir() == tmp_path / "store" / "longbench"


def test_bad_jsonl_line_is_reported(tmp_path):
    path = tmp_path / "qasper.jsonl"
    path.write_text(json.dumps(record(0)) + "\n{not json\n", encoding="utf-8")
    with pytest.raises(ValueError, match="qasper.jsonl:2"):
        lb.qasper.samples(TaskOptions(data_dir=str(tmp_path)), CharTokenizer())


# truncation and chat template


def test_middle_truncate_ids_keeps_exact_head_and_tail():
    ids = list(range(100, 110))
    assert lb.middle_truncate_ids(ids, 6) == [100, 101, 102, 107, 108, 109]
    assert lb.middle_truncate_ids(ids, 7) == [100, 101, 102, 107, 108, 109]  # budget // 2 each side
    assert lb.middle_truncate_ids(ids, 10) == ids
    assert lb.middle_truncate_ids(ids, 50) == ids
    with pytest.raises(ValueError):
        lb.middle_truncate_ids(ids, 1)


def test_build_prompt_truncates_the_middle_then_decodes():
    tok = CharTokenizer(chat=False)
    rec = record(0, context="A" * 50 + "MIDDLE" + "Z" * 50, input="Q?")
    raw = lb.format_prompt("trec", rec)
    raw_ids = tok.encode(raw)
    built = lb.build_prompt("trec", rec, tok, budget=40)
    assert built.truncated and built.raw_tokens == len(raw_ids)
    kept = lb.middle_truncate_ids(raw_ids, 40)
    assert built.text == tok.decode(kept[:20], skip_special_tokens=True) + tok.decode(
        kept[20:], skip_special_tokens=True
    )
    # the BOS counted as the first kept token is skipped in the text and added back on re-tokenizing
    assert built.text == raw[:19] + raw[-20:]
    assert "MIDDLE" not in built.text
    assert built.ids == tok.encode(built.text)
    untouched = lb.build_prompt("trec", rec, tok, budget=len(raw_ids))
    assert not untouched.truncated and untouched.text == raw and untouched.ids == raw_ids


def test_build_prompt_truncates_before_the_chat_template():
    tok = CharTokenizer(chat=True)
    rec = record(0, context="B" * 200, input="Q?")
    built = lb.build_prompt("qasper", rec, tok, budget=60)
    assert built.chat_template and built.truncated
    raw = lb.format_prompt("qasper", rec)
    assert built.text == f"<s><user>{raw[:29] + raw[-30:]}</user><assistant>"
    assert built.ids == tok.encode(built.text, add_special_tokens=False)


@pytest.mark.parametrize("task", lb.LONGBENCH_TASKS)
def test_chat_template_rule_per_task(task):
    without = {"trec", "triviaqa", "samsum", "lcc", "repobench-p"}
    assert lb.uses_chat_template(task, CharTokenizer(chat=True)) is (task not in without)
    assert lb.uses_chat_template(task, CharTokenizer(chat=False)) is False
    built = lb.build_prompt(task, record(0), CharTokenizer(chat=True), budget=5000)
    assert built.text.startswith("<s><user>") is (task not in without)
    if task in lb.LONGBENCH_E_TASKS:
        assert lb.uses_chat_template(f"{task}_e", CharTokenizer(chat=True)) is (task not in without)


def test_budget_from_options_or_model_context(tmp_path):
    tok = CharTokenizer(chat=True, model_max_length=500)
    assert lb.input_budget("hotpotqa", TaskOptions(length=300), tok) == 300
    assert lb.input_budget("hotpotqa", TaskOptions(), tok) == 500 - 32 - CHAT_OVERHEAD
    assert lb.input_budget("lcc", TaskOptions(), tok) == 500 - 64  # no chat template for lcc
    huge = CharTokenizer(chat=False, model_max_length=int(1e30))
    assert lb.input_budget("gov_report", TaskOptions(), huge) == 8192 - 512
    with pytest.raises(ValueError):
        lb.input_budget("hotpotqa", TaskOptions(length=1), tok)
    write_jsonl(tmp_path, "hotpotqa", [record(0, context="C" * 2000)])
    (sample,) = lb.hotpotqa.samples(TaskOptions(data_dir=str(tmp_path)), tok)
    assert sample.meta["budget"] == 500 - 32 - CHAT_OVERHEAD
    assert sample.meta["truncated"] is True
    assert len(sample.meta["prompt_ids"]) + 32 <= 500


# LongBench-E


def test_longbench_e_reads_its_own_file_and_buckets(tmp_path):
    lengths = [120, 3999, 4000, 7999, 8000, 15000]
    write_jsonl(tmp_path, "hotpotqa_e", [record(i, length=n) for i, n in enumerate(lengths)])
    write_jsonl(tmp_path, "hotpotqa", [record(99)])
    tok = CharTokenizer(chat=False)
    samples = lb.hotpotqa_e.samples(TaskOptions(data_dir=str(tmp_path)), tok)
    assert [s.meta["bucket"] for s in samples] == ["0-4k", "0-4k", "4-8k", "4-8k", "8k+", "8k+"]
    ctx = fake_context(tok, "answer 5")
    runs = [lb.hotpotqa_e.run(ctx, s) for s in samples]
    # each sample: its qa_f1 row, then the same score under its bucket's metric (what summaries group by)
    assert [[r.metric for r in rows] for rows in runs] == [
        ["qa_f1", "qa_f1[0-4k]"],
        ["qa_f1", "qa_f1[0-4k]"],
        ["qa_f1", "qa_f1[4-8k]"],
        ["qa_f1", "qa_f1[4-8k]"],
        ["qa_f1", "qa_f1[8k+]"],
        ["qa_f1", "qa_f1[8k+]"],
    ]
    assert [r.extra["bucket"] for r, _ in runs] == ["0-4k", "0-4k", "4-8k", "4-8k", "8k+", "8k+"]
    assert [r.value for r, _ in runs] == [50.0] * 5 + [100.0]  # "answer 5" vs "answer i": F1 1/2 unless i = 5
    assert all(bucket.value == row.value and bucket.sample == row.sample for row, bucket in runs)
    assert lb.hotpotqa_e.name == "hotpotqa_e" and lb.hotpotqa_e.metric == "qa_f1"
    assert lb.hotpotqa_e.per_sample_metric == "qa_f1"
    # LongBench v1 tasks have no buckets
    write_jsonl(tmp_path, "hotpotqa", [record(0, length=9000)])
    (sample,) = lb.hotpotqa.samples(TaskOptions(data_dir=str(tmp_path)), tok)
    assert [r.metric for r in lb.hotpotqa.run(ctx, sample)] == ["qa_f1"]


def test_longbench_e_buckets_reach_the_summary_and_the_report(tmp_path):
    """A LongBench-E run: the summary and the report's delta table carry each bucket's mean and sample count."""
    from kvstream.config import CompressionConfig
    from kvstream.eval.runner import EvalSpec, run_eval
    from kvstream.report.tables import delta_table
    from kvstream.testing import tiny_llama

    lengths = [100, 5000, 5001, 9000]
    write_jsonl(tmp_path / "data", "hotpotqa_e", [record(i, length=n) for i, n in enumerate(lengths)])
    spec = EvalSpec(
        task=lb.hotpotqa_e,
        model="tiny",
        config=CompressionConfig(chunk_size=16, value_quant_groups=16),
        options=TaskOptions(data_dir=str(tmp_path / "data"), length=120),
        results_dir=tmp_path / "results",
    )
    result = run_eval(spec, bundle=(tiny_llama(vocab_size=VOCAB), CharTokenizer(chat=False)))
    summary = result.summary.set_index("metric")
    assert summary.loc["qa_f1", "n"] == 4
    assert {m: int(summary.loc[m, "n"]) for m in ("qa_f1[0-4k]", "qa_f1[4-8k]", "qa_f1[8k+]")} == {
        "qa_f1[0-4k]": 1,
        "qa_f1[4-8k]": 2,
        "qa_f1[8k+]": 1,
    }
    per_sample = result.rows[(result.rows["metric"] == "qa_f1") & (result.rows["sample"] != "")]
    for variant in ("quantized", "full_precision"):
        scores = per_sample[per_sample["variant"] == variant].set_index("sample")["value"]
        assert summary.loc["qa_f1[4-8k]", variant] == pytest.approx(scores[["id1", "id2"]].mean())
        assert summary.loc["qa_f1[8k+]", variant] == pytest.approx(scores["id3"])
    report = delta_table(result.rows).set_index("metric")
    assert {"qa_f1", "qa_f1[0-4k]", "qa_f1[4-8k]", "qa_f1[8k+]"} <= set(report.index)
    assert report.loc["qa_f1[4-8k]", "n"] == 2


# samsum: LongBench's pred.py generates it with min_length = prompt + 1 and the newline token as a second EOS


class EosCharTokenizer(CharTokenizer):
    """`CharTokenizer` with an EOS token (id 2), skipped on decode like any special token."""

    eos_token_id = 2


VOCAB = 160
"""Model vocabulary covering `CharTokenizer`'s ids of printable ASCII."""
NEWLINE = ord("\n") + OFFSET
LETTER_A = ord("a") + OFFSET


def rigged_model(bias: dict[int, float]):
    """A tiny Llama whose next-token logits are ``bias`` whatever the input: a constant LM head."""
    import torch

    from kvstream.testing import tiny_llama

    model = tiny_llama(vocab_size=VOCAB)
    head = torch.nn.Linear(model.config.hidden_size, VOCAB, bias=True)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
        for token, value in bias.items():
            head.bias[token] = value
    model.lm_head = head
    return model


def test_greedy_generate_min_new_tokens_suppresses_the_stop_ids_at_first():
    import torch

    from kvstream.cache.full import FullPrecisionCache
    from kvstream.config import CompressionConfig
    from kvstream.engine import greedy_generate

    model = rigged_model({NEWLINE: 3.0, EosCharTokenizer.eos_token_id: 2.0, LETTER_A: 1.0})
    ids = torch.tensor([[BOS, 50, 60, 70]])

    def run(**rules):
        cache = FullPrecisionCache.from_model(model, CompressionConfig(cache="full"))
        return greedy_generate(model, ids, cache, 5, 16, **rules)[0].tolist()

    assert run() == [NEWLINE] * 5
    assert run(eos_token_ids={NEWLINE}) == [NEWLINE]
    assert run(eos_token_ids={NEWLINE, 2}, min_new_tokens=1) == [LETTER_A, NEWLINE]
    assert run(eos_token_ids={NEWLINE, 2}, min_new_tokens=2) == [LETTER_A, LETTER_A, NEWLINE]


@pytest.mark.parametrize(
    ("bias", "expected"),
    [
        # the model opens with a newline: forbidden as the first token, then it stops the answer
        ({NEWLINE: 3.0, LETTER_A: 1.0}, "a\n"),
        # the model opens with EOS: forbidden too, then EOS ends the answer
        ({EosCharTokenizer.eos_token_id: 3.0, NEWLINE: 2.0, LETTER_A: 1.0}, "a"),
    ],
)
def test_samsum_first_token_and_newline_stop(tmp_path, bias, expected):
    from kvstream.config import CompressionConfig
    from kvstream.eval.runner import make_context

    tok = EosCharTokenizer(chat=False)
    write_jsonl(tmp_path, "samsum", [record(0, answers=["a"], dataset="samsum")])
    write_jsonl(tmp_path, "samsum_e", [record(0, answers=["a"], dataset="samsum")])
    for task in (lb.samsum, lb.samsum_e):
        (sample,) = task.samples(TaskOptions(data_dir=str(tmp_path)), tok)
        ctx = make_context(rigged_model(bias), tok, CompressionConfig(cache="full", chunk_size=16))
        (row, *_) = task.run(ctx, sample)
        assert row.extra["prediction"] == expected
        assert row.value == pytest.approx(100.0, abs=1e-5)  # "a" against the gold "a"


def test_newline_stop_only_for_samsum(tmp_path):
    tok = EosCharTokenizer(chat=False)
    assert lb.generation_rules("samsum", tok) == {"eos_token_ids": {2, NEWLINE}, "min_new_tokens": 1}
    assert lb.generation_rules("samsum_e", tok) == lb.generation_rules("samsum", tok)
    for name in lb.TASKS:
        if lb.base_task(name) != "samsum":
            assert lb.generation_rules(name, tok) == {}, name
    write_jsonl(tmp_path, "triviaqa", [record(0, answers=["Paris"], dataset="triviaqa")])
    (sample,) = lb.triviaqa.samples(TaskOptions(data_dir=str(tmp_path)), tok)
    ctx = fake_context(tok, "Paris")
    lb.triviaqa.run(ctx, sample)
    assert ctx.generate.rules == [{}]


# end to end


def test_run_end_to_end_qa(tmp_path):
    write_jsonl(tmp_path, "hotpotqa", [record(0, answers=["Paris"], _id="q-paris")])
    tok = CharTokenizer(chat=True)
    (sample,) = lb.hotpotqa.samples(TaskOptions(data_dir=str(tmp_path)), tok)
    ctx = fake_context(tok, "Paris, France")
    (row,) = lb.hotpotqa.run(ctx, sample)
    assert ctx.generate.calls == [(sample.meta["prompt_ids"], 32)]
    assert tok.decode(ctx.generate.calls[0][0]).startswith("<s><user>Answer the question based on the given passages")
    assert row.metric == "qa_f1" == lb.hotpotqa.per_sample_metric
    assert row.sample == "q-paris"
    assert row.value == pytest.approx(200 / 3)  # [paris, france] vs [paris]: P 1/2, R 1
    assert row.extra["prediction"] == "Paris, France"
    assert json.loads(row.extra["answers"]) == ["Paris"]
    assert row.extra["prompt_tokens"] == len(sample.meta["prompt_ids"])
    assert row.extra["truncated"] is False


def test_run_end_to_end_trec_first_line(tmp_path):
    classes = ["Number", "Location", "Animal"]
    write_jsonl(tmp_path, "trec", [record(0, answers=["Location"], all_classes=classes, dataset="trec")])
    tok = CharTokenizer(chat=True)
    (sample,) = lb.trec.samples(TaskOptions(data_dir=str(tmp_path)), tok)
    assert not sample.prompt.startswith("<s><user>")  # trec: no chat template
    ctx = fake_context(tok, "Location\nQuestion: How many?\nType: Number")
    (row,) = lb.trec.run(ctx, sample)
    assert ctx.generate.calls[0][1] == 64
    assert row.metric == "classification"
    assert row.value == 100.0


def test_run_end_to_end_code_and_retrieval(tmp_path):
    write_jsonl(tmp_path, "repobench-p", [record(0, answers=["return x + 1"], input="def f(x):\n")])
    write_jsonl(tmp_path, "passage_retrieval_en", [record(1, answers=["Paragraph 4"])])
    tok = CharTokenizer(chat=True)
    (code,) = lb.repobench_p.samples(TaskOptions(data_dir=str(tmp_path)), tok)
    (row,) = lb.repobench_p.run(fake_context(tok, "```python\nreturn x + 1\n```"), code)
    assert row.metric == "code_sim" and row.value == 100.0
    (retrieval,) = lb.passage_retrieval_en.samples(TaskOptions(data_dir=str(tmp_path)), tok)
    (row,) = lb.passage_retrieval_en.run(fake_context(tok, "Paragraph 4, or maybe Paragraph 9"), retrieval)
    assert row.metric == "retrieval" and row.value == 50.0


def test_run_without_stored_ids_tokenizes_the_prompt():
    tok = CharTokenizer(chat=False)
    sample = Sample(id="s", prompt="Count: ", answers=["3"], meta={})
    ctx = fake_context(tok, "3")
    (row,) = lb.passage_count.run(ctx, sample)
    assert ctx.generate.calls == [(tok.encode("Count: "), 32)]
    assert row.value == 100.0


# registration


def test_tasks_implement_the_protocol():
    assert len(lb.TASKS) == 29
    for name, task in lb.TASKS.items():
        assert isinstance(task, Task)
        assert task.name == name
        assert task.per_sample_metric == task.metric
        assert task.description and task.__doc__ == task.description


def test_entry_point_lines_resolve():
    tomllib = pytest.importorskip("tomllib")
    pyproject = Path(lb.__file__).resolve().parents[2] / "pyproject.toml"
    entry_points = tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]["entry-points"]
    table = {k: v for k, v in entry_points["kvstream.tasks"].items() if v.startswith("kvstream.tasks.longbench:")}
    expected = set(lb.LONGBENCH_TASKS) | {f"{t}_e" for t in lb.LONGBENCH_E_TASKS}
    assert set(table) == expected
    for name, value in table.items():
        module, attribute = value.split(":")
        assert getattr(importlib.import_module(module), attribute) is lb.TASKS[name]
