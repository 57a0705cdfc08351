"""The retrieval benchmark driver (`benchmarks/retrieval.py`): its declared plan, its estimate and its page."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from test_eval import WordTokenizer

from kvstream.config import CompressionConfig
from kvstream.testing import tiny_llama

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import retrieval  # noqa: E402

THREE_HOURS = 3 * 3600


def test_models_by_length_cover_every_task():
    everything = retrieval.PLAN + retrieval.EXTENDED
    assert {row.model for row in everything if row.length in (2048, 4096)} == {retrieval.QWEN}
    assert {row.model for row in everything if row.length == 8192} == {retrieval.SMOLLM2}
    assert {row.task for row in everything if row.length == 8192} == {"passkey", "niah_single"}
    tasks = {"passkey", "niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery"}
    for length in (2048, 4096):
        covered = {row.task for row in everything if row.length == length and set(retrieval.WIDTHS) <= set(row.configs)}
        assert covered == tasks, length


def test_preset_rows_are_the_second_model_with_ten_samples():
    with_presets = {row.slot for row in retrieval.PLAN if set(retrieval.PRESETS) <= set(row.configs)}
    expected = {(retrieval.QWEN, task, n, 10) for task in ("passkey", "niah_single") for n in (2048, 4096)}
    assert with_presets == expected
    assert not any(set(retrieval.PRESETS) & set(row.configs) for row in retrieval.EXTENDED)
    # rows of one slot share their baseline: one sample count per (model, task, length)
    slots = {(row.model, row.task, row.length): row.samples for row in retrieval.PLAN + retrieval.EXTENDED}
    assert all(row.samples == slots[(row.model, row.task, row.length)] for row in retrieval.EXTENDED)


def test_the_estimate_fits_three_hours_and_counts_each_baseline_once():
    assert 120 * 60 < retrieval.estimate_seconds(retrieval.PLAN) < THREE_HOURS
    row = retrieval.PlanRow(retrieval.QWEN, "passkey", 2048, 10, ("4/8 bits",))
    again = retrieval.PlanRow(retrieval.QWEN, "passkey", 2048, 10, ("3/8 bits",))
    assert retrieval.estimate_seconds([row]) == 2 * 10 * retrieval.SAMPLE_SECONDS[(retrieval.QWEN, 2048)]
    assert retrieval.estimate_seconds([row, again]) == 3 * 10 * retrieval.SAMPLE_SECONDS[(retrieval.QWEN, 2048)]


def test_a_missing_preset_is_named_in_one_line_and_its_rows_dropped(monkeypatch, capsys):
    monkeypatch.setattr(retrieval, "PRESETS", ("no-such-preset",))
    configs = retrieval.configurations()
    assert set(configs) == set(retrieval.WIDTHS)
    assert capsys.readouterr().out.count("\n") == 1
    plan = retrieval.select(retrieval.PLAN, configs, lambda row: True)
    assert [row.configs for row in plan] == [tuple(retrieval.WIDTHS)] * len(retrieval.PLAN)


def test_the_page_without_runs_shows_the_plan(tmp_path):
    page = retrieval.render(retrieval.collect(tmp_path, {}), retrieval.PLAN, retrieval.EXTENDED)
    minutes = retrieval.minutes(retrieval.estimate_seconds(retrieval.PLAN))
    assert f"**No runs are recorded yet for this plan** (estimated {minutes} min" in page
    assert "| qwen2.5-coder-0.5b | passkey | 2048 | 10 | bits-3.3, bits-2.5, 4/8 bits, 3/8 bits, 2/8 bits |" in page
    assert "## Rows that cannot separate a good cache from a bad one" in page


def tiny(bits: int) -> CompressionConfig:
    return CompressionConfig(chunk_size=32, value_quant_groups=16, key_bits_normal=bits, value_bits_normal=bits)


def test_runs_resume_and_the_page_renders_from_them(tmp_path, capsys):
    configs = {"4/8 bits": tiny(4), "2/8 bits": tiny(2)}
    plan = [retrieval.PlanRow("tiny", "passkey", 120, 1, ("4/8 bits", "2/8 bits"))]
    loads: list[str] = []

    def load(name: str):
        loads.append(name)
        return tiny_llama(max_position_embeddings=512), WordTokenizer()

    retrieval.run(plan, configs, tmp_path, load)
    assert capsys.readouterr().out.count("tiny passkey 120") == 2
    retrieval.run(plan, configs, tmp_path, load)  # every run stored on the same key: nothing runs again
    assert "tiny passkey 120" not in capsys.readouterr().out and loads == ["tiny", "tiny"]

    labels = {config.config_hash(): label for label, config in configs.items()}
    frame = retrieval.collect(tmp_path, labels)
    assert sorted(frame["label"]) == ["2/8 bits", "4/8 bits"] and set(frame["metric"]) == {"accuracy"}
    page = retrieval.render(frame, retrieval.PLAN, retrieval.EXTENDED)
    revision = frame["revision"].iloc[0]
    assert f"**All rows come from one revision, `{revision}`.**" in page
    assert "## `tiny`" in page and "No runs are recorded yet" not in page
    row = next(line for line in page.splitlines() if line.startswith("| passkey | 120 | 4/8 bits |"))
    assert row.endswith(f"| met | `{revision}` |")  # a random model answers nothing either way: 0 samples apart
    assert "- 4/8 bits, accuracy within one sample of full precision: met on 1 of 1 rows; missed: none." in page
    budget = "holding at most 3.3 effective bits"
    assert f"- bits-3.3, accuracy equal to full precision, {budget}: no run recorded yet." in page
    blind = page.split("## Rows that cannot separate")[1].split("## Plan")[0]
    assert "- tiny passkey 120 (1 sample): full precision answers 0 of 1; 2/8 bits scores the same" in blind


@pytest.mark.parametrize(
    ("delta", "label", "bits", "expected"),
    [
        (-0.1, "bits-3.3", 3.2, "**missed**"),
        (-0.1, "3/8 bits", 3.6, "met"),
        (-0.1, "bits-2.5", 2.4, "met"),
        (0.0, "bits-2.5", 2.63, "**missed** (2.63 > 2.5 bits)"),  # equal accuracy, but more bits than the budget
        (-0.2, "bits-2.5", 2.63, "**missed**"),
    ],
)
def test_verdicts_follow_each_target(delta, label, bits, expected):
    row = type("Row", (), dict(delta=delta, n=10, label=label, metric="accuracy", bits=bits))()
    assert retrieval.verdict(row) == expected


def test_main_prints_the_estimate_first_and_writes_the_page(tmp_path, monkeypatch, capsys):
    configs = {label: CompressionConfig(chunk_size=64 * (i + 1)) for i, label in enumerate(retrieval.ORDER)}
    monkeypatch.setattr(retrieval, "configurations", lambda: configs)
    planned: list[list] = []
    monkeypatch.setattr(retrieval, "run", lambda plan, *rest: planned.append(plan))
    out = tmp_path / "page.md"
    monkeypatch.setattr(sys, "argv", ["retrieval.py", "--results", str(tmp_path / "runs"), "--out", str(out)])
    retrieval.main()
    minutes = retrieval.minutes(retrieval.estimate_seconds(retrieval.PLAN))
    rows = len(retrieval.PLAN)
    assert capsys.readouterr().out.startswith(f"{rows} rows, estimated {minutes} min on two CPU cores\n")
    assert planned == [list(retrieval.PLAN)] and "No runs are recorded yet" in out.read_text()


def test_target_lines_name_each_miss_with_its_reason():
    rows = [
        dict(model="m", task="passkey", length=2048, n=10, label="bits-2.5", delta=0.0, bits=2.63),
        dict(model="m", task="passkey", length=4096, n=10, label="bits-2.5", delta=-0.2, bits=2.7),
        dict(model="m", task="niah_single", length=4096, n=10, label="bits-2.5", delta=-0.1, bits=2.4),
    ]
    accuracy = retrieval.pd.DataFrame([{**row, "metric": "accuracy"} for row in rows])
    line = next(text for text in retrieval.target_lines(accuracy) if text.startswith("- bits-2.5,"))
    assert line.endswith("met on 1 of 3 rows; missed: m passkey 2048 (2.63 bits), m passkey 4096 (-2, 2.70 bits).")
