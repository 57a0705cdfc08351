"""Report tables, markdown and plots: on hand-made tidy rows, and on a results folder the CLI writes."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest

from kvstream.config import CompressionConfig
from kvstream.report.markdown import markdown_table, write_report
from kvstream.report.tables import (
    build_tables,
    delta_table,
    format_metric,
    higher_is_better,
    pareto_front,
    run_table,
    sweep_table,
)


def tidy_run(
    run_id, task, config, quantized, full, *, bits, tokens=300, metric="accuracy", peak=1000.0, baseline="b" * 16
):
    """Rows in the results store's layout for one run: per-sample scores plus aggregates per variant."""
    fields = config.to_dict()
    rows = []
    for variant, scores, cache in (("quantized", quantized, config.cache), ("full_precision", full, "full")):
        base = {"run_id": run_id, "task": task, "model": "tiny", "baseline": baseline, "variant": variant}
        base.update({"cache": cache, **fields})
        for i, score in enumerate(scores):
            extra = json.dumps({"prompt_tokens": tokens})
            rows.append({**base, "sample": f"s{i}", "metric": metric, "value": score, "extra": extra})
        aggregate = {
            metric: sum(scores) / len(scores),
            "bits_per_element": bits if variant == "quantized" else 32.0,
            "bits_per_element_min": bits - 0.1 if variant == "quantized" else 32.0,
            "bits_per_element_max": bits + 0.1 if variant == "quantized" else 32.0,
            "prefill_bits_per_element": bits - 0.5 if variant == "quantized" else 32.0,
            "peak_cache_bytes": peak if variant == "quantized" else peak * 8,
            "cache_bytes": peak * 0.9 if variant == "quantized" else peak * 7,
            "fp16_bytes": peak * 4,
            "prefill_seconds": 0.5,
            "decode_seconds_per_token": 0.01,
            "peak_rss_bytes": 2e8,
        }
        for name, value in aggregate.items():
            rows.append({**base, "sample": None, "metric": name, "value": value, "extra": "{}"})
    return rows


@pytest.fixture
def results_frame() -> pd.DataFrame:
    base = CompressionConfig()
    rows = []
    rows += tidy_run("r128", "passkey", base.replace(chunk_size=128), [1, 1, 0, 1], [1, 1, 1, 1], bits=4.6, tokens=300)
    rows += tidy_run("r256", "passkey", base, [1, 1, 1, 1], [1, 1, 1, 1], bits=4.5, tokens=300)
    rows += tidy_run("r512", "passkey", base.replace(chunk_size=512), [1, 0, 0, 1], [1, 1, 1, 1], bits=4.4, tokens=600)
    rows += tidy_run(
        "ppl",
        "perplexity",
        base.replace(key_bits_normal=2, value_bits_normal=2),
        [12.0, 14.0],
        [11.0, 12.5],
        bits=2.7,
        metric="perplexity",
    )
    return pd.DataFrame(rows)


def test_metric_helpers():
    assert higher_is_better("accuracy") and higher_is_better("qa_f1")
    assert not higher_is_better("perplexity") and not higher_is_better("peak_cache_bytes")
    assert not higher_is_better("prefill_seconds")
    assert format_metric("cache_bytes", 3 * 2**20) == "3.00 MiB"
    assert format_metric("prefill_seconds", 0.25) == "250.0 ms"
    assert format_metric("accuracy", -0.25, signed=True) == "-0.25"
    assert format_metric("accuracy", 0.25, signed=True) == "+0.25"
    assert format_metric("accuracy", float("nan")) == "-"


def test_pareto_front():
    assert pareto_front([0.5, 0.9, 0.9], [3.0, 4.0, 5.0], True) == [True, True, False]
    assert pareto_front([10.0, 12.0], [4.0, 3.0], False) == [True, True]


def test_run_table_and_deltas(results_frame):
    runs = run_table(results_frame).set_index("run_id")
    assert runs.loc["r128", "metric"] == "accuracy"
    assert runs.loc["r128", "quantized"] == pytest.approx(0.75)
    assert runs.loc["r128", "delta"] == pytest.approx(-0.25)
    assert runs.loc["ppl", "metric"] == "perplexity"
    assert runs.loc["r512", "context_tokens"] == 600
    deltas = delta_table(results_frame).set_index(["run_id", "metric"])
    row = deltas.loc[("r512", "accuracy")]
    assert row["n"] == 4 and row["delta"] == pytest.approx(-0.5)
    assert row["ci_low"] <= row["delta"] <= row["ci_high"]
    assert ("r128", "bits_per_element") not in deltas.index


def test_sweep_table_marks_best_quality_per_bit(results_frame):
    table = sweep_table(results_frame, ["r128", "r256", "r512"])
    assert list(table["run_id"]) == ["r128", "r256", "r512"]
    assert "chunk_size" in table.columns
    assert table.loc[table["best"], "run_id"].tolist() == ["r256"]
    assert table.set_index("run_id").loc["r256", "pareto"]
    assert not table.set_index("run_id").loc["r128", "pareto"]


def test_ablation_table(results_frame):
    tables = build_tables(results_frame)
    chunk = tables.ablations[(tables.ablations["task"] == "passkey") & (tables.ablations["field"] == "chunk_size")]
    assert chunk["value"].tolist() == ["128", "256", "512"]
    assert chunk["quantized"].tolist() == pytest.approx([0.75, 1.0, 0.5])


def test_effective_bits_mean_range_and_prefill_in_the_tables(results_frame):
    tables = build_tables(results_frame)
    row = tables.quality.set_index("run_id").loc["r128"]
    assert (row["bits_per_element"], row["bits_min"], row["bits_max"]) == pytest.approx((4.6, 4.5, 4.7))
    assert row["prefill_bits_per_element"] == pytest.approx(4.1)
    assert tables.memory_speed.set_index("run_id").loc["r128", "prefill_bits_per_element"] == pytest.approx(4.1)


def test_runs_of_different_baselines_are_never_compared(tmp_path):
    """Same task and model, but measured against two baselines (other prompts): two tables, no shared ablation."""
    base = CompressionConfig()
    rows = tidy_run("a4", "passkey", base, [1, 1], [1, 1], bits=4.5, baseline="1" * 16)
    rows += tidy_run("a2", "passkey", base.replace(key_bits_normal=2), [0, 1], [1, 1], bits=2.5, baseline="1" * 16)
    rows += tidy_run("b8", "passkey", base.replace(key_bits_normal=8), [1, 0], [0, 0], bits=8.5, baseline="2" * 16)
    tables = build_tables(pd.DataFrame(rows))
    quality = tables.quality
    assert quality.groupby("baseline")["run_id"].agg(set).to_dict() == {"1" * 16: {"a4", "a2"}, "2" * 16: {"b8"}}
    assert set(tables.ablations["baseline"]) == {"1" * 16}  # the 8-bit run is in no ablation with the others
    assert set(tables.ablations["value"]) == {"2", "4"}

    files = write_report(pd.DataFrame(rows), tmp_path / "rep", tables=tables)
    md = files.markdown.read_text()
    assert md.count("#### baseline ") == 2 and "#### baseline 11111111 (tiny, ~300 tokens)" in md
    first, second = md.split("#### baseline 11111111")[1].split("#### baseline 22222222")
    assert "| a4 |" in first and "| a2 |" in first and "| b8 |" not in first
    assert "| b8 |" in second.split("## Deltas")[0] and "| a4 |" not in second.split("## Deltas")[0]
    names = {p.name for p in files.plots}
    assert {"quality_vs_bits_passkey_11111111.png", "quality_vs_bits_passkey_22222222.png"} <= names


def test_markdown_table_escapes_and_aligns():
    df = pd.DataFrame({"name": ["a|b", None], "value": [1.23456, math.nan]})
    text = markdown_table(df)
    lines = text.strip().splitlines()
    assert lines[0] == "| name | value |"
    assert lines[1] == "| --- | ---: |"
    assert lines[2] == "| a\\|b | 1.235 |"
    assert lines[3] == "| - | - |"


def test_write_report_from_frame(results_frame, tmp_path):
    files = write_report(results_frame, tmp_path / "rep", source="results", export="csv")
    md = files.markdown.read_text()
    for header in ("## Quality vs effective bits", "## Deltas against full precision", "## Memory and speed"):
        assert header in md
    assert "## Ablations" in md and "### passkey: chunk_size" in md
    header = "| model | run_id | settings | context_tokens | metric | bits_per_element | quantized | full_precision |"
    assert header in md
    assert "| tiny | r128 | chunk=128 | 300 | accuracy | 4.60 | 0.75 | 1 | -0.25 |" in md
    names = {p.name for p in files.plots}
    assert {"quality_vs_bits_passkey.png", "quality_vs_bits_perplexity.png", "memory_vs_context.png"} <= names
    assert "ablation_passkey_chunk_size.png" in names
    for png in files.plots:
        assert png.stat().st_size > 1000
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"]({png.name})" in md
    assert {p.name for p in files.exports} == {
        f"{n}.csv" for n in ("quality", "deltas", "memory_speed", "ablations", "runs")
    }
    quality = pd.read_csv(tmp_path / "rep" / "quality.csv")
    assert set(quality["task"]) == {"passkey", "perplexity"}


# --------------------------------------------------------------------------- kvstream report on real results

from test_cli import (  # noqa: E402, F401
    TASK_ARGS,
    assert_user_error,
    bundle,
    fake_model,
    invoke,
    single_thread,
    tasks_registered,
)


@pytest.fixture
def results_dir(fake_model, tasks_registered, tmp_path):  # noqa: F811
    """Runs written by the CLI: passkey at two lengths, and a chunk-size ablation."""
    results = tmp_path / "results"
    base = [arg for arg in TASK_ARGS if arg not in ("--length", "300")]
    for length in ("300", "420"):
        result = invoke("eval", *base, "--length", length, "--results", results)
        assert result.exit_code == 0, result.output
    result = invoke("ablate", "chunk_size=64,128", *TASK_ARGS, "--bits", "2/8", "--results", results)
    assert result.exit_code == 0, result.output
    return results


def test_report_command_writes_markdown_and_plots(results_dir, tmp_path):
    from kvstream.report.tables import run_table
    from kvstream.results import ResultsStore

    out = tmp_path / "reports"
    result = invoke("report", "--results", results_dir, "--out", out)
    assert result.exit_code == 0, result.output
    assert "accuracy vs effective bits" in result.stdout and "Memory and speed" in result.stdout
    md = (out / "report.md").read_text()
    for header in (
        "# kvstream report",
        "## Quality vs effective bits",
        "### passkey",
        "## Deltas against full precision",
        "| run_id | task | metric | quantized | full_precision | delta | ci_low | ci_high | n |",
        "## Memory and speed",
        "## Ablations",
        "### passkey: chunk_size",
        "## Runs",
    ):
        assert header in md, header
    runs = run_table(ResultsStore(results_dir).rows())
    assert len(runs) == 4
    for rec in runs.to_dict("records"):
        assert rec["run_id"] in md
        assert f"{rec['bits_per_element']:.2f}" in md
    per_baseline = sorted(p.name for p in out.glob("quality_vs_bits_passkey_*.png"))
    assert len(per_baseline) == 2 and md.count("#### baseline ") == 2  # 300 and 420 tokens: other prompts
    for name in (*per_baseline, "memory_vs_context.png", "ablation_passkey_chunk_size.png"):
        png = out / name
        assert png.is_file() and png.stat().st_size > 1000, name
        assert f"]({name})" in md
    assert "| bits_min | bits_max | prefill_bits_per_element |" in md

    exported = invoke("report", "--results", results_dir, "--out", out, "--format", "json")
    assert exported.exit_code == 0, exported.output
    quality = json.loads((out / "quality.json").read_text())
    assert {row["run_id"] for row in quality} == set(runs["run_id"])
    assert "exported" in exported.stdout

    only = invoke("report", "--results", results_dir, "--out", tmp_path / "one", "--bits", "2/8", "-F", "csv")
    assert only.exit_code == 0, only.output
    assert len(pd.read_csv(tmp_path / "one" / "runs.csv")) == 2


def test_a_truncated_run_is_reported_damaged_and_eval_runs_it_again(results_dir, tmp_path):
    from kvstream.report.tables import run_table
    from kvstream.results import ResultsStore

    store = ResultsStore(results_dir)
    run_id = next(r for r in store.scan()[0] if store.read_run(r).manifest["options"]["length"] == 420)
    rows_csv = results_dir / run_id / "rows.csv"
    data = rows_csv.read_bytes()
    rows_csv.write_bytes(data[: len(data) // 2])

    report = invoke("report", "--results", results_dir, "--out", tmp_path / "rep")
    assert report.exit_code == 0, report.output
    problem = f"rows.csv truncated ({len(data) // 2} of {len(data)} bytes)"
    assert f"damaged run {run_id}: {problem}" in " ".join(report.stderr.split())
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "## Damaged runs" in md and f"- `{run_id}`: {problem}" in md
    assert run_id not in md.split("## Quality vs effective bits")[1]
    assert len(run_table(store.rows())) == 3

    base = [arg for arg in TASK_ARGS if arg not in ("--length", "300")]
    again = invoke("eval", *base, "--length", "420", "--results", results_dir)
    assert again.exit_code == 0, again.output
    assert f"re-run {run_id}: damaged: {problem}" in " ".join(again.output.split())
    assert "recompute baseline" not in again.output
    assert store.scan()[1] == [] and len(run_table(store.rows())) == 4


def test_report_filters_that_match_nothing(results_dir, tmp_path):
    out = tmp_path / "none"
    assert_user_error(invoke("report", "--results", results_dir, "--out", out, "--task", "niah_single"), "no runs")
    assert not out.exists()
